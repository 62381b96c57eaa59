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


def test_usage_example_shows_a_match_and_a_mismatch(monkeypatch):
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(_block("## Use it"), "README.md", "exec"), scope)
    itm = scope["r"].itm[0]
    assert itm[0] > 0.3 and itm[1] < 0.05, "the example's matching caption must win clearly"


def test_ci_runs_exactly_the_readme_commands():
    setup = (ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    install, test = (line.split("#", 1)[0].strip() for line in setup.strip().splitlines())
    assert "-e ." in install.split("requirements-dev.txt", 1)[1], "the install command must install the package too"
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.split("# --- README: install ---\n", 1)[1].splitlines()[0] == install
    assert ci.split("# --- README: test ---\n", 1)[1].splitlines()[0] == test
    assert "tuxpaint-stamps-default" in ci and "chromium" in ci
