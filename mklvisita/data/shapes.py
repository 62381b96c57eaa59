"""Shapes scenes: procedurally generated image-caption data with hard negatives and object masks.

Every scene holds one to three objects (a shape in a colour, small or large) on a dark, grey, gradient
or textured background with light pixel noise. Each scene comes with five true captions, one hard
negative per caption and a mask per object with the phrase that names it. Nothing is downloaded.

Decisions (written down here because other parts rely on them):

- **Determinism.** Item ``i`` of ``ShapesScenes(split, seed=s)`` depends only on ``(s, split, i)``: the
  scene is drawn from ``numpy.random.default_rng([s, split_id, i, 0])`` and its pixels from
  ``[s, split_id, i, 1]``, so any item is reproducible on its own, in any order, in any worker.
- **Splits.** ``train``, ``val`` and ``test`` share one distribution and differ only in their seed stream;
  none of them contains a held-out (colour, shape) pair in a scene, a caption or a negative.
  ``test_compositional`` puts at least one held-out pair in every scene, and every one of its captions
  names a held-out object by colour and shape (so no count captions there). The held-out pairs are
  :data:`HELD_OUT_PAIRS`; each colour and each shape appears in at most one of them.
- **Unambiguous objects.** The objects of one scene have distinct (colour, shape) pairs, so the phrase
  ``"the large red circle"`` names exactly one object. Two objects may share a colour or a shape, which is
  what makes attribute binding hard.
- **Clean masks.** Objects are placed by rejection sampling so their bounding circles do not touch; masks are
  therefore disjoint. Each shape is drawn with PIL at 4x supersampling; the coverage of a pixel is its
  alpha when compositing and its mask is ``coverage > 0.5``.
- **Captions are claims.** Every caption and negative is rendered from a structured :class:`Claim` and
  :func:`holds` evaluates a claim against the scene (no text parsing). Captions hold, negatives do not; the
  tests check both. Spatial relations compare object centres with a margin of
  ``RELATION_MARGIN * image_size``, so "left of" is never a near tie.
- **Hard negatives**, preferred in this order of likelihood: colour (or size) swapped between two named
  objects, relation reversed, then one attribute changed (colour, shape, size, or the count). A candidate is
  kept only if it is false for the scene.
- **Vocabulary.** Captions are lowercase words without punctuation; :data:`SHAPES_VOCABULARY` lists every
  word a caption or negative can contain.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 215, 35),
    "purple": (150, 60, 210),
    "orange": (250, 135, 25),
    "white": (238, 238, 238),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
# Each colour and each shape is held out at most once, so the model has seen every word in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("green", "star"),
)
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_compositional")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_MARGIN = 0.1  # fraction of the image size; centres closer than this are neither left nor right
NUMBERS = {1: "one", 2: "two", 3: "three"}

# Object radius as a fraction of the image size; the gap between the classes keeps "small" and "large" clear.
_RADIUS = {"small": (0.09, 0.12), "large": (0.17, 0.21)}
_EXISTS_TEMPLATES = ("{0}", "there is {0}", "an image with {0}")
_AND_TEMPLATES = ("{0}", "there is {0}", "an image with {0}")
_RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_RELATION_TEMPLATES = ("{0} {r} {1}", "{0} is {r} {1}")
_COUNT_TEMPLATES = {1: ("there is one shape", "a single shape"), 2: ("there are two shapes", "two shapes")}


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; centre and radius in pixels of the rendered image."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float  # degrees of in-plane rotation

    @property
    def phrase(self) -> str:
        return f"the {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Desc:
    """A noun-phrase description of an object; ``None`` attributes are left unsaid."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (
            obj.shape == self.shape
            and (self.colour is None or obj.colour == self.colour)
            and (self.size is None or obj.size == self.size)
        )

    def text(self) -> str:
        words = " ".join(w for w in (self.size, self.colour, self.shape) if w)
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class Claim:
    """Structured form of a caption: ``kind`` is "exists", "and", "relation" or "count"."""

    kind: str
    descs: tuple[Desc, ...] = ()
    relation: str | None = None
    count: int = 0
    template: int = 0

    def text(self) -> str:
        if self.kind == "exists":
            return _EXISTS_TEMPLATES[self.template].format(self.descs[0].text())
        if self.kind == "and":
            return _AND_TEMPLATES[self.template].format(" and ".join(d.text() for d in self.descs))
        if self.kind == "relation":
            template = _RELATION_TEMPLATES[self.template]
            return template.format(self.descs[0].text(), self.descs[1].text(), r=_RELATION_WORDS[self.relation])
        if self.kind == "count":
            if self.count in _COUNT_TEMPLATES:
                return _COUNT_TEMPLATES[self.count][self.template]
            number = NUMBERS.get(self.count, str(self.count))
            return ("there are {} shapes", "{} shapes")[self.template].format(number)
        raise ValueError(f"unknown claim kind {self.kind!r}")


