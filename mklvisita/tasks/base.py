"""The task interface's shared types: what a task returns and raises (see :mod:`mklvisita.tasks` for the interface).

Decisions: these live apart from the package's ``__init__`` (which finds a task module by its spec and imports it)
so that the task modules import them without importing the package that imports them: no import cycle, even through
``importlib``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class EvalData:
    """What one evaluation needs: images, captions, ground truth and (shapes) one hard negative per caption."""

    name: str  # the data spec it was loaded from (its task: :func:`get_task`)
    split: str
    images: Sequence  # PIL images or paths, possibly lazy
    captions: list[str]
    txt2img: np.ndarray  # (n_captions,) image index of each caption
    negatives: list[str] | None = None  # shapes: the hard negative of each caption
    source: Any = field(default=None, repr=False)  # the underlying RetrievalSet / ShapesScenes, for extra metrics
    negative_kinds: list[str] | None = None  # how each negative was made (shapes: swap, reverse, change, count)
    k: int | None = None  # the task's default ITM re-ranking depth (None: the evaluator's default)


class TaskError(ValueError):
    """A data spec names no task, or asks a task for something it does not provide."""


@dataclass(frozen=True)
class PairOptions:
    """How to build training pairs; fields a task does not use are ignored."""

    size: int = 20000  # shapes: number of generated training scenes
    seed: int = 0  # shapes: the scene generator's seed
    image_size: int = 64  # shapes: rendered side in pixels
    cache_dir: str = ""  # shapes: where rendered scenes are cached ("" = $MKLVISITA_CACHE or ~/.cache/mklvisita)
    reverse_rate: float = 0.0  # shapes: share of relation captions whose training negative is the reversed relation
    undirected_rate: float = 0.0  # composites: share of two-object relation captions saying "beside" / "next to" /
    # "near" (no direction; mklvisita.data.composites)
    photo_style: float = 0.0  # composites: share of objects drawn photo-like (mklvisita.data.composites)


def caption_positives(items: list[dict[str, Any]]) -> torch.Tensor:
    """(B, B) bool: caption j is true of image i when it is one of image i's captions (same ``image_id``) or the
    same text (case and whitespace ignored) as one of them. Real datasets know nothing more."""
    ids = torch.tensor([int(it["image_id"]) for it in items])  # (B,)
    texts = [" ".join(str(it["caption"]).lower().split()) for it in items]
    index = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    codes = torch.tensor([index[t] for t in texts])  # (B,) one code per distinct text
    same_image = ids[:, None] == ids[None, :]  # (B, B)
    # Caption j holds for image i if some caption of image i has caption j's text.
    has_text = torch.zeros(len(items), len(index), dtype=torch.bool)  # (B, distinct texts)
    for i in range(len(items)):
        has_text[i, codes[same_image[i]]] = True
    return has_text[:, codes] | same_image


class LazyImages:
    """The images of generated scenes (anything whose item ``i`` is a dict with an ``image``), rendered when indexed."""

    def __init__(self, scenes: Sequence[dict[str, Any]]):
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self.scenes[i]["image"] for i in range(*index.indices(len(self)))]
        return self.scenes[index]["image"]
