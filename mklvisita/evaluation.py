"""Evaluation as library code: the trainer, ``python -m training.evaluate`` and anyone else call the same functions.

The protocol (DESIGN.md): two-stage retrieval from :mod:`mklvisita.retrieval` (similarity over cached embeddings
ranks everything, the ITM head re-scores the top k, final = itm_weight x ITM + similarity), then
:func:`mklvisita.metrics.retrieval_metrics` (R@1/5/10 both ways, RSUM, r_mean, median/mean rank, mAP). With the
fusion branch enabled, ITM precision/recall/F1 at 0.5 on positive and hard-negative pairs. A 5,000-image set (COCO
5K test) also gets the 5-fold 1K numbers, prefixed ``1k_``. Shapes adds ``binding_acc``: the fraction of captions
whose final pairwise score with their own image beats their hard negative's (ties count as misses), and
``pointing_acc`` through :data:`EXTRA_METRICS`.

Data specs for :func:`load_eval_data`: ``shapes`` (held-out shapes test split: 1,000 scenes x 5 captions),
``shapes-compositional`` (the held-out colour-shape pairs), ``karpathy:<json>:<image root>``,
``lavis:<json>:<image root>``, ``hf:<dataset id>``.

``extra_metrics`` is the hook for metrics that need the model and the data: each callable gets
``(model, processor, data)`` and returns a dict merged into the result.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .explain import shapes_pointing_metric
from .metrics import coco_5fold_1k, itm_prf, pairwise_accuracy, retrieval_metrics

SHAPES_TEST_SIZE = 1000
ExtraMetric = Callable[[Any, Any, "EvalData"], dict[str, float]]
# Registered by other parts of the project (e.g. explanations: pointing_acc on shapes); name -> callable.
# pointing: pointing_acc (Grad-CAM) + pointing_acc_<method> and pointing_chance on shapes; {} on other data.
EXTRA_METRICS: dict[str, ExtraMetric] = {"pointing": shapes_pointing_metric}


def _tuxpaint_pointing(model: Any, processor: Any, data: EvalData) -> dict[str, float]:
    from .tasks.tuxpaint import pointing_metric  # composites of 2-3 photo stamps; {} on other data

    return pointing_metric(model, processor, data)


EXTRA_METRICS["tuxpaint_pointing"] = _tuxpaint_pointing


@dataclass
class EvalData:
    """What one evaluation needs: images, captions, ground truth and (shapes) one hard negative per caption."""

    name: str
    split: str
    images: Sequence  # PIL images or paths, possibly lazy
    captions: list[str]
    txt2img: np.ndarray  # (n_captions,) image index of each caption
    negatives: list[str] | None = None  # shapes: the hard negative of each caption
    source: Any = field(default=None, repr=False)  # the underlying RetrievalSet / ShapesScenes, for extra metrics

    @property
    def is_shapes(self) -> bool:
        return self.name.startswith("shapes")


def load_eval_data(spec: str, split: str = "test", limit: int = 0) -> EvalData:
    """Resolve a data spec; ``limit`` > 0 keeps the first ``limit`` images and all their captions."""
    from .data import ShapesScenes, load_retrieval_set, shapes_retrieval_set

    if spec in ("shapes", "shapes-compositional"):
        if spec == "shapes-compositional":
            split = "test_compositional"
        size = limit if limit > 0 else SHAPES_TEST_SIZE
        rset = shapes_retrieval_set(split=split, size=size)
        scenes = ShapesScenes(split=split, size=size)
        negatives = [n.text() for i in range(size) for n in scenes.scene(i).negative_claims]
        if len(negatives) != len(rset.captions):
            raise RuntimeError(f"shapes {split}: {len(negatives)} negatives for {len(rset.captions)} captions")
        return EvalData(spec, split, rset.images, list(rset.captions), rset.txt2img, negatives, scenes)
    if spec == "tuxpaint" or spec.startswith("tuxpaint:"):  # Tux Paint photo stamps: split test | tune | all
        from .tasks import tuxpaint

        return tuxpaint.load_eval_data(spec, split, limit)
    rset = load_retrieval_set(spec, split=split)
    if limit > 0 and limit < len(rset):
        rset = rset.subset(range(limit))
    return EvalData(spec, split, rset.images, list(rset.captions), rset.txt2img, None, rset)


@torch.no_grad()
def pair_scores(
    model: Any, images: Any, texts: Any, image_index: np.ndarray, text_index: np.ndarray, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray | None]:
    """Similarity and ITM probability of the pairs (image_index[j], text_index[j]) from cached banks.

    Args:
        images, texts: an ``ImageBank`` / ``TextBank`` from :mod:`mklvisita.retrieval`.

    Returns:
        similarity (n,) and ITM probability (n,) (None for a model without the fusion branch).
    """
    from .retrieval import match_pairs

    ii = torch.as_tensor(np.asarray(image_index), dtype=torch.long)
    tt = torch.as_tensor(np.asarray(text_index), dtype=torch.long)
    device = next(model.parameters()).device
    sims = []
    for start in range(0, len(ii), batch_size):
        i, t = ii[start : start + batch_size].to(device), tt[start : start + batch_size].to(device)
        s = model.similarity(images.embeddings.select(i), texts.embeddings.select(t), pairwise=True)
        sims.append(s.similarity.float().cpu())
    sim = torch.cat(sims).numpy() if sims else np.zeros(0)
    if not model.has_itm:
        return sim, None
    return sim, match_pairs(model, images, texts, ii, tt, batch_size).numpy()


@torch.no_grad()
def evaluate_model(
    model: Any,
    processor: Any,
    data: EvalData,
    k: int = 128,
    itm_weight: float = 1.0,
    batch_size: int = 64,
    extra_metrics: dict[str, ExtraMetric] | None = None,
) -> dict[str, float]:
    """Two-stage retrieval + the full protocol on ``data``; the trainer and the CLI both call this.

    Args:
        model: an MKLVisITA model (eval mode is set here and restored afterwards).
        processor: the model's :class:`mklvisita.inputs.Processor`.
        data: from :func:`load_eval_data`.
        k: re-rank the top k by ITM (0 = similarity only; forced to 0 for a model without fusion).
        itm_weight: final score = itm_weight * ITM + similarity (re-ranking and binding_acc).
        batch_size: encoding batch size.
        extra_metrics: name -> ``fn(model, processor, data) -> dict``; defaults to :data:`EXTRA_METRICS`.

    Returns:
        flat dict of floats (see the module docstring for the keys).
    """
    from .retrieval import encode_captions, encode_images, two_stage_scores

    was_training = model.training
    model.eval()
    fusion = model.has_itm
    t0 = time.perf_counter()
    image_bank = encode_images(model, processor, data.images, batch_size=batch_size)
    text_bank = encode_captions(model, processor, data.captions, batch_size=batch_size)
    scores = two_stage_scores(model, image_bank, text_bank, k=k if fusion else 0, itm_weight=itm_weight)
    metrics = retrieval_metrics(scores.i2t, data.txt2img, scores.t2i)
    if len(data.images) == 5000:  # COCO 5K test: also the 5-fold 1K protocol
        metrics |= {f"1k_{key}": v for key, v in coco_5fold_1k(scores.i2t, data.txt2img, scores.t2i).items()}

    caption_image = np.asarray(data.txt2img)
    captions = np.arange(len(caption_image))
    if data.negatives is not None:
        # Shapes: each caption against its own hard negative, both paired with the caption's image.
        neg_bank = encode_captions(model, processor, data.negatives, batch_size=batch_size)
        pos_sim, pos_itm = pair_scores(model, image_bank, text_bank, caption_image, captions)
        neg_sim, neg_itm = pair_scores(model, image_bank, neg_bank, caption_image, captions)
        pos, neg = pos_sim, neg_sim
        if fusion:
            pos, neg = itm_weight * pos_itm + pos_sim, itm_weight * neg_itm + neg_sim
            metrics |= itm_prf(np.concatenate([pos_itm, neg_itm]), np.r_[np.ones(len(pos)), np.zeros(len(neg))])
        metrics["binding_acc"] = pairwise_accuracy(pos, neg)
    elif fusion:
        # Real sets: each caption with its image, and with the wrong image the similarity ranks highest.
        sim_t2i = np.array(scores.similarity, dtype=np.float64).T  # (n_txt, n_img)
        sim_t2i[captions, caption_image] = -np.inf
        hardest = sim_t2i.argmax(axis=1)
        _, pos_itm = pair_scores(model, image_bank, text_bank, caption_image, captions)
        _, neg_itm = pair_scores(model, image_bank, text_bank, hardest, captions)
        metrics |= itm_prf(np.concatenate([pos_itm, neg_itm]), np.r_[np.ones(len(pos_itm)), np.zeros(len(neg_itm))])

    for name, fn in (EXTRA_METRICS if extra_metrics is None else extra_metrics).items():
        try:
            metrics |= {key: float(v) for key, v in fn(model, processor, data).items()}
        except Exception as e:  # an optional metric must not lose the retrieval numbers
            print(f"warning: extra metric {name!r} failed: {e}", file=sys.stderr)
    metrics |= {f"time_{key}_s": float(v) for key, v in getattr(scores, "timings", {}).items()}
    metrics["time_total_s"] = time.perf_counter() - t0
    model.train(was_training)
    return metrics
