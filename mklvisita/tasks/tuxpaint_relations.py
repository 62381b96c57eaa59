"""Tux Paint relations: composites of two or three photo stamps with captions that relate them, for evaluation only.

The photo stamps (:mod:`mklvisita.tasks.tuxpaint`) are single objects; here they are placed side by side, stacked, or
three in a row on the white Tux Paint canvas, and each scene gets captions built from the stamps' descriptions in
relation templates, each with a hard negative of a known kind. Binding per kind says whether a checkpoint tells
where things are; the pointing games say whether its maps find each phrase and each word.

Decisions:
    - **Spec** ``tuxpaint-relations[:<stamps folder>]``; ``--split test`` (default) or ``tune`` picks the half of
      the stamps (:attr:`Stamp.half`): choices on "tune", figures on "test". GPL-2 stamps: read at run time only.
    - **Phrases**: a stamp takes part when its description's first sentence is a short noun phrase
      (:func:`relation_phrase`: "A sitting gnu." -> "a sitting gnu"; it starts with "a"/"an", at most
      ``MAX_PHRASE_WORDS`` words, no verb such as "is"); the stamps of one scene have different head nouns (last
      words), so each phrase names one stamp, and a replacing stamp comes from another folder than the scene's
      stamps (the folders group near-synonyms: "a headstone", "a gravestone").
    - **Scenes** (``SCENES`` of each layout, a function of (seed, index) only): ``row2`` (two side by side),
      ``column2`` (two stacked), ``row3`` (three in a row), on a white ``SIZE`` x ``SIZE`` canvas, each stamp in its
      slot at 80 % of the slot with a small random offset; masks are the stamps' alpha > 50 %.
    - **Captions and negatives** (kind in brackets), with A before B (left or top) and A, B, C left to right:
      two stamps: "A to the left of B" / "A above B" against "A to the right of B" / "A below B" [reverse];
      "A on the left and B on the right" / "A at the top and B at the bottom" against the same with A and B swapped
      [reverse]; "B to the right of A" / "B below A" with one of them replaced by another stamp's phrase of the half
      [replace]. Three stamps: "A on the left, B in the middle and C on the right" with two of them swapped [swap];
      a pair "X to the left of Y" against "X to the right of Y" [reverse]; the three-place caption with one stamp
      replaced [replace].
    - **Metrics**: the protocol's binding per kind (final score, S alone, ITM alone where the model has fusion), the
      retrieval metrics over the scenes' captions (3 per scene), the phrase pointing game (each stamp's phrase) and
      the word pointing game (every word of each stamp's phrase inside the captions that name two or three stamps),
      per method the model has (Grad-CAM and attention of the fusion, the concept maps as ``kernel``).
    - **The replaced stamp alone** (``binding_acc_replace_alone``, with ``_sim`` and ``_itm``): each scene's
      [replace] choice again, the stamp's own phrase against the replacing phrase, with the stamp alone on the
      canvas as the single-stamp protocol shows it. The composites show the same stamp at a half or a third of that
      size beside others, so this says how far the recognisers behind a checkpoint let its [replace] verdict go; the
      gap between the two is what the composites cost.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from .base import TaskError
from .tuxpaint import BACKGROUND, Stamp, composite, find_stamps, stamp_rgba

SIZE = 448
SCENES = {"row2": 60, "column2": 60, "row3": 60}
MAX_PHRASE_WORDS = 6
POINTING_SCENES = 180  # all of them; tests shrink it
_VERBS = re.compile(r"\b(is|are|was|were|has|have|means|lets|contains|remember|resembles)\b")


def relation_phrase(caption: str) -> str | None:
    """A stamp description's first sentence as a noun phrase ("A ripe, red tomato!" -> "a ripe red tomato"), or None
    when it is not one (a question, a sentence with a verb, a plural without article, more than
    ``MAX_PHRASE_WORDS`` words)."""
    first = re.split(r"(?<=[.!?])\s", caption.strip())[0].strip()
    if first.endswith("?"):
        return None
    text = re.sub(r"\([^)]*\)", " ", first.rstrip(".!"))
    text = re.sub(r"[“”\"',;]", "", text)
    words = text.split()
    if not words or words[0].lower() not in ("a", "an") or len(words) > MAX_PHRASE_WORDS or len(words) < 2:
        return None
    if _VERBS.search(text.lower()) or "—" in text or ":" in text:
        return None
    return " ".join([words[0].lower(), *words[1:]])


def head(phrase: str) -> str:
    return phrase.split()[-1].lower()


def parse_spec(spec: str) -> str | None:
    """``tuxpaint-relations`` -> None (default folder); ``tuxpaint-relations:<folder>`` -> folder."""
    name, sep, rest = spec.partition(":")
    if name != "tuxpaint-relations":
        raise TaskError(f"not a tuxpaint-relations spec: {spec!r}")
    return rest if sep and rest else None


class RelationScenes:
    """The composites of the module docstring: item i has ``image``, ``objects`` [{phrase, mask}], ``captions``,
    ``negatives``, ``negative_kinds``, ``layout`` and ``replaced`` {stamp, phrase, by}: the stamp the [replace]
    negative names another (``by``) instead of."""

    def __init__(self, stamps: list[Stamp], scenes: dict[str, int] | None = None, seed: int = 0, size: int = SIZE):
        phrases = {s.relative: relation_phrase(s.caption) for s in stamps}
        self.stamps = [s for s in stamps if phrases[s.relative] is not None]
        self.phrase = {s.relative: str(phrases[s.relative]) for s in self.stamps}
        if len({head(p) for p in self.phrase.values()}) < 4:
            raise TaskError("a relations protocol needs at least four stamps whose descriptions are noun phrases")
        self.layouts = [name for name, n in (scenes or SCENES).items() for _ in range(n)]
        self.seed, self.size = seed, size
        self._rgba: dict[str, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.layouts)

    def _pick(self, rng: random.Random, count: int, avoid: list[Stamp]) -> list[Stamp]:
        """``count`` stamps with different head nouns, none sharing a head or (a near-synonym, "a headstone" for "a
        gravestone") a folder with a stamp of ``avoid``."""
        picked: list[Stamp] = []
        heads = {head(self.phrase[s.relative]) for s in avoid}
        folders = {s.relative.rpartition("/")[0] for s in avoid}
        for _ in range(1000 * count):
            if len(picked) == count:
                return picked
            s = rng.choice(self.stamps)
            if head(self.phrase[s.relative]) not in heads and s.relative.rpartition("/")[0] not in folders:
                picked.append(s)
                heads.add(head(self.phrase[s.relative]))
        if len(picked) < count:
            raise TaskError("too few stamps with different head nouns and folders for a relations scene")
        return picked

    def _stamp(self, stamp: Stamp) -> Image.Image:
        if stamp.relative not in self._rgba:
            rgba = stamp_rgba(stamp)
            rgba.thumbnail((self.size, self.size))
            self._rgba[stamp.relative] = rgba
        return self._rgba[stamp.relative]

    def _compose(self, stamps: list[Stamp], layout: str, rng: random.Random) -> tuple[Image.Image, list[np.ndarray]]:
        s, n = self.size, len(stamps)
        canvas = Image.new("RGBA", (s, s), (*BACKGROUND, 255))
        sw, sh = (s // n, s) if layout.startswith("row") else (s, s // n)
        masks = []
        for k, stamp in enumerate(stamps):
            rgba = self._stamp(stamp)
            scale = 0.8 * min(sw / rgba.width, sh / rgba.height)
            rgba = rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))))
            ox, oy = (k * sw, 0) if layout.startswith("row") else (0, k * sh)
            x = ox + (sw - rgba.width) // 2 + rng.randint(-sw // 20, sw // 20)
            y = oy + (sh - rgba.height) // 2 + rng.randint(-sh // 20, sh // 20)
            x, y = min(max(ox, x), ox + sw - rgba.width), min(max(oy, y), oy + sh - rgba.height)
            canvas.alpha_composite(rgba, (x, y))
            mask = np.zeros((s, s), dtype=bool)
            mask[y : y + rgba.height, x : x + rgba.width] = np.asarray(rgba)[..., 3] > 127
            masks.append(mask)
        return canvas.convert("RGB"), masks

    def _captions(
        self, p: list[str], other: str, layout: str, rng: random.Random
    ) -> tuple[list[tuple[str, str, str]], int]:
        """(caption, negative, kind) triples of a scene whose phrases in reading order are ``p``, and which of them
        the [replace] negative replaces with ``other``."""
        if layout == "row3":
            a, b, c = p
            three = "{} on the left, {} in the middle and {} on the right"
            i, j = rng.sample(range(3), 2)
            swapped = list(p)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            x, y = sorted(rng.sample(range(3), 2))
            replaced = list(p)
            k = rng.randrange(3)
            replaced[k] = other
            return [
                (three.format(a, b, c), three.format(*swapped), "swap"),
                (f"{p[x]} to the left of {p[y]}", f"{p[x]} to the right of {p[y]}", "reverse"),
                (three.format(a, b, c), three.format(*replaced), "replace"),
            ], k
        a, b = p
        if layout == "row2":
            rel, inverse, sides = "to the left of", "to the right of", "{} on the left and {} on the right"
        else:
            rel, inverse, sides = "above", "below", "{} at the top and {} at the bottom"
        back = inverse  # B's relation to A
        b_replaced = rng.random() < 0.5
        first, second = (other, a) if b_replaced else (b, other)
        return [
            (f"{a} {rel} {b}", f"{a} {inverse} {b}", "reverse"),
            (sides.format(a, b), sides.format(b, a), "reverse"),
            (f"{b} {back} {a}", f"{first} {back} {second}", "replace"),
        ], 1 if b_replaced else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        layout = self.layouts[index]
        rng = random.Random(self.seed * 1_000_003 + index)
        stamps = self._pick(rng, 3 if layout == "row3" else 2, [])
        other = self.phrase[self._pick(rng, 1, stamps)[0].relative]
        image, masks = self._compose(stamps, layout, rng)
        phrases = [self.phrase[s.relative] for s in stamps]
        triples, replaced = self._captions(phrases, other, layout, rng)
        return {
            "image": image,
            "objects": [{"phrase": ph, "mask": m} for ph, m in zip(phrases, masks)],
            "captions": [t[0] for t in triples],
            "negatives": [t[1] for t in triples],
            "negative_kinds": [t[2] for t in triples],
            "layout": layout,
            "replaced": {"stamp": stamps[replaced], "phrase": phrases[replaced], "by": other},
        }


