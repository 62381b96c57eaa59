"""User errors are ValueErrors with plain messages (no server paths); one set of limits for the library and CLI."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from mklvisita import Matcher
from mklvisita.__main__ import main as cli
from mklvisita.inputs import MAX_CAPTION_CHARS, MAX_CAPTIONS, load_image

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher.default("shapes")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its pixel data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60000, 60000))
    for given in (bomb, bomb.read_bytes()):
        with pytest.raises(ValueError, match="too large") as err:
            load_image(given)
        assert str(tmp_path) not in str(err.value)


def test_image_errors_name_the_base_name_only(tmp_path: Path) -> None:
    (tmp_path / "text_as.png").write_text("not an image")
    for given, message in (
        (tmp_path / "text_as.png", "text_as.png is not an image"),
        (tmp_path / "absent.png", "not found: absent.png"),
        (tmp_path, "is a folder"),
    ):
        with pytest.raises(ValueError, match=message) as err:
            load_image(given)
        assert str(tmp_path) not in str(err.value)


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("\u200b\u200b", "no words"),
        ("\x00\x00", "no words"),
        ("a red \ud800 circle", "lone surrogates"),
        ("x" * (MAX_CAPTION_CHARS + 1), f"the limit is {MAX_CAPTION_CHARS}"),
        (5, "must be text"),
        (["a"], "must be text"),
    ],
)
def test_bad_captions_are_value_errors(matcher: Matcher, caption, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        matcher.score([EXAMPLES / "shapes_001.png"], [caption])


def test_special_token_text_is_read_as_text(matcher: Matcher) -> None:
    tok = matcher.model.tokenizer
    ids = matcher.processor.captions(["a [SEP] red [PAD] circle [MASK]"])["input_ids"][0].tolist()
    specials = {tok.convert_tokens_to_ids(t) for t in ("[SEP]", "[PAD]", "[MASK]")}
    assert ids[-1] == tok.sep_token_id and not specials & set(ids[1:-1])


@pytest.mark.parametrize("batch_size", [-1, 0, 1.5, True, "8"])
def test_bad_batch_size_is_a_value_error(matcher: Matcher, batch_size) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        matcher.score([EXAMPLES / "shapes_001.png"], ["a red circle"], batch_size=batch_size)


def test_cli_scores_a_folder_and_applies_the_library_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["score", str(EXAMPLES), "--caption", "a red circle", "--checkpoint", str(_shapes())]) == 0
    out = capsys.readouterr().out
    assert "shapes_001.png" in out and "cat.jpg" in out
    many = [a for i in range(MAX_CAPTIONS + 1) for a in ("--caption", f"caption {i}")]
    assert cli(["score", str(EXAMPLES / "cat.jpg"), *many]) == 2
    assert f"the limit is {MAX_CAPTIONS}" in capsys.readouterr().err
    assert cli(["score", str(EXAMPLES / "cat.jpg"), "--caption", "x" * 10_000]) == 2
    assert f"the limit is {MAX_CAPTION_CHARS}" in capsys.readouterr().err


def _shapes() -> Path:
    from mklvisita.matcher import EMBEDDED

    return EMBEDDED["shapes"]


@pytest.mark.parametrize("value", ["abc", 1.5, True, None, [1], 0, 17])
def test_whole_numbers_refuse_text_fractions_and_bools(value) -> None:
    from mklvisita.inputs import check_whole_number

    with pytest.raises(ValueError, match="top k must be a whole number from 1 to 16"):
        check_whole_number(value, "top k", 1, 16)


def test_whole_numbers_accept_ints_integral_floats_and_digits() -> None:
    from mklvisita.inputs import check_whole_number

    assert [check_whole_number(v, "k", -2, 5) for v in (3, 3.0, " 3 ", "-1")] == [3, 3, 3, -1]


@pytest.mark.parametrize("layer", ["abc", 1.5, True])
def test_app_refuses_bad_layers_plainly(matcher: Matcher, layer) -> None:
    import gradio as gr

    import app

    with pytest.raises((ValueError, gr.Error), match="fusion layer must be a whole number"):  # not silently 1
        app.explain(matcher, str(EXAMPLES / "cat.jpg"), "a cat", layer=layer)


def test_whole_numbers_take_numpy_scalars_and_refuse_odd_text() -> None:
    import numpy as np

    from mklvisita.inputs import check_whole_number

    assert [check_whole_number(v, "k", -2, 5) for v in (np.int64(3), np.float32(2.0), np.uint8(1))] == [3, 2, 1]
    for value in ("--1", "²", "1e3", np.bool_(True), np.float64("nan"), float("inf"), "9" * 5000):
        with pytest.raises(ValueError, match="whole number"):
            check_whole_number(value, "k", -2, 5)
