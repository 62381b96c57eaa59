"""Run every benchmark in one process, one after another, and save each one's JSON plus a summary.

    python -m benchmarks.run [--quick] [--out docs/results/benchmarks] [--threads N] [--only latency,flops,...]
        [--sizes 100,250,500,1000,2000]

Decisions: one run measures everything so ratios between rows hold on a noisy machine; each benchmark keeps its own
module (``latency``, ``flops``, ``retrieval_scaling``, ``memory``, ``training_step``, ``explain_memory``, which
runs its cases in child processes of its own) and can run alone;
``benchmarks/demo_load.py`` (the demo under concurrent clients, written with the demo) runs last, in its own
process, when it exists. The summary (``summary.json``) holds every table and the machine.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, machine, parser, setup

BENCHMARKS = ["latency", "flops", "retrieval_scaling", "memory", "training_step", "explain_memory"]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(BENCHMARKS + ["demo_load"]))
    p.add_argument("--sizes", default=None, help="retrieval_scaling gallery sizes (default: its own, 100 ... 2,000)")
    args = p.parse_args(argv)
    setup(args)
    only = set(args.only.split(",")) if args.only else None
    common = (["--quick"] if args.quick else []) + ["--out", args.out]
    common += ["--threads", str(args.threads)] if args.threads else []
    results = {}
    for name in BENCHMARKS:
        if only is None or name in only:
            extra = ["--sizes", args.sizes] if name == "retrieval_scaling" and args.sizes and not args.quick else []
            results[name] = importlib.import_module(f"benchmarks.{name}").main(common + extra)
    if (ROOT / "benchmarks" / "demo_load.py").is_file() and (only is None or "demo_load" in only):
        # Its own process: it starts a server and clients, and its RSS must not include the benchmarks above.
        code = subprocess.call([sys.executable, "-m", "benchmarks.demo_load", *common], cwd=ROOT)
        saved = Path(args.out) / "demo_load.json"
        results["demo_load"] = json.loads(saved.read_text()) if code == 0 and saved.is_file() else {"exit": code}
    summary = {"quick": bool(args.quick), "machine": machine(), "results": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
