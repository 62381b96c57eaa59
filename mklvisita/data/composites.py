"""Clip-art composites: photo-like scenes of public-domain clip art, captions that relate, hard negatives, masks.

One to three clip-art objects (Debian's ``openclipart-png``, public domain) are scaled and placed at random without
overlap on a varied background; the scene's captions name them by their titles made into noun phrases, with spatial
relations, counts and colour words, and each caption has a hard negative. What the shapes scenes teach about
binding and relations, on objects that look like the things people photograph.

Decisions:

- **Source and titles.** Every PNG under the clip-art folder (``/usr/share/openclipart/png``, ``$MKLVISITA_OPENCLIPART``
  or ``ClipArtLibrary(root)``) carries its title in a PNG text chunk (Inkscape's export); the title is the object's
  name. Kept: drawings with transparency (modes RGBA, LA, or P with a transparent colour) of at most
  ``MAX_PIXELS``, outside the trees of icons, shapes, patterns, logos and symbol sets (``SKIP_TREES``). A title is
  cleaned ("Clipart by Nicu Buculei - pear" -> "pear", digits, ``#``, underscores and parentheses dropped,
  lowercased) and kept only when it is English (the authors of Italian and French titles,
  ``NON_ENGLISH_AUTHORS``, are left out, as are titles that are the author's name), names no relation word, is
  specific (not a collection name, at most ``MAX_WORDS`` words, not shared by
  more than ``MAX_TITLE_FILES`` files) and agrees with the file name (a title word shares its first four letters
  with a word of the file name): exports that reused another drawing's metadata ("pear" on ``pineapple.png``) are
  dropped. Flags become "flag of <title>", and one flag in four is kept (there are over 500).
- **Split by title.** An object is in "val" when the first byte of sha256(its noun phrase) is below
  ``VAL_SHARE * 256``, else "train": files with the same title share a split, so validation measures objects never
  trained on. Scenes of split "train" use train objects only; "val" and "test" use val objects (different seeds).
- **Determinism.** Item ``i`` of ``ClipArtScenes(split, seed=s)`` depends only on ``(s, split, i)``:
  ``numpy.random.default_rng([s, split_id, i])`` draws everything, in one order.
- **Objects.** One to three (weighted towards more); with probability ``duplicate_rate`` a second object repeats the
  first one's title (counts). Longest side a random share of the canvas (smaller with more objects); positions by
  rejection sampling so that bounding boxes stay ``GAP`` apart: masks are disjoint. Optional horizontal flip (not for
  flags) and colour jitter (a gain per channel in [0.85, 1.15]).
- **Colour words from the object's own pixels**: its opaque pixels (after jitter) are named with the colour source's
  eleven basic terms (:func:`mklvisita.sources.colour.name_colours`, sigma 15); the object "is" a colour when that term
  holds at least ``COLOUR_SHARE`` of them and its title names no colour already. Captions may then say "a red apple".
- **Backgrounds**: plain colour, two-colour gradient, value noise, stripes, checkerboard, or another clip art of the
  same split (whose title no caption or negative of the scene names) scaled to cover the canvas, blurred and faded
  over a plain colour. Never photographs. Light pixel noise on top.
- **Captions are claims** (as the shapes scenes): ``exists`` ("there is a red apple"), ``and``, ``relation`` ("an
  apple to the left of a lion"; left, right, above, below between object centres, with a margin of
  ``RELATION_MARGIN`` of the canvas), ``sides`` ("an apple on the left and a lion on the right", "... at the top and
  ... at the bottom") and ``count`` ("two apples"). :func:`holds` evaluates a claim against a scene's objects
  (existential reading); captions hold, negatives do not.
- **Hard negatives** by kind: ``reverse`` (the relation reversed), ``replace`` (one object's title replaced by another
  title of the split that the scene does not show), ``swap`` (colours swapped between two named objects),
  ``change`` (one colour changed), ``count`` (the count changed). The kind is drawn with weights
  :data:`NEGATIVE_WEIGHTS` among those the caption allows; a candidate is kept only when false of the scene.
"""

from __future__ import annotations

import functools
import hashlib
import html
import itertools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

