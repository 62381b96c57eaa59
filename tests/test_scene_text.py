"""The scene-text kernel: words read in the image by OCR against the caption's words (mklvisita.sources.scene_text)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from mklvisita.config import ConfigError, FusionConfig, KernelConfig, MKLVisITAConfig, TextConfig, VisionConfig
from mklvisita.explain import explain_pair
from mklvisita.inputs import Processor
from mklvisita.model import MKLVisITA
from mklvisita.sources.scene_text import SceneTextReader, caption_word_vectors, word_vectors, words_of
from mklvisita.tokenizer import load_tokenizer

PHOTO = Path(__file__).resolve().parent.parent / "assets" / "mklvisita-photo"


def _config(**kernels) -> MKLVisITAConfig:
    return MKLVisITAConfig(
        vision=VisionConfig(model_name="tf_efficientnet_lite0", pretrained=False, image_size=224),
        text=TextConfig(width=32, layers=1, heads=2, max_length=16, extra_vocabulary=["stop", "sign", "yield"]),
        kernels=KernelConfig(sources=["global", "scene_text"], functions=["cosine"], proj_dim=16, **kernels),
        fusion=FusionConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def model() -> MKLVisITA:
    torch.manual_seed(0)
    return MKLVisITA(_config()).eval()


def _sign(word: str = "STOP", where: str = "left") -> Image.Image:
    """A white image with one big printed word, on its left or right half."""
    im = Image.new("RGB", (448, 448), "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=72)
    x = 20 if where == "left" else 250
    draw.text((x, 180), word, fill="black", font=font)
    return im


def test_words_are_letter_runs_without_function_words():
    assert words_of("Measuring tape.") == ["measuring", "tape"]
    assert words_of("“Give Way” means you have to let other people go first") == [
        "give", "way", "means", "other", "people", "first"
    ]  # fmt: skip
    assert words_of("A 25' T, ok") == []


def test_trigram_vectors_match_misreadings_and_inflections_not_other_words():
    def cos(a: str, b: str) -> float:
        u, v = word_vectors([a, b], 2)
        return float(u @ v)

    assert cos("school", "school") == pytest.approx(1.0)
    assert cos("crossinc", "crossing") > 0.6  # one letter misread
    assert cos("measure", "measuring") > 0.5
    assert cos("yield", "school") < 0.2 and cos("tape", "stop") < 0.3


def test_caption_words_are_rebuilt_from_their_pieces():
    tok = load_tokenizer(str(PHOTO))
    enc = tok(["a fireman and a stop sign"], return_tensors="pt")
    word = enc["attention_mask"].bool()
    word[:, 0] = False
    word[:, -1] = False
    vectors = caption_word_vectors(tok, enc["input_ids"], word)[0]  # (T, DIM)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens[2:4] == ["fire", "##man"]
    expected = word_vectors(["fireman", "stop", "sign"], 3)
    assert torch.allclose(vectors[2], expected[0]) and vectors[3].abs().sum() == 0  # on the first piece only
    assert torch.allclose(vectors[tokens.index("stop")], expected[1])
    assert vectors[1].abs().sum() == 0 and vectors[tokens.index("and")].abs().sum() == 0  # "a", "and": left out


def test_the_reader_reads_a_printed_word_and_the_kernel_finds_it_in_the_caption(model):
    processor = Processor(model.config, model.tokenizer)
    pv, _ = processor.images([_sign("STOP"), Image.new("RGB", (64, 64), "white")])
    found = model.sources["scene_text"].reader.read(pv)
    assert [w for w, _ in found[0]] == ["stop"] and found[1] == []
    x0, y0, x1, y1 = found[0][0][1]
    assert x1 < 112 and 70 < (y0 + y1) / 2 < 150  # on the left half, around the middle of the 224 input
    enc = processor.captions(["a stop sign", "a yield sign", "a sign"])
    with torch.no_grad():
        img, txt = model.encode_image(pv), model.encode_text(enc["input_ids"], enc["attention_mask"])
        out = model.similarity(model.embed_image(img), model.embed_text(txt))
        pair = model.similarity(model.embed_image(img.select([0])), model.embed_text(txt.select([0])), pairwise=True)
    i = model.kernel_names.index("scene_text/match")
    k = (out.contributions[..., i] / model.kernel_weights()[i]).detach()  # (2 images, 3 captions)
    assert k[0].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)  # "stop" found; "yield", "sign" are not "stop"
    assert k[1].tolist() == [0.0, 0.0, 0.0]  # nothing read: no evidence either way
    assert float((pair.contributions[0, i] / model.kernel_weights()[i]).detach()) == pytest.approx(1.0, abs=1e-5)


def test_a_matched_words_map_covers_its_text_line(model):
    processor = Processor(model.config, model.tokenizer)
    for where in ("left", "right"):
        e = explain_pair(model, processor, _sign("STOP", where), "a stop sign", method="kernel")
        heat = e.kernel_maps["scene_text/match"][e.tokens.index("stop")]  # (H, W)
        half = heat.shape[1] // 2
        assert (heat[:, :half].sum() > heat[:, half:].sum()) == (where == "left")
        assert float(e.kernel_maps["scene_text/match"][e.tokens.index("a")].max()) == 0.0


def test_bad_settings_and_a_missing_engine_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="options.scene_text.match"):
        MKLVisITA(_config(options={"scene_text": {"match": 1.0}}))
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    with pytest.raises(ImportError, match="rapidocr-onnxruntime"):
        SceneTextReader((0.5,) * 3, (0.5,) * 3)


def test_a_text_line_partly_outside_the_image_covers_the_cells_it_reaches(model, monkeypatch):
    reader = model.sources["scene_text"].reader
    monkeypatch.setattr(reader, "read", lambda pixels: [[("stop", (-10.0, -6.0, 40.0, 20.0))]])
    f = reader.features(torch.zeros(1, 3, 224, 224), (7, 7))
    cells = f["cells"][0, 0].view(7, 7)
    assert f["mask"][0].tolist() == [True] + [False] * 15
    assert cells[0, 0] > 0.3 and cells[0, 1] > 0 and float(cells[1:].sum() + cells[:, 2:].sum()) == 0.0
