"""Fixtures shared by the app tests: a tiny random checkpoint, the embedded ones, and the demo launched on localhost.

Imported by name from tests/test_app*.py (tests/conftest.py belongs to the lead).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
CAT = EXAMPLES / "cat.jpg"
SHAPES = sorted(EXAMPLES.glob("shapes_*.png"))
ALLOWED_EXTRA = "test-owner/extra-checkpoint"  # an allow-listed id; the tests' loader serves the tiny checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from mklvisita import MKLVisITA, MKLVisITAConfig

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    MKLVisITA(MKLVisITAConfig.tiny()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def matcher(app_checkpoint: Path):
    from mklvisita import Matcher

    return Matcher.from_pretrained(str(app_checkpoint))


@pytest.fixture(scope="session")
def photo_matcher():
    from mklvisita import Matcher

    return Matcher.default("photo")


@pytest.fixture(scope="session")
def sources_matcher():
    """The photo sources checkpoint: the photo checkpoint's kernels without its fusion (a checkpoint with no ITM)."""
    from mklvisita import Matcher

    return Matcher.default("photo-sources")


@pytest.fixture(scope="session")
def shapes_matcher():
    from mklvisita import Matcher

    return Matcher.default("shapes")


@pytest.fixture(scope="session")
def server_matcher(photo_matcher):
    """The demo's default checkpoint as the server runs it: the embedded photo checkpoint."""
    return photo_matcher


@pytest.fixture(scope="session")
def server(server_matcher, shapes_matcher, matcher) -> Iterator[tuple]:
    """The demo, launched once per test session on a free localhost port with the production launch settings."""
    import app

    def loader(spec: str):
        if spec == "shapes":
            return shapes_matcher
        if spec != ALLOWED_EXTRA:
            raise AssertionError(f"the registry asked to load {spec!r}, which is not allow-listed")
        return matcher

    demo = app.create_demo(server_matcher, [ALLOWED_EXTRA], loader=loader)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **app.launch_kwargs()
    )
    try:
        yield demo, url.rstrip("/")
    finally:
        demo.close()
