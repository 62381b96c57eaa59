"""Frozen-feature cache for training heads over frozen encoders (the photo-fusion run, ``data.feature_cache``).

With both backbones frozen and every feature source fixed (the photo sources have no trained parts before their
kernels), what ``encode_image`` / ``encode_text`` return for an image or a caption never changes during training:
only the kernel weights beta, the temperature, the fusion and the heads learn. The training pairs come from a fixed
pool of rendered scenes (``data.train_size`` scenes, each rendered once into the composites cache), so after the
first epoch every step reads its features from memory instead of running EfficientNet-Lite0, MiniLM, the concept
bridge (1,000 classes at every position), colour naming, scene-text reading and face finding again.

Decisions:
    - **Keyed by content**: an image by a hash of its model-input pixels, a caption by its token ids. Nothing
      depends on dataset indices, so the evaluation's images and the hard-negative captions are cached alike, and
      a wrong hit is impossible short of a hash collision.
    - **What is cached**: per image, the encoder levels the model reads (the fusion's stride-16 stage, the final map),
      the pooled feature, the final map and every source's raw image features; per caption, the text levels, the
      [CLS] state, the masks and every source's raw caption features. Floating tensors are kept in float16 (halves
      the memory; the trained parts see them in float32 again). The final map is kept once when the last level is it.
    - **Captions are encoded padded to ``text.max_length``** when they miss, so every token-aligned tensor has that
      length and can be cut to the caption's own tokens; a batch is padded back to its longest caption
      (:meth:`~mklvisita.features.TextFeatures.cat`), as the encoder would have padded it (masked positions).
    - **In memory, per process**: a resumed run refills it during its first epoch (same numbers, slower steps).
      Attention probabilities (``output_attentions``) are never cached: such calls run the encoders.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from mklvisita.features import ImageFeatures, TextFeatures


def _store(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.half() if t.is_floating_point() else t.clone()


class FeatureCache:
    """The memo behind :func:`install_feature_cache` (hits and misses are counted for the log)."""

    def __init__(self, model: Any):
        self.model = model
        self.encode_image = model.encode_image  # the bound originals
        self.encode_text = model.encode_text
        self.images: dict[bytes, ImageFeatures] = {}
        self.texts: dict[tuple[int, ...], TextFeatures] = {}
        self.hits = self.misses = 0

    # ----------------------------------------------------------------------------------------------- images
    @staticmethod
    def _image_key(x: torch.Tensor) -> bytes:
        return hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def image(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> ImageFeatures:
        if output_attentions or torch.is_grad_enabled() and pixel_values.requires_grad:
            return self.encode_image(pixel_values, output_attentions=output_attentions)
        keys = [self._image_key(x) for x in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self.images]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                out = self.encode_image(pixel_values[missing])
            last = max(out.levels)
            shared = out.backbone_map is not None and out.levels[last] is out.backbone_map
            for j, i in enumerate(missing):
                item = out.select(slice(j, j + 1))._map(_store)
                if shared:  # the last level is the final map: keep one copy
                    item.levels[last] = item.backbone_map
                self.images[keys[i]] = item
        device = pixel_values.device
        return ImageFeatures.cat([self.images[k] for k in keys])._map(lambda t: _load(t, device))

    # ---------------------------------------------------------------------------------------------- captions
    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        lengths = attention_mask.long().sum(-1).tolist()
        keys = [tuple(ids[:n].tolist()) for ids, n in zip(input_ids, lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.texts]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            full = self.model.config.text.max_length
            ids, mask = input_ids[missing], attention_mask[missing]
            pad = full - ids.shape[1]
            if pad > 0:  # every token-aligned tensor then has `full` positions (module docstring)
                pad_id = getattr(self.model.tokenizer, "pad_token_id", 0) or 0
                ids, mask = F.pad(ids, (0, pad), value=pad_id), F.pad(mask, (0, pad), value=0)
            with torch.no_grad():
                out = self.encode_text(ids, mask)
            for j, i in enumerate(missing):
                n = lengths[i]
                cut = lambda t, n=n: t[:, :n] if t.dim() >= 2 and t.shape[1] == full else t  # noqa: E731
                self.texts[keys[i]] = out.select(slice(j, j + 1))._map(lambda t, cut=cut: _store(cut(t)))
        device = input_ids.device
        return TextFeatures.cat([self.texts[k] for k in keys])._map(lambda t: _load(t, device))

    def stats(self) -> dict[str, int]:
        return {"images": len(self.images), "captions": len(self.texts), "hits": self.hits, "misses": self.misses}


def _load(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t.to(device)


def install_feature_cache(model: Any) -> FeatureCache:
    """Route ``model.encode_image`` / ``encode_text`` through a :class:`FeatureCache` (this model instance only).

    Raises:
        ValueError: an encoder is trained (``vision.frozen`` / ``text.frozen`` false): its features change every
            step, so caching them would train on stale features.
    """
    cfg = model.config
    if not (cfg.vision.frozen and cfg.text.frozen):
        raise ValueError(
            "data.feature_cache needs frozen encoders (model.vision.frozen and model.text.frozen true): a trained "
            "encoder's features change every step; set data.feature_cache: false"
        )
    trained = [n for n, p in model.sources.named_parameters() if p.requires_grad and _before_kernels(n)]
    if trained:
        raise ValueError(
            f"data.feature_cache: feature source parameter {trained[0]!r} is trained and its raw features would go "
            "stale; set data.feature_cache: false"
        )
    cache = FeatureCache(model)
    model.encode_image = cache.image
    model.encode_text = cache.text
    model.feature_cache = cache
    return cache


def _before_kernels(name: str) -> bool:
    """Whether a source parameter acts before the kernels (in encode_*): the projections and kernel functions act
    after the cache, in embed_* and the kernels."""
    after = ("functions.", "image_proj.", "text_proj.")
    return not any(part in name for part in after)
