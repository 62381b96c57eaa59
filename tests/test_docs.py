"""The documentation points at things that exist: links, anchors and the result files its figures come from."""

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
        if token.startswith("runs/") or token in ("config.json", "metrics.json"):
            continue  # a command's own output, or a file of a checkpoint folder
        found = (ROOT / token).exists() or (RESULTS / token).exists() or (RESULTS / "benchmarks" / token).exists()
        assert found or Path(token).name in names, f"{page.relative_to(ROOT)} names {token}, which is not committed"


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 320
