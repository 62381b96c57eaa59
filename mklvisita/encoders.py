"""Thin adapters around the outside backbones, with one interface.

Decisions:
    - The image side wraps any timm model through timm's public feature API (``forward_intermediates``,
      ``forward_head``), never a private method, so a new timm release cannot silently change our forward.
    - Levels of tokens: ``encoder(pixel_values, levels=[...])`` returns ``levels`` (level index -> (B, N, C_l)
      tokens, prefix tokens first) and ``pooled``. Hierarchical fusion and the "mid" kernel source read
      intermediate levels, so the encoder returns every level asked for, and the last level always.
        * ViT (timm models with a ``patch_embed`` and prefix tokens): level i = the output of block i; the last
          level is the normed final output; CLS (and register) tokens come first.
        * CNN (any other timm model: ResNet, EfficientNet, ConvNeXt, ...): level i = feature stage i of
          ``feature_info`` as a feature map flattened to positions, (B, C, H, W) -> (B, H*W, C), row-major; the
          last level is the backbone's final feature map (``forward_features``, e.g. EfficientNet's head conv).
          Earlier stages are average-pooled to the final map's grid: fusion carries one image stream from layer
          to layer (img_l = img_{l-1} + proj_l(level_l)), which needs one token count, and the maps of every
          level then share one grid. ``VisionConfig.level_grid`` > 0 puts the earlier stages on that finer grid
          instead (EfficientNet's stride-16 stage whole at 14 x 14), the last level staying the final map; the
          fusion then resamples the levels it reads to its finest grid (:mod:`mklvisita.fusion`).
          A CNN has no CLS: ``num_prefix_tokens = 0`` and ``pooled`` is timm's pooled
          pre-logits feature (``forward_head(pre_logits=True)``).
        * Hybrid (``VisionConfig.hybrid_layers > 0`` on a CNN): transformer blocks with a CLS token and learned
          position embeddings over the CNN's final feature map, as the hybrid models of the original ViT paper
          (the CNN is the patch embedding, "patch size 1"). Its levels are the hybrid blocks, so the model stays a
          vision transformer: CLS pooling, attention rollout. The CNN's own final map and pooled feature remain
          available (``backbone_map``, ``backbone_pooled``) for kernels that read the CNN directly.
    - Widths and grids are per level (``widths``, ``grids``): CNN stages differ in width; the consumers (kernel
      projections, fusion input projections, explanation grids) read them.
    - Attention probabilities (``output_attentions=True``, transformers style) exist for ViT and hybrid blocks:
      timm's fused attention never materialises them, so each block's attention input is recorded by a hook
      registered once, active only inside a call that asks for it (a context variable, so concurrent calls on
      other threads record nothing), and the probabilities are recomputed from the block's own ``qkv``.
    - ``VisionConfig.conv_stem`` swaps a random-init ViT's patch projection (one stride-p convolution) for a few
      stride-2 3x3 convolutions with the same output grid (:class:`ConvStem`): each token then sees its
      neighbourhood through overlapping receptive fields, which is what small, random-init ViTs lack for local
      shape (the shapes checkpoint: a square's corner and a circle's arc fall in different patches).
    - Pretrained weights: ``pretrained`` with ``weights`` (``package:``/``file:``/``hf-hub:`` spec) loads through
      :mod:`mklvisita.pretrained` (sha256 pinned), strictly; else ``pretrained_file``, else timm's own source.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, PretrainedConfig

from .config import TextConfig, VisionConfig

# The attention inputs of the current call, or None when no one asked (see the module docstring).
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("mklvisita_attention_inputs", default=None)


def _record_attention_input(module: nn.Module, args: tuple) -> None:
    inputs = _RECORDING.get()
    if inputs is not None:
        inputs.append((module, args[0]))


def attention_probabilities(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The probabilities (B, heads, N, N) a timm ``Attention`` computes for its (already normed) input x (B, N, C)."""
    if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale", "q_norm", "k_norm")):
        raise ValueError(f"attention probabilities need timm attention with a fused qkv; got {type(attn).__name__}")
    b, n, _ = x.shape
    head_dim = getattr(attn, "head_dim", x.shape[-1] // attn.num_heads)
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)  # each (B, h, N, dh)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, h, N, N)


