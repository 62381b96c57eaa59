"""MKL-VisITA: the model.

    image -> timm ViT or CNN (or a hybrid) -> tokens per level (+ CLS) and a pooled feature
    text  -> transformers encoder -> tokens per layer + CLS
      |-> multi-kernel similarity S = sum_m beta_m K_m          (ITC: fast, all pairs, cacheable)
      '-> hierarchical two-way fusion, L layers -> fused CLS -> ITM head   (ITM: one pass per pair)

``forward`` computes the training losses when asked; inference goes through ``encode_*`` / ``embed_*`` /
``similarity`` / ``match`` so that retrieval can cache each side once. Checkpoints are one folder:
``config.json`` + ``model.safetensors`` + tokenizer files, saved crash-safely and loaded strictly (the IO lives in
:mod:`mklvisita.checkpoint`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from . import checkpoint
from .checkpoint import (  # re-exported: the checkpoint IO moved to mklvisita.checkpoint
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_weights_strict,
    read_config,
)
from .checkpoint import resolve as resolve_checkpoint
from .config import ConfigError, MKLVisITAConfig
from .encoders import HFTextEncoder, TimmImageEncoder, text_weights_folder
from .fusion import HierarchicalFusion, LayerAttentions
from .kernels import KernelEmbeddings, MultiKernelSimilarity, SimilarityOutput
from .losses import (
    dense_attribute_loss,
    grounding_loss,
    itc_loss,
    itm_loss,
    kernel_entropy_loss,
    positives_mask,
    relation_loss,
    sample_hard_negatives,
)
from .sources.colour import ColourNames
from .sources.concept import ConceptBridge, uses_concepts
from .sources.person import PersonSource
from .sources.scene_text import SceneTextReader, caption_word_vectors
from .tokenizer import builtin_tokenizer, load_tokenizer


@dataclass
class ImageFeatures:
    """The image encoder's output (transformers style): level tokens, pooled feature, optional attentions."""

    levels: dict[int, torch.Tensor]  # level -> (B, N, C_level) tokens, prefix (CLS) first; the last level is normed
    pooled: torch.Tensor  # (B, Dv) CLS of the last level (ViT, hybrid) or the CNN's pooled pre-logits feature
    attentions: list[torch.Tensor] | None = None  # ViT / hybrid blocks' self-attention (B, heads, N, N), when asked
    backbone_map: torch.Tensor | None = None  # CNN / hybrid: the CNN's final feature map (B, P, C_cnn)
    backbone_pooled: torch.Tensor | None = None  # CNN / hybrid: the CNN's pooled pre-logits feature (B, C_cnn)
    colour_cells: torch.Tensor | None = None  # "colour" source: colour names per cell of the last grid (B, P, 11)
    faces: torch.Tensor | None = None  # "person" source: each cell's share covered by frontal faces (B, P)
    scene_words: torch.Tensor | None = None  # "scene_text": words read in the image (B, W, DIM) trigram vectors
    scene_mask: torch.Tensor | None = None  # (B, W) True = a word
    scene_cells: torch.Tensor | None = None  # (B, W, P) each word's text line over the last grid

    def _map(self, fn) -> ImageFeatures:
        opt = lambda x: None if x is None else fn(x)  # noqa: E731
        return ImageFeatures(
            {k: fn(v) for k, v in self.levels.items()},
            fn(self.pooled),
            None if self.attentions is None else [fn(a) for a in self.attentions],
            opt(self.backbone_map),
            opt(self.backbone_pooled),
            opt(self.colour_cells),
            opt(self.faces),
            opt(self.scene_words),
            opt(self.scene_mask),
            opt(self.scene_cells),
        )

    def select(self, index) -> ImageFeatures:
        return self._map(lambda x: x[index])

    def keep(self, levels: list[int]) -> ImageFeatures:
        """Only the given levels (for caching fusion inputs); attentions and backbone extras are dropped."""
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
            cat(lambda p: p.colour_cells),
            cat(lambda p: p.faces),
            cat(lambda p: p.scene_words),
            cat(lambda p: p.scene_mask),
            cat(lambda p: p.scene_cells),
        )


