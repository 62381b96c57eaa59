"""benchmarks/cotenant.py runs end to end in its quick mode and saves both policies, idle and under load."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import cotenant


def test_quick_run_saves_both_policies_idle_and_loaded(tmp_path: Path) -> None:
    assert cotenant.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cotenant_threads.json").read_text())
    rows = {row["policy"]: row for row in result["rows"]}
    assert set(rows) == {"torch default", "policy"}
    assert rows["policy"]["threads"] == 1 and rows["torch default"]["threads"] == result["torch_default_threads"]
    for row in rows.values():
        assert row["ratio"] == round(row["load_p50_ms"] / row["idle_p50_ms"], 2) and row["idle_p50_ms"] > 0
    assert len(result["times_ms"]["policy / load"]) == result["repeats"] == 2
    assert result["cotenant"]["threads"] >= 1 and len(result["loadavg_before"]) == 3
