"""Retrieval and matching metrics (numpy only).

The protocol is ALBEF/BLIP's (``itm_eval``): a score matrix over all images x all captions,
``txt2img[j]`` = the index of caption j's image (an image usually has several captions, a caption exactly one
image).

- **i2t** (image query, caption gallery): the rank of the *best-ranked* ground-truth caption.
- **t2i** (caption query, image gallery): the rank of the one ground-truth image.

**Ties are pessimistic.** A gallery item that scores *equal to* the ground truth is ranked above it, so
rank = number of wrong items with score >= the ground truth's score (0 = first). ``np.argsort`` would instead
break ties by position, which rewards a model that scores everything the same (a constant model would get
R@1 = 100 on the first query of every block). Ties *between* ground-truth items do not matter.

Ranks are 0-based internally; reported median/mean ranks are 1-based (1 = perfect), as in the literature.
Recall@K and mAP are in percent; ITM precision/recall/F1 and accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Rows compared at once: bounds the (rows, gallery) boolean temporaries on COCO 5K (5,000 x 25,010).
_CHUNK = 512


def _check(sim: np.ndarray, txt2img: np.ndarray, every_image_captioned: bool = True) -> tuple[np.ndarray, np.ndarray]:
    sim = np.asarray(sim, dtype=np.float64)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (n_images, n_texts), got shape {sim.shape}")
    n_img, n_txt = sim.shape
    if txt2img.shape != (n_txt,):
        raise ValueError(f"txt2img must have one entry per text ({n_txt}), got shape {txt2img.shape}")
    if n_txt and (txt2img.min() < 0 or txt2img.max() >= n_img):
        raise ValueError(f"txt2img holds image indices outside [0, {n_img}): min {txt2img.min()}, max {txt2img.max()}")
    if np.isnan(sim).any():
        raise ValueError(f"scores contain {int(np.isnan(sim).sum())} NaN values; the model produced invalid scores")
    missing = np.setdiff1d(np.arange(n_img), txt2img)
    # An image query with no ground truth has no rank; as a t2i distractor it is fine.
    if every_image_captioned and missing.size:
        raise ValueError(f"{missing.size} images have no caption (first: image {missing[0]}); drop them before scoring")
    return sim, txt2img


def _t2i_scores(sim: np.ndarray, t2i: np.ndarray | None) -> np.ndarray:
    """Scores for caption queries (n_texts, n_images): ``sim.T`` unless re-ranked separately."""
    if t2i is None:
        return sim.T
    t2i = np.asarray(t2i, dtype=np.float64)
    if t2i.shape != sim.shape[::-1]:
        raise ValueError(f"t2i scores must have shape {sim.shape[::-1]} (n_texts, n_images), got {t2i.shape}")
    if np.isnan(t2i).any():
        raise ValueError(f"t2i scores contain {int(np.isnan(t2i).sum())} NaN values")
    return t2i


def i2t_ranks(sim: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
    """0-based rank of each image's best-ranked ground-truth caption, ties pessimistic.

    Args:
        sim: (n_images, n_texts) scores, higher = better match.
        txt2img: (n_texts,) image index of each caption.

    Returns:
        (n_images,) int array.
    """
    sim, txt2img = _check(sim, txt2img)
    ranks = np.empty(sim.shape[0], dtype=np.int64)
    for start in range(0, sim.shape[0], _CHUNK):
        rows = sim[start : start + _CHUNK]  # (R, n_txt)
        gt = txt2img[None, :] == np.arange(start, start + rows.shape[0])[:, None]  # (R, n_txt)
        best = np.where(gt, rows, -np.inf).max(axis=1)  # (R,)
        ranks[start : start + rows.shape[0]] = ((rows >= best[:, None]) & ~gt).sum(axis=1)
    return ranks


def t2i_ranks(sim: np.ndarray, txt2img: np.ndarray, t2i: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each caption's ground-truth image, ties pessimistic.

    Args:
        sim: (n_images, n_texts) scores.
        txt2img: (n_texts,) image index of each caption.
        t2i: optional (n_texts, n_images) scores for caption queries (two-stage re-ranking differs per
            direction); defaults to ``sim.T``.

    Returns:
        (n_texts,) int array.
    """
    sim, txt2img = _check(sim, txt2img, every_image_captioned=False)
    scores = _t2i_scores(sim, t2i)
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], _CHUNK):
        rows = scores[start : start + _CHUNK]  # (R, n_img)
        idx = txt2img[start : start + rows.shape[0]]
        gt_score = rows[np.arange(rows.shape[0]), idx]  # (R,)
        # Every image except the ground truth with score >= it counts; the ground truth itself always satisfies >=.
        ranks[start : start + rows.shape[0]] = (rows >= gt_score[:, None]).sum(axis=1) - 1
    return ranks


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    return {f"{prefix}_r{k}": float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10)}


def recall_at_k(sim: np.ndarray, txt2img: np.ndarray, t2i: np.ndarray | None = None) -> dict[str, float]:
    """Recall@1/5/10 both ways and RSUM, in percent.

    Args:
        sim: (n_images, n_texts) scores for image queries (and, transposed, for caption queries).
        txt2img: (n_texts,) image index of each caption.
        t2i: optional (n_texts, n_images) scores for caption queries when they differ from ``sim.T``.

    Returns:
        dict with i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 rsum.
    """
    out = _recalls(i2t_ranks(sim, txt2img), "i2t") | _recalls(t2i_ranks(sim, txt2img, t2i), "t2i")
    out["rsum"] = float(sum(out.values()))
    return out