def _relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float) -> bool:
    if relation == "left":
        return a.cx + margin < b.cx
    if relation == "right":
        return a.cx > b.cx + margin
    if relation == "above":
        return a.cy + margin < b.cy
    if relation == "below":
        return a.cy > b.cy + margin
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def holds(claim: Claim, objects: list[SceneObject] | tuple[SceneObject, ...], image_size: int) -> bool:
    """Whether ``claim`` is true of a scene (existential reading: some distinct objects fit the descriptions)."""
    if claim.kind == "count":
        return len(objects) == claim.count
    if claim.kind == "exists":
        return any(claim.descs[0].matches(o) for o in objects)
    if claim.kind == "and":
        return any(
            all(d.matches(o) for d, o in zip(claim.descs, chosen))
            for chosen in itertools.permutations(objects, len(claim.descs))
        )
    if claim.kind == "relation":
        margin = RELATION_MARGIN * image_size
        return any(
            claim.descs[0].matches(a) and claim.descs[1].matches(b) and _relation_holds(a, b, claim.relation, margin)
            for a, b in itertools.permutations(objects, 2)
        )
    raise ValueError(f"unknown claim kind {claim.kind!r}")


def _build_vocabulary() -> list[str]:
    words: set[str] = {"a", "an", "and", *COLOURS, *SHAPES, *SIZES, *NUMBERS.values(), "shapes"}
    texts = [*_EXISTS_TEMPLATES, *_AND_TEMPLATES, *_RELATION_WORDS.values(), *_RELATION_TEMPLATES]
    texts += [t for pair in _COUNT_TEMPLATES.values() for t in pair] + ["there are {} shapes"]
    for text in texts:
        words.update(
            w for w in text.replace("{0}", " ").replace("{1}", " ").replace("{r}", " ").split() if "{" not in w
        )
    return sorted(words)


SHAPES_VOCABULARY: list[str] = _build_vocabulary()


@dataclass
class Scene:
    """Everything about one item except its pixels."""

    objects: list[SceneObject]
    claims: list[Claim]
    negative_claims: list[Claim]
    negative_kinds: list[str]
    background: str
    extra: dict = field(default_factory=dict)


