"""The feature-source interface and its registry (:mod:`mklvisita.sources` re-exports both).

A feature source turns an image and a caption into what kernels compare. It offers one or more *features* (the
names ``kernels.sources`` lists; most sources offer one, named like the source) and, for each, its kernels
(``"<feature>/<function>"``). The model, the kernels and the explanations iterate over sources by name and know
none of them; a new source is one new module that registers itself::

    @register_source
    class Brightness(FeatureSource):
        name = "brightness"
        features = ("brightness",)
        pooled_features = ("brightness",)
        ...

Decisions:
    - Two steps per side. ``encode_image`` / ``encode_text`` run with the encoders (they may read the pixels, the
      token ids and the encoders' outputs) and return the source's raw features, carried by source name in
      :class:`~mklvisita.features.ImageFeatures` / ``TextFeatures``. ``embed_image`` / ``embed_text`` project and
      normalise them into what retrieval caches (:class:`~mklvisita.kernels.KernelEmbeddings`). A source may read
      the raw features of the sources before it (``feats.sources``), e.g. the person source reads the concept
      source's caption class distribution.
    - Pooled features (one vector per item and kernel, ``(B, n_kernels, d)``, compared by a dot product) are scored
      by the kernels module, which also hands them to the retrieval cascade's first stage; a source scores its
      other features itself (:meth:`FeatureSource.kernel_values`), and gives word x cell maps for the features in
      ``map_features`` (:meth:`FeatureSource.word_maps`).
    - Order: sources in registration order (the built-in ones first, in :mod:`mklvisita.sources`), each one's
      features in the order it lists them. The order fixes the kernel names and the weights beta's layout, so it
      never depends on the order a config lists its sources in.
    - Work that needs only the model inputs (a detector in OpenCV or onnxruntime) may start before the image backbone
      and run beside it (:meth:`FeatureSource.prefetch_image`, :mod:`mklvisita.sources.overlap`); ``encode_image``
      itself may run beside the captions' encoder (:meth:`~mklvisita.model.MKLVisITA.start_encode_image`), so it
      reads nothing but its arguments and the sources before it.
    - Settings: each source's own dataclass (``config_class``), saved as ``kernels.options[<source name>]`` and read
      strictly (an unknown or ill-typed field is a ConfigError naming it); a model fills in every default, so a
      saved config.json holds every setting a source used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ConfigError, KernelConfig, VisionConfig, load_dataclass
from ..features import ImageFeatures, TextFeatures
from .overlap import Prefetch

_REGISTRY: dict[str, type[FeatureSource]] = {}  # source name -> class, in registration order


@dataclass
class SourceContext:
    """What a source may read when it is built."""

    kernels: KernelConfig  # the shared kernel settings (functions, proj_dim, initial kernel parameters)
    vision: nn.Module  # the image encoder (depth, widths, grids, pooled_width, num_prefix_tokens, model)
    text: nn.Module  # the text encoder (width, depth)
    image: VisionConfig  # preprocessing: mean, std, pad_value of the model inputs
    tokenizer: Any | None  # the caption tokenizer (None for a model built without one)
    built: dict[str, FeatureSource]  # the sources built before this one, by name


@dataclass
class SourceEmbeddings:
    """A source's embedded features: ``pooled`` by feature (B, n_kernels, d); ``other`` anything else it keeps."""

    pooled: dict[str, torch.Tensor]
    other: dict[str, torch.Tensor]