def load_eval_data(spec: str, split: str = "test", limit: int = 0) -> Any:
    """EvalData for ``tuxpaint-relations[:<folder>]`` on a half of the stamps; ``limit`` keeps the first N scenes."""
    from .base import EvalData, LazyImages

    if split not in ("test", "tune"):
        raise TaskError(f"tuxpaint-relations split {split!r} is unknown; choose 'test' or 'tune'")
    scenes = RelationScenes(find_stamps(parse_spec(spec), split))
    if limit > 0:
        scenes.layouts = scenes.layouts[:limit]
    captions, negatives, kinds, txt2img = [], [], [], []
    for i in range(len(scenes)):
        item = scenes[i]
        captions += item["captions"]
        negatives += item["negatives"]
        kinds += item["negative_kinds"]
        txt2img += [i] * len(item["captions"])
    return EvalData(
        spec, split, LazyImages(scenes), captions, np.asarray(txt2img), negatives, scenes, negative_kinds=kinds
    )


def word_pointing_examples(scenes: RelationScenes, n: int | None = None) -> Iterator[dict[str, Any]]:
    """The true captions that name two or three stamps, each word of each stamp's phrase a target at its mask."""
    for i in range(len(scenes) if n is None else min(n, len(scenes))):
        item = scenes[i]
        for caption in dict.fromkeys(item["captions"]):  # the three-place caption is listed twice
            words, targets = caption.split(), []
            for obj in item["objects"]:
                phrase = obj["phrase"].split()[1:]  # without the article
                start = next((s for s in range(len(words)) if words[s : s + len(phrase)] == phrase), None)
                if start is not None:
                    targets += [(w, obj["mask"]) for w in range(start, start + len(phrase))]
            if len({id(m) for _, m in targets}) >= 2:
                yield {"image": item["image"], "caption": caption, "targets": targets}


