"""Peak memory and time of one ``Matcher.explain`` call on a large image (7.8 GB, 32 s at 16 MP before capped maps).

    python -m benchmarks.explain_memory [--quick] [--size 4000x4000] [--checkpoint shapes] [--words 10]

Decisions: every case runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own; the child loads
the checkpoint and builds the image first (``rss_before_mb``, itself a peak: model load included), then explains
one pair (``peak_rss_mb``); ``explain_extra_mb`` is the difference, what the explanation cost on top.
``maps_mb`` is the size of every array the Explanation holds. Two cases: the default map resolution (maps at most
``MAP_MAX_SIDE`` px on their longer side) and ``max_side=None`` (every map in the image's own frame, what the
library did before; it costs memory in proportion to the image). A checkout whose ``explain`` has no ``max_side``
runs only the second case, labelled as such, so the same script measures the code before the change.
``--quick``: a micro model (random init) on a 1,200 x 900 image, a few seconds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import time

from benchmarks.common import ROOT, parser, report, setup

CAPTION_WORDS = "a large red circle left of a small blue square above the green triangle".split()


def _child(spec: dict) -> dict:
    """Runs in the child process: load, build the image, explain once; peak RSS before and after."""
    import numpy as np
    import torch
    from PIL import Image

    from mklvisita import Matcher, MKLVisITA

    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    if spec["checkpoint"] == "micro":
        from benchmarks.latency import micro_config

        torch.manual_seed(0)
        m = Matcher(MKLVisITA(micro_config()))
    else:
        m = Matcher.default(spec["checkpoint"])
    w, h = spec["size"]
    # A smooth gradient with noise: a realistic photo-like PNG would only add decode time.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    caption = " ".join(CAPTION_WORDS[: spec["words"]])
    kwargs = {}
    if spec["max_side"] != "default":  # None: every map in the image's own frame
        if _explain_takes_max_side():
            kwargs["max_side"] = spec["max_side"]
    elif not _explain_takes_max_side():
        raise SystemExit("this checkout's explain has no max_side")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    e = m.explain(image, caption, **kwargs)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    arrays = [e.word_heatmaps, e.caption_heatmap, e.rollout, e.head_heatmaps, *e.kernel_maps.values()]
    maps_bytes = sum(a.nbytes for a in arrays if a is not None)
    return {
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "explain_extra_mb": peak - before,
        "explain_s": seconds,
        "maps_mb": maps_bytes / 2**20,
        "word_heatmaps_shape": list(e.word_heatmaps.shape),
        "dtype": str(e.word_heatmaps.dtype),
        "method": e.method,
    }


def _explain_takes_max_side() -> bool:
    from mklvisita import explain

    return "max_side" in inspect.signature(explain.explain_pair).parameters


def _run_case(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.explain_memory", "--child", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4000x4000", help="image WxH")
    p.add_argument("--checkpoint", default="shapes", help="embedded checkpoint: shapes or photo")
    p.add_argument("--words", type=int, default=10, help="caption length in words")
    p.add_argument("--cases", default="default,full", help="default (capped maps) and/or full (max_side=None)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one case, in a fresh process
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return {}
    setup(args)
    w, h = (1200, 900) if args.quick else (int(x) for x in args.size.lower().split("x"))
    checkpoint = "micro" if args.quick else args.checkpoint
    capped = _explain_takes_max_side()
    rows = []
    for case in args.cases.split(","):
        if case == "default" and not capped:
            continue
        spec = {
            "checkpoint": checkpoint,
            "size": [w, h],
            "words": args.words,
            "threads": args.threads,
            "max_side": "default" if case == "default" else None,
        }
        label = "maps at MAP_MAX_SIDE" if case == "default" else "maps in the image's frame"
        if not capped:
            label += " (code before max_side)"
        row = {"case": label, "checkpoint": checkpoint, "image": f"{w}x{h}", "words": args.words}
        rows.append({**row, **_run_case(spec)})
    return report("explain_memory", args, rows)


if __name__ == "__main__":
    main()
    sys.exit(0)
