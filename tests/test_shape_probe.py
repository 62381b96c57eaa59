"""training.shape_probe: which attribute a change altered, and the patch heads' accuracy on object patches."""

import pytest
import torch

from mklvisita import MKLVisITA, MKLVisITAConfig
from mklvisita.data.grounding import PATCH_CLASSES
from mklvisita.data.shapes import ShapesScenes
from mklvisita.inputs import Processor
from training.shape_probe import change_accuracy, changed_attribute, patch_accuracy


@pytest.mark.parametrize(
    ("caption", "negative", "attribute"),
    [
        ("a red circle", "a blue circle", "colour"),
        ("a red circle", "an orange circle", "colour"),  # the article follows the colour; not a change of its own
        ("there is a small square", "there is a small star", "shape"),
        ("a small star above a red cross", "a large star above a red cross", "size"),
        ("there are two shapes", "there are three shapes", None),  # a count
        ("a red circle", "a red circle and a star", None),
    ],
)
def test_changed_attribute(caption, negative, attribute):
    assert changed_attribute(caption, negative) == attribute


@pytest.fixture(scope="module")
def probed():
    torch.manual_seed(0)
    cfg = MKLVisITAConfig.tiny()
    cfg.loss.patch_weight, cfg.loss.patch_classes = 1.0, list(PATCH_CLASSES)
    model = MKLVisITA(cfg).eval()
    return model, Processor(model.config, model.tokenizer)


def test_patch_accuracy_of_a_constant_head_is_its_class_share(probed):
    model, processor = probed
    scenes = ShapesScenes("val", size=6, seed=0)
    shares = []
    head = model.patch_heads[1]  # shape
    saved = [p.detach().clone() for p in head.parameters()]
    try:
        for k in range(PATCH_CLASSES[1] - 1):  # the shape classes; background never labels an object patch
            with torch.no_grad():
                head.weight.zero_()
                head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(k), PATCH_CLASSES[1]).float())
            res = patch_accuracy(model, processor, scenes)
            shares.append(res["patch_acc_shape"])
    finally:
        with torch.no_grad():
            for p, s in zip(head.parameters(), saved):
                p.copy_(s)
    assert res["patch_n"] > 0
    assert len(model.patch_heads) == 3 and sum(shares) == pytest.approx(1.0)  # each object patch has exactly one shape
    assert max(shares) == pytest.approx(res["patch_chance_shape"])  # chance = always the most frequent class
    for attr in ("colour", "size"):
        assert 0 <= res[f"patch_acc_{attr}"] <= 1 and 0 < res[f"patch_chance_{attr}"] <= 1


def test_change_accuracy_counts_only_single_attribute_changes(probed):
    model, processor = probed
    res = change_accuracy(model, processor, scenes=4)
    n = sum(res[f"change_n_{a}"] for a in ("colour", "shape", "size"))
    assert 0 < n <= 4 * 5  # at most one hard negative per caption, 5 captions per scene
    for attr in ("colour", "shape", "size"):
        if res[f"change_n_{attr}"]:
            assert 0 <= res[f"change_acc_{attr}"] <= 1


def test_a_model_without_patch_heads_is_a_plain_error():
    model = MKLVisITA(MKLVisITAConfig.tiny()).eval()
    with pytest.raises(ValueError, match="no patch heads"):
        patch_accuracy(model, Processor(model.config, model.tokenizer), ShapesScenes("val", size=1, seed=0))