@dataclass
class TextFeatures:
    levels: dict[int, torch.Tensor]  # layer -> (B, T, Dt)
    pooled: torch.Tensor  # (B, Dt) CLS of the last layer
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    word_mask: torch.Tensor  # (B, T) True = a word piece (not [CLS], [SEP] or padding)
    colour_tokens: torch.Tensor | None = None  # "colour" source: a one-hot at each colour word (B, T, 11)
    scene_words: torch.Tensor | None = None  # "scene_text" source: each word's trigram vector on its first piece
    person_tokens: torch.Tensor | None = None  # "person" source: how much each token, alone, names a person (B, T)

    def select(self, index) -> TextFeatures:
        return TextFeatures(
            {k: v[index] for k, v in self.levels.items()},
            self.pooled[index],
            self.attention_mask[index],
            self.word_mask[index],
            None if self.colour_tokens is None else self.colour_tokens[index],
            None if self.scene_words is None else self.scene_words[index],
            None if self.person_tokens is None else self.person_tokens[index],
        )

    def keep(self, levels: list[int]) -> TextFeatures:
        return TextFeatures({k: self.levels[k] for k in levels}, self.pooled, self.attention_mask, self.word_mask)

    def to(self, device) -> TextFeatures:
        return TextFeatures(
            {k: v.to(device) for k, v in self.levels.items()},
            self.pooled.to(device),
            self.attention_mask.to(device),
            self.word_mask.to(device),
            None if self.colour_tokens is None else self.colour_tokens.to(device),
            None if self.scene_words is None else self.scene_words.to(device),
            None if self.person_tokens is None else self.person_tokens.to(device),
        )

    @staticmethod
    def cat(parts: list[TextFeatures]) -> TextFeatures:
        """Concatenate batches, padding every one to the longest caption."""
        t = max(p.attention_mask.shape[1] for p in parts)

        def pad(x: torch.Tensor) -> torch.Tensor:
            extra = t - x.shape[1]
            return F.pad(x, (0, 0, 0, extra) if x.dim() == 3 else (0, extra))

        return TextFeatures(
            {k: torch.cat([pad(p.levels[k]) for p in parts]) for k in parts[0].levels},
            torch.cat([p.pooled for p in parts]),
            torch.cat([pad(p.attention_mask) for p in parts]),
            torch.cat([pad(p.word_mask) for p in parts]),
            None if parts[0].colour_tokens is None else torch.cat([pad(p.colour_tokens) for p in parts]),
            None if parts[0].scene_words is None else torch.cat([pad(p.scene_words) for p in parts]),
            None if parts[0].person_tokens is None else torch.cat([pad(p.person_tokens) for p in parts]),
        )


@dataclass
class MatchOutput:
    logits: torch.Tensor  # (B, 2) ITM logits, class 1 = match
    prob: torch.Tensor  # (B,) match probability
    attentions: list[LayerAttentions]  # one per fusion layer
    text_states: torch.Tensor | None = None  # (B, T, W) fused text entering the last fusion layer (with attentions)


@dataclass
class MKLVisITAOutput:
    loss: torch.Tensor | None  # weighted sum of `losses`
    losses: dict[str, torch.Tensor]  # named loss terms (itc, itm, entropy)
    similarity: torch.Tensor  # (B, B) multi-kernel similarity, image x caption
    contributions: torch.Tensor  # (B, B, M) beta_m K_m
    kernel_weights: torch.Tensor  # (M,) or (B, B, M) with the gate
    logs: dict[str, float] = field(default_factory=dict)  # detached numbers for trackers (kernel entropy, ...)


