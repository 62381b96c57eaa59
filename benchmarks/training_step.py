"""Training steps per second and where a step's time goes: data (items, rendering), preprocessing (collate),
forward, backward, optimizer.

    python -m benchmarks.training_step [--quick] [--config training/configs/shapes.yaml] [--steps 5] [--uncached]
        [--threads N] [--out DIR] [key=value ...]

Decisions: the model, the dataset (its scene cache filled first when cold, that one-off time reported apart) and the
collate are built as the trainer builds them, batches follow the trainer's first-epoch order; the optimizer is
AdamW over every trainable parameter (the trainer's parameter groups change the learning rates, not the cost).
One warm-up step, then the mean over ``--steps``. ``--uncached`` times the path without the scene cache: every item
generated and rendered on access (``ShapesScenes``) and preprocessed through PIL. ``--quick``: 64 scenes, batch 4,
one step. Wall-clock figures depend on the machine and its load (the JSON records the machine); say which when
quoting them.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from benchmarks.common import ROOT, parser, report, setup


class _Uncached(torch.utils.data.Dataset):
    """Shapes training items rendered on access (PIL images), with no scene cache."""

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


def measure(config: str, overrides: list[str], steps: int, uncached: bool = False) -> dict[str, Any]:
    from mklvisita.tasks import TrainCollate, get_task
    from training.config import load_config
    from training.train import EpochSampler, build_model_and_processor, build_train_dataset

    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    model, processor = build_model_and_processor(cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t0 = time.perf_counter()
    dataset = _Uncached(cfg.data.train_size, cfg.data.shapes_seed) if uncached else build_train_dataset(cfg)
    setup_s = time.perf_counter() - t0
    loss = model.config.loss
    dense = loss.patch_weight > 0 or loss.grounding_weight > 0
    collate = TrainCollate(
        processor, get_task(cfg.data.train), cfg.data.hard_negatives, dense=dense, grid=model.vision.grid
    )
    order = list(EpochSampler(len(dataset), cfg.seed))
    parts = ("data", "preprocess", "forward", "backward", "optimizer")
    totals = dict.fromkeys(parts, 0.0)
    for step in range(steps + 1):
        times, t = {}, time.perf_counter()
        items = [dataset[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
        times["data"] = time.perf_counter() - t
        t = time.perf_counter()
        batch = collate(items)
        times["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        out = model(**batch, return_loss=True)
        times["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        out.loss.backward()
        times["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - t
        if step > 0:  # step 0 warms up
            totals = {k: totals[k] + times[k] for k in parts}
    row = {f"{k}_ms": 1000 * v / steps for k, v in totals.items()}
    step_ms = sum(row.values())
    return {
        "step_ms": step_ms,
        "steps_per_s": 1000 / step_ms,
        **row,
        "batch_size": cfg.batch_size,
        "dataset_setup_s": setup_s,
        "cached": not uncached,
    }


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "training" / "configs" / "shapes.yaml"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--uncached", action="store_true", help="render every item on access (no scene cache)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    setup(args)
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["data.train_size=64", "batch_size=4"]
    row = measure(args.config, overrides, 1 if args.quick else args.steps, args.uncached)
    return report("training_step", args, [{"config": f"{args.config.rsplit('/', 1)[-1]}", **row}])


if __name__ == "__main__":
    main()
    sys.exit(0)
