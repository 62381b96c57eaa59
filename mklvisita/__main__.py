"""Scoring from the shell.

    python -m mklvisita score IMAGE|FOLDER [...] --caption TEXT [--caption TEXT ...] [--checkpoint DIR|HUB_ID]
        [--revision REV] [--json]

    python -m mklvisita index FOLDER|FILELIST --out INDEX [--checkpoint ...] [--batch-size 32] [--kind auto]
    python -m mklvisita search INDEX "text" [--k 5] [--candidates 32] [--checkpoint ...] [--root DIR] [--json]

``index`` embeds every image once into a saved gallery index (resumable; ``accelerate launch --num_processes N -m
mklvisita index ...`` shards it across processes); ``search`` opens it memory-mapped and re-ranks the first stage's
candidates with the full model (:mod:`mklvisita.gallery`).

A folder stands for the images in it (by name). The limits are the library's (mklvisita.inputs): at most
MAX_IMAGES images and MAX_CAPTIONS captions of at most MAX_CAPTION_CHARS characters, as in the app.

Prints a table of ITM probability and similarity per (image, caption) pair, or JSON with ``--json``. Without
``--checkpoint`` the demo's default is used (``Matcher.default()``: the embedded photo checkpoint); ``--checkpoint
shapes`` or ``--checkpoint photo`` names an embedded one (a folder of that name in the working directory wins). Exit
status 2 on bad input, with the reason on stderr. Control characters in what is printed (a caption's ANSI escape
codes, a file name's) are shown escaped (``\x1b``), never sent to the terminal raw; JSON escapes them itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from pathlib import Path

import numpy as np


def printable(text: str, keep: str = "") -> str:
    """``text`` with control characters (ANSI escapes, carriage returns, C1 codes) written as escapes (``\\x1b``),
    so printing a caption or a file name cannot move the cursor, recolour or rewrite the terminal."""
    return "".join(
        c if c in keep or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mklvisita", description="MKL-VisITA image-text matching")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score images against captions")
    s.add_argument("images", nargs="+", help="image files or folders of images")
    s.add_argument("--caption", "-c", action="append", required=True, help="a caption (repeat for several)")
    s.add_argument(
        "--checkpoint",
        help="checkpoint folder, Hugging Face Hub id, or an embedded one by name: photo (the default) or shapes",
    )
    s.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _gallery_parsers(sub)
    return p


def _gallery_parsers(sub) -> None:
    ix = sub.add_parser("index", help="embed a folder (or file list) of images once into a saved gallery index")
    ix.add_argument("source", help="a folder of images (searched recursively) or a text file, one image path a line")
    ix.add_argument("--out", required=True, help="the index folder to write (a rerun resumes an unfinished one)")
    ix.add_argument("--checkpoint", help="as for score: folder, Hub id, photo (the default) or shapes")
    ix.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin")
    ix.add_argument("--batch-size", type=int, default=32, help="images per model call")
    ix.add_argument("--chunk-size", type=int, default=256, help="images per part file (the unit of resumption)")
    ix.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf"], help="FAISS index (auto: by size)")
    ix.add_argument("--quiet", action="store_true", help="no progress line")
    se = sub.add_parser("search", help="search a saved gallery index with a text query")
    se.add_argument("index", help="an index folder written by `python -m mklvisita index`")
    se.add_argument("text", help="the text query")
    se.add_argument("--k", type=int, default=5, help="results to show")
    se.add_argument("--candidates", type=int, help="first-stage candidates the full model re-ranks (default 32)")
    se.add_argument("--checkpoint", help="default: the checkpoint recorded in the index (else the demo's default)")
    se.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin")
    se.add_argument("--root", help="the folder the indexed images are in now, if they were moved")
    se.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _index_command(args: argparse.Namespace, argv: list[str]) -> int:
    from .gallery import build_index
    from .processes import launch_cpu_processes, requested_cpu_processes

    n = requested_cpu_processes()
    if n > 1:  # `accelerate launch --cpu --num_processes N` started this process alone: start the N here
        return launch_cpu_processes(n, "mklvisita", argv, "indexing")
    matcher = _load(args.checkpoint, args.revision)
    meta = build_index(
        matcher,
        args.source,
        args.out,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        kind=args.kind,
        checkpoint_name=_checkpoint_name(args.checkpoint),
        progress=not args.quiet,
    )
    if meta is not None:
        f = meta["faiss"]
        kind = f["type"] + (f" (nlist {f['nlist']}, nprobe {f['nprobe']})" if f["type"] == "ivf" else "")
        print(f"indexed {meta['count']} images ({meta['skipped']} unreadable, listed in skipped.txt): {kind} index")
    return 0  # under several processes, rank 0 merges the parts and reports


def _checkpoint_name(checkpoint: str | None) -> str:
    """How meta.json records the checkpoint: an embedded name, an absolute folder, or the Hub id as given."""
    from .matcher import DEFAULT_NAME

    if checkpoint is None:
        return DEFAULT_NAME
    return str(Path(checkpoint).resolve()) if os.path.isdir(checkpoint) else checkpoint


def _search_command(args: argparse.Namespace) -> int:
    from .gallery import GalleryIndex, search_index

    index = GalleryIndex.open(args.index, root=args.root)
    checkpoint = args.checkpoint
    if checkpoint is None:  # the one that built the index: an embedded name, a folder or a Hub id
        checkpoint = index.meta["checkpoint"].get("name") or None
    r = search_index(_load(checkpoint, args.revision), index, args.text, args.k, args.candidates)
    if args.json:
        keys = ("files", "scores", "itm", "similarity", "first_stage")
        hits = [
            dict(zip(("file", "score", "itm", "similarity", "first_stage"), row))
            for row in zip(*(getattr(r, k) for k in keys))
        ]
        for h in hits:
            h["itm"] = None if np.isnan(h["itm"]) else h["itm"]
        print(json.dumps({"results": hits, "unreadable": r.unreadable, "timings_s": r.timings}, indent=2))
        return 0
    rows = [("rank", "file", "score", "itm", "similarity")]
    for i, (f, s, p, q) in enumerate(zip(r.files, r.scores, r.itm, r.similarity), 1):
        rows.append((str(i), printable(f), f"{s:.3f}", "-" if np.isnan(p) else f"{p:.3f}", f"{q:.3f}"))
    widths = [max(len(row[k]) for row in rows) for k in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if r.unreadable:
        print(f"({r.unreadable} candidate files could not be read and were left out)", file=sys.stderr)
    return 0


def _table(images: list[str], captions: list[str], r) -> str:
    rows = [("image", "caption", "itm", "similarity", "score")]
    for i, im in enumerate(images):
        for j, cap in enumerate(captions):
            itm = "-" if np.isnan(r.itm[i, j]) else f"{r.itm[i, j]:.3f}"
            rows.append((printable(im), printable(cap), itm, f"{r.similarity[i, j]:.3f}", f"{r.score[i, j]:.3f}"))
    widths = [min(48, max(len(row[k]) for row in rows)) for k in range(5)]

    def fmt(row):
        cells = [(c if len(c) <= w else c[: w - 1] + "…").ljust(w) for c, w in zip(row, widths)]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _expand(paths: list[str]) -> list[str]:
    """Folders -> their image files, sorted by name; files as given."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f.path for f in os.scandir(p) if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise ValueError(f"{os.path.basename(os.path.normpath(p))} holds no image files")
            out += found
        else:
            out.append(p)
    return out