def replaced_alone(scenes: RelationScenes, n: int | None = None) -> tuple[list[Image.Image], list[str], list[str]]:
    """Each scene's replaced stamp alone, as the single-stamp protocol shows it (:func:`~.tuxpaint.composite`), its
    own phrase and the phrase that replaced it."""
    images, phrases, others = [], [], []
    for i in range(len(scenes) if n is None else min(n, len(scenes))):
        replaced = scenes[i]["replaced"]
        images.append(composite(replaced["stamp"]))
        phrases.append(replaced["phrase"])
        others.append(replaced["by"])
    return images, phrases, others


def replace_alone_metrics(model: Any, processor: Any, scenes: RelationScenes, n: int | None = None) -> dict:
    """[replace] with the stamp alone: does the model prefer the replaced stamp's own phrase to the replacing one
    when the stamp fills the canvas on its own? The same choice as the scene's [replace] pair, without the
    relation, the other stamps or the smaller size: what the recognisers behind the model allow the composites'
    verdict (``binding_acc_replace_alone``, ``_sim``, ``_itm`` as for the kinds). The final score by the checkpoint's
    own ranking rule (an evaluation's ``--itm-weight`` override does not reach a task's metrics)."""
    from ..metrics import binding_metrics
    from ..retrieval import encode_captions, encode_images, negative_scores

    images, phrases, others = replaced_alone(scenes, n)
    ns = negative_scores(
        model,
        encode_images(model, processor, images),
        encode_captions(model, processor, phrases),
        encode_captions(model, processor, others),
        np.arange(len(images)),
    )
    kinds = ["replace_alone"] * len(images)
    out = binding_metrics(ns.pos, ns.neg, kinds) | binding_metrics(ns.pos_sim, ns.neg_sim, kinds, "_sim")
    if ns.pos_itm is not None and ns.neg_itm is not None:
        out |= binding_metrics(ns.pos_itm, ns.neg_itm, kinds, "_itm")
    return {k: v for k, v in out.items() if "replace_alone" in k}  # not the overall binding_acc of these pairs


def extra_metrics(model: Any, processor: Any, data: Any) -> dict[str, float]:
    """Phrase and word pointing games, per method, on the scenes; the [replace] pairs with the stamp alone."""
    from ..pointing import pointing_game, word_pointing_game

    scenes = getattr(data, "source", None)
    if not isinstance(scenes, RelationScenes):
        return {}
    n = min(POINTING_SCENES, len(scenes))
    return (
        pointing_game(model, processor, scenes, n=n)
        | word_pointing_game(model, processor, word_pointing_examples(scenes, n))
        | replace_alone_metrics(model, processor, scenes)
    )
