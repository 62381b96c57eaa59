"""Photo Match latency idle and beside a torch co-tenant, under torch's default threads and the library's policy.

    python -m benchmarks.cotenant [--repeats 40] [--checkpoint photo] [--cotenant-threads N] [--out DIR]

Decisions:

- "Match" is ``Matcher.score`` on one photo (``assets/examples/cat.jpg``) x five captions, decoding included, as in
  ``benchmarks/latency.py``: what the demo's Match tab pays for the model.
- Two policies on the same Matcher: ``torch default`` (``matcher.threads`` = the count torch picks by itself in a
  fresh process with no OMP_NUM_THREADS, one per core: what the library did before it had a policy) and ``policy``
  (``matcher.threads`` None: ``mklvisita.threads.default_threads()``, one thread unless $MKLVISITA_THREADS says).
- The co-tenant is a second process that multiplies a 512 x 512 matrix by itself in a loop, at torch's default
  thread count (``--cotenant-threads`` to change it), started once by this benchmark. "Idle" means the co-tenant is
  paused (SIGSTOP), "load" that it runs (SIGCONT, then a short settle). Conditions and policies are timed in small
  interleaved blocks, so a change of the machine's other load during the run hits every cell alike.
- ``ratio`` = load median / idle median of the same policy, both from this one run; the target is <= 1.5 for the
  policy. The machine's load average before and after the run is saved with the figures.
- Each call's process CPU time is recorded beside its wall time (``cpu_ratio``: load / idle median): a call whose
  CPU time grows under load is slowed by the hardware it shares (caches, memory bandwidth, a hyperthread sibling),
  which no thread count can give back; one whose CPU time stays is only waiting for a core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, parser, report, setup

IMAGE = ROOT / "assets" / "examples" / "cat.jpg"
CAPTIONS = [
    "a tabby cat lying on a rug",
    "a cup of coffee on a saucer",
    "a rocket lifting off from a launch pad",
    "an astronaut in an orange suit",
    "a red circle left of a blue square",
]
BLOCK = 5  # calls per (policy, condition) block
SETTLE_S = 0.3  # after resuming or pausing the co-tenant
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKLVISITA_THREADS")
COTENANT = """
import sys, torch
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
print(torch.get_num_threads(), flush=True)
while True:
    a @ a
"""


def clean_env() -> dict[str, str]:
    """This environment without thread settings: what a process gets by default."""
    return {k: v for k, v in os.environ.items() if k not in THREAD_VARS}


def torch_default_threads() -> int:
    """The intra-op count torch picks by itself in a fresh process (no OMP_NUM_THREADS)."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


class CoTenant:
    """The co-tenant process (module docstring), paused until :meth:`run`."""

    def __init__(self, threads: int | None) -> None:
        args = [sys.executable, "-c", COTENANT, *([str(threads)] if threads else [])]
        self.proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.PIPE, text=True)
        self.threads = int(self.proc.stdout.readline())  # it started its loop
        self.pause()

    def run(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        time.sleep(SETTLE_S)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(SETTLE_S)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)  # a stopped process does not act on SIGTERM until continued
        self.proc.terminate()
        self.proc.wait(10)


def stats(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {
        "p50_ms": round(float(np.median(a)), 1),
        "p95_ms": round(float(np.percentile(a, 95)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=40, help="timed calls per policy and condition")
    p.add_argument("--checkpoint", default="photo", help="an embedded checkpoint's name or a folder")
    p.add_argument("--cotenant-threads", type=int, default=None, help="the co-tenant's threads (torch's default)")
    p.add_argument("--name", default="cotenant_threads", help="the JSON file's name (without .json)")
    args = p.parse_args(argv)
    setup(args)
    if args.quick:
        args.repeats, args.checkpoint = 2, "shapes"

    from mklvisita import Matcher
    from mklvisita.threads import default_threads

    if args.checkpoint in ("photo", "shapes"):
        matcher = Matcher.default(args.checkpoint)
    else:
        matcher = Matcher.from_pretrained(args.checkpoint)
    torch_default = torch_default_threads()
    policies: dict[str, Any] = {"torch default": torch_default, "policy": None}
    load_before = os.getloadavg()
    cotenant = CoTenant(args.cotenant_threads)
    times: dict[tuple[str, str], list[float]] = {(p, c): [] for p in policies for c in ("idle", "load")}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in times}
    try:
        for threads in policies.values():  # warm-up, idle
            matcher.threads = threads
            matcher.score([IMAGE], CAPTIONS)
        block = min(BLOCK, args.repeats)
        for _ in range(-(-args.repeats // block)):
            for condition in ("idle", "load"):
                (cotenant.run if condition == "load" else cotenant.pause)()
                for policy, threads in policies.items():
                    matcher.threads = threads
                    for _ in range(block):
                        t, c = time.perf_counter(), time.process_time()
                        matcher.score([IMAGE], CAPTIONS)
                        times[policy, condition].append((time.perf_counter() - t) * 1000)
                        cpu[policy, condition].append((time.process_time() - c) * 1000)
    finally:
        cotenant.close()
    rows = []
    for policy, threads in policies.items():
        idle, load = stats(times[policy, "idle"]), stats(times[policy, "load"])
        rows.append(
            {
                "policy": policy,
                "threads": threads if threads is not None else default_threads(),
                "idle_p50_ms": idle["p50_ms"],
                "load_p50_ms": load["p50_ms"],
                "ratio": round(load["p50_ms"] / idle["p50_ms"], 2),
                "idle_p95_ms": idle["p95_ms"],
                "load_p95_ms": load["p95_ms"],
                "load_max_ms": load["max_ms"],
                "idle_cpu_p50_ms": round(float(np.median(cpu[policy, "idle"])), 1),
                "load_cpu_p50_ms": round(float(np.median(cpu[policy, "load"])), 1),
                "cpu_ratio": round(float(np.median(cpu[policy, "load"]) / np.median(cpu[policy, "idle"])), 2),
            }
        )
    extra = {
        "command": "python -m benchmarks.cotenant " + " ".join(argv if argv is not None else sys.argv[1:]),
        "checkpoint": Path(str(args.checkpoint)).name,
        "image": IMAGE.name,
        "captions": len(CAPTIONS),
        "repeats": args.repeats,
        "cotenant": {"work": "512 x 512 float32 matmul in a loop", "threads": cotenant.threads},
        "torch_default_threads": torch_default,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "times_ms": {f"{p} / {c}": [round(t, 1) for t in ts] for (p, c), ts in times.items()},
    }
    report(args.name, args, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