DEFAULT_ROOT = "/usr/share/openclipart/png"  # Debian package openclipart-png
ROOT_ENV = "MKLVISITA_OPENCLIPART"
SPLITS = ("train", "val", "test")
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

RELATIONS = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_MARGIN = 0.1  # of the canvas side: centres closer than this are neither left nor right
GAP = 0.02  # of the canvas side: the least distance between two objects' bounding boxes
COLOUR_SHARE = 0.45
COLOUR_SIGMA = 15.0
NEGATIVE_WEIGHTS = {"reverse": 3.0, "swap": 3.0, "replace": 2.0, "change": 1.0, "count": 1.0}
NUMBERS = {1: "one", 2: "two", 3: "three"}
_RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_SIDES = {
    "left": ("on the left", "on the right"),
    "right": ("on the right", "on the left"),
    "above": ("at the top", "at the bottom"),
    "below": ("at the bottom", "at the top"),
}
# Words that carry a claim's relation (targets of the relation word's verdict).
RELATION_WORD_SET = frozenset({"left", "right", "above", "below", "top", "bottom"})
_BACKGROUNDS = ("plain", "gradient", "noise", "stripes", "checker", "clipart")


# ----------------------------------------------------------------------------------------------------- clip art
@dataclass(frozen=True)
class ClipArt:
    """One clip-art file and the noun phrase its title gives (without article, lowercase)."""

    relative: str  # path under the clip-art folder, "/"-separated
    noun: str  # "table tennis", "flag of france"
    flag: bool = False

    @property
    def split(self) -> str:
        return title_split(self.noun)


def title_split(noun: str) -> str:
    """ "val" or "train": a fixed function of the noun phrase (see the module's decisions)."""
    return "val" if hashlib.sha256(noun.encode()).digest()[0] < VAL_SHARE * 256 else "train"


def plural(noun: str) -> bool:
    """Whether a noun phrase reads as a plural ("grapes", not "glass" or "cactus")."""
    last = noun.split()[-1] if noun.split() else ""
    return last.endswith("s") and not last.endswith(("ss", "us", "is")) and " of " not in noun


def pluralise(noun: str) -> str:
    """The plural of a singular noun phrase (its last word): "apple" -> "apples", "glass" -> "glasses"."""
    if plural(noun):
        return noun
    head, _, last = noun.rpartition(" ")
    if " of " in noun:  # "flag of france" -> "flags of france"
        first, _, rest = noun.partition(" of ")
        return f"{pluralise(first)} of {rest}"
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


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


def _no_flip(relative: str) -> bool:
    """Flags and signs carry text or a fixed orientation: never mirrored."""
    return "flag" in relative or "sign" in relative


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

    def rgba(self, index: int) -> np.ndarray:
        if self._thumbnails is not None:
            return self._thumbnails(index)
        if index not in self._memory:
            self._memory[index] = self.decode(index)
        return self._memory[index]


# --------------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Desc:
    """A noun phrase naming an object: its title's noun and, when said, its colour."""

    noun: str
    colour: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return obj.noun == self.noun and (self.colour is None or obj.colour == self.colour)

    def words(self) -> str:
        """The phrase without its article: "red apple"."""
        return f"{self.colour} {self.noun}" if self.colour else self.noun

    def text(self) -> str:
        words = self.words()
        if plural(self.noun):
            return words
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class Claim:
    """A caption's structure: ``kind`` is exists, and, relation, sides or count."""

    kind: str
    descs: tuple[Desc, ...] = ()
    relation: str | None = None
    count: int = 0
    template: int = 0

    def text(self) -> str:
        d = [x.text() for x in self.descs]
        if self.kind == "exists":
            there = "there are" if plural(self.descs[0].noun) else "there is"
            return ("{0}", there + " {0}", "a picture of {0}")[self.template].format(d[0])
        if self.kind == "and":
            listed = " and ".join(d) if len(d) == 2 else ", ".join(d[:-1]) + " and " + d[-1]
            return ("{0}", "a picture of {0}")[self.template].format(listed)
        if self.kind == "relation":
            return f"{d[0]} {_RELATION_WORDS[self.relation]} {d[1]}"
        if self.kind == "sides":
            first, second = _SIDES[self.relation]
            return f"{d[0]} {first} and {d[1]} {second}"
        if self.kind == "count":
            noun = self.descs[0].noun if self.count == 1 else pluralise(self.descs[0].noun)
            return ("{0} {1}", "a picture of {0} {1}")[self.template].format(NUMBERS[self.count], noun)
        raise ValueError(f"unknown claim kind {self.kind!r}")


