"""Shared pieces of the benchmarks: timing percentiles, the machine, tables and JSON.

Decisions: percentiles are taken over individually timed calls after warm-up calls; a table is plain text (the
docs/benchmarks.md copies it as markdown from :func:`markdown_table`); every JSON carries the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "benchmarks"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few seconds on tiny inputs (checks the output's shape)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON result")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return p


def setup(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """p50 / p95 / mean of ``repeats`` timed calls, milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return _stats(times)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """:func:`time_calls` of several functions called in turn, one call of each per round, so that a change of the
    machine's load during the run hits them alike; each entry also keeps its times (``times_ms``, round order)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: {**_stats(ts), "times_ms": ts} for name, ts in times.items()}


def _stats(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "mean_ms": float(a.mean())}


def rss_mb() -> float:
    """Resident set size of this process, MiB (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, first seen first
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(
    name: str, args: argparse.Namespace, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> dict:
    """Print the table and save ``<out>/<name>.json`` (rows, machine, arguments); returns the saved object."""
    print(f"\n## {name}\n")
    print(markdown_table(rows))
    result = {"name": name, "quick": bool(args.quick), "machine": machine(), "rows": rows, **(extra or {})}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
