"""The benchmark recipes run: flickr30k.yaml and coco.yaml, as written, on a small Karpathy-format set.

Only the model is shrunk (tiny random backbones instead of the pretrained ViT-B/16 and bert-base-uncased, which need
the network, and a narrow fusion / kernel width so a step takes seconds on a CPU; the fusion keeps its 6 layers) and
the run is cut to two steps. Everything the YAML files say is exercised as written: the Karpathy readers (COCO's
restval and image sub-folders), batch size 32, mixed precision (bf16 falls back to fp32 on a CPU), 8 DataLoader
workers, the optimiser and schedule, the caption length, and the end-of-run evaluation with the recipe's k, so a
user with a GPU and the data meets no surprise in the recipe itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import train as train_mod
from training.config import load_config

REPO = Path(__file__).resolve().parents[1]
# Tiny random backbones in place of the pretrained ones, and narrow heads; nothing of the YAML files changes.
TINY_MODEL = [
    "model.vision.pretrained=false",
    "model.vision.model_name=test_vit",
    "model.text.model_name=null",
    "model.text.pretrained=false",
    "model.text.width=32",
    "model.text.layers=2",
    "model.text.heads=2",
    "model.kernels.proj_dim=16",
    "model.fusion.width=32",
    "model.fusion.heads=2",
]
WORDS = "a dog cat man woman child runs sits on the grass street beach red blue white with ball near water".split()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each run in a test starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_karpathy_set(root: Path, name: str, splits: dict[str, int], filepaths: dict[str, str]) -> Path:
    """A Karpathy split file ``dataset_<name>.json`` with 5 captions per image and small JPEGs under ``root``.

    ``filepaths`` maps a split to its image subfolder (COCO's ``train2014`` / ``val2014``; "" = the root itself).
    """
    rng = np.random.default_rng(0)
    records = []
    for split, n in splits.items():
        folder = filepaths.get(split, "")
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            filename = f"{split}_{i:03d}.jpg"
            pixels = rng.integers(0, 255, (24 + i % 5, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / filename)
            sentences = [{"raw": " ".join(rng.choice(WORDS, size=6)) + "."} for _ in range(5)]
            record = {"filename": filename, "split": split, "sentences": sentences}
            if folder:
                record["filepath"] = folder
            records.append(record)
    path = root / f"dataset_{name}.json"
    path.write_text(json.dumps({"images": records, "dataset": name}))
    return path


RECIPES = {
    # 13 train images x 5 captions = 65 pairs: two steps of the recipe's batch of 32.
    "flickr30k": ({"train": 13, "val": 4, "test": 4}, {}),
    # COCO's Karpathy file: restval joins train, images sit under train2014 / val2014.
    "coco": ({"train": 8, "restval": 5, "val": 4, "test": 4}, {"train": "train2014", "restval": "val2014"}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_benchmark_recipe_runs_two_steps_with_evaluation(recipe: str, tmp_path: Path) -> None:
    from mklvisita import MKLVisITA

    splits, filepaths = RECIPES[recipe]
    images = tmp_path / "images"
    spec = f"karpathy:{write_karpathy_set(images, recipe, splits, filepaths)}:{images}"
    yaml_path = REPO / "training" / "configs" / f"{recipe}.yaml"
    out = tmp_path / "run"
    cfg = load_config(
        yaml_path, [*TINY_MODEL, f"data.train={spec}", f"data.eval={spec}", "max_steps=2", f"output_dir={out}"]
    )
    assert cfg.mixed_precision == "bf16" and cfg.data.num_workers > 0  # the recipe's own settings are exercised
    metrics = train_mod.train(cfg)
    if not torch.cuda.is_available():
        assert train_mod.resolve_mixed_precision("bf16") == "no"

    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert key in metrics and np.isfinite(metrics[key])
    assert 0 <= metrics["t2i_r1"] <= metrics["t2i_r10"] <= 100
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    model = MKLVisITA.from_pretrained(out / "release")
    assert model.config.text.max_length == 40 and model.config.fusion.layers == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
