"""Scoring from the shell.

    python -m mklvisita score IMAGE|FOLDER [...] --caption TEXT [--caption TEXT ...] [--checkpoint DIR|HUB_ID]
        [--revision REV] [--json]

A folder stands for the images in it (by name). The limits are the library's (mklvisita.inputs): at most
MAX_IMAGES images and MAX_CAPTIONS captions of at most MAX_CAPTION_CHARS characters, as in the app.

Prints a table of ITM probability and similarity per (image, caption) pair, or JSON with ``--json``. Without
``--checkpoint`` the demo's default is used (``Matcher.default()``: the embedded photo checkpoint); ``--checkpoint
shapes`` or ``--checkpoint photo`` names an embedded one (a folder of that name in the working directory wins). Exit
status 2 on bad input, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


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
    return p


def _table(images: list[str], captions: list[str], r) -> str:
    rows = [("image", "caption", "itm", "similarity", "score")]
    for i, im in enumerate(images):
        for j, cap in enumerate(captions):
            itm = "-" if np.isnan(r.itm[i, j]) else f"{r.itm[i, j]:.3f}"
            rows.append((im, cap, itm, f"{r.similarity[i, j]:.3f}", f"{r.score[i, j]:.3f}"))
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
    try:
        args.images = _expand(args.images)
        _check_limits(args.images, args.caption)
        matcher = _load(args.checkpoint, args.revision)
        r = matcher.score(args.images, args.caption)
    except ValueError as e:  # InvalidImageError, InvalidCaptionError, CheckpointError
        print(f"error: {e}", file=sys.stderr)
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
