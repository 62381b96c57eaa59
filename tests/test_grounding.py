"""Dense shapes targets (what each patch shows, which patches a word names) and the losses that read them."""

import numpy as np
import pytest
import torch

from mklvisita import MKLVisITA, MKLVisITAConfig
from mklvisita.data import ShapesScenes
from mklvisita.data.grounding import (
    PATCH_CLASSES,
    claim_assignment,
    patch_attribute_labels,
    relation_word_targets,
    word_patch_targets,
)
from mklvisita.data.shapes import COLOURS, SHAPES, Claim, Desc, SceneObject, holds
from mklvisita.inputs import Processor
from mklvisita.losses import dense_attribute_loss, grounding_loss, relation_loss


def _scene_with_two_objects():
    ds = ShapesScenes(split="train", size=200, seed=3)
    for i in range(len(ds)):
        scene = ds.scene(i)
        if len(scene.objects) >= 2 and any(c.kind == "relation" for c in scene.claims):
            return ds, scene, ds.render(scene, i)
    raise AssertionError("no two-object scene with a relation caption in 200 scenes")


def test_patch_labels_follow_the_masks():
    _, scene, item = _scene_with_two_objects()
    labels = patch_attribute_labels(item["objects"], (8, 8))
    assert labels.shape == (3, 64)
    for a, n in enumerate(PATCH_CLASSES):
        assert labels[a].min() >= 0 and labels[a].max() < n
    for obj in item["objects"]:
        # the patch under the object's centre is labelled with the object's colour and shape
        cx, cy = obj["center"]
        p = int(cy // 8) * 8 + int(cx // 8)
        assert labels[0, p] == list(COLOURS).index(obj["colour"]) and labels[1, p] == SHAPES.index(obj["shape"])
    corner_free = [
        p
        for p in range(64)
        if not any(
            o["mask"][(p // 8) * 8 : (p // 8) * 8 + 8, (p % 8) * 8 : (p % 8) * 8 + 8].any() for o in item["objects"]
        )
    ]
    assert corner_free and (labels[0, corner_free] == PATCH_CLASSES[0] - 1).all()  # untouched patches: background


def test_word_targets_point_each_description_at_the_object_that_makes_the_claim_true():
    ds, scene, item = _scene_with_two_objects()
    claim = next(c for c in scene.claims if c.kind == "relation")
    cfg = MKLVisITAConfig.tiny()
    model = MKLVisITA(cfg)
    proc = Processor(model.config, model.tokenizer)
    words, token_word = proc.words(claim.text())
    masks = [o["mask"] for o in item["objects"]]
    tgt = word_patch_targets(claim, scene.objects, masks, token_word, (8, 8), 64)
    assert tgt.shape == (len(token_word), 64)
    chosen = claim_assignment(claim, scene.objects, 64)
    assert chosen is not None and holds(claim, scene.objects, 64)
    for desc, j in zip(claim.descs, chosen):
        shape_tokens = [t for t, w in enumerate(token_word) if w is not None and words[w] == desc.shape]
        assert shape_tokens
        row = tgt[shape_tokens[0]]
        assert row.sum() == pytest.approx(1.0, abs=1e-5)
        # the mass sits on the chosen object's patches, not on the other object's
        other = [k for k in range(len(masks)) if k != j]
        cov = masks[j].reshape(8, 8, 8, 8).mean((1, 3)).reshape(-1)
        assert row[cov > 0].sum() == pytest.approx(1.0, abs=1e-5)
        for k in other:
            alone = (masks[k].reshape(8, 8, 8, 8).mean((1, 3)).reshape(-1) > 0) & (cov == 0)
            assert row[alone].sum() == 0
    rel_tokens = [
        t for t, w in enumerate(token_word) if w is not None and words[w] in ("left", "right", "above", "below")
    ]
    assert all(tgt[t].sum() == 0 for t in rel_tokens)  # relation words name no object


def test_existential_reading_picks_the_object_that_fits():
    # two stars; "a star to the left of a circle" holds through the left star only
    objs = [
        SceneObject("star", "red", "small", 10, 30, 6, 0),
        SceneObject("circle", "blue", "small", 32, 30, 6, 0),
        SceneObject("star", "green", "small", 54, 30, 6, 0),
    ]
    claim = Claim("relation", (Desc("star"), Desc("circle")), relation="left")
    assert claim_assignment(claim, objs, 64) == (0, 1)
    claim = Claim("relation", (Desc("star"), Desc("circle")), relation="right")
    assert claim_assignment(claim, objs, 64) == (2, 1)
    assert claim_assignment(Claim("count", count=3), objs, 64) == ()  # nothing to assign


def test_losses_reward_the_right_patches_and_classes():
    targets = torch.zeros(1, 3, 4)
    targets[0, 1, 2] = 1.0  # token 1 names the object on patch 2
    good = torch.full((1, 2, 3, 5), 0.05)
    good[0, :, 1, 3] = 0.8  # prefix token first: patch 2 is key 3
    bad = torch.full((1, 2, 3, 5), 0.2)
    assert grounding_loss([good], targets, 1) < grounding_loss([bad], targets, 1)
    assert float(grounding_loss([bad], torch.zeros(1, 3, 4), 1)) == 0.0  # nothing to supervise
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 3)])
    tokens = torch.randn(2, 5, 4)
    labels = torch.randint(0, 3, (2, 1, 5))
    assert torch.isfinite(dense_attribute_loss(heads, tokens, labels))


