"""Shared fixtures. Every test runs offline on the CPU."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Rendered shapes scenes (mklvisita.tasks.shapes) go to a per-session folder, never the user's cache.
if "MKLVISITA_CACHE" not in os.environ:
    os.environ["MKLVISITA_CACHE"] = tempfile.mkdtemp(prefix="mklvisita-cache-")
    atexit.register(shutil.rmtree, os.environ["MKLVISITA_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from mklvisita import MKLVisITA, MKLVisITAConfig  # noqa: E402


def micro_config() -> MKLVisITAConfig:
    """Even smaller than tiny(): 32 px, 2 blocks; for tests that only need the shapes of things."""
    cfg = MKLVisITAConfig.tiny()
    cfg.vision.image_size = 32
    cfg.vision.depth = 2
    cfg.vision.width = 32
    cfg.vision.heads = 2
    cfg.text.width = 32
    cfg.text.heads = 2
    cfg.kernels.proj_dim = 16
    cfg.fusion.width = 32
    cfg.fusion.heads = 2
    return cfg


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init micro model saved as a release folder (config + safetensors + tokenizer)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "micro"
    MKLVisITA(micro_config()).save_pretrained(path)
    return path
