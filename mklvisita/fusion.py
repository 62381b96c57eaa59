"""Hierarchical two-way cross-modal fusion.

Layer l reads the image tokens of ViT block ``image_levels[l]`` (early fusion layers see lower-level features)
and updates both streams:

    img  <- img + CrossAttn(img -> text)                (image tokens read the caption)
    txt  <- txt + SelfAttn(txt)
    txt  <- txt + CrossAttn(text -> img, + affinity bias) (words read the caption-aware image)
    txt, img <- + MLP
    (``cross_first``: the text's cross-attention before its self-attention)

The image stream carries over between layers: img_l = img_{l-1} + proj_l(level_l tokens), so what the image
learned of the caption in layer l is not lost when layer l + 1 brings in a new level. The text->image logits may
be biased by the word x patch affinity of the local kernels, mixed by each layer's own kernel weights (the
"kernel weights per fusion level" the demo shows). Every attention returns its probabilities so explanations
come from the model itself.

Decisions on cost (a pair's fusion pass used to cost more than both encoders, its image stream running once per
caption over every token):

- The caption-independent part of the image stream (each level's projection, and with ``image_pool`` > 1 the
  shared stream pooled, its text->image keys and values and the first layer's image->text queries, the update being
  zero there) is computed once per image; ``image_index`` maps pairs to images. It is one step,
  ``HierarchicalFusion.prepare_image``, that a caller may run beforehand and elsewhere (a Matcher call runs it on the
  overlap worker beside the captions' encoder); the forward computes it when not handed one, so the numbers are the
  same either way.
- ``image_pool`` = p > 1 splits the image stream in two: the caption-independent stream at every token, and the
  caption-aware update carried at p x p-pooled patches (CLS kept). Text->image keys and values are the shared
  stream's plus the upsampled projection of the update (``kv_delta``), so words still attend to every patch (full
  maps for explanations) while the per-caption image work is on N / p^2 tokens. Still two-way: the image reads the
  caption in every layer and what it read changes what the words see.
- ``image_mlp_ratio`` shrinks (or, at 0, drops) the image stream's feed-forward.
- With ``output_attentions=False`` attention runs through ``scaled_dot_product_attention``, the padding columns no
  caption of the batch uses are dropped (captions come padded to ``text.max_length``) and the last layer's text
  stream is computed for the [CLS] row only (the one row the ITM head reads); the same numbers, no maps.
- With ``image_pool`` > 1 and no maps asked for, the caption-aware keys and values are not materialised when that
  is cheaper: a query's logit on the update's key is ``q . (Wk x) = (Wk^T q) . x`` and its share of the values is
  ``Wv (sum of its probabilities over a window times x)``, so the cost grows with the text queries (few; one in the
  last layer) instead of with the pooled patches times the width (``FusionLayer.folds_delta``). Same numbers up to
  float rounding; the maps path is unchanged. When every pair reads one image (a Match: one image, n captions), the
  pairs' query rows are stacked against that image's keys and values instead of copying them once per pair.
The dataclass defaults (p = 1, image MLP = mlp_ratio) are the original architecture, weight for weight.

Levels on different grids (a CNN's finer stages beside its final map, ``VisionConfig.level_grid``): the image stream
runs on the finest grid of the levels the fusion reads; a coarser level's tokens are resampled onto it (bilinear)
before its projection, so each word's text->image map (and its Grad-CAM) is on that finer grid. The affinity bias
must come on that grid too (the concept source's ``affinity_grid``); a mismatch is a ValueError naming the sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig


class Attention(nn.Module):
    """Multi-head attention that returns its probabilities (B, heads, Tq, Tk) when asked."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor | None,
        ctx: torch.Tensor | None,
        key_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        need_weights: bool = True,
        kv: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, Tq, W) attends to ctx (B, Tk, W), or to precomputed ``kv`` = self.kv(ctx) (B, Tk, 2W); key_mask
        (B, Tk) True = attend; bias (B, Tq, Tk) added to logits. Probabilities come back only if ``need_weights``.
        ``q`` = self.q(x) (B, Tq, W) when computed beforehand (x is then not read)."""
        out, attn, _ = self.attend(x, ctx, key_mask, bias, need_weights, kv, q=q)
        return out, attn

    def attend(
        self,
        x: torch.Tensor | None,
        ctx: torch.Tensor | None,
        key_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        need_weights: bool = True,
        kv: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`forward`, plus ``extra`` (B or 1, Tk, E): features of the keys averaged with each head's
        probabilities, (B, heads, Tq, E) (where each head looked: positions), also on the fused path. ``q``
        (B, Tq, W): the queries' projection self.q(x) computed beforehand (x is then not read)."""
        q = self.q(x) if q is None else q  # (B, Tq, W)
        b, tq, w = q.shape
        h = self.heads
        kv = self.kv(ctx) if kv is None else kv
        q = q.view(b, tq, h, w // h).transpose(1, 2)  # (B, h, Tq, dh)
        k, v = kv.view(b, kv.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)  # each (B, h, Tk, dh)
        if not need_weights:
            mask = None
            if bias is not None:
                mask = bias.unsqueeze(1).to(q.dtype)  # (B, 1, Tq, Tk)
            if key_mask is not None:
                keep = key_mask[:, None, None, :].bool()  # (B, 1, 1, Tk)
                lo = torch.finfo(q.dtype).min
                mask = torch.zeros_like(keep, dtype=q.dtype) if mask is None else mask
                mask = mask.masked_fill(~keep, lo)
            if extra is not None:  # the extra features ride along as value channels shared by every head
                v = torch.cat([v, extra.to(v.dtype).unsqueeze(1).expand(b, h, -1, -1)], -1)  # (B, h, Tk, dh + E)
            p = self.drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, Tq, dh [+ E])
            out, ex = (out, None) if extra is None else out.split([w // h, extra.shape[-1]], -1)
            return self.out(out.transpose(1, 2).reshape(b, tq, w)), None, ex
        logits = (q @ k.transpose(-2, -1)) * (w // h) ** -0.5  # (B, h, Tq, Tk)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :].bool(), torch.finfo(logits.dtype).min)
        attn = logits.softmax(-1)
        dropped = self.drop(attn)
        out = (dropped @ v).transpose(1, 2).reshape(b, tq, w)
        ex = None if extra is None else dropped @ extra.to(attn.dtype).unsqueeze(1)  # (B, h, Tq, E)
        return self.out(out), attn, ex


class MLP(nn.Sequential):
    def __init__(self, width: int, ratio: float, dropout: float):
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


@dataclass
class LayerAttentions:
    t2i: torch.Tensor  # (B, heads, T, N): text queries over image tokens (CLS + patches)
    i2t: torch.Tensor  # (B, heads, N', T): image queries over text tokens (N' = N, or the pooled tokens)
    t2t: torch.Tensor  # (B, heads, T, T): text self-attention


@dataclass
class PreparedLevel:
    """One fusion layer's caption-independent image side, once per image (:meth:`HierarchicalFusion.prepare_image`).

    ``stream`` (Bi, N, W): with ``image_pool`` = 1 the layer's projected level (added to the per-pair stream); with
    ``image_pool`` > 1 the shared stream after this layer's level. The rest only with ``image_pool`` > 1: ``low``
    (Bi, M, W) the shared stream pooled; ``kv`` (Bi, N, 2W) its text->image keys and values; ``kv_heads``
    (2, Bi, h, N, dh) the same, heads first (for the folded text->image attention); ``i2t_q`` (Bi, M, W) the first
    layer's image->text queries (there the update is still zero, so they depend on the image alone)."""

    stream: torch.Tensor
    low: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None
    i2t_q: torch.Tensor | None = None


@dataclass
class PreparedImage:
    """The fusion's caption-independent image side for a batch of Bi images, one :class:`PreparedLevel` per layer:
    computed once per image (on the overlap worker in a Matcher call, beside the captions' encoder) and read by every
    pair of those images (``image_index``)."""

    levels: list[PreparedLevel]


def pool_tokens(x: torch.Tensor, grid: tuple[int, int], prefix: int, p: int) -> torch.Tensor:
    """(B, prefix + gh*gw, W) -> (B, prefix + ceil(gh/p)*ceil(gw/p), W): patches averaged over p x p windows."""
    b, _, w = x.shape
    gh, gw = grid
    patches = x[:, prefix:].transpose(1, 2).reshape(b, w, gh, gw)  # (B, W, gh, gw)
    pooled = F.avg_pool2d(patches, p, p, ceil_mode=True)  # (B, W, gh', gw'); edge windows average what they hold
    return torch.cat([x[:, :prefix], pooled.flatten(2).transpose(1, 2)], 1)  # (B, prefix + gh'*gw', W)


def unpool_tokens(y: torch.Tensor, grid: tuple[int, int], prefix: int, p: int) -> torch.Tensor:
    """Inverse shape of :func:`pool_tokens`: each pooled patch copied to the p x p patches of its window."""
    b, _, w = y.shape
    gh, gw = grid
    ph, pw = -(-gh // p), -(-gw // p)
    patches = y[:, prefix:].reshape(b, ph, pw, w)  # (B, gh', gw', W)
    patches = patches.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, :gh, :gw]  # (B, gh, gw, W)
    return torch.cat([y[:, :prefix], patches.reshape(b, gh * gw, w)], 1)  # (B, prefix + gh*gw, W)


def window_sum(a: torch.Tensor, grid: tuple[int, int], prefix: int, p: int) -> torch.Tensor:
    """(..., prefix + gh*gw) -> (..., prefix + ceil(gh/p)*ceil(gw/p)): scores summed over each p x p window, the
    last axis laid out as :func:`pool_tokens`' token axis (the transpose of :func:`unpool_tokens`)."""
    gh, gw = grid
    lead = a.shape[:-1]
    patches = a[..., prefix:].reshape(-1, 1, gh, gw)  # (prod(lead), 1, gh, gw)
    summed = F.avg_pool2d(patches, p, p, ceil_mode=True, divisor_override=1)  # (prod(lead), 1, gh', gw')
    return torch.cat([a[..., :prefix], summed.reshape(*lead, -1)], -1)


def unpool_scores(a: torch.Tensor, grid: tuple[int, int], prefix: int, p: int) -> torch.Tensor:
    """(..., prefix + gh'*gw') -> (..., prefix + gh*gw): :func:`unpool_tokens` on a last axis of tokens."""
    lead = a.shape[:-1]
    up = unpool_tokens(a.reshape(-1, a.shape[-1], 1), grid, prefix, p)  # (prod(lead), prefix + gh*gw, 1)
    return up.reshape(*lead, -1)


def _pairs(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Per-image rows (Bi, ...) -> per-pair rows (B, ...) by ``index`` (None: pair b is image b); one image read by
    every pair is broadcast (a view), not copied."""
    if index is None:
        return x
    return x.expand(len(index), *x.shape[1:]) if x.shape[0] == 1 else x[index]


def _per_pair(a: torch.Tensor, m: torch.Tensor, one_image: bool) -> torch.Tensor:
    """a (B, h, Tq, K) @ m (B or 1, h, K, D) -> (B, h, Tq, D). With ``one_image`` (m's batch is 1, shared by every
    pair) the B pairs' rows go through one product per head instead of B products on B copies of m."""
    if not one_image:
        return a @ m
    b, h, tq, k = a.shape
    rows = a.transpose(0, 1).reshape(1, h, b * tq, k)  # (1, h, B*Tq, K)
    return (rows @ m).view(h, b, tq, -1).transpose(0, 1)  # (B, h, Tq, D)


Centroids = torch.Tensor | None  # (B, T, 2): where each word's text->image attention looks, (x, y) in [0, 1]


def seen_positions(attn: torch.Tensor, extra: torch.Tensor, power: float) -> torch.Tensor:
    """Attention (B, h, Tq, N) over tokens with features ``extra`` (B or 1, N, E) -> (B, h, Tq, E): the features
    averaged with the probabilities raised to ``power`` (not renormalised: :func:`centroid` divides by the patch
    mass)."""
    weights = attn if power == 1.0 else attn.pow(power)
    return weights @ extra.to(attn.dtype).unsqueeze(1)


def centroid(seen: torch.Tensor | None) -> Centroids:
    """(B, h, Tq, 3) per-head averages of the image tokens' (x, y, is_patch) -> (B, Tq, 2): the mean position of
    the patches a word attends to, over every head, the prefix tokens' (CLS) share left out."""
    if seen is None:
        return None
    s = seen.sum(1)  # (B, Tq, 3)
    return s[..., :2] / s[..., 2:].clamp_min(1e-6)


def token_positions(grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(prefix + gh*gw, 3): each image token's (x, y, is_patch), x and y of patch centres in [0, 1], prefix rows 0."""
    gh, gw = grid
    ys, xs = torch.meshgrid((torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw, indexing="ij")
    xyz = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(gh * gw)], -1)  # (P, 3)
    return F.pad(xyz, (0, 0, num_prefix_tokens, 0))


class FusionLayer(nn.Module):
    def __init__(self, cfg: FusionConfig, last: bool = False):
        super().__init__()
        w, h, r, p = cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout
        r_img = r if cfg.image_mlp_ratio is None else cfg.image_mlp_ratio
        self.norm_i1, self.norm_t1 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.i2t = Attention(w, h, p)
        self.norm_t2 = nn.LayerNorm(w)
        self.self_attn = Attention(w, h, p)
        self.norm_t3, self.norm_i2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.t2i = Attention(w, h, p)
        self.norm_t4 = nn.LayerNorm(w)
        self.mlp_t = MLP(w, r, p)
        # The last layer's image stream is read by no one after its text->image attention: no image MLP there
        # (it would be parameters without gradients, which DDP refuses).
        has_mlp = not last and r_img > 0
        self.norm_i3 = nn.LayerNorm(w) if has_mlp else None
        self.mlp_i = MLP(w, r_img, p) if has_mlp else None
        # image_pool > 1: keys/values of the caption-aware update, added to the shared stream's (see module doc).
        self.pooled = cfg.image_pool > 1
        self.norm_d = nn.LayerNorm(w) if self.pooled else None
        self.kv_delta = nn.Linear(w, 2 * w, bias=False) if self.pooled else None
        self.cross_first = cfg.cross_first
        # the last layer's centroids feed only the relation reader: where each word looks, by attention ** power
        self.centroid_power = float(cfg.reader_attention_power) if last else 1.0
        # word_positions: where each word looked in the image (its text->image centroid) enters the text
        # self-attention as relative offsets; zero-initialised, so a checkpoint without it loads unchanged.
        self.rel_pos = nn.Linear(4 * h, w) if cfg.word_positions else None
        if self.rel_pos is not None:
            nn.init.zeros_(self.rel_pos.weight)
            nn.init.zeros_(self.rel_pos.bias)

    def _text_self_and_cross(
        self,
        txt: torch.Tensor,
        txt_mask: torch.Tensor,
        t2i: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None, Centroids]],
        bias: torch.Tensor | None,
        need: bool,
        cls_only: bool,
        centroids: Centroids,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Centroids]:
        """txt <- + SelfAttn, + CrossAttn(text -> image), + MLP (``cross_first``: the cross-attention before the
        self-attention). ``cls_only``: the [CLS] row only, from the first sub-layer whose other rows no one reads.

        ``t2i(x, bias)``: the text->image attention of the normalised text x (B, Tq, W) -> (update, probabilities,
        centroids). ``centroids`` (B, T, 2): where each word looked in the previous layer (None: not tracked or
        none yet); returned updated with this layer's."""
        if self.cross_first:  # every word reads the image, then the words (and [CLS]) read each other
            d, a_t2i, c = t2i(self.norm_t3(txt), bias)
            centroids = c if c is not None else centroids
            txt = txt + d
            t = self.norm_t2(txt)
            d, a_t2t = self._self_attention(t, txt_mask, need, cls_only, centroids)
            txt = (txt[:, :1] if cls_only else txt) + d
            txt = txt + self.mlp_t(self.norm_t4(txt))
            return txt, a_t2i, a_t2t, centroids
        t = self.norm_t2(txt)
        d, a_t2t = self._self_attention(t, txt_mask, need, cls_only, centroids)
        txt = (txt[:, :1] if cls_only else txt) + d
        if cls_only and bias is not None:
            bias = bias[:, :1]  # (B, 1, N)
        d, a_t2i, c = t2i(self.norm_t3(txt), bias)
        txt = txt + d
        txt = txt + self.mlp_t(self.norm_t4(txt))
        return txt, a_t2i, a_t2t, c if c is not None else centroids

    def _self_attention(
        self, t: torch.Tensor, txt_mask: torch.Tensor, need: bool, cls_only: bool, centroids: Centroids
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text self-attention of the normalised text t (B, T, W); queries: [CLS] only with ``cls_only`` (the
        other rows are read by no one after the last layer).

        With ``word_positions`` and known centroids, each head also hands its query where the words it reads
        look in the image, relative to where the query looks, split by text order: the probability-weighted sums
        of (c_k - c_q) over the keys before the query and over the keys after it, (B, h, Tq, 2 + 2). Relative
        positions (Shaw et al.) on where the words' objects are rather than where the words are, with the text
        order kept apart because it carries the roles: a relation word reading both of its arguments gets the
        first one's offset from the words before it and the second one's from the words after, so "after minus
        before" is the second object's position relative to the first, a linear read-out for its MLP."""
        q = t[:, :1] if cls_only else t  # (B, Tq, W)
        if self.rel_pos is None or centroids is None:
            return self.self_attn(q, t, txt_mask, need_weights=need)
        d, a_t2t = self.self_attn(q, t, txt_mask, need_weights=True)  # (B, h, Tq, T): T <= 24 words, cheap
        tq, tk = a_t2t.shape[-2:]
        order = torch.arange(tk, device=t.device)
        before = (order[None, :] < order[:tq, None]).to(a_t2t.dtype)  # (Tq, T): key k comes before query q
        after = (order[None, :] > order[:tq, None]).to(a_t2t.dtype)
        c_q = centroids[:, None, :tq]  # (B, 1, Tq, 2)
        sides = []
        for side in (before, after):
            a = a_t2t * side  # (B, h, Tq, T)
            sides.append(a @ centroids.unsqueeze(1) - a.sum(-1, keepdim=True) * c_q)  # (B, h, Tq, 2)
        rel = torch.cat(sides, -1).permute(0, 2, 1, 3).flatten(2)  # (B, Tq, h * 4)
        return d + self.rel_pos(rel), a_t2t if need else None

    def forward(
        self,
        txt: torch.Tensor,
        img: torch.Tensor,
        txt_mask: torch.Tensor,
        bias: torch.Tensor | None,
        need_weights: bool = True,
        cls_only: bool = False,
        positions: torch.Tensor | None = None,
        centroids: Centroids = None,
    ) -> tuple[torch.Tensor, torch.Tensor, LayerAttentions | None, Centroids]:
        """Full-token image stream (image_pool = 1): txt (B, T, W), img (B, N, W) -> updated txt, img.

        ``positions`` (N, 3): each image token's (x, y, is_patch), to track where each word looks
        (``word_positions``); ``centroids``: the words' centroids so far (:meth:`_text_self_and_cross`)."""
        t = self.norm_t1(txt)
        d, a_i2t = self.i2t(self.norm_i1(img), t, txt_mask, need_weights=need_weights)
        img = img + d
        kv = self.t2i.kv(self.norm_i2(img))  # (B, N, 2W)
        t2i = self._t2i_materialised(kv, need_weights, positions)
        txt, a_t2i, a_t2t, centroids = self._text_self_and_cross(
            txt, txt_mask, t2i, bias, need_weights, cls_only, centroids
        )
        if self.mlp_i is not None:
            img = img + self.mlp_i(self.norm_i3(img))
        return txt, img, LayerAttentions(a_t2i, a_i2t, a_t2t) if need_weights else None, centroids

    def _extra(self, positions: torch.Tensor | None) -> torch.Tensor | None:
        """The image tokens' (x, y, is_patch) as text->image ``extra`` (1, N, 3), when centroids are tracked."""
        return None if self.rel_pos is None or positions is None else positions[None]

    def _t2i_materialised(self, kv: torch.Tensor, need_weights: bool, positions: torch.Tensor | None) -> Callable:
        """The text->image step of :meth:`_text_self_and_cross` on keys/values ``kv`` (B, N, 2W) given whole (the
        full-token stream, or the pooled one's shared keys plus the unpooled update)."""
        extra = self._extra(positions)
        powered = extra is not None and self.centroid_power != 1.0

        def t2i(x: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, Centroids]:
            if powered:  # the probabilities are needed to raise them: materialised, returned only when asked
                d, a, _ = self.t2i.attend(x, None, None, b, True, kv, None)
                return d, a if need_weights else None, centroid(seen_positions(a, extra, self.centroid_power))
            d, a, seen = self.t2i.attend(x, None, None, b, need_weights, kv, extra)
            return d, a, centroid(seen)

        return t2i

    def folds_delta(self, queries: int, pooled_tokens: int) -> bool:
        """Whether folding the update's key/value projection into the text queries costs fewer multiply-adds than
        projecting the update (per pair: 2 h Tq (dh + M) W against 2 M W^2)."""
        w, h = self.kv_delta.in_features, self.t2i.heads
        return h * queries * (w // h + pooled_tokens) < pooled_tokens * w

    def _t2i_folded(
        self,
        x: torch.Tensor,
        kv_shared: torch.Tensor,
        x_d: torch.Tensor,
        index: torch.Tensor | None,
        pool: tuple[tuple[int, int], int, int],
        bias: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        kv_heads: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None, Centroids]:
        """Text->image attention without the update's keys and values (module doc); no probabilities returned.

        x (B, Tq, W) normalised text; kv_shared (Bi, N, 2W) the shared stream's keys/values; x_d (B, M, W) the
        normalised update at pooled tokens; bias (B, Tq, N); ``kv_heads``: :meth:`heads_first` of kv_shared, when
        computed beforehand."""
        grid, prefix, p = pool
        b, tq, w = x.shape
        h = self.t2i.heads
        dh = w // h
        q = self.t2i.q(x).view(b, tq, h, dh).transpose(1, 2) * dh**-0.5  # (B, h, Tq, dh)
        kv_s = self.heads_first(kv_shared) if kv_heads is None else kv_heads  # (2, Bi, h, N, dh)
        # One image read by every pair (a Match: 1 image x n captions): its keys and values are used as they are,
        # the pairs' query rows stacked, instead of one copy of them per pair.
        one_image = index is not None and kv_s.shape[1] == 1
        k_s, v_s = kv_s if index is None or one_image else kv_s[:, index]  # each (B or 1, h, N, dh)
        w_k, w_v = self.kv_delta.weight.view(2, h, dh, w)  # each (h, dh, W): kv_delta's output is (2, h, dh)
        # Heads and queries share one row axis, so the products with x_d are one (B,)-batch of matmuls and x_d is
        # never copied per head.
        q_k = torch.einsum("bhtd,hdw->bhtw", q, w_k).reshape(b, h * tq, w)  # (B, h*Tq, W)
        logits_d = (q_k @ x_d.transpose(1, 2)).view(b, h, tq, -1)  # (B, h, Tq, M)
        logits_s = _per_pair(q, k_s.transpose(-2, -1), one_image)  # (B, h, Tq, N): on the shared stream's keys
        logits = logits_s + unpool_scores(logits_d, grid, prefix, p)  # (B, h, Tq, N)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        attn = self.t2i.drop(logits.softmax(-1))
        agg = window_sum(attn, grid, prefix, p).reshape(b, h * tq, -1) @ x_d  # (B, h*Tq, W): weighted sums of x_d
        out_d = torch.einsum("bhtw,hdw->bhtd", agg.view(b, h, tq, w), w_v)  # (B, h, Tq, dh): the update's values
        out = _per_pair(attn, v_s, one_image) + out_d  # (B, h, Tq, dh)
        extra = self._extra(positions)
        seen = None if extra is None else seen_positions(attn, extra, self.centroid_power)  # (B, h, Tq, 3)
        return self.t2i.out(out.transpose(1, 2).reshape(b, tq, w)), None, centroid(seen)

    def heads_first(self, kv: torch.Tensor) -> torch.Tensor:
        """(Bi, N, 2W) keys and values -> (2, Bi, h, N, dh), contiguous: heads first once per image, so the folded
        attention's products read them without a copy per pair."""
        h = self.t2i.heads
        return kv.view(kv.shape[0], kv.shape[1], 2, h, -1).permute(2, 0, 3, 1, 4).contiguous()

    def prepare_pooled(
        self, shared: torch.Tensor, pool: tuple[tuple[int, int], int, int], first: bool, heads_first: bool
    ) -> PreparedLevel:
        """image_pool > 1: this layer's caption-independent image side from the shared stream (Bi, N, W), once per
        image (:class:`PreparedLevel`). ``first``: the first layer (its image->text queries are the image's alone);
        ``heads_first``: also the heads-first keys and values the folded text->image attention reads."""
        low = pool_tokens(shared, *pool)  # (Bi, M, W)
        kv = self.t2i.kv(self.norm_i2(shared))  # (Bi, N, 2W)
        q = self.i2t.q(self.norm_i1(low)) if first else None  # (Bi, M, W)
        return PreparedLevel(shared, low, kv, self.heads_first(kv) if heads_first else None, q)

    def forward_pooled(
        self,
        txt: torch.Tensor,
        shared: torch.Tensor,
        delta: torch.Tensor | None,
        pool: tuple[tuple[int, int], int, int],
        index: torch.Tensor | None,
        txt_mask: torch.Tensor,
        bias: torch.Tensor | None,
        need_weights: bool = True,
        cls_only: bool = False,
        positions: torch.Tensor | None = None,
        centroids: Centroids = None,
        prepared: PreparedLevel | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, LayerAttentions | None, Centroids]:
        """image_pool > 1: shared (Bi, N, W) caption-independent stream, one row per image (``index`` (B,) maps
        pairs to them); delta (B, M, W) the caption-aware update at pooled tokens (None before the first layer).
        ``prepared``: :meth:`prepare_pooled` of ``shared``, when computed beforehand (once per image)."""
        grid, prefix, p = pool
        pre = prepared if prepared is not None else self.prepare_pooled(shared, pool, delta is None, False)
        u = _pairs(pre.low, index)  # (B, M, W)
        t = self.norm_t1(txt)
        if delta is None and pre.i2t_q is not None:  # no update yet: the image's own queries, once per image
            d, a_i2t = self.i2t(None, t, txt_mask, need_weights=need_weights, q=_pairs(pre.i2t_q, index))
        else:
            u = u if delta is None else u + delta
            d, a_i2t = self.i2t(self.norm_i1(u), t, txt_mask, need_weights=need_weights)
        delta = d if delta is None else delta + d
        u = u + d if self.mlp_i is not None else u  # the last layer's stream is read no further
        kv = pre.kv  # (Bi, N, 2W): once per image
        x_d = self.norm_d(delta)  # (B, M, W)
        queries = 1 if cls_only and not self.cross_first else txt.shape[1]  # text rows the cross-attention runs
        if not need_weights and self.folds_delta(queries, x_d.shape[1]):

            def t2i(x, b):
                return self._t2i_folded(x, kv, x_d, index, pool, b, positions, pre.kv_heads)

        else:
            shared_kv = kv if index is None or kv.shape[0] == 1 else kv[index]  # one image: broadcast, no copies
            kv = shared_kv + unpool_tokens(self.kv_delta(x_d), grid, prefix, p)  # (B, N, 2W)
            t2i = self._t2i_materialised(kv, need_weights, positions)

        txt, a_t2i, a_t2t, centroids = self._text_self_and_cross(
            txt, txt_mask, t2i, bias, need_weights, cls_only, centroids
        )
        if self.mlp_i is not None:
            delta = delta + self.mlp_i(self.norm_i3(u))
        return txt, delta, LayerAttentions(a_t2i, a_i2t, a_t2t) if need_weights else None, centroids


@dataclass
class RelationEvidence:
    """What :class:`RelationReader` read of each caption (T = the caption tokens the fusion ran on)."""

    evidence: torch.Tensor  # (B,) the caption's relation evidence, added (weighted) to the ITM match logit
    verdict: torch.Tensor  # (B, T) each word's logit that the relation it names holds (0 where it has no support)
    relation_gate: torch.Tensor  # (B, T) logit: the word names a spatial relation ("left", "above", "top", ...)
    object_gate: torch.Tensor  # (B, T) logit: the word names an object (a description's noun or adjective)
    support: torch.Tensor  # (B, T) in [0, 1]: how much object mass the word has on both sides in the text


class RelationReader(nn.Module):
    """A spatial-relation verdict for the ITM logit, read from where the caption's object words look.

    The fusion already knows where each word looks (``word_positions``: the centroid of its text->image attention
    in the last layer). For each word t, a gate g_k ("word k names an object") weighs the centroids of the words
    before t and of the words after t; their difference o_t = after - before is where the second-named object is
    relative to the first. A direction u_t (2-D) from the word's own fused state says which way the word claims it
    is ("left of": +x, "above": +y), so the verdict is v_t = o_t . u_t, and the caption's evidence is
    sum_t r_t v_t with r_t = "word t names a relation". The model adds ``itm_relation_weight`` x evidence to the
    match logit, so ITM can tell "a gnu to the left of an apple" from its reversal wherever the words' maps
    find their objects, on objects the fusion never trained on.

    Decisions:
        - Read from the fused text states entering the last fusion layer (what the words know of the caption and
          image) and the last layer's centroids (its text->image attention is computed for every word, also when
          only the [CLS] row continues): one extra linear map per caption, no extra attention pass.
        - The gates and the verdict are trained where the data knows them (composites: which words name objects,
          which words carry the relation and whether it holds); the ITM loss trains the weight in the logit.
        - ``support`` = min(object mass before, object mass after), clamped to 1: a word with no object named on one
          side ("... and B on the right": nothing after "right") gives no verdict.
        - ``head_nouns`` (``fusion.reader_head_nouns``): each run of object words (gate > 0.5) counts once, at its
          last token, with weight 1: the head noun of an English noun phrase, whose map is the object's, while an
          adjective's or a modifier's ("plumber's") may look elsewhere. Off: the gate-weighted mean of every object word
          before / after (as trained). A checkpoint chooses it on held-out data (training.photo_fusion_tune).
    """

    def __init__(self, width: int, head_nouns: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.heads = nn.Linear(width, 4)  # object gate, relation gate, direction (x, y)
        self.head_nouns = head_nouns

    def forward(self, states: torch.Tensor, mask: torch.Tensor, centroids: torch.Tensor) -> RelationEvidence:
        """states (B, T, W), mask (B, T) 1 = a caption token, centroids (B, T, 2) -> :class:`RelationEvidence`."""
        h = self.heads(self.norm(states))  # (B, T, 4)
        words = mask.to(h.dtype).clone()
        words[:, 0] = 0  # [CLS]
        g = torch.sigmoid(h[..., 0]) * words  # (B, T)
        if self.head_nouns:
            on = (g > 0.5).to(h.dtype)
            g = on * (1.0 - F.pad(on[:, 1:], (0, 1)))  # the last token of each run of object words
        t = states.shape[1]
        order = torch.arange(t, device=states.device)
        sides = []
        for side in (order[None, :] < order[:, None], order[None, :] > order[:, None]):  # (T, T): before, after
            w = side.to(h.dtype)[None] * g[:, None, :]  # (B, T, T)
            mass = w.sum(-1)  # (B, T)
            sides.append(((w @ centroids) / mass.clamp_min(1e-6)[..., None], mass))
        (before, m_b), (after, m_a) = sides
        support = torch.minimum(m_b, m_a).clamp(max=1.0)
        verdict = ((after - before) * h[..., 2:4]).sum(-1) * support * words  # (B, T)
        evidence = (torch.sigmoid(h[..., 1]) * words * verdict).sum(-1)  # (B,)
        return RelationEvidence(evidence, verdict, h[..., 1], h[..., 0], support)


@dataclass
class FusionOutput:
    cls: torch.Tensor  # (B, W) fused text CLS, input of the ITM head
    attentions: list[LayerAttentions]  # one per layer; [] when the forward was asked for no attentions
    last_input: torch.Tensor | None = None  # (B, T, W) the text stream entering the last layer (with attentions)
    relation: RelationEvidence | None = None  # with ``relation_reader``


def grid_positions(grid: tuple[int, int], num_prefix_tokens: int, frequencies: int = 4) -> torch.Tensor:
    """Fixed 2-D position features of a (gh, gw) patch grid, row-major, prefix tokens first: (prefix + P, 4F).

    sin/cos of (x, y) in [0, 1] at F frequencies; prefix tokens (CLS) have none. Relations ("to the left of")
    are comparisons of where two words' objects are, so fusion gets positions it can read directly.
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.linspace(0, 1, gh), torch.linspace(0, 1, gw), indexing="ij")
    k = torch.arange(1, frequencies + 1, dtype=torch.float32) * math.pi / 2  # (F,)
    feats = [f(c.reshape(-1, 1) * k) for c in (xs, ys) for f in (torch.sin, torch.cos)]  # each (P, F)
    return F.pad(torch.cat(feats, -1), (0, 0, num_prefix_tokens, 0))  # (prefix + P, 4F)


class HierarchicalFusion(nn.Module):
    """L fusion layers; layer l reads image level ``image_levels[l]``."""

    def __init__(
        self,
        cfg: FusionConfig,
        image_width: int,
        text_width: int,
        image_levels: list[int],
        num_local_kernels: int,
        num_prefix_tokens: int,
        image_widths: list[int] | None = None,
        image_grids: list[tuple[int, int]] | None = None,
    ):
        """``image_widths``: the width of each fusion layer's image level (a CNN's stages differ); None = all
        ``image_width``. ``image_grids``: each level's patch grid, needed with ``cfg.image_positions`` and
        ``cfg.image_pool`` > 1."""
        super().__init__()
        self.cfg = cfg
        self.image_levels = list(image_levels)
        self.num_prefix_tokens = num_prefix_tokens
        if cfg.image_pool < 1:
            raise ValueError(f"fusion.image_pool must be >= 1 (1 = every token), got {cfg.image_pool}")
        if cfg.image_pool > 1 and image_grids is None:
            raise ValueError("fusion.image_pool > 1 needs the image levels' grids")
        # Each level's own grid, and the one grid the stream runs on (the finest; coarser levels resampled to it).
        self.level_grids = [tuple(g) for g in image_grids] if image_grids is not None else None
        if self.level_grids is not None:
            finest = max(self.level_grids, key=lambda g: g[0] * g[1])
            image_grids = [finest] * len(self.level_grids)
        self.image_grids = [tuple(g) for g in image_grids] if image_grids is not None else None
        self.text_in = nn.Linear(text_width, cfg.width)
        widths = image_widths or [image_width] * len(image_levels)
        self.image_in = nn.ModuleList([nn.Linear(w, cfg.width) for w in widths])
        n = len(image_levels)
        self.layers = nn.ModuleList([FusionLayer(cfg, last=i == n - 1) for i in range(n)])
        self.norm = nn.LayerNorm(cfg.width)
        self.image_pos: nn.ModuleList | None = None
        if cfg.image_positions:
            if image_grids is None:
                raise ValueError("fusion.image_positions needs the image levels' grids")
            for i, g in enumerate(image_grids):
                self.register_buffer(f"grid_pos_{i}", grid_positions(g, num_prefix_tokens), persistent=False)
            n_feat = self.get_buffer("grid_pos_0").shape[-1]
            self.image_pos = nn.ModuleList([nn.Linear(n_feat, cfg.width) for _ in image_levels])
        self.relation_reader: RelationReader | None = None
        if cfg.relation_reader:
            if not cfg.word_positions:
                raise ValueError("fusion.relation_reader reads where words look: it needs fusion.word_positions = true")
            self.relation_reader = RelationReader(cfg.width, cfg.reader_head_nouns)
        if cfg.word_positions:
            if image_grids is None:
                raise ValueError("fusion.word_positions needs the image levels' grids")
            for i, g in enumerate(image_grids):
                self.register_buffer(f"token_pos_{i}", token_positions(g, num_prefix_tokens), persistent=False)
        self.use_bias = cfg.affinity_bias and num_local_kernels > 0
        if self.use_bias:
            # Per-layer mix over the local kernels, and a per-layer scale (starts at 1: the bias is on from step 0).
            self.bias_logits = nn.Parameter(torch.zeros(len(image_levels), num_local_kernels))
            self.bias_scale = nn.Parameter(torch.ones(len(image_levels)))

    def _on_grid(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        """Tokens (Bi, prefix + P, C) of fusion layer ``i``'s level on the stream's grid (bilinear when coarser)."""
        if self.level_grids is None or self.level_grids[i] == self.image_grids[i]:
            return tokens
        prefix, (gh, gw) = self.num_prefix_tokens, self.level_grids[i]
        b, _, c = tokens.shape
        fmap = tokens[:, prefix:].transpose(1, 2).reshape(b, c, gh, gw)
        fine = F.interpolate(fmap, size=self.image_grids[i], mode="bilinear", align_corners=False)
        return torch.cat([tokens[:, :prefix], fine.flatten(2).transpose(1, 2)], 1)

    def level_weights(self) -> torch.Tensor:
        """Each fusion layer's weights over the local kernels: (L, n)."""
        return self.bias_logits.softmax(-1)

    def prepare_image(self, image_levels: dict[int, torch.Tensor], output_attentions: bool = True) -> PreparedImage:
        """The caption-independent image side of every layer, once per image: image_levels block -> (Bi, N, Dv).

        Each layer's level projected (resampled onto the stream's grid, positions added); with ``image_pool`` > 1
        also the shared stream, its pooled tokens, its text->image keys and values and the first layer's image->text
        queries (:meth:`FusionLayer.prepare_pooled`). :meth:`forward` computes it when not given one, so a prepared
        image gives the same numbers; ``output_attentions`` as the forward that reads it will be called (False: the
        folded attention's heads-first keys and values are prepared too)."""
        pooled = self.cfg.image_pool > 1
        levels: list[PreparedLevel] = []
        shared = None  # image_pool > 1: (Bi, N, W) the caption-independent stream
        for i, (level, proj, layer) in enumerate(zip(self.image_levels, self.image_in, self.layers)):
            x = self._on_grid(proj(image_levels[level]), i)  # (Bi, N, W): projected before a coarser level is
            # resampled (bilinear and linear commute: the same tokens at a quarter of the cost)
            if self.image_pos is not None:  # each layer its own projection of the fixed 2-D positions
                x = x + self.image_pos[i](self.get_buffer(f"grid_pos_{i}"))  # (N, W) broadcast over Bi
            if not pooled:
                levels.append(PreparedLevel(x))
                continue
            shared = x if shared is None else shared + x
            pool = (self.image_grids[i], self.num_prefix_tokens, self.cfg.image_pool)
            levels.append(layer.prepare_pooled(shared, pool, i == 0, not output_attentions))
        return PreparedImage(levels)

    def forward(
        self,
        image_levels: dict[int, torch.Tensor] | None,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        affinity_fn=None,
        image_index: torch.Tensor | None = None,
        output_attentions: bool = True,
        prepared: PreparedImage | None = None,
    ) -> FusionOutput:
        """image_levels: block -> (Bi, N, Dv); text_tokens (B, T, Dt); affinity_fn(weights) -> (B, T, P) or None.

        ``image_index`` (B,): pair b reads image ``image_index[b]`` (caption-independent work once per image); None =
        pair b reads image b. ``output_attentions=False``: no attention maps (fused attention, [CLS]-only last layer).
        ``prepared``: :meth:`prepare_image` of the images, computed beforehand (``image_levels`` is then not read).
        """
        if prepared is None:
            prepared = self.prepare_image(image_levels, output_attentions)
        t_used = None
        if not output_attentions:  # no maps to return: drop the padding columns no caption of the batch uses
            t_used = int(text_mask.bool().any(0).nonzero().max()) + 1 if text_mask.bool().any() else 1
            text_tokens, text_mask = text_tokens[:, :t_used], text_mask[:, :t_used]  # (B, T', Dt), (B, T')
        txt = self.text_in(text_tokens)  # (B, T, W)
        pooled = self.cfg.image_pool > 1
        img = None  # image_pool = 1: (B, N, W) image stream; > 1: (Bi, N, W) caption-independent stream
        delta = None  # image_pool > 1: (B, M, W) caption-aware update at pooled tokens
        attentions = []
        last_input = None
        centroids = None  # word_positions: (B, T, 2) where each word looked in the latest text->image attention
        n = len(self.layers)
        for i, (pre, layer) in enumerate(zip(prepared.levels, self.layers)):
            x = pre.stream  # (Bi, N, W): once per image (prepare_image)
            if not pooled:
                x = x if image_index is None else x[image_index]  # (B, N, W)
                img = x if img is None else img + x
            else:
                img = x  # the shared stream after this layer's level
            bias = None
            if self.use_bias and affinity_fn is not None:
                aff = affinity_fn(self.level_weights()[i]) * self.bias_scale[i]  # (B, T, P)
                aff = aff if t_used is None else aff[:, :t_used]
                n_img = x.shape[1] - self.num_prefix_tokens
                if aff.shape[-1] != n_img:
                    raise ValueError(
                        f"the affinity bias has {aff.shape[-1]} cells but fusion layer {i} reads {n_img} image tokens; "
                        "give the affinity source the fusion's grid (kernels.options.concept.affinity_grid)"
                    )
                bias = F.pad(aff, (self.num_prefix_tokens, 0))  # no bias on the CLS / register keys
            cls_only = not output_attentions and i == n - 1
            if (output_attentions or self.relation_reader is not None) and i == n - 1:
                last_input = txt  # what the last layer's [CLS] reads (training-time relation head, relation reader)
            pos = self.get_buffer(f"token_pos_{i}") if self.cfg.word_positions else None  # (N, 3)
            if pooled:
                pool = (self.image_grids[i], self.num_prefix_tokens, self.cfg.image_pool)
                txt, delta, att, centroids = layer.forward_pooled(
                    txt,
                    img,
                    delta,
                    pool,
                    image_index,
                    text_mask,
                    bias,
                    output_attentions,
                    cls_only,
                    pos,
                    centroids,
                    prepared=pre,
                )
            else:
                txt, img, att, centroids = layer(txt, img, text_mask, bias, output_attentions, cls_only, pos, centroids)
            if att is not None:
                attentions.append(att)
        relation = None
        if self.relation_reader is not None and last_input is not None and centroids is not None:
            relation = self.relation_reader(last_input, text_mask, centroids)
        return FusionOutput(self.norm(txt[:, 0]), attentions, last_input, relation)
