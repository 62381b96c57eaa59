"""Metrics against brute-force counts on small matrices with several captions per image and deliberate ties."""

from __future__ import annotations

import numpy as np
import pytest

from mklvisita.metrics import (
    coco_5fold_1k,
    i2t_ranks,
    itm_prf,
    mean_average_precision,
    pairwise_accuracy,
    recall_at_k,
    retrieval_metrics,
    t2i_ranks,
)


def _random_problem(seed: int, n_img: int = 12, levels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Scores drawn from a few integer levels (many ties); 1-3 captions per image, captions shuffled."""
    rng = np.random.default_rng(seed)
    txt2img = np.concatenate([np.full(rng.integers(1, 4), i) for i in range(n_img)])
    txt2img = rng.permutation(txt2img)
    sim = rng.integers(0, levels, size=(n_img, txt2img.size)).astype(np.float32)
    # Lift ground-truth pairs a little on average so recalls are not all near zero.
    sim[txt2img, np.arange(txt2img.size)] += rng.integers(0, 2, size=txt2img.size)
    return sim, txt2img


def _brute_i2t(sim: np.ndarray, txt2img: np.ndarray) -> list[int]:
    ranks = []
    for i in range(sim.shape[0]):
        best = None
        for j in range(sim.shape[1]):
            if txt2img[j] != i:
                continue
            # Pessimistic: every wrong caption scoring >= this ground truth sits above it.
            r = sum(1 for c in range(sim.shape[1]) if txt2img[c] != i and sim[i, c] >= sim[i, j])
            best = r if best is None else min(best, r)
        ranks.append(best)
    return ranks


def _brute_t2i(scores: np.ndarray, txt2img: np.ndarray) -> list[int]:
    return [
        sum(1 for i in range(scores.shape[1]) if i != txt2img[j] and scores[j, i] >= scores[j, txt2img[j]])
        for j in range(scores.shape[0])
    ]


def _brute_ap(scores: np.ndarray, relevant: list[bool]) -> float:
    rel = sorted((s for s, r in zip(scores, relevant) if r), reverse=True)
    total = 0.0
    for k, s in enumerate(rel, start=1):
        pos = k + sum(1 for s2, r in zip(scores, relevant) if not r and s2 >= s)
        total += k / pos
    return total / len(rel)


def _brute_recalls(ri: list[int], rt: list[int]) -> dict[str, float]:
    out = {}
    for name, ranks in (("i2t", ri), ("t2i", rt)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


@pytest.mark.parametrize("seed", range(6))
def test_recall_at_k_matches_brute_force(seed: int) -> None:
    sim, txt2img = _random_problem(seed)
    ri, rt = _brute_i2t(sim, txt2img), _brute_t2i(sim.T, txt2img)
    assert i2t_ranks(sim, txt2img).tolist() == ri
    assert t2i_ranks(sim, txt2img).tolist() == rt
    got, want = recall_at_k(sim, txt2img), _brute_recalls(ri, rt)
    assert list(got) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_metrics_match_brute_force(seed: int) -> None:
    sim, txt2img = _random_problem(seed, n_img=9)
    t2i = np.random.default_rng(100 + seed).integers(0, 3, size=sim.T.shape).astype(float)  # re-ranked separately
    ri, rt = _brute_i2t(sim, txt2img), _brute_t2i(t2i, txt2img)
    got = retrieval_metrics(sim, txt2img, t2i)
    want = _brute_recalls(ri, rt)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    assert got["r_mean"] == pytest.approx(want["rsum"] / 6)
    assert got["i2t_medr"] == pytest.approx(np.median(np.array(ri) + 1))
    assert got["t2i_meanr"] == pytest.approx(np.mean(np.array(rt) + 1))
    ap_i2t = [_brute_ap(sim[i], [t == i for t in txt2img]) for i in range(sim.shape[0])]
    ap_t2i = [_brute_ap(t2i[j], [i == txt2img[j] for i in range(sim.shape[0])]) for j in range(len(txt2img))]
    assert got["i2t_map"] == pytest.approx(100 * np.mean(ap_i2t))
    assert got["t2i_map"] == pytest.approx(100 * np.mean(ap_t2i))


def test_ties_are_pessimistic() -> None:
    # A constant scorer must not look good: every tie with a wrong item counts against the ground truth.
    sim = np.zeros((3, 6))
    txt2img = np.array([0, 0, 1, 1, 2, 2])
    assert i2t_ranks(sim, txt2img).tolist() == [4, 4, 4]
    assert t2i_ranks(sim, txt2img).tolist() == [2] * 6
    assert recall_at_k(sim, txt2img)["rsum"] == pytest.approx(6 * 0.0 + 100 * 4)  # R@5/R@10 hit, R@1 never
    # Ties among ground-truth captions do not hurt; one wrong caption tied with the best one does.
    sim = np.array([[5.0, 5.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    txt2img = np.array([0, 0, 1, 1])
    assert i2t_ranks(sim, txt2img).tolist() == [0, 0]
    sim[0, 2] = 5.0
    assert i2t_ranks(sim, txt2img).tolist() == [1, 0]
    assert mean_average_precision(sim, txt2img)["i2t_map"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1) / 2)


def test_perfect_and_reversed_scores() -> None:
    txt2img = np.repeat(np.arange(4), 5)
    perfect = (txt2img[None, :] == np.arange(4)[:, None]).astype(float)
    m = retrieval_metrics(perfect, txt2img)
    assert m["rsum"] == 600 and m["i2t_map"] == 100 and m["t2i_medr"] == 1
    m = retrieval_metrics(-perfect, txt2img)
    assert m["i2t_r1"] == 0 and m["t2i_r1"] == 0 and m["i2t_medr"] == 16 and m["t2i_medr"] == 4


def test_coco_5fold_1k_averages_independent_folds() -> None:
    fold, folds = 4, 5
    rng = np.random.default_rng(0)
    txt2img = np.repeat(np.arange(fold * folds), 2)
    sim = rng.integers(0, 4, size=(fold * folds, txt2img.size)).astype(float)
    got = coco_5fold_1k(sim, txt2img, fold_size=fold, folds=folds)
    per = []
    for f in range(folds):
        rows = list(range(f * fold, (f + 1) * fold))
        cols = [j for j in range(txt2img.size) if txt2img[j] in rows]
        sub, sub_t2i = sim[np.ix_(rows, cols)], txt2img[cols] - f * fold
        per.append(_brute_recalls(_brute_i2t(sub, sub_t2i), _brute_t2i(sub.T, sub_t2i)))
    for key in per[0]:
        assert got[key] == pytest.approx(np.mean([p[key] for p in per])), key
    # Scores across folds are ignored: making cross-fold captions score +inf changes nothing.
    sim2 = sim.copy()
    sim2[:fold, 2 * fold :] = np.inf
    assert coco_5fold_1k(sim2, txt2img, fold_size=fold, folds=folds) == got
    with pytest.raises(ValueError, match="need 40 images"):
        coco_5fold_1k(sim, txt2img, fold_size=8, folds=folds)


def test_itm_prf_known_values() -> None:
    prob = np.array([0.9, 0.6, 0.4, 0.5, 0.1, 0.7])
    labels = np.array([1, 1, 1, 0, 0, 0])
    m = itm_prf(prob, labels)  # predicted positive: 0.9, 0.6, 0.5 (>= threshold), 0.7 -> tp=2, fp=2, fn=1
    assert m["itm_precision"] == pytest.approx(0.5)
    assert m["itm_recall"] == pytest.approx(2 / 3)
    assert m["itm_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["itm_acc"] == pytest.approx(3 / 6)
    assert itm_prf(np.zeros(3), np.ones(3))["itm_precision"] == 0.0
    assert itm_prf(prob, labels, threshold=0.8)["itm_recall"] == pytest.approx(1 / 3)


def test_pairwise_accuracy_counts_ties_as_misses() -> None:
    assert pairwise_accuracy(np.array([1.0, 2.0, 3.0, 0.0]), np.array([0.0, 2.0, 1.0, 1.0])) == pytest.approx(0.5)


def test_bad_inputs_name_the_problem() -> None:
    sim = np.zeros((2, 3))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((2, 2), np.nan), np.array([0, 1]))
    with pytest.raises(ValueError, match="one entry per text"):
        recall_at_k(sim, np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(sim, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(sim, np.array([0, 0, 0]))
    # As a text->image distractor an uncaptioned image is fine.
    assert t2i_ranks(np.array([[1.0, 1.0], [0.0, 2.0]]), np.array([0, 0])).tolist() == [0, 1]
