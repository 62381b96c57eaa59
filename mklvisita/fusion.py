"""Hierarchical two-way cross-modal fusion.

Layer l reads the image tokens of ViT block ``image_levels[l]`` (early fusion layers see lower-level features)
and updates both streams:

    img  <- img + CrossAttn(img -> text)                (image tokens read the caption)
    txt  <- txt + SelfAttn(txt)
    txt  <- txt + CrossAttn(text -> img, + affinity bias) (words read the caption-aware image)
    txt, img <- + MLP

The image stream carries over between layers: img_l = img_{l-1} + proj_l(level_l tokens), so what the image
learned of the caption in layer l is not lost when layer l + 1 brings in a new level. The text->image logits may
be biased by the word x patch affinity of the local kernels, mixed by each layer's own kernel weights (the
"kernel weights per fusion level" the demo shows). Every attention returns its probabilities so explanations
come from the model itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig


class Attention(nn.Module):
    """Multi-head attention that returns its probabilities (B, heads, Tq, Tk)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Tq, W) attends to ctx (B, Tk, W); key_mask (B, Tk) True = attend; bias (B, Tq, Tk) added to logits."""
        b, tq, w = x.shape
        h = self.heads
        q = self.q(x).view(b, tq, h, w // h).transpose(1, 2)  # (B, h, Tq, dh)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)  # each (B, h, Tk, dh)
        logits = (q @ k.transpose(-2, -1)) * (w // h) ** -0.5  # (B, h, Tq, Tk)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :].bool(), torch.finfo(logits.dtype).min)
        attn = logits.softmax(-1)
        out = (self.drop(attn) @ v).transpose(1, 2).reshape(b, tq, w)
        return self.out(out), attn


class MLP(nn.Sequential):
    def __init__(self, width: int, ratio: float, dropout: float):
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


@dataclass
class LayerAttentions:
    t2i: torch.Tensor  # (B, heads, T, N): text queries over image tokens (CLS + patches)
    i2t: torch.Tensor  # (B, heads, N, T): image queries over text tokens
    t2t: torch.Tensor  # (B, heads, T, T): text self-attention


class FusionLayer(nn.Module):
    def __init__(self, cfg: FusionConfig, last: bool = False):
        super().__init__()
        w, h, r, p = cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout
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
        self.norm_i3 = None if last else nn.LayerNorm(w)
        self.mlp_i = None if last else MLP(w, r, p)

    def forward(
        self, txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, LayerAttentions]:
        t = self.norm_t1(txt)
        d, a_i2t = self.i2t(self.norm_i1(img), t, txt_mask)
        img = img + d
        t = self.norm_t2(txt)
        d, a_t2t = self.self_attn(t, t, txt_mask)
        txt = txt + d
        d, a_t2i = self.t2i(self.norm_t3(txt), self.norm_i2(img), None, bias)
        txt = txt + d
        txt = txt + self.mlp_t(self.norm_t4(txt))
        if self.mlp_i is not None:
            img = img + self.mlp_i(self.norm_i3(img))
        return txt, img, LayerAttentions(a_t2i, a_i2t, a_t2t)


@dataclass
class FusionOutput:
    cls: torch.Tensor  # (B, W) fused text CLS, input of the ITM head
    attentions: list[LayerAttentions]


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
        ``image_width``. ``image_grids``: each level's patch grid, needed with ``cfg.image_positions``."""
        super().__init__()
        self.cfg = cfg
        self.image_levels = list(image_levels)
        self.num_prefix_tokens = num_prefix_tokens
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
        self.use_bias = cfg.affinity_bias and num_local_kernels > 0
        if self.use_bias:
            # Per-layer mix over the local kernels, and a per-layer scale (starts at 1: the bias is on from step 0).
            self.bias_logits = nn.Parameter(torch.zeros(len(image_levels), num_local_kernels))
            self.bias_scale = nn.Parameter(torch.ones(len(image_levels)))

    def level_weights(self) -> torch.Tensor:
        """Each fusion layer's weights over the local kernels: (L, n)."""
        return self.bias_logits.softmax(-1)

    def forward(
        self,
        image_levels: dict[int, torch.Tensor],
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        affinity_fn=None,
    ) -> FusionOutput:
        """image_levels: block -> (B, N, Dv); text_tokens (B, T, Dt); affinity_fn(weights) -> (B, T, P) or None."""
        txt = self.text_in(text_tokens)  # (B, T, W)
        img = None
        attentions = []
        for i, (level, proj, layer) in enumerate(zip(self.image_levels, self.image_in, self.layers)):
            x = proj(image_levels[level])  # (B, N, W)
            if self.image_pos is not None:  # each layer its own projection of the fixed 2-D positions
                x = x + self.image_pos[i](self.get_buffer(f"grid_pos_{i}"))  # (N, W) broadcast over B
            img = x if img is None else img + x
            bias = None
            if self.use_bias and affinity_fn is not None:
                aff = affinity_fn(self.level_weights()[i]) * self.bias_scale[i]  # (B, T, P)
                bias = F.pad(aff, (self.num_prefix_tokens, 0))  # no bias on the CLS / register keys
            txt, img, att = layer(txt, img, text_mask, bias)
            attentions.append(att)
        return FusionOutput(self.norm(txt[:, 0]), attentions)
