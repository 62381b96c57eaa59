"""Tasks: the spec registry, the shapes scene cache, positives masks and the training collate."""

import numpy as np
import pytest
import torch

from mklvisita import MKLVisITA, MKLVisITAConfig
from mklvisita.data import ShapesScenes, holds
from mklvisita.data.shapes import OPPOSITE, Claim
from mklvisita.inputs import Processor
from mklvisita.tasks import PairOptions, TaskError, TrainCollate, caption_positives, get_task, pixel_values_uint8
from mklvisita.tasks.shapes import ShapesTrainPairs, cache_key


def test_registry_resolves_every_spec_form_in_one_place():
    assert get_task("shapes").name == "shapes" and get_task("shapes-compositional").name == "shapes"
    for spec in ("karpathy:/d/a.json:/d/img", "lavis:/d/a.json:/d/img", "hf:nlphuji/flickr30k"):
        assert get_task(spec).name == "karpathy"
    assert get_task("tuxpaint").name == "tuxpaint" and get_task("tuxpaint:/some/folder").name == "tuxpaint"
    with pytest.raises(TaskError, match="accepted forms"):
        get_task("coco")
    with pytest.raises(TaskError, match="held-out test split"):
        get_task("shapes-compositional").train_pairs("shapes-compositional", "train")
    with pytest.raises(TaskError, match="evaluation only"):
        get_task("tuxpaint").train_pairs("tuxpaint", "train")
    assert "circle" in get_task("shapes").vocabulary and get_task("hf:x").vocabulary == []


def test_cached_pairs_equal_freshly_rendered_scenes(tmp_path):
    pairs = ShapesTrainPairs("train", 6, seed=3, cache_dir=str(tmp_path))
    again = ShapesTrainPairs("train", 6, seed=3, cache_dir=str(tmp_path))  # read back from disk
    fresh = ShapesScenes("train", size=6, seed=3)
    assert len(list((tmp_path / "shapes").iterdir())) == 1  # one complete folder, no .tmp left
    for index in (0, 7, 29):
        scene, k = divmod(index, 5)
        ref = fresh[scene]
        for item in (pairs[index], again[index]):
            assert np.array_equal(item["image"], np.asarray(ref["image"]))
            assert item["caption"] == ref["captions"][k] and item["negative"] == ref["negatives"][k]
            assert item["image_id"] == scene and item["image_size"] == 64
            for got, want in zip(item["objects"], ref["objects"], strict=True):
                assert np.array_equal(got["mask"], want["mask"]) and got["phrase"] == want["phrase"]
    # the key changes with anything that changes the scenes
    keys = {cache_key(ShapesScenes("train", size=6, seed=s, image_size=px)) for s in (3, 4) for px in (48, 64)}
    assert len(keys) == 4


def test_uint8_fast_path_equals_the_processor():
    model = MKLVisITA(MKLVisITAConfig.tiny())
    proc = Processor(model.config, model.tokenizer)
    arrays = [np.asarray(ShapesScenes("val", size=2)[i]["image"]) for i in range(2)]
    fast = pixel_values_uint8(arrays, proc)
    slow, _ = proc.images(arrays)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert pixel_values_uint8([a[:32, :32] for a in arrays], proc) is None  # not at the model's size: no shortcut


def test_shapes_positives_against_brute_force_holds(tmp_path):
    pairs = get_task("shapes").train_pairs("shapes", "train", PairOptions(size=40, seed=0, cache_dir=str(tmp_path)))
    items = [pairs[i] for i in range(0, 200, 5)]  # one caption of each of 40 scenes
    pos = get_task("shapes").positives(items)
    # brute force from scratch: re-generate every scene and evaluate every claim on every scene
    scenes = ShapesScenes("train", size=40, seed=0)
    structs = [scenes.scene(i) for i in range(40)]
    brute = torch.tensor([[holds(b.claims[0], a.objects, 64) for b in structs] for a in structs])
    assert torch.equal(pos, brute) and pos.diagonal().all()
    assert int(pos.sum()) == int(brute.sum()) > len(items)  # "two shapes", "a blue star" hold for other scenes too


