"""Clip-art composites: photo-like scenes of public-domain clip art, captions that relate, hard negatives, masks.

One to three clip-art objects (:mod:`mklvisita.data.clipart`) are scaled and placed at random without overlap on a
varied background; the scene's captions (:mod:`mklvisita.data.composite_claims`) name them by their titles made into
noun phrases, with spatial relations, counts and colour words, and each caption has a hard negative. What the shapes
scenes teach about binding and relations, on objects that look like the things people photograph.

Decisions:

- **Splits.** Scenes of split "train" use train titles only; "val" and "test" use the held-out titles (different
  seeds), so validation measures objects never trained on.
- **Determinism.** Item ``i`` of ``ClipArtScenes(split, seed=s)`` depends only on ``(s, split, i)``:
  ``numpy.random.default_rng([s, split_id, i])`` draws everything, in one order.
- **Objects.** One to three (weighted towards more); with probability ``duplicate_rate`` a second object repeats the
  first one's title (counts). Longest side a random share of the canvas (smaller with more objects); positions by
  rejection sampling so that bounding boxes stay ``GAP`` apart: masks are disjoint. Optional horizontal flip (not for
  flags) and colour jitter (a gain per channel in [0.85, 1.15]).
- **Colour words from the object's own pixels**: its opaque pixels (after jitter) are named with the colour source's
  eleven basic terms (:func:`mklvisita.sources.colour.name_colours`, sigma 15); the object "is" a colour when that term
  holds at least ``COLOUR_SHARE`` of them and its title names no colour already. Captions may then say "a red apple".
- **Photo style** (``photo_style``, default 0): that share of objects is drawn less like clip art, as the frozen
  image network meets objects in photographs: saturation lowered (kept 55-95 %), a linear light falloff across the
  object (up to ±15-40 %), a fine multiplicative texture (value noise at a sixth of the object's side, 4-12 %) and a
  slight blur (radius 0.4-1.2 px), in that order, before its colour is named: flat fills and hard vector edges set
  clip art apart from photographs. In EfficientNet-Lite0's pooled features a linear classifier tells 208 clip-art
  objects from the 208 Tux Paint tune-half stamps 0.839 of the time plain and 0.779 styled (``python -m
  training.photo_experiments photo_style``). At 0 the generator draws exactly what it drew without it.
- **Backgrounds**: plain colour, two-colour gradient, value noise, stripes, checkerboard, or another clip art of the
  same split (whose title no caption or negative of the scene names) scaled to cover the canvas, blurred and faded
  over a plain colour. Never photographs. Light pixel noise on top.
- **Undirected relations** (``undirected_rate``, default 0): that share of two-object relation captions says
  "beside", "next to" or "near" instead of a direction. They hold in either order, so they have no reversed
  negative (replace, swap, change instead) and no relation verdict; they teach that a relation word without a
  direction is no evidence against a caption. At 0 the generator draws exactly what it drew without them.
- **Hard negatives** by kind: ``reverse`` (the relation reversed), ``replace`` (one object's title replaced by another
  title of the split that the scene does not show), ``swap`` (colours swapped between two named objects),
  ``change`` (one colour changed), ``count`` (the count changed). The kind is drawn with weights
  :data:`NEGATIVE_WEIGHTS` among those the caption allows; a candidate is kept only when false of the scene.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from .clipart import ClipArtError, ClipArtLibrary
from .composite_claims import (
    NUMBERS,
    OPPOSITE,
    RELATION_MARGIN,
    RELATIONS,
    UNDIRECTED,
    UNDIRECTED_WORDS,
    Claim,
    Desc,
    Scene,
    SceneObject,
    holds,
    plural,
    relation_holds,
)

SPLITS = ("train", "val", "test")
GAP = 0.02  # of the canvas side: the least distance between two objects' bounding boxes
COLOUR_SHARE = 0.45
COLOUR_SIGMA = 15.0
NEGATIVE_WEIGHTS = {"reverse": 3.0, "swap": 3.0, "replace": 2.0, "change": 1.0, "count": 1.0}
_BACKGROUNDS = ("plain", "gradient", "noise", "stripes", "checker", "clipart")


def _colour_name(rgba: np.ndarray) -> str | None:
    """The basic colour term that holds at least ``COLOUR_SHARE`` of an object's opaque pixels, else None."""
    import torch

    from ..sources.colour import BASIC_COLOURS, name_colours

    pixels = rgba[rgba[..., 3] > 127, :3]  # (n, 3)
    pixels = pixels[:: max(1, len(pixels) // 4096)]  # a few thousand pixels name a colour as well as all of them
    if len(pixels) == 0:
        return None
    names = name_colours(torch.from_numpy(pixels).float() / 255.0, COLOUR_SIGMA).mean(0)  # (11,)
    best = int(names.argmax())
    return BASIC_COLOURS[best] if float(names[best]) >= COLOUR_SHARE else None


def _names_colour(noun: str) -> bool:
    from ..sources.colour import COLOUR_WORDS

    return any(w in COLOUR_WORDS for w in noun.split())


def photo_like(rgba: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An object (h, w, 4) uint8 drawn less like clip art (module docstring, "Photo style"); alpha unchanged."""
    h, w = rgba.shape[:2]
    rgb = rgba[..., :3].astype(np.float32)
    grey = rgb.mean(-1, keepdims=True)
    rgb = grey + rng.uniform(0.55, 0.95) * (rgb - grey)  # less saturated
    angle = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    along = (along - along.min()) / max(1e-6, float(np.ptp(along)))  # 0 -> 1 across the object
    rgb = rgb * (1.0 + rng.uniform(0.15, 0.4) * (2.0 * along[..., None] - 1.0))  # light falloff
    noise = rng.standard_normal((max(2, h // 6), max(2, w // 6))).astype(np.float32)
    noise = np.asarray(Image.fromarray(noise, "F").resize((w, h), Image.Resampling.BILINEAR))
    rgb = rgb * (1.0 + rng.uniform(0.04, 0.12) * noise[..., None])  # fine texture
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    out = rgba.copy()
    out[..., :3] = np.asarray(im)
    return out


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
        undirected_rate: share of two-object relation captions that say "beside" / "next to" / "near".
        photo_style: share of objects drawn photo-like (module docstring).

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
        undirected_rate: float = 0.0,
        photo_style: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown composites split {split!r}; expected one of {', '.join(SPLITS)}")
        if size < 0 or image_size < 32 or not 1 <= max_objects <= 3 or captions_per_image < 1:
            raise ValueError(
                f"composites need size >= 0, image_size >= 32, max_objects in 1-3 and captions_per_image >= 1; got "
                f"size={size}, image_size={image_size}, max_objects={max_objects}, "
                f"captions_per_image={captions_per_image}"
            )
        if not 0.0 <= undirected_rate <= 1.0:
            raise ValueError(f"undirected_rate is a share: expected 0 to 1, got {undirected_rate}")
        if not 0.0 <= photo_style <= 1.0:
            raise ValueError(f"photo_style is a share: expected 0 to 1, got {photo_style}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.undirected_rate, self.photo_style = undirected_rate, photo_style
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
        self._grid = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / (image_size - 1)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        undirected = f", undirected_rate={self.undirected_rate}" if self.undirected_rate else ""
        style = f", photo_style={self.photo_style}" if self.photo_style else ""
        return (
            f"ClipArtScenes(split={self.split!r}, size={self.size}, seed={self.seed}, image_size={self.image_size}"
            f"{undirected}{style})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"scene index out of range for {self!r}")
        return self.render(int(index))

    # ------------------------------------------------------------------------------------------- objects
    def _sprite(self, art: int, side: float, rng: np.random.Generator) -> np.ndarray:
        """Clip art ``art`` resized to longest side ``side`` (px), maybe flipped, colour-jittered and drawn photo-like:
        (h, w, 4)."""
        src = self.library.rgba(art)
        scale = side / max(src.shape[:2])
        w, h = max(1, round(src.shape[1] * scale)), max(1, round(src.shape[0] * scale))
        im = Image.fromarray(src, "RGBA").resize((w, h), Image.Resampling.BILINEAR)
        if self.library.arts[art].mirrorable and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = np.array(im)
        if self.jitter and rng.random() < 0.5:
            gain = rng.uniform(0.85, 1.15, size=3)
            out[..., :3] = np.clip(out[..., :3] * gain, 0, 255).astype(np.uint8)
        if self.photo_style > 0 and rng.random() < self.photo_style:
            out = photo_like(out, rng)
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
        if kind == "relation" and self.undirected_rate > 0 and rng.random() < self.undirected_rate:
            template = int(rng.integers(len(UNDIRECTED_WORDS)))
            return Claim(kind, (self._desc(a, rng), self._desc(b, rng)), relation=UNDIRECTED, template=template)
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

        if claim.kind in ("relation", "sides") and claim.relation in OPPOSITE:
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
            for k in rng.choice(len(absent), size=min(3, len(absent)), replace=False):
                new = list(descs)
                new[i] = Desc(absent[k], d.colour)
                out["replace"].append(with_descs(new))
            if d.colour is not None:
                others = [c for c in BASIC_COLOURS if c != d.colour]
                for k in rng.choice(len(others), size=3, replace=False):
                    new = list(descs)
                    new[i] = Desc(d.noun, others[k])
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
        ys, xs = self._grid  # (S, S) each, in [0, 1]
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
            img += self.noise_std * rng.standard_normal(size=img.shape, dtype=np.float32)
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
