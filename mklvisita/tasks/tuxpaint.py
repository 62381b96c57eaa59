"""Tux Paint photo stamps: real photographs with human-written captions, for evaluation only.

Decisions:
    - Source: Debian's ``tuxpaint-stamps-default`` (``/usr/share/tuxpaint/stamps``, or the folder given as
      ``tuxpaint:<folder>`` / ``$MKLVISITA_TUXPAINT_STAMPS``). It is GPL-2: read at run time, never committed, never
      trained on (the shipped photo checkpoint sees none of it).
    - Which stamps are photographs: colour PNGs (mode RGBA or RGB; palette and grey ``LA`` stamps are drawings or
      tintable silhouettes) with a ``.txt`` beside them, outside the ``cartoon/`` and ``symbols/`` trees and any
      ``cartoon`` sub-folder, and without an ``.svg`` twin (those PNGs are renderings of a drawing).
    - Image: the RGBA stamp composited on a plain white square (the Tux Paint canvas), centred, 10 % margin, so the
      model's letterbox adds nothing. Caption: the first line of the ``.txt`` ("A sitting gnu.").
    - Fixed half split: a stamp is in the "tune" half when the first byte of sha256(its path relative to the stamps
      folder) is even, else "test". Anything chosen by looking at Tux Paint results (temperatures, prompts, kernel
      weights) is chosen on "tune" and reported on "test"; "all" is both.
    - Identical captions of different stamps ("A strawberry.") stay separate pairs: the protocol's one-image-per-
      caption ground truth (a caption's twin ranks no better than chance, a small pessimistic effect).
    - Pointing game: 2-3 stamps of the chosen half pasted side by side on a white background (seeded, no overlap);
      each stamp's alpha > 50 % is its mask and its caption (without the final period) its phrase.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import EvalData

DEFAULT_STAMPS = "/usr/share/tuxpaint/stamps"  # Debian's install location (package tuxpaint-stamps-default)
STAMPS_ENV = "MKLVISITA_TUXPAINT_STAMPS"
SPLITS = ("test", "tune", "all")
EXCLUDED_TOP = ("cartoon", "symbols")
BACKGROUND = (255, 255, 255)
POINTING_SCENES = 150  # composites per pointing game (2-3 stamps each)


@dataclass(frozen=True)
class Stamp:
    path: Path  # the PNG
    relative: str  # path relative to the stamps folder, "/"-separated (the split hashes this)
    caption: str  # first line of the .txt

    @property
    def half(self) -> str:
        return "tune" if hashlib.sha256(self.relative.encode()).digest()[0] % 2 == 0 else "test"


class TuxpaintError(ValueError):
    """The stamps are not installed or the spec is malformed."""


def stamps_folder(folder: str | os.PathLike | None = None) -> Path:
    root = Path(folder or os.environ.get(STAMPS_ENV) or DEFAULT_STAMPS)
    if not root.is_dir():
        raise TuxpaintError(
            "the Tux Paint stamps are not installed: `apt-get install tuxpaint-stamps-default` (Debian/Ubuntu), "
            f"or name their folder with --data tuxpaint:<folder> or ${STAMPS_ENV}"
        )
    return root


def find_stamps(folder: str | os.PathLike | None = None, split: str = "all") -> list[Stamp]:
    """The photo stamps of ``split`` (test, tune or all), sorted by relative path."""
    if split not in SPLITS:
        raise TuxpaintError(f"tuxpaint split {split!r} is unknown; choose from {list(SPLITS)}")
    root = stamps_folder(folder)
    stamps = []
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in EXCLUDED_TOP or "cartoon" in parts[:-1]:
            continue
        txt, svg = png.with_suffix(".txt"), png.with_suffix(".svg")
        if not txt.is_file() or svg.exists():
            continue
        with Image.open(png) as im:
            if im.mode not in ("RGBA", "RGB"):
                continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = lines[0].strip() if lines else ""
        if caption:
            stamps.append(Stamp(png, rel, caption))
    return [s for s in stamps if split == "all" or s.half == split]


def stamp_rgba(stamp: Stamp) -> Image.Image:
    with Image.open(stamp.path) as im:
        return im.convert("RGBA")


def composite(stamp: Stamp, background: tuple[int, int, int] = BACKGROUND, margin: float = 0.1) -> Image.Image:
    """The stamp alpha-composited, centred, on a plain square of ``background`` with ``margin`` of its side."""
    return centred_on_square(stamp_rgba(stamp), background, margin)


def centred_on_square(
    rgba: Image.Image, background: tuple[int, int, int] = BACKGROUND, margin: float = 0.1
) -> Image.Image:
    """An RGBA cut-out alpha-composited, centred, on a plain square of ``background`` with ``margin`` of its side."""
    side = round(max(rgba.size) * (1 + 2 * margin))
    canvas = Image.new("RGBA", (side, side), (*background, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return canvas.convert("RGB")


class LazyComposites:
    """A sequence of composited stamp images, rendered when indexed."""

    def __init__(self, stamps: list[Stamp]):
        self.stamps = stamps

    def __len__(self) -> int:
        return len(self.stamps)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [composite(s) for s in self.stamps[index]]
        return composite(self.stamps[index])


def parse_spec(spec: str) -> str | None:
    """``tuxpaint`` -> None (default folder); ``tuxpaint:<folder>`` -> folder."""
    name, sep, rest = spec.partition(":")
    if name != "tuxpaint":
        raise TuxpaintError(f"not a tuxpaint spec: {spec!r}")
    return rest if sep and rest else None


def load_eval_data(spec: str, split: str = "test", limit: int = 0):
    """EvalData for ``tuxpaint[:<folder>]``: one caption per stamp; ``limit`` keeps the first N stamps."""

    stamps = find_stamps(parse_spec(spec), split)
    if not stamps:
        raise TuxpaintError(f"no photo stamps found for split {split!r}")
    if limit > 0:
        stamps = stamps[:limit]
    source = TuxpaintSet(stamps, split)
    return EvalData(
        "tuxpaint", split, LazyComposites(stamps), [s.caption for s in stamps], np.arange(len(stamps)), None, source
    )


@dataclass
class TuxpaintSet:
    stamps: list[Stamp]
    split: str


# --------------------------------------------------------------------------------------------- pointing game
def phrase(caption: str) -> str:
    """The caption as a phrase: the first sentence, without its final period."""
    first = caption.split(". ")[0].strip()
    return first[:-1] if first.endswith((".", "!")) else first


class CompositeScenes:
    """2-3 stamps of ``stamps`` pasted side by side on a white canvas: items like ShapesScenes' (image, objects).

    Scene i is a function of (seed, i) only. Stamps in one scene have different captions, so each phrase names
    exactly one object. Each stamp is scaled to fit its slot (canvas width / count) at 80 % of the slot's side.
    """

    def __init__(self, stamps: list[Stamp], n: int = POINTING_SCENES, seed: int = 0, size: int = 448):
        if len({s.caption for s in stamps}) < 2:
            raise TuxpaintError("a pointing game needs at least two stamps with different captions")
        self.stamps, self.n, self.seed, self.size = stamps, n, seed, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = random.Random(self.seed * 1_000_003 + index)
        count = rng.choice((2, 3))
        picked: list[Stamp] = []
        while len(picked) < min(count, len({s.caption for s in self.stamps})):
            s = rng.choice(self.stamps)
            if s.caption not in {p.caption for p in picked}:
                picked.append(s)
        w, h = self.size, self.size * 2 // 3
        canvas = Image.new("RGBA", (w, h), (*BACKGROUND, 255))
        slot = w // len(picked)
        objects = []
        for k, s in enumerate(picked):
            rgba = stamp_rgba(s)
            scale = 0.8 * min(slot / rgba.width, h / rgba.height)
            rgba = rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))))
            x = k * slot + (slot - rgba.width) // 2 + rng.randint(-slot // 20, slot // 20)
            y = (h - rgba.height) // 2 + rng.randint(-h // 20, h // 20)
            x, y = min(max(0, x), w - rgba.width), min(max(0, y), h - rgba.height)
            canvas.alpha_composite(rgba, (x, y))
            mask = np.zeros((h, w), dtype=bool)
            mask[y : y + rgba.height, x : x + rgba.width] = np.asarray(rgba)[..., 3] > 127
            objects.append({"phrase": phrase(s.caption), "mask": mask})
        return {"image": canvas.convert("RGB"), "objects": objects}


def pointing_metric(model: Any, processor: Any, data: Any, n: int | None = None) -> dict[str, float]:
    """``mklvisita.evaluation`` extra-metric hook: the composite pointing game on Tux Paint data, {} elsewhere."""
    source = getattr(data, "source", None)
    if not isinstance(source, TuxpaintSet):
        return {}
    from ..pointing import pointing_game

    scenes = CompositeScenes(source.stamps, n=POINTING_SCENES if n is None else n)  # module global: tests shrink it
    return pointing_game(model, processor, scenes)


def extra_metrics(model: Any, processor: Any, data: Any) -> dict[str, float]:
    """The task interface's extra metrics (:mod:`mklvisita.tasks`): the composite pointing game."""
    return pointing_metric(model, processor, data)
