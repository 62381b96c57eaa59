"""What the encoders and the feature sources produce for a batch, before the kernels' projections.

Decisions:
    - Each feature source's own features travel in a dict keyed by the source's name (``sources[name]``, itself a
      dict of tensors whose first dimension is the batch), so these classes know no source: selecting, moving and
      concatenating batches treat every tensor alike.
    - Concatenating batches pads every dimension but the first to the longest (zeros, False for masks): captions of
      different batches are padded to different lengths; fixed dimensions are equal and stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SourceTensors = dict[str, dict[str, torch.Tensor]]  # source name -> its tensors, batch first


def map_sources(sources: SourceTensors, fn: Callable[[torch.Tensor], torch.Tensor]) -> SourceTensors:
    """``fn`` applied to every tensor of every source."""
    return {name: {k: fn(v) for k, v in part.items()} for name, part in sources.items()}


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch, padding every other dimension to the largest (zeros / False)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        pad: list[int] = []
        for d in range(t.dim() - 1, 0, -1):  # F.pad takes the last dimension first
            pad += [0, shape[d - 1] - t.shape[d]]
        out.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(out)


def cat_sources(parts: list[SourceTensors]) -> SourceTensors:
    """Concatenate the batches of several ``sources`` dicts (same sources and keys in each)."""
    return {name: {k: cat_padded([p[name][k] for p in parts]) for k in part} for name, part in parts[0].items()}


@dataclass
class ImageFeatures:
    """The image encoder's output (transformers style) and the feature sources' image features."""

    levels: dict[int, torch.Tensor]  # level -> (B, N, C_level) tokens, prefix (CLS) first; the last level is normed
    pooled: torch.Tensor  # (B, Dv) CLS of the last level (ViT, hybrid) or the CNN's pooled pre-logits feature
    attentions: list[torch.Tensor] | None = None  # ViT / hybrid blocks' self-attention (B, heads, N, N), when asked
    backbone_map: torch.Tensor | None = None  # CNN / hybrid: the CNN's final feature map (B, P, C_cnn)
    backbone_pooled: torch.Tensor | None = None  # CNN / hybrid: the CNN's pooled pre-logits feature (B, C_cnn)
    sources: SourceTensors = field(default_factory=dict)  # each feature source's image features, by source name

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ImageFeatures:
        opt = lambda x: None if x is None else fn(x)  # noqa: E731
        return ImageFeatures(
            {k: fn(v) for k, v in self.levels.items()},
            fn(self.pooled),
            None if self.attentions is None else [fn(a) for a in self.attentions],
            opt(self.backbone_map),
            opt(self.backbone_pooled),
            map_sources(self.sources, fn),
        )

    def select(self, index) -> ImageFeatures:
        return self._map(lambda x: x[index])

    def keep(self, levels: list[int]) -> ImageFeatures:
        """Only the given levels (for caching fusion inputs); attentions, backbone extras and sources are dropped."""
        return ImageFeatures({k: self.levels[k] for k in levels}, self.pooled)

    def to(self, device) -> ImageFeatures:
        return self._map(lambda x: x.to(device))

    @staticmethod
    def cat(parts: list[ImageFeatures]) -> ImageFeatures:
        def cat(get):
            xs = [get(p) for p in parts]
            return None if any(x is None for x in xs) else torch.cat(xs)

        first = parts[0]
        attentions = None
        if first.attentions is not None and all(p.attentions is not None for p in parts):
            attentions = [torch.cat([p.attentions[i] for p in parts]) for i in range(len(first.attentions))]
        return ImageFeatures(
            {k: torch.cat([p.levels[k] for p in parts]) for k in first.levels},
            torch.cat([p.pooled for p in parts]),
            attentions,
            cat(lambda p: p.backbone_map),
            cat(lambda p: p.backbone_pooled),
            cat_sources([p.sources for p in parts]),
        )


@dataclass
class TextFeatures:
    """The text encoder's output and the feature sources' caption features."""

    levels: dict[int, torch.Tensor]  # layer -> (B, T, Dt)
    pooled: torch.Tensor  # (B, Dt) CLS of the last layer
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    word_mask: torch.Tensor  # (B, T) True = a word piece (not [CLS], [SEP] or padding)
    sources: SourceTensors = field(default_factory=dict)  # each feature source's caption features, by source name

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TextFeatures:
        return TextFeatures(
            {k: fn(v) for k, v in self.levels.items()},
            fn(self.pooled),
            fn(self.attention_mask),
            fn(self.word_mask),
            map_sources(self.sources, fn),
        )

    def select(self, index) -> TextFeatures:
        return self._map(lambda x: x[index])

    def keep(self, levels: list[int]) -> TextFeatures:
        return TextFeatures({k: self.levels[k] for k in levels}, self.pooled, self.attention_mask, self.word_mask)

    def to(self, device) -> TextFeatures:
        return self._map(lambda x: x.to(device))

    @staticmethod
    def cat(parts: list[TextFeatures]) -> TextFeatures:
        """Concatenate batches, padding every one to the longest caption."""
        return TextFeatures(
            {k: cat_padded([p.levels[k] for p in parts]) for k in parts[0].levels},
            torch.cat([p.pooled for p in parts]),
            cat_padded([p.attention_mask for p in parts]),
            cat_padded([p.word_mask for p in parts]),
            cat_sources([p.sources for p in parts]),
        )
