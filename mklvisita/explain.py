"""Explanations: where in the image each word of a caption looks, and why a pair scored as it did.

Maps, all in the *original* image's pixel frame (the letterbox of preprocessing undone by
:meth:`mklvisita.inputs.Letterbox.to_original`) with values in [0, 1]:

- **Grad-CAM** on the text->image cross-attention of one fusion layer (ALBEF / BLIP): ``A * relu(dITM/dA)``,
  averaged over heads, where ITM is the match logit. Gradients come from :func:`torch.autograd.grad`, never
  ``.backward()``, so no parameter ever receives a ``.grad``.
- **Raw attention** of the same layer, averaged over heads.
- **Local-kernel maps**: each local base kernel's word x patch value ``K_m(word, patch)`` (unique to MKL: which
  patches each kernel thinks a word matches). The ``"kernel"`` method mixes them with the global weights beta.
- **Shift-averaged kernel maps** (``kernels.map_shifts`` = n > 1; the photo checkpoint uses 2): the kernel maps are
  averaged over n x n copies of the input moved by k/n of a grid cell (k = 0..n-1 down and right; what is uncovered
  is letterbox padding) and moved back, on a grid 2n times finer. A CNN's evidence on a 32-pixel stride depends on
  where an object falls inside a cell, and the peak of one pass often lands on that aliasing rather than on the
  object: in the Tux Paint composite pointing game (tune half) the photo checkpoint's phrase maps hit their stamp
  17.3 % of the time with one pass and 26.3 % with n = 2 (n = 3: 24.4 %; a blur of the one-pass map instead:
  25.2 %; four passes interleaved into a finer grid without averaging: 15.7 %; docs/experiments.md). It costs
  n^2 - 1 more image passes per explanation.
- **Attention rollout** over the ViT (Abnar & Zuidema 2020): an image-only saliency, the same for every caption.
  Offered where the image encoder has transformer blocks (a ViT or a hybrid); a plain CNN has no attention to roll
  out (``rollout`` is None, and asking for it by name is a ValueError).

Everything is read from what the model returns (typed outputs): the encoder's attention probabilities
(``encode_image(..., output_attentions=True)``), the fusion attentions of :meth:`MKLVisITA.match`, the grid of the
fusion's image stream (``model.fusion.image_grids``: a CNN's finer stage when ``vision.level_grid`` is set) and of
the last encoder level (kernel maps, rollout), so the maps work on ViT, CNN and hybrid backbones alike.

Resolution: maps cover the original image's frame, at its own size up to :data:`MAP_MAX_SIDE` (1,024) pixels on the
longer side; a larger image gets maps scaled down to that (aspect ratio kept: ``Explanation.map_size``), and
:meth:`Explanation.full_size` upsamples one map to the image's own size on demand. The maps come from a patch grid of
at most a few dozen cells a side, so more pixels add no information, only memory: at 16 MP, ten words and four local
kernels, full-size float32 maps were ~3 GB (7.8 GB peak with the copies made on the way). ``max_side=None`` keeps
the old behaviour (every map at the image's size) for a caller who wants it and has the memory. Overlays
(:func:`mklvisita.figures.overlay`) resize a map to the image they are drawn on, so capped maps align as before.

Words are the caption's whitespace words; a word's map is the mean over its sub-word pieces, the caption's map the
sum over all word pieces (no [CLS] / [SEP]). Normalisation: ``"per_map"`` divides every map by its own maximum;
``"shared"`` divides all word maps by the largest of them, so words can be compared (the caption map always uses
its own maximum). Kernel maps can be negative (cosine, tanh): they are shifted by their minimum first.

Thread safety: nothing here writes module or model state (a model in training mode is the one exception: it is
switched to eval for the call and back, so do not explain a training-mode model from several threads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .inputs import ImageInput, Letterbox, check_whole_number, load_image

METHODS = ("gradcam", "attention", "kernel")
MAP_METHODS = (*METHODS, "rollout")  # what method_maps offers (rollout: image-only saliency)
NORMALIZE = ("per_map", "shared")
MAP_MAX_SIDE = 1024  # maps' longer side in pixels at most (None in a call = the image's own size); see the docstring


@dataclass
class Explanation:
    """Everything :func:`explain_pair` computes for one image and one caption. All numpy, detached."""

    tokens: list[str]  # the caption's words (whitespace split; words cut off by truncation are dropped)
    word_heatmaps: np.ndarray  # (n_words, H, W) float32 in [0, 1] over the original image's frame; H x W = the image's
    # size, or scaled down to a longer side of max_side (MAP_MAX_SIDE) pixels for a larger image (see map_size)
    caption_heatmap: np.ndarray  # (H, W) in [0, 1], same frame and size
    kernel_weights: dict[str, float]  # global beta, sums to 1
    itm: float  # match probability; nan for a model without fusion
    similarity: float  # multi-kernel similarity S of this pair
    contributions: dict[str, float]  # beta_m K_m per base kernel; sums to `similarity`
    method: str  # "gradcam", "attention" or "kernel"
    layer: int  # fusion layer of the maps (non-negative index); -1 for "kernel" on a model without fusion
    kernel_maps: dict[str, np.ndarray] = field(default_factory=dict)  # word-map kernel -> (n_words, H, W) in [0, 1]
    rollout: np.ndarray | None = None  # (H, W) ViT attention rollout in [0, 1]; None for a CNN backbone
    pair_kernel_weights: dict[str, float] = field(default_factory=dict)  # effective beta of this pair (gate)
    head_heatmaps: np.ndarray | None = None  # (heads, n_words, H, W) when asked for (heads=True)
    fusion_kernel_weights: list[dict[str, float]] | None = None  # per fusion layer, weights over local kernels
    image_size: tuple[int, int] = (0, 0)  # (W, H) of the original image
    map_size: tuple[int, int] = (0, 0)  # (W, H) of every map: image_size, or scaled down to max_side

    def full_size(self, heatmap: np.ndarray) -> np.ndarray:
        """Map(s) (..., h, w) of this explanation upsampled (bilinear) to the image's own size (..., H, W), float32.

        Only needed for an image larger than ``max_side``; costs memory in proportion to the image, so ask for the
        maps you show, one at a time.
        """
        return _resize(np.asarray(heatmap, dtype=np.float32), self.image_size)


@dataclass
class LayerMaps:
    """Maps of every fusion layer (from :func:`layer_maps`)."""

    tokens: list[str]
    word_heatmaps: np.ndarray  # (L, n_words, H, W) in [0, 1]
    caption_heatmaps: np.ndarray  # (L, H, W) in [0, 1]
    method: str
    image_levels: list[int]  # the encoder level each fusion layer reads


# ------------------------------------------------------------------------------------------ building blocks
def grad_cam(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """ALBEF/BLIP Grad-CAM: ``attention * relu(gradient)``, heads kept. Same shape as the inputs (..., h, T, N)."""
    return attention * gradient.clamp_min(0.0)


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema rollout over layers of self-attention (B, h, N, N) -> (B, N, N).

    Each layer: heads averaged, the residual path added as identity (0.5 A + 0.5 I), rows renormalised; the
    layers are multiplied from the first block to the last.
    """
    rollout = None
    for a in attentions:
        a = a.mean(1)  # (B, N, N)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs at least one layer of attention")
    return rollout


