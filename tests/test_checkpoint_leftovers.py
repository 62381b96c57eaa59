"""What killed saves leave beside a checkpoint (a temp folder, part of ``<name>.old``) is removed by the next load
or save, never while a live save still needs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import micro_config

from mklvisita import MKLVisITA
from mklvisita import checkpoint as ckpt


def _model(seed: int) -> MKLVisITA:
    torch.manual_seed(seed)
    return MKLVisITA(micro_config()).eval()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(dest: Path) -> tuple[Path, Path]:
    """A dead save's temp folder (a few MB of weights in the real case) and part of a ``.old`` folder."""
    tmp = dest.parent / f".{dest.name}.tmp-{_dead_pid()}-0badc0de"
    tmp.mkdir()
    (tmp / ckpt.WEIGHTS_NAME).write_bytes(b"\0" * 1024)
    old = dest.with_name(dest.name + ckpt.OLD_SUFFIX)
    old.mkdir()
    (old / ckpt.CONFIG_NAME).write_text("{}")  # the rest was already removed when the save was killed
    return tmp, old


def test_the_next_load_removes_a_killed_saves_leftovers(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    model = _model(0)
    model.save_pretrained(dest)
    tmp, old = _leftovers(dest)
    loaded = MKLVisITA.from_pretrained(dest)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_next_save_removes_them_first_even_when_it_fails(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    _model(0).save_pretrained(dest)
    _leftovers(dest)

    def fails(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save(dest, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_live_save_keeps_its_temp_folder_and_the_old_copy(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    _model(0).save_pretrained(dest)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = tmp_path / f".ckpt.tmp-{live.pid}-0badc0de"
        tmp.mkdir()
        old = tmp_path / "ckpt.old"
        old.mkdir()
        ckpt.clean_leftovers(dest)
        assert tmp.is_dir() and old.is_dir()  # another process is mid-save: its swap may still need both
    finally:
        live.kill()
        live.wait()
    ckpt.clean_leftovers(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kill_9_during_saves_then_a_load_leaves_only_the_checkpoint(tmp_path: Path) -> None:
    """Real kills: saves killed at random moments leave temp folders; one load removes every one of them."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the forked savers use the tokenizer
    dest = tmp_path / "ckpt"
    models = [_model(0), _model(1)]
    models[0].save_pretrained(dest)
    t0 = time.perf_counter()
    models[1].save_pretrained(tmp_path / "probe")
    duration = time.perf_counter() - t0
    left = 0
    for i in range(20):
        pid = os.fork()
        if pid == 0:
            try:
                models[i % 2].save_pretrained(dest)
            finally:
                os._exit(0)
        # kill inside the save's writing: wait (with a deadline, not a fixed sleep a loaded machine can beat) for
        # the child's temp folder to appear, then let it write for a varying part of a save
        deadline = time.perf_counter() + 20 * duration + 10
        while time.perf_counter() < deadline and not any(tmp_path.glob(f".ckpt.tmp-{pid}-*")):
            time.sleep(0.001)
        time.sleep(duration * 0.15 * (i % 5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        left += sum(1 for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-"))
        MKLVisITA.from_pretrained(dest)  # a load, whole, and it cleans up
        names = sorted(p.name for p in tmp_path.iterdir())
        # killed between the swap's two renames, the checkpoint is whole in ckpt.old until the next save
        assert names in (["ckpt", "probe"], ["ckpt.old", "probe"]), (i, names)
    assert left > 0, "no kill left a temp folder: the test did not test anything"