def _average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of one query; ties pessimistic (wrong items sort before relevant ones of equal score)."""
    order = np.lexsort((relevant, -scores))  # primary: score descending; ties: wrong (False) first
    hits = relevant[order]
    positions = np.flatnonzero(hits) + 1  # 1-based positions of the relevant items
    return float(np.mean(np.arange(1, positions.size + 1) / positions))


def mean_average_precision(sim: np.ndarray, txt2img: np.ndarray, t2i: np.ndarray | None = None) -> dict[str, float]:
    """mAP over each query's ground-truth set (all of an image's captions; a caption's one image), in percent."""
    sim, txt2img = _check(sim, txt2img)
    scores_t2i = _t2i_scores(sim, t2i)
    n_img = sim.shape[0]
    ap_i2t = [_average_precision(sim[i], txt2img == i) for i in range(n_img)]
    ap_t2i = [_average_precision(scores_t2i[j], np.arange(n_img) == txt2img[j]) for j in range(len(txt2img))]
    return {"i2t_map": float(100.0 * np.mean(ap_i2t)), "t2i_map": float(100.0 * np.mean(ap_t2i))}


def retrieval_metrics(sim: np.ndarray, txt2img: np.ndarray, t2i: np.ndarray | None = None) -> dict[str, float]:
    """The full protocol: :func:`recall_at_k` plus r_mean, median/mean rank (1-based) and mAP per direction.

    Args:
        sim: (n_images, n_texts) scores for image queries.
        txt2img: (n_texts,) image index of each caption.
        t2i: optional (n_texts, n_images) scores for caption queries.
    """
    ri, rt = i2t_ranks(sim, txt2img), t2i_ranks(sim, txt2img, t2i)
    out = _recalls(ri, "i2t") | _recalls(rt, "t2i")
    out["rsum"] = float(sum(out.values()))
    out["r_mean"] = out["rsum"] / 6.0
    out["i2t_medr"] = float(np.median(ri + 1))
    out["i2t_meanr"] = float(np.mean(ri + 1))
    out["t2i_medr"] = float(np.median(rt + 1))
    out["t2i_meanr"] = float(np.mean(rt + 1))
    out |= mean_average_precision(sim, txt2img, t2i)
    return out


def coco_5fold_1k(
    sim: np.ndarray, txt2img: np.ndarray, t2i: np.ndarray | None = None, fold_size: int = 1000, folds: int = 5
) -> dict[str, float]:
    """COCO 1K protocol: the metrics of :func:`retrieval_metrics` averaged over 5 folds of 1,000 images each.

    Fold f holds images ``[f * fold_size, (f + 1) * fold_size)`` and every caption of those images; scores
    across folds are ignored (each fold is ranked on its own, as in the Karpathy 1K evaluation).
    """
    sim, txt2img = _check(sim, txt2img)
    scores_t2i = _t2i_scores(sim, t2i)
    if sim.shape[0] < fold_size * folds:
        raise ValueError(f"{folds} folds of {fold_size} images need {fold_size * folds} images, got {sim.shape[0]}")
    per_fold = []
    for f in range(folds):
        img = np.arange(f * fold_size, (f + 1) * fold_size)
        txt = np.flatnonzero((txt2img >= img[0]) & (txt2img <= img[-1]))
        per_fold.append(retrieval_metrics(sim[np.ix_(img, txt)], txt2img[txt] - img[0], scores_t2i[np.ix_(txt, img)]))
    return {k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}


def itm_prf(prob: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of ITM match probabilities (predicted match: ``prob >= threshold``).

    Args:
        prob: (n,) match probabilities.
        labels: (n,) 1 for a matching pair, 0 for a non-matching (e.g. hard-negative) pair.
        threshold: decision threshold; 0.5 in the paper's protocol.

    Returns:
        dict itm_precision itm_recall itm_f1 itm_acc, fractions in [0, 1]; precision is 0 when nothing is
        predicted positive, recall 0 when there are no positives.
    """
    prob = np.asarray(prob, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if prob.shape != labels.shape:
        raise ValueError(f"prob and labels must have the same length, got {prob.shape[0]} and {labels.shape[0]}")
    pred = prob >= threshold
    tp = float(np.sum(pred & labels))
    precision = tp / pred.sum() if pred.sum() else 0.0
    recall = tp / labels.sum() if labels.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = float(np.mean(pred == labels)) if labels.size else 0.0
    return {"itm_precision": float(precision), "itm_recall": float(recall), "itm_f1": float(f1), "itm_acc": acc}


def pairwise_accuracy(pos: np.ndarray, neg: np.ndarray) -> float:
    """Fraction of pairs where ``pos > neg`` strictly (a tie is a miss); e.g. ``binding_acc``."""
    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    if pos.shape != neg.shape:
        raise ValueError(f"pos and neg must have the same length, got {pos.shape[0]} and {neg.shape[0]}")
    return float(np.mean(pos > neg)) if pos.size else 0.0


def binding_metrics(
    pos: np.ndarray, neg: np.ndarray, kinds: Sequence[str] | None = None, suffix: str = ""
) -> dict[str, float]:
    """``binding_acc<suffix>`` and, per kind, ``binding_acc_<kind><suffix>``: the share of captions whose score
    (pos) beats their hard negative's (neg); ties are misses. With no suffix also ``binding_n_<kind>``."""
    out = {f"binding_acc{suffix}": pairwise_accuracy(pos, neg)}
    if kinds is not None:
        kinds = np.asarray(kinds)
        for kind in sorted(set(kinds.tolist())):
            sel = kinds == kind
            out[f"binding_acc_{kind}{suffix}"] = pairwise_accuracy(pos[sel], neg[sel])
            if not suffix:
                out[f"binding_n_{kind}"] = float(sel.sum())
    return out
