"""The clip art that composites are made of: Debian's ``openclipart-png`` (public domain), its titles as noun
phrases, a fixed train / validation split by title, and decoded pictures kept in memory.

Decisions:

- **Source and titles.** Every PNG under the clip-art folder (``/usr/share/openclipart/png``,
  ``$MKLVISITA_OPENCLIPART`` or ``ClipArtLibrary(root)``) carries its title in a PNG text chunk (Inkscape's export);
  the title is the object's name. Kept: drawings with transparency (modes RGBA, LA, or P with a transparent colour)
  of at most ``MAX_PIXELS``, outside the trees of icons, shapes, patterns, logos and symbol sets (``SKIP_TREES``).
- **Cleaning.** A title is cleaned ("Clipart by Nicu Buculei - pear" -> "pear"; digits, ``#``, underscores and
  parentheses dropped; lowercased) and kept only when it is English (the authors of Italian and French titles,
  ``NON_ENGLISH_AUTHORS``, are left out, as are titles that are the author's name), names no relation word, is
  specific (not a collection name, at most ``MAX_WORDS`` words, not shared by more than ``MAX_TITLE_FILES`` files)
  and agrees with the file name (a title word shares its first four letters with a word of the file name): exports
  that reused another drawing's metadata ("pear" on ``pineapple.png``) are dropped. Flags become "flag of <title>",
  and one flag in four is kept (there are over 500).
- **Split by title.** An object is in "val" when the first byte of sha256(its noun phrase) is below
  ``VAL_SHARE * 256``, else "train": files with the same title share a split, so validation measures objects never
  trained on.
- **Decoded once.** A picture is decoded on first use, cropped to its opaque box and kept at ``THUMBNAIL`` px (its
  longest side) in memory; a caller may supply its own store instead (``thumbnails``).
"""

from __future__ import annotations

import functools
import hashlib
import html
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .composite_claims import RELATION_WORD_SET

DEFAULT_ROOT = "/usr/share/openclipart/png"  # Debian package openclipart-png
ROOT_ENV = "MKLVISITA_OPENCLIPART"
VAL_SHARE = 0.2  # share of titles held out for "val" / "test"
SKIP_TREES = ("computer", "shapes", "special", "logos", "buttons")
SKIP_SUBTREES = (
    "signs_and_symbols/map_symbols",
    "signs_and_symbols/led",
    "transportation/aiga-symbols",
    "recreation/games",
    "people/smilies",
    "people/stickmen",
)
GENERIC = re.compile(
    r"collection|theme|icon|svg|hash|sibmission|submission|various|clipart|^people$|^advertising$|symbol|^card$|"
    r"gramastar|untitled|^drawing|^image|^road signs?$|^sign$",
    re.I,
)
# Whose titles are not English (Italian, French): the text encoder and the evaluations speak English.
NON_ENGLISH_AUTHORS = ("Architetto Francesco Rollandin", "yves GUILLOU")
MAX_WORDS = 4
MAX_TITLE_FILES = 8
MAX_PIXELS = 4_000_000  # larger exports (posters, maps) are slow to decode and rarely single objects
FLAG_KEEP = 64  # a flag is kept when the first byte of sha256(its path) is below this (one in four)
THUMBNAIL = 192  # decoded clip art is kept at this longest side


@dataclass(frozen=True)
class ClipArt:
    """One clip-art file and the noun phrase its title gives (without article, lowercase)."""

    relative: str  # path under the clip-art folder, "/"-separated
    noun: str  # "table tennis", "flag of france"
    flag: bool = False

    @property
    def split(self) -> str:
        return title_split(self.noun)

    @property
    def mirrorable(self) -> bool:
        """Flags and signs carry text or a fixed orientation: never mirrored."""
        return "flag" not in self.relative and "sign" not in self.relative


def title_split(noun: str) -> str:
    """ "val" or "train": a fixed function of the noun phrase (see the module's decisions)."""
    return "val" if hashlib.sha256(noun.encode()).digest()[0] < VAL_SHARE * 256 else "train"


