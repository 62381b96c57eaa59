"""The README's usage example runs as printed, on the embedded checkpoint, and its figures are the files' own."""

import json
import os
import re
from pathlib import Path

import numpy as np

from mklvisita.matcher import EMBEDDED

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


def test_usage_example_prints_what_the_readme_says(capsys, monkeypatch):
    """Each `# prints: ...` comment of the usage example is the line that print() writes."""
    monkeypatch.chdir(ROOT)
    code = _block("## Use it")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    prints = [line for line in code.splitlines() if line.startswith("print(")]
    assert len(out) == len(prints), "every print() of the example writes one line"
    claimed = [(line.split("# prints: ", 1)[1].strip(), got) for line, got in zip(prints, out) if "# prints: " in line]
    assert claimed, "the example shows at least one printed result"
    for want, got in claimed:
        assert got.strip() == want


# Headline-figure labels of the README's checkpoint table -> the metric key in the JSON file the row names.
FIGURE_KEYS = {
    "binding": "binding_acc",
    "phrase pointing": "pointing_acc",
    "word pointing": "word_pointing_acc",
    "pointing": "pointing_acc",
    "RSUM": "rsum",
    "i2t R@1": "i2t_r1",
    "t2i R@1": "t2i_r1",
    "reverse": "binding_acc_reverse",
    "replace": "binding_acc_replace",
    "swap": "binding_acc_swap",
}


def test_checkpoint_table_figures_are_those_of_the_files_it_names():
    section = (ROOT / "README.md").read_text().split("## Checkpoints", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| [`")]
    assert len(rows) == len(EMBEDDED), "one row per embedded checkpoint"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        card = re.search(r"\]\((assets/[^)]+/README\.md)\)", cells[0]).group(1)
        assert (ROOT / card).is_file(), card
        sources = re.findall(r"\]\((docs/results/[^)]+\.json)\)", cells[-1])
        assert sources, cells[-1]
        files = {source: json.loads((ROOT / source).read_text()) for source in sources}
        figures = cells[-2].split(" · ")
        assert len(figures) >= 3
        for figure in figures:
            label, value, percent = re.fullmatch(r"(.+?) (\d+(?:\.\d+)?)( %)?", figure).groups()
            key = FIGURE_KEYS[label]
            source = next(s for s, m in files.items() if key in m)  # the first file the row names that has it
            truth = files[source][key] * (100 if percent else 1)
            decimals = len(value.split(".")[1]) if "." in value else 0
            assert float(value) == round(truth, decimals), f"{label} {value} in README, {truth} in {source}"


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