def test_caption_positives_are_same_image_or_identical_text():
    items = [
        {"caption": c, "image_id": i}
        for c, i in (("A dog runs.", 0), ("a dog  runs.", 1), ("A cat sleeps.", 2), ("A puppy plays.", 0))
    ]
    expected = torch.tensor(
        [
            [True, True, False, True],
            [True, True, False, False],  # image 1 has only "a dog runs."
            [False, False, True, False],
            [True, True, False, True],  # image 0 (again) also has "A dog runs.", so caption 1 is true of it
        ]
    )
    assert torch.equal(caption_positives(items), expected)
    assert get_task("hf:x").positives(items).equal(expected)


def test_collate_gives_positives_and_dense_targets(tmp_path):
    model = MKLVisITA(MKLVisITAConfig.tiny())
    proc = Processor(model.config, model.tokenizer)
    task = get_task("shapes")
    pairs = task.train_pairs("shapes", "train", PairOptions(size=8, seed=0, cache_dir=str(tmp_path)))
    items = [pairs[i] for i in range(8)]
    batch = TrainCollate(proc, task, hard_negatives=True, dense=True, grid=model.vision.grid)(items)
    assert batch["pixel_values"].shape == (8, 3, 64, 64) and batch["positives"].shape == (8, 8)
    assert batch["positives"][:5, :5].all()  # five captions of scene 0
    assert batch["neg_input_ids"].shape[0] == 8
    assert batch["patch_labels"].shape == (8, 3, 64)
    assert batch["word_targets"].shape == (8, batch["input_ids"].shape[1], 64)
    assert float(batch["word_targets"].sum()) > 0


def test_builtin_tokenizer_keeps_every_shapes_word_whole_without_importing_the_task():
    from mklvisita.data import SHAPES_VOCABULARY
    from mklvisita.tokenizer import _vocabulary, builtin_tokenizer

    tok = builtin_tokenizer()
    assert all(tok.tokenize(w) == [w] for w in SHAPES_VOCABULARY)
    # the same ids as when the tokenizer appended the shapes vocabulary itself (trained checkpoints stay valid)
    assert tok.get_vocab() == {t: i for i, t in enumerate(_vocabulary(list(SHAPES_VOCABULARY)))}


# ------------------------------------------------------------------------------------------------- evaluation
def test_binding_by_kind_on_a_hand_made_case():
    from mklvisita.evaluation import binding_metrics

    pos = np.array([0.9, 0.2, 0.5, 0.7, 0.6, 0.4])
    neg = np.array([0.1, 0.3, 0.5, 0.2, 0.1, 0.8])  # wins: yes, no, tie (a miss), yes, yes, no
    kinds = ["swap", "swap", "reverse", "change", "count", "count"]
    out = binding_metrics(pos, neg, kinds)
    assert out["binding_acc"] == pytest.approx(3 / 6)
    assert (out["binding_acc_swap"], out["binding_acc_reverse"]) == (0.5, 0.0)
    assert (out["binding_acc_change"], out["binding_acc_count"]) == (1.0, 0.5)
    assert out["binding_n_swap"] == 2 and out["binding_n_count"] == 2
    itm = binding_metrics(pos, neg, kinds, "_itm")
    assert itm["binding_acc_swap_itm"] == 0.5 and not any(k.startswith("binding_n") for k in itm)


def test_shapes_eval_data_reports_count_negatives_apart():
    data = get_task("shapes").load_eval_data("shapes", "test", limit=30)
    scenes = ShapesScenes("test", size=30)
    claims = [c for i in range(30) for c in scenes.scene(i).claims]
    assert len(data.negative_kinds) == len(data.captions) == len(claims) == 150 and data.k == 16
    for claim, kind in zip(claims, data.negative_kinds):
        assert (kind == "count") == (claim.kind == "count")
    assert {"swap", "reverse", "change", "count"} <= set(data.negative_kinds)
    assert get_task("shapes-compositional").load_eval_data("shapes-compositional", limit=2).split == (
        "test_compositional"
    )


