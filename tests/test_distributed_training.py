"""Training across processes on the CPU (gloo): the global-batch contrastive loss, two-process runs against one,
resuming a two-process checkpoint in one process, and the launch of N CPU processes from `accelerate launch --cpu`."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_training import SHAPES_YAML, TINY, _fresh_accelerate_state, _losses  # noqa: F401 - fixture
from training import train as train_mod
from training.config import load_config

REPO = Path(__file__).resolve().parents[1]
# Losses whose one- and two-process values agree exactly once the ITC is gathered: no sampled ITM negatives (their
# pool is each process's sub-batch), no word-level losses (ratios over each sub-batch's words).
EXACT = ["model.loss.itm_sampled=none", "model.loss.grounding_weight=0", "model.loss.relation_weight=0"]
# What still differs between one and two processes in training mode: the text encoder's dropout (BERT's built-in
# 0.1) draws other masks for the same captions. Measured with these settings by benchmarks/distributed_training.py
# (docs/results/benchmarks/distributed_training_equivalence.json, setting no_sampling): at most 2.3 % on the loss and
# 2.1 % on the ITC over seeds 0-2 x 6 steps; an ITC over each process's 4 captions alone is about 25 % lower.
LOSS_TOL = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------- global-batch ITC, in-process


def _itc_worker(rank: int, world: int, port: int, cache: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mklvisita.tasks import TrainCollate, get_task
    from training.distributed import MetadataCollate, global_batch_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config(SHAPES_YAML, [*TINY, *EXACT, f"data.cache_dir={cache}", "data.train_size=4"])
        torch.manual_seed(0)
        model, processor = train_mod.build_model_and_processor(cfg)
        model.eval()  # the text encoder's dropout draws differ between one process and two: off here
        task = get_task("shapes")
        collate = TrainCollate(processor, task, True, dense=True, grid=model.vision.grid)
        items = [train_mod.build_train_dataset(cfg)[i] for i in range(8)]

        reference = copy.deepcopy(model)  # one process, the whole batch of 8
        ref = reference(**collate(items), return_loss=True)
        ref.loss.backward()

        half = items[rank * 4 : (rank + 1) * 4]  # this process's sub-batch, through DDP as in training
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        batch = MetadataCollate(collate)(half)
        out, loss, terms = global_batch_loss(ddp, model, batch, task, cfg.model_config().loss.itc_weight)
        loss.backward()  # DDP averages the gradients over the two processes

        assert float(terms["itc"]) == pytest.approx(float(ref.losses["itc"]), rel=1e-5)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert float(mean_loss) / world == pytest.approx(float(ref.loss), rel=1e-5)
        # The sub-batch's own InfoNCE (4 captions, no gather) is another loss: the comparison above can tell.
        assert abs(float(out.losses["itc"]) - float(ref.losses["itc"])) > 0.05
        grads = dict(reference.named_parameters())
        compared = 0
        for name, p in model.named_parameters():
            want = grads[name].grad
            if want is None:
                continue
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
            compared += 1
        assert compared > 20
    finally:
        dist.destroy_process_group()


def test_global_batch_itc_and_gradients_equal_one_process(tmp_path: Path) -> None:
    """Two gloo processes of 4 captions each: the gathered ITC, the mean loss and the DDP-averaged gradient of every
    parameter equal one process's on the 8 captions (model in eval mode, losses that do not sample)."""
    import torch.multiprocessing as mp

    mp.spawn(_itc_worker, args=(2, _free_port(), str(tmp_path / "cache")), nprocs=2, join=True)


# ------------------------------------------------------------------------- accelerate launch, two processes


def _launch(out_dir: Path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--cpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "training.train",
        "--config",
        str(SHAPES_YAML),
        *TINY,
        f"output_dir={out_dir}",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def test_two_processes_follow_one_process_and_resume_in_one(tmp_path: Path) -> None:
    """`accelerate launch --num_processes 2 --cpu` with 4 captions per process against one process with 8, same
    seed: per-step losses within LOSS_TOL; its checkpoint (written by two processes) resumes in one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    steps = [*EXACT, "max_steps=6", "save_every=3", "keep_checkpoints=0"]
    train_mod.train(load_config(SHAPES_YAML, [*TINY, f"output_dir={one}", *steps, "batch_size=8"]))
    want = _losses(one)

    run = _launch(two, *steps, "batch_size=4", "stop_after=3")  # stopped after step 3, as if killed
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes on cpu, 8 captions per step" in run.stdout + run.stderr
    rows = [json.loads(line) for line in (two / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by the main process
    want_itc = {r["step"]: r["itc"] for r in map(json.loads, (one / "losses.jsonl").read_text().splitlines())}
    for r in rows:  # the global batch's InfoNCE (over 4 captions alone it would be about 25 % lower)
        assert r["itc"] == pytest.approx(want_itc[r["step"]], rel=LOSS_TOL), f"step {r['step']}"
    ckpt = train_mod.checkpoint_dir(two, 3)
    state = json.loads((ckpt / train_mod.TRAINER_STATE).read_text())
    assert (state["num_processes"], state["global_batch"]) == (2, 8)
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    writers = {f.name.split(".")[-2] for f in (two / "logs").rglob("events.out.tfevents*")}  # ...<host>.<pid>.<n>
    assert len(writers) == 1 and not (two / "release").exists()  # tensorboard: the main process alone

    train_mod.train(load_config(SHAPES_YAML, [*TINY, f"output_dir={two}", *steps, "batch_size=8"]), resume="latest")
    got = _losses(two)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):  # 1-3: two processes; 4-6: one process resumed from their checkpoint
        assert got[step] == pytest.approx(want[step], rel=LOSS_TOL), f"step {step}: {got[step]} vs {want[step]}"
    assert (two / "release" / "model.safetensors").is_file()


def test_cpu_process_count_comes_from_the_accelerate_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from mklvisita.processes import requested_cpu_processes

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    launcher = ["python", "/venv/bin/accelerate", "launch", "--num_processes", "3", "--cpu", "-m", "training.train"]
    assert requested_cpu_processes([*launcher, "--config", "x.yaml"]) == 3
    module_form = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=2", "-m", "training.train"]
    assert requested_cpu_processes(module_form) == 2
    assert requested_cpu_processes(["python", "-m", "training.train"]) == 1  # not started by accelerate
    monkeypatch.setenv("WORLD_SIZE", "2")  # a worker of a launch that started the processes itself
    assert requested_cpu_processes(launcher) == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU run: accelerate's own business
    assert requested_cpu_processes(launcher) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU and no --cpu: still one process
    assert requested_cpu_processes(["python", "accelerate", "launch", "--num_processes", "2", "train.py"]) == 2
