"""Unit tests of app.py's handlers, called directly with a tiny random-checkpoint Matcher (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from tests.app_fixtures import CAT, EXAMPLES, ROOT, SHAPES, app_checkpoint, matcher  # noqa: F401


def captions_text(*captions: str) -> str:
    return "\n".join(captions)


# ------------------------------------------------------------------------------------------------ input checks


def test_parse_captions_drops_blank_lines_and_enforces_limits() -> None:
    assert app.parse_captions("  a cat \n\n\t\na dog\n", 16) == ["a cat", "a dog"]
    with pytest.raises(gr.Error, match="at least one caption"):
        app.parse_captions(" \n \n", 16)
    with pytest.raises(gr.Error, match="17 captions given; the limit is 16"):
        app.parse_captions("\n".join(f"caption {i}" for i in range(17)), 16)
    with pytest.raises(gr.Error, match="Caption 2 is 5,000 characters long"):
        app.parse_captions("fine\n" + "x" * 5000, 16)


def test_bad_images_give_clear_errors(tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a PNG")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(CAT.read_bytes()[:2000])
    with pytest.raises(gr.Error, match="missing"):
        app.read_image(None)
    for bad in (not_an_image, empty, truncated):
        with pytest.raises(gr.Error) as info:
            app.read_image(str(bad))
        assert bad.name in info.value.message or "could not be read" in info.value.message
    with pytest.raises(gr.Error, match="9 images given; the limit is 8"):
        app.read_images([str(CAT)] * 9, app.MAX_MATRIX_IMAGES)


def test_large_uploads_are_shrunk_before_the_model_sees_them(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), (10, 200, 30)).save(big)
    image = app.read_image(str(big))
    assert image.size == (app.MAX_SIDE, app.MAX_SIDE // 2)
    assert app.read_image(str(CAT)).size == Image.open(CAT).size  # small ones are left alone


def test_image_digest_depends_on_pixels_only(tmp_path: Path) -> None:
    a = app.read_image(str(CAT))
    copy = tmp_path / "copy.png"
    a.save(copy)
    assert app.image_digest(app.read_image(str(copy))) == app.image_digest(a)
    b = a.copy()
    b.putpixel((0, 0), (0, 0, 0) if a.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    assert app.image_digest(b) != app.image_digest(a)


# ------------------------------------------------------------------------------------------------ handlers


def test_match_ranks_captions_by_itm_and_splits_similarity_by_kernel(matcher) -> None:  # noqa: F811
    captions = ["a purple cross", "a yellow star", "two shapes", "a red circle"]
    table, fig, result, selector = app.match(matcher, str(SHAPES[0]), captions_text(*captions))

    direct = matcher.score([Image.open(SHAPES[0]).convert("RGB")], captions)
    ranking = result["ranking"]
    assert [row["rank"] for row in ranking] == [1, 2, 3, 4]
    assert sorted(row["caption"] for row in ranking) == sorted(captions)
    itms = [row["itm"] for row in ranking]
    assert itms == sorted(itms, reverse=True)
    for row in ranking:
        j = captions.index(row["caption"])
        assert row["itm"] == pytest.approx(float(direct.itm[0, j]), abs=1e-5)
        assert row["similarity"] == pytest.approx(float(direct.similarity[0, j]), abs=1e-5)
        assert list(row["kernel_contributions"]) == list(direct.kernel_names)
        assert sum(row["kernel_contributions"].values()) == pytest.approx(row["similarity"], abs=1e-4)
    assert list(table["caption"]) == [row["caption"] for row in ranking]
    assert isinstance(fig, Image.Image) and fig.height > 100  # the contribution bars, drawn by mklvisita.figures
    assert selector.value == ranking[0]["caption"]
    json.dumps(result)  # the /match payload must be plain JSON


def test_match_cache_is_per_checkpoint(matcher) -> None:  # noqa: F811
    cache = app.ResultCache()
    first = app.match(matcher, str(CAT), "a cat\na cup", cache=cache)[2]
    again = app.match(matcher, str(CAT), "a cat\na cup", cache=cache)[2]
    assert cache.hits == 1 and again == first
    other = app.ResultCache()  # a newly loaded checkpoint starts with an empty cache: outputs are recomputed
    app.match(matcher, str(CAT), "a cat\na cup", cache=other)
    assert other.hits == 0 and len(other) == 1


def test_explain_overlays_one_heatmap_per_word_at_the_image_size(matcher) -> None:  # noqa: F811
    image = Image.open(CAT).convert("RGB")
    heat, gallery, selector, kernels, info = app.explain(matcher, str(CAT), "a tabby cat on a rug")
    heat = np.asarray(heat)
    assert heat.shape == (image.height, image.width, 3) and heat.dtype == np.uint8
    assert not np.array_equal(heat, np.asarray(image))  # something was drawn over the photo
    assert info["tokens"] == [word for _, word in gallery] == ["a", "tabby", "cat", "on", "a", "rug"]
    assert all(np.asarray(overlay).shape == heat.shape for overlay, _ in gallery)
    assert selector.value == "a"
    local = [name for name in matcher.kernel_weights() if name.startswith("local/")]
    assert [name for _, name in kernels] == local  # one map per local kernel, for the selected word
    for x, y in info["word_peaks"].values():
        assert 0 <= x < image.width and 0 <= y < image.height
    json.dumps(info)


def test_explain_scale_and_word_selection(matcher) -> None:  # noqa: F811
    caption = "a purple cross and a yellow star"
    _, per_map = app._explanation(matcher, str(SHAPES[2]), caption, -1, "attention", "per_map", None)
    _, shared = app._explanation(matcher, str(SHAPES[2]), caption, -1, "attention", "shared", None)
    assert np.allclose(per_map.word_heatmaps.max(axis=(1, 2)), 1.0, atol=1e-4)  # every word on its own scale
    assert shared.word_heatmaps.max() == pytest.approx(1.0, abs=1e-4)  # one scale for all words
    assert shared.word_heatmaps.max(axis=(1, 2)).min() < 1.0 - 1e-4
    cache = app.ResultCache()
    app.explain(matcher, str(SHAPES[2]), caption, cache=cache)
    selected, kernels = app.select_word(
        matcher, str(SHAPES[2]), caption, app.DEFAULT_LAYER, "gradcam", "per_map", "star", cache
    )
    assert selected.selected_index == 6 and cache.sub("explain", 1).hits == 1  # reused, not recomputed
    assert len(kernels) == len([n for n in matcher.kernel_weights() if n.startswith("local/")])
    with pytest.raises(gr.Error, match="not a word of the explained caption"):
        app.select_word(matcher, str(SHAPES[2]), caption, app.DEFAULT_LAYER, "gradcam", "per_map", "circle", cache)


def test_explain_rejects_a_missing_fusion_layer_and_unknown_options(matcher) -> None:  # noqa: F811
    n = len(matcher.fusion_kernel_weights())
    assert n > 0
    with pytest.raises(gr.Error, match="does not exist"):
        app.explain(matcher, str(CAT), "a cat", layer=n)
    assert app.explain(matcher, str(CAT), "a cat", layer=n - 1, method="attention")[4]["layer"] == n - 1
    with pytest.raises(gr.Error, match="Unknown method"):
        app.explain(matcher, str(CAT), "a cat", method="magic")
    with pytest.raises(gr.Error, match="Unknown scale"):
        app.explain(matcher, str(CAT), "a cat", scale="log")
    with pytest.raises(gr.Error, match="at least one caption"):
        app.explain(matcher, str(CAT), "   ")


def test_overlay_colours_the_hot_spot() -> None:
    image = Image.new("RGB", (40, 30), (128, 128, 128))
    heat = np.zeros((30, 40), np.float32)
    heat[10, 20] = 1.0
    out = np.asarray(app.overlay(image, heat))
    assert out.shape == (30, 40, 3)
    assert not np.array_equal(out[10, 20], out[0, 0])


def test_matrix_scores_every_pair_and_marks_best_matches(matcher) -> None:  # noqa: F811
    files = [str(p) for p in SHAPES[:3]]
    captions = ["a purple cross", "a yellow star"]
    fig, best, result = app.matrix(matcher, files, captions_text(*captions), "itm")
    assert isinstance(fig, Image.Image)
    direct = matcher.score([Image.open(f).convert("RGB") for f in files], captions)
    assert np.allclose(result["itm"], direct.itm, atol=1e-5)
    assert np.allclose(result["similarity"], direct.similarity, atol=1e-5)
    assert result["images"] == [Path(f).name for f in files]
    rows = best[best["direction"] == "image → caption"]
    assert list(rows["best match"]) == [captions[j] for j in np.asarray(direct.itm).argmax(1)]
    assert len(best) == len(files) + len(captions)
    with pytest.raises(gr.Error, match="the limit is 8"):
        app.matrix(matcher, files, captions_text(*[f"c{i}" for i in range(9)]))
    with pytest.raises(gr.Error, match="Unknown score"):
        app.matrix(matcher, files, "a cat", "loss")


def test_search_both_ways_over_the_example_gallery(matcher) -> None:  # noqa: F811
    gallery = app.load_example_gallery()
    images, captions, timings = app.search(matcher, "a purple cross", str(CAT), None, "", 3, example_gallery=gallery)
    assert len(images) == 3 and all(label.startswith(f"#{i}") for i, (_, label) in enumerate(images, 1))
    assert {path for path, _ in images} <= set(gallery.paths)
    assert len(captions) == 3 and set(captions["caption"]) <= set(gallery.captions)
    assert list(captions["rank"]) == [1, 2, 3]
    assert any(k.startswith("text→image") for k in timings) and any(k.startswith("image→text") for k in timings)
    assert all(v >= 0 for v in timings.values())


def test_search_over_uploaded_images_and_captions(matcher) -> None:  # noqa: F811
    files = [str(p) for p in SHAPES[:2]]
    images, captions, _ = app.search(matcher, "a star", str(SHAPES[0]), files, "a star\na cross\na circle", 16)
    assert len(images) == 2 and len(captions) == 3  # top k is capped by the gallery size
    with pytest.raises(gr.Error, match="text query"):
        app.search(matcher, "  ", None, files, "", 3)
    with pytest.raises(gr.Error, match="top k"):
        app.search(matcher, "a star", None, files, "", 0)


def test_model_info_shows_weights_card_and_metrics(matcher) -> None:  # noqa: F811
    global_plot, levels_plot, table, card, metrics = app.model_info(matcher)
    assert isinstance(global_plot, Image.Image) and isinstance(levels_plot, Image.Image)
    weights = matcher.kernel_weights()
    assert list(table.columns[1:]) == list(weights)
    assert len(table) == 1 + len(matcher.fusion_kernel_weights())
    assert table.iloc[0, 1:].sum() == pytest.approx(1.0, abs=1e-3)
    assert isinstance(card, str) and card
    assert isinstance(metrics, dict)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_allow_list_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(app.CHECKPOINTS_ENV, " c/d , a/b ,")
    args = app.parse_args(["--checkpoint", "a/b", "--checkpoint", "e/f@v1"])
    assert app.allowed_checkpoints(args.checkpoint) == [app.DEFAULT_CHECKPOINT, "a/b", "e/f@v1", "c/d"]


def test_registry_refuses_checkpoints_outside_the_allow_list(matcher) -> None:  # noqa: F811
    loaded: list[str] = []

    def loader(spec: str):
        loaded.append(spec)
        if spec == "broken/one":
            raise ValueError("no config.json in broken/one")
        return matcher

    registry = app.Registry(matcher, ["ok/one", "ok/two", "broken/one"], loader=loader, max_loaded=2)
    with pytest.raises(gr.Error, match="not in this demo's allow-list"):
        registry.get("evil/model")
    with pytest.raises(gr.Error, match="not in this demo's allow-list"):
        registry.get("../../etc")
    assert loaded == []  # refused before any load was attempted
    assert registry.get("ok/one").matcher is matcher
    assert registry.get("ok/one") is registry.get("ok/one") and loaded == ["ok/one"]
    registry.get("ok/two")  # evicts ok/one; the default stays pinned
    assert registry.is_loaded(app.DEFAULT_CHECKPOINT) and registry.is_loaded("ok/two")
    assert not registry.is_loaded("ok/one")
    with pytest.raises(gr.Error, match="Could not load checkpoint 'broken/one'"):
        registry.get("broken/one")


def test_load_checkpoint_reads_a_local_directory_and_a_revision(app_checkpoint, monkeypatch) -> None:  # noqa: F811
    from mklvisita import Matcher

    loaded = app.load_checkpoint(str(app_checkpoint))
    assert list(loaded.kernel_weights()) == list(Matcher.from_pretrained(str(app_checkpoint)).kernel_weights())
    calls = []
    monkeypatch.setattr(
        app.Matcher, "from_pretrained", classmethod(lambda cls, n, revision=None: calls.append((n, revision)))
    )
    app.load_checkpoint("owner/name@abc123")
    assert calls == [("owner/name", "abc123")]


# ------------------------------------------------------------------------------------------------ the UI


def test_create_demo_has_the_four_tabs_and_named_endpoints(matcher) -> None:  # noqa: F811
    demo = app.create_demo(matcher, ["owner/model"])
    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["Match", "Matrix", "Search", "Model"]
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"match", "explain", "matrix", "search"}
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Checkpoint (allow-list)"]
    assert [value for _, value in dropdowns[0].choices] == [app.DEFAULT_CHECKPOINT, "owner/model"]
    assert demo._queue.max_size == app.QUEUE_MAX_SIZE
    assert demo._queue.default_concurrency_limit == 1 and demo.api_open is False


def test_launch_settings_are_safe_for_a_small_space() -> None:
    kwargs = app.launch_kwargs()
    assert kwargs["ssr_mode"] is False and kwargs["show_error"] is False
    assert kwargs["max_file_size"] == app.MAX_FILE_SIZE
    assert [Path(p) for p in kwargs["allowed_paths"]] == [EXAMPLES]


def test_examples_exist_are_licensed_and_small() -> None:
    spec = json.loads((EXAMPLES / "examples.json").read_text())["examples"]
    licence = (EXAMPLES / "LICENSE.md").read_text()
    kinds = {ex["kind"] for ex in spec}
    assert kinds == {"photo", "shapes"}
    for ex in spec:
        path = EXAMPLES / ex["image"]
        assert path.is_file(), path
        assert ex["kind"] == "shapes" or f"`{ex['image']}`" in licence  # every photograph has its licence stated
        assert 1 <= len(ex["captions"]) <= app.MAX_CAPTIONS
        Image.open(path).verify()
    assert sum(p.stat().st_size for p in (ROOT / "assets" / "examples").iterdir()) < 1_000_000


def test_checkpoint_choice_in_the_model_tab(matcher) -> None:  # noqa: F811
    demo = app.create_demo(matcher, ["owner/model"], loader=lambda spec: matcher)
    (choose,) = [fn.fn for fn in demo.fns.values() if fn.name == "choose"]
    chosen, status, layers, _global, _levels, table, card, metrics = choose("owner/model")
    assert chosen == "owner/model" and "owner/model" in status
    assert [value for _, value in layers.choices][0] == app.DEFAULT_LAYER
    assert len(table) == 1 + len(matcher.fusion_kernel_weights())
    with pytest.raises(gr.Error, match="not in this demo's allow-list"):
        choose("someone/else")
    assert not demo.registry.is_loaded("someone/else")