def _word_matrix(token_word: list[int | None], n_words: int) -> torch.Tensor:
    """(n_words, T): row w averages the sub-word pieces of word w."""
    m = torch.zeros(n_words, len(token_word))
    for t, w in enumerate(token_word):
        if w is not None:
            m[w, t] = 1.0
    return m / m.sum(-1, keepdim=True).clamp_min(1.0)


def _normalise(maps: np.ndarray, mode: str, signed: bool = False) -> np.ndarray:
    """Scale maps (..., H, W) into [0, 1]: each map by its own max (per_map) or all by the largest (shared).

    In place when ``maps`` is float32 (the fresh arrays of :func:`_to_original`): no full-size copy is made.
    """
    maps = np.asarray(maps, dtype=np.float32)
    axes = (-2, -1) if mode == "per_map" else tuple(range(maps.ndim))
    if signed:
        maps -= maps.min(axis=axes, keepdims=True)
    else:
        np.clip(maps, 0.0, None, out=maps)  # bilinear resizing of >= 0 maps stays >= 0, up to rounding
    top = maps.max(axis=axes, keepdims=True)
    np.divide(maps, np.maximum(top, 1e-12), out=maps)
    maps *= top > 1e-12  # an all-zero map stays zero
    return maps


def _resize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) float32 -> (..., H, W) for ``size`` = (W, H), bilinear, one map at a time into one array."""
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = np.empty((len(flat), size[1], size[0]), np.float32)
    for i, m in enumerate(flat):
        out[i] = np.asarray(Image.fromarray(m, mode="F").resize(size, Image.Resampling.BILINEAR))
    return out.reshape(*maps.shape[:-2], size[1], size[0])


def _to_original(grids: np.ndarray, box: Letterbox, max_side: int | None = None) -> np.ndarray:
    """(..., gh, gw) maps over the model input -> (..., H, W) float32 over the original image's frame, at most
    ``max_side`` pixels on the longer side (None: the image's own size). One output array, filled map by map."""
    w, h = box.map_size(max_side)
    flat = grids.reshape(-1, *grids.shape[-2:])
    out = np.empty((len(flat), h, w), np.float32)  # (n, H, W)
    for i, g in enumerate(flat):
        out[i] = box.to_original(g, (w, h))
    return out.reshape(*grids.shape[:-2], h, w)


def _check_options(method: str, normalize: str, methods: Sequence[str] = METHODS) -> None:
    if method not in methods:
        raise ValueError(f"unknown explanation method {method!r}; choose from {', '.join(methods)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize={normalize!r}; choose 'per_map' or 'shared'")


def _check_max_side(max_side: Any) -> int | None:
    """None, or a whole number of pixels from 16 up (a map smaller than that shows nothing)."""
    if max_side is None:
        return None
    return check_whole_number(max_side, "max_side", 16, 1_000_000)


def default_layer(model: Any) -> int:
    """The last fusion layer whose word rows still reach the ITM head: the second to last (or 0 with one layer),
    the last one with ``fusion.cross_first``.

    The ITM head reads only the fused [CLS] of the last layer, so in the last layer only the [CLS] query's
    attention has a gradient; the words' own text->image attention there cannot change the score and its
    Grad-CAM is zero. (ALBEF likewise takes Grad-CAM from an inner layer.) With ``cross_first`` the words read
    the image before the [CLS] reads the words, in every layer, so the last layer's word maps do reach the score
    (and are the ones nearest it: on shapes, word pointing 0.79 there against 0.67 one layer down for the same
    model, docs/experiments.md).
    """
    n = len(model.fusion_levels)
    cross_first = bool(getattr(getattr(model.config, "fusion", None), "cross_first", False))
    return n - 1 if cross_first else max(0, n - 2)


def _layer_index(model: Any, layer: int | None) -> int:
    """A fusion layer given as a whole number (negative counts from the last; "1" accepted, 1.5 / True / "abc"
    refused) -> its non-negative index; None -> :func:`default_layer`."""
    n = len(model.fusion_levels)
    if layer is None:
        return default_layer(model)
    layer = check_whole_number(layer, "layer", -1_000_000, 1_000_000)
    if not -n <= layer < n:
        raise ValueError(f"layer={layer} is out of range: this model has {n} fusion layers (0..{n - 1}, or -1)")
    return layer % n


# ------------------------------------------------------------------------------------------ the forward pass
@dataclass
class _Pass:
    words: list[str]
    token_word: list[int | None]
    box: Letterbox
    itm: float
    similarity: float
    contributions: dict[str, float]
    pair_weights: dict[str, float]
    t2i: list[torch.Tensor]  # per fusion layer (h, T, N), detached
    cams: list[torch.Tensor | None]  # per fusion layer (h, T, N) Grad-CAM, None where not asked for
    kernel_maps: torch.Tensor | None  # (n_local, T, P') on kernel_grid
    rollout: torch.Tensor | None  # (P,) CLS row over patches; None for a CNN or when not asked
    kernel_grid: tuple[int, int] | None = None  # (gh, gw) of kernel_maps: the last level's grid, finer with map_shifts


def _run(
    model: Any, processor: Any, image: ImageInput, caption: str, grad_layers: Sequence[int], rollout: bool = True
) -> _Pass:
    """One forward pass (and one gradient for ``grad_layers``) of a single pair; everything returned detached."""
    words, token_word = processor.words(caption)
    pv, boxes = processor.images([load_image(image)])
    enc = processor.captions([caption])
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if len(token_word) != ids.shape[1]:
        raise RuntimeError(f"token/word alignment broke: {len(token_word)} offsets for {ids.shape[1]} tokens")

    was_training = model.training
    if was_training:
        model.eval()  # dropout would make maps random
    try:
        with torch.enable_grad():
            rollout = rollout and model.vision.has_attentions
            img = model.encode_image(pv.to(device), output_attentions=rollout)
            txt = model.encode_text(ids, mask)
            ei, et = model.embed_image(img), model.embed_text(txt)
            with torch.no_grad():
                sim = model.similarity(ei, et, pairwise=True)
                kmaps, kgrid = None, tuple(model.vision.grids[-1])
                if model.kernels.word_map_names:  # the kernels whose sources give word x cell maps
                    kmaps = model.kernels.word_patch_maps(ei, et)[0].float().cpu()  # (n, T, P)
                    shifts = check_whole_number(model.config.kernels.map_shifts, "kernels.map_shifts", 1, 8)
                    if shifts > 1:
                        kmaps, kgrid = _shift_averaged(model, pv.to(device), processor.pad_pixel, et, kmaps, shifts)
                roll = None
                if rollout:
                    r = attention_rollout([a.detach().float() for a in img.attentions])  # (1, N, N)
                    roll = r[0, 0, model.vision.num_prefix_tokens :].cpu()  # (P,) the CLS row over positions
            itm, t2i, cams = float("nan"), [], []
            if model.has_itm:
                out = model.match(img, txt, ei, et)
                itm = float(out.prob[0].detach())
                attn = [a.t2i for a in out.attentions]  # each (1, h, T, N)
                wanted = sorted({lv % len(attn) for lv in grad_layers})
                grads = torch.autograd.grad(out.logits[:, 1].sum(), [attn[i] for i in wanted]) if wanted else []
                by_layer = dict(zip(wanted, grads))
                t2i = [a[0].detach().float().cpu() for a in attn]
                cams = [
                    grad_cam(attn[i][0].detach(), by_layer[i][0]).float().cpu() if i in by_layer else None
                    for i in range(len(attn))
                ]
    finally:
        if was_training:
            model.train()
    names = model.kernel_names
    beta = sim.weights.reshape(-1, len(names))[0]
    return _Pass(
        words,
        token_word,
        boxes[0],
        itm,
        float(sim.similarity[0]),
        dict(zip(names, sim.contributions[0].tolist())),
        dict(zip(names, beta.tolist())),
        t2i,
        cams,
        kmaps,
        roll,
        kgrid,
    )


def shift_input(pixels: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) input with its content moved ``dy`` pixels down and ``dx`` right (negative: up / left); the
    uncovered border is ``fill`` (C,) (the letterbox padding, normalised)."""
    out = fill.to(pixels).view(1, -1, 1, 1).expand_as(pixels).clone()
    h, w = pixels.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = pixels[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def realign(maps: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Maps (..., H, W) of an input whose content was moved (dy, dx) cells, back in the unmoved frame: the value at
    (y, x) is the moved map's at (y + dy, x + dx); the border repeats the nearest value."""
    h, w = maps.shape[-2:]
    ys = (torch.arange(h) + dy).clamp(0, h - 1)
    xs = (torch.arange(w) + dx).clamp(0, w - 1)
    return maps[..., ys, :][..., xs]


@torch.no_grad()
def _shift_averaged(
    model: Any, pixels: torch.Tensor, fill: torch.Tensor, txt_emb: Any, maps: torch.Tensor, n: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Kernel maps (n_maps, T, P) of ``pixels`` averaged with those of n x n - 1 moved copies (module docstring),
    the uncovered border ``fill`` (``Processor.pad_pixel``): (n_maps, T, P') on a grid 2n times finer than the last
    level's, so a move of k/n of a cell is 2k fine cells."""
    gh, gw = model.vision.grids[-1]
    size_h, size_w = pixels.shape[-2:]
    f = 2 * n

    def fine(m: torch.Tensor) -> torch.Tensor:  # (n_maps, T, gh * gw) -> (n_maps, T, f gh, f gw)
        up = torch.nn.functional.interpolate(m.reshape(-1, 1, gh, gw), scale_factor=f, mode="bilinear")
        return up.reshape(*m.shape[:2], f * gh, f * gw)

    total = fine(maps)
    for ky in range(n):
        for kx in range(n):
            if ky == kx == 0:
                continue
            moved = shift_input(pixels, round(ky * size_h / gh / n), round(kx * size_w / gw / n), fill)
            m = model.kernels.word_patch_maps(model.embed_image(model.encode_image(moved)), txt_emb)[0].float().cpu()
            total += realign(fine(m), 2 * ky, 2 * kx)
    return (total / n**2).flatten(-2), (f * gh, f * gw)


def _token_maps(p: _Pass, model: Any, layer: int, method: str) -> torch.Tensor:
    """(h, T, P) per-head token x patch maps of one fusion layer, prefix (CLS) columns dropped."""
    a = p.cams[layer] if method == "gradcam" else p.t2i[layer]
    return a[..., model.vision.num_prefix_tokens :]


def _kernel_token_maps(p: _Pass, model: Any) -> torch.Tensor:
    """(T, P) mix of the kernels' word maps with the (renormalised) global weights of those kernels."""
    if p.kernel_maps is None:
        raise ValueError("method='kernel' needs kernels with word maps; no source in kernels.sources gives any")
    beta = model.kernel_weights().detach().float().cpu()
    word_maps = set(model.kernels.word_map_names)
    local = torch.tensor([i for i, n in enumerate(model.kernel_names) if n in word_maps])
    w = beta[local] / beta[local].sum()
    return torch.einsum("ntp,n->tp", p.kernel_maps, w)


def _words_and_caption(tok: torch.Tensor, p: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """Token maps (..., T, P) -> word maps (..., n_words, P) and the caption map (..., P)."""
    wm = _word_matrix(p.token_word, len(p.words))  # (n_words, T)
    words = torch.einsum("wt,...tp->...wp", wm, tok)
    is_word = torch.tensor([w is not None for w in p.token_word], dtype=tok.dtype)
    caption = torch.einsum("t,...tp->...p", is_word, tok)
    return words, caption


def _grid(x: torch.Tensor, model: Any, layer: int | None = None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(..., P) -> (..., gh, gw) on the grid of fusion layer ``layer``'s image level (None: the last level, which the
    local kernels and the rollout read), or on ``shape`` (kernel maps: ``_Pass.kernel_grid``)."""
    if shape is None and layer is not None and model.fusion is not None and model.fusion.image_grids:
        shape = model.fusion.image_grids[layer]  # the fusion's stream grid (finer levels: VisionConfig.level_grid)
    gh, gw = shape or model.vision.grids[-1]
    return x.reshape(*x.shape[:-1], gh, gw).numpy()


# ------------------------------------------------------------------------------------------ public functions
def explain_pair(
    model: Any,
    processor: Any,
    image: ImageInput,
    caption: str,
    *,
    layer: int | None = None,
    method: str = "gradcam",
    normalize: str = "per_map",
    heads: bool = False,
    max_side: int | None = MAP_MAX_SIDE,
) -> Explanation:
    """Explain one image-caption pair.

    Args:
        model: an :class:`~mklvisita.model.MKLVisITA` (eval mode expected).
        processor: its :class:`~mklvisita.inputs.Processor`.
        image: anything :func:`~mklvisita.inputs.load_image` accepts.
        caption: the caption (validated like everywhere else).
        layer: fusion layer of the Grad-CAM / attention maps (negative counts from the last); None = the
            :func:`default_layer` (the second to last: in the last layer the words' Grad-CAM is zero).
        method: "gradcam", "attention" (raw text->image attention) or "kernel" (the kernels' word maps mixed by beta).
        normalize: "per_map" or "shared" (all word maps on one scale).
        heads: also return per-head maps (``head_heatmaps``; Grad-CAM / attention only).
        max_side: the maps' longer side at most (pixels); an image within it gets maps at its own size. None = the
            image's own size always (memory in proportion to the image: n_words x H x W float32 per map kind).

    Returns:
        :class:`Explanation`; maps are float32 in [0, 1] over the original image's frame, ``map_size`` (W, H) =
        ``image_size`` or scaled down to ``max_side`` (:meth:`Explanation.full_size` upsamples one on demand).

    Raises:
        ValueError: unknown option, a layer out of range, Grad-CAM / attention on a model without fusion, or
            invalid image / caption (:class:`~mklvisita.inputs.InvalidImageError` / ``InvalidCaptionError``).
    """
    _check_options(method, normalize)
    max_side = _check_max_side(max_side)
    if not isinstance(heads, (bool, np.bool_)):
        raise ValueError(f"heads must be True or False, got {heads!r}")
    if method in ("gradcam", "attention") and not model.has_itm:
        raise ValueError(
            f"method={method!r} needs the fusion/ITM branch, which this model does not have "
            "(fusion.enabled = false); use method='kernel' for the kernels' word maps"
        )
    li = _layer_index(model, layer) if model.has_itm else -1
    p = _run(model, processor, image, caption, grad_layers=[li] if method == "gradcam" else [])
    box = p.box

    head_maps = None
    if method == "kernel":
        words, cap = _words_and_caption(_kernel_token_maps(p, model), p)
        signed = True
    else:
        tok = _token_maps(p, model, li, method)  # (h, T, P)
        words, cap = _words_and_caption(tok.mean(0), p)
        signed = False
        if heads:
            hw, _ = _words_and_caption(tok, p)  # (h, n_words, P)
            head_maps = _normalise(_to_original(_grid(hw, model, li), box, max_side), "per_map")
    grid_layer, shape = (None, p.kernel_grid) if method == "kernel" else (li, None)
    word_maps = _normalise(_to_original(_grid(words, model, grid_layer, shape), box, max_side), normalize, signed)
    caption_map = _normalise(_to_original(_grid(cap, model, grid_layer, shape), box, max_side), "per_map", signed)

    kernel_maps = {}
    if p.kernel_maps is not None:
        per_word, _ = _words_and_caption(p.kernel_maps, p)  # (n, n_words, P)
        full = _to_original(_grid(per_word, model, shape=p.kernel_grid), box, max_side)  # (n, n_words, H, W)
        for name, m in zip(model.kernels.word_map_names, full):
            kernel_maps[name] = _normalise(m, normalize, signed=True)
    rollout = None
    if p.rollout is not None:
        rollout = _normalise(_to_original(_grid(p.rollout, model), box, max_side), "per_map")

    fkw = model.fusion_kernel_weights()
    fusion_weights = None
    if fkw is not None:
        fusion_weights = [dict(zip(model.local_kernel_names, row.tolist())) for row in fkw.detach().float().cpu()]
    weights = model.kernel_weights().detach().float().cpu().tolist()
    return Explanation(
        tokens=p.words,
        word_heatmaps=word_maps,
        caption_heatmap=caption_map,
        kernel_weights=dict(zip(model.kernel_names, weights)),
        itm=p.itm,
        similarity=p.similarity,
        contributions=p.contributions,
        method=method,
        layer=li,
        kernel_maps=kernel_maps,
        rollout=rollout,
        pair_kernel_weights=p.pair_weights,
        head_heatmaps=head_maps,
        fusion_kernel_weights=fusion_weights,
        image_size=(box.width, box.height),
        map_size=box.map_size(max_side),
    )


def layer_maps(
    model: Any,
    processor: Any,
    image: ImageInput,
    caption: str,
    *,
    method: str = "gradcam",
    normalize: str = "per_map",
    max_side: int | None = MAP_MAX_SIDE,
) -> LayerMaps:
    """Word and caption maps of every fusion layer (one forward and one gradient for all of them).

    ``normalize="shared"`` puts all layers' word maps on one scale; "per_map" scales each map alone. ``max_side`` as
    in :func:`explain_pair`.
    """
    _check_options(method, normalize, ("gradcam", "attention"))
    max_side = _check_max_side(max_side)
    if not model.has_itm:
        raise ValueError("layer_maps needs the fusion branch, which this model does not have (fusion.enabled = false)")
    n = len(model.fusion_levels)
    p = _run(model, processor, image, caption, grad_layers=list(range(n)) if method == "gradcam" else [], rollout=False)
    words, caps = [], []
    for li in range(n):
        w, c = _words_and_caption(_token_maps(p, model, li, method).mean(0), p)
        words.append(w)
        caps.append(c)
    # Every level of one encoder shares one grid (see mklvisita.encoders), so the layers stack.
    word_grids = np.stack([_grid(w, model, i) for i, w in enumerate(words)])  # (L, n_words, gh, gw)
    caption_grids = np.stack([_grid(c, model, i) for i, c in enumerate(caps)])  # (L, gh, gw)
    word_maps = _normalise(_to_original(word_grids, p.box, max_side), normalize)
    caption_maps = _normalise(_to_original(caption_grids, p.box, max_side), "per_map")
    return LayerMaps(p.words, word_maps, caption_maps, method, list(model.fusion_levels))


def _check_rollout(model: Any) -> None:
    if not model.vision.has_attentions:
        raise ValueError(
            f"attention rollout needs transformer blocks, and this model's image encoder "
            f"({model.config.vision.model_name}) is a CNN or has no plain timm attention; use a Grad-CAM, attention "
            "or kernel map instead, or a ViT / hybrid backbone (vision.hybrid_layers > 0)"
        )


def image_rollout(model: Any, processor: Any, image: ImageInput, max_side: int | None = MAP_MAX_SIDE) -> np.ndarray:
    """Attention rollout of the image encoder: (H, W) in [0, 1] over the original image (caption-independent), at
    most ``max_side`` pixels on the longer side as in :func:`explain_pair`.

    Raises:
        ValueError: the image encoder is a CNN (no attention), or the image is invalid.
    """
    _check_rollout(model)
    max_side = _check_max_side(max_side)
    pv, boxes = processor.images([load_image(image)])
    with torch.no_grad():
        img = model.encode_image(pv.to(next(model.parameters()).device), output_attentions=True)
        r = attention_rollout([a.float() for a in img.attentions])  # (1, N, N)
    roll = r[0, 0, model.vision.num_prefix_tokens :].cpu()  # (P,) the CLS row over positions
    return _normalise(_to_original(_grid(roll, model), boxes[0], max_side), "per_map")


# ------------------------------------------------------------------------------------ maps for pointing games
def method_maps(
    model: Any,
    processor: Any,
    image: ImageInput,
    caption: str,
    methods: Sequence[str],
    layer: int | None = None,
    words: bool = True,
) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """One pass of a pair and, per method, its (word maps (n_words, H, W), caption map (H, W)): unnormalised, in the
    original image's frame at its full size, as pointing games compare them with object masks
    (:mod:`mklvisita.pointing`).

    ``methods``: any of :data:`MAP_METHODS` the model supports (Grad-CAM and attention need fusion, kernel local
    kernels, rollout transformer blocks: a CNN asked for rollout is a ValueError). Rollout ignores the caption: its
    word maps are None and its caption map is the image's saliency. ``words`` False skips the word maps (None).
    """
    for m in methods:
        if m not in MAP_METHODS:
            raise ValueError(f"unknown map method {m!r}; choose from {', '.join(MAP_METHODS)}")
    if "rollout" in methods:
        _check_rollout(model)
    li = _layer_index(model, layer) if model.has_itm else -1
    p = _run(model, processor, image, caption, [li] if "gradcam" in methods else [], rollout="rollout" in methods)
    out: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    for m in methods:
        if m == "rollout":
            out[m] = (None, _to_original(_grid(p.rollout, model), p.box))
            continue
        tok = _kernel_token_maps(p, model) if m == "kernel" else _token_maps(p, model, li, m).mean(0)  # (T, P)
        word_grids, caption_grid = _words_and_caption(tok, p)  # (n_words, P), (P,)
        grid_of = (None, p.kernel_grid) if m == "kernel" else (li, None)
        word_maps = _to_original(_grid(word_grids, model, *grid_of), p.box) if words else None
        out[m] = (word_maps, _to_original(_grid(caption_grid, model, *grid_of), p.box))
    return out
