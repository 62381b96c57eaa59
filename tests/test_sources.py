"""Feature sources are plugins: a source defined here, in the test, is scored, explained, saved and reloaded
strictly with no edit to the library; and the registry refuses what it cannot build."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import micro_config
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mklvisita import Matcher, MKLVisITA
from mklvisita.checkpoint import CheckpointError
from mklvisita.config import ConfigError
from mklvisita.features import ImageFeatures, TextFeatures
from mklvisita.kernel_functions import ShareKernel
from mklvisita.sources import FeatureSource, SourceContext, SourceEmbeddings, available_features, register_source


@dataclass
class BrightnessOptions:
    words: list[str] = field(default_factory=lambda: ["bright"])  # caption words that ask for a bright image


@register_source
class Brightness(FeatureSource):
    """A toy source: how bright the image is (per cell and overall, plus a learned offset) against how much the
    caption asks for brightness (the share of its words in ``options.words``)."""

    name = "brightness"
    features = ("brightness",)
    config_class = BrightnessOptions
    pooled_features = ("brightness",)
    map_features = ("brightness",)

    def __init__(self, ctx: SourceContext, enabled: list[str], options: BrightnessOptions):
        super().__init__(ctx, enabled, options)
        self.functions["brightness"] = nn.ModuleList([ShareKernel()])
        self.grid = tuple(ctx.vision.grids[-1])
        vocab = ctx.tokenizer.get_vocab()
        table = torch.zeros(max(vocab.values()) + 1)
        table[[vocab[w] for w in options.words]] = 1.0
        self.register_buffer("asks", table, persistent=False)  # rebuilt from the options and the tokenizer
        self.offset = nn.Parameter(torch.zeros(()))  # saved with the checkpoint

    def encode_image(self, pixel_values: torch.Tensor, img: ImageFeatures) -> dict[str, torch.Tensor]:
        cells = F.adaptive_avg_pool2d(pixel_values.mean(1, keepdim=True), self.grid).flatten(1)  # (B, P)
        return {"cells": cells.sigmoid()}

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        return {"tokens": self.asks[input_ids] * txt.word_mask}  # (B, T)

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        level = feats["cells"].mean(-1, keepdim=True) + self.offset  # (B, 1)
        return SourceEmbeddings({"brightness": level.unsqueeze(1)}, {"cells": feats["cells"]})  # (B, 1, 1)

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        share = feats["tokens"].sum(-1, keepdim=True) / word_mask.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
        return SourceEmbeddings({"brightness": share.unsqueeze(1)}, {"tokens": feats["tokens"]})

    def word_maps(self, feature: str, img: dict, txt: dict) -> torch.Tensor:
        return (txt["tokens"].unsqueeze(-1) * img["cells"].unsqueeze(1)).unsqueeze(1)  # (B, 1, T, P)


def _config():
    cfg = micro_config()
    cfg.text.extra_vocabulary = ["bright", "dark"]
    cfg.kernels.sources = ["global", "local", "brightness"]
    cfg.kernels.options = {"brightness": {"words": ["bright"]}}
    return cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = MKLVisITA(_config())
    with torch.no_grad():
        model.sources["brightness"].offset.fill_(0.25)
    folder = tmp_path_factory.mktemp("toy") / "brightness"
    model.save_pretrained(folder)
    return folder


def _images():
    return [Image.new("RGB", (40, 40), (250, 250, 250)), Image.new("RGB", (40, 40), (5, 5, 5))]


CAPTIONS = ["a bright square", "a dark square", "a square"]


def test_a_source_defined_outside_the_library_is_scored_explained_saved_and_reloaded_strictly(saved):
    assert "brightness" in available_features()
    matcher = Matcher.from_pretrained(saved)
    model = matcher.model
    assert model.kernel_names[-1] == "brightness/share" and "brightness/share" in model.kernels.word_map_names
    assert float(model.sources["brightness"].offset.detach()) == 0.25  # the learned offset came back from the file
    r = matcher.score(_images(), CAPTIONS)
    np.testing.assert_allclose(r.kernel_contributions.sum(-1), r.similarity, atol=1e-5)
    k = r.kernel_contributions[..., -1] / float(model.kernel_weights()[-1].detach())  # the toy kernel itself
    assert k[0, 0] > k[1, 0] > 0  # "bright": the white image more than the black one
    np.testing.assert_allclose(k[:, 1:], 0.0, atol=1e-7)  # no "bright" word: no evidence
    half = np.zeros((40, 40, 3), np.uint8)
    half[:, :20] = 250  # white on the left, black on the right
    e = matcher.explain(Image.fromarray(half), CAPTIONS[0], method="kernel")
    heat = e.kernel_maps["brightness/share"][e.tokens.index("bright")]  # (H, W), the image's own frame
    assert heat.shape == (40, 40) and heat[:, :20].mean() > heat[:, 20:].mean()
    again = Matcher.from_pretrained(saved).score(_images(), CAPTIONS)
    np.testing.assert_array_equal(again.similarity, r.similarity)


def test_the_toy_sources_options_and_weights_load_strictly(saved, tmp_path):
    state = load_file(str(saved / "model.safetensors"))
    assert "kernels.sources.brightness.offset" in state and not any(k.endswith(".asks") for k in state)
    broken = tmp_path / "no_offset"
    broken.mkdir()
    for f in saved.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    del state["kernels.sources.brightness.offset"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="kernels.sources.brightness.offset"):
        MKLVisITA.from_pretrained(broken)


def test_the_registry_refuses_what_it_cannot_build():
    cfg = _config()
    cfg.kernels.options = {"brightness": {"wordz": ["bright"]}}
    with pytest.raises(ConfigError, match="kernels.options.brightness.wordz: unknown config field"):
        MKLVisITA(cfg)
    cfg = _config()
    cfg.kernels.sources = ["global", "brightnes"]
    with pytest.raises(ConfigError, match="unknown source 'brightnes'"):
        MKLVisITA(cfg)
    cfg = _config()
    cfg.kernels.sources = ["global"]
    with pytest.raises(ConfigError, match="kernels.options.brightness: no source"):
        MKLVisITA(cfg)
    with pytest.raises(ValueError, match="already a feature of source 'brightness'"):

        @register_source
        class Clash(FeatureSource):
            name = "clash"
            features = ("brightness",)


def test_kernel_order_is_the_registrys_whatever_the_config_lists():
    cfg = _config()
    cfg.kernels.sources = ["brightness", "local", "global"]
    names = MKLVisITA(cfg).kernel_names
    assert names[0].startswith("global/") and names[-1] == "brightness/share"