def clean_title(title: str, relative: str) -> str | None:
    """The noun phrase of a clip art's title, or None when the title is generic, long or not about the file."""
    t = html.unescape(title)
    t = re.sub(r"^\s*clipart by [^-]+-\s*", "", t, flags=re.I)
    t = re.sub(r"\([^)]*\)", " ", t)
    t = re.sub(r"[_#\d]+", " ", t)
    t = re.sub(r"[^A-Za-z' -]+|\s-+\s", " ", t)
    t = re.sub(r"\s+", " ", t).strip(" -").lower()
    words = t.split()
    if len(t) < 3 or not words or len(words) > MAX_WORDS or "'" in t or GENERIC.search(t):
        return None
    if RELATION_WORD_SET.intersection(words):  # "left top corner": relation words belong to the relations
        return None
    stem = set(re.split(r"[^a-z]+", Path(relative).stem.lower())) - {""}
    if not any(len(w) >= 3 and any(s[:4] == w[:4] for s in stem if len(s) >= 3) for w in words):
        return None
    if "/flags/" in f"/{relative}" and "flag" not in t:
        t = f"flag of {t}"
    return t


def _usable(relative: str, image: Image.Image) -> bool:
    parts = relative.split("/")
    if parts[0] in SKIP_TREES or "/".join(parts[:2]) in SKIP_SUBTREES:
        return False
    transparent = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
    return transparent and image.width * image.height <= MAX_PIXELS


@functools.lru_cache(maxsize=4)
def find_clipart(root: str) -> tuple[ClipArt, ...]:
    """Every usable clip art under ``root`` (sorted by path; see the module's decisions). Reads PNG headers only."""
    folder = Path(root)
    found: list[tuple[str, str, bool]] = []
    for png in sorted(folder.rglob("*.png")):
        relative = png.relative_to(folder).as_posix()
        try:
            with warnings.catch_warnings():  # a few huge exports warn: they are skipped below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(png) as im:
                    if not _usable(relative, im):
                        continue
                    title, author = str(im.info.get("Title", "")), str(im.info.get("Author", ""))
        except (OSError, Image.DecompressionBombError):
            continue
        noun = None if author in NON_ENGLISH_AUTHORS else clean_title(title, relative)
        if noun is not None and set(noun.split()) & {w for w in author.lower().split() if len(w) >= 4}:
            noun = None  # the author's name, not the object's
        flag = "/flags/" in f"/{relative}"
        if noun is None or (flag and hashlib.sha256(relative.encode()).digest()[0] >= FLAG_KEEP):
            continue
        found.append((relative, noun, flag))
    counts: dict[str, int] = {}
    for _, noun, _ in found:
        counts[noun] = counts.get(noun, 0) + 1
    return tuple(ClipArt(r, n, f) for r, n, f in found if counts[n] <= MAX_TITLE_FILES)


class ClipArtError(ValueError):
    """The clip art is not installed, or too little of it for a split."""


def clipart_root(root: str | os.PathLike | None = None) -> Path:
    folder = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
    if not folder.is_dir():
        raise ClipArtError(
            "the clip art is not installed: `apt-get install openclipart-png` (Debian/Ubuntu), or name its PNG "
            f"folder with ${ROOT_ENV}"
        )
    return folder


class ClipArtLibrary:
    """The usable clip art of a folder, decoded on first use and kept as thumbnails (``THUMBNAIL`` px) in memory.

    ``thumbnails`` may supply the decoded pictures instead (a callable ``index -> (h, w, 4) uint8``), e.g. a cache
    on disk shared by DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike | None = None, thumbnails: Any = None):
        self.root = clipart_root(root)
        self.arts = list(find_clipart(str(self.root)))
        self._thumbnails = thumbnails
        self._memory: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.arts)

    def indices(self, split: str) -> list[int]:
        """Indices of the clip art a split's scenes draw from ("train": train titles; "val"/"test": val titles)."""
        want = "train" if split == "train" else "val"
        return [i for i, a in enumerate(self.arts) if a.split == want]

    def decode(self, index: int) -> np.ndarray:
        """(h, w, 4) uint8 RGBA of clip art ``index``, longest side at most ``THUMBNAIL``, cropped to its opaque box."""
        with Image.open(self.root / self.arts[index].relative) as im:
            rgba = im.convert("RGBA")
        box = rgba.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox()
        if box is not None:
            rgba = rgba.crop(box)
        rgba.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
        return np.asarray(rgba, dtype=np.uint8)

    def cache_info(self) -> tuple[int, int]:
        """(pictures decoded so far, their bytes) of the in-memory store."""
        return len(self._memory), sum(a.nbytes for a in self._memory.values())

    def rgba(self, index: int) -> np.ndarray:
        if self._thumbnails is not None:
            return self._thumbnails(index)
        if index not in self._memory:
            self._memory[index] = self.decode(index)
        return self._memory[index]