@dataclass
class VisionOutput:
    """What the image encoder returns."""

    levels: dict[int, torch.Tensor]  # level -> (B, N_prefix + P, C_level), prefix tokens first
    pooled: torch.Tensor  # (B, pooled_width): CLS of the last level (ViT, hybrid) or timm's pooled pre-logits (CNN)
    attentions: list[torch.Tensor] | None = None  # per transformer block (B, heads, N, N), when asked for
    backbone_map: torch.Tensor | None = None  # CNN / hybrid: the CNN's final feature map (B, P, C_cnn)
    backbone_pooled: torch.Tensor | None = None  # CNN / hybrid: the CNN's pooled pre-logits feature (B, C_cnn)


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions (GroupNorm, GELU), then a 1x1 convolution to ``width``: a drop-in for a ViT's
    patch projection, (B, 3, H, W) -> (B, width, H / 2**n, W / 2**n). GroupNorm with one group keeps the stem
    independent of the batch (no batch statistics between training and a one-image Match)."""

    def __init__(self, channels: tuple[int, ...], width: int, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for c in channels:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c), nn.GELU()]
            cin = c
        layers.append(nn.Conv2d(cin, width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class HybridTransformer(nn.Module):
    """Transformer blocks over a CNN feature map: per-position projection, CLS token, learned position embeddings."""

    def __init__(self, in_width: int, width: int, layers: int, heads: int, positions: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"vision.hybrid_width ({width}) must be divisible by vision.hybrid_heads ({heads})")
        self.proj = nn.Linear(in_width, width)  # a 1x1 convolution: the "patch embedding" of a 1-pixel patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + positions, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads, qkv_bias=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, feature_map: torch.Tensor) -> list[torch.Tensor]:
        """feature_map (B, P, C) -> every block's output (B, 1 + P, W); the last one normed."""
        x = self.proj(feature_map)  # (B, P, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed  # (B, 1 + P, W)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        outs[-1] = self.norm(x)
        return outs


