"""Thin adapters around the outside backbones, with one interface.

``levels, pooled = encoder(inputs, levels=[...])``: ``levels`` maps a block index (0-based) to that block's token
outputs, ``pooled`` is the CLS feature of the last block (after the final norm). Hierarchical fusion and the
"mid" kernel source read intermediate blocks, so encoders return every level that was asked for, not only the
last one.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, PretrainedConfig

from .config import TextConfig, VisionConfig


class TimmImageEncoder(nn.Module):
    """A timm Vision Transformer; any timm ViT name, ``pretrained`` on or off."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kwargs = cfg.timm_kwargs()
        if cfg.pretrained and cfg.pretrained_file:
            # Weights from a local file (a mirrored Hub download): timm reads `file` before any Hub id.
            kwargs["pretrained_cfg_overlay"] = {"file": cfg.pretrained_file}
        self.model = timm.create_model(cfg.model_name, pretrained=cfg.pretrained, **kwargs)
        for attr in ("patch_embed", "blocks", "norm"):
            if not hasattr(self.model, attr):
                raise ValueError(
                    f"vision.model_name={cfg.model_name!r} is not a plain ViT (no `{attr}`); use a timm ViT"
                )
        self.width: int = self.model.embed_dim
        self.depth: int = len(self.model.blocks)
        self.num_prefix_tokens: int = getattr(self.model, "num_prefix_tokens", 1)
        self.grid: tuple[int, int] = tuple(self.model.patch_embed.grid_size)
        if not getattr(self.model, "has_class_token", True):
            raise ValueError(f"vision.model_name={cfg.model_name!r} has no class token; MKL-VisITA needs one")

    def forward(
        self, pixel_values: torch.Tensor, levels: list[int], return_block_inputs: bool = False
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor] | tuple[dict[int, torch.Tensor], torch.Tensor, list]:
        m = self.model
        x = m.patch_embed(pixel_values)  # (B, P, D)
        x = m._pos_embed(x)  # (B, prefix + P, D), CLS first
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        wanted = {lvl % self.depth for lvl in levels}
        out: dict[int, torch.Tensor] = {}
        inputs = []
        for i, block in enumerate(m.blocks):
            if return_block_inputs:
                inputs.append(x)
            x = block(x)
            if i in wanted and i != self.depth - 1:
                out[i] = x
        x = m.norm(x)  # the last level is always the normed output
        out[self.depth - 1] = x
        pooled = x[:, 0]  # (B, D) CLS
        if return_block_inputs:
            return out, pooled, inputs
        return out, pooled


class HFTextEncoder(nn.Module):
    """A transformers encoder: a named model (pretrained or built from its config) or a built-in BERT."""

    def __init__(self, cfg: TextConfig, vocab_size: int, hf_config: dict[str, Any] | None = None):
        super().__init__()
        if hf_config is not None:
            # Rebuilding a saved checkpoint: the backbone config travels in our config.json, no network needed.
            self.model = _from_config(AutoConfig.for_model(**hf_config))
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


def _no_pooler(config: PretrainedConfig) -> dict[str, Any]:
    # BERT-family models build an unused pooler by default; its weights would be dead parameters.
    return {"add_pooling_layer": False} if config.model_type in {"bert", "roberta", "xlm-roberta", "camembert"} else {}


def _from_config(config: PretrainedConfig) -> nn.Module:
    return AutoModel.from_config(config, **_no_pooler(config))
