"""Dense training targets from shapes scenes: what each patch shows and which patches each word names.

The shapes generator knows every object's mask and every caption's structure, so a training batch can say, beyond
"this caption matches this image", *where* each word's object is and *what* each patch shows. Two losses read these
targets (``loss.patch_weight``, ``loss.grounding_weight``; :mod:`mklvisita.losses`):

- ``patch_attribute_labels``: for each patch of the model's grid, the colour, shape and size of the object that
  covers most of it (at least ``threshold`` of the patch), else background (the last class of each attribute).
- ``relation_word_targets``: for the relation word of a true relation caption ("left" in "... to the left of ..."),
  1 (the relation holds between its two objects); for the same word of the caption's reversed hard negative ("...
  to the right of ..."), 0. Other hard negatives (attributes swapped or changed) get no relation target: their
  relation is about objects the scene may not have.
- ``word_patch_targets``: for each token of a true caption that belongs to an object's description ("large",
  "purple", "cross" in "a large purple cross and a yellow star"), that object's patch coverage normalised to a
  distribution. The object is the one the claim is true of: descriptions are matched to objects by the same
  existential reading as :func:`mklvisita.data.shapes.holds` (relations included), so "a star" in a scene of two
  stars names the one that makes the claim hold. Articles, relation words and count captions get no target.

Decisions: coverage is computed by area-resampling each object mask to the patch grid (the image is square and the
letterbox is then a plain resize), so the targets follow the model's grid whatever the image size.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from .shapes import COLOURS, OPPOSITE, RELATION_MARGIN, SHAPES, SIZES, Claim, SceneObject, _relation_holds

# Classes of each attribute head, background included (loss.patch_classes of a shapes recipe).
PATCH_CLASSES: list[int] = [len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1]


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch covered by a boolean mask: (gh * gw,) float32 in [0, 1], row-major."""
    gh, gw = grid
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((gw, gh), Image.Resampling.BOX), dtype=np.float32).reshape(-1) / 255.0


def patch_attribute_labels(objects: list[dict], grid: tuple[int, int], threshold: float = 0.2) -> np.ndarray:
    """(3, gh * gw) int64: colour, shape and size class of each patch's main object (background = last class).

    Args:
        objects: a shapes item's ``objects`` (dicts with ``mask``, ``colour``, ``shape``, ``size``).
        grid: the model's patch grid (rows, columns).
        threshold: the least share of a patch an object must cover to label it.
    """
    n = grid[0] * grid[1]
    labels = np.array([[c - 1] * n for c in PATCH_CLASSES], dtype=np.int64)  # (3, P) background
    best = np.full(n, threshold, dtype=np.float32)
    colours = list(COLOURS)
    for obj in objects:
        cov = patch_coverage(obj["mask"], grid)
        win = cov > best
        best = np.where(win, cov, best)
        labels[0, win] = colours.index(obj["colour"])
        labels[1, win] = SHAPES.index(obj["shape"])
        labels[2, win] = SIZES.index(obj["size"])
    return labels


def claim_assignment(claim: Claim, objects: list[SceneObject], image_size: int) -> tuple[int, ...] | None:
    """Index of the object each description of a true claim names (the first assignment that makes it hold)."""
    margin = RELATION_MARGIN * image_size
    for chosen in itertools.permutations(range(len(objects)), len(claim.descs)):
        if not all(d.matches(objects[j]) for d, j in zip(claim.descs, chosen)):
            continue
        if claim.kind == "relation" and not _relation_holds(
            objects[chosen[0]], objects[chosen[1]], claim.relation, margin
        ):
            continue
        return chosen
    return None


def word_patch_targets(
    claim: Claim,
    objects: list[SceneObject],
    masks: list[np.ndarray],
    token_word: list[int | None],
    grid: tuple[int, int],
    image_size: int,
) -> np.ndarray:
    """(T, gh * gw) float32: for each token of a description word, its object's coverage as a distribution.

    Args:
        claim: a caption's claim (true of the scene).
        objects, masks: the scene's objects and their masks, in the same order.
        token_word: for each token position the index of its whitespace word, None for special tokens
            (:meth:`mklvisita.inputs.Processor.words`).
        grid: the model's patch grid; image_size: the scene's pixel size (relations' margin).
    """
    out = np.zeros((len(token_word), grid[0] * grid[1]), dtype=np.float32)
    chosen = claim_assignment(claim, objects, image_size) if claim.descs else None
    if chosen is None:
        return out
    words = claim.text().split()
    cursor = 0
    for desc, j in zip(claim.descs, chosen):
        phrase = desc.text().split()[1:]  # without the article
        start = next(
            (s for s in range(cursor, len(words) - len(phrase) + 1) if words[s : s + len(phrase)] == phrase), None
        )
        if start is None:  # cannot happen for generator captions; leave the words unsupervised
            continue
        cursor = start + len(phrase)
        cov = patch_coverage(masks[j], grid)
        if cov.sum() <= 0:
            continue
        for t, w in enumerate(token_word):
            if w is not None and start <= w < cursor:
                out[t] = cov / cov.sum()
    return out


def relation_word_targets(true_claim: Claim, claim: Claim | None, token_word: list[int | None]) -> np.ndarray:
    """(T,) int64: 1 / 0 at the tokens of ``claim``'s relation word when ``claim`` is the true relation claim /
    its reversal (same objects, opposite relation), -1 everywhere else.

    Args:
        true_claim: the caption's claim (true of the scene).
        claim: the claim of the text the tokens belong to (``true_claim`` itself or its hard negative).
        token_word: for each token position the index of its whitespace word, None for special tokens.
    """
    out = np.full(len(token_word), -1, dtype=np.int64)
    if claim is None or claim.kind != "relation" or true_claim.kind != "relation" or claim.descs != true_claim.descs:
        return out
    if claim.relation == true_claim.relation:
        label = 1
    elif claim.relation == OPPOSITE[true_claim.relation]:
        label = 0
    else:
        return out
    words = claim.text().split()
    at = [i for i, w in enumerate(words) if w == claim.relation]  # "left" / "right" / "above" / "below"
    for t, w in enumerate(token_word):
        if w is not None and w in at:
            out[t] = label
    return out