class MKLVisITA(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mklvisita",
    tags=["image-text-matching", "multi-kernel-learning", "vision-transformer"],
    pipeline_tag="zero-shot-image-classification",
):
    """Multi-kernel learning + ViT + hierarchical two-way cross-modal fusion for image-text matching."""

    def __init__(self, config: MKLVisITAConfig | dict, tokenizer=None):
        super().__init__()
        if isinstance(config, dict):
            config = MKLVisITAConfig.from_dict(config)
        config = copy.deepcopy(config)
        config.validate()
        self.config = config
        building = config.text.backbone_config is None
        if tokenizer is None and building:
            tokenizer = _build_tokenizer(config)
        self._tokenizer = tokenizer

        self.vision = TimmImageEncoder(config.vision)
        vocab = len(tokenizer) if tokenizer is not None else 0
        self.text = HFTextEncoder(config.text, vocab, config.text.backbone_config)
        config.text.backbone_config = self.text.backbone_config()

        dt = self.text.width
        k = config.kernels
        self.image_mid_level = (
            k.mid_image_level if k.mid_image_level is not None else max(0, self.vision.depth // 2 - 1)
        )
        if not -self.vision.depth <= self.image_mid_level < self.vision.depth:
            raise ConfigError(
                f"kernels.mid_image_level={self.image_mid_level} is out of range for an image encoder of "
                f"{self.vision.depth} levels"
            )
        self.image_mid_level %= self.vision.depth
        self.text_mid_level = k.mid_text_level if k.mid_text_level is not None else max(0, self.text.depth // 2 - 1)
        # Image widths per source: a CNN's levels differ in width (the mid stage vs the final map vs the pooled).
        image_dims = {
            "global": self.vision.pooled_width,
            "mid": self.vision.widths[self.image_mid_level],
            "local": self.vision.widths[-1],
        }
        self.kernels = MultiKernelSimilarity(k, image_dims, {"global": dt, "mid": dt, "local": dt})
        self.concepts: ConceptBridge | None = None
        if uses_concepts(k):
            cnn_width = int(getattr(self.vision.model, "num_features", 0))
            self.concepts = ConceptBridge(k, cnn_width, dt)
            if building and config.vision.pretrained and config.vision.weights:
                self._fill_concept_classifier()
            if building and tokenizer is not None:
                self.concepts.fill_class_text(self._sentence_encoder(tokenizer))
        self.person: PersonSource | None = None  # frontal faces <-> captions naming a person (mklvisita.sources.person)
        if "person" in k.sources:
            if self.concepts is None or tokenizer is None:
                raise ConfigError("kernels.sources 'person' needs the concept sources and the tokenizer")
            self.person = PersonSource(k.person_classes, tokenizer, config.vision.mean, config.vision.std)
        self.scene_text: SceneTextReader | None = None  # words written in the image (mklvisita.sources.scene_text)
        if "scene_text" in k.sources:
            if tokenizer is None:
                raise ConfigError("kernels.sources 'scene_text' needs the tokenizer (the caption's words)")
            self.scene_text = SceneTextReader(config.vision.mean, config.vision.std)
        self.colours: ColourNames | None = None
        if "colour" in k.sources:
            if tokenizer is None:
                raise ConfigError("kernels.sources 'colour' needs the tokenizer (its colour words); load the folder")
            v = config.vision
            self.colours = ColourNames(k.colour_sigma, k.colour_saliency_power, tokenizer, v.mean, v.std, v.pad_value)
        for encoder, frozen in ((self.vision, config.vision.frozen), (self.text, config.text.frozen)):
            if frozen:
                encoder.requires_grad_(False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.loss.temperature)))

        f = config.fusion
        self.fusion: HierarchicalFusion | None = None
        self.itm_head: nn.Linear | None = None
        self.itm_similarity_weight: nn.Parameter | None = None
        if f.enabled:
            levels = f.image_levels or _spread(f.layers, self.vision.depth)
            if len(levels) != f.layers:
                raise ConfigError(f"fusion.image_levels has {len(levels)} entries but fusion.layers = {f.layers}")
            bad = [lv for lv in levels if not -self.vision.depth <= lv < self.vision.depth]
            if bad:
                raise ConfigError(
                    f"fusion.image_levels {bad} out of range for an image encoder of {self.vision.depth} levels"
                )
            levels = [lv % self.vision.depth for lv in levels]
            n_local = len(k.functions) if "local" in k.sources else 0
            self.fusion = HierarchicalFusion(
                f,
                self.vision.width,
                dt,
                levels,
                n_local,
                self.vision.num_prefix_tokens,
                image_widths=[self.vision.widths[lv] for lv in levels],
                image_grids=[self.vision.grids[lv] for lv in levels],
            )
            self.itm_head = nn.Linear(f.width, 2)
            # Weight of S in the match logit (S is within [-1, 1]; 5 makes a 0.4 gap in S worth 2 nats at init).
            self.itm_similarity_weight = nn.Parameter(torch.tensor(5.0)) if f.itm_similarity else None
        self.image_levels = sorted(
            {self.image_mid_level, self.vision.depth - 1, *(self.fusion.image_levels if self.fusion else [])}
        )
        # Training-time dense supervision (loss.patch_weight): one linear head per attribute over the last level's
        # patch tokens. Kept in the checkpoint (a release can be fine-tuned further); unused at inference.
        self.patch_heads: nn.ModuleList | None = None
        if config.loss.patch_weight > 0:
            width = self.vision.widths[-1]
            self.patch_heads = nn.ModuleList([nn.Linear(width, n) for n in config.loss.patch_classes])
        # Training-time relation verdicts (loss.relation_weight): holds / does not, from a relation word's fused state.
        self.relation_head: nn.Linear | None = None
        if config.loss.relation_weight > 0 and self.fusion is not None:
            self.relation_head = nn.Linear(config.fusion.width, 1)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise CheckpointError("this model has no tokenizer; load it with MKLVisITA.from_pretrained(folder)")
        return self._tokenizer

    @property
    def kernel_names(self) -> list[str]:
        return list(self.kernels.names)

    @property
    def has_itm(self) -> bool:
        return self.fusion is not None

    @property
    def fusion_levels(self) -> list[int]:
        """The image-encoder level each fusion layer reads, one per fusion layer ([] without fusion)."""
        return list(self.fusion.image_levels) if self.fusion is not None else []

    def kernel_weights(self) -> torch.Tensor:
        """The learned global kernel weights beta (M,)."""
        return self.kernels.weights()

    def fusion_kernel_weights(self) -> torch.Tensor | None:
        """Each fusion layer's weights over the local kernels (L, n), or None without fusion / affinity bias."""
        if self.fusion is None or not self.fusion.use_bias:
            return None
        return self.fusion.level_weights()

    @property
    def local_kernel_names(self) -> list[str]:
        return [n for n in self.kernels.names if n.startswith("local/")]

    # ------------------------------------------------------------------------------------------- encoders
    def encode_image(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> ImageFeatures:
        """Level tokens and pooled feature; ``output_attentions`` adds the ViT (or hybrid) blocks' attention
        probabilities, (B, heads, N, N) per block (a ValueError for a CNN backbone, which has none)."""
        out = self.vision(pixel_values, self.image_levels, output_attentions=output_attentions)
        cells = None if self.colours is None else self.colours.cells(pixel_values, tuple(self.vision.grids[-1]))
        faces = None if self.person is None else self.person.face_cells(pixel_values, tuple(self.vision.grids[-1]))
        scene = {} if self.scene_text is None else self.scene_text.features(pixel_values, tuple(self.vision.grids[-1]))
        return ImageFeatures(
            out.levels,
            out.pooled,
            out.attentions,
            out.backbone_map,
            out.backbone_pooled,
            cells,
            faces,
            scene.get("words"),
            scene.get("mask"),
            scene.get("cells"),
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        levels, pooled = self.text(input_ids, attention_mask, [self.text_mid_level])
        attention_mask = attention_mask.long()
        word = attention_mask.bool().clone()
        word[:, 0] = False  # [CLS]
        last = attention_mask.sum(-1) - 1  # position of [SEP]
        word[torch.arange(word.shape[0], device=word.device), last] = False
        colour = None if self.colours is None else self.colours.token_colours(input_ids, word)
        scene = None
        if self.scene_text is not None:
            scene = caption_word_vectors(self.tokenizer, input_ids, word).to(pooled.device)
        person = None if self.person is None else self.person.token_mass(input_ids, word)
        return TextFeatures(levels, pooled, attention_mask, word, colour, scene, person)

    def _image_sources(self, img: ImageFeatures) -> dict[str, torch.Tensor]:
        p = self.vision.num_prefix_tokens
        last = img.levels[self.vision.depth - 1]
        out = {"global": img.pooled, "mid": img.levels[self.image_mid_level][:, p:].mean(1), "local": last[:, p:]}
        if self.concepts is not None:
            if img.backbone_pooled is None:
                raise ConfigError("concept kernels need a CNN (or hybrid) image encoder with an ImageNet head")
            out |= self.concepts.image_features(img.backbone_pooled, img.backbone_map)
        if self.colours is not None:
            if img.backbone_map is None or img.colour_cells is None:
                raise ConfigError("kernels.sources 'colour' needs a CNN (or hybrid) image encoder (its final map)")
            out |= self.colours.image_features(img.colour_cells, img.backbone_map)
        if self.person is not None:
            if img.faces is None:
                raise ConfigError("kernels.sources 'person' needs the image's faces: encode it with encode_image")
            out |= self.person.image_features(img.faces)
        if self.scene_text is not None:
            if img.scene_words is None:
                raise ConfigError("kernels.sources 'scene_text' needs the image read: encode it with encode_image")
            out["scene_text"], out["scene_text_mask"], out["scene_text_cells"] = (
                img.scene_words,
                img.scene_mask,
                img.scene_cells,
            )
        return out

    def _text_sources(self, txt: TextFeatures) -> dict[str, torch.Tensor]:
        mask = txt.attention_mask.unsqueeze(-1).float()
        mid = (txt.levels[self.text_mid_level] * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        last = txt.levels[self.text.depth - 1]
        out = {"global": txt.pooled, "mid": mid, "local": last}
        if self.concepts is not None:
            # Mean over every real token, [CLS] and [SEP] included: how sentence-transformers pools.
            sentence = (last * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)
            out |= self.concepts.text_features(sentence, last)
        if self.colours is not None:
            if txt.colour_tokens is None:
                raise ConfigError("kernels.sources 'colour' needs the caption's tokens: encode it with encode_text")
            out |= self.colours.text_features(txt.colour_tokens)
        if self.person is not None:
            if txt.person_tokens is None:
                raise ConfigError("kernels.sources 'person' needs the caption's tokens: encode it with encode_text")
            out |= self.person.text_features(out["concept_class"] ** 2, txt.person_tokens)
        if self.scene_text is not None:
            if txt.scene_words is None:
                raise ConfigError("kernels.sources 'scene_text' needs the caption's words: encode it with encode_text")
            out["scene_text"] = txt.scene_words
        return out

    # ---------------------------------------------------------------------------- weights from the packages
    def train(self, mode: bool = True) -> MKLVisITA:
        """Frozen backbones stay in eval mode (a CNN's batch-norm statistics must not drift while heads train)."""
        super().train(mode)
        for encoder, frozen in ((self.vision, self.config.vision.frozen), (self.text, self.config.text.frozen)):
            if frozen:
                encoder.eval()
        return self

    def external_weight_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes that come from installed packages (frozen backbones) and are not saved."""
        prefixes = []
        if self.config.vision.frozen and self.config.vision.weights:
            prefixes.append("vision.model.")
            if self.concepts is not None:
                prefixes += ["concepts.class_weight", "concepts.class_bias"]
        if self.config.text.frozen and self.config.text.weights:
            prefixes.append("text.model.")
        return tuple(prefixes)

    def zero_start_keys(self) -> set[str]:
        """State-dict keys of modules that leave the model's function unchanged when new: ``fusion.word_positions``'
        offset projections (they start at zero) and the training-time relation head. Fine-tuning a checkpoint
        trained without them (``init_from``) starts them fresh; every other weight must come from the checkpoint."""
        keys = {k for k in self.state_dict() if k.startswith("fusion.layers.") and ".rel_pos." in k}
        return keys | {k for k in self.state_dict() if k.startswith("relation_head.")}  # training-time only

    def fill_external_weights(self) -> None:
        """Load the frozen backbones (and the concept classifier) from their packages, sha256 checked, strictly."""
        from safetensors.torch import load_file as load_safetensors

        from .pretrained import text_model_folder, vision_state_dict

        prefixes = self.external_weight_prefixes()
        if "vision.model." in prefixes:
            state = vision_state_dict(self.config.vision.weights, self.config.vision.model_name)
            own = self.vision.model.state_dict()
            self.vision.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
            if self.concepts is not None:
                self.concepts.load_classifier(state, self.vision.model.pretrained_cfg.get("classifier", "classifier"))
        if "text.model." in prefixes:
            folder = text_model_folder(self.config.text.weights)
            state = load_safetensors(str(folder / "model.safetensors"))
            own = self.text.model.state_dict()
            self.text.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)

    def _fill_concept_classifier(self) -> None:
        from .pretrained import vision_state_dict

        state = vision_state_dict(self.config.vision.weights, self.config.vision.model_name)
        self.concepts.load_classifier(state, self.vision.model.pretrained_cfg.get("classifier", "classifier"))

    def _sentence_encoder(self, tokenizer):
        """texts -> mean-pooled last-layer embeddings (B, D) of this model's text encoder (class prompts)."""

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
            last = self.text.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            return (last * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)

        return encode

    def embed_image(self, img: ImageFeatures) -> KernelEmbeddings:
        """Every base kernel's image-side projection; cache these for retrieval."""
        return self.kernels.embed_image(self._image_sources(img))

    def embed_text(self, txt: TextFeatures) -> KernelEmbeddings:
        """Every base kernel's text-side projection; local features cover every position, words marked."""
        return self.kernels.embed_text(self._text_sources(txt), txt.word_mask)

    # -------------------------------------------------------------------------------------------- scoring
    def similarity(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool = False) -> SimilarityOutput:
        """Multi-kernel similarity for all pairs (Bi, Bt), or image k with text k when ``pairwise``."""
        return self.kernels(img, txt, pairwise)

    def match(
        self,
        img: ImageFeatures,
        txt: TextFeatures,
        img_emb: KernelEmbeddings | None = None,
        txt_emb: KernelEmbeddings | None = None,
        image_index: torch.Tensor | None = None,
        output_attentions: bool = True,
    ) -> MatchOutput:
        """ITM for image k with text k through the fusion layers; attentions come back for explanations.

        ``image_index`` (B,): pair k is image ``image_index[k]`` of ``img`` / ``img_emb`` (the fusion's
        caption-independent work runs once per image); None = image k. ``output_attentions=False`` returns no
        attention maps (cheaper: fused attention, [CLS]-only last layer).
        """
        if self.fusion is None:
            raise RuntimeError("this model has no fusion/ITM branch (fusion.enabled = false); use similarity()")
        affinity = None
        if self.fusion.use_bias or self.itm_similarity_weight is not None:
            img_emb = self.embed_image(img) if img_emb is None else img_emb
            txt_emb = self.embed_text(txt) if txt_emb is None else txt_emb
            if image_index is not None:
                img_emb = img_emb.select(image_index)
        if self.fusion.use_bias:
            maps: list[torch.Tensor] = []  # the local kernels' word x patch maps (B, n, T, P), once for every layer

            def affinity(weights: torch.Tensor) -> torch.Tensor:
                if not maps:
                    word = txt_emb.local_mask[:, None, :, None]  # rows of [CLS]/[SEP]/padding get no bias
                    maps.append(self.kernels.local_kernel_maps(img_emb, txt_emb) * word)
                return torch.einsum("bntp,n->btp", maps[0], weights)  # (B, T, P): this layer's mix of the kernels

        out = self.fusion(
            img.levels, txt.levels[self.text.depth - 1], txt.attention_mask, affinity, image_index, output_attentions
        )
        logits = self.itm_head(out.cls)  # (B, 2)
        if self.itm_similarity_weight is not None:
            s = self.similarity(img_emb, txt_emb, pairwise=True).similarity  # (B,)
            logits = logits + torch.stack([torch.zeros_like(s), self.itm_similarity_weight * s], -1)
        return MatchOutput(logits, logits.softmax(-1)[:, 1], out.attentions, out.last_input)

    # ------------------------------------------------------------------------------------------- training
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        neg_input_ids: torch.Tensor | None = None,
        neg_attention_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        positives: torch.Tensor | None = None,
        patch_labels: torch.Tensor | None = None,
        word_targets: torch.Tensor | None = None,
        relation_targets: torch.Tensor | None = None,
    ) -> MKLVisITAOutput:
        """Caption i describes image i; the losses are computed when ``return_loss``.

        Args:
            image_ids: (B,) captions of the same image are positives of each other (coarse form of ``positives``).
            neg_input_ids, neg_attention_mask: one hard-negative caption per image (e.g. attributes swapped).
            positives: (B, B) bool, [i, j] = caption j is true of image i (the task knows: shapes claims that
                hold, identical captions). ITC spreads its targets over them and ITM never samples one as a
                negative. With it, each image's own dataset negative is its only extra ITC distractor (another
                image's negative may be true of it).
            patch_labels: (B, A, P) long, each patch's attribute classes (with ``loss.patch_weight``).
            word_targets: (B, T, P) float, for each word that names an object a distribution over that object's
                patches (zero rows elsewhere), for the grounding loss (with ``loss.grounding_weight``).
            relation_targets: (B, 2, T) long, for the relation word of caption i (row 0) and of its hard negative
                (row 1): 1 = the relation holds, 0 = it does not, -1 = no target (with ``loss.relation_weight``).
        """
        cfg = self.config.loss
        img, txt = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        ei, et = self.embed_image(img), self.embed_text(txt)
        sim = self.similarity(ei, et)
        entropy = self.kernels.entropy(sim.weights)
        logs = {"kernel_entropy": float(entropy.detach()), "logit_scale": float(self.logit_scale.detach().exp())}
        if not return_loss:
            return MKLVisITAOutput(None, {}, sim.similarity, sim.contributions, sim.weights, logs)

        b = pixel_values.shape[0]
        ar = torch.arange(b, device=pixel_values.device)
        pos = positives_mask(b, image_ids, positives, pixel_values.device)
        neg = en = None
        if neg_input_ids is not None:
            neg = self.encode_text(neg_input_ids, neg_attention_mask)
            en = self.embed_text(neg)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        extra = extra_mask = None
        if en is not None and cfg.hard_negative_itc:
            extra = self.similarity(ei, en).similarity  # (B, B): image i x negative caption j
            extra_mask = torch.eye(b, dtype=torch.bool, device=ar.device) if positives is not None else None
        losses = {
            "itc": itc_loss(sim.similarity, scale, extra_text_similarity=extra, positives=pos, extra_mask=extra_mask),
            "entropy": kernel_entropy_loss(entropy, self.kernels.num_kernels),
        }
        loss = cfg.itc_weight * losses["itc"] + cfg.entropy_weight * losses["entropy"]
        logs["positives_per_image"] = float(pos.float().sum(-1).mean())
        if self.patch_heads is not None and patch_labels is not None:
            tokens = img.levels[self.vision.depth - 1][:, self.vision.num_prefix_tokens :]  # (B, P, C)
            losses["patch"] = dense_attribute_loss(self.patch_heads, tokens, patch_labels)
            loss = loss + cfg.patch_weight * losses["patch"]

        if self.fusion is not None and cfg.itm_weight > 0:
            img_idx, txt_idx = [ar], [ar]  # positives first
            if cfg.itm_sampled != "none" and b > 1:
                scores = sim.similarity.detach()
                if cfg.itm_negatives == "random":
                    scores = torch.zeros_like(scores)  # uniform over the captions that are not true of the image
                neg_t, ok_i, neg_i, ok_t = sample_hard_negatives(scores, positives=pos)
                if cfg.itm_sampled in ("both", "text"):  # a hard caption for each image
                    img_idx.append(ar[ok_i])
                    txt_idx.append(neg_t[ok_i])
                if cfg.itm_sampled in ("both", "image"):  # a hard image for each caption
                    img_idx.append(neg_i[ok_t])
                    txt_idx.append(ar[ok_t])
            texts, t_embs = txt, et
            if neg is not None:  # the dataset's own hard negative caption of each image
                texts, t_embs = TextFeatures.cat([txt, neg]), KernelEmbeddings.cat([et, en])
                img_idx.append(ar)
                txt_idx.append(ar + b)
            if sum(len(i) for i in img_idx[1:]) == 0:  # positives only: nothing to discriminate
                return MKLVisITAOutput(loss, losses, sim.similarity, sim.contributions, sim.weights, logs)
            ii, tt = torch.cat(img_idx), torch.cat(txt_idx)
            m = self.match(img.select(ii), texts.select(tt), ei.select(ii), t_embs.select(tt))
            labels = torch.zeros(len(ii), dtype=torch.long, device=ii.device)
            labels[:b] = 1
            losses["itm"] = itm_loss(m.logits, labels)
            loss = loss + cfg.itm_weight * losses["itm"]
            if cfg.grounding_weight > 0 and word_targets is not None:  # the first b pairs are the positives
                t2i = [a.t2i[:b] for a in m.attentions]
                losses["grounding"] = grounding_loss(t2i, word_targets, self.vision.num_prefix_tokens)
                loss = loss + cfg.grounding_weight * losses["grounding"]
            if self.relation_head is not None and relation_targets is not None and m.text_states is not None:
                states = m.text_states[:b]  # the positives' captions, then (when given) the dataset negatives'
                targets = relation_targets[:, 0]
                if neg is not None:
                    states, targets = (
                        torch.cat([states, m.text_states[-b:]]),
                        torch.cat([targets, relation_targets[:, 1]]),
                    )
                t = min(states.shape[1], targets.shape[1])
                losses["relation"], acc = relation_loss(self.relation_head, states[:, :t], targets[:, :t])
                loss = loss + cfg.relation_weight * losses["relation"]
                if acc is not None:
                    logs["relation_acc"] = acc
            hit = m.logits.argmax(-1) == labels
            logs["itm_acc"] = float(hit.float().mean())
            logs["itm_acc_pos"] = float(hit[:b].float().mean())
            if neg is not None:
                logs["itm_acc_dataset_neg"] = float(hit[-b:].float().mean())
        return MKLVisITAOutput(loss, losses, sim.similarity, sim.contributions, sim.weights, logs)

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        files: dict[str, str | bytes] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Save crash-safely (:func:`mklvisita.checkpoint.save`): config.json + model.safetensors + tokenizer files,
        plus ``files`` by name (a card ``README.md``, ``metrics.json``); nothing of an older checkpoint is kept."""
        checkpoint.save(save_directory, self._save_pretrained, files)
        if push_to_hub:
            return self.push_to_hub(repo_id=repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """config.json + model.safetensors + tokenizer files into a fresh folder."""
        save_directory = Path(save_directory)
        # frozen backbones are skipped: the packages ship them
        checkpoint.save_weights(self, save_directory, skip=self.external_weight_prefixes())
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        self.tokenizer.save_pretrained(str(save_directory))
        # transformers 5 records how a tokenizer read from a folder was loaded ("is_local", "local_files_only"); a
        # release that says "local files only" would refuse the Hub when shared there, so those keys are not kept.
        tok_cfg = save_directory / "tokenizer_config.json"
        if tok_cfg.is_file():
            settings = json.loads(tok_cfg.read_text())
            if {"is_local", "local_files_only"} & settings.keys():
                kept = {k: v for k, v in settings.items() if k not in ("is_local", "local_files_only")}
                tok_cfg.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        map_location: str | torch.device = "cpu",
        **_: Any,
    ) -> MKLVisITA:
        """Load a checkpoint folder or Hub id (``revision`` pins a branch, tag or commit), strictly.

        Refused with a CheckpointError naming the problem: a missing file, a pickle weights file, an unknown or
        ill-typed config field, and any missing, unexpected or mis-shaped weight.
        """
        folder = resolve_checkpoint(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        config = read_config(folder)
        checkpoint.check_tokenizer_file(folder)
        try:
            tokenizer = load_tokenizer(str(folder))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{folder.name}: the tokenizer files could not be loaded ({type(e).__name__}); copy the tokenizer "
                "files of the run that trained the checkpoint, or save it again"
            ) from e
        # Build the architecture only: the weights come from the checkpoint, never from timm / the Hub.
        arch = copy.deepcopy(config)
        arch.vision.pretrained = False
        arch.text.pretrained = False
        if arch.text.backbone_config is None:
            raise CheckpointError(
                f"{folder.name}/{CONFIG_NAME}: text.backbone_config is missing; re-save the checkpoint"
            )
        model = cls(arch, tokenizer=tokenizer)
        model.config = config
        model.fill_external_weights()  # frozen backbones from their packages (sha256 checked); no-op otherwise
        load_weights_strict(model, folder / WEIGHTS_NAME, map_location, skip=model.external_weight_prefixes())
        return model.eval()


def _spread(n: int, depth: int) -> list[int]:
    """n fusion layers over an image encoder of `depth` levels, evenly spaced, the last one on the last level."""
    return [round((i + 1) * depth / n) - 1 for i in range(n)]


def _build_tokenizer(config: MKLVisITAConfig):
    if config.text.pretrained and config.text.weights:
        return load_tokenizer(str(text_weights_folder(config.text.weights)))  # the folder ships its tokenizer
    if config.text.model_name is None:
        return builtin_tokenizer(config.text.extra_vocabulary, config.text.max_length)
    return load_tokenizer(config.text.model_name)
