"""The typed run config: a YAML file under ``training/configs/`` plus ``key=value`` overrides.

    cfg = load_config("training/configs/shapes.yaml", ["optim.lr=3e-4", "model.vision.image_size=32"])

Keys are dotted paths into :class:`RunConfig` (``batch_size``, ``optim.lr``, ``data.train``, ...) or into the model
config (``model.fusion.enabled``), whose defaults come from the preset named by ``model_preset`` (the library's one
factory, :func:`mklvisita.config.create_config`: ``tiny``, ``base``, ``base-pretrained``, ...). Values are parsed as
YAML and checked against the field's type; an unknown key is an error that names it and suggests the closest known
keys. The resolved config is written with every run (``config.yaml`` and ``config.json`` in the output directory). A
YAML file may start from another with ``extends: <file>`` (the ablation configs extend ``shapes.yaml``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mklvisita.config import ConfigError, MKLVisITAConfig, create_config, load_dataclass
from mklvisita.presets import preset_names


class RunConfigError(ConfigError):
    """A run-config key is unknown or its value has the wrong type."""


@dataclass
class DataConfig:
    """What to train and evaluate on."""

    train: str = "shapes"  # shapes | shapes-compositional | karpathy:<json>:<root> | lavis:<json>:<root> | hf:<id>
    train_split: str = "train"  # split of `train` (Karpathy: "train" also takes "restval" where the reader offers it)
    train_size: int = 20000  # shapes only: number of procedurally generated training scenes
    shapes_seed: int = 0  # shapes only: the scene generator's seed (scenes are deterministic given it)
    cache_dir: str = ""  # shapes only: where training scenes are rendered once ("" = $MKLVISITA_CACHE or
    # ~/.cache/mklvisita); keyed by split, size, seed and image size, so runs share it
    eval: str = "shapes"  # spec evaluated during training; "" = no evaluation
    eval_split: str = "val"  # split of `eval` used during training (the final numbers come from training.evaluate)
    eval_limit: int = 200  # images evaluated during training (0 = the whole split)
    hard_negatives: bool = True  # feed each caption's hard-negative caption (shapes) to the ITM/ITC losses
    reverse_negatives: float = 0.0  # shapes only: share of relation captions trained against their reversed
    # relation ("left of" -> "right of") instead of the generator's negative (an attribute swap when one exists)
    undirected_relations: float = 0.0  # composites only: share of two-object relation captions that say "beside",
    # "next to" or "near", true in either order (no reversed negative, no relation verdict)
    photo_style: float = 0.0  # composites only: share of clip-art objects drawn photo-like (less saturated, shaded,
    # textured, slightly blurred; mklvisita.data.composites)
    num_workers: int = 0  # DataLoader workers for decoding + preprocessing
    feature_cache: bool = False  # frozen encoders only: keep each training image's and caption's encoder and source
    # features in memory after their first step (keyed by content; training.photo_cache), so later epochs run only
    # the trained parts (kernel weights, fusion, heads). Scenes must repeat: a fixed pool (data.train_size)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a cosine decay."""

    lr: float = 1e-4  # peak learning rate of the new (non-backbone) parameters
    backbone_lr_mult: float = 1.0  # the ViT and text encoder train at lr * this (lower for pretrained backbones)
    mix_lr_mult: float = 1.0  # the kernel-weight logits (beta, per-level mixes) train at lr * this: a handful of
    # scalars that otherwise barely leave the uniform start in a short run
    weight_decay: float = 0.02  # decoupled weight decay; not applied to biases, norms and scalars
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many optimizer steps
    min_lr_ratio: float = 0.0  # the cosine decays to lr * this at the last step
    grad_clip: float = 5.0  # clip the global gradient norm to this (0 = no clipping)


@dataclass
class EvalConfig:
    """Retrieval evaluation during training (and the defaults of training.evaluate)."""

    k: int | None = None  # re-rank the top k by the ITM head (0 = similarity only); None = the model's ranking.k
    itm_weight: float | None = None  # final score = itm_weight * ITM + similarity; None = the model's ranking
    batch_size: int = 64  # encoding batch size
    every_steps: int = 0  # also evaluate every N optimizer steps (0 = only at the end of each epoch)
    extra_metrics: bool = True  # also the task's extra metrics (shapes: phrase and word pointing games, minutes)


