"""Where a training step's time goes: data items, collate (preprocessing, tokens, positives), forward, backward.

    python benchmarks/train_step.py [--config training/configs/shapes.yaml] [--steps 5] [--threads 1]
        [--uncached] [key=value ...]

Decisions: the model and the dataset are built as the trainer builds them (the scene cache is filled first if it is
cold; that one-off time is printed apart); batches follow the trainer's first-epoch order. ``--uncached`` times the
old path instead: every item generated and rendered on access (``ShapesScenes``) and preprocessed through PIL.
Prints milliseconds per step as JSON (mean over ``--steps`` after one warm-up step). Wall-clock numbers depend on
the machine and its load; say which when quoting them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _Uncached(torch.utils.data.Dataset):
    """Items rendered on access, as the trainer did before the cache (PIL images)."""

    def __init__(self, size: int, seed: int):
        from mklvisita.data import ShapesScenes

        self.scenes = ShapesScenes("train", size=size, seed=seed)

    def __len__(self) -> int:
        return len(self.scenes) * self.scenes.captions_per_image

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, k = divmod(index, self.scenes.captions_per_image)
        scene = self.scenes.scene(i)
        item = self.scenes.render(scene, i)
        return {
            "image": item["image"],
            "caption": item["captions"][k],
            "negative": item["negatives"][k],
            "image_id": i,
            "claim": scene.claims[k],
            "scene_objects": scene.objects,
            "objects": item["objects"],
            "image_size": self.scenes.image_size,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "training" / "configs" / "shapes.yaml"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--uncached", action="store_true", help="render every item on access (the old path)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mklvisita.tasks import TrainCollate, get_task
    from training.config import load_config
    from training.train import EpochSampler, build_model_and_processor, build_train_dataset

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.seed)
    model, processor = build_model_and_processor(cfg)
    model.train()
    t0 = time.perf_counter()
    dataset = _Uncached(cfg.data.train_size, cfg.data.shapes_seed) if args.uncached else build_train_dataset(cfg)
    setup_s = time.perf_counter() - t0
    loss = model.config.loss
    collate = TrainCollate(
        processor,
        get_task(cfg.data.train),
        cfg.data.hard_negatives,
        dense=loss.patch_weight > 0 or loss.grounding_weight > 0,
        grid=model.vision.grid,
    )
    order = list(EpochSampler(len(dataset), cfg.seed))
    totals = {"items": 0.0, "collate": 0.0, "forward": 0.0, "backward": 0.0}
    for step in range(args.steps + 1):
        times = {}
        t = time.perf_counter()
        items = [dataset[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
        times["items"] = time.perf_counter() - t
        t = time.perf_counter()
        batch = collate(items)
        times["collate"] = time.perf_counter() - t
        t = time.perf_counter()
        out = model(**batch, return_loss=True)
        times["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        out.loss.backward()
        times["backward"] = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        if step > 0:  # step 0 warms up
            totals = {k: totals[k] + times[k] for k in totals}
    result = {f"{k}_ms": round(1000 * v / args.steps, 1) for k, v in totals.items()}
    result["step_ms"] = round(sum(result.values()), 1)
    result |= {"dataset_setup_s": round(setup_s, 1), "batch_size": cfg.batch_size, "cached": not args.uncached}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
