"""The documentation points at things that exist: links, anchors and the result files its figures come from."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "training" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RESULTS = ROOT / "docs" / "results"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an external address
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.relative_to(ROOT)} links to #{anchor}, not a heading of {path}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_result_files_named_in_the_docs_exist(page: Path) -> None:
    """A result file is named by its path from the repository or from docs/results, or by a name found there."""
    names = {p.name for p in RESULTS.rglob("*") if p.is_file()}
    for token in re.findall(r"`([\w./-]+\.jsonl?)`", page.read_text()):
        if token.startswith("runs/") or token in ("config.json", "metrics.json", "meta.json"):
            continue  # a command's own output, or a file of a checkpoint or index folder
        found = (ROOT / token).exists() or (RESULTS / token).exists() or (RESULTS / "benchmarks" / token).exists()
        assert found or Path(token).name in names, f"{page.relative_to(ROOT)} names {token}, which is not committed"


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 320


# Column headers of the figure tables in docs/ -> the metric keys of the JSON file a row names, one per " / " part.
COLUMN_KEYS = {
    "i2t R@1/5/10": ["i2t_r1", "i2t_r5", "i2t_r10"],
    "t2i R@1/5/10": ["t2i_r1", "t2i_r5", "t2i_r10"],
    "i2t R@1 / 5 / 10": ["i2t_r1", "i2t_r5", "i2t_r10"],
    "t2i R@1 / 5 / 10": ["t2i_r1", "t2i_r5", "t2i_r10"],
    "RSUM": ["rsum"],
    "binding": ["binding_acc"],
    "swap / reverse / change / count": [f"binding_acc_{kind}" for kind in ("swap", "reverse", "change", "count")],
    "pointing phrase / word": ["pointing_acc", "word_pointing_acc"],
    "pointing game": ["pointing_acc"],
    "reverse / replace / swap": [f"binding_acc_{kind}" for kind in ("reverse", "replace", "swap")],
}


def _figure_rows(page: Path):
    """(header, cells, file) for every table row of ``page`` that names a committed result JSON."""
    header: list[str] = []
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            continue
        named = [t for t in re.findall(r"`([\w./-]+\.json)`", line) if (RESULTS / t).is_file()]
        if named and len(cells) == len(header):
            yield header, cells, RESULTS / named[0]


@pytest.mark.parametrize("page", ["results.md", "experiments.md"])
def test_table_figures_are_those_of_the_file_each_row_names(page: str) -> None:
    checked = 0
    for header, cells, path in _figure_rows(ROOT / "docs" / page):
        metrics = json.loads(path.read_text())
        metrics = metrics[-1] if isinstance(metrics, list) else metrics  # in-run files: the last evaluated step
        for title, cell in zip(header, cells):
            keys = COLUMN_KEYS.get(title)
            if keys is None:
                continue
            for key, part in zip(keys, cell.replace("*", "").split(" / ")):
                number = re.search(r"\d+(?:\.\d+)?", part)
                if number is None or part.strip().startswith(("-", "—")):
                    continue  # not measured for this row
                key = f"{key}_rollout" if "rollout" in part else key
                truth = metrics[key] * (100 if "%" in part else 1)
                value = number.group(0)
                decimals = len(value.split(".")[1]) if "." in value else 0
                assert float(value) == round(truth, decimals), f"{page}: {title} {value}, {path.name} has {truth}"
                checked += 1
    assert checked >= 20, f"{page}: only {checked} figures found to check"