@dataclass(frozen=True)
class SceneObject:
    """A placed object: its title's noun, named colour (or None), art index and box in canvas pixels."""

    noun: str
    colour: str | None
    art: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    if relation == "left":
        return ax + margin < bx
    if relation == "right":
        return ax > bx + margin
    if relation == "above":
        return ay + margin < by
    if relation == "below":
        return ay > by + margin
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def assignment(claim: Claim, objects: list[SceneObject], image_size: int) -> tuple[int, ...] | None:
    """The objects (indices) a claim's descriptions name: the first assignment that makes it hold, else None."""
    margin = RELATION_MARGIN * image_size
    for chosen in itertools.permutations(range(len(objects)), len(claim.descs)):
        if not all(d.matches(objects[j]) for d, j in zip(claim.descs, chosen)):
            continue
        if claim.kind in ("relation", "sides") and not relation_holds(
            objects[chosen[0]], objects[chosen[1]], claim.relation, margin
        ):
            continue
        return chosen
    return None


def holds(claim: Claim, objects: list[SceneObject], image_size: int) -> bool:
    """Whether ``claim`` is true of a scene's objects (existential reading; a count is exact)."""
    if claim.kind == "count":
        return sum(o.noun == claim.descs[0].noun for o in objects) == claim.count
    if claim.kind not in ("exists", "and", "relation", "sides"):
        raise ValueError(f"unknown claim kind {claim.kind!r}")
    return assignment(claim, objects, image_size) is not None


@dataclass
class Scene:
    """Everything about one item except its pixels."""

    objects: list[SceneObject]
    claims: list[Claim]
    negative_claims: list[Claim]
    negative_kinds: list[str]
    background: str
    background_art: int | None = None


# ------------------------------------------------------------------------------------------------- generator
def _colour_name(rgba: np.ndarray) -> str | None:
    """The basic colour term that holds at least ``COLOUR_SHARE`` of an object's opaque pixels, else None."""
    import torch

    from ..sources.colour import BASIC_COLOURS, name_colours

    pixels = rgba[rgba[..., 3] > 127, :3]  # (n, 3)
    if len(pixels) == 0:
        return None
    names = name_colours(torch.from_numpy(pixels).float() / 255.0, COLOUR_SIGMA).mean(0)  # (11,)
    best = int(names.argmax())
    return BASIC_COLOURS[best] if float(names[best]) >= COLOUR_SHARE else None


def _names_colour(noun: str) -> bool:
    from ..sources.colour import COLOUR_WORDS

    return any(w in COLOUR_WORDS for w in noun.split())


