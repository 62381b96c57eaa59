"""The README's usage example runs as printed, on the embedded checkpoint."""

import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_example_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MKLVISITA_DEFAULT_CHECKPOINT", raising=False)
    code = _block("## Use it")
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    r, e = scope["r"], scope["e"]
    assert r.itm.shape == (1, 2) and np.allclose(r.kernel_contributions.sum(-1), r.similarity, atol=1e-5)
    assert e.tokens == scope["captions"][0].split() and e.word_heatmaps.shape[0] == len(e.tokens)
    assert abs(sum(e.kernel_weights.values()) - 1) < 1e-5
    assert "global/cosine" in capsys.readouterr().out
    assert os.path.isfile(ROOT / "assets" / "mklvisita-shapes" / "model.safetensors")
