"""Tux Paint photo-stamp task on fake stamps the test writes (the real GPL-2 stamps are never used in tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mklvisita.config import MKLVisITAConfig
from mklvisita.evaluation import evaluate_model, load_eval_data
from mklvisita.inputs import Processor
from mklvisita.model import MKLVisITA
from mklvisita.tasks import tuxpaint

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (220, 200, 20), (150, 40, 170), (20, 180, 180)]


def _stamp(path, caption: str | None, colour=(200, 30, 30), mode="RGBA", size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    a = np.asarray(im).copy()
    a[5:-5, 8:-8] = (*colour, 255)  # an opaque rectangle inside a transparent border
    Image.fromarray(a, "RGBA").convert(mode).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(f"{caption}\nfr.utf8=Traduction.\n", encoding="utf-8")


@pytest.fixture()
def stamps(tmp_path):
    root = tmp_path / "stamps"
    for i, c in enumerate(COLOURS):
        _stamp(root / "animals" / f"animal{i}.png", f"A colour {i} animal.", c)
    _stamp(root / "food" / "rgb.png", "An opaque photo.", mode="RGB")
    _stamp(root / "cartoon" / "x.png", "A cartoon.")  # excluded: cartoon tree
    _stamp(root / "symbols" / "y.png", "A symbol.")  # excluded: symbols tree
    _stamp(root / "animals" / "cartoon" / "z.png", "A nested cartoon.")  # excluded: a cartoon sub-folder
    _stamp(root / "plants" / "drawn.png", "A drawn plant.")
    (root / "plants" / "drawn.svg").write_text("<svg/>")  # excluded: PNG rendering of an SVG
    _stamp(root / "town" / "grey.png", "A tintable sign.", mode="LA")  # excluded: grey, tintable
    _stamp(root / "town" / "silent.png", None)  # excluded: no description
    return root


def test_only_colour_photo_stamps_with_a_description_are_kept(stamps):
    found = tuxpaint.find_stamps(stamps)
    assert sorted(s.relative for s in found) == sorted(
        [f"animals/animal{i}.png" for i in range(len(COLOURS))] + ["food/rgb.png"]
    )
    assert {s.caption for s in found} >= {"A colour 0 animal.", "An opaque photo."}  # first line only


def test_half_split_is_fixed_disjoint_and_covers_everything(stamps):
    tune, test = tuxpaint.find_stamps(stamps, "tune"), tuxpaint.find_stamps(stamps, "test")
    assert not {s.relative for s in tune} & {s.relative for s in test}
    assert len(tune) + len(test) == len(tuxpaint.find_stamps(stamps, "all"))
    # The split is a function of the relative path alone: moving the whole folder changes nothing.
    assert all(tuxpaint.Stamp(stamps / s.relative, s.relative, "").half == "tune" for s in tune)
    with pytest.raises(ValueError, match="split"):
        tuxpaint.find_stamps(stamps, "train")


def test_missing_stamps_folder_says_what_to_install(tmp_path):
    with pytest.raises(ValueError, match="apt-get install tuxpaint-stamps-default"):
        load_eval_data(f"tuxpaint:{tmp_path / 'nowhere'}", "all")


def test_composite_is_rgb_on_white_with_the_stamp_in_the_middle(stamps):
    s = tuxpaint.find_stamps(stamps)[0]
    im = tuxpaint.composite(s)
    a = np.asarray(im)
    assert im.mode == "RGB" and im.width == im.height
    assert tuple(a[0, 0]) == (255, 255, 255)  # the transparent border became the white background
    assert tuple(a[a.shape[0] // 2, a.shape[1] // 2]) != (255, 255, 255)


def test_composite_scenes_masks_come_from_alpha(stamps):
    scenes = tuxpaint.CompositeScenes(tuxpaint.find_stamps(stamps), n=5, seed=1)
    again = tuxpaint.CompositeScenes(tuxpaint.find_stamps(stamps), n=5, seed=1)
    for i in range(5):
        item = scenes[i]
        a = np.asarray(item["image"])
        assert 2 <= len(item["objects"]) <= 3
        phrases = [o["phrase"] for o in item["objects"]]
        assert len(set(phrases)) == len(phrases) and not any(p.endswith(".") for p in phrases)
        for obj in item["objects"]:
            mask = obj["mask"]
            assert mask.shape == a.shape[:2] and 0 < mask.mean() < 0.5
            assert (a[mask] != 255).any(-1).all()  # every mask pixel is paint, not background
        masks = np.stack([o["mask"] for o in item["objects"]])
        assert masks.sum(0).max() == 1  # stamps never overlap
        assert np.array_equal(np.asarray(again[i]["image"]), a)  # seeded


def test_evaluate_on_fake_stamps_gives_the_protocol_keys_and_the_pointing_game(stamps, monkeypatch):
    monkeypatch.setattr(tuxpaint, "POINTING_SCENES", 6)
    torch.manual_seed(0)
    model = MKLVisITA(MKLVisITAConfig.tiny()).eval()
    data = load_eval_data(f"tuxpaint:{stamps}", "all")
    assert data.name == "tuxpaint" and len(data.images) == len(data.captions) == 7
    assert np.array_equal(data.txt2img, np.arange(7))
    metrics = evaluate_model(model, Processor(model.config, model.tokenizer), data, k=4)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert 0.0 <= metrics[key] <= (600.0 if key == "rsum" else 100.0)
    assert metrics["t2i_r10"] == 100.0  # 7 images: every caption's image is in the top 10
    assert metrics["pointing_n"] > 0 and 0.0 < metrics["pointing_chance"] < 0.5
    assert 0.0 <= metrics["pointing_acc"] <= 1.0


# ------------------------------------------------------------------------------------------- relations protocol
RELATION_CAPTIONS = [
    "A red fox.",
    "A green frog!",
    "A blue whale.",
    "A yellow lemon.",
    "A purple plum.",
    "An orange carrot.",
    "A cyan teapot.",
]


@pytest.fixture()
def relation_stamps(tmp_path):
    root = tmp_path / "stamps"
    for i, caption in enumerate(RELATION_CAPTIONS):
        _stamp(root / f"folder{i}" / f"thing{i}.png", caption, COLOURS[i % len(COLOURS)])
    _stamp(root / "folder9" / "talk.png", "A stethoscope lets your doctor listen.")  # not a noun phrase
    return root


def _relation_free(text: str) -> list[str]:
    return sorted("X" if w in {"left", "right", "above", "below", "top", "bottom"} else w for w in text.split())


def test_relation_phrases_are_short_noun_phrases():
    from mklvisita.tasks.tuxpaint_relations import relation_phrase

    assert relation_phrase("A sitting gnu.") == "a sitting gnu"
    assert relation_phrase("A ripe, red tomato!") == "a ripe red tomato"
    assert relation_phrase("An apple. It is red.") == "an apple"
    assert relation_phrase("A peacock (a male peafowl).") == "a peacock"
    for caption in ("Big fireworks.", "A candy cane is a treat.", "It's a cep?", "A b c d e f g h.", "Balsam."):
        assert relation_phrase(caption) is None


def test_relation_scenes_place_stamps_as_their_captions_say(relation_stamps):
    from mklvisita.tasks.tuxpaint_relations import RelationScenes, relation_phrase

    layouts = {"row2": 3, "column2": 3, "row3": 3}
    scenes = RelationScenes(tuxpaint.find_stamps(relation_stamps), layouts, seed=2, size=120)
    again = RelationScenes(tuxpaint.find_stamps(relation_stamps), layouts, seed=2, size=120)
    assert len(scenes) == 9
    kinds = set()
    for i in range(len(scenes)):
        item = scenes[i]
        assert np.array_equal(np.asarray(item["image"]), np.asarray(again[i]["image"]))  # seeded
        masks = np.stack([o["mask"] for o in item["objects"]])
        assert masks.shape[1:] == (120, 120) and masks.sum(0).max() == 1 and all(m.any() for m in masks)
        heads = [o["phrase"].split()[-1] for o in item["objects"]]
        assert len(set(heads)) == len(heads) and "stethoscope" not in heads
        # reading order: left to right (rows) or top to bottom (columns)
        axis = 0 if item["layout"] == "column2" else 1
        centres = [np.nonzero(m)[axis].mean() for m in masks]
        assert centres == sorted(centres)
        first, second = item["objects"][0]["phrase"], item["objects"][1]["phrase"]
        word = "above" if item["layout"] == "column2" else "to the left of"
        if item["layout"] != "row3":
            assert item["captions"][0] == f"{first} {word} {second}"
        for caption, negative, kind in zip(item["captions"], item["negatives"], item["negative_kinds"]):
            assert caption != negative
            kinds.add(kind)
            if kind == "replace":
                assert len(set(negative.split()) - set(caption.split())) >= 1
                replaced = item["replaced"]  # the stamp the negative names another instead of
                assert replaced["phrase"] in caption and replaced["by"] in negative
                assert caption.replace(replaced["phrase"], replaced["by"]) == negative
                assert replaced["phrase"] in [o["phrase"] for o in item["objects"]]
                assert relation_phrase(replaced["stamp"].caption) == replaced["phrase"]
            else:  # reverse and swap: the same words up to the relation's, in another order or relation
                assert _relation_free(caption) == _relation_free(negative)
    assert kinds == {"reverse", "replace", "swap"}


def test_evaluate_relations_on_fake_stamps_gives_binding_per_kind_and_pointing(relation_stamps, monkeypatch):
    from mklvisita.tasks import tuxpaint_relations

    monkeypatch.setattr(tuxpaint_relations, "SCENES", {"row2": 2, "column2": 1, "row3": 2})
    torch.manual_seed(0)
    model = MKLVisITA(MKLVisITAConfig.tiny()).eval()
    data = load_eval_data(f"tuxpaint-relations:{relation_stamps}", "test")
    assert len(data.images) == 5 and len(data.captions) == len(data.negatives) == 15
    metrics = evaluate_model(model, Processor(model.config, model.tokenizer), data, k=4)
    for kind, n in (("reverse", 8), ("replace", 5), ("swap", 2)):
        assert metrics[f"binding_n_{kind}"] == n and 0.0 <= metrics[f"binding_acc_{kind}"] <= 1.0
    assert metrics["pointing_n"] == 12 and metrics["word_pointing_n"] > 0
    assert {"pointing_acc_gradcam", "word_pointing_acc_gradcam"} <= set(metrics)
    # the replaced stamp alone: one pair per scene, all three scores
    assert metrics["binding_n_replace_alone"] == 5
    for suffix in ("", "_sim", "_itm"):
        assert 0.0 <= metrics[f"binding_acc_replace_alone{suffix}"] <= 1.0
    with pytest.raises(ValueError, match="split"):
        load_eval_data(f"tuxpaint-relations:{relation_stamps}", "all")


def test_the_default_map_is_the_method_that_points_best(relation_stamps, monkeypatch):
    from mklvisita import pointing
    from mklvisita.tasks import tuxpaint_relations
    from training.photo_fusion_tune import choose_explain_method

    monkeypatch.setattr(tuxpaint_relations, "SCENES", {"row2": 2, "column2": 1, "row3": 2})
    torch.manual_seed(0)
    model = MKLVisITA(MKLVisITAConfig.tiny()).eval()
    proc = Processor(model.config, model.tokenizer)
    got = choose_explain_method(model, proc, ("gradcam", "attention"), "test", stamps=str(relation_stamps))
    assert got["explain_pointing_n"] == 12 and set(got["explain_pointing"]) == {"gradcam", "attention"}
    assert got["chosen_explain_method"] == max(got["explain_pointing"], key=got["explain_pointing"].get)
    # the rule itself: the higher pointing wins, a tie goes to the first method listed
    for acc, first, chosen in (((0.4, 0.6), "gradcam", "attention"), ((0.5, 0.5), "gradcam", "gradcam"),
                               ((0.5, 0.5), "attention", "attention")):  # fmt: skip
        fake = {"pointing_acc_gradcam": acc[0], "pointing_acc_attention": acc[1], "pointing_n": 12.0}
        monkeypatch.setattr(pointing, "pointing_game", lambda *a, fake=fake, **k: fake)
        order = (first, "attention" if first == "gradcam" else "gradcam")
        assert (
            choose_explain_method(model, proc, order, "test", stamps=str(relation_stamps))["chosen_explain_method"]
            == chosen
        )