def test_word_pointing_targets_are_the_colour_and_shape_words_of_each_named_object():
    from mklvisita.data.grounding import claim_assignment
    from mklvisita.tasks.shapes import word_pointing_examples

    scenes = ShapesScenes("test", size=20)
    examples = list(word_pointing_examples(scenes))
    assert examples and all(len(ex["targets"]) >= 2 for ex in examples)
    for ex in examples:
        words = ex["caption"].split()
        for w, mask in ex["targets"]:
            assert words[w] in {"red", "green", "blue", "yellow", "purple", "orange", "white"} | {
                "circle",
                "square",
                "triangle",
                "star",
                "cross",
                "diamond",
            }
            assert mask.any()
    # one by hand: the first example's shape words point at the objects the claim is about
    i = next(i for i in range(20) if any(len(c.descs) >= 2 for c in scenes.scene(i).claims))
    scene, item = scenes.scene(i), scenes[i]
    claim = next(c for c in scene.claims if len(c.descs) >= 2)
    chosen = claim_assignment(claim, scene.objects, 64)
    ex = examples[0]
    assert ex["caption"] == claim.text()
    shape_targets = [(w, m) for w, m in ex["targets"] if ex["caption"].split()[w] in {o.shape for o in scene.objects}]
    for (w, mask), j in zip(shape_targets, chosen):
        assert np.array_equal(mask, item["objects"][j]["mask"]) and ex["caption"].split()[w] == scene.objects[j].shape


def test_shapes_evaluation_gives_per_kind_binding_and_both_pointing_games(tmp_path):
    from conftest import micro_config

    from mklvisita.evaluation import evaluate_model, load_eval_data

    model = MKLVisITA(micro_config()).eval()
    data = load_eval_data("shapes", "test", limit=4)
    out = evaluate_model(model, Processor(model.config, model.tokenizer), data, k=3)
    for kind in set(data.negative_kinds):
        for suffix in ("", "_itm", "_sim"):
            assert 0.0 <= out[f"binding_acc_{kind}{suffix}"] <= 1.0
    assert {"binding_acc", "binding_acc_itm", "binding_acc_sim", "pointing_acc", "word_pointing_acc"} <= set(out)
    assert 0.0 < out["word_pointing_chance"] < 0.1 and 0.0 < out["pointing_chance"] < 0.1
    assert out["word_pointing_n"] > 0


def test_evaluate_cli_limit_and_no_extra(tiny_checkpoint, tmp_path):
    import json

    from training.evaluate import main

    out = tmp_path / "m.json"
    args = ["--checkpoint", str(tiny_checkpoint), "--data", "shapes", "--limit", "3", "--k", "2", "--out", str(out)]
    assert main([*args, "--no-extra"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["meta"]["n_images"] == 3 and "binding_acc_sim" in metrics
    assert not any("pointing" in key for key in metrics)


def test_shapes_reverse_rate_trains_relations_against_their_reversal(tmp_path):
    opts = {"size": 60, "seed": 0, "cache_dir": str(tmp_path)}
    plain = get_task("shapes").train_pairs("shapes", "train", PairOptions(**opts))
    rev = get_task("shapes").train_pairs("shapes", "train", PairOptions(**opts, reverse_rate=1.0))
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    relations = changed = 0
    for i in range(len(plain)):
        a, b = plain[i], rev[i]
        assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])  # scenes untouched
        if a["claim"].kind != "relation":
            assert a["negative"] == b["negative"]
            continue
        relations += 1
        changed += a["negative"] != b["negative"]
        word = next(w for w in opposite if w in a["caption"])
        claim = b["claim"]
        if holds(Claim("relation", claim.descs, OPPOSITE[claim.relation]), b["scene_objects"], 64):
            assert b["negative"] == a["negative"]  # "a small square above a small square": its reversal holds too
        else:
            assert b["negative"] == a["caption"].replace(word, opposite[word])  # the claim, relation reversed
    assert relations > 20 and changed > 0  # some relation negatives were attribute swaps before
    with pytest.raises(ValueError, match="reverse_rate"):
        get_task("shapes").train_pairs("shapes", "train", PairOptions(**opts, reverse_rate=1.5))
