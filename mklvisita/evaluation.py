"""Evaluation as library code: the trainer, ``python -m training.evaluate`` and anyone else call the same functions.

The protocol (docs/results.md): two-stage retrieval from :mod:`mklvisita.retrieval` (similarity over cached embeddings
ranks everything, the ITM head re-scores the top k, final score by the checkpoint's ranking rule,
:mod:`mklvisita.ranking`), then
:func:`mklvisita.metrics.retrieval_metrics` (R@1/5/10 both ways, RSUM, r_mean, median/mean rank, mAP). With the
fusion branch enabled, ITM precision/recall/F1 at 0.5 on positive and hard-negative pairs. A 5,000-image set (COCO
5K test) also gets the 5-fold 1K numbers, prefixed ``1k_``.

Data with hard negatives (shapes) adds binding: each caption's score with its own image against its hard negative's
(ties count as misses), for three scores, overall and per negative kind (shapes: ``swap`` attributes swapped between
objects, ``reverse`` relation reversed, ``change`` one attribute changed, ``count`` the count changed):

- ``binding_acc`` / ``binding_acc_<kind>``: the final score (:func:`mklvisita.ranking.final_score`), the headline;
- ``binding_acc_itm`` / ``binding_acc_<kind>_itm``: the ITM probability alone (fusion models only);
- ``binding_acc_sim`` / ``binding_acc_<kind>_sim``: the multi-kernel similarity S alone;
- ``binding_n_<kind>``: the number of captions of that kind.

Data specs resolve through :func:`mklvisita.tasks.get_task` (``shapes``, ``shapes-compositional``,
``karpathy:<json>:<image root>``, ``lavis:<json>:<image root>``, ``hf:<dataset id>``, ``tuxpaint[:<folder>]``); the
task adds its own metrics (shapes: ``pointing_acc`` and ``word_pointing_acc`` with their chance levels, see
:mod:`mklvisita.tasks.shapes`, computed by :mod:`mklvisita.pointing`). ``EXTRA_METRICS`` remains a hook for metrics
from elsewhere: each callable gets ``(model, processor, data)`` and returns a dict merged into the result.

Decisions: the tasks sit below this module (it imports :mod:`mklvisita.tasks`; no task imports it), and every final
score goes through :func:`mklvisita.ranking.final_score` with the ranking resolved once per evaluation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .metrics import binding_metrics, coco_5fold_1k, itm_prf, retrieval_metrics
from .ranking import resolve_ranking
from .retrieval import NegativeScores, encode_captions, encode_images, negative_scores, pair_scores, retrieve
from .tasks import EvalData, get_task

__all__ = [
    "EXTRA_METRICS",
    "EvalData",
    "NegativeScores",
    "binding_metrics",
    "evaluate_model",
    "load_eval_data",
    "negative_scores",
    "pair_scores",
]

ExtraMetric = Callable[[Any, Any, "EvalData"], dict[str, float]]
# Metrics registered from outside the tasks; name -> callable (the task's own metrics need no registration).
EXTRA_METRICS: dict[str, ExtraMetric] = {}


def load_eval_data(spec: str, split: str = "test", limit: int = 0) -> EvalData:
    """Resolve a data spec through its task; ``limit`` > 0 keeps the first ``limit`` images and their captions."""
    return get_task(spec).load_eval_data(spec, split, limit)


@torch.no_grad()
def evaluate_model(
    model: Any,
    processor: Any,
    data: EvalData,
    k: int | None = None,
    itm_weight: float | None = None,
    batch_size: int = 64,
    extra_metrics: dict[str, ExtraMetric] | None = None,
    candidates: int | None = None,
    similarity_weight: float | None = None,
) -> dict[str, float]:
    """Two-stage retrieval + the full protocol on ``data``; the trainer and the CLI both call this.

    Args:
        model: an MKLVisITA model (eval mode is set here and restored afterwards).
        processor: the model's :class:`mklvisita.inputs.Processor`.
        data: from :func:`load_eval_data`.
        k: re-rank the top k by ITM (0 = similarity only; forced to 0 for a model without fusion); None = the
            model's ``config.ranking.k``.
        itm_weight: the ITM weight of the final score (re-ranking and binding_acc); None = the model's
            ``config.ranking.itm_weight``.
        candidates: cascade stage 1 keeps this many per query (0 = exhaustive S); None = the model's ranking.
        similarity_weight: the S weight of the final score; None = the model's ``config.ranking.similarity_weight``.
        batch_size: encoding batch size.
        extra_metrics: name -> ``fn(model, processor, data) -> dict``; defaults to the task's own metrics plus
            :data:`EXTRA_METRICS`.

    Returns:
        flat dict of floats (see the module docstring for the keys).
    """
    was_training = model.training
    model.eval()
    fusion = model.has_itm
    t0 = time.perf_counter()
    image_bank = encode_images(model, processor, data.images, batch_size=batch_size)
    text_bank = encode_captions(model, processor, data.captions, batch_size=batch_size)
    ranking = resolve_ranking(
        model, k=k, itm_weight=itm_weight, candidates=candidates, similarity_weight=similarity_weight
    )
    t_retrieval = time.perf_counter()
    scores = retrieve(model, image_bank, text_bank, ranking)
    metrics_time = {"time_retrieval_s": time.perf_counter() - t_retrieval}  # the stages, not the encoding
    metrics_time |= {f"pairs_{stage}": float(n) for stage, n in scores.pairs.items()}
    metrics = retrieval_metrics(scores.i2t, data.txt2img, scores.t2i)
    if len(data.images) == 5000:  # COCO 5K test: also the 5-fold 1K protocol
        metrics |= {f"1k_{key}": v for key, v in coco_5fold_1k(scores.i2t, data.txt2img, scores.t2i).items()}

    caption_image = np.asarray(data.txt2img)
    captions = np.arange(len(caption_image))
    if data.negatives is not None:
        # Shapes: each caption against its own hard negative, both paired with the caption's image.
        neg_bank = encode_captions(model, processor, data.negatives, batch_size=batch_size)
        ns = negative_scores(model, image_bank, text_bank, neg_bank, caption_image, ranking)
        kinds = data.negative_kinds
        if ns.pos_itm is not None and ns.neg_itm is not None:
            labels = np.r_[np.ones(len(ns.pos)), np.zeros(len(ns.neg))]
            metrics |= itm_prf(np.concatenate([ns.pos_itm, ns.neg_itm]), labels)
            metrics |= binding_metrics(ns.pos_itm, ns.neg_itm, kinds, "_itm")
        metrics |= binding_metrics(ns.pos, ns.neg, kinds) | binding_metrics(ns.pos_sim, ns.neg_sim, kinds, "_sim")
    elif fusion:
        # Real sets: each caption with its image, and with the wrong image the similarity ranks highest.
        sim_t2i = np.array(scores.similarity, dtype=np.float64).T  # (n_txt, n_img)
        sim_t2i[captions, caption_image] = -np.inf
        hardest = sim_t2i.argmax(axis=1)
        _, pos_itm = pair_scores(model, image_bank, text_bank, caption_image, captions)
        _, neg_itm = pair_scores(model, image_bank, text_bank, hardest, captions)
        metrics |= itm_prf(np.concatenate([pos_itm, neg_itm]), np.r_[np.ones(len(pos_itm)), np.zeros(len(neg_itm))])

    if extra_metrics is None:
        extra_metrics = {"task": get_task(data.name).extra_metrics, **EXTRA_METRICS}
    for name, fn in extra_metrics.items():
        t_extra = time.perf_counter()
        try:
            metrics |= {key: float(v) for key, v in fn(model, processor, data).items()}
            metrics[f"time_{name}_metrics_s"] = time.perf_counter() - t_extra
        except Exception as e:  # an optional metric must not lose the retrieval numbers
            print(f"warning: extra metric {name!r} failed: {e}", file=sys.stderr)
    metrics |= {f"time_{key}_s": float(v) for key, v in getattr(scores, "timings", {}).items()} | metrics_time
    metrics["time_total_s"] = time.perf_counter() - t0
    model.train(was_training)
    return metrics