def _check_limits(images: list[str], captions: list[str]) -> None:
    from .inputs import MAX_CAPTIONS, MAX_IMAGES

    if len(images) > MAX_IMAGES:
        raise ValueError(f"{len(images)} images given; the limit is {MAX_IMAGES}. Score them in several calls.")
    if len(captions) > MAX_CAPTIONS:
        raise ValueError(f"{len(captions)} captions given; the limit is {MAX_CAPTIONS}. Score them in several calls.")


def _load(checkpoint: str | None, revision: str | None):
    """The Matcher of ``--checkpoint``: None = the demo's default; an embedded name unless a folder has that name."""
    from .matcher import EMBEDDED, Matcher

    if checkpoint is None:
        if revision:
            raise ValueError("--revision needs --checkpoint with a Hub id")
        return Matcher.default()
    if checkpoint in EMBEDDED and not os.path.isdir(checkpoint):
        if revision:
            raise ValueError(f"--revision applies to Hub ids; {checkpoint!r} is an embedded checkpoint")
        return Matcher.default(checkpoint)
    return Matcher.from_pretrained(checkpoint, revision=revision)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("index", "search"):
        try:
            if args.command == "index":
                return _index_command(args, sys.argv[1:] if argv is None else list(argv))
            return _search_command(args)
        except ValueError as e:  # bad folder, file list, index or query; an index of another checkpoint
            print(f"error: {printable(str(e), keep=chr(10))}", file=sys.stderr)
            return 2
    try:
        args.images = _expand(args.images)
        _check_limits(args.images, args.caption)
        matcher = _load(args.checkpoint, args.revision)
        r = matcher.score(args.images, args.caption)
    except ValueError as e:  # InvalidImageError, InvalidCaptionError, CheckpointError
        print(f"error: {printable(str(e), keep=chr(10))}", file=sys.stderr)
        return 2
    if args.json:
        out = {
            "kernel_names": r.kernel_names,
            "pairs": [
                {
                    "image": im,
                    "caption": cap,
                    "itm": None if np.isnan(r.itm[i, j]) else float(r.itm[i, j]),
                    "similarity": float(r.similarity[i, j]),
                    "score": float(r.score[i, j]),
                    "kernel_contributions": dict(zip(r.kernel_names, map(float, r.kernel_contributions[i, j]))),
                }
                for i, im in enumerate(args.images)
                for j, cap in enumerate(args.caption)
            ],
        }
        print(json.dumps(out, indent=2))
    else:
        print(_table(args.images, args.caption, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
