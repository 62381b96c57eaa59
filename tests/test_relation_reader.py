"""The relation reader: a spatial-relation verdict from where a caption's object words look, in the ITM logit."""

import dataclasses

import pytest
import torch
from conftest import micro_config

from mklvisita import MKLVisITA
from mklvisita.fusion import RelationEvidence, RelationReader
from mklvisita.inputs import Processor
from mklvisita.losses import relation_reader_loss


def _hand_set_reader(width: int = 8) -> RelationReader:
    """Object gate on feature 0, relation gate on feature 1, direction +x on feature 2 (LayerNorm made identity-free:
    the states below are built so that the normalised features keep their signs)."""
    r = RelationReader(width)
    with torch.no_grad():
        r.norm.weight.fill_(1.0)
        r.norm.bias.zero_()
        r.heads.weight.zero_()
        r.heads.bias.copy_(torch.tensor([-20.0, -20.0, 0.0, 0.0]))
        r.heads.weight[0, 0] = 40.0  # object word
        r.heads.weight[1, 1] = 40.0  # relation word
        r.heads.weight[2, 2] = 10.0  # the word claims: the second object is to the right (+x) of the first
    return r


def _states(kinds: list[str], width: int = 8) -> torch.Tensor:
    rows = []
    for k in kinds:
        v = torch.full((width,), -1.0)
        if k == "obj":
            v[0] = 3.0
        if k == "left":
            v[1] = v[2] = 3.0
        rows.append(v)
    return torch.stack(rows)[None]  # (1, T, W)


def test_verdict_follows_where_the_object_words_look():
    reader = _hand_set_reader()
    kinds = ["cls", "obj", "left", "obj", "sep"]  # "[CLS] gnu left-of apple [SEP]"
    states, mask = _states(kinds), torch.ones(1, 5)
    true = torch.tensor([[[0.5, 0.5], [0.2, 0.5], [0.5, 0.5], [0.8, 0.5], [0.5, 0.5]]])  # gnu left, apple right
    reversed_ = true.clone()
    reversed_[0, 1, 0], reversed_[0, 3, 0] = 0.8, 0.2
    a, b = reader(states, mask, true), reader(states, mask, reversed_)
    assert a.evidence.item() > 2.0 and b.evidence.item() < -2.0  # the same caption, the objects' places swapped
    assert a.support[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert a.verdict[0, 0].item() == 0.0  # [CLS] gives no verdict
    # A relation word with no object named after it ("... and an apple on the right") has no support: no verdict.
    c = reader(_states(["cls", "obj", "obj", "left", "sep"]), mask, true)
    assert c.support[0, 3].item() == pytest.approx(0.0, abs=1e-6) and c.evidence.abs().item() < 1e-6


def test_head_nouns_place_each_object_at_its_last_word():
    """ "[CLS] red gnu left-of green apple [SEP]": the adjectives look at the other object. Averaged over every
    object word the two places coincide (no verdict); at each phrase's last word (its head noun) the gnu is left."""
    kinds = ["cls", "obj", "obj", "left", "obj", "obj", "sep"]
    states, mask = _states(kinds), torch.ones(1, 7)
    x = [0.5, 0.8, 0.2, 0.5, 0.2, 0.8, 0.5]  # red -> right, gnu -> left, green -> left, apple -> right
    centroids = torch.tensor([[[v, 0.5] for v in x]])
    mean = _hand_set_reader()(states, mask, centroids)
    heads = _hand_set_reader()
    heads.head_nouns = True
    nouns = heads(states, mask, centroids)
    assert abs(mean.verdict[0, 3].item()) < 1e-4  # (0.8 + 0.2) / 2 on both sides
    # the same verdict as a caption whose only object words are the two nouns ("[CLS] a gnu left-of an apple")
    only_nouns = _hand_set_reader()(_states(["cls", "x", "obj", "left", "x", "obj", "sep"]), mask, centroids)
    assert nouns.verdict[0, 3].item() == pytest.approx(only_nouns.verdict[0, 3].item(), rel=1e-3)
    assert nouns.evidence.item() > 2.0 and nouns.support[0, 3].item() == pytest.approx(1.0)


def test_reader_needs_word_positions():
    cfg = micro_config()
    cfg.fusion = dataclasses.replace(cfg.fusion, relation_reader=True, word_positions=False)
    with pytest.raises(ValueError, match="word_positions"):
        MKLVisITA(cfg)


def _model(reader: bool) -> MKLVisITA:
    cfg = micro_config()
    cfg.loss = dataclasses.replace(cfg.loss, relation_weight=1.0)
    cfg.fusion = dataclasses.replace(
        cfg.fusion, image_pool=2, image_positions=True, cross_first=True, word_positions=True, relation_reader=reader
    )
    torch.manual_seed(0)
    model = MKLVisITA(cfg).eval()
    for layer in model.fusion.layers:
        torch.nn.init.normal_(layer.rel_pos.weight, std=1.0)
    if reader:
        heads = model.fusion.relation_reader.heads.weight
        with torch.no_grad():  # as if trained: gates near one half, a strong direction
            torch.nn.init.normal_(heads, std=0.05)
            torch.nn.init.normal_(heads[2:], std=20.0)
    return model


def _one_image(model: MKLVisITA, captions: list[str]):
    """A random image's and the captions' features, and the pairs' image index (every caption with that image)."""
    enc = Processor(model.config, model.tokenizer).captions(captions)
    s = model.config.vision.image_size
    with torch.no_grad():
        img = model.encode_image(torch.randn(1, 3, s, s))
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
    return img, txt, torch.zeros(len(captions), dtype=torch.long)


def test_reader_adds_its_evidence_on_the_fast_path_and_with_maps_alike():
    model = _model(True)
    captions = ["a red circle to the left of a blue square", "a blue square to the left of a red circle", "a star"]
    img, txt, ii = _one_image(model, captions)
    with torch.no_grad():
        fast = model.match(img, txt, image_index=ii, output_attentions=False)
        maps = model.match(img, txt, image_index=ii)
    assert fast.relation is not None and maps.relation is not None
    assert maps.relation.evidence.abs().max() > 1e-3  # the reader changes the match logit
    torch.testing.assert_close(fast.relation.evidence, maps.relation.evidence, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.logits, maps.logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.itm_relation_weight.zero_()
        without = model.match(img, txt, image_index=ii)
    torch.testing.assert_close(
        maps.logits[:, 1] - without.logits[:, 1], maps.relation.evidence, atol=1e-5, rtol=1e-5
    )  # exactly weight x evidence on the match logit


def test_a_model_without_the_reader_has_no_reader_weights():
    model = _model(False)
    assert model.fusion.relation_reader is None and model.itm_relation_weight is None
    assert not any("relation_reader" in k or k == "itm_relation_weight" for k in model.state_dict())


def test_reader_loss_uses_known_verdicts_and_marks_the_gates():
    n, t = 2, 5
    verdict = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0, 0.0]], requires_grad=True)
    rel = RelationEvidence(
        evidence=torch.zeros(n),
        verdict=verdict,
        relation_gate=torch.zeros(n, t, requires_grad=True),
        object_gate=torch.zeros(n, t, requires_grad=True),
        support=torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0, 0.0]]),
    )
    targets = torch.tensor([[-1, -1, 1, -1, -1], [-1, -1, 0, -1, -1]])  # row 1: the word has too little support
    word_targets = torch.zeros(1, t, 4)
    word_targets[0, 1, 0] = word_targets[0, 3, 1] = 1.0
    loss, logs = relation_reader_loss(rel, targets, word_targets, true_rows=1)
    assert logs["reader_acc"] == 1.0  # only row 0's verdict (support 1) is scored: 4 > 0 and it holds
    loss.backward()
    assert verdict.grad[1].abs().sum() == 0  # no verdict term without support
    assert rel.relation_gate.grad[0, 2] < 0 and rel.relation_gate.grad[0, 1] > 0  # "left" up, others down
    assert rel.object_gate.grad[0, 1] < 0 and rel.object_gate.grad[0, 2] > 0  # object words up, the rest down
    assert rel.relation_gate.grad[1].abs().sum() == 0  # gates are taught on the true captions only