class FeatureSource(nn.Module):
    """One feature source (module docstring). Subclasses set the class attributes and override what they need."""

    name: ClassVar[str] = ""  # registry name; also the key of its features, embeddings and options
    features: ClassVar[tuple[str, ...]] = ()  # the features it offers (entries of kernels.sources), in order
    config_class: ClassVar[type | None] = None  # dataclass of its settings (kernels.options[name]); None = none
    pooled_features: ClassVar[tuple[str, ...]] = ()  # features compared as one vector per item (dot product)
    map_features: ClassVar[tuple[str, ...]] = ()  # features with word x cell maps (explanations)
    affinity_feature: ClassVar[str | None] = None  # a feature whose word x patch maps may bias the fusion

    def __init__(self, ctx: SourceContext, enabled: list[str], options: Any = None):
        super().__init__()
        self.enabled = [f for f in self.features if f in enabled]  # this model's features, in the source's order
        self.options = options
        self.functions = nn.ModuleDict()  # feature -> ModuleList of its kernel functions, one kernel each
        self.image_levels: tuple[int, ...] = ()  # image-encoder levels it reads (encoded for it)
        self.text_levels: tuple[int, ...] = ()  # text-encoder layers it reads

    def kernel_names(self) -> list[str]:
        return [f"{f}/{fn.name}" for f in self.enabled for fn in self.functions[f]]

    # --------------------------------------------------------------------------------------- hooks (optional)
    def build(self, encode_sentences: Callable[[list[str]], torch.Tensor]) -> None:
        """A new model (not a load): fill buffers that come from pretrained parts. ``encode_sentences``: texts (N,)
        -> the text encoder's mean-pooled last layer (N, D). Saved with the checkpoint, never recomputed on load."""

    def vision_weights(self) -> tuple[str, ...]:
        """Names of its tensors copied from the image backbone's package weights (not saved when the backbone is
        not)."""
        return ()

    def load_vision_weights(self, state: dict[str, torch.Tensor], classifier: str) -> None:
        """Copy :meth:`vision_weights` from the backbone package's state dict (``classifier``: its head's prefix)."""

    # ------------------------------------------------------------------------------------------- features
    def prefetch_image(self, pixel_values: torch.Tensor) -> Prefetch | None:
        """Optional: start the part of :meth:`encode_image` that needs only the model inputs, to run beside the image
        backbone (:func:`mklvisita.sources.overlap.start`, or ``start_torch`` for torch code). The model calls it
        before the backbone and passes what it returns to :meth:`encode_image` as ``prefetched`` (whose ``collect()``
        gives the result); a source that returns something takes that argument."""
        return None

    def encode_image(self, pixel_values: torch.Tensor, img: ImageFeatures) -> dict[str, torch.Tensor]:
        """Normalised model inputs (B, 3, H, W) and the encoder's output -> the raw image features (batch first)."""
        return {}

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        """Token ids (B, T) and the encoder's output -> the raw caption features (batch first)."""
        return {}

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        """Raw image features -> what the kernels compare (cached by retrieval)."""
        raise NotImplementedError

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        """Raw caption features and the word mask (B, T) -> what the kernels compare."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- kernels
    def kernel_values(
        self, feature: str, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor], pairwise: bool
    ) -> torch.Tensor:
        """A feature outside ``pooled_features``: its kernels' values, (Bi, Bt, n) all pairs or (B, n) pairwise,
        from this source's ``other`` embeddings of each side."""
        raise NotImplementedError(f"source {self.name!r} does not score feature {feature!r}")

    def word_maps(self, feature: str, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor]) -> torch.Tensor:
        """A feature in ``map_features``: word x cell values of its kernels for paired inputs, (B, n, T, P)."""
        raise NotImplementedError(f"source {self.name!r} has no word maps for {feature!r}")

    def affinity_maps(self, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``affinity_feature``'s word x patch maps for paired inputs, (B, n, T, P), zero on rows that are not
        words: the fusion's attention bias."""
        raise NotImplementedError(f"source {self.name!r} gives no fusion affinity")


# ---------------------------------------------------------------------------------------------------- registry
def register_source(cls: type[FeatureSource]) -> type[FeatureSource]:
    """Class decorator: make a source available to ``kernels.sources`` under its features' names."""
    if not cls.name or not cls.features:
        raise ValueError(f"{cls.__name__}: a feature source needs a name and at least one feature")
    taken = {f: n for n, c in _REGISTRY.items() if n != cls.name for f in (c.name, *c.features)}
    clash = [f for f in (cls.name, *cls.features) if f in taken]
    if clash:
        raise ValueError(f"{cls.__name__}: {clash[0]!r} is already a feature of source {taken[clash[0]]!r}")
    _REGISTRY[cls.name] = cls  # registering a name again replaces it in place (a module reloaded)
    return cls


def available_features() -> list[str]:
    """Every feature ``kernels.sources`` may name, in kernel order."""
    return [f for cls in _REGISTRY.values() for f in cls.features]


def source_classes(features: list[str]) -> list[type[FeatureSource]]:
    """The registered sources offering ``features`` (kernels.sources), in registration order; unknown names raise."""
    known = available_features()
    for f in features:
        if f not in known:
            raise ConfigError(f"kernels.sources: unknown source {f!r}; choose from {known}")
    return [cls for cls in _REGISTRY.values() if any(f in features for f in cls.features)]


def source_options(cls: type[FeatureSource], kernels: KernelConfig) -> Any:
    """``kernels.options[cls.name]`` read strictly into the source's config class (defaults where absent)."""
    given = kernels.options.get(cls.name, {})
    if cls.config_class is None:
        if given:
            raise ConfigError(f"kernels.options.{cls.name}: source {cls.name!r} takes no options")
        return None
    options = load_dataclass(cls.config_class, given, f"kernels.options.{cls.name}")
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return options


def build_sources(ctx: SourceContext) -> list[FeatureSource]:
    """Every source ``ctx.kernels.sources`` names, built in kernel order; ``ctx.kernels.options`` is rewritten to
    hold each one's full settings (unknown option sections raise)."""
    k = ctx.kernels
    classes = source_classes(k.sources)
    unused = sorted(set(k.options) - {c.name for c in classes})
    if unused:
        raise ConfigError(f"kernels.options.{unused[0]}: no source {unused[0]!r} in kernels.sources ({k.sources})")
    options = {}
    for cls in classes:
        opts = source_options(cls, k)
        source = cls(ctx, list(k.sources), opts)
        ctx.built[cls.name] = source
        if opts is not None:
            options[cls.name] = dataclasses.asdict(opts)
    k.options = options
    return list(ctx.built.values())
