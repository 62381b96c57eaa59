import numpy as np
import pytest

from mklvisita.data import COLOURS, HELD_OUT_PAIRS, SHAPES, SHAPES_VOCABULARY, ShapesScenes, holds
from mklvisita.data.shapes import RELATION_MARGIN, Claim, Desc, SceneObject


def test_item_format():
    ds = ShapesScenes("train", size=10, image_size=48)
    item = ds[3]
    assert len(ds) == 10
    assert item["image"].mode == "RGB" and item["image"].size == (48, 48)
    assert len(item["captions"]) == 5 and len(item["negatives"]) == 5
    assert 1 <= len(item["objects"]) <= 3
    for obj in item["objects"]:
        assert obj["mask"].dtype == np.bool_ and obj["mask"].shape == (48, 48)
        assert obj["phrase"] == f"the {obj['size']} {obj['colour']} {obj['shape']}"
    with pytest.raises(IndexError):
        ds[10]
    assert ds[-1]["captions"] == ds[9]["captions"]


def test_deterministic_per_item_and_independent_of_order():
    a = ShapesScenes("train", size=50, seed=3)
    b = ShapesScenes("train", size=50, seed=3)
    late = b[40]  # drawn before anything else: items must not depend on the order of access
    first = a[7]
    assert np.array_equal(np.asarray(a[40]["image"]), np.asarray(late["image"]))
    assert a[40]["captions"] == late["captions"] and a[40]["negatives"] == late["negatives"]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(b[7]["image"]))
    assert not np.array_equal(np.asarray(a[7]["image"]), np.asarray(a[8]["image"]))
    other_seed = ShapesScenes("train", size=50, seed=4)[7]
    other_split = ShapesScenes("val", size=50, seed=3)[7]
    assert not np.array_equal(np.asarray(first["image"]), np.asarray(other_seed["image"]))
    assert not np.array_equal(np.asarray(first["image"]), np.asarray(other_split["image"]))


@pytest.mark.parametrize("split", ["train", "test_compositional"])
def test_masks_clean_and_coloured(split):
    ds = ShapesScenes(split, size=60, image_size=64)
    for i in range(len(ds)):
        item = ds[i]
        pixels = np.asarray(item["image"]).astype(int)  # (H, W, 3)
        masks = [o["mask"] for o in item["objects"]]
        assert all(m.sum() >= 10 for m in masks), "every object covers some pixels"
        assert sum(m.astype(int) for m in masks).max() == 1, "masks are disjoint"
        for obj in item["objects"]:
            # Masks and pixels agree: the mean colour under a mask is nearest to the object's named colour.
            mean = pixels[obj["mask"]].mean(axis=0)
            nearest = min(COLOURS, key=lambda c: np.abs(mean - np.asarray(COLOURS[c])).sum())
            assert nearest == obj["colour"]


@pytest.mark.parametrize("split", ["train", "val", "test", "test_compositional"])
def test_captions_true_negatives_false(split):
    ds = ShapesScenes(split, size=150, image_size=64)
    kinds = set()
    for i in range(len(ds)):
        scene = ds.scene(i)
        item = ds[i]
        assert item["captions"] == [c.text() for c in scene.claims]
        assert item["negatives"] == [c.text() for c in scene.negative_claims]
        assert len(set(item["captions"])) == 5
        for claim, neg, kind in zip(scene.claims, scene.negative_claims, scene.negative_kinds):
            assert holds(claim, scene.objects, ds.image_size), claim.text()
            assert not holds(neg, scene.objects, ds.image_size), (claim.text(), neg.text())
            assert neg.text() != claim.text()
            kinds.add(kind)
    assert kinds == {"swap", "reverse", "change"}


def test_holds_on_a_hand_built_scene():
    a = SceneObject("circle", "red", "large", cx=10, cy=30, radius=8, angle=0)
    b = SceneObject("square", "blue", "small", cx=50, cy=30, radius=5, angle=0)
    scene, size = [a, b], 64
    red_circle, blue_square = Desc("circle", "red"), Desc("square", "blue")
    assert holds(Claim("relation", (red_circle, blue_square), "left"), scene, size)
    assert not holds(Claim("relation", (red_circle, blue_square), "right"), scene, size)
    # Same row: neither above nor below (within the margin).
    assert not holds(Claim("relation", (red_circle, blue_square), "above"), scene, size)
    assert not holds(Claim("and", (Desc("circle", "blue"), Desc("square", "red"))), scene, size)
    assert holds(Claim("and", (blue_square, red_circle)), scene, size)
    assert not holds(Claim("exists", (Desc("circle", None, "small"),)), scene, size)
    assert holds(Claim("count", count=2), scene, size) and not holds(Claim("count", count=3), scene, size)
    near = SceneObject("square", "blue", "small", cx=10 + RELATION_MARGIN * size / 2, cy=50, radius=5, angle=0)
    assert not holds(Claim("relation", (red_circle, blue_square), "left"), [a, near], size)


def test_held_out_pairs():
    held = set(HELD_OUT_PAIRS)
    assert held and all(c in COLOURS and s in SHAPES for c, s in held)
    held_phrases = {f"{c} {s}" for c, s in held}
    for split in ("train", "val", "test"):
        ds = ShapesScenes(split, size=300)
        for i in range(len(ds)):
            scene = ds.scene(i)
            assert not any((o.colour, o.shape) in held for o in scene.objects)
            for claim in scene.claims + scene.negative_claims:
                assert not any((d.colour, d.shape) in held for d in claim.descs), claim.text()
                assert not any(p in claim.text() for p in held_phrases)
    ds = ShapesScenes("test_compositional", size=300)
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert any((o.colour, o.shape) in held for o in scene.objects)
        for claim in scene.claims:  # every caption names a held-out object by colour and shape
            assert any((d.colour, d.shape) in held for d in claim.descs), claim.text()


def test_vocabulary_covers_every_word():
    assert SHAPES_VOCABULARY == sorted(set(SHAPES_VOCABULARY))
    words = set()
    for split in ("train", "test_compositional"):
        ds = ShapesScenes(split, size=300)
        for i in range(len(ds)):
            scene = ds.scene(i)
            for claim in scene.claims + scene.negative_claims:
                text = claim.text()
                assert text == text.lower() and text.replace(" ", "").isalpha()
                words.update(text.split())
    assert words <= set(SHAPES_VOCABULARY)
    # Every colour, shape and relation word actually occurs.
    assert {*COLOURS, *SHAPES, "left", "right", "above", "below", "small", "large"} <= words


def test_phrases_name_one_object_each():
    ds = ShapesScenes("train", size=200)
    for i in range(len(ds)):
        objects = ds.scene(i).objects
        assert len({(o.colour, o.shape) for o in objects}) == len(objects)


def test_bad_arguments():
    with pytest.raises(ValueError, match="test_compositional"):
        ShapesScenes("holdout")
    with pytest.raises(ValueError, match="max_objects"):
        ShapesScenes(max_objects=5)