def _shape_polygon(obj: SceneObject) -> list[tuple[float, float]]:
    """Vertices (x, y) of a non-circle shape; every vertex lies within ``obj.radius`` of the centre."""
    r = obj.radius
    if obj.shape == "square":
        pts = [(-0.7 * r, -0.7 * r), (0.7 * r, -0.7 * r), (0.7 * r, 0.7 * r), (-0.7 * r, 0.7 * r)]
    elif obj.shape == "diamond":
        pts = [(0.0, -r), (0.75 * r, 0.0), (0.0, r), (-0.75 * r, 0.0)]
    elif obj.shape == "triangle":
        pts = [(r * np.sin(t), -r * np.cos(t)) for t in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
    elif obj.shape == "star":
        pts = [
            (
                (r if k % 2 == 0 else 0.42 * r) * np.sin(k * np.pi / 5),
                -(r if k % 2 == 0 else 0.42 * r) * np.cos(k * np.pi / 5),
            )
            for k in range(10)
        ]
    elif obj.shape == "cross":
        w, h = 0.3 * r, 0.95 * r
        pts = [
            (-w, -h),
            (w, -h),
            (w, -w),
            (h, -w),
            (h, w),
            (w, w),
            (w, h),
            (-w, h),
            (-w, w),
            (-h, w),
            (-h, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    c, s = np.cos(np.radians(obj.angle)), np.sin(np.radians(obj.angle))
    return [(obj.cx + x * c - y * s, obj.cy + x * s + y * c) for x, y in pts]


def _coverage(obj: SceneObject, image_size: int, supersample: int = 4) -> tuple[np.ndarray, int, int]:
    """Fraction of each pixel the object covers, on its bounding box: ((h, w) float32 in [0, 1], x0, y0)."""
    x0, y0 = max(int(obj.cx - obj.radius) - 1, 0), max(int(obj.cy - obj.radius) - 1, 0)
    x1 = min(int(np.ceil(obj.cx + obj.radius)) + 1, image_size)
    y1 = min(int(np.ceil(obj.cy + obj.radius)) + 1, image_size)
    k = supersample
    canvas = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shape == "circle":
        r = 0.88 * obj.radius
        draw.ellipse(
            [(obj.cx - r - x0) * k, (obj.cy - r - y0) * k, (obj.cx + r - x0) * k, (obj.cy + r - y0) * k], fill=255
        )
    else:
        draw.polygon([((x - x0) * k, (y - y0) * k) for x, y in _shape_polygon(obj)], fill=255)
    # reduce() averages k x k blocks: exactly the supersampled coverage of each output pixel.
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0, x0, y0


class ShapesScenes:
    """Procedurally generated shapes scenes (see the module docstring for the decisions).

    Args:
        split: "train", "val", "test" or "test_compositional".
        size: number of scenes (the dataset length).
        seed: base seed; item ``i`` depends only on ``(seed, split, i)``.
        image_size: side of the square RGB image in pixels.
        captions_per_image: true captions per scene (each with one hard negative).
        max_objects: objects per scene are drawn from 1..max_objects, weighted towards more objects.
        noise_std: standard deviation of the Gaussian pixel noise (0-255 scale).

    ``ds[i]`` returns a dict with ``image`` (PIL RGB), ``captions`` (list[str]), ``negatives`` (one per
    caption), ``negative_kinds`` (how each negative was made), ``objects`` (list of dicts with ``phrase``,
    ``mask`` (bool [H, W]), ``colour``, ``shape``, ``size``, ``center`` (x, y) and ``radius`` in pixels)
    and ``scene`` (``split``, ``index``, ``background``).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        seed: int = 0,
        image_size: int = 64,
        captions_per_image: int = 5,
        max_objects: int = 3,
        noise_std: float = 4.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; expected one of {', '.join(SPLITS)}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels so shapes stay recognisable, got {image_size}")
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.split, self.size, self.seed = split, size, seed
        self.image_size, self.captions_per_image = image_size, captions_per_image
        self.max_objects, self.noise_std = max_objects, noise_std
        self._split_id = SPLITS.index(split)
        held = set(HELD_OUT_PAIRS)
        all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
        self._seen_pairs = [p for p in all_pairs if p not in held]
        self._all_pairs = all_pairs
        self._compositional = split == "test_compositional"
        # (H, W) pixel-coordinate grids in [0, 1], shared by every background.
        ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / max(image_size - 1, 1)
        self._xs, self._ys = xs, ys

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ShapesScenes(split={self.split!r}, size={self.size}, seed={self.seed}, image_size={self.image_size})"

    def _index(self, index: int) -> int:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"scene index out of range for {self!r}")
        return int(index)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_id, index, stream])

    # ----------------------------------------------------------------------------------------------- scene

    def _allowed(self, desc: Desc) -> bool:
        """Train/val/test text never names a held-out pair, not even in a (false) negative."""
        return self._compositional or desc.colour is None or (desc.colour, desc.shape) not in HELD_OUT_PAIRS

    def _sample_objects(self, rng: np.random.Generator) -> list[SceneObject]:
        counts = np.arange(1, self.max_objects + 1)
        n = int(rng.choice(counts, p=counts / counts.sum()))
        pool = self._all_pairs if self._compositional else self._seen_pairs
        picks = rng.choice(len(pool), size=n, replace=False)
        pairs = [pool[i] for i in picks]
        if self._compositional and not any(p in HELD_OUT_PAIRS for p in pairs):
            held = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
            pairs = [held] + [p for p in pairs if p != held][: n - 1]
        s = self.image_size
        for attempt in range(200):
            # After many failed placements fall back to small objects, which always fit.
            sizes = [str(rng.choice(SIZES)) if attempt < 100 else "small" for _ in pairs]
            objects: list[SceneObject] = []
            for (colour, shape), size in zip(pairs, sizes):
                lo, hi = _RADIUS[size]
                r = float(rng.uniform(lo, hi)) * s
                cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
                if any(np.hypot(cx - o.cx, cy - o.cy) < r + o.radius + 2 for o in objects):
                    break
                angle = float(rng.uniform(-12, 12))  # small tilts keep a square from turning into a diamond
                objects.append(SceneObject(shape, colour, size, float(cx), float(cy), r, angle))
            if len(objects) == len(pairs):
                return objects
        raise RuntimeError("could not place the objects of a shapes scene; this is a bug")

    def _desc(self, obj: SceneObject, rng: np.random.Generator, need_colour: bool) -> Desc:
        u = rng.random()
        if u < 0.5:
            return Desc(obj.shape, obj.colour)
        if u < 0.8 or need_colour:
            return Desc(obj.shape, obj.colour, obj.size)
        return Desc(obj.shape, None, obj.size)

    def _sample_claim(self, objects: list[SceneObject], rng: np.random.Generator) -> Claim:
        n = len(objects)
        focus = [o for o in objects if (o.colour, o.shape) in HELD_OUT_PAIRS] if self._compositional else objects
        kinds, weights = (
            (["exists", "count"], [0.85, 0.15])
            if n == 1
            else (
                ["relation", "and", "exists", "count"],
                [0.4, 0.25, 0.25, 0.1],
            )
        )
        if self._compositional:  # every caption must name a held-out object, so no counts
            kinds, weights = kinds[:-1], weights[:-1]
        kind = str(rng.choice(kinds, p=np.asarray(weights) / sum(weights)))
        first = focus[int(rng.integers(len(focus)))]
        others = [o for o in objects if o is not first]
        need = self._compositional
        if kind == "exists":
            return Claim("exists", (self._desc(first, rng, need),), template=int(rng.integers(len(_EXISTS_TEMPLATES))))
        if kind == "count":
            return Claim("count", count=n, template=int(rng.integers(2)))
        if kind == "and":
            k = 3 if n == 3 and rng.random() < 0.3 else 2
            chosen = [first] + [others[i] for i in rng.permutation(len(others))[: k - 1]]
            order = rng.permutation(k)
            descs = tuple(self._desc(chosen[i], rng, need and chosen[i] is first) for i in order)
            return Claim("and", descs, template=int(rng.integers(len(_AND_TEMPLATES))))
        margin = RELATION_MARGIN * self.image_size
        other = others[int(rng.integers(len(others)))]
        a, b = (first, other) if rng.random() < 0.5 else (other, first)
        # Disjoint bounding circles put the centres >= 0.18 * size apart, so some relation always holds.
        true = [r for r in RELATIONS if _relation_holds(a, b, r, margin)]
        relation = str(rng.choice(true))
        descs = (self._desc(a, rng, need and a is first), self._desc(b, rng, need and b is first))
        return Claim("relation", descs, relation=relation, template=int(rng.integers(len(_RELATION_TEMPLATES))))

    def _negative_candidates(self, claim: Claim) -> dict[str, list[Claim]]:
        out: dict[str, list[Claim]] = {"swap": [], "reverse": [], "change": []}
        descs = claim.descs

        def with_descs(new: list[Desc]) -> Claim:
            return Claim(claim.kind, tuple(new), claim.relation, claim.count, claim.template)

        for i, j in itertools.combinations(range(len(descs)), 2):
            a, b = descs[i], descs[j]
            for attr in ("colour", "size"):
                va, vb = getattr(a, attr), getattr(b, attr)
                if va is not None and vb is not None and va != vb:
                    new = list(descs)
                    new[i], new[j] = Desc(a.shape, **{**_attrs(a), attr: vb}), Desc(b.shape, **{**_attrs(b), attr: va})
                    out["swap"].append(with_descs(new))
        if claim.kind == "relation":
            out["reverse"].append(Claim("relation", descs, OPPOSITE[claim.relation], template=claim.template))
        for i, d in enumerate(descs):
            options = [Desc(s, d.colour, d.size) for s in SHAPES if s != d.shape]
            if d.colour is not None:
                options += [Desc(d.shape, c, d.size) for c in COLOURS if c != d.colour]
            if d.size is not None:
                options += [Desc(d.shape, d.colour, s) for s in SIZES if s != d.size]
            for option in options:
                new = list(descs)
                new[i] = option
                out["change"].append(with_descs(new))
        if claim.kind == "count":
            out["change"] += [Claim("count", count=k, template=claim.template) for k in NUMBERS if k != claim.count]
        return out

    def _sample_negative(self, claim: Claim, objects: list[SceneObject], rng: np.random.Generator) -> tuple[Claim, str]:
        candidates = self._negative_candidates(claim)
        # Swaps and reversals are the hard negatives the shapes set exists for; try them first most of the time.
        order = ["swap", "reverse", "change"] if rng.random() < 0.8 else ["change", "swap", "reverse"]
        text = claim.text()
        for kind in order:
            pool = candidates[kind]
            for i in rng.permutation(len(pool)):
                neg = pool[i]
                if (
                    all(self._allowed(d) for d in neg.descs)
                    and not holds(neg, objects, self.image_size)
                    and neg.text() != text
                ):
                    return neg, kind
        raise RuntimeError(f"no false negative found for {text!r}; this is a bug")

    def scene(self, index: int) -> Scene:
        """The structured scene of item ``index`` (objects, claims, negatives), without rendering pixels."""
        index = self._index(index)
        rng = self._rng(index, 0)
        objects = self._sample_objects(rng)
        claims: list[Claim] = []
        seen: set[str] = set()
        for _ in range(20 * self.captions_per_image):
            claim = self._sample_claim(objects, rng)
            if claim.text() not in seen:
                seen.add(claim.text())
                claims.append(claim)
            if len(claims) == self.captions_per_image:
                break
        while len(claims) < self.captions_per_image:  # tiny caption spaces only: repeat rather than fail
            claims.append(claims[len(claims) % len(seen)])
        negatives = [self._sample_negative(c, objects, rng) for c in claims]
        background = str(rng.choice(("flat", "gradient", "stripes", "blobs")))
        return Scene(objects, claims, [n for n, _ in negatives], [k for _, k in negatives], background)

    # ------------------------------------------------------------------------------------------- rendering

    def _background(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """Dark-to-mid grey, slightly tinted background, (H, W, 3) float32 in 0-255."""
        # Luminance stays <= ~120 so every object colour, white included, stands out.
        c1 = rng.uniform(10, 100) + rng.uniform(-15, 15, size=3)
        c2 = rng.uniform(10, 110) + rng.uniform(-15, 15, size=3)
        if kind == "flat":
            return np.broadcast_to(c1.astype(np.float32), (self.image_size, self.image_size, 3)).copy()
        theta = rng.uniform(0, 2 * np.pi)
        t = np.cos(theta) * self._xs + np.sin(theta) * self._ys  # (H, W)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        bg = c1 * (1 - t[..., None]) + c2 * t[..., None]
        if kind == "stripes":
            phi, freq = rng.uniform(0, np.pi), rng.uniform(8, 20)
            wave = np.sin(freq * (np.cos(phi) * self._xs + np.sin(phi) * self._ys) * np.pi)
            bg = bg + rng.uniform(5, 12) * wave[..., None]
        elif kind == "blobs":
            low = Image.fromarray(rng.uniform(0, 255, size=(4, 4)).astype(np.uint8))
            smooth = np.asarray(low.resize((self.image_size, self.image_size), Image.BILINEAR), dtype=np.float32)
            bg = bg + (smooth[..., None] / 255.0 - 0.5) * 40
        return bg.astype(np.float32)

    def render(self, scene: Scene, index: int) -> dict:
        """Draw a scene (pixels depend on ``(seed, split, index)``) and return the item dict."""
        rng = self._rng(index, 1)
        img = self._background(scene.background, rng)  # (H, W, 3)
        objects = []
        for obj in scene.objects:
            cov, x0, y0 = _coverage(obj, self.image_size)  # (h, w)
            h, w = cov.shape
            colour = np.clip(np.asarray(COLOURS[obj.colour], np.float32) + rng.uniform(-12, 12, size=3), 0, 255)
            alpha = cov[..., None]
            patch = img[y0 : y0 + h, x0 : x0 + w]
            img[y0 : y0 + h, x0 : x0 + w] = patch * (1 - alpha) + colour * alpha
            mask = np.zeros((self.image_size, self.image_size), dtype=bool)
            mask[y0 : y0 + h, x0 : x0 + w] = cov > 0.5
            objects.append(
                {
                    "phrase": obj.phrase,
                    "mask": mask,
                    "colour": obj.colour,
                    "shape": obj.shape,
                    "size": obj.size,
                    "center": (obj.cx, obj.cy),
                    "radius": obj.radius,
                }
            )
        if self.noise_std > 0:
            img += rng.normal(0.0, self.noise_std, size=img.shape).astype(np.float32)
        pixels = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        return {
            "image": Image.fromarray(pixels, "RGB"),
            "captions": [c.text() for c in scene.claims],
            "negatives": [c.text() for c in scene.negative_claims],
            "negative_kinds": list(scene.negative_kinds),
            "objects": objects,
            "scene": {"split": self.split, "index": index, "background": scene.background},
        }

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        return self.render(self.scene(index), index)


def _attrs(d: Desc) -> dict:
    return {"colour": d.colour, "size": d.size}
