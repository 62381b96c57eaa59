"""Two training processes against one with the same global batch: how far their per-step losses are apart.

    python -m benchmarks.distributed_training [--quick] [--seeds 0 1 2] [--steps 6] [--out DIR]

Decisions: the shapes recipe on the tiny model of the tests (32 px, one text and one fusion layer, 8 scenes), one
process with ``batch_size=8`` (``python -m training.train``) against ``accelerate launch --num_processes 2 --cpu``
with ``batch_size=4``, same seed, for ``--steps`` optimizer steps each. Two loss settings: ``recipe`` (shapes.yaml as
it is: ITM negatives sampled from each process's sub-batch, word-level losses) and ``no_sampling`` (no sampled ITM
negatives, no grounding or relation loss: what ``tests/test_distributed_training.py`` compares). Rows: the largest
relative difference over the steps of each seed, of the total loss and of the ITC term; what is left in
``no_sampling`` is the text encoder's dropout, whose masks differ between one and two processes. ``--quick``: one
seed, two steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, parser, report, setup

TINY = [
    "model.vision.image_size=32",
    "model.vision.depth=2",
    "model.vision.width=32",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.kernels.proj_dim=16",
    "model.fusion.layers=1",
    "model.fusion.width=32",
    "model.fusion.heads=2",
    "data.train_size=8",
    "data.eval=",
    "optim.warmup_steps=2",
    "log_every=1",
    "save_every=0",
]
SETTINGS = {
    "recipe": [],
    "no_sampling": ["model.loss.itm_sampled=none", "model.loss.grounding_weight=0", "model.loss.relation_weight=0"],
}
CONFIG = "training/configs/shapes.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, out: Path, overrides: list[str]) -> list[dict[str, Any]]:
    train = ["-m", "training.train", "--config", CONFIG, *TINY, *overrides, f"output_dir={out}"]
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        launch = ["--num_processes", str(processes), "--cpu", "--num_machines", "1", "--mixed_precision", "no"]
        launch += ["--dynamo_backend", "no", "--main_process_port", str(_port())]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, *train]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args(argv)
    setup(args)
    seeds, steps = (args.seeds[:1], 2) if args.quick else (args.seeds, args.steps)
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting, extra in SETTINGS.items():
            for seed in seeds:
                common = [*extra, f"seed={seed}", f"max_steps={steps}"]
                one = _run(1, Path(tmp) / f"{setting}_{seed}_1", [*common, "batch_size=8"])
                two = _run(2, Path(tmp) / f"{setting}_{seed}_2", [*common, "batch_size=4"])
                curves[f"{setting}/seed{seed}"] = {"one_process": one, "two_processes": two}
                row: dict[str, Any] = {"setting": setting, "seed": seed, "steps": steps}
                for term in ("loss", "itc"):
                    rel = [abs(a[term] - b[term]) / abs(a[term]) for a, b in zip(one, two)]
                    row[f"max_rel_diff_{term}"] = round(max(rel), 4)
                rows.append(row)
                print(row, flush=True)
    command = "python -m benchmarks.distributed_training" + (
        " --quick" if args.quick else f" --seeds {' '.join(map(str, seeds))} --steps {steps}"
    )
    return report("distributed_training_equivalence", args, rows, {"command": command, "curves": curves})


if __name__ == "__main__":
    main()
