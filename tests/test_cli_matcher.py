import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mklvisita import InvalidCaptionError, InvalidImageError, Matcher
from mklvisita.__main__ import main
from mklvisita.matcher import EMBEDDED
from mklvisita.model import CheckpointError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, colour in enumerate(["red", "blue"]):
        p = d / f"{colour}.png"
        Image.new("RGB", (40 + 10 * i, 30), colour).save(p)
        paths.append(str(p))
    return paths


def test_cli_table_and_json(tiny_checkpoint, images, capsys):
    assert main(["score", *images, "-c", "a red square", "-c", "a blue one", "--checkpoint", str(tiny_checkpoint)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "caption", "itm", "similarity", "score"]
    assert len(table) == 2 + 4
    assert main(["score", *images, "-c", "a red square", "--checkpoint", str(tiny_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = Matcher.from_pretrained(tiny_checkpoint)
    r = m.score(images, ["a red square"])
    assert [p["itm"] for p in out["pairs"]] == pytest.approx(r.itm[:, 0].tolist(), abs=1e-6)
    assert sum(out["pairs"][0]["kernel_contributions"].values()) == pytest.approx(out["pairs"][0]["similarity"], 1e-5)


def test_cli_bad_input_exits_2_with_a_message(tiny_checkpoint, images, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["score", str(bad), "-c", "x", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["score", images[0], "-c", "  ", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_runs_as_a_module(tiny_checkpoint, images):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mklvisita",
            "score",
            images[0],
            "-c",
            "a red square",
            "--checkpoint",
            str(tiny_checkpoint),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["pairs"]) == 1


def test_score_encodes_each_image_once(tiny_checkpoint, images, monkeypatch):
    m = Matcher.from_pretrained(tiny_checkpoint)
    calls = []
    original = m.model.vision.forward  # the image network: once per image, whichever encode path score takes
    spy = lambda pv, *a, **k: calls.append(pv.shape[0]) or original(pv, *a, **k)  # noqa: E731
    monkeypatch.setattr(m.model.vision, "forward", spy)
    r = m.score(images, [f"caption {i}" for i in range(7)])
    assert sum(calls) == len(images)
    assert r.itm.shape == (2, 7) and r.kernel_contributions.shape == (2, 7, len(r.kernel_names))
    np.testing.assert_allclose(r.kernel_contributions.sum(-1), r.similarity, atol=1e-5)
    np.testing.assert_allclose(r.score, r.itm * m.config.itm_score_weight + r.similarity, atol=1e-6)


def test_matcher_errors_are_value_errors(tiny_checkpoint, tmp_path, monkeypatch):
    m = Matcher.from_pretrained(tiny_checkpoint)
    with pytest.raises(InvalidImageError):
        m.score([b"garbage"], ["a caption"])
    with pytest.raises(InvalidCaptionError):
        m.score([Image.new("RGB", (8, 8))], [""])
    with pytest.raises(InvalidCaptionError):
        m.score([Image.new("RGB", (8, 8))], [])
    with pytest.raises(CheckpointError, match="not found"):
        Matcher.from_pretrained(tmp_path / "nowhere" / "x")
    monkeypatch.setenv("MKLVISITA_DEFAULT_CHECKPOINT", str(tmp_path / "none"))
    with pytest.raises(CheckpointError, match="embedded default checkpoint is missing"):
        Matcher.default()


def test_search_ranks_a_gallery_and_reports_timings(tiny_checkpoint, images):
    m = Matcher.from_pretrained(tiny_checkpoint)
    gallery = m.index_images(images * 3)
    r = m.search_images(gallery, "a red square", top_k=4)
    assert len(r.indices) == 4 and r.scores == sorted(r.scores, reverse=True)
    assert {"encode_query", "similarity", "rerank"} <= set(r.timings)
    full = m.score(images * 3, ["a red square"])
    assert r.indices[0] == int(np.argmax(full.score[:, 0]))  # the re-ranked top equals exhaustive scoring
    captions = m.index_captions(["a red square", "a blue rectangle", "a cat"])
    r = m.search_captions(captions, images[1], top_k=3)
    assert sorted(r.indices) == [0, 1, 2]
    np.testing.assert_allclose(
        r.itm, m.score([images[1]], ["a red square", "a blue rectangle", "a cat"]).itm[0][r.indices], atol=1e-5
    )


def test_score_is_thread_safe(tiny_checkpoint, images):
    m = Matcher.from_pretrained(tiny_checkpoint)
    caps = ["a red square", "a blue rectangle"]
    serial = m.score(images, caps).score
    results, errors = [], []

    def work():
        try:
            results.append(m.score(images, caps).score)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for r in results:
        np.testing.assert_allclose(r, serial, atol=1e-6)
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in m.model.parameters())


def test_default_explanation_has_nonzero_word_maps(tiny_checkpoint, images):
    """The last fusion layer's word attention never reaches the ITM head: the default must not pick it."""
    e = Matcher.from_pretrained(tiny_checkpoint).explain(images[0], "a red square")
    assert e.tokens == ["a", "red", "square"]
    assert e.word_heatmaps.shape == (3, 30, 40) and (e.word_heatmaps.max(axis=(1, 2)) > 0).all()


def test_default_explanation_is_the_checkpoints_explain_method(tiny_checkpoint, images):
    """fusion.explain_method (chosen at release) is the map explain() and the demo give when no method is named."""
    m = Matcher.from_pretrained(tiny_checkpoint)
    assert m.model.config.fusion.explain_method == "gradcam"
    maps = {name: m.explain(images[0], "a red square", method=name).word_heatmaps for name in ("gradcam", "attention")}
    assert not np.allclose(maps["gradcam"], maps["attention"])  # else the test could not tell them apart
    np.testing.assert_allclose(m.explain(images[0], "a red square").word_heatmaps, maps["gradcam"])
    m.model.config.fusion.explain_method = "attention"
    np.testing.assert_allclose(m.explain(images[0], "a red square").word_heatmaps, maps["attention"])
    m.model.config.fusion.explain_method = "kernel"  # only the fusion's own maps may be a fusion default
    with pytest.raises(ValueError, match="fusion.explain_method must be 'gradcam' or 'attention'"):
        m.model.config.validate()


@pytest.fixture
def loads(tiny_checkpoint, monkeypatch):
    """Record the folder every Matcher.from_pretrained call asks for; answer with the micro model (cheap)."""
    monkeypatch.delenv("MKLVISITA_DEFAULT_CHECKPOINT", raising=False)
    micro = Matcher.from_pretrained(tiny_checkpoint)
    asked = []

    def fake(cls, name_or_path, revision=None, device=None, **kw):
        asked.append(Path(name_or_path))
        return micro

    monkeypatch.setattr(Matcher, "from_pretrained", classmethod(fake))
    return asked


def test_default_is_the_demos_photo_checkpoint(loads):
    """DESIGN: Matcher.default() is the demo's default, the photo checkpoint; named ones are unchanged."""
    Matcher.default()
    Matcher.default("photo")
    Matcher.default("shapes")
    assert loads == [EMBEDDED["photo"], EMBEDDED["photo"], EMBEDDED["shapes"]]
    photo = json.loads((EMBEDDED["photo"] / "config.json").read_text())
    assert photo["vision"]["model_name"] == "tf_efficientnet_lite0"
    with pytest.raises(ValueError, match="unknown embedded checkpoint"):
        Matcher.default("holiday-snaps")


def test_cli_defaults_to_the_photo_checkpoint_and_takes_embedded_names(loads, images, capsys):
    assert main(["score", images[0], "-c", "a red square"]) == 0
    assert main(["score", images[0], "-c", "a red square", "--checkpoint", "shapes"]) == 0
    assert main(["score", images[0], "-c", "a red square", "--checkpoint", "photo"]) == 0
    assert loads == [EMBEDDED["photo"], EMBEDDED["shapes"], EMBEDDED["photo"]]
    assert len(capsys.readouterr().out.splitlines()) == 3 * 3
    assert main(["score", images[0], "-c", "a red square", "--checkpoint", "shapes", "--revision", "v1"]) == 2
    assert main(["score", images[0], "-c", "a red square", "--revision", "v1"]) == 2
    assert capsys.readouterr().err.count("--revision") == 2 and len(loads) == 3  # refused before any load


def test_missing_embedded_checkpoint_message_names_no_server_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MKLVISITA_DEFAULT_CHECKPOINT", str(tmp_path / "none"))
    with pytest.raises(CheckpointError) as err:
        Matcher.default()
    assert str(tmp_path) not in str(err.value) and "training.photo" in str(err.value)


@pytest.fixture(scope="module")
def micro(tiny_checkpoint):
    return Matcher.from_pretrained(tiny_checkpoint)


_IMG = Image.new("RGB", (40, 30), "red")
MISUSE = {  # each raised a TypeError, KeyError, AttributeError or IndexError (or passed silently) before
    "layer 'abc'": lambda m: m.explain(_IMG, "a red square", layer="abc"),
    "layer 1.5": lambda m: m.explain(_IMG, "a red square", layer=1.5),
    "layer True": lambda m: m.explain(_IMG, "a red square", layer=True),
    "heads 'x'": lambda m: m.explain(_IMG, "a red square", heads="x"),
    "top_k 'abc'": lambda m: m.search_images(m.index_images([_IMG]), "a red square", top_k="abc"),
    "top_k 1.5": lambda m: m.search_images(m.index_images([_IMG]), "a red square", top_k=1.5),
    "top_k None": lambda m: m.search_images(m.index_images([_IMG]), "a red square", top_k=None),
    "top_k 0": lambda m: m.search_captions(m.index_captions(["a red square"]), _IMG, top_k=0),
    "top_k -3": lambda m: m.search_captions(m.index_captions(["a red square"]), _IMG, top_k=-3),
    "text index to search_images": lambda m: m.search_images(m.index_captions(["a"]), "a red square"),
    "image index to search_captions": lambda m: m.search_captions(m.index_images([_IMG]), _IMG),
    "index_images batch_size -1": lambda m: m.index_images([_IMG], batch_size=-1),
    "index_captions batch_size 0": lambda m: m.index_captions(["a"], batch_size=0),
    "object array": lambda m: m.score([np.array([["a"]], dtype=object)], ["a"]),
    "complex array": lambda m: m.score([np.zeros((4, 4, 3), complex)], ["a"]),
    "checkpoint 5": lambda m: Matcher.from_pretrained(5),
    "checkpoint ''": lambda m: Matcher.from_pretrained(""),
}


@pytest.mark.parametrize("case", MISUSE)
def test_library_misuse_is_a_value_error_with_a_plain_message(micro, case):
    with pytest.raises(ValueError) as err:
        MISUSE[case](micro)
    message = str(err.value)
    assert message and "/" not in message.replace("owner/name", ""), message  # no path, no traceback text


def test_whole_number_layers_and_top_k_still_work(micro):
    assert micro.explain(_IMG, "a red square", layer="1").layer == 1
    assert micro.explain(_IMG, "a red square", layer=-1).layer == len(micro.model.fusion_levels) - 1
    r = micro.search_images(micro.index_images([_IMG, _IMG]), "a red square", top_k=5.0)
    assert len(r.indices) == 2  # more than the gallery holds: all of it


def test_malformed_metrics_names_no_server_path(tiny_checkpoint, images, tmp_path, capsys):
    import shutil

    folder = tmp_path / "my-run"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "metrics.json").write_text('{"rsum": 1.0,')  # cut off mid-file
    with pytest.raises(CheckpointError) as caught:
        Matcher.from_pretrained(folder)
    message = str(caught.value)
    assert "my-run/metrics.json is not valid JSON" in message and str(tmp_path) not in message, message
    assert main(["score", images[0], "-c", "a red square", "--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "my-run/metrics.json" in err and str(tmp_path) not in err, err


def test_cli_escapes_control_characters_from_captions(tiny_checkpoint, images, capsys):
    caption = "a \x1b[31mred\x1b[0m square\r\x9b2J"
    assert main(["score", images[0], "-c", caption, "--checkpoint", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x9b" not in out, repr(out)
    assert "\\x1b[31mred\\x1b[0m" in out  # shown escaped, so the user still sees what was typed
    assert main(["score", images[0], "-c", caption, "--checkpoint", str(tiny_checkpoint), "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and json.loads(out)["pairs"][0]["caption"] == caption
