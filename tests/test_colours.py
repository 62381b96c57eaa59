"""The colour kernel: pixels named by basic colour terms against a caption's colour words (mklvisita.sources.colour)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mklvisita.config import ConfigError, FusionConfig, KernelConfig, MKLVisITAConfig, TextConfig, VisionConfig
from mklvisita.explain import explain_pair
from mklvisita.inputs import Processor
from mklvisita.model import MKLVisITA
from mklvisita.sources.colour import BASIC_COLOURS, PROTOTYPES, ColourNames, name_colours
from mklvisita.tokenizer import load_tokenizer

PHOTO = Path(__file__).resolve().parent.parent / "assets" / "mklvisita-photo"
RED, BLUE = BASIC_COLOURS.index("red"), BASIC_COLOURS.index("blue")


def _config(**kernels) -> MKLVisITAConfig:
    return MKLVisITAConfig(
        vision=VisionConfig(model_name="tf_efficientnet_lite0", pretrained=False, image_size=64),
        text=TextConfig(width=32, layers=1, heads=2, max_length=16),
        kernels=KernelConfig(sources=["global", "colour"], functions=["cosine"], proj_dim=16, **kernels),
        fusion=FusionConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def model() -> MKLVisITA:
    torch.manual_seed(0)
    return MKLVisITA(_config()).eval()


def _red_left_blue_right(width: int = 64, height: int = 64) -> Image.Image:
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (210, 20, 30)
    a[:, width // 2 :] = (30, 60, 210)
    return Image.fromarray(a)


def test_pixels_are_named_by_the_nearest_basic_colour():
    protos = torch.tensor(PROTOTYPES, dtype=torch.float32) / 255.0
    assert name_colours(protos, 15.0).argmax(-1).tolist() == list(range(len(BASIC_COLOURS)))
    everyday = {"red": (255, 0, 0), "blue": (0, 0, 255), "orange": (255, 165, 0), "green": (0, 128, 0),
                "white": (250, 250, 250), "brown": (139, 69, 19), "yellow": (255, 255, 0),
                "pink": (255, 182, 193)}  # fmt: skip
    names = name_colours(torch.tensor(list(everyday.values()), dtype=torch.float32) / 255.0, 15.0)
    assert [BASIC_COLOURS[i] for i in names.argmax(-1).tolist()] == list(everyday)
    assert torch.allclose(names.sum(-1), torch.ones(len(everyday)))


def test_colour_words_count_as_whole_words_only():
    tok = load_tokenizer(str(PHOTO))
    names = ColourNames(15.0, 4.0, tok, (0.5,) * 3, (0.5,) * 3, (128,) * 3)
    captions = ["a red flag", "a bluebird on a branch", "a GRAY cat and a golden cup", "a cup of coffee"]
    enc = tok(captions, padding=True, return_tensors="pt")
    word = enc["attention_mask"].bool()
    word[:, 0] = False
    tokens = names.token_colours(enc["input_ids"], word)  # (4, T, 11)
    q = names.text_features(tokens)["colour"]
    assert q[0].argmax() == RED and q[0].sum() == pytest.approx(1.0)
    assert q[1].sum() == 0  # "blue" of "bluebird" is a word piece, not the word blue
    assert q[2].tolist() == pytest.approx([0.5 if c in ("grey", "yellow") else 0.0 for c in BASIC_COLOURS])
    assert q[3].sum() == 0


def test_saliency_weights_the_cells_and_padding_is_left_out(model):
    processor = Processor(model.config, model.tokenizer)
    pv, _ = processor.images([_red_left_blue_right(64, 32)])  # letterboxed: grey bars above and below
    cells = model.sources["colour"].names.cells(pv, (4, 4))  # (1, 16, 11)
    rows = cells[0].view(4, 4, -1)
    assert rows[0].sum() == 0 and rows[3].sum() == 0  # padding-only rows: no colour at all
    assert rows[1, 0].argmax() == RED and rows[1, 3].argmax() == BLUE
    salient_left = torch.zeros(1, 16, 8)
    salient_left.view(1, 4, 4, 8)[:, 1:3, :2] = 1.0  # strong features on the red half only
    h = model.sources["colour"].names.image_features(cells, salient_left)["colour"][0]
    assert h[RED] > 0.8 and h[BLUE] < 0.05  # without the saliency: about 0.44 each
    flat = ColourNames(15.0, 0.0, model.tokenizer, (0.5,) * 3, (0.5,) * 3, (128,) * 3)  # power 0: cells alike
    h0 = flat.image_features(cells, salient_left)["colour"][0]
    assert h0[RED] > 0.25 and h0[BLUE] > 0.25  # both halves count


def test_colour_kernel_scores_the_share_of_the_captions_colour(model):
    processor = Processor(model.config, model.tokenizer)
    pv, _ = processor.images([_red_left_blue_right(), Image.new("RGB", (64, 64), PROTOTYPES[BLUE])])
    enc = processor.captions(["a red square", "a blue square", "a square"])
    with torch.no_grad():
        img, txt = model.encode_image(pv), model.encode_text(enc["input_ids"], enc["attention_mask"])
        out = model.similarity(model.embed_image(img), model.embed_text(txt))
        i = model.kernel_names.index("colour/share")
        k = out.contributions[..., i] / model.kernel_weights()[i]  # (2 images, 3 captions)
        h = img.sources["colour"]["colour"]  # the pooled, saliency-weighted colour names
    assert torch.allclose(k[:, 0], h[:, RED], atol=1e-5) and torch.allclose(k[:, 1], h[:, BLUE], atol=1e-5)
    assert bool((k[:, 2] == 0).all())  # no colour word: no evidence either way
    assert k[1, 1] > 0.7 and k[1, 0] < 0.05  # all blue (sigma 20 names the prototype blue 0.77 blue, 0.23 purple)
    assert 0.05 < k[0, 0] < 0.95 and 0.05 < k[0, 1] < 0.95  # half and half (weighted by random features)


def test_a_colour_words_map_points_at_that_colour(model):
    processor = Processor(model.config, model.tokenizer)
    for caption, left in (("a red square", True), ("a blue square", False)):
        e = explain_pair(model, processor, _red_left_blue_right(), caption, method="kernel")
        heat = e.kernel_maps["colour/share"][e.tokens.index(caption.split()[1])]  # (H, W)
        half = heat.shape[1] // 2
        assert (heat[:, :half].mean() > heat[:, half:].mean()) == left


def test_bad_colour_settings_are_refused():
    with pytest.raises(ConfigError, match="options.colour.sigma"):
        MKLVisITA(_config(options={"colour": {"sigma": 0.0}}))
    with pytest.raises(ConfigError, match="saliency_power"):
        MKLVisITA(_config(options={"colour": {"saliency_power": -1.0}}))
    with pytest.raises(ConfigError, match="kernels.options.colour.sigmaa: unknown config field"):
        MKLVisITA(_config(options={"colour": {"sigmaa": 1.0}}))


def test_shipped_photo_checkpoint_has_the_colour_kernel():
    from mklvisita.checkpoint import read_config

    cfg = read_config(PHOTO)
    assert "colour" in cfg.kernels.sources
    assert cfg.kernels.options["colour"] == {"sigma": 15.0, "saliency_power": 4.0, "stride": 2}  # every other pixel