class ClipArtScenes:
    """Generated clip-art composites (see the module docstring for the decisions).

    Args:
        split: "train" (train titles), "val" or "test" (held-out titles, different seeds).
        size: number of scenes.
        seed: base seed; item ``i`` depends only on ``(seed, split, i)``.
        image_size: side of the square canvas in pixels.
        captions_per_image: true captions per scene, each with one hard negative.
        max_objects: objects per scene are drawn from 1..max_objects, weighted towards more.
        library: the clip art (default: :class:`ClipArtLibrary` of the default folder).
        jitter: colour-jitter objects (half of them).
        duplicate_rate: probability that a scene of two or more objects repeats a title (count captions).
        noise_std: Gaussian pixel noise (0-255 scale).

    ``ds[i]`` returns ``image`` (PIL RGB), ``captions``, ``negatives``, ``negative_kinds``, ``objects`` (dicts with
    ``phrase``, ``mask`` (bool (S, S)), ``noun``, ``colour``, ``box``) and ``scene`` (the :class:`Scene`).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        seed: int = 0,
        image_size: int = 224,
        captions_per_image: int = 4,
        max_objects: int = 3,
        library: ClipArtLibrary | None = None,
        jitter: bool = True,
        duplicate_rate: float = 0.15,
        noise_std: float = 3.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown composites split {split!r}; expected one of {', '.join(SPLITS)}")
        if size < 0 or image_size < 32 or not 1 <= max_objects <= 3 or captions_per_image < 1:
            raise ValueError(
                f"composites need size >= 0, image_size >= 32, max_objects in 1-3 and captions_per_image >= 1; got "
                f"size={size}, image_size={image_size}, max_objects={max_objects}, "
                f"captions_per_image={captions_per_image}"
            )
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.captions_per_image, self.max_objects = captions_per_image, max_objects
        self.jitter, self.duplicate_rate, self.noise_std = jitter, duplicate_rate, noise_std
        self.library = library if library is not None else ClipArtLibrary()
        self.pool = self.library.indices(split)
        self._by_noun: dict[str, list[int]] = {}
        for i in self.pool:
            self._by_noun.setdefault(self.library.arts[i].noun, []).append(i)
        self.nouns = sorted(self._by_noun)
        if len(self.nouns) < 4:
            raise ClipArtError(f"composites split {split!r} has {len(self.nouns)} titles; at least 4 are needed")
        self._split_id = SPLITS.index(split)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ClipArtScenes(split={self.split!r}, size={self.size}, seed={self.seed}, image_size={self.image_size})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"scene index out of range for {self!r}")
        return self.render(int(index))

    # ------------------------------------------------------------------------------------------- objects
    def _sprite(self, art: int, side: float, rng: np.random.Generator) -> np.ndarray:
        """Clip art ``art`` resized to longest side ``side`` (px), maybe flipped and colour-jittered: (h, w, 4)."""
        src = self.library.rgba(art)
        scale = side / max(src.shape[:2])
        w, h = max(1, round(src.shape[1] * scale)), max(1, round(src.shape[0] * scale))
        im = Image.fromarray(src, "RGBA").resize((w, h), Image.Resampling.BILINEAR)
        if not _no_flip(self.library.arts[art].relative) and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = np.array(im)
        if self.jitter and rng.random() < 0.5:
            gain = rng.uniform(0.85, 1.15, size=3)
            out[..., :3] = np.clip(out[..., :3] * gain, 0, 255).astype(np.uint8)
        return out

    def _place(self, sprites: list[np.ndarray], rng: np.random.Generator) -> list[tuple[int, int]] | None:
        s, gap = self.image_size, GAP * self.image_size
        boxes: list[tuple[int, int, int, int]] = []
        for sp in sprites:
            h, w = sp.shape[:2]
            for _ in range(60):
                x, y = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
                if all(
                    x + w + gap <= bx0 or bx1 + gap <= x or y + h + gap <= by0 or by1 + gap <= y
                    for bx0, by0, bx1, by1 in boxes
                ):
                    boxes.append((x, y, x + w, y + h))
                    break
            else:
                return None
        return [(b[0], b[1]) for b in boxes]

    def _objects(self, rng: np.random.Generator) -> tuple[list[SceneObject], list[np.ndarray]]:
        counts = np.arange(1, self.max_objects + 1)
        n = int(rng.choice(counts, p=counts / counts.sum()))
        nouns = [self.nouns[i] for i in rng.choice(len(self.nouns), size=n, replace=False)]
        if n >= 2 and rng.random() < self.duplicate_rate:
            nouns[1] = nouns[0]
        arts = [int(rng.choice(self._by_noun[noun])) for noun in nouns]
        lo, hi = {1: (0.4, 0.75), 2: (0.28, 0.5), 3: (0.22, 0.42)}[n]
        for attempt in range(40):
            shrink = 0.8 ** (attempt // 10)
            sprites = [self._sprite(a, rng.uniform(lo, hi) * shrink * self.image_size, rng) for a in arts]
            corners = self._place(sprites, rng)
            if corners is not None:
                break
        else:
            raise RuntimeError("could not place the objects of a composite scene; this is a bug")
        objects = []
        for noun, art, sp, (x, y) in zip(nouns, arts, sprites, corners):
            colour = None if _names_colour(noun) else _colour_name(sp)
            objects.append(SceneObject(noun, colour, art, x, y, x + sp.shape[1], y + sp.shape[0]))
        return objects, sprites

    # -------------------------------------------------------------------------------------------- claims
    def _desc(self, obj: SceneObject, rng: np.random.Generator) -> Desc:
        return Desc(obj.noun, obj.colour if obj.colour is not None and rng.random() < 0.5 else None)

    def _sample_claim(self, objects: list[SceneObject], rng: np.random.Generator) -> Claim | None:
        n, margin = len(objects), RELATION_MARGIN * self.image_size
        if n == 1:
            kinds, weights = ["exists", "count"], [0.85, 0.15]
        else:
            kinds, weights = ["relation", "sides", "and", "exists", "count"], [0.35, 0.2, 0.15, 0.2, 0.1]
        kind = str(rng.choice(kinds, p=np.asarray(weights) / sum(weights)))
        first = objects[int(rng.integers(n))]
        if kind == "exists" or (kind == "count" and plural(first.noun)):
            return Claim("exists", (self._desc(first, rng),), template=int(rng.integers(3)))
        if kind == "count" and not plural(first.noun):
            number = sum(o.noun == first.noun for o in objects)
            return Claim("count", (Desc(first.noun),), count=number, template=int(rng.integers(2)))
        if kind == "and":
            k = 3 if n == 3 and rng.random() < 0.3 else 2
            chosen = [objects[i] for i in rng.permutation(n)[:k]]
            return Claim("and", tuple(self._desc(o, rng) for o in chosen), template=int(rng.integers(2)))
        a, b = (objects[i] for i in rng.permutation(n)[:2])
        true = [r for r in RELATIONS if relation_holds(a, b, r, margin)]
        if not true:
            return None
        return Claim(kind, (self._desc(a, rng), self._desc(b, rng)), relation=str(rng.choice(true)))

    def _candidates(self, claim: Claim, absent: list[str], rng: np.random.Generator) -> dict[str, list[Claim]]:
        from ..sources.colour import BASIC_COLOURS

        out: dict[str, list[Claim]] = {k: [] for k in NEGATIVE_WEIGHTS}
        descs = claim.descs

        def with_descs(new: list[Desc]) -> Claim:
            return Claim(claim.kind, tuple(new), claim.relation, claim.count, claim.template)

        if claim.kind in ("relation", "sides"):
            out["reverse"].append(Claim(claim.kind, descs, OPPOSITE[claim.relation], template=claim.template))
        if claim.kind == "count":
            numbers = [k for k in NUMBERS if k != claim.count]
            out["count"] += [Claim("count", descs, count=k, template=claim.template) for k in numbers]
            return out
        for i, j in itertools.combinations(range(len(descs)), 2):
            a, b = descs[i], descs[j]
            if a.colour and b.colour and a.colour != b.colour:
                new = list(descs)
                new[i], new[j] = Desc(a.noun, b.colour), Desc(b.noun, a.colour)
                out["swap"].append(with_descs(new))
        for i, d in enumerate(descs):
            for noun in rng.choice(absent, size=min(3, len(absent)), replace=False):
                new = list(descs)
                new[i] = Desc(str(noun), d.colour)
                out["replace"].append(with_descs(new))
            if d.colour is not None:
                for c in rng.permutation([c for c in BASIC_COLOURS if c != d.colour])[:3]:
                    new = list(descs)
                    new[i] = Desc(d.noun, str(c))
                    out["change"].append(with_descs(new))
        return out

    def _sample_negative(
        self, claim: Claim, objects: list[SceneObject], absent: list[str], rng: np.random.Generator
    ) -> tuple[Claim, str]:
        candidates = self._candidates(claim, absent, rng)
        kinds = [k for k in NEGATIVE_WEIGHTS if candidates[k]]
        weights = np.array([NEGATIVE_WEIGHTS[k] for k in kinds])
        order = [kinds[i] for i in rng.choice(len(kinds), size=len(kinds), replace=False, p=weights / weights.sum())]
        text = claim.text()
        for kind in order:
            for neg in candidates[kind]:
                if neg.text() != text and not holds(neg, objects, self.image_size):
                    return neg, kind
        raise RuntimeError(f"no false negative found for {text!r}; this is a bug")

    # ----------------------------------------------------------------------------------------- rendering
    def _background(self, kind: str, art: int | None, rng: np.random.Generator) -> np.ndarray:
        """(S, S, 3) float32 in 0-255."""
        s = self.image_size
        c1, c2 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        if kind == "plain":
            return np.broadcast_to(c1.astype(np.float32), (s, s, 3)).copy()
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
        if kind == "gradient":
            theta = rng.uniform(0, 2 * np.pi)
            t = np.cos(theta) * xs + np.sin(theta) * ys
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        elif kind == "noise":  # value noise at two scales
            t = np.zeros((s, s), np.float32)
            for cells, w in ((4, 0.6), (16, 0.4)):
                low = Image.fromarray(rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8))
                t += w * np.asarray(low.resize((s, s), Image.Resampling.BICUBIC), np.float32) / 255.0
        elif kind == "stripes":
            phi, freq = rng.uniform(0, np.pi), rng.uniform(4, 16)
            t = 0.5 + 0.5 * np.sign(np.sin(freq * np.pi * (np.cos(phi) * xs + np.sin(phi) * ys)))
        elif kind == "checker":
            cells = int(rng.integers(3, 12))
            t = ((np.floor(xs * cells) + np.floor(ys * cells)) % 2).astype(np.float32)
        elif kind == "clipart" and art is not None:
            src = Image.fromarray(self.library.rgba(art), "RGBA")
            scale = 1.2 * s / min(src.size)
            big = src.resize((max(s, round(src.width * scale)), max(s, round(src.height * scale))))
            x, y = int(rng.integers(0, big.width - s + 1)), int(rng.integers(0, big.height - s + 1))
            layer = np.asarray(big.crop((x, y, x + s, y + s)).filter(ImageFilter.GaussianBlur(2)), np.float32)
            alpha = 0.35 * layer[..., 3:] / 255.0
            return (c1 * (1 - alpha) + layer[..., :3] * alpha).astype(np.float32)
        else:
            raise ValueError(f"unknown background {kind!r}")
        return (c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.float32)

    def render(self, index: int) -> dict[str, Any]:
        """Item ``index``: the scene drawn from its own seed, rendered (see the class docstring)."""
        rng = np.random.default_rng([self.seed, self._split_id, index])
        objects, sprites = self._objects(rng)
        shown = {o.noun for o in objects}
        background = str(rng.choice(_BACKGROUNDS))
        background_art = None
        if background == "clipart":
            others = [n for n in self.nouns if n not in shown]
            noun = others[int(rng.integers(len(others)))]
            background_art = int(rng.choice(self._by_noun[noun]))
            shown.add(noun)
        absent = [n for n in self.nouns if n not in shown]
        claims: list[Claim] = []
        for _ in range(20 * self.captions_per_image):
            claim = self._sample_claim(objects, rng)
            if claim is not None and claim.text() not in {c.text() for c in claims}:
                claims.append(claim)
            if len(claims) == self.captions_per_image:
                break
        while len(claims) < self.captions_per_image:  # tiny caption spaces only: repeat rather than fail
            claims.append(claims[len(claims) % max(1, len(claims))])
        negatives = [self._sample_negative(c, objects, absent, rng) for c in claims]
        img = self._background(background, background_art, rng)
        masks = []
        for obj, sp in zip(objects, sprites):
            alpha = sp[..., 3:].astype(np.float32) / 255.0
            patch = img[obj.y0 : obj.y1, obj.x0 : obj.x1]
            img[obj.y0 : obj.y1, obj.x0 : obj.x1] = patch * (1 - alpha) + sp[..., :3] * alpha
            mask = np.zeros((self.image_size, self.image_size), dtype=bool)
            mask[obj.y0 : obj.y1, obj.x0 : obj.x1] = sp[..., 3] > 127
            masks.append(mask)
        if self.noise_std > 0:
            img += rng.normal(0.0, self.noise_std, size=img.shape).astype(np.float32)
        scene = Scene(objects, claims, [n for n, _ in negatives], [k for _, k in negatives], background, background_art)
        return {
            "image": Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB"),
            "captions": [c.text() for c in claims],
            "negatives": [c.text() for c, _ in negatives],
            "negative_kinds": [k for _, k in negatives],
            "objects": [
                {
                    "phrase": Desc(o.noun, o.colour).text(),
                    "mask": m,
                    "noun": o.noun,
                    "colour": o.colour,
                    "box": (o.x0, o.y0, o.x1, o.y1),
                }
                for o, m in zip(objects, masks)
            ],
            "scene": scene,
        }
