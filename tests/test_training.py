"""Training and evaluation commands on tiny configs (CPU, seconds): runs, resume, checkpoints, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import train as train_mod
from training.config import RunConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SHAPES_YAML = REPO / "training" / "configs" / "shapes.yaml"
# A model and data small enough for a step to take well under a second on a CPU.
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
    "batch_size=4",
    "data.train_size=8",
    "data.eval=",
    "optim.warmup_steps=2",
    "log_every=1",
    "eval.batch_size=16",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each run in a test starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _cfg(tmp: Path, *extra: str):
    return load_config(SHAPES_YAML, [*TINY, f"output_dir={tmp}", *extra])


def _losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_two_step_run_writes_release_card_and_config(tmp_path: Path) -> None:
    from mklvisita import MKLVisITA

    cfg = _cfg(tmp_path, "max_steps=2", "save_every=0", "data.eval=shapes", "data.eval_limit=6", "eval.k=4")
    metrics = train_mod.train(cfg)
    for key in ("i2t_r1", "t2i_r10", "rsum", "binding_acc", "itm_f1"):
        assert key in metrics
    assert set(_losses(tmp_path)) == {1, 2}
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(tmp_path).values())
    release = tmp_path / "release"
    card = (release / "README.md").read_text()
    assert "binding_acc" in card and "train_size: 8" in card
    assert json.loads((release / "metrics.json").read_text())["rsum"] == pytest.approx(metrics["rsum"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_steps"] == 2 and saved["resolved_model"]["vision"]["image_size"] == 32
    assert (tmp_path / "config.yaml").is_file() and any((tmp_path / "logs").rglob("events.out.tfevents*"))
    model = MKLVisITA.from_pretrained(release)
    assert model.config.vision.image_size == 32 and model.config.fusion.layers == 1


def test_resume_after_sigkill_replays_the_same_losses(tmp_path: Path) -> None:
    """Kill `python -m training.train` (SIGKILL, possibly mid-save), then --resume latest: same losses as unbroken."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    # 4 scenes x 5 captions / batch 4 = 5 steps per epoch: the resumed steps cross epoch boundaries.
    steps = ["max_steps=12", "save_every=1", "keep_checkpoints=2", "data.train_size=4"]
    train_mod.train(_cfg(full, *steps))
    want = _losses(full)
    assert sorted(want) == list(range(1, 13))

    cmd = [sys.executable, "-m", "training.train", "--config", str(SHAPES_YAML), *TINY, f"output_dir={killed}", *steps]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name >= "step_0000003" for p in train_mod.complete_checkpoints(killed)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint written within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "release").exists(), "the run finished before it could be killed"
    latest = train_mod.resolve_resume("latest", killed)
    resumed_from = int(latest.name.split("_")[1])
    assert 3 <= resumed_from < 12
    # Newer but unusable: a save interrupted mid-write, and a copy that never got its COMPLETE marker.
    ckpts = killed / "checkpoints"
    (ckpts / "step_0000013.tmp").mkdir(exist_ok=True)
    (ckpts / "step_0000013.tmp" / "COMPLETE").write_text("")
    (ckpts / "step_0000014").mkdir()
    assert train_mod.resolve_resume("latest", killed) == latest

    train_mod.train(_cfg(killed, *steps), resume="latest")
    got = _losses(killed)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], abs=1e-5), f"step {step} (resumed from {resumed_from})"
    assert (killed / "release" / "model.safetensors").is_file()


