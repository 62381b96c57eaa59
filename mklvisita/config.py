"""Typed configuration for MKL-VisITA.

Every field carries a comment saying what it controls. A config round-trips through JSON (it is saved as
``config.json`` beside the weights); loading refuses unknown or ill-typed fields and names them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .presets import preset_names, preset_spec

KERNEL_FUNCTIONS = ("cosine", "poly", "rbf", "sigmoid")


class ConfigError(ValueError):
    """A config field is unknown, missing or of the wrong type."""


@dataclass
class VisionConfig:
    """The timm image encoder: a ViT, a CNN, or a hybrid (transformer blocks over a CNN's feature map)."""

    model_name: str = "vit_base_patch16_224"  # any timm model name (timm.create_model): a ViT or a CNN
    pretrained: bool = False  # load timm's pretrained weights (needs the network or a local file)
    pretrained_file: str | None = None  # local weights file for `pretrained` (offline / mirrored Hub weights)
    image_size: int = 224  # side of the square model input (images are letterboxed to it)
    patch_size: int | None = None  # override the model's patch size (random-init models only)
    width: int | None = None  # override embed_dim (random-init models only)
    depth: int | None = None  # override the number of blocks (random-init models only)
    heads: int | None = None  # override the number of attention heads (random-init models only)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation mean
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation std
    pad_value: tuple[int, int, int] = (0, 0, 0)  # RGB of the letterbox padding
    weights: str | None = None  # with `pretrained`: package:<pip name> | file:<path> | hf-hub:<repo id> (sha256
    # pinned for packages, see mklvisita.pretrained); None = timm's own source (or `pretrained_file`)
    timm_args: dict[str, Any] = field(default_factory=dict)  # more keyword arguments for timm.create_model (any
    # model's architecture overrides for random init, e.g. a small CNN's {"channels": [...]})
    frozen: bool = False  # never trained (eval mode, no gradients); with a package: `weights`, a release folder leaves
    # the backbone out and loading takes it from the package (sha256 checked)
    hybrid_layers: int = 0  # > 0 on a CNN: this many transformer blocks (CLS + position embeddings) over its final
    # feature map, as the hybrids of the ViT paper; the fusion levels are then these blocks
    hybrid_width: int | None = None  # width of the hybrid blocks; None = the CNN's final feature width
    hybrid_heads: int | None = None  # attention heads of the hybrid blocks; None = width // 64 (at least 1)
    level_grid: int = 0  # CNN: the side of the grid every feature stage but the last is resampled to (0 = the final
    # map's grid); e.g. 14 keeps EfficientNet's stride-16 stage at 224 px whole for the fusion's maps. The last level
    # stays the final map (the kernels' maps read its grid)
    conv_stem: tuple[int, ...] = ()  # ViT, random init: replace the patch projection by one stride-2 3x3 conv
    # (+ GroupNorm, GELU) per entry, of these widths, then a 1x1 conv to the ViT's width; needs
    # 2 ** len(conv_stem) == patch_size (an "early convolutions" stem, Xiao et al. 2021; same token grid)

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword overrides handed to ``timm.create_model``."""
        kw: dict[str, Any] = {"img_size": self.image_size, "num_classes": 0, **self.timm_args}
        for key, name in (
            ("patch_size", "patch_size"),
            ("width", "embed_dim"),
            ("depth", "depth"),
            ("heads", "num_heads"),
        ):
            if getattr(self, key) is not None:
                kw[name] = getattr(self, key)
        return kw


@dataclass
class TextConfig:
    """The transformers text encoder and its tokenizer."""

    model_name: str | None = None  # transformers id or local path; None = a BERT built from the sizes below
    pretrained: bool = False  # load the weights of `model_name` (else build from its config, random init)
    width: int = 768  # hidden size (built-in BERT only)
    layers: int = 12  # transformer layers (built-in BERT only)
    heads: int = 12  # attention heads (built-in BERT only)
    intermediate: int | None = None  # feed-forward size (built-in BERT only); None = 4 * width
    max_length: int = 32  # captions are truncated to this many tokens, [CLS] and [SEP] included
    extra_vocabulary: list[str] = field(default_factory=list)  # whole words added to the built-in tokenizer
    weights: str | None = None  # with `pretrained`: package:<pip name> | file:<folder> | hf-hub:<repo id> naming a
    # transformers folder (weights, config, tokenizer); loaded instead of `model_name`
    frozen: bool = False  # never trained (no gradients); with `weights`, a release folder leaves the encoder out and
    # loading takes it from `weights` (sha256 checked for packages)
    backbone_config: dict[str, Any] | None = None  # the encoder's transformers config, filled when the model is
    # built and saved with it, so a checkpoint rebuilds with no network (do not set by hand)


@dataclass
class KernelConfig:
    """The multi-kernel learning module: base kernels = the feature sources' features x their kernel functions."""

    sources: list[str] = field(default_factory=lambda: ["global", "local", "mid"])  # features to compare: names
    # offered by the registered feature sources (mklvisita.sources.available_features()); kernel order is the
    # registry's, whatever the order here
    functions: list[str] = field(default_factory=lambda: list(KERNEL_FUNCTIONS))  # kernel functions of the learned
    # token sources (global, mid, local), each with its own projections
    proj_dim: int = 256  # width of each base kernel's projection heads
    poly_degree: float = 2.0  # initial polynomial degree
    learn_poly_degree: bool = False  # make the polynomial degree learnable (kept >= 1)
    rbf_gamma: float = 1.0  # initial RBF gamma (learned as exp(theta) > 0)
    gate: bool = False  # pair-conditioned gate: beta(x, y) from the encoders' pooled features (else one global beta)
    map_shifts: int = 1  # explanations only: the kernels' word x cell maps averaged over map_shifts x map_shifts
    # copies of the input moved by k / map_shifts of a grid cell and realigned (mklvisita.explain); 1 = one pass.
    # Scores never use it.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # each source's own settings by source name
    # (its options dataclass in mklvisita.sources); a model fills in every default, so a saved config holds them all


@dataclass
class FusionConfig:
    """Hierarchical two-way cross-modal fusion (the ITM branch)."""

    enabled: bool = True  # False = a dual encoder (no fusion, no ITM): the paper's ablation baseline
    layers: int = 6  # fusion layers; layer l reads the image tokens of encoder level image_levels[l]
    width: int = 768  # fusion width
    heads: int = 12  # fusion attention heads
    mlp_ratio: float = 4.0  # feed-forward expansion
    dropout: float = 0.0  # dropout in attention and feed-forward
    image_levels: list[int] | None = None  # ViT block (0-based) feeding each fusion layer; None = evenly spaced
    affinity_bias: bool = True  # bias text->image attention logits by the local multi-kernel affinity
    image_positions: bool = False  # add each patch's fixed 2-D position (sin/cos, a learned projection per layer) to
    # the fusion's image stream, so relations ("left of", "above") compare where two words' objects are
    itm_similarity: bool = True  # add the pair's multi-kernel similarity (learned weight) to the ITM match logit, so
    # the matching head starts from what ITC knows and fusion learns what S cannot see (binding, relations)
    image_pool: int = 1  # > 1: the caption-aware image update runs at p x p-pooled patches (the caption-independent
    # stream and the text->image maps stay at every patch); 1 = every token, the original (costly) fusion
    image_mlp_ratio: float | None = None  # feed-forward expansion of the image stream; None = mlp_ratio, 0 = none
    cross_first: bool = False  # text side of a layer: text->image cross-attention before the text self-attention, so
    # what each word read of the image (where its object is) is compared across words in the same layer (relations)
    word_positions: bool = False  # track where each word looks (the centroid of its text->image attention over the
    # patch grid) and give the text self-attention relative offsets between those places (relations: "left of"
    # compares where two words' objects are); zero-initialised, so a checkpoint without it fine-tunes from as it was
    itm_head_scale: float = 1.0  # factor on the ITM head's fused-[CLS] logits before S and the relation evidence join
    # them: a calibration for a domain the head was not trained on (the photo checkpoint's head learned on clip art),
    # chosen after training on held-out tune data (training.photo_fusion_tune); 1 = as trained
    affinity_bias_scale: float = 1.0  # factor on the affinity bias (every layer's learned bias_scale times this) at
    # serving: how much the words' attention follows the concept maps on a domain the fusion was not trained on (the
    # photo checkpoint's fusion learned on clip art, while the ImageNet classifier behind those maps was trained on
    # photographs); chosen after training on held-out tune data (training.photo_fusion_tune), 1 = as trained
    explain_method: str = "gradcam"  # the per-word maps Matcher.explain and the demo show by default: "gradcam"
    # (Grad-CAM of the match logit, ALBEF's) or "attention" (the words' raw text->image attention); both stay available.
    # Chosen at release by phrase pointing on held-out tune data (training.photo_fusion_tune for the photo checkpoint)
    reader_head_nouns: bool = False  # the relation reader places each named object where the LAST word piece of its
    # object words looks (an English noun phrase ends in its head noun: "a plumber's wrench"), instead of where all
    # of them look on average (adjectives and modifiers' pieces look elsewhere); chosen after training on held-out
    # tune data (training.photo_fusion_tune), no weight changes
    reader_attention_power: float = 1.0  # the relation reader's centroids weigh each image token by its last-layer
    # text->image attention raised to this power (renormalised): > 1 looks at where a word looks most rather than at
    # the mean of a spread map; chosen after training on held-out tune data, no weight changes; 1 = as trained
    relation_reader: bool = False  # a spatial-relation verdict in the ITM logit (fusion.RelationReader): each word's
    # object-word and relation-word gates and a direction from its fused state, the centroids of where the object words
    # before and after it look; needs word_positions. Off = the ITM head alone (a checkpoint without it loads as it was)


@dataclass
class LossConfig:
    """Loss weights and the contrastive temperature."""

    itc_weight: float = 1.0  # symmetric InfoNCE on the multi-kernel similarity
    itm_weight: float = 1.0  # binary matching on fused CLS with hard negatives
    entropy_weight: float = 0.01  # kernel-entropy regulariser (pushes beta away from a single kernel)
    temperature: float = 0.07  # initial ITC temperature (learned)
    itm_negatives: str = "hard"  # ITM negatives from the batch: "hard" = sampled from S (ALBEF), "random" = uniform.
    # Use "random" where a caption can be true of other images of the batch ("three shapes"): S-hard negatives of
    # such captions are often true matches, and the mislabelled pairs stall ITM.
    hard_negative_itc: bool = True  # extra hard-negative captions (when given) also enter ITC as distractors
    itm_sampled: str = "both"  # negatives sampled from the batch for ITM besides the dataset's own hard negative:
    # "both" = a caption per image and an image per caption (ALBEF), "text", "image" or "none" (pos : dataset 1:1)
    patch_weight: float = 0.0  # dense supervision where the data has object masks (shapes): each patch of the last
    # image level classifies its object's attributes (or background) through a small training-time linear head
    patch_classes: list[int] = field(default_factory=list)  # classes of each attribute head, background included
    relation_weight: float = 0.0  # relation verdicts where the data knows them (shapes): the relation word of a
    # true caption ("left" in "a red circle to the left of a blue square") and of its reversed hard negative is
    # classified holds / does not hold from its fused state entering the last fusion layer (the state the last
    # layer's [CLS] reads), by a training-time linear head; the comparison is learned where the roles are visible
    grounding_weight: float = 0.0  # word grounding where the data says which object a word names (shapes): the
    # word's text->image attention (every fusion layer, mean over heads) is pulled toward that object's patches


@dataclass
class RankingConfig:
    """The ranking rule, one owner: Match, Matrix, Search, evaluation and training-time evaluation all read it.

    final score = itm_weight * ITM + similarity_weight * S. Retrieval is a cascade: the global kernels (one matrix
    product) keep ``candidates`` per query, the full multi-kernel S re-scores those, ITM re-ranks the top ``k``.
    """

    itm_weight: float = 1.0  # weight of the ITM match probability in the final score (ignored without fusion)
    similarity_weight: float = 1.0  # weight of the multi-kernel similarity S in the final score
    k: int = 16  # ITM re-ranks the top k per query (0 = similarity only)
    candidates: int = 128  # cascade stage 1: global kernels keep this many per query (0 = all: exhaustive S)


@dataclass
class MKLVisITAConfig:
    """The whole model. ``tiny()`` and ``base()`` are the two presets."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)  # how scores combine and how deep retrieval re-ranks

    @classmethod
    def tiny(cls) -> MKLVisITAConfig:
        """The ``tiny`` preset (:mod:`mklvisita.presets`): a random-init model small enough to train on a CPU in
        minutes (64 px, 8 px patches)."""
        return create_config("tiny")

    @classmethod
    def base(cls, pretrained: bool = False) -> MKLVisITAConfig:
        """The ``base`` preset (:mod:`mklvisita.presets`): ViT-B/16 + BERT-base sized. ``pretrained=True`` loads timm
        and Hub weights (needs the network)."""
        return create_config("base", pretrained=pretrained)

    @property
    def itm_score_weight(self) -> float:
        """Deprecated alias of ``ranking.itm_weight`` (configs saved before the ranking section)."""
        return self.ranking.itm_weight

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MKLVisITAConfig:
        """Build a config from nested dicts; unknown, missing-type or ill-typed fields raise ConfigError.

        Checkpoints written before the ``ranking`` section carry a top-level ``itm_score_weight``: it becomes
        ``ranking.itm_weight``.
        """
        if isinstance(data, dict) and "itm_score_weight" in data:
            data = dict(data)
            legacy = data.pop("itm_score_weight")
            data["ranking"] = {"itm_weight": legacy, **dict(data.get("ranking") or {})}
        return _from_dict(cls, data, "config")

    def validate(self) -> None:
        """Check cross-field constraints; raise ConfigError naming the field. The sources and their options are
        checked when a model builds them (:func:`mklvisita.sources.build_sources`)."""
        for f in self.kernels.functions:
            if f not in KERNEL_FUNCTIONS:
                raise ConfigError(f"kernels.functions: unknown function {f!r}; choose from {list(KERNEL_FUNCTIONS)}")
        if not 1 <= self.kernels.map_shifts <= 8:
            raise ConfigError(f"kernels.map_shifts must be 1 (one pass) to 8, not {self.kernels.map_shifts}")
        if not all(isinstance(v, dict) for v in self.kernels.options.values()):
            raise ConfigError("kernels.options: each source's settings must be a mapping of field -> value")
        if not self.kernels.sources or not self.kernels.functions:
            raise ConfigError("kernels.sources and kernels.functions must each name at least one entry")
        if self.fusion.enabled and self.fusion.width % self.fusion.heads:
            raise ConfigError(f"fusion.width ({self.fusion.width}) must be divisible by fusion.heads")
        if self.fusion.explain_method not in ("gradcam", "attention"):
            raise ConfigError(
                f"fusion.explain_method must be 'gradcam' or 'attention' (the fusion's own maps), "
                f"not {self.fusion.explain_method!r}"
            )
        if not 1.0 <= self.fusion.reader_attention_power <= 4.0:
            raise ConfigError(
                "fusion.reader_attention_power must be within [1, 4] (1 = as trained), "
                f"not {self.fusion.reader_attention_power}"
            )
        if not 0.0 <= self.fusion.affinity_bias_scale <= 10.0:
            raise ConfigError(
                "fusion.affinity_bias_scale must be within [0, 10] (1 = as trained), "
                f"not {self.fusion.affinity_bias_scale}"
            )
        if not 0.0 <= self.fusion.itm_head_scale <= 10.0:
            raise ConfigError(
                f"fusion.itm_head_scale must be within [0, 10] (1 = as trained), not {self.fusion.itm_head_scale}"
            )
        if self.loss.itm_sampled not in ("both", "text", "image", "none"):
            raise ConfigError(
                f"loss.itm_sampled must be 'both', 'text', 'image' or 'none', not {self.loss.itm_sampled!r}"
            )
        if self.loss.patch_weight > 0 and not self.loss.patch_classes:
            raise ConfigError("loss.patch_weight > 0 needs loss.patch_classes (classes of each attribute head)")
        if self.loss.itm_negatives not in ("hard", "random"):
            raise ConfigError(f"loss.itm_negatives must be 'hard' or 'random', not {self.loss.itm_negatives!r}")
        if self.text.max_length < 3:
            raise ConfigError("text.max_length must be at least 3 ([CLS], one word, [SEP])")


def load_dataclass(cls: type, data: Any, where: str = "config") -> Any:
    """The project's one strict dataclass loader (model configs here, run configs in ``training.config``): nested
    mappings -> ``cls``; an unknown field, or a value of the wrong type, is a :class:`ConfigError` naming its path."""
    return _from_dict(cls, data, where)


def create_config(name: str, **options: Any) -> MKLVisITAConfig:
    """The model config of the preset ``name`` with its ``options``: the one factory of presets
    (:mod:`mklvisita.presets`: ``tiny``, ``base`` (option ``pretrained``), ``base-pretrained``, ``default``; see
    :func:`mklvisita.presets.preset_names`).

    Raises:
        ConfigError: an unknown preset, an option the preset does not take, or a preset field the config lacks.
    """
    if name not in preset_names():
        raise ConfigError(f"unknown model preset {name!r}; choose from {preset_names()}")
    try:
        spec = preset_spec(name, **options)
    except TypeError as e:
        raise ConfigError(f"preset {name!r}: {e}") from e
    return MKLVisITAConfig.from_dict(spec)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, sorted(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {sorted(names)}"
        raise ConfigError(f"{where}.{k}: unknown config field{hint}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (JSON gives lists for tuples; ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value
