"""Retrieval wall time and fusion passes per stage as the gallery grows (N images x 5 captions each).

    python -m benchmarks.retrieval_scaling [--quick] [--sizes 100,250,500,1000,2000] [--exhaustive-max 1000]
        [--candidates K1]

Decisions: the shipped shapes checkpoint on shapes test scenes (``shapes_retrieval_set``, 5 captions per scene);
images and captions are encoded once per N (encoding is linear and reported apart); the cascade of the model's
``config.ranking`` (:func:`mklvisita.retrieval.retrieve`) is timed per stage with its pair counts, and the exhaustive
multi-kernel similarity (S on every pair, the old stage 1) alongside up to ``--exhaustive-max`` images (it grows
quadratically). ``growth`` is each size's cascade time over the previous size's; ``growth_x4`` (in the JSON and
printed) is, for every N whose 4N was measured too (N = 500 -> 2,000 in the issue), the ratio of the cascade's wall
time and of its pairs per stage: a linear cascade gives 4x pairs (wall time is noisier on a shared machine).
``--candidates`` overrides the checkpoint's ``ranking.candidates`` (the shipped shapes checkpoint has 0: exhaustive S,
which grows quadratically; 128 measures the cascade). ``--quick``: a micro model, N = 8, 16, 32.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from benchmarks.common import parser, report, setup


def load_matcher(quick: bool) -> Any:
    from mklvisita import Matcher, MKLVisITA

    if quick:
        from benchmarks.latency import micro_config

        torch.manual_seed(0)
        return Matcher(MKLVisITA(micro_config()))
    return Matcher.default("shapes")


def measure(m: Any, sizes: list[int], exhaustive_max: int) -> list[dict[str, Any]]:
    from mklvisita.data import shapes_retrieval_set
    from mklvisita.retrieval import encode_captions, encode_images, retrieve, similarity_matrix

    model, proc, ranking = m.model, m.processor, m.config.ranking
    rset = shapes_retrieval_set(split="test", size=max(sizes))
    rows, prev = [], None
    for n in sizes:
        n_txt = 5 * n
        t0 = time.perf_counter()
        ib = encode_images(model, proc, rset.images[:n])
        tb = encode_captions(model, proc, rset.captions[:n_txt])
        encode_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        s = retrieve(model, ib, tb, ranking)
        total = time.perf_counter() - t1
        row = {
            "images": n,
            "captions": n_txt,
            "encode_s": encode_s,
            "cascade_s": total,
            **{f"{stage}_s": v for stage, v in s.timings.items()},
            **{f"{stage}_pairs": v for stage, v in s.pairs.items()},
            "growth": total / prev if prev else float("nan"),
        }
        prev = total
        if n <= exhaustive_max:
            t2 = time.perf_counter()
            similarity_matrix(model, ib, tb)
            row["exhaustive_similarity_s"] = time.perf_counter() - t2
            row["exhaustive_pairs"] = n * n_txt
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,250,500,1000,2000", help="gallery sizes (images), comma-separated")
    p.add_argument("--exhaustive-max", type=int, default=1000, help="largest N for the exhaustive similarity")
    p.add_argument("--candidates", type=int, default=None, help="override ranking.candidates (0 = exhaustive S)")
    args = p.parse_args(argv)
    setup(args)
    sizes = [8, 16, 32] if args.quick else [int(x) for x in args.sizes.split(",")]
    m = load_matcher(args.quick)
    if args.candidates is not None:
        m.model.config.ranking = dataclasses.replace(m.config.ranking, candidates=args.candidates)
    rows = measure(m, sizes, args.exhaustive_max)
    growth = growth_x4(rows)
    for g in growth:
        print(
            f"N = {g['from']:,} -> {g['to']:,}: cascade time x{g['cascade_s']:.2f}, pairs "
            + ", ".join(f"{k.removesuffix('_pairs')} x{v:.2f}" for k, v in g.items() if k.endswith("_pairs"))
        )
    extra = {"ranking": vars(m.config.ranking).copy(), "growth_x4": growth}
    return report("retrieval_scaling", args, rows, extra)


def growth_x4(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each measured N whose 4N was measured too: 4N's cascade time and pairs per stage over N's."""
    by_n = {r["images"]: r for r in rows}
    out = []
    for n, a in by_n.items():
        b = by_n.get(4 * n)
        if b is None:
            continue
        g = {"from": n, "to": 4 * n, "cascade_s": b["cascade_s"] / a["cascade_s"]}
        g |= {k: b[k] / a[k] for k in a if k.endswith("_pairs") and k in b and a[k]}
        out.append(g)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
