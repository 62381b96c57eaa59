"""The encoders' own token sources, with learned projection heads: "global", "mid" and "local".

    global  image CLS (or the CNN's pooled feature) <-> text CLS of the last layer
    mid     mean-pooled tokens of an intermediate level of each encoder (``kernels.options.mid``)
    local   word <-> patch late interaction over the last level: mean over words of the max over patches
            (FILIP / ColBERT); its word x patch maps explain a caption and may bias the fusion's attention

Decisions:
    - Each source projects its features once per kernel function (``kernels.functions``): one Linear producing all
      n projections at once (D -> n * d, ``kernels.proj_dim``), split afterwards, each L2-normalised. Own
      projections per kernel are what let a convex mix of monotone kernels change the ranking (mklvisita.kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..features import ImageFeatures, TextFeatures
from ..kernel_functions import local_max_cosine, make_kernel_function, mean_over_words
from .base import FeatureSource, SourceContext, SourceEmbeddings, register_source


class _Projected(FeatureSource):
    """A token source with one projection per kernel function on each side."""

    def __init__(self, ctx: SourceContext, enabled: list[str], options=None, image_dim: int = 0, text_dim: int = 0):
        super().__init__(ctx, enabled, options)
        k = ctx.kernels
        self.n, self.d = len(k.functions), k.proj_dim
        self.image_proj = nn.Linear(image_dim, self.n * self.d)
        self.text_proj = nn.Linear(text_dim, self.n * self.d)
        self.functions[self.name] = nn.ModuleList([make_kernel_function(f, k) for f in k.functions])
        self.prefix = ctx.vision.num_prefix_tokens
        self.last_image = ctx.vision.depth - 1
        self.last_text = ctx.text.depth - 1

    def _pooled(self, x: torch.Tensor) -> SourceEmbeddings:
        return SourceEmbeddings({self.name: F.normalize(x.unflatten(-1, (self.n, self.d)), dim=-1)}, {})  # (B, n, d)

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        return self._pooled(self.image_proj(feats["x"]))

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        return self._pooled(self.text_proj(feats["x"]))


@register_source
class GlobalTokens(_Projected):
    name = "global"
    features = ("global",)
    pooled_features = ("global",)

    def __init__(self, ctx: SourceContext, enabled: list[str], options=None):
        super().__init__(ctx, enabled, options, ctx.vision.pooled_width, ctx.text.width)

    def encode_image(self, pixel_values: torch.Tensor, img: ImageFeatures) -> dict[str, torch.Tensor]:
        return {"x": img.pooled}

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        return {"x": txt.pooled}


@dataclass
class MidOptions:
    """Settings of the "mid" source."""

    image_level: int | None = None  # image-encoder level (ViT block / CNN stage) it reads; None = the middle one
    text_level: int | None = None  # text layer it reads; None = the middle layer


@register_source
class MidTokens(_Projected):
    name = "mid"
    features = ("mid",)
    config_class = MidOptions
    pooled_features = ("mid",)

    def __init__(self, ctx: SourceContext, enabled: list[str], options: MidOptions):
        depth = ctx.vision.depth
        level = options.image_level if options.image_level is not None else max(0, depth // 2 - 1)
        if not -depth <= level < depth:
            raise ConfigError(
                f"kernels.options.mid.image_level={level} is out of range for an image encoder of {depth} levels"
            )
        level %= depth
        super().__init__(ctx, enabled, options, ctx.vision.widths[level], ctx.text.width)
        text_level = options.text_level if options.text_level is not None else max(0, ctx.text.depth // 2 - 1)
        self.image_levels, self.text_levels = (level,), (text_level,)

    def encode_image(self, pixel_values: torch.Tensor, img: ImageFeatures) -> dict[str, torch.Tensor]:
        return {"x": img.levels[self.image_levels[0]][:, self.prefix :].mean(1)}

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        mask = txt.attention_mask.unsqueeze(-1).float()
        return {"x": (txt.levels[self.text_levels[0]] * mask).sum(1) / mask.sum(1).clamp_min(1.0)}


@register_source
class LocalTokens(_Projected):
    name = "local"
    features = ("local",)
    map_features = ("local",)
    affinity_feature = "local"

    def __init__(self, ctx: SourceContext, enabled: list[str], options=None):
        super().__init__(ctx, enabled, options, ctx.vision.widths[-1], ctx.text.width)

    def encode_image(self, pixel_values: torch.Tensor, img: ImageFeatures) -> dict[str, torch.Tensor]:
        return {"x": img.levels[self.last_image][:, self.prefix :]}  # (B, P, C) patch tokens

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        return {"x": txt.levels[self.last_text]}  # (B, T, D) every position; the word mask marks the words

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.unflatten(-1, (self.n, self.d)).transpose(1, 2), dim=-1)  # (B, n, L, d)

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        x = feats["x"]
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return SourceEmbeddings({}, {"tokens": self._tokens(self.image_proj(x)), "mask": mask})

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        return SourceEmbeddings({}, {"tokens": self._tokens(self.text_proj(feats["x"])), "mask": word_mask})

    def kernel_values(self, feature: str, img: dict, txt: dict, pairwise: bool) -> torch.Tensor:
        cos = local_max_cosine(img["tokens"], img["mask"], txt["tokens"], pairwise)  # (..., n, T)
        fns = self.functions[self.name]
        return torch.stack([mean_over_words(fn(cos[..., i, :]), txt["mask"], pairwise) for i, fn in enumerate(fns)], -1)

    def word_maps(self, feature: str, img: dict, txt: dict) -> torch.Tensor:
        cos = torch.einsum("bnpd,bntd->bntp", img["tokens"], txt["tokens"])
        return torch.stack([fn(cos[:, i]) for i, fn in enumerate(self.functions[self.name])], 1)  # (B, n, T, P)

    def affinity_maps(self, img: dict, txt: dict) -> torch.Tensor:
        return self.word_maps(self.name, img, txt) * txt["mask"][:, None, :, None]  # no bias on [CLS]/[SEP]/pad rows