def test_non_finite_loss_stops_without_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mklvisita.model import MKLVisITA

    real_forward, calls = MKLVisITA.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MKLVisITA, "forward", forward)
    with pytest.raises(train_mod.NonFiniteLossError, match="non-finite loss at step 3"):
        train_mod.train(_cfg(tmp_path, "max_steps=5", "save_every=1"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert not (tmp_path / "release").exists()


def test_cli_rejects_unknown_override_with_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_mod.main(["--config", str(SHAPES_YAML), "optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "'optim.lr'" in err
    with pytest.raises(RunConfigError, match="model.fusion.enabled"):
        load_config(SHAPES_YAML, ["model.fusion.enable=false"])
    with pytest.raises(RunConfigError, match="batch_size: expected an integer"):
        load_config(SHAPES_YAML, ["batch_size=many"])


def test_config_overrides_are_typed() -> None:
    cfg = load_config(SHAPES_YAML, ["optim.lr=3e-4", "data.train=hf:nlphuji/flickr30k", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.train == "hf:nlphuji/flickr30k" and cfg.optim.betas == (0.8, 0.9)
    base = load_config(SHAPES_YAML.with_name("shapes_baseline.yaml")).model_config()
    assert base.kernels.sources == ["global"] and base.kernels.functions == ["cosine"] and not base.fusion.enabled


def test_lr_schedule_warms_up_then_decays() -> None:
    f = [train_mod.lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] > 0.1
    assert train_mod.lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_backbones_get_the_lower_learning_rate(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "optim.backbone_lr_mult=0.1", "optim.lr=1e-3", "optim.mix_lr_mult=20")
    model, _ = train_mod.build_model_and_processor(cfg)
    groups = train_mod.param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone/decay"]["lr"] == pytest.approx(1e-4) and by_name["new/decay"]["lr"] == pytest.approx(1e-3)
    mix = by_name["mix/no_decay"]
    assert mix["lr"] == pytest.approx(2e-2) and mix["weight_decay"] == 0.0
    mix_names = {n for n, p in model.named_parameters() if any(p is q for q in mix["params"])}
    assert "kernels.logits" in mix_names and all(n.endswith(train_mod.MIX_SUFFIXES) for n in mix_names)
    assert by_name["new/no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_evaluate_cli_writes_metrics(tmp_path: Path) -> None:
    from mklvisita import MKLVisITA
    from training import evaluate

    cfg = _cfg(tmp_path)
    MKLVisITA(cfg.model_config()).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "m.json"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", "shapes", "--out", str(out), "--limit", "6", "--k", "3"]
    assert evaluate.main(args) == 0
    result = json.loads(out.read_text())
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "binding_acc", "i2t_map"):
        assert 0 <= result[key] <= (600 if key == "rsum" else 100)
    assert result["meta"]["n_images"] == 6 and result["meta"]["n_captions"] == 30 and result["meta"]["k"] == 3
    assert str(tmp_path) not in result["meta"]["command"]  # no directory of this machine in a result file
    assert "--out <outside>/m.json" in result["meta"]["command"]  # tmp_path lies outside the working directory


def test_evaluate_records_portable_paths(tmp_path: Path) -> None:
    from training.evaluate import portable_argument

    assert portable_argument(str(tmp_path / "runs" / "m.json"), cwd=tmp_path) == "runs/m.json"
    assert portable_argument(str(tmp_path / "m.json"), cwd=tmp_path / "repo") == "<outside>/m.json"
    assert portable_argument("runs/m.json", cwd=tmp_path) == "runs/m.json"
    assert portable_argument("--limit", cwd=tmp_path) == "--limit"


def test_push_to_hub_uploads_the_release_folder(tmp_path: Path, monkeypatch) -> None:
    """No network here: the Hub client is replaced by a recorder; what matters is what would be sent."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id))
    )

    def upload_folder(self, repo_id, folder_path, **kw):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    train_mod.train(_cfg(tmp_path, "max_steps=1", "save_every=0", "data.eval="), push_to_hub="someone/mklvisita-test")
    assert calls[0] == ("create", "someone/mklvisita-test")
    assert calls[1][:2] == ("upload", "someone/mklvisita-test")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(calls[1][2])


def test_library_imports_neither_gradio_nor_accelerate() -> None:
    """mklvisita/ never imports them (transformers may pull in accelerate on its own when it is installed)."""
    import ast
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent / "mklvisita"
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in ("gradio", "accelerate")], f"{file.name} imports {names}"
    code = (
        "import sys, mklvisita, mklvisita.matcher, mklvisita.evaluation, mklvisita.figures, mklvisita.data;"
        "assert 'gradio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_config_extends_merges_sections_and_refuses_loops(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("batch_size: 8\noptim:\n  lr: 1.0e-3\n  warmup_steps: 5\nmax_steps: 3\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim:\n  lr: 2.0e-3\noutput_dir: runs/child\n")
    cfg = load_config(tmp_path / "child.yaml", ["max_steps=4"])
    assert (cfg.batch_size, cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps) == (8, 2e-3, 5, 4)
    assert cfg.output_dir == "runs/child"
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RunConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_init_from_fine_tunes_a_release_and_refuses_another_architecture(tmp_path: Path, capsys) -> None:
    from mklvisita import MKLVisITA

    first = tmp_path / "first"
    train_mod.train(_cfg(first, "max_steps=1", "save_every=0"))
    source = MKLVisITA.from_pretrained(first / "release")
    model, _ = train_mod.build_model_and_processor(_cfg(tmp_path / "x", f"init_from={first / 'release'}"))
    for name, weight in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name  # every weight starts from the release
    fresh, _ = train_mod.build_model_and_processor(_cfg(tmp_path / "y"))
    assert not all(torch.equal(fresh.state_dict()[n], w) for n, w in source.state_dict().items())

    second = tmp_path / "second"  # a fine-tuning run with another loss setting trains and releases
    init = f"init_from={first / 'release'}"
    train_mod.train(_cfg(second, "max_steps=1", "save_every=0", init, "data.reverse_negatives=1"))
    assert (second / "release" / "model.safetensors").is_file()
    # A release trained without word_positions and the relation head fine-tunes with them (shapes.yaml has both):
    # the zero-initialised offset projections and the training-time head start fresh, everything else is the
    # release's.
    plain = tmp_path / "plain"
    train_mod.train(
        _cfg(plain, "max_steps=1", "save_every=0", "model.fusion.word_positions=false", "model.loss.relation_weight=0")
    )
    plain_weights = MKLVisITA.from_pretrained(plain / "release").state_dict()
    model, _ = train_mod.build_model_and_processor(_cfg(tmp_path / "w", f"init_from={plain / 'release'}"))
    fresh = model.zero_start_keys()
    assert any(".rel_pos." in k for k in fresh) and "relation_head.weight" in fresh
    assert not fresh & set(plain_weights)
    assert all(not model.state_dict()[k].any() for k in fresh if ".rel_pos." in k)
    for name, weight in plain_weights.items():
        assert torch.equal(model.state_dict()[name], weight), name

    argv = ["--config", str(SHAPES_YAML), *TINY, f"output_dir={tmp_path / 'z'}", "max_steps=1"]
    assert train_mod.main([*argv, "model.fusion.layers=2", f"init_from={first / 'release'}"]) == 2
    assert "init_from: the checkpoint's weights do not fit" in capsys.readouterr().err
    assert train_mod.main([*argv, f"init_from={tmp_path / 'missing'}"]) == 2
    assert "init_from: cannot load the checkpoint" in capsys.readouterr().err


def test_data_shares_outside_0_1_are_refused_when_the_config_loads(tmp_path: Path) -> None:
    with pytest.raises(RunConfigError, match="data.reverse_negatives"):
        _cfg(tmp_path, "data.reverse_negatives=1.5")
    assert _cfg(tmp_path, "data.reverse_negatives=0.5").data.reverse_negatives == 0.5
    with pytest.raises(RunConfigError, match="data.undirected_relations"):
        _cfg(tmp_path, "data.undirected_relations=-0.1")
    with pytest.raises(RunConfigError, match="data.photo_style"):
        _cfg(tmp_path, "data.photo_style=2")
    assert _cfg(tmp_path, "data.photo_style=0.5").data.photo_style == 0.5


def test_mixed_precision_falls_back_to_fp32_where_the_device_lacks_it(monkeypatch, capsys) -> None:
    resolve = train_mod.resolve_mixed_precision
    assert resolve("no") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve("bf16") == "bf16" and resolve("fp16") == "fp16"
    assert resolve("bf16", cpu=True) == "no"  # `accelerate launch --cpu` on a machine with a GPU
    assert "running on the CPU, training in fp32" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    assert resolve("bf16") == "no" and resolve("fp16") == "fp16"
    assert "mixed_precision=bf16: Tesla V100 has no bf16, training in fp32" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if not any(
        d is not None and d.is_available() for d in (getattr(torch.backends, "mps", None), getattr(torch, "xpu", None))
    ):
        assert resolve("bf16") == "no" and resolve("fp16") == "no"
        assert "mixed_precision=fp16: no GPU found, training in fp32" in capsys.readouterr().err
        assert resolve("bf16", say=False) == "no" and capsys.readouterr().err == ""  # processes other than the main


def test_bf16_run_trains_with_what_the_device_has(tmp_path: Path, capsys) -> None:
    """bf16 where the device has it (accelerate's autocast), else fp32 with a message, not a failure."""
    from mklvisita import MKLVisITA

    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    train_mod.train(_cfg(tmp_path, "max_steps=2", "save_every=0", "mixed_precision=bf16"))
    out = capsys.readouterr()
    assert f"precision {'bf16' if cuda_bf16 else 'no'}" in out.out
    if not cuda_bf16 and not torch.cuda.is_available():
        assert "mixed_precision=bf16: no GPU found, training in fp32" in out.err
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(tmp_path).values())
    weights = MKLVisITA.from_pretrained(tmp_path / "release").state_dict().values()
    assert all(w.dtype == torch.float32 for w in weights if w.is_floating_point())  # master weights stay fp32
