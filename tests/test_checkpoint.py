"""Checkpoint saving and loading: crash-safe swaps under SIGKILL, no stale card, refused damaged folders."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import micro_config
from safetensors.torch import load_file, save_file

from mklvisita import CheckpointError, MKLVisITA


def _model(seed: int) -> MKLVisITA:
    torch.manual_seed(seed)
    return MKLVisITA(micro_config()).eval()


def _which(folder: Path, models: dict[str, MKLVisITA]) -> str:
    """The name of the model whose weights the folder loads as, whole; and its card must be that model's."""
    loaded = MKLVisITA.from_pretrained(folder).state_dict()
    names = [n for n, m in models.items() if all(torch.equal(v, loaded[k]) for k, v in m.state_dict().items())]
    assert len(names) == 1, "the folder loads as a mix of checkpoints"
    from mklvisita.checkpoint import resolve

    card = (resolve(folder) / "README.md").read_text()
    assert card == f"card {names[0]}", "the card belongs to another checkpoint"
    return names[0]


def test_sigkill_inside_save_leaves_the_old_or_the_new_checkpoint_whole(tmp_path: Path) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the forked savers use the tokenizer
    models = {"a": _model(0), "b": _model(1)}
    dest = tmp_path / "ckpt"
    models["a"].save_pretrained(dest, files={"README.md": "card a"})
    t0 = time.perf_counter()  # how long a forked save takes, start to end
    pid = os.fork()
    if pid == 0:
        try:
            models["b"].save_pretrained(tmp_path / "probe", files={"README.md": "card b"})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    duration = time.perf_counter() - t0
    rng = random.Random(0)
    current, outcomes = "a", []
    for _ in range(30):
        new = "b" if current == "a" else "a"
        pid = os.fork()
        if pid == 0:  # the saving subprocess
            try:
                models[new].save_pretrained(dest, files={"README.md": f"card {new}"})
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 1.2 * duration))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = _which(dest, models)
        assert got in (current, new)
        outcomes.append(got != current)
        current = got
    assert any(outcomes) and not all(outcomes), "no kill fell inside a save; the test did not test anything"
    # A later save completes the swap and leaves no temp or .old folder behind.
    models["a"].save_pretrained(dest, files={"README.md": "card a"})
    assert _which(dest, models) == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "probe"]


def test_load_reads_the_old_folder_of_an_interrupted_swap(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    _model(0).save_pretrained(dest, files={"README.md": "card a"})
    os.rename(dest, tmp_path / "ckpt.old")  # killed between the two renames
    assert _which(dest, {"a": _model(0), "b": _model(1)}) == "a"
    _model(1).save_pretrained(dest, files={"README.md": "card b"})
    assert _which(dest, {"a": _model(0), "b": _model(1)}) == "b" and not (tmp_path / "ckpt.old").exists()


def test_a_new_save_keeps_no_old_card_or_metrics(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    _model(0).save_pretrained(dest, files={"README.md": "trained", "metrics.json": json.dumps({"i2t_r1": 19.0})})
    _model(1).save_pretrained(dest)
    assert not (dest / "README.md").exists() and not (dest / "metrics.json").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "tokenizer.json").unlink(), r"ckpt has no tokenizer.json.*cannot read captions"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), r"ckpt/tokenizer.json is not a tokenizer"),
        (lambda d: (d / "tokenizer.json").write_text("{"), r"ckpt/tokenizer.json is not valid JSON"),
    ],
)
def test_damaged_tokenizer_is_refused(tmp_path: Path, damage, message: str) -> None:
    dest = tmp_path / "ckpt"
    _model(0).save_pretrained(dest)
    damage(dest)
    with pytest.raises(CheckpointError, match=message) as err:
        MKLVisITA.from_pretrained(dest)
    assert str(tmp_path) not in str(err.value)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    _model(0).save_pretrained(dest)
    state = load_file(str(dest / "model.safetensors"))
    state["itm_head.weight"][0, 0] = float("nan")
    save_file(state, str(dest / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"ckpt/model.safetensors holds non-finite .*itm_head.weight") as err:
        MKLVisITA.from_pretrained(dest)
    assert str(tmp_path) not in str(err.value)


def test_a_re_saved_checkpoint_does_not_say_local_files_only(tmp_path: Path) -> None:
    """transformers 5 records "is_local" / "local_files_only" in tokenizer_config.json when a tokenizer read from a
    folder is saved again (fine-tuning a release does exactly that); a release shared on the Hub must not say so."""
    MKLVisITA(micro_config()).save_pretrained(tmp_path / "first")
    again = MKLVisITA.from_pretrained(tmp_path / "first")
    again.save_pretrained(tmp_path / "second")
    settings = json.loads((tmp_path / "second" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & settings.keys()
    reloaded = MKLVisITA.from_pretrained(tmp_path / "second")
    assert reloaded.tokenizer("a red circle")["input_ids"] == again.tokenizer("a red circle")["input_ids"]
