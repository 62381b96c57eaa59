"""The release folder of a training run: re-running a finished run keeps its metrics and card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_training import _cfg

from training import train as train_mod


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_resuming_a_finished_run_keeps_the_release_metrics_and_card(tmp_path: Path) -> None:
    extra = ("max_steps=2", "save_every=2", "data.eval=shapes", "data.eval_limit=6", "eval.k=4")
    metrics = train_mod.train(_cfg(tmp_path, *extra))
    release = tmp_path / "release"
    first = json.loads((release / "metrics.json").read_text())
    assert first["rsum"] == pytest.approx(metrics["rsum"])
    train_mod.train(_cfg(tmp_path, *extra), resume="latest")  # the run is finished: nothing left to train
    assert json.loads((release / "metrics.json").read_text()) == first
    card = (release / "README.md").read_text()
    assert "(no evaluation)" not in card and "rsum" in card