@dataclass
class RunConfig:
    """One training run. Steps are optimizer steps (one step = grad_accum_steps micro-batches)."""

    model_preset: str = "tiny"  # a preset of mklvisita.presets (tiny, base, ...): the config `model` is merged onto
    model: dict[str, Any] = field(default_factory=dict)  # nested overrides of MKLVisITAConfig fields
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    batch_size: int = 32  # captions per micro-batch per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    epochs: int = 1  # passes over the training pairs (used when max_steps is 0)
    max_steps: int = 0  # total optimizer steps; 0 = epochs * steps per epoch
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    find_unused_parameters: bool = True  # DDP: allow parameters that get no gradient in a step (small extra cost)
    save_every: int = 500  # accelerator.save_state every N optimizer steps (0 = never)
    keep_checkpoints: int = 2  # newest complete checkpoints kept on disk (0 = keep all)
    log_every: int = 10  # log losses to the trackers every N optimizer steps
    output_dir: str = "runs/shapes"  # checkpoints/, release/, logs/, config.yaml, metrics.json
    seed: int = 0  # seeds the model init, the data order (with the epoch) and dropout
    stop_after: int = 0  # stop (as if killed) after this many optimizer steps, no release; for tests (0 = off)
    init_from: str = ""  # fine-tune: start from this release folder's weights and tokenizer (the run's model config
    # must build the same architecture; the loss and ranking settings may differ); optimizer and schedule start fresh
    init_new: list[str] = field(default_factory=list)  # with init_from: state-dict prefixes of modules the checkpoint
    # lacks that start fresh (random init), e.g. ["fusion.", "itm_head."] to add a fusion branch to a dual encoder

    def model_config(self) -> MKLVisITAConfig:
        """The model config: the preset with ``model`` merged in (unknown fields raise)."""
        return MKLVisITAConfig.from_dict(_merge(_preset_dict(self.model_preset), self.model, "model"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def save(self, directory: str | Path) -> None:
        """Write the resolved config (the model section fully expanded) as config.yaml and config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        d["resolved_model"] = self.model_config().to_dict()
        (directory / "config.json").write_text(json.dumps(d, indent=2, default=list) + "\n")
        (directory / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(d, default=list)), sort_keys=False))


def _preset_dict(name: str) -> dict[str, Any]:
    """The model preset ``name`` from the library's one factory (:func:`mklvisita.config.create_config`)."""
    if name not in preset_names():
        raise RunConfigError(f"model_preset: unknown preset {name!r}; choose from {preset_names()}")
    return create_config(name).to_dict()


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    """Deep-merge ``over`` onto a copy of ``base``; a key absent from ``base`` is an error naming it."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        path = f"{where}.{key}"
        if key not in out:
            raise RunConfigError(_unknown(path, [f"{where}.{k}" for k in out]))
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, path)
        else:
            out[key] = value
    return out


# PyYAML follows YAML 1.1, where "1e-5" is a string; learning rates are written that way, so read them as floats.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _unknown(key: str, known: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close = list(dict.fromkeys(same_leaf + difflib.get_close_matches(key, known, n=3, cutoff=0.5)))[:3]
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"known keys: {', '.join(sorted(known))}"
    return f"unknown config key {key!r}; {hint}"


def _known_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _known_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _dotted(d: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _build(raw: dict[str, Any]) -> RunConfig:
    """Typed RunConfig through the library's strict loader (one loader for model and run configs)."""
    try:
        return load_dataclass(RunConfig, raw, "config")
    except ConfigError as e:
        raise RunConfigError(str(e)) from None


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise RunConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
    d[last] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings to a raw config mapping (validated later by :func:`from_dict`)."""
    raw = copy.deepcopy(raw)
    known = _known_keys(RunConfig)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RunConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        if key.startswith("model."):
            preset = raw.get("model_preset", RunConfig.model_preset)
            model_keys = _dotted(_preset_dict(preset), "model.")
            if key not in model_keys:
                raise RunConfigError(_unknown(key, model_keys))
        elif key not in known:
            raise RunConfigError(_unknown(key, known))
        # Strings stay verbatim for str fields ("data.train=hf:nlphuji/flickr30k" must not be parsed).
        tp = _field_type(key)
        value = text if tp is str else _yaml(text) if text.strip() else ""
        _set(raw, key, value)
    return raw


def _field_type(dotted: str) -> Any:
    cls: Any = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a typed, validated :class:`RunConfig` (the model section is checked against the preset too)."""
    cfg = _build(raw or {})
    cfg.model_config().validate()
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise RunConfigError(f"mixed_precision: expected no | fp16 | bf16, got {cfg.mixed_precision!r}")
    for name in ("batch_size", "grad_accum_steps"):
        if getattr(cfg, name) < 1:
            raise RunConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise RunConfigError("set max_steps or epochs to a positive number")
    if not 0.0 <= cfg.data.reverse_negatives <= 1.0:
        raise RunConfigError(f"data.reverse_negatives is a share: expected 0 to 1, got {cfg.data.reverse_negatives}")
    if not 0.0 <= cfg.data.undirected_relations <= 1.0:
        raise RunConfigError(
            f"data.undirected_relations is a share: expected 0 to 1, got {cfg.data.undirected_relations}"
        )
    if not 0.0 <= cfg.data.photo_style <= 1.0:
        raise RunConfigError(f"data.photo_style is a share: expected 0 to 1, got {cfg.data.photo_style}")
    return cfg


def _deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (
            _deep_update(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
        )
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a run-config file; ``extends: <file>`` (relative to this file) is read first and this
    file's keys are deep-merged onto it (sections merge key by key, lists and scalars replace)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {str(path)!r} not found; see training/configs/ for examples")
    raw = _yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path.name}: expected a mapping of config keys, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise RunConfigError(f"{path.name}: extends must name one YAML file, got {parent!r}")
    base_path = (path.parent / parent).resolve()
    if base_path in _seen:
        raise RunConfigError(f"{path.name}: extends loops back to {parent!r}")
    return _deep_update(read_yaml(base_path, (*_seen, path.resolve())), raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (None = defaults; ``extends:`` see :func:`read_yaml`) and apply ``key=value``
    overrides."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides or []))
