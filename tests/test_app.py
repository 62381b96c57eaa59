"""Unit tests of the demo's handlers (`demo/`), called directly with a tiny random-checkpoint Matcher (no server),
and of the page `app.create_demo` builds."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from demo import examples as demo_examples
from demo import inputs, registry
from demo.match import (
    DEFAULT_LAYER,
    _explanation,
    explain,
    heat,
    layer_choices,
    match,
    methods,
    relative_contributions,
    select_word,
)
from demo.matrix import matrix
from demo.model_info import card_markdown, model_info, round_metrics
from demo.search import load_example_gallery, search
from demo.server import prune_temp_folder
from demo.tabs.match import show_explanation
from demo.ui import user_errors
from mklvisita.explain import default_layer
from tests.app_fixtures import (  # noqa: F401
    CAT,
    EXAMPLES,
    ROOT,
    SHAPES,
    app_checkpoint,
    matcher,
    photo_matcher,
    shapes_matcher,
    sources_matcher,
)


def captions_text(*captions: str) -> str:
    return "\n".join(captions)


# ------------------------------------------------------------------------------------------------ the split


def test_registry_and_handlers_import_no_gradio() -> None:
    modules = [
        "demo.registry",
        "demo.inputs",
        "demo.examples",
        "demo.match",
        "demo.matrix",
        "demo.search",
        "demo.model_info",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nassert 'gradio' not in sys.modules, 'gradio imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_each_tab_has_its_own_module_with_build() -> None:
    from demo import tabs

    handlers = {"match": "match", "matrix": "matrix", "search": "search", "model": "model_info"}  # tab -> handlers
    for name, handler in handlers.items():
        assert callable(getattr(tabs, name).build), name
        assert (ROOT / "demo" / f"{handler}.py").is_file() and (ROOT / "demo" / "tabs" / f"{name}.py").is_file()
    assert len((ROOT / "app.py").read_text().splitlines()) < 200  # the entry point only builds and launches


# ------------------------------------------------------------------------------------------------ input checks


def test_parse_captions_drops_blank_lines_and_enforces_limits() -> None:
    assert inputs.parse_captions("  a cat \n\n\t\na dog\n", 16) == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="at least one caption"):
        inputs.parse_captions(" \n \n", 16)
    with pytest.raises(ValueError, match="17 captions given; the limit is 16"):
        inputs.parse_captions("\n".join(f"caption {i}" for i in range(17)), 16)
    with pytest.raises(ValueError, match="Caption 2 is 5,000 characters long"):
        inputs.parse_captions("fine\n" + "x" * 5000, 16)
    with pytest.raises(ValueError, match="must be text"):
        inputs.parse_captions(42, 16)


def test_bad_images_give_clear_errors_naming_the_users_file(tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a PNG")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(CAT.read_bytes()[:2000])
    with pytest.raises(ValueError, match="missing"):
        inputs.read_image(None)
    for bad in (not_an_image, empty, truncated):
        with pytest.raises(ValueError) as info:
            inputs.read_image(str(bad))
        assert bad.name in str(info.value) and str(tmp_path) not in str(info.value)
    # an upload as gradio hands it over: its copy in a hashed folder, the user's own name beside it
    upload = tmp_path / ("a" * 64) / "upload.png"
    upload.parent.mkdir()
    upload.write_text("text")
    with pytest.raises(ValueError) as info:
        inputs.read_image({"path": str(upload), "orig_name": "holiday.png"})
    assert "holiday.png" in str(info.value) and "a" * 64 not in str(info.value) and "/" not in str(info.value)
    with pytest.raises(ValueError, match="9 images given; the limit is 8"):
        inputs.read_images([str(CAT)] * 9, inputs.MAX_MATRIX_IMAGES)


def test_large_uploads_are_shrunk_before_the_model_sees_them(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), (10, 200, 30)).save(big)
    image = inputs.read_image(str(big))
    assert image.size == (inputs.MAX_SIDE, inputs.MAX_SIDE // 2)
    assert inputs.read_image(str(CAT)).size == Image.open(CAT).size  # small ones are left alone


def test_image_digest_depends_on_pixels_only(tmp_path: Path) -> None:
    a = inputs.read_image(str(CAT))
    copy = tmp_path / "copy.png"
    a.save(copy)
    assert inputs.image_digest(inputs.read_image(str(copy))) == inputs.image_digest(a)
    b = a.copy()
    b.putpixel((0, 0), (0, 0, 0) if a.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    assert inputs.image_digest(b) != inputs.image_digest(a)


# ------------------------------------------------------------------------------------------------ user errors


def test_user_errors_log_one_line_and_faults_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    @user_errors
    def refuses(_: str) -> None:
        raise ValueError("Caption 1 is empty.\nEnter some text.")

    @user_errors
    def breaks() -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.INFO, logger="mklvisita.demo"):
        with pytest.raises(gr.Error) as info:
            refuses("x")
    assert info.value.message == "Caption 1 is empty.\nEnter some text."
    assert info.value.print_exception is False  # gradio prints no traceback for it
    (record,) = [r for r in caplog.records if r.name == "mklvisita.demo"]
    assert record.exc_info is None and "\n" not in record.getMessage() and "Caption 1 is empty" in record.getMessage()
    with pytest.raises(RuntimeError, match="a bug"):  # a real fault propagates: gradio logs its traceback
        breaks()


# ------------------------------------------------------------------------------------------------ Match


def test_match_ranks_captions_by_score_and_splits_similarity_by_kernel(matcher) -> None:  # noqa: F811
    captions = ["a purple cross", "a yellow star", "two shapes", "a red circle"]
    view = match(matcher, str(SHAPES[0]), captions_text(*captions))

    direct = matcher.score([Image.open(SHAPES[0]).convert("RGB")], captions)
    ranking = view.result["ranking"]
    assert [row["rank"] for row in ranking] == [1, 2, 3, 4]
    assert sorted(row["caption"] for row in ranking) == sorted(captions)
    scores = [row["score"] for row in ranking]
    assert scores == sorted(scores, reverse=True)  # ranked by the checkpoint's score, as Search and evaluation do
    assert view.result["ranking_rule"] == "score = 1 × ITM + 1 × S"
    for row in ranking:
        j = captions.index(row["caption"])
        assert row["itm"] == pytest.approx(float(direct.itm[0, j]), abs=1e-5)
        assert row["score"] == pytest.approx(float(direct.score[0, j]), abs=1e-5)
        assert row["similarity"] == pytest.approx(float(direct.similarity[0, j]), abs=1e-5)
        assert list(row["kernel_contributions"]) == list(direct.kernel_names)
        assert sum(row["kernel_contributions"].values()) == pytest.approx(row["similarity"], abs=1e-4)
    assert list(view.table.columns) == ["rank", "caption", "score", "ITM", "S"]  # short numeric columns
    assert list(view.table["caption"]) == view.captions == [row["caption"] for row in ranking]
    assert isinstance(view.figure, Image.Image) and view.figure.height > 100
    json.dumps(view.result)  # the /match payload must be plain JSON


def test_match_on_a_checkpoint_without_fusion_ranks_by_s_and_shows_no_itm(sources_matcher) -> None:  # noqa: F811
    view = match(sources_matcher, str(CAT), "a cup of coffee on a saucer\na tabby cat lying on a rug")
    assert list(view.table.columns) == ["rank", "caption", "score", "S"]
    assert view.captions[0] == "a tabby cat lying on a rug"
    assert all(row["itm"] is None for row in view.result["ranking"])
    assert view.result["ranking_rule"].startswith("score = S")
    json.dumps(view.result)


def test_kernel_bars_show_what_differs_between_captions() -> None:
    contrib = np.array([[0.5, 0.1, 0.3], [0.5, 0.3, 0.1], [0.5, 0.2, 0.0]])  # kernel 0 gives every caption 0.5
    rel = relative_contributions(contrib)
    assert np.allclose(rel[:, 0], 0.0)  # no bar for a kernel that does not tell the captions apart
    assert np.allclose(rel.mean(axis=0), 0.0)
    assert np.allclose(rel.sum(axis=1), contrib.sum(axis=1) - contrib.sum(axis=1).mean())  # the total: S - mean S


def test_match_cache_is_per_checkpoint(matcher) -> None:  # noqa: F811
    cache = registry.ResultCache()
    first = match(matcher, str(CAT), "a cat\na cup", cache=cache).result
    again = match(matcher, str(CAT), "a cat\na cup", cache=cache).result
    assert cache.hits == 1 and again == first
    other = registry.ResultCache()  # a newly loaded checkpoint starts with an empty cache: outputs are recomputed
    match(matcher, str(CAT), "a cat\na cup", cache=other)
    assert other.hits == 0 and len(other) == 1


def test_explain_overlays_one_heatmap_per_word_at_the_image_size(matcher) -> None:  # noqa: F811
    image = Image.open(CAT).convert("RGB")
    view = explain(matcher, str(CAT), "a tabby cat on a rug")
    heatmap = np.asarray(view.caption_map)
    assert heatmap.shape == (image.height, image.width, 3) and heatmap.dtype == np.uint8
    assert not np.array_equal(heatmap, np.asarray(image))  # something was drawn over the photo
    assert view.info["tokens"] == [word for _, word in view.words] == ["a", "tabby", "cat", "on", "a", "rug"]
    assert all(np.asarray(overlay).shape == heatmap.shape for overlay, _ in view.words)
    assert view.word == "a"
    local = [name for name in matcher.kernel_weights() if name.startswith("local/")]
    assert [name for _, name in view.kernels] == local  # one map per local kernel, for the selected word
    for x, y in view.info["word_peaks"].values():
        assert 0 <= x < image.width and 0 <= y < image.height
    json.dumps(view.info)


def test_a_new_explanation_resets_the_word_gallery(matcher) -> None:  # noqa: F811
    from demo.tabs.match import leave_preview

    demo = app.create_demo(matcher, loader=lambda spec: matcher)
    explains = [fn for fn in demo.fns.values() if fn.name == "explain"]
    assert len(explains) >= 6  # Match, each example, each explain control, a checkpoint switch
    gallery = [b for b in demo.blocks.values() if isinstance(b, gr.Gallery) and b.elem_id == "word-maps"][0]
    for fn in explains:  # every explanation is preceded by a step that takes the word gallery out of its preview
        before = [d for d in demo.fns.values() if d.fn is leave_preview and fn.trigger_after == d._id]
        assert before and before[0].outputs == [gallery], fn
    assert leave_preview().selected_index is None
    view = explain(matcher, str(SHAPES[1]), "a purple cross")
    _heat, words, word, _kernels, _info = show_explanation(view)
    assert word.value == view.word == "a" == words[0][1]  # the word selector starts where the grid does


def test_heatmaps_leave_the_photo_visible_where_the_map_is_low() -> None:
    image = Image.new("RGB", (40, 30), (200, 30, 30))  # a red picture: its colour must stay checkable
    heatmap = np.zeros((30, 40), np.float32)
    heatmap[10, 20] = 1.0
    out = np.asarray(heat(image, heatmap))
    assert out.shape == (30, 40, 3)
    assert (out[0, 0] == (200, 30, 30)).all()  # transparent where the map is low (a jet blend tints it blue)
    assert not np.array_equal(out[10, 20], out[0, 0])


def test_explain_scale_and_word_selection(matcher) -> None:  # noqa: F811
    caption = "a purple cross and a yellow star"
    _, per_map = _explanation(matcher, str(SHAPES[2]), caption, -1, "attention", "per_map", None)
    _, shared = _explanation(matcher, str(SHAPES[2]), caption, -1, "attention", "shared", None)
    assert np.allclose(per_map.word_heatmaps.max(axis=(1, 2)), 1.0, atol=1e-4)  # every word on its own scale
    assert shared.word_heatmaps.max() == pytest.approx(1.0, abs=1e-4)  # one scale for all words
    assert shared.word_heatmaps.max(axis=(1, 2)).min() < 1.0 - 1e-4
    cache = registry.ResultCache()
    explain(matcher, str(SHAPES[2]), caption, method="gradcam", cache=cache)
    index, kernels = select_word(matcher, str(SHAPES[2]), caption, DEFAULT_LAYER, "gradcam", "per_map", "star", cache)
    assert index == 6 and cache.sub("explain", 1).hits == 1  # reused, not recomputed
    assert len(kernels) == len([n for n in matcher.kernel_weights() if n.startswith("local/")])
    with pytest.raises(ValueError, match="not a word of the explained caption"):
        select_word(matcher, str(SHAPES[2]), caption, DEFAULT_LAYER, "gradcam", "per_map", "circle", cache)


def test_explain_rejects_a_missing_fusion_layer_and_unknown_options(matcher, sources_matcher) -> None:  # noqa: F811
    n = len(matcher.fusion_kernel_weights())
    assert n > 0
    with pytest.raises(ValueError, match="does not exist"):
        explain(matcher, str(CAT), "a cat", layer=n)
    assert explain(matcher, str(CAT), "a cat", layer=n - 1, method="attention").info["layer"] == n - 1
    with pytest.raises(ValueError, match="Unknown method"):
        explain(matcher, str(CAT), "a cat", method="magic")
    with pytest.raises(ValueError, match="Unknown scale"):
        explain(matcher, str(CAT), "a cat", scale="log")
    with pytest.raises(ValueError, match="at least one caption"):
        explain(matcher, str(CAT), "   ")
    # the photo sources checkpoint has no fusion head: kernel maps only, said plainly
    assert methods(sources_matcher) == ["kernel"] and methods(matcher) == ["gradcam", "attention", "kernel"]
    with pytest.raises(ValueError, match="cannot explain by 'gradcam'"):
        explain(sources_matcher, str(CAT), "a cat", method="gradcam")
    assert explain(sources_matcher, str(CAT), "a cat").info["method"] == "kernel"


def test_fusion_layers_are_named_alike_everywhere(matcher) -> None:  # noqa: F811
    n = len(matcher.fusion_kernel_weights())
    choices = layer_choices(matcher)
    assert [label for label, _ in choices[1:]] == [f"fusion layer {i + 1}" for i in range(n)]
    assert [value for _, value in choices] == [DEFAULT_LAYER, *range(n)]  # the API keeps 0-based values
    # what "default" is, said in the choice itself: the layer explanations use (the last one for a cross_first model)
    assert choices[0][0] == f"default (= fusion layer {default_layer(matcher.model) + 1})"
    if matcher.config.fusion.cross_first:
        assert choices[0][0].endswith(f"layer {n})")
    view = model_info(matcher)
    assert list(view.table.columns) == ["kernel", "similarity S", *[f"fusion layer {i + 1}" for i in range(n)]]


# ------------------------------------------------------------------------------------------------ Matrix, Search


def test_matrix_scores_every_pair_and_marks_best_matches(matcher) -> None:  # noqa: F811
    files = [str(p) for p in SHAPES[:3]]
    captions = ["a purple cross", "a yellow star"]
    view = matrix(matcher, files, captions_text(*captions), "itm")
    assert isinstance(view.figure, Image.Image)
    direct = matcher.score([Image.open(f).convert("RGB") for f in files], captions)
    assert np.allclose(view.result["itm"], direct.itm, atol=1e-5)
    assert np.allclose(view.result["score"], direct.score, atol=1e-5)
    assert view.result["images"] == [Path(f).name for f in files]
    rows = view.best[view.best["direction"] == "image → caption"]
    assert list(rows["best match"]) == [captions[j] for j in np.asarray(direct.itm).argmax(1)]
    assert len(view.best) == len(files) + len(captions)
    with pytest.raises(ValueError, match="the limit is 8"):
        matrix(matcher, files, captions_text(*[f"c{i}" for i in range(9)]))
    with pytest.raises(ValueError, match="Unknown score"):
        matrix(matcher, files, "a cat", "loss")


def test_matrix_defaults_to_the_ranking_score_and_refuses_itm_without_fusion(sources_matcher) -> None:  # noqa: F811
    view = matrix(sources_matcher, [str(CAT), str(SHAPES[0])], "a cat\na cross")
    assert list(view.best.columns)[-1] == "score"
    json.dumps(view.result)  # ITM is null, not NaN
    with pytest.raises(ValueError, match="no fusion head"):
        matrix(sources_matcher, [str(CAT)], "a cat", "itm")


def test_search_both_ways_over_the_example_gallery(matcher) -> None:  # noqa: F811
    gallery = load_example_gallery()
    images, captions, timings = search(matcher, "a purple cross", str(CAT), None, "", 3, example_gallery=gallery)
    assert len(images) == 3 and all(label.startswith(f"#{i} score ") for i, (_, label) in enumerate(images, 1))
    assert {path for path, _ in images} <= set(gallery.paths)
    assert len(captions) == 3 and set(captions["caption"]) <= set(gallery.captions)
    assert list(captions["rank"]) == [1, 2, 3]
    assert any(k.startswith("text→image") for k in timings) and any(k.startswith("image→text") for k in timings)
    assert all(v >= 0 for v in timings.values())
    assert list(captions.columns) == ["rank", "caption", "score", "ITM", "S"]


def test_search_on_a_checkpoint_without_fusion_shows_no_itm_column(sources_matcher) -> None:  # noqa: F811
    gallery = load_example_gallery()
    _, captions, _ = search(sources_matcher, "", str(CAT), None, "", 3, example_gallery=gallery)
    assert list(captions.columns) == ["rank", "caption", "score", "S"]  # like the Match tab: no empty column
    assert captions["caption"].iloc[0] == "a tabby cat lying on a rug"


def test_search_over_uploaded_images_and_captions(matcher) -> None:  # noqa: F811
    files = [str(p) for p in SHAPES[:2]]
    images, captions, _ = search(matcher, "a star", str(SHAPES[0]), files, "a star\na cross\na circle", 16)
    assert len(images) == 2 and len(captions) == 3  # top k is capped by the gallery size
    with pytest.raises(ValueError, match="text query"):
        search(matcher, "  ", None, files, "", 3)
    with pytest.raises(ValueError, match="top k"):
        search(matcher, "a star", None, files, "", 0)


# ------------------------------------------------------------------------------------------------ Model


def test_model_info_shows_every_kernel_weights_card_and_metrics(matcher, sources_matcher, photo_matcher) -> None:  # noqa: F811
    view = model_info(matcher)
    assert isinstance(view.weights_plot, Image.Image) and isinstance(view.levels_plot, Image.Image)
    weights = matcher.kernel_weights()
    assert list(view.table["kernel"]) == [*weights, "× bias scale"]  # the kernels, then each layer's bias scale
    assert view.table["similarity S"].sum() == pytest.approx(1.0, abs=1e-2)
    assert isinstance(view.card, str) and view.card and isinstance(view.metrics, dict)
    sources = model_info(sources_matcher)
    assert {"concept/cosine", "concept_class/cosine", "concept_local/cosine"} <= set(sources.table["kernel"])
    assert sources.levels_plot is None and list(sources.table.columns) == ["kernel", "similarity S"]
    photo = model_info(photo_matcher)  # the photo checkpoint with its fusion: beta, and per fusion layer
    assert list(photo.table.columns) == ["kernel", "similarity S", "fusion layer 1", "fusion layer 2"]
    scale = photo.table[photo.table["kernel"] == "× bias scale"].iloc[0]
    learned = photo_matcher.fusion_bias_scales()
    assert [scale["fusion layer 1"], scale["fusion layer 2"]] == pytest.approx(learned, abs=1e-3)
    assert all(abs(x - 1.0) > 1e-3 for x in learned)  # trained away from its initial 1


def test_card_front_matter_is_not_a_heading_and_metrics_are_rounded(photo_matcher) -> None:  # noqa: F811
    shown = card_markdown(photo_matcher.card)
    assert photo_matcher.card.startswith("---") and not shown.startswith("---")
    assert shown.startswith("# MKL-VisITA photo checkpoint") and "```yaml\nlicense: apache-2.0" in shown
    assert round_metrics({"t2i_r1": 13.100000000000001, "nested": {"f1": 0.40057020669992877, "n": 486}}) == {
        "t2i_r1": 13.1,
        "nested": {"f1": 0.4006, "n": 486},
    }
    assert card_markdown("") == "_This checkpoint has no card._"


def test_each_checkpoint_says_what_it_was_trained_on_and_cannot_know(photo_matcher, shapes_matcher) -> None:  # noqa: F811
    photo, shapes = registry.describe(photo_matcher), registry.describe(shapes_matcher)
    for line in (photo, shapes):
        assert "\n" not in line and "Trained on:" in line and "cannot know:" in line
    assert "ImageNet" in photo and "colours" in photo
    assert "shapes" in shapes and "photographs" in shapes


# ------------------------------------------------------------------------------------------------ checkpoints


def test_allow_list_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.CHECKPOINTS_ENV, " c/d , a/b ,")
    args = app.parse_args(["--checkpoint", "a/b", "--checkpoint", "e/f@v1"])
    assert registry.allowed_checkpoints(args.checkpoint) == ["photo", "shapes", "a/b", "e/f@v1", "c/d"]


def test_threads_host_and_port_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    args = app.parse_args(["--threads", "2"])
    assert (args.threads, args.port, args.host) == ("2", 8123, "0.0.0.0")
    assert app.parse_args(["--port", "9000", "--host", "127.0.0.1"]).port == 9000
    with pytest.raises(SystemExit):
        app.parse_args(["--threads", "many"])
    assert "--threads must be a whole number" in capsys.readouterr().err


def test_registry_refuses_checkpoints_outside_the_allow_list(matcher) -> None:  # noqa: F811
    loaded: list[str] = []

    def loader(spec: str):
        loaded.append(spec)
        if spec == "broken/one":
            raise ValueError("no config.json in broken/one")
        return matcher

    reg = registry.Registry(matcher, ["ok/one", "ok/two", "broken/one"], loader=loader, max_loaded=2)
    assert reg.choices == ["photo", "shapes", "ok/one", "ok/two", "broken/one"]
    with pytest.raises(ValueError, match="not in this demo's allow-list"):
        reg.get("evil/model")
    with pytest.raises(ValueError, match="not in this demo's allow-list"):
        reg.get("../../etc")
    assert loaded == []  # refused before any load was attempted
    assert reg.get("ok/one").matcher is matcher
    assert reg.get("ok/one") is reg.get("ok/one") and loaded == ["ok/one"]
    reg.get("ok/two")  # evicts ok/one; the default stays pinned
    assert reg.is_loaded("photo") and reg.is_loaded("ok/two")
    assert not reg.is_loaded("ok/one")
    with pytest.raises(ValueError, match="Could not load checkpoint 'broken/one'"):
        reg.get("broken/one")


def test_local_checkpoints_are_shown_by_name_never_by_server_path(
    app_checkpoint,  # noqa: F811
    matcher,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import shutil

    good, bad = tmp_path / "runs" / "run-7", tmp_path / "other" / "run-7"
    shutil.copytree(app_checkpoint, good)
    shutil.copytree(app_checkpoint, bad)
    (bad / "metrics.json").write_text('{"rsum": ')  # malformed
    with caplog.at_level(logging.INFO, logger="mklvisita.demo"):
        demo = app.create_demo(matcher, [str(good), str(bad), "owner/model"])
    (dropdown,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "checkpoint"]
    assert [value for _, value in dropdown.choices] == ["photo", "shapes", "run-7", "run-7 (2)", "owner/model"]
    assert [label for label, _ in dropdown.choices] == [value for _, value in dropdown.choices]
    assert str(tmp_path) not in json.dumps(demo.get_config_file(), default=str)  # nor in /config
    assert str(good) in caplog.text  # the path is in the server log, for the operator
    reg = demo.registry
    assert reg.get("run-7").matcher.kernel_weights() == matcher.kernel_weights()
    with pytest.raises(registry.CheckpointLoadError) as caught:
        reg.get("run-7 (2)")
    message = str(caught.value)
    assert "'run-7 (2)'" in message and "run-7/metrics.json is not valid JSON" in message, message
    assert str(tmp_path) not in message and message.count("run-7") == 2, message


def test_load_checkpoint_by_embedded_name_folder_and_revision(app_checkpoint, monkeypatch) -> None:  # noqa: F811
    from mklvisita import Matcher

    loaded = registry.load_checkpoint(str(app_checkpoint))
    assert list(loaded.kernel_weights()) == list(Matcher.from_pretrained(str(app_checkpoint)).kernel_weights())
    calls = []
    monkeypatch.setattr(
        Matcher, "from_pretrained", classmethod(lambda cls, n, revision=None: calls.append((n, revision)))
    )
    monkeypatch.setattr(Matcher, "default", classmethod(lambda cls, name=None: calls.append(("default", name))))
    registry.load_checkpoint("owner/name@abc123")
    registry.load_checkpoint("shapes")
    registry.load_checkpoint("photo")
    assert calls == [("owner/name", "abc123"), ("default", "shapes"), ("default", "photo")]


# ------------------------------------------------------------------------------------------------ the page


def _fn(demo: gr.Blocks, name: str):
    fns = {fn.fn for fn in demo.fns.values() if fn.name == name}  # one function, maybe wired to several events
    assert len(fns) == 1, fns
    return fns.pop()


def test_create_demo_has_the_four_tabs_and_named_endpoints(matcher) -> None:  # noqa: F811
    demo = app.create_demo(matcher, ["owner/model"])
    tabs = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["Match", "Matrix", "Search", "Model"]
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"match", "explain", "matrix", "search"}
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Checkpoint (allow-list)"]
    assert [value for _, value in dropdowns[0].choices] == ["photo", "shapes", "owner/model"]
    assert dropdowns[0].value == "photo"  # the demo opens on the photo checkpoint
    assert demo._queue.max_size == app.QUEUE_MAX_SIZE
    assert demo._queue.default_concurrency_limit == 1 and demo.api_open is False


def test_the_match_tab_opens_on_photo_examples_and_each_example_picks_its_checkpoint(matcher) -> None:  # noqa: F811
    demo = app.create_demo(matcher, loader=lambda spec: matcher)
    (dataset,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dataset) and b.elem_id == "match-examples"]
    kinds = {e["image"]: e["kind"] for e in demo_examples.load_examples()}
    samples = dataset.samples
    assert samples[0][2] == "photo" and Path(samples[0][0]["path"]).name == "cat.jpg"
    for sample in samples:
        assert sample[2] == kinds[Path(sample[0]["path"]).name]  # shapes scenes -> "shapes", photos -> "photo"
    assert {sample[2] for sample in samples} == {"photo", "shapes"}


def test_each_matrix_example_carries_its_checkpoint_and_switches_to_it(matcher) -> None:  # noqa: F811
    demo = app.create_demo(matcher, loader=lambda spec: matcher)
    (dataset,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dataset) and b.elem_id == "matrix-examples"]
    kinds = {e["image"]: e["kind"] for e in demo_examples.load_examples()}
    assert [sample[2] for sample in dataset.samples] == ["photo", "shapes"]
    for files, _, kind in dataset.samples:  # the table shows the file names
        assert {kinds[name] for name in files.split(", ")} == {kind}  # every image is for the example's checkpoint
    # loading an example runs the page's switch to its checkpoint, as a Match example does
    (load,) = [fn for fn in demo.fns.values() if any(t[0] == dataset._id for t in fn.targets)]
    (switch,) = [fn for fn in demo.fns.values() if fn.name == "switch" and fn.trigger_after == load._id]
    assert [b.elem_id for b in switch.inputs] == ["checkpoint"]


def test_switching_checkpoint_updates_the_line_and_explain_choices(matcher, monkeypatch) -> None:  # noqa: F811
    demo = app.create_demo(matcher, ["owner/model"], loader=lambda spec: matcher)
    switch = _fn(demo, "switch")
    state, selector, about, rule, layers, method = switch("shapes")
    assert state == selector == "shapes" and "Trained on:" in about and "score" in rule
    assert [value for _, value in layers.choices][0] == DEFAULT_LAYER
    assert [value for _, value in method.choices] == methods(matcher) and method.value == "gradcam"
    monkeypatch.setattr(matcher.model.config.fusion, "explain_method", "attention")  # the photo checkpoint's choice
    assert switch("shapes")[-1].value == "attention"  # the Method choice starts on the checkpoint's default map
    with pytest.raises(gr.Error, match="not in this demo's allow-list"):
        switch("someone/else")
    assert not demo.registry.is_loaded("someone/else")


def test_launch_settings_are_safe_for_a_small_space() -> None:
    kwargs = app.launch_kwargs()
    assert kwargs["ssr_mode"] is False and kwargs["show_error"] is False
    assert kwargs["max_file_size"] == app.MAX_FILE_SIZE
    served = [Path(p) for p in kwargs["allowed_paths"]]  # the example images, file by file: not the folder
    assert served == sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png")) and len(served) == 8
    assert kwargs["app_kwargs"]["lifespan"] is prune_temp_folder  # empty temp folders are removed while it runs


def test_examples_exist_are_licensed_and_small() -> None:
    spec = json.loads((EXAMPLES / "examples.json").read_text())["examples"]
    licence = (EXAMPLES / "LICENSE.md").read_text()
    kinds = {ex["kind"] for ex in spec}
    assert kinds == {"photo", "shapes"}
    for ex in spec:
        path = EXAMPLES / ex["image"]
        assert path.is_file(), path
        assert ex["kind"] == "shapes" or f"`{ex['image']}`" in licence  # every photograph has its licence stated
        assert 1 <= len(ex["captions"]) <= inputs.MAX_CAPTIONS
        Image.open(path).verify()
    assert sum(p.stat().st_size for p in (ROOT / "assets" / "examples").iterdir()) < 1_000_000