def test_training_step_trains_the_reader_and_its_weight_in_the_logit():
    model = _model(True).train()
    captions = ["a red circle to the left of a blue square", "a blue square above a red circle"]
    enc = Processor(model.config, model.tokenizer).captions(captions)
    negs = Processor(model.config, model.tokenizer).captions(
        ["a red circle to the right of a blue square", "a blue square below a red circle"]
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    t = ids.shape[1]
    relation = torch.full((2, 2, t), -1, dtype=torch.long)
    relation[0, :, 6] = torch.tensor([1, 0])  # "left" ([CLS] a red circle to the left): holds / reversed
    relation[1, :, 4] = torch.tensor([1, 0])  # "above" ([CLS] a blue square above): holds / reversed
    word_targets = torch.zeros(2, t, model.vision.grid[0] * model.vision.grid[1])
    word_targets[0, 2:4, 0] = word_targets[0, 9:11, -1] = 1.0  # "red circle" top left, "blue square" bottom right
    s = model.config.vision.image_size
    out = model(torch.randn(2, 3, s, s), ids, mask, neg_input_ids=negs["input_ids"],
                neg_attention_mask=negs["attention_mask"], word_targets=word_targets,
                relation_targets=relation)  # fmt: skip
    assert "reader" in out.losses and torch.isfinite(out.losses["reader"])
    out.loss.backward()
    assert model.fusion.relation_reader.heads.weight.grad.abs().sum() > 0
    assert model.itm_relation_weight.grad is not None and model.itm_relation_weight.grad.abs() > 0


def test_itm_head_scale_scales_only_the_heads_part_of_the_match_logit():
    model = _model(True)
    img, txt, ii = _one_image(model, ["a red circle to the left of a blue square", "a star"])
    with torch.no_grad():
        full = model.match(img, txt, image_index=ii, output_attentions=False)
        model.config.fusion.itm_head_scale = 0.25
        try:
            scaled = model.match(img, txt, image_index=ii, output_attentions=False)
        finally:
            model.config.fusion.itm_head_scale = 1.0
        s_part = (
            model.itm_similarity_weight
            * model.similarity(model.embed_image(img).select(ii), model.embed_text(txt), pairwise=True).similarity
        )
    rest = torch.stack([torch.zeros_like(s_part), s_part + model.itm_relation_weight * full.relation.evidence], -1)
    torch.testing.assert_close(scaled.logits - rest, 0.25 * (full.logits - rest), atol=1e-5, rtol=1e-5)


def test_itm_head_scale_out_of_range_is_refused():
    from mklvisita.config import ConfigError

    cfg = micro_config()
    cfg.fusion = dataclasses.replace(cfg.fusion, itm_head_scale=-1.0)
    with pytest.raises(ConfigError, match="itm_head_scale"):
        cfg.validate()
