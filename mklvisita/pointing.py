"""Pointing games: evaluation metrics of where explanations look, against object masks.

Decisions:

- A map "points" at its peak: the argmax (first on ties) of the map in the original image's frame, at full size.
  A hit is a peak inside the named object's mask; chance is the mean mask area fraction (the hit rate of a uniformly
  random peak), reported beside every accuracy.
- The maps are the explanations a user sees (:func:`mklvisita.explain.method_maps`, one pass per phrase or caption
  for every method at once), so the game measures the explanations, not a proxy.
- The headline ``pointing_acc`` / ``word_pointing_acc`` is the map a user sees by default: with fusion the
  checkpoint's ``fusion.explain_method`` (Grad-CAM unless chosen otherwise at release), else the first of attention /
  kernel measured; never rollout, which is the same for every phrase. Every measured method keeps its own key.
- The tasks call these (shapes: both games; Tux Paint composites: the phrase game), through
  :meth:`mklvisita.tasks.Task.extra_metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .explain import MAP_METHODS, METHODS, method_maps

POINTING_METHODS = MAP_METHODS  # gradcam, attention, kernel, rollout


def _headline(model: Any, usable: Sequence[str]) -> str | None:
    """The measured method the headline accuracy reports (module decisions)."""
    first = model.config.fusion.explain_method if model.has_itm else None
    grounded = [m for m in (first, "gradcam", "attention", "kernel") if m is not None and m in usable]
    return grounded[0] if grounded else None


def _supported(model: Any, method: str) -> bool:
    if method in ("gradcam", "attention"):
        return bool(model.has_itm)
    if method == "kernel":
        return bool(model.kernels.word_map_names)
    return bool(model.vision.has_attentions)  # rollout


def pointing_game(
    model: Any,
    processor: Any,
    dataset: Any,
    n: int | None = None,
    methods: Sequence[str] | None = None,
    layer: int | None = None,
) -> dict[str, float]:
    """Does the peak of a phrase's caption map fall inside the object the phrase names?

    For the first ``n`` scenes (all when None) of a :class:`~mklvisita.data.ShapesScenes` (items with ``image``
    and ``objects`` [{"phrase", "mask"}]), every object phrase is explained against its scene and the peak of its
    caption map is tested against the object's mask.

    Args:
        model, processor: an MKL-VisITA model and its :class:`~mklvisita.inputs.Processor`.
        dataset: indexable scenes as above.
        n: how many scenes (None: all).
        methods: None = every method of :data:`POINTING_METHODS` the model supports; naming "rollout" for a CNN
            backbone (no attention to roll out) is a ValueError, as is an unknown name.
        layer: the fusion layer of Grad-CAM and attention (None: the model's default).

    Returns:
        ``pointing_acc_<method>`` per method the model supports, ``pointing_acc`` (see the module's decisions),
        ``pointing_chance`` and ``pointing_n`` (number of phrases).
    """
    asked = methods is not None
    methods = POINTING_METHODS if methods is None else tuple(methods)
    for m in methods:
        if m not in POINTING_METHODS:
            raise ValueError(f"unknown pointing method {m!r}; choose from {', '.join(POINTING_METHODS)}")
    # A method named explicitly is kept even when unsupported, so that method_maps says why (rollout on a CNN).
    usable = [m for m in methods if _supported(model, m) or (asked and m == "rollout")]
    hits = {m: 0 for m in usable}
    areas, count = [], 0
    for i in range(len(dataset) if n is None else min(n, len(dataset))):
        item = dataset[i]
        for obj in item["objects"]:
            maps = method_maps(model, processor, item["image"], obj["phrase"], usable, layer, words=False)
            mask = np.asarray(obj["mask"], dtype=bool)
            areas.append(float(mask.mean()))
            count += 1
            for m in usable:
                caption_map = maps[m][1]  # (H, W)
                r, c = np.unravel_index(int(np.argmax(caption_map)), caption_map.shape)
                hits[m] += bool(mask[r, c])
    out = {f"pointing_acc_{m}": hits[m] / max(count, 1) for m in usable}
    headline = _headline(model, usable)
    if headline is not None:
        out["pointing_acc"] = out[f"pointing_acc_{headline}"]
    out["pointing_chance"] = float(np.mean(areas)) if areas else 0.0
    out["pointing_n"] = float(count)
    return out


def word_pointing_hits(word_maps: np.ndarray, targets: Sequence[tuple[int, np.ndarray]]) -> list[bool]:
    """For each (word index, mask) target: does the peak (argmax, first on ties) of that word's map fall in the mask?

    Args:
        word_maps: (n_words, H, W) over the same frame as the masks (H, W).
        targets: (whitespace word index, bool mask) pairs. A word index past the maps (cut off by truncation) is a
            miss.

    Returns:
        one bool per target.
    """
    hits = []
    for w, mask in targets:
        if not 0 <= w < len(word_maps):
            hits.append(False)
            continue
        r, c = np.unravel_index(int(np.argmax(word_maps[w])), word_maps[w].shape)
        hits.append(bool(np.asarray(mask, dtype=bool)[r, c]))
    return hits


def word_pointing_game(
    model: Any,
    processor: Any,
    examples: Iterable[dict[str, Any]],
    methods: Sequence[str] | None = None,
    layer: int | None = None,
) -> dict[str, float]:
    """Does each named word's map peak inside the object it names?

    Args:
        model, processor: an MKL-VisITA model and its processor.
        examples: dicts with ``image``, ``caption`` and ``targets`` [(whitespace word index, mask (H, W) bool over
            the original image)]. One pass per caption; each word's map is the mean over its pieces.
        methods: any of gradcam / attention / kernel (None: all); those the model does not support are skipped.
        layer: the fusion layer of Grad-CAM and attention (None: the model's default).

    Returns:
        ``word_pointing_acc_<method>`` per usable method, ``word_pointing_acc`` (the default map's, module doc),
        ``word_pointing_chance`` (mean mask area fraction) and ``word_pointing_n`` (number of words).
    """
    methods = METHODS if methods is None else tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown word pointing method {m!r}; choose from {', '.join(METHODS)}")
    usable = [m for m in methods if _supported(model, m)]
    hits = {m: 0 for m in usable}
    areas, count = [], 0
    for ex in examples:
        targets = list(ex["targets"])
        if not targets:
            continue
        maps = method_maps(model, processor, ex["image"], ex["caption"], usable, layer)
        areas += [float(np.asarray(mask, dtype=bool).mean()) for _, mask in targets]
        count += len(targets)
        for m in usable:
            hits[m] += sum(word_pointing_hits(maps[m][0], targets))
    out = {f"word_pointing_acc_{m}": hits[m] / max(count, 1) for m in usable}
    headline = _headline(model, usable)
    if headline is not None:
        out["word_pointing_acc"] = out[f"word_pointing_acc_{headline}"]
    out["word_pointing_chance"] = float(np.mean(areas)) if areas else 0.0
    out["word_pointing_n"] = float(count)
    return out