class TimmImageEncoder(nn.Module):
    """Any timm image model (ViT or CNN, optionally a hybrid), ``pretrained`` on or off.

    Attributes:
        kind: "vit", "cnn" or "hybrid".
        depth: number of levels (ViT / hybrid blocks, CNN feature stages).
        widths: channels of each level's tokens; ``width`` is the last level's.
        grids: (H, W) of each level's positions; ``grid`` is the last level's.
        pooled_width: width of ``pooled``.
        num_prefix_tokens: CLS / register tokens before the positions (0 for a CNN).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.conv_stem and cfg.pretrained:
            raise ValueError(
                "vision.conv_stem replaces the patch projection, so pretrained weights would lose theirs; "
                "use it with random init only (vision.pretrained: false)"
            )
        self.model = _create_timm_model(cfg)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"vision.model_name={cfg.model_name!r} has no forward_intermediates in this timm version; "
                "choose a model that does (ViT, ResNet, EfficientNet, ConvNeXt, ...) or upgrade timm"
            )
        tokens = hasattr(self.model, "patch_embed") and hasattr(self.model, "num_prefix_tokens")
        self.kind = "vit" if tokens else "cnn"
        self.hybrid: HybridTransformer | None = None
        self.level_grid: tuple[int, int] | None = None  # CNN: the grid of every stage but the last (level_grid)
        if self.kind == "vit":
            if cfg.hybrid_layers:
                raise ValueError(
                    f"vision.hybrid_layers puts transformer blocks over a CNN's feature map, but "
                    f"{cfg.model_name!r} is already a vision transformer; set vision.hybrid_layers: 0"
                )
            if cfg.conv_stem:
                self._install_conv_stem(cfg)
            self.backbone_depth = len(self.model.blocks)
            self.num_prefix_tokens: int = int(self.model.num_prefix_tokens)
            grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
            self.widths = [int(self.model.embed_dim)] * self.backbone_depth
            self.grids: list[tuple[int, int]] = [grid] * self.backbone_depth
            self.pooled_width: int = int(getattr(self.model, "head_hidden_size", self.model.num_features))
            # Probabilities are recomputed from q and k, which is exact only for timm's plain attention (a relative
            # position bias, say, would be missed): other attention classes offer no attentions.
            attns = [block.attn for block in self.model.blocks]
            self.attention_modules = attns if all(type(a) is Attention for a in attns) else []
        else:
            self.backbone_depth = len(self.model.feature_info)
            widths, grid, pooled_width = _probe_cnn(self.model, cfg.image_size)
            self.num_prefix_tokens = 0
            if cfg.level_grid > 0 and not cfg.hybrid_layers:
                self.level_grid = (cfg.level_grid, cfg.level_grid)
            stage_grid = self.level_grid or grid
            self.widths, self.pooled_width = widths, pooled_width
            self.grids = [stage_grid] * (len(widths) - 1) + [grid]
            self.attention_modules = []
            if cfg.conv_stem:
                raise ValueError(
                    f"vision.conv_stem replaces a vision transformer's patch projection, but {cfg.model_name!r} "
                    "is a CNN; leave vision.conv_stem empty"
                )
            if cfg.hybrid_layers:
                width = cfg.hybrid_width or widths[-1]
                heads = cfg.hybrid_heads or max(1, width // 64)
                self.hybrid = HybridTransformer(widths[-1], width, cfg.hybrid_layers, heads, grid[0] * grid[1])
                self.kind = "hybrid"
                self.num_prefix_tokens = 1
                self.widths, self.grids = [width] * cfg.hybrid_layers, [grid] * cfg.hybrid_layers
                self.pooled_width = width
                self.attention_modules = [block.attn for block in self.hybrid.blocks]
        for attn in self.attention_modules:
            attn.register_forward_pre_hook(_record_attention_input)
        self.depth: int = len(self.widths)
        self.width: int = self.widths[-1]
        self.grid: tuple[int, int] = self.grids[-1]
        if cfg.level_grid < 0 or (cfg.level_grid and self.kind == "vit"):
            raise ValueError(
                f"vision.level_grid={cfg.level_grid} resamples a CNN's stages; use 0 for a ViT (its tokens have one "
                "grid) and a positive side for a CNN"
            )
        if cfg.pretrained and cfg.weights:
            self._load_weights(cfg)

    def _install_conv_stem(self, cfg: VisionConfig) -> None:
        proj = self.model.patch_embed.proj
        stride = tuple(proj.stride) if isinstance(proj, nn.Conv2d) else None
        factor = 2 ** len(cfg.conv_stem)
        if stride != (factor, factor) or tuple(proj.kernel_size) != stride:
            raise ValueError(
                f"vision.conv_stem has {len(cfg.conv_stem)} stride-2 layers (a stride of {factor}), but the patch "
                f"projection of {cfg.model_name!r} has stride {stride}; give log2(patch_size) widths"
            )
        self.model.patch_embed.proj = ConvStem(tuple(cfg.conv_stem), proj.out_channels, proj.in_channels)

    @property
    def has_attentions(self) -> bool:
        """Whether ``output_attentions`` is available (ViT and hybrid blocks; not a plain CNN)."""
        return bool(self.attention_modules)

    def _load_weights(self, cfg: VisionConfig) -> None:
        from .pretrained import vision_state_dict  # lazy: only a pretrained build needs it

        state = vision_state_dict(cfg.weights, cfg.model_name)
        # The classification head is not part of the encoder (num_classes=0): its weights are left out.
        head = self.model.pretrained_cfg.get("classifier") or "head"
        own = self.model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(head + ".")}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(
                f"vision.weights={cfg.weights!r} does not fit {cfg.model_name!r}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, mis-shaped {shapes[:3]}; check vision.model_name and image_size"
            )
        self.model.load_state_dict(state, strict=True)

    def forward(self, pixel_values: torch.Tensor, levels: list[int], output_attentions: bool = False) -> VisionOutput:
        """Tokens of the asked ``levels`` (and always the last), pooled feature, optionally attentions."""
        if output_attentions and not self.has_attentions:
            what = "a CNN" if self.kind == "cnn" else "a ViT whose attention is not timm's plain Attention"
            raise ValueError(
                f"output_attentions needs timm transformer blocks with plain attention; this image encoder is {what} "
                "(use a timm ViT, or vision.hybrid_layers > 0 on a CNN, for attention rollout)"
            )
        recorded: list = []
        token = _RECORDING.set(recorded) if output_attentions else None
        try:
            forward = self._forward_vit if self.kind == "vit" else self._forward_cnn
            out = forward(pixel_values, levels)
        finally:
            if token is not None:
                _RECORDING.reset(token)
        if output_attentions:
            inputs = {id(m): x for m, x in recorded}
            out.attentions = [attention_probabilities(m, inputs[id(m)]) for m in self.attention_modules]
        return out

    def _wanted(self, levels: list[int]) -> list[int]:
        return sorted({lvl % self.depth for lvl in levels} | {self.depth - 1})

    def _forward_vit(self, pixel_values: torch.Tensor, levels: list[int]) -> VisionOutput:
        m = self.model
        wanted = self._wanted(levels)
        prefix = {"return_prefix_tokens": True} if self.num_prefix_tokens else {}
        final, inter = m.forward_intermediates(pixel_values, indices=wanted, norm=False, output_fmt="NLC", **prefix)
        tokens: dict[int, torch.Tensor] = {}
        for lvl, item in zip(wanted, inter):
            if isinstance(item, tuple):  # (patches (B, P, D), prefix (B, prefix, D))
                item = torch.cat([item[1], item[0]], 1)  # (B, prefix + P, D)
            tokens[lvl] = item
        tokens[self.depth - 1] = final  # the last level is the normed output
        return VisionOutput(tokens, m.forward_head(final, pre_logits=True))

    def _forward_cnn(self, pixel_values: torch.Tensor, levels: list[int]) -> VisionOutput:
        m = self.model
        stages = self._wanted(levels) if self.hybrid is None else []
        stages = [s for s in stages if s != self.backbone_depth - 1]
        final, inter = m.forward_intermediates(pixel_values, indices=stages or [0], output_fmt="NCHW")
        pooled = m.forward_head(final, pre_logits=True)  # (B, C_pooled); forward_head takes the model's own layout
        final = _nchw(m, final)
        grid = final.shape[-2:]
        fmap = final.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.hybrid is not None:
            outs = self.hybrid(fmap)
            tokens = {lvl: outs[lvl] for lvl in self._wanted(levels)}
            return VisionOutput(tokens, outs[-1][:, 0], backbone_map=fmap, backbone_pooled=pooled)
        tokens = {}
        for lvl, x in zip(stages, inter):
            x = resample_map(x, self.level_grid or tuple(grid))  # (B, C_l, H, W) on the stages' grid
            tokens[lvl] = x.flatten(2).transpose(1, 2)  # (B, H*W, C_l)
        tokens[self.depth - 1] = fmap
        return VisionOutput(tokens, pooled, backbone_map=fmap, backbone_pooled=pooled)


def resample_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *grid): averaged over windows onto a coarser grid, bilinear onto a finer one."""
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    if x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False)


