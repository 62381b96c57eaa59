"""The ranking rule has one owner (mklvisita.ranking): every caller ranks a checkpoint's pairs the same way, whatever
its weights."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import micro_config

from mklvisita import Matcher, MKLVisITA
from mklvisita.config import RankingConfig
from mklvisita.data import ShapesScenes
from mklvisita.evaluation import EvalData, evaluate_model, negative_scores
from mklvisita.inputs import Processor
from mklvisita.ranking import RankingError, describe_ranking, final_score, itm_from_final, resolve_ranking
from mklvisita.retrieval import encode_captions, encode_images, retrieve
from training.kernel_analysis import analyse

SCENES = 6


def _scenes() -> tuple[list, list[str], list[str], list[str], np.ndarray]:
    data = ShapesScenes(split="test", size=SCENES)  # the scenes the kernel analysis reads with limit=SCENES
    images, captions, negatives, kinds, owner = [], [], [], [], []
    for i in range(SCENES):
        item = data[i]
        images.append(item["image"])
        captions += item["captions"]
        negatives += item["negatives"]
        kinds += item["negative_kinds"]
        owner += [i] * len(item["captions"])
    return images, captions, negatives, kinds, np.array(owner)


def _binding(score: np.ndarray, owner: np.ndarray, n: int) -> float:
    """Share of captions (columns 0..n-1) above their hard negative (columns n..2n-1) with their own image."""
    idx = np.arange(n)
    return float((score[owner, idx] > score[owner, n + idx]).mean())


@pytest.fixture(scope="module")
def weighted_checkpoint(tmp_path_factory):
    """A micro checkpoint whose ranking rule weighs S by a similarity_weight that is not 1, chosen so that its binding
    accuracy differs from the one an ITM + S rule (similarity_weight dropped) gives: a caller that drops the weight
    is caught by the binding figures, not only by the raw scores."""
    images, captions, negatives, _, owner = _scenes()
    torch.manual_seed(0)
    model = MKLVisITA(micro_config()).eval()
    unit = Matcher(model).score(images, captions + negatives)  # ITM and S do not depend on the rule
    n = len(captions)
    dropped = _binding(unit.itm + unit.similarity, owner, n)
    weight = next(
        (w for w in (0.05, 0.2, 5.0, 25.0) if _binding(unit.itm + w * unit.similarity, owner, n) != dropped), None
    )
    assert weight is not None, "no similarity_weight tried changes binding on these scenes; try others"
    # k covers every pair of these scenes, so retrieval re-scores each pair as Matcher.score does.
    model.config.ranking = RankingConfig(itm_weight=1.0, similarity_weight=weight, k=4 * n, candidates=0)
    path = tmp_path_factory.mktemp("ranked") / "ckpt"
    model.save_pretrained(path)
    return path, weight


def test_every_caller_ranks_a_weighted_checkpoint_the_same_way(weighted_checkpoint):
    path, weight = weighted_checkpoint
    matcher = Matcher.from_pretrained(path)
    model, processor = matcher.model, matcher.processor
    assert model.config.ranking.similarity_weight == weight != 1.0  # the saved checkpoint carries the rule
    images, captions, negatives, kinds, owner = _scenes()
    n = len(captions)

    # Matcher.score: the Match and Matrix tabs.
    scored = matcher.score(images, captions + negatives)
    expected = scored.itm + weight * scored.similarity
    np.testing.assert_allclose(scored.score, expected, rtol=1e-6, atol=1e-6)

    # Retrieval (Search, the evaluation command, training's validation): every pair re-scored here.
    image_bank = encode_images(model, processor, images)
    text_bank = encode_captions(model, processor, captions + negatives)
    r = retrieve(model, image_bank, text_bank)
    np.testing.assert_allclose(r.i2t, scored.score, atol=1e-5)
    np.testing.assert_allclose(r.t2i.T, scored.score, atol=1e-5)

    # Evaluation: each caption against its hard negative, and binding_acc.
    pos_bank, neg_bank = encode_captions(model, processor, captions), encode_captions(model, processor, negatives)
    ns = negative_scores(model, image_bank, pos_bank, neg_bank, owner)
    np.testing.assert_allclose(ns.pos, scored.score[owner, np.arange(n)], atol=1e-5)
    np.testing.assert_allclose(ns.neg, scored.score[owner, n + np.arange(n)], atol=1e-5)
    data = EvalData("shapes", "test", images, captions, owner, negatives, negative_kinds=kinds)
    metrics = evaluate_model(model, processor, data, extra_metrics={})
    assert metrics["binding_acc"] == pytest.approx(_binding(scored.score, owner, n))

    # Kernel analysis: its "final" binding with every kernel on.
    result = analyse(model, Processor(model.config, model.tokenizer), limit=SCENES)
    assert result["binding_all_kernels"]["final"]["all"] == pytest.approx(_binding(scored.score, owner, n))


def test_final_score_and_its_inverse():
    r = RankingConfig(itm_weight=0.5, similarity_weight=2.0, k=4)
    itm, sim = np.array([0.2, 0.9]), np.array([0.1, -0.3])
    final = final_score(r, itm, sim)
    np.testing.assert_allclose(final, 0.5 * itm + 2.0 * sim)
    assert itm_from_final(r, float(final[1]), float(sim[1])) == pytest.approx(0.9)
    # No ITM, or k = 0 (similarity only): S alone, as a copy.
    for rule, i in ((r, None), (dataclasses.replace(r, k=0), itm)):
        out = final_score(rule, i, sim)
        np.testing.assert_array_equal(out, sim)
        assert out is not sim
    assert torch.equal(final_score(r, torch.tensor([1.0]), torch.tensor([1.0])), torch.tensor([2.5]))


def test_resolve_ranking_applies_overrides_and_refuses_what_cannot_rank():
    cfg = micro_config()
    cfg.ranking = RankingConfig(itm_weight=1.0, similarity_weight=3.0, k=8, candidates=32)
    r = resolve_ranking(cfg, k=2, itm_weight=None)
    assert (r.k, r.itm_weight, r.similarity_weight, r.candidates) == (2, 1.0, 3.0, 32)
    assert cfg.ranking.k == 8  # the checkpoint's own rule is left alone
    for bad, field in (
        ({"similarity_weight": 0.0}, "similarity_weight"),
        ({"itm_weight": -1.0}, "itm_weight"),
        ({"itm_weight": float("nan")}, "itm_weight"),
        ({"k": -1}, "ranking.k"),
        ({"candidates": 2.5}, "candidates"),
        ({"depth": 3}, "depth"),
    ):
        with pytest.raises(RankingError, match=field):
            resolve_ranking(cfg, **bad)
    with pytest.raises(RankingError, match="comes from"):
        resolve_ranking("photo")
    assert issubclass(RankingError, ValueError)


def test_the_rule_in_words_names_the_weights():
    r = RankingConfig(itm_weight=0.5, similarity_weight=2.0, k=16, candidates=0)
    assert describe_ranking(r, has_itm=True) == "score = 0.5 × ITM + 2 × S"
    long = describe_ranking(r, has_itm=True, retrieval=True)
    assert long.startswith("score = 0.5 × ITM + 2 × S; retrieval: exhaustive S") and "top k = 16" in long
    assert describe_ranking(r, has_itm=False).startswith("score = S")
    assert "k = 0" in describe_ranking(dataclasses.replace(r, k=0), has_itm=True)
    assert "128 candidates" in describe_ranking(dataclasses.replace(r, candidates=128), True, retrieval=True)


def test_rescored_pairs_stay_above_the_rest_under_a_large_similarity_weight(tiny_checkpoint):
    model = MKLVisITA.from_pretrained(tiny_checkpoint).eval()
    processor = Processor(model.config, model.tokenizer)
    images, captions, *_ = _scenes()
    ranking = RankingConfig(itm_weight=1.0, similarity_weight=500.0, k=2, candidates=0)
    s = retrieve(model, encode_images(model, processor, images), encode_captions(model, processor, captions), ranking)
    top = np.argsort(-s.similarity, axis=1, kind="stable")[:, :2]  # each image's re-scored captions
    for i, row in enumerate(s.i2t):
        rest = np.delete(row, top[i])
        assert row[top[i]].min() > rest.max()


def test_the_evaluation_command_overrides_the_rule_field_by_field(tiny_checkpoint, tmp_path, capsys):
    from training import evaluate

    out = tmp_path / "m.json"
    common = ["--checkpoint", str(tiny_checkpoint), "--data", "shapes", "--limit", "3", "--no-extra", "--out", str(out)]
    assert evaluate.main([*common, "--similarity-weight", "2.5", "--k", "2"]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert (meta["similarity_weight"], meta["k"], meta["itm_weight"]) == (2.5, 2, 1.0)
    with pytest.raises(SystemExit) as stop:
        evaluate.main([*common, "--similarity-weight", "0"])
    assert stop.value.code == 2 and "similarity_weight must be > 0" in capsys.readouterr().err
