"""Clip-art composites on a fake clip-art folder the test writes (the real openclipart package is not needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mklvisita.config import MKLVisITAConfig
from mklvisita.data import clipart as art
from mklvisita.data import composite_claims as claims
from mklvisita.data import composites as comp
from mklvisita.inputs import Processor
from mklvisita.model import MKLVisITA
from mklvisita.tasks import PairOptions, get_task
from mklvisita.tasks import composites as task

NOUNS = [
    "apple", "lion", "guitar", "house", "boat", "tree", "clock", "kite", "drum", "chair", "lamp", "horse",
    "teapot", "rocket", "candle", "bicycle", "anchor", "violin", "turtle", "castle", "banana", "bucket",
]  # fmt: skip
PAINT = [(200, 30, 35), (40, 90, 200), (60, 150, 50), (240, 215, 40), (120, 50, 150), (240, 130, 25)]


def _art(path, title: str, colour, mode: str = "RGBA", author: str = "Tester") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((60, 48, 4), np.uint8)
    a[6:-6, 6:-6] = (*colour, 255)  # an opaque body inside a transparent border
    info = PngInfo()
    info.add_text("Title", title)
    info.add_text("Author", author)
    Image.fromarray(a, "RGBA").convert(mode).save(path, pnginfo=info)


@pytest.fixture()
def clipart(tmp_path, monkeypatch):
    root = tmp_path / "png"
    for i, noun in enumerate(NOUNS):
        _art(root / "things" / f"{noun}_someone_01.png", noun.title(), PAINT[i % len(PAINT)])
    _art(root / "food" / "pineapple_02.png", "Clipart by Someone - pear", PAINT[0])  # title of another drawing
    _art(root / "food" / "pear_03.png", "Clipart by Someone - pear", PAINT[3])  # cleaned to "pear"
    _art(root / "shapes" / "star_01.png", "Star", PAINT[1])  # a skipped tree
    _art(root / "things" / "collection_01.png", "Various Cliparts", PAINT[2])  # generic
    _art(root / "things" / "opaque_box_01.png", "Opaque box", PAINT[2], mode="RGB")  # no transparency
    _art(root / "things" / "gatto_01.png", "Gatto", PAINT[2], author=art.NON_ENGLISH_AUTHORS[0])
    monkeypatch.setenv(art.ROOT_ENV, str(root))
    art.find_clipart.cache_clear()
    library = art.ClipArtLibrary()
    if min(len({library.arts[i].noun for i in library.indices(s)}) for s in ("train", "val")) < 4:
        pytest.skip("the fake titles put fewer than four in a split")  # NOUNS is chosen so that this does not happen
    return library


def test_clipart_index_keeps_specific_titles_that_fit_their_file(clipart):
    nouns = {a.noun for a in clipart.arts}
    assert nouns == set(NOUNS) | {"pear"}
    assert {a.relative for a in clipart.arts if a.noun == "pear"} == {"food/pear_03.png"}


def test_split_by_title_is_disjoint_and_scenes_draw_from_their_split(clipart):
    train = {clipart.arts[i].noun for i in clipart.indices("train")}
    val = {clipart.arts[i].noun for i in clipart.indices("val")}
    assert train and val and not train & val and train | val == {a.noun for a in clipart.arts}
    assert all(art.title_split(n) == "val" for n in val)
    for split, allowed in (("train", train), ("test", val)):
        scenes = comp.ClipArtScenes(split, size=12, image_size=96, library=clipart)
        for i in range(len(scenes)):
            scene = scenes[i]["scene"]
            assert {o.noun for o in scene.objects} <= allowed
            said = {d.noun for c in scene.claims + scene.negative_claims for d in c.descs}
            assert said <= allowed


def test_scenes_are_a_function_of_the_seed(clipart):
    a = comp.ClipArtScenes("train", size=4, seed=3, image_size=96, library=clipart)
    b = comp.ClipArtScenes("train", size=4, seed=3, image_size=96, library=clipart)
    c = comp.ClipArtScenes("train", size=4, seed=4, image_size=96, library=clipart)
    for i in (2, 0, 3):  # any order
        x, y = a[i], b[i]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
        assert x["captions"] == y["captions"] and x["negatives"] == y["negatives"]
    assert any(not np.array_equal(np.asarray(a[i]["image"]), np.asarray(c[i]["image"])) for i in range(4))


def test_objects_do_not_overlap_and_masks_stay_inside_the_canvas(clipart):
    scenes = comp.ClipArtScenes("train", size=30, image_size=96, library=clipart)
    counts = set()
    for i in range(len(scenes)):
        item = scenes[i]
        masks = np.stack([o["mask"] for o in item["objects"]])
        counts.add(len(masks))
        assert masks.shape[1:] == (96, 96) and np.asarray(item["image"]).shape == (96, 96, 3)
        assert masks.sum(0).max() == 1 and all(m.any() for m in masks)  # disjoint, none empty
        for o in item["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            ys, xs = np.nonzero(o["mask"])
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    assert counts == {1, 2, 3}


def test_captions_hold_and_negatives_do_not(clipart):
    scenes = comp.ClipArtScenes("train", size=40, image_size=96, library=clipart)
    kinds = set()
    for i in range(len(scenes)):
        item = scenes[i]
        scene = item["scene"]
        for claim, neg, kind in zip(scene.claims, scene.negative_claims, scene.negative_kinds):
            assert claims.holds(claim, scene.objects, 96)
            assert not claims.holds(neg, scene.objects, 96)
            assert neg.text() != claim.text()
            kinds.add(kind)
            if kind == "reverse":
                assert neg.descs == claim.descs and neg.relation == claims.OPPOSITE[claim.relation]
            if kind == "replace":
                assert {d.noun for d in neg.descs} - {o.noun for o in scene.objects}
    assert {"reverse", "replace", "count"} <= kinds


def test_undirected_relations_hold_both_ways_and_have_no_verdict(clipart, tmp_path):
    plain = comp.ClipArtScenes("train", size=30, image_size=96, library=clipart)
    off = comp.ClipArtScenes("train", size=30, image_size=96, library=clipart, undirected_rate=0.0)
    assert [plain[i]["captions"] for i in range(30)] == [off[i]["captions"] for i in range(30)]
    with pytest.raises(ValueError, match="undirected_rate"):
        comp.ClipArtScenes("train", size=3, library=clipart, undirected_rate=1.5)
    pairs = task.CompositePairs("train", 60, 0, image_size=96, cache_dir=str(tmp_path), undirected_rate=1.0)
    assert "-u1-" in task.cache_key(pairs.scenes) and "-u" not in task.cache_key(plain)
    items = [pairs[i] for i in range(len(pairs)) if pairs[i]["claim"].relation == claims.UNDIRECTED]
    assert {it["caption"].split(" ")[2] for it in items} & {"beside", "next", "near"}
    assert len({it["claim"].template for it in items}) == len(claims.UNDIRECTED_WORDS)
    for it in items:
        claim, objects = it["claim"], it["scene_objects"]
        assert any(w in it["caption"] for w in claims.UNDIRECTED_WORDS)
        backwards = claims.Claim("relation", claim.descs[::-1], claim.relation, template=claim.template)
        assert claims.holds(claim, objects, 96) and claims.holds(backwards, objects, 96)
        assert it["negative_kind"] != "reverse" and not claims.holds(it["negative_claim"], objects, 96)
    model = MKLVisITA(MKLVisITAConfig.tiny())
    out = task.dense_targets(items[:4], Processor(model.config, model.tokenizer), 32, (6, 6))
    assert (out["relation_targets"] == -1).all()  # no verdict, and a relation gate target of 0
    assert (out["word_targets"].sum(-1) > 0).any(-1).all()  # both objects still grounded


def test_photo_style_draws_objects_less_like_clip_art_and_is_off_by_default(clipart, tmp_path):
    plain = comp.ClipArtScenes("train", size=20, image_size=96, library=clipart)
    off = comp.ClipArtScenes("train", size=20, image_size=96, library=clipart, photo_style=0.0)
    for i in range(20):  # at 0 the generator draws exactly what it drew without the option
        assert np.array_equal(np.asarray(plain[i]["image"]), np.asarray(off[i]["image"]))
        assert plain[i]["captions"] == off[i]["captions"]
    with pytest.raises(ValueError, match="photo_style"):
        comp.ClipArtScenes("train", size=3, library=clipart, photo_style=-0.1)
    styled = comp.ClipArtScenes("train", size=20, image_size=96, library=clipart, photo_style=1.0)
    assert "photo_style=1.0" in repr(styled) and "photo_style" not in repr(plain)
    # the fake clip art is flat colour: styled, an object's pixels vary (texture, falloff) and stay inside its mask
    for i in range(20):
        item = styled[i]
        rgb = np.asarray(item["image"]).astype(float)
        for o in item["objects"]:
            inner = o["mask"] & np.roll(o["mask"], 2, 0) & np.roll(o["mask"], -2, 0)  # away from the blurred edge
            inner &= np.roll(o["mask"], 2, 1) & np.roll(o["mask"], -2, 1)
            if inner.sum() > 20:
                assert rgb[inner].std(0).max() > 2.0
    flat = plain[0]
    o = flat["objects"][0]
    assert np.asarray(flat["image"]).astype(float)[o["mask"]].std(0).max() < 20.0  # jitter and noise only
    # a styled object keeps its alpha (the mask the generator places and grounds words on)
    rgba = np.zeros((30, 24, 4), np.uint8)
    rgba[3:-3, 3:-3] = (200, 30, 35, 255)
    out = comp.photo_like(rgba, np.random.default_rng(0))
    assert np.array_equal(out[..., 3], rgba[..., 3]) and out[3:-3, 3:-3, :3].std() > 1.0
    options = PairOptions(size=8, seed=0, image_size=96, cache_dir=str(tmp_path), photo_style=0.5)
    pairs = get_task("composites").train_pairs("composites", "train", options)
    assert "-p0.5-" in task.cache_key(pairs.scenes) and "-p0" not in task.cache_key(plain)


def test_colour_words_come_from_the_objects_pixels(clipart):
    scenes = comp.ClipArtScenes("train", size=30, image_size=96, library=clipart, jitter=False)
    named = {}
    for i in range(len(scenes)):
        for o in scenes[i]["scene"].objects:
            named[o.noun] = o.colour
    paint = {noun: PAINT[i % len(PAINT)] for i, noun in enumerate(NOUNS)}
    names = {PAINT[0]: "red", PAINT[1]: "blue", PAINT[2]: "green", PAINT[3]: "yellow", PAINT[4]: "purple"}
    checked = [n for n in named if paint.get(n) in names]
    assert checked and all(named[n] == names[paint[n]] for n in checked)


def test_positives_mark_a_caption_true_of_another_scene(clipart, tmp_path):
    pairs = get_task("composites").train_pairs(
        "composites", "train", PairOptions(size=24, seed=0, image_size=96, cache_dir=str(tmp_path / "cache"))
    )
    assert len(pairs) == 24 * 4 and (tmp_path / "cache" / "composites").is_dir()
    items = [pairs[i] for i in range(0, len(pairs), 2)]
    pos = task.positives(items)
    assert pos.diagonal().all()
    for i, a in enumerate(items):
        for j, b in enumerate(items):
            expected = i == j or claims.holds(b["claim"], a["scene_objects"], 96)
            assert bool(pos[i, j]) == expected
    off = pos & ~torch.eye(len(items), dtype=torch.bool)
    assert off.any()  # some caption ("there is a lion") is true of another scene of the batch
    # the cached item is the rendered scene
    again = comp.ClipArtScenes("train", size=24, seed=0, image_size=96, library=clipart)[3]
    assert np.array_equal(pairs[3 * 4]["image"], np.asarray(again["image"]))


def test_description_spans_find_every_object_in_a_list():
    descs = (claims.Desc("apple", "red"), claims.Desc("lion"), claims.Desc("cup"))
    claim = claims.Claim("and", descs, template=1)
    assert claim.text() == "a picture of a red apple, a lion and a cup"
    assert task.description_spans(claim) == [(4, 6), (7, 8), (10, 11)]


def test_dense_targets_point_words_at_their_objects_and_judge_the_relation(clipart, tmp_path):
    pairs = task.CompositePairs("train", 40, 0, image_size=96, cache_dir=str(tmp_path))
    model = MKLVisITA(MKLVisITAConfig.tiny())
    processor = Processor(model.config, model.tokenizer)
    items = [pairs[i] for i in range(len(pairs)) if pairs[i]["claim"].kind in ("relation", "sides")][:6]
    reversed_ = [it for it in items if it["negative_kind"] == "reverse"]
    assert items and reversed_
    out = task.dense_targets(items, processor, 32, (6, 6))
    wt, rt = out["word_targets"], out["relation_targets"]
    assert wt.shape == (len(items), 32, 36) and rt.shape == (len(items), 2, 32)
    for b, it in enumerate(items):
        rows = wt[b].sum(-1)
        assert torch.allclose(rows[rows > 0], torch.ones_like(rows[rows > 0]))
        words, token_word = processor.words(it["caption"])
        for t, w in enumerate(token_word[:32]):
            if w is not None and words[w] in claims.RELATION_WORD_SET:
                assert rt[b, 0, t] == 1 and wt[b, t].sum() == 0
        assert (rt[b, 0] == 1).any()
        assert (rt[b, 1] == 0).any() == (it["negative_kind"] == "reverse")


def test_evaluation_reports_binding_per_kind_and_pointing(clipart, monkeypatch):
    from mklvisita.evaluation import evaluate_model, load_eval_data

    monkeypatch.setattr(task, "POINTING_SCENES", 3)
    torch.manual_seed(0)
    model = MKLVisITA(MKLVisITAConfig.tiny()).eval()
    data = load_eval_data("composites", "test", limit=6)
    assert len(data.images) == 6 and len(data.captions) == len(data.negatives) == 24
    metrics = evaluate_model(model, Processor(model.config, model.tokenizer), data, k=4)
    assert 0.0 <= metrics["binding_acc"] <= 1.0 and metrics["pointing_n"] > 0
    assert sum(v for k, v in metrics.items() if k.startswith("binding_n_")) == 24
    with pytest.raises(ValueError, match="held-out"):
        load_eval_data("composites", "train")
