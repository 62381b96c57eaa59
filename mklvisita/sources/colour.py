"""Colour names: the fixed feature source "colour" (no parameters, nothing trained).

A caption's colour words ("a *red* flag", "an astronaut in an *orange* suit") are attributes that an ImageNet
classifier's classes do not carry, so the concept kernels cannot tell a red flag from a yellow one. This source
compares them with the colours the image shows, as people name them.

Decisions:
    - Eleven basic colour terms (Berlin and Kay's): black, white, grey, red, orange, yellow, green, blue, purple,
      pink, brown. Each has one prototype, a typical sRGB value chosen by us (``PROTOTYPES``); a pixel is named
      softly by its CIELAB distance to the prototypes, w_c = exp(-(d_c^2 - min d^2) / 2 sigma^2) normalised
      (``kernels.options.colour.sigma``, in Lab units). No colour chart was fitted: the prototypes are round numbers,
      and sigma is the one value chosen on data (the tune half of the Tux Paint stamps).
    - Image side: the pixels' names averaged over each cell of the CNN's final grid (``cells``, (B, P, 11); the
      letterbox padding, exactly the pad colour, is left out; with ``kernels.options.colour.stride`` s > 1, every
      s-th pixel of every s-th row: the cells of a 224-pixel input on a 7 x 7 grid are 32 pixels wide, so s = 2 still
      names 256 pixels of each, at a quarter of the cost), and a pooled distribution h (B, 11) that weights
      each cell by its *saliency*: the norm of the CNN's final feature map at that cell, min-max scaled per image
      and raised to ``kernels.options.colour.saliency_power``. A cut-out on white or a photo's sky has weak features,
      the object strong ones, so h describes the object's colours more than the background's.
    - Text side: the caption's whole-word colour terms (``COLOUR_WORDS``: the eleven, "gray", "silver" as grey,
      "gold"/"golden" as yellow, "violet" as purple; a word piece followed by a continuation such as "blue" in
      "bluebird" does not count). q (B, 11) is their mean one-hot; a caption without one has q = 0.
    - Kernel "colour/share": K = q . h, the saliency-weighted share of the image in the caption's colour(s), in
      [0, 1]; 0 for a caption that names no colour, so it only ever adds evidence to captions that name one.
      Its per-word map (explanations) is each colour word's share in every cell, 0 for other words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..features import ImageFeatures, TextFeatures
from ..kernel_functions import ShareKernel
from .base import FeatureSource, SourceContext, SourceEmbeddings, register_source

BASIC_COLOURS = ("black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
NUM_COLOURS = len(BASIC_COLOURS)
# A typical sRGB value of each term (0-255), in BASIC_COLOURS order.
PROTOTYPES = (
    (20, 20, 20),
    (245, 245, 245),
    (128, 128, 128),
    (200, 30, 35),
    (240, 130, 25),
    (240, 215, 40),
    (60, 150, 50),
    (40, 90, 200),
    (120, 50, 150),
    (240, 140, 180),
    (125, 80, 40),
)
COLOUR_WORDS = {c: i for i, c in enumerate(BASIC_COLOURS)} | {
    "gray": 2,
    "silver": 2,
    "gold": 5,
    "golden": 5,
    "violet": 8,
}
_D65 = (0.95047, 1.0, 1.08883)
_SRGB_TO_XYZ = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) sRGB in [0, 1] -> (..., 3) CIELAB (D65)."""
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ torch.tensor(_SRGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device).T
    xyz = xyz / torch.tensor(_D65, dtype=rgb.dtype, device=rgb.device)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    return torch.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def _lab_channels(rgb: torch.Tensor) -> torch.Tensor:
    """(3, N) sRGB in [0, 1] -> (3, N) CIELAB: :func:`srgb_to_lab` with the channels first, as an image's pixels lie
    in memory (no transposed copy of every pixel on the way in or out; the same arithmetic, the same numbers)."""
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.tensor(_SRGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device) @ linear
    xyz = xyz / torch.tensor(_D65, dtype=rgb.dtype, device=rgb.device).view(3, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    return torch.stack([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


def name_colours(rgb: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., 3) sRGB in [0, 1] -> (..., 11) soft colour names (rows sum to 1)."""
    lab = srgb_to_lab(rgb.float())
    return _names(lab.reshape(-1, 3).T, sigma).T.reshape(*lab.shape[:-1], NUM_COLOURS)


def _names(lab: torch.Tensor, sigma: float) -> torch.Tensor:
    """(3, N) CIELAB -> (11, N) soft names. Colours along the first dimension: a softmax over a last dimension of 11
    is several times slower on a CPU, and this runs on every pixel of every image scored."""
    protos = srgb_to_lab(torch.tensor(PROTOTYPES, dtype=torch.float32, device=lab.device) / 255.0)  # (11, 3)
    d2 = (lab * lab).sum(0, keepdim=True) - 2.0 * protos @ lab + (protos * protos).sum(-1, keepdim=True)  # (11, N)
    # exp(-(d2 - min) / 2 sigma^2), normalised: in place, one (11, N) buffer instead of five
    w = d2.sub_(d2.amin(0, keepdim=True)).div_(-(2.0 * sigma**2)).exp_()
    return w.div_(w.sum(0, keepdim=True))


def colour_token_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vocabulary id: its colour index (-1: none) and whether it continues a word ("##..." word pieces)."""
    vocab = tokenizer.get_vocab()
    colour = torch.full((max(vocab.values()) + 1,), -1, dtype=torch.long)
    continues = torch.zeros(colour.shape[0], dtype=torch.bool)
    for token, i in vocab.items():
        if token.startswith("##"):
            continues[i] = True
            continue
        word = token.lstrip("\u2581\u0120").lower()  # sentencepiece / byte-level BPE word-start marks
        if word in COLOUR_WORDS:
            colour[i] = COLOUR_WORDS[word]
    return colour, continues


@dataclass
class ColourOptions:
    """Settings of the colour source (``kernels.options.colour``)."""

    sigma: float = 20.0  # softness of naming a pixel's colour (CIELAB units)
    saliency_power: float = 2.0  # exponent of the cells' saliency weights (0: all alike)
    stride: int = 1  # name every stride-th pixel of every stride-th row (1: all; a serving cost setting)

    def validate(self) -> None:
        if self.sigma <= 0 or self.saliency_power < 0:
            raise ConfigError("kernels.options.colour.sigma must be > 0 and .saliency_power >= 0")
        if not (isinstance(self.stride, int) and not isinstance(self.stride, bool) and 1 <= self.stride <= 8):
            raise ConfigError(f"kernels.options.colour.stride must be a whole number from 1 to 8, not {self.stride!r}")


class ColourNames(nn.Module):
    """The colour source's features (module docstring). Buffers are rebuilt from the tokenizer, never saved."""

    def __init__(self, sigma: float, saliency_power: float, tokenizer, mean, std, pad_value, stride: int = 1):
        super().__init__()
        self.sigma = float(sigma)
        self.saliency_power = float(saliency_power)
        self.stride = int(stride)
        colour, continues = colour_token_table(tokenizer)
        self.register_buffer("token_colour", colour, persistent=False)
        self.register_buffer("token_continues", continues, persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        pad = (torch.tensor(pad_value, dtype=torch.float32) / 255.0).view(1, 3, 1, 1)
        self.register_buffer("pad", pad, persistent=False)

    def cells(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Normalised model input (B, 3, H, W) -> each cell's mean colour names (B, gh * gw, 11); padding left out
        (a cell of padding only is all zeros). With ``stride`` s > 1 the cells average every s-th pixel of every s-th
        row (the grid must still divide the strided size as it divides the input's, or the cells' edges move)."""
        if self.stride > 1:
            pixel_values = pixel_values[..., :: self.stride, :: self.stride]
        rgb = pixel_values.float() * self.std + self.mean  # (B, 3, H, W) in [0, 1]
        valid = ((rgb - self.pad).abs() > 0.5 / 255.0).any(1, keepdim=True).float()  # (B, 1, H, W)
        b, _, height, width = rgb.shape
        lab = _lab_channels(rgb.transpose(0, 1).reshape(3, -1))  # (3, B H W)
        # pooled as (11, B, H, W) planes, each the same sums as the (B, 11, H, W) view's, without transposing them
        names = _names(lab, self.sigma).view(NUM_COLOURS, b, height, width).mul_(valid.transpose(0, 1))
        total = F.adaptive_avg_pool2d(names, grid).transpose(0, 1)  # (B, 11, gh, gw)
        share = F.adaptive_avg_pool2d(valid, grid)
        return (total / share.clamp_min(1e-6)).flatten(2).transpose(1, 2)  # (B, P, 11)

    def image_features(self, cells: torch.Tensor, feature_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """cells (B, P, 11), the CNN's final map (B, P, C) -> pooled h (B, 11) and the cells (per-word maps)."""
        s = feature_map.float().norm(dim=-1)  # (B, P)
        s = s - s.amin(-1, keepdim=True)
        s = (s / s.amax(-1, keepdim=True).clamp_min(1e-6)) ** self.saliency_power
        s = s * (cells.sum(-1) > 0)  # padding-only cells weigh nothing
        h = (cells * s.unsqueeze(-1)).sum(1) / s.sum(-1, keepdim=True).clamp_min(1e-6)
        return {"colour": h, "colour_local": cells}

    def token_colours(self, input_ids: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and word mask -> (B, T, 11): a one-hot at each whole-word colour term, zeros elsewhere."""
        ids = input_ids.clamp(0, self.token_colour.shape[0] - 1)
        colour = self.token_colour[ids]  # (B, T)
        continued = torch.zeros_like(word_mask, dtype=torch.bool)
        continued[:, :-1] = self.token_continues[ids[:, 1:]]
        hit = (colour >= 0) & word_mask.bool() & ~continued
        return F.one_hot(colour.clamp_min(0), NUM_COLOURS).float() * hit.unsqueeze(-1)

    @staticmethod
    def text_features(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token one-hots (B, T, 11) -> the caption's mean colour term q (B, 11) (0 without one) and the tokens."""
        count = tokens.sum((1, 2)).clamp_min(1.0)
        return {"colour": tokens.sum(1) / count.unsqueeze(-1), "colour_local": tokens}


@register_source
class ColourSource(FeatureSource):
    """The "colour" source: :class:`ColourNames` of the image's cells against the caption's colour words."""

    name = "colour"
    features = ("colour",)
    config_class = ColourOptions
    pooled_features = ("colour",)
    map_features = ("colour",)

    def __init__(self, ctx: SourceContext, enabled: list[str], options: ColourOptions):
        super().__init__(ctx, enabled, options)
        if ctx.tokenizer is None:
            raise ConfigError("kernels.sources 'colour' needs the tokenizer (its colour words); load the folder")
        self.functions["colour"] = nn.ModuleList([ShareKernel()])  # fixed features, one kernel: nothing to choose
        self.grid = tuple(ctx.vision.grids[-1])
        v = ctx.image
        self.names = ColourNames(
            options.sigma, options.saliency_power, ctx.tokenizer, v.mean, v.std, v.pad_value, options.stride
        )

    def encode_image(self, pixel_values: torch.Tensor, img: ImageFeatures) -> dict[str, torch.Tensor]:
        if img.backbone_map is None:
            raise ConfigError("kernels.sources 'colour' needs a CNN (or hybrid) image encoder (its final map)")
        return self.names.image_features(self.names.cells(pixel_values, self.grid), img.backbone_map)

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        return self.names.text_features(self.names.token_colours(input_ids, txt.word_mask))

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        # (B, 1, 11) distributions, compared as they are; the cells / colour-word one-hots for the per-word maps
        return SourceEmbeddings({"colour": feats["colour"].unsqueeze(1)}, {"local": feats["colour_local"]})

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        return self.embed_image(feats)

    def word_maps(self, feature: str, img: dict, txt: dict) -> torch.Tensor:
        """Each colour word's share in every cell; 0 for other words: (B, 1, T, P)."""
        return torch.einsum("bpc,btc->btp", img["local"], txt["local"]).unsqueeze(1)