def test_model_trains_with_dense_targets():
    cfg = MKLVisITAConfig.tiny()
    cfg.loss.patch_weight, cfg.loss.patch_classes, cfg.loss.grounding_weight = 1.0, PATCH_CLASSES, 1.0
    model = MKLVisITA(cfg)
    proc = Processor(model.config, model.tokenizer)
    ds = ShapesScenes(split="train", size=4, seed=0)
    items = [ds[i] for i in range(4)]
    caps = [it["captions"][0] for it in items]
    pv, _ = proc.images([it["image"] for it in items])
    enc = proc.captions(caps)
    grid = model.vision.grids[-1] if hasattr(model.vision, "grids") else (8, 8)
    labels = torch.from_numpy(np.stack([patch_attribute_labels(it["objects"], grid) for it in items]))
    t = enc["input_ids"].shape[1]
    targets = []
    for i, it in enumerate(items):
        _, tw = proc.words(caps[i])
        tw = tw + [None] * (t - len(tw))
        sc = ds.scene(i)
        targets.append(word_patch_targets(sc.claims[0], sc.objects, [o["mask"] for o in it["objects"]], tw, grid, 64))
    out = model(
        pv,
        enc["input_ids"],
        enc["attention_mask"],
        patch_labels=labels,
        word_targets=torch.from_numpy(np.stack(targets)),
    )
    assert {"patch", "itc", "itm"} <= set(out.losses)
    if any(tt.sum() > 0 for tt in targets):
        assert float(out.losses["grounding"]) > 0
    out.loss.backward()
    assert model.patch_heads[0].weight.grad is not None


def test_fusion_image_positions():
    from mklvisita.fusion import grid_positions

    pos = grid_positions((8, 8), 1)
    assert pos.shape == (65, 16) and float(pos[0].abs().sum()) == 0.0  # the CLS has no position
    assert len({tuple(r.round(decimals=4).tolist()) for r in pos[1:]}) == 64  # every patch its own code
    cfg = MKLVisITAConfig.tiny()
    cfg.fusion.image_positions = True
    model = MKLVisITA(cfg)
    proc = Processor(model.config, model.tokenizer)
    pv = torch.randn(2, 3, 64, 64)
    enc = proc.captions(["a red circle to the left of a blue square", "a blue square"])
    out = model(pv, enc["input_ids"], enc["attention_mask"])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.fusion.image_pos.parameters())


def test_relation_targets_label_the_relation_word_of_the_caption_and_of_its_reversal():
    model = MKLVisITA(MKLVisITAConfig.tiny())
    proc = Processor(model.config, model.tokenizer)
    true = Claim("relation", (Desc("circle", "red"), Desc("square", "blue")), relation="left", template=1)
    reverse = Claim("relation", true.descs, relation="right", template=1)
    swapped = Claim("relation", (Desc("circle", "blue"), Desc("square", "red")), relation="left", template=1)
    for claim, label in ((true, 1), (reverse, 0)):
        words, token_word = proc.words(claim.text())  # "a red circle is to the left of a blue square"
        got = relation_word_targets(true, claim, token_word)
        at = [t for t, w in enumerate(token_word) if w is not None and words[w] == claim.relation]
        assert at and (got[at] == label).all() and (np.delete(got, at) == -1).all()
    # another hard negative (attributes swapped) names objects the scene may not have: no relation target
    assert (relation_word_targets(true, swapped, proc.words(swapped.text())[1]) == -1).all()
    exists = Claim("exists", (Desc("circle", "red"),))
    assert (relation_word_targets(exists, exists, proc.words(exists.text())[1]) == -1).all()


def test_relation_loss_reads_only_labelled_words():
    head = torch.nn.Linear(4, 1)
    states = torch.randn(2, 3, 4)
    targets = torch.tensor([[-1, 1, -1], [-1, -1, 0]])
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        states[0, 1, 0], states[1, 2, 0] = 5.0, -5.0
        head.weight[0, 0] = 1.0  # verdict = first feature: right on both labelled words
    loss, acc = relation_loss(head, states, targets)
    assert acc == 1.0 and float(loss) < 0.01
    loss, acc = relation_loss(head, states, 1 - targets.clamp(min=0) - 2 * (targets < 0).long())
    assert acc == 0.0 and float(loss) > 4.0  # the same words with flipped labels
    loss, acc = relation_loss(head, states, torch.full((2, 3), -1))
    assert acc is None and float(loss) == 0.0


def test_model_trains_the_relation_head_on_the_state_the_last_layer_reads():
    cfg = MKLVisITAConfig.tiny()
    cfg.loss.relation_weight = 1.0
    cfg.fusion.word_positions = cfg.fusion.cross_first = True
    torch.manual_seed(0)
    model = MKLVisITA(cfg)
    proc = Processor(model.config, model.tokenizer)
    caps = ["a red circle to the left of a blue square", "a green star above a red cross"]
    negs = ["a red circle to the right of a blue square", "a green star below a red cross"]
    enc, neg = proc.captions(caps), proc.captions(negs)
    t = enc["input_ids"].shape[1]
    targets = torch.full((2, 2, t), -1, dtype=torch.long)
    for i, (c, n) in enumerate(zip(caps, negs)):
        for row, text, label in ((0, c, 1), (1, n, 0)):
            words, tw = proc.words(text)
            at = [k for k, w in enumerate(tw) if w is not None and words[w] in ("left", "right", "above", "below")]
            targets[i, row, at] = label
    out = model(
        torch.randn(2, 3, 64, 64),
        enc["input_ids"],
        enc["attention_mask"],
        neg_input_ids=neg["input_ids"],
        neg_attention_mask=neg["attention_mask"],
        relation_targets=targets,
    )
    assert float(out.losses["relation"]) > 0 and 0.0 <= out.logs["relation_acc"] <= 1.0
    out.loss.backward()
    assert model.relation_head.weight.grad.abs().sum() > 0
    assert model.fusion.layers[0].rel_pos.weight.grad.abs().sum() > 0  # the verdict can use the words' offsets
