"""Render time of the clip-art composites: milliseconds per scene with the clip art decoded on first use (cold) and
with every picture already decoded (warm), and what the decode cache holds.

    python -m benchmarks.composites_render [--scenes 200] [--image-size 224] [--quick] [--out FOLDER]

Decisions: one process renders scenes 0..N-1 of the "train" split twice, the first pass with an empty decode cache
(each picture decoded the first time a scene uses it), the second with the same library (everything decoded);
per-scene times are single calls, so the cold pass's tail is the decoding. Needs Debian's ``openclipart-png``. The
index of the clip art (PNG headers only) is timed apart. The 1-minute load average before and after is saved with the
figures (on a shared machine they are upper bounds). Saves ``composites_render.json``.
"""

from __future__ import annotations

import os
import sys
import time

from benchmarks.common import _stats, parser, report, rss_mb, setup


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=200, help="scenes per pass")
    p.add_argument("--image-size", type=int, default=224, help="canvas side in pixels")
    args = p.parse_args(argv)
    setup(args)
    from mklvisita.data.clipart import ClipArtLibrary, find_clipart
    from mklvisita.data.composites import ClipArtScenes

    n = 10 if args.quick else args.scenes
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    library = ClipArtLibrary()
    index_s = time.perf_counter() - t0
    scenes = ClipArtScenes("train", size=n, image_size=args.image_size, library=library)
    rows = []
    for name in ("cold", "warm"):
        times = []
        for i in range(n):
            t = time.perf_counter()
            scenes[i]
            times.append((time.perf_counter() - t) * 1000)
        rows.append({"pass": name, "scenes": n, **_stats(times), "decoded_pictures": library.cache_info()[0]})
    extra = {
        "index_s": index_s,
        "clipart_files": len(find_clipart(str(library.root))),
        "image_size": args.image_size,
        "decoded_mb": library.cache_info()[1] / 2**20,
        "rss_mb": rss_mb(),
        "load_average_1m": [load_before, os.getloadavg()[0]],  # before and after: a shared machine says so here
        "command": "python -m benchmarks.composites_render " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    return report("composites_render", args, rows, extra)


if __name__ == "__main__":
    main()
