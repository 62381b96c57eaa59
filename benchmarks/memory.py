"""Memory under distinct requests: the process's RSS after 100 and after 1,000 distinct Match requests.

    python -m benchmarks.memory [--quick] [--requests 1000]

Decisions: one Matcher (the shipped shapes checkpoint) serves requests that are all different (each a new rendered
shapes scene and five new captions), so any cache keyed by the input grows with them; the library keeps no
encoding cache, and this checks that nothing else accumulates. Bounded = RSS after all requests within 10% of RSS
after the first tenth. (The demo's own caches are measured by ``benchmarks/demo_load.py`` where it exists.)
``--quick``: a micro model, 40 requests.
"""

from __future__ import annotations

import gc
import sys

from benchmarks.common import parser, report, rss_mb, setup


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    args = p.parse_args(argv)
    setup(args)
    from benchmarks.retrieval_scaling import load_matcher
    from mklvisita.data import shapes_retrieval_set

    n = 40 if args.quick else args.requests
    first = max(1, n // 10)
    m = load_matcher(args.quick)
    rset = shapes_retrieval_set(split="val", size=n)
    marks = {}
    for i in range(n):
        m.score([rset.images[i]], list(rset.captions[5 * i : 5 * i + 5]))
        if i + 1 in (first, n):
            gc.collect()
            marks[i + 1] = rss_mb()
    row = {
        "requests_first": first,
        "rss_first_mb": marks[first],
        "requests": n,
        "rss_mb": marks[n],
        "growth": marks[n] / marks[first] if marks[first] else float("nan"),
    }
    return report("memory", args, [row])


if __name__ == "__main__":
    main()
    sys.exit(0)
