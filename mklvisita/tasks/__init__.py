"""Tasks: everything specific to one kind of data, found from the data spec in one place (:func:`get_task`).

Decisions:

- **One module per task** (``shapes``, ``karpathy`` for the real benchmarks in Karpathy, LAVIS or Hugging Face form,
  ``tuxpaint``). Generic code (the trainer, :mod:`mklvisita.evaluation`, the tokenizer) never tests a spec or a
  dataset type; it asks the task.
- **The spec's scheme names the task**: the text before the first ``:`` (``shapes``, ``shapes-compositional``,
  ``karpathy:<json>:<root>``, ``lavis:<json>:<root>``, ``hf:<id>``, ``tuxpaint[:<folder>]``). :data:`SCHEMES` is
  the only table of schemes in the project; an unknown one is a :class:`TaskError` listing the accepted forms.
- **The interface is module-level functions** (no class to subclass); a module leaves out what it does not do and
  :class:`Task` supplies the default:

  ``train_pairs(spec, split, options: PairOptions) -> Dataset``
      Training pairs; item ``i`` is a dict with ``image`` (PIL image, or a uint8 (H, W, 3) array already at the
      model's size), ``caption``, ``negative`` (its hard-negative caption or None), ``image_id`` (int) and whatever
      the task's ``positives`` needs. Default: evaluation-only (TaskError).
  ``positives(items) -> torch.Tensor``
      (B, B) bool, ``[i, j]`` = caption j is true of image i, diagonal True. Default: :func:`caption_positives`
      (same image, or the same caption text, nothing else).
  ``load_eval_data(spec, split, limit) -> EvalData``
      The evaluation data (``limit`` > 0: the first ``limit`` images). Required.
  ``extra_metrics(model, processor, data) -> dict[str, float]``
      Metrics that need the model and the task's data (shapes: pointing games). Default: none.
  ``VOCABULARY: list[str]``
      Whole words for the built-in tokenizer of a model trained on this task. Default: none.
  ``TRAINED_ON: str`` and ``CANNOT_KNOW: str``
      One sentence each for the card of a model trained on this task (:mod:`mklvisita.cards`): what it has seen,
      and what it cannot know whatever the input. Default: "" (the card names the data spec).

- **The tasks sit below evaluation**: :class:`EvalData`, :class:`PairOptions`, :class:`TaskError` and
  :func:`caption_positives` are defined in :mod:`mklvisita.tasks.base` (re-exported here), and the tasks' metrics
  come from :mod:`mklvisita.pointing`; :mod:`mklvisita.evaluation` imports the tasks, never the other way.
- **Dense extras of a batch** (``patch_labels``, ``word_targets``) are the task's too: ``dense_targets(items,
  processor, length, grid)`` when the task has it (shapes).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .base import EvalData, PairOptions, TaskError, caption_positives

__all__ = ["EvalData", "PairOptions", "Task", "TaskError", "TrainCollate", "caption_positives", "get_task", "scheme"]

# scheme -> module under mklvisita.tasks
SCHEMES: dict[str, str] = {
    "shapes": "shapes",
    "shapes-compositional": "shapes",
    "karpathy": "karpathy",
    "lavis": "karpathy",
    "hf": "karpathy",
    "tuxpaint": "tuxpaint",
    "tuxpaint-relations": "tuxpaint_relations",
    "composites": "composites",
}
SPEC_FORMS = (
    "shapes, shapes-compositional, karpathy:<json>:<image root>, lavis:<json>:<image root>, hf:<dataset id>, "
    "tuxpaint[:<stamps folder>], tuxpaint-relations[:<stamps folder>], composites"
)


def scheme(spec: str) -> str:
    """The task scheme of a data spec (``karpathy:/a.json:/imgs`` -> ``karpathy``)."""
    return str(spec).partition(":")[0]


@dataclass(frozen=True)
class Task:
    """A task module seen through the interface of the module docstring (defaults filled in)."""

    name: str  # the module name: shapes | karpathy | tuxpaint
    module: ModuleType

    def _fn(self, name: str) -> Callable[..., Any] | None:
        return getattr(self.module, name, None)

    def train_pairs(self, spec: str, split: str, options: PairOptions | None = None) -> torch.utils.data.Dataset:
        fn = self._fn("train_pairs")
        if fn is None:
            raise TaskError(f"data spec {spec!r}: the {self.name} task is for evaluation only; train on another spec")
        return fn(spec, split, options or PairOptions())

    def positives(self, items: list[dict[str, Any]]) -> torch.Tensor:
        fn = self._fn("positives") or caption_positives
        return fn(items)

    def load_eval_data(self, spec: str, split: str = "test", limit: int = 0) -> Any:
        return self.module.load_eval_data(spec, split, limit)

    def extra_metrics(self, model: Any, processor: Any, data: Any) -> dict[str, float]:
        fn = self._fn("extra_metrics")
        return {} if fn is None else fn(model, processor, data)

    @property
    def vocabulary(self) -> list[str]:
        return list(getattr(self.module, "VOCABULARY", []))

    @property
    def trained_on(self) -> str:
        """What a model trained on this task has seen, for its card ("" when the task does not say)."""
        return str(getattr(self.module, "TRAINED_ON", ""))

    @property
    def cannot_know(self) -> str:
        """What a model trained only on this task cannot know, for its card ("" when the task does not say)."""
        return str(getattr(self.module, "CANNOT_KNOW", ""))

    def dense_targets(
        self, items: list[dict[str, Any]], processor: Any, length: int, grid: tuple[int, int]
    ) -> dict[str, torch.Tensor] | None:
        fn = self._fn("dense_targets")
        return None if fn is None else fn(items, processor, length, grid)


def get_task(spec: str) -> Task:
    """The task of a data spec (the one place a spec is dispatched on)."""
    name = SCHEMES.get(scheme(spec))
    if name is None:
        raise TaskError(f"unknown data spec {spec!r}; accepted forms: {SPEC_FORMS}")
    return Task(name, importlib.import_module(f"{__name__}.{name}"))


def pixel_values_uint8(arrays: list[np.ndarray], processor: Any) -> torch.Tensor | None:
    """(B, 3, S, S) model input from uint8 (S, S, 3) arrays already at the model's size (cached scenes), or None
    when any array is not: then the caller goes through ``processor.images`` (the letterbox would be the identity)."""
    size = processor.config.vision.image_size
    if not all(isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (size, size, 3) for a in arrays):
        return None
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
    v = processor.config.vision
    mean, std = torch.tensor(v.mean).view(1, 3, 1, 1), torch.tensor(v.std).view(1, 3, 1, 1)
    return (x - mean) / std


class TrainCollate:
    """Items -> model inputs: pixels and tokens through the shared Processor, ``image_ids``, the task's ``positives``
    (B, B), the hard negatives' tokens when every item has one, and the task's dense targets when asked for."""

    def __init__(
        self, processor: Any, task: Task, hard_negatives: bool, dense: bool = False, grid: tuple[int, int] | None = None
    ):
        self.processor, self.task, self.hard_negatives = processor, task, hard_negatives
        self.dense, self.grid = dense, grid

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [it["image"] for it in items]
        pixel_values = pixel_values_uint8(images, self.processor)
        if pixel_values is None:
            pixel_values, _ = self.processor.images(images)  # (B, 3, S, S)
        batch = {"pixel_values": pixel_values, **self.processor.captions([it["caption"] for it in items])}
        batch["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
        batch["positives"] = self.task.positives(items)
        if self.hard_negatives and all(it["negative"] is not None for it in items):
            neg = self.processor.captions([it["negative"] for it in items])
            batch["neg_input_ids"], batch["neg_attention_mask"] = neg["input_ids"], neg["attention_mask"]
        if self.dense and self.grid is not None:
            extra = self.task.dense_targets(items, self.processor, batch["input_ids"].shape[1], self.grid)
            if extra is not None:
                batch.update(extra)
        return batch