def _create_timm_model(cfg: VisionConfig) -> nn.Module:
    kwargs = cfg.timm_kwargs()
    from_timm = cfg.pretrained and not cfg.weights  # `weights` are loaded by us, after the build
    if from_timm and cfg.pretrained_file:
        # Weights from a local file (a mirrored Hub download): timm reads `file` before any Hub id.
        kwargs["pretrained_cfg_overlay"] = {"file": cfg.pretrained_file}
    try:
        try:
            return timm.create_model(cfg.model_name, pretrained=from_timm, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            # A CNN takes any input size; only ViTs size their position embeddings by it.
            kwargs.pop("img_size")
            return timm.create_model(cfg.model_name, pretrained=from_timm, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(
                f"vision.model_name={cfg.model_name!r} is not a timm model (see timm.list_models())"
            ) from e
        raise
    except TypeError as e:
        raise ValueError(
            f"timm model {cfg.model_name!r} does not take the size overrides given ({e}); vision.patch_size, width, "
            "depth and heads apply to ViTs, vision.timm_args to any model"
        ) from e


def _nchw(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A final feature map in (B, C, H, W): Swin, MambaOut and the like keep theirs channels-last."""
    return x.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else x


@torch.no_grad()
def _probe_cnn(model: nn.Module, image_size: int) -> tuple[list[int], tuple[int, int], int]:
    """Per-level widths, the final grid and the pooled width of a CNN, from one dry run (eval mode: BN untouched)."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
        n = len(model.feature_info)
        final, inter = model.forward_intermediates(x, indices=list(range(n)), output_fmt="NCHW")
        pooled = model.forward_head(final, pre_logits=True)
        final = _nchw(model, final)
    finally:
        model.train(was_training)
    widths = [int(t.shape[1]) for t in inter[:-1]] + [int(final.shape[1])]
    return widths, (int(final.shape[-2]), int(final.shape[-1])), int(pooled.shape[-1])


class HFTextEncoder(nn.Module):
    """A transformers encoder: a named model (pretrained or built from its config) or a built-in BERT."""

    def __init__(self, cfg: TextConfig, vocab_size: int, hf_config: dict[str, Any] | None = None):
        super().__init__()
        if hf_config is not None:
            # Rebuilding a saved checkpoint: the backbone config travels in our config.json, no network needed.
            self.model = _from_config(AutoConfig.for_model(**hf_config))
        elif cfg.pretrained and cfg.weights:
            folder = str(text_weights_folder(cfg.weights))
            self.model = AutoModel.from_pretrained(folder, **_no_pooler(AutoConfig.from_pretrained(folder)))
        elif cfg.model_name is not None and cfg.pretrained:
            config = AutoConfig.from_pretrained(cfg.model_name)
            self.model = AutoModel.from_pretrained(cfg.model_name, **_no_pooler(config))
        elif cfg.model_name is not None:
            self.model = _from_config(AutoConfig.from_pretrained(cfg.model_name))
        else:
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=cfg.width,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=cfg.intermediate or 4 * cfg.width,
                max_position_embeddings=max(64, cfg.max_length),
            )
            self.model = BertModel(config, add_pooling_layer=False)
        if self.model.config.vocab_size < vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the text encoder only {self.model.config.vocab_size}: "
                "use the tokenizer that belongs to text.model_name"
            )
        self.width: int = self.model.config.hidden_size
        self.depth: int = self.model.config.num_hidden_layers

    def backbone_config(self) -> dict[str, Any]:
        """The backbone's own config, saved with our config so a checkpoint rebuilds offline."""
        d = self.model.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"):
            d.pop(key, None)
        return d

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, levels: list[int]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[1:]  # layer outputs; [0] is the embeddings
        wanted = {lvl % self.depth for lvl in levels} | {self.depth - 1}
        tokens = {i: hidden[i] for i in sorted(wanted)}  # each (B, T, D)
        return tokens, hidden[-1][:, 0]


def text_weights_folder(spec: str) -> Path:
    """The transformers folder that ``TextConfig.weights`` names (weights, config and tokenizer)."""
    from .pretrained import text_model_folder  # lazy: only a pretrained build needs it

    return text_model_folder(spec)


def _no_pooler(config: PretrainedConfig) -> dict[str, Any]:
    # BERT-family models build an unused pooler by default; its weights would be dead parameters.
    return {"add_pooling_layer": False} if config.model_type in {"bert", "roberta", "xlm-roberta", "camembert"} else {}


def _from_config(config: PretrainedConfig) -> nn.Module:
    return AutoModel.from_config(config, **_no_pooler(config))
