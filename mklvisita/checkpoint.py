"""Checkpoint folders: crash-safe saving and strict loading.

Decisions:

* A checkpoint is one folder: ``config.json`` + ``model.safetensors`` + tokenizer files (``tokenizer.json``), and
  optionally ``README.md`` (card) and ``metrics.json``. A save writes *every* file of the new checkpoint; nothing of
  a previous checkpoint in the same place (its card, its metrics) survives a save.
* Crash-safe save (the swap protocol). Saving to ``<dir>``:

  1. write the whole new checkpoint into a sibling ``.<name>.tmp-<pid>-<random>`` folder and fsync every file
     and the folder;
  2. recover an interrupted earlier swap: if ``<dir>`` is missing and ``<dir>.old`` exists, rename it back;
     remove a stale ``<dir>.old`` when ``<dir>`` exists (it is a completed swap's leftover);
  3. ``rename(<dir>, <dir>.old)`` then ``rename(tmp, <dir>)`` (each atomic on one file system), fsync the parent;
  4. remove ``<dir>.old`` and stale temp folders of dead saves.

  A save killed while writing leaves its temp folder; one killed while removing ``<dir>.old`` leaves part of it.
  Both are removed by the next save (before it writes) and by the next load of ``<dir>``
  (:func:`clean_leftovers`): a temp folder once the process that made it is gone, ``<dir>.old`` once ``<dir>`` is a
  whole checkpoint and no live process is saving there (a live save keeps its temp folder until its swap is done).

  A process killed at any point leaves ``<dir>`` holding the old or the new checkpoint whole, or (killed between
  the two renames of step 3) no ``<dir>`` and the old checkpoint whole in ``<dir>.old``. The loader
  (:func:`resolve`) reads ``<dir>.old`` when ``<dir>`` is missing, and the next save renames it back, so a
  checkpoint is never lost. Two processes saving to the same folder at once are not supported.
* Strict load: refused with a :class:`CheckpointError` (a ValueError) that names the file and says what to do: a
  missing or pickle weights file, a missing or malformed ``tokenizer.json``, an unknown or ill-typed config field,
  any missing, unexpected, mis-shaped or non-finite (NaN/inf) weight. Messages name the file by its place inside
  the checkpoint (``<checkpoint name>/config.json``), never the server's absolute path.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, MKLVisITAConfig
from .tokenizer import load_tokenizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
OLD_SUFFIX = ".old"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md", *("*" + s for s in PICKLE_SUFFIXES)]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, not ours, or does not fit the model; the message names the problem."""


def _shown(path: Path) -> str:
    """A path as shown to users: the checkpoint folder's name and the file in it, never the server's full path."""
    path = Path(path)
    if path.name in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, "metrics.json", "README.md"):
        return f"{path.parent.name}/{path.name}"
    return path.name


# ------------------------------------------------------------------------------------------------------- saving
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some file systems cannot fsync a folder; the renames are still atomic there
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(dest: Path) -> bool:
    """Remove the temp folders of dead saves to ``dest``; True when a live process (this one included) is saving."""
    live = False
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _pid_alive(pid):
            live = True
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return live


def clean_leftovers(dest: str | os.PathLike) -> None:
    """Remove what killed saves left beside ``dest`` (module docstring): temp folders of dead processes, and
    ``<dest>.old`` when ``dest`` is whole and nobody is saving. Best effort: a read-only place is left as it is."""
    dest = Path(dest)
    if not dest.name:
        return
    old = dest.with_name(dest.name + OLD_SUFFIX)
    try:
        saving = _remove_stale_temps(dest)
        whole = (dest / CONFIG_NAME).is_file() and (dest / WEIGHTS_NAME).is_file()
        if not saving and whole and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass


def save(
    dest: str | os.PathLike,
    write: Callable[[Path], None],
    files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Save a checkpoint to ``dest`` crash-safely (see the module docstring): ``write(folder)`` writes the weights,
    config and tokenizer into a fresh folder; ``files`` adds more files by name (``README.md``, ``metrics.json``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest)  # a killed earlier save's temp folder would otherwise stay until this one completes
    old = dest.with_name(dest.name + OLD_SUFFIX)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        write(tmp)
        for name, content in (files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Recover an interrupted swap, then drop a completed swap's leftover.
    if not dest.exists() and old.is_dir():
        os.rename(old, dest)
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    _fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
    _remove_stale_temps(dest)
    return dest


# ------------------------------------------------------------------------------------------------------ loading
def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, **hub_kwargs) -> Path:
    """A local folder as is (or its ``.old`` copy left by a save killed mid-swap); anything else is a Hub id,
    downloaded (or taken from the cache) at ``revision``."""
    path = Path(name_or_path)
    if path.is_dir():
        clean_leftovers(path)
        return path
    if path.exists():
        raise CheckpointError(
            f"{path.name} is a file; a checkpoint is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    old = path.with_name(path.name + OLD_SUFFIX) if path.name else path
    if path.name and old.is_dir():
        return old  # a save was killed between its two renames: the previous checkpoint, whole
    name = str(name_or_path)
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1):
        raise CheckpointError(f"checkpoint folder not found: {path.name or name}")
    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS, **hub_kwargs)
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth); all mean "not available"
        raise CheckpointError(
            f"could not get checkpoint {name!r} (revision {revision or 'main'}) from the Hugging Face Hub: "
            f"{type(e).__name__}. Check the id, the revision and the network (HF_HUB_OFFLINE)."
        ) from e
    return Path(folder)


def read_config(folder: Path) -> MKLVisITAConfig:
    """The checkpoint's config, after checking the folder holds a complete, pickle-free checkpoint."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder.name} holds pickle weights ({', '.join(pickles)}); pickle can run code when loaded and is "
            f"refused. Convert the weights to {WEIGHTS_NAME}."
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"{folder.name} has no {name}: it is not a complete MKL-VisITA checkpoint; save it again with "
                "save_pretrained"
            )
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{_shown(folder / CONFIG_NAME)} is not valid JSON ({e})") from e
    try:
        config = MKLVisITAConfig.from_dict(data)
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{_shown(folder / CONFIG_NAME)}: {e}") from e
    return config


def check_tokenizer_file(folder: Path) -> None:
    """``tokenizer.json`` must exist and be a tokenizer: without it a model would read every word as [UNK]."""
    file = folder / TOKENIZER_NAME
    if not file.is_file():
        raise CheckpointError(
            f"{folder.name} has no {TOKENIZER_NAME}: without its tokenizer the model cannot read captions. Copy "
            "the tokenizer files of the run that trained it into the folder, or save the checkpoint again."
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{_shown(file)} is not valid JSON ({e}); save the checkpoint again") from e
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not model.get("vocab"):
        raise CheckpointError(
            f"{_shown(file)} is not a tokenizer (no model vocabulary); copy the tokenizer files of the run that "
            "trained the checkpoint, or save it again"
        )


def load_weights_strict(
    model: nn.Module, file: Path, map_location: str | torch.device = "cpu", skip: tuple[str, ...] = ()
) -> None:
    """Every weight of ``model`` except those under ``skip`` (filled from packages) must be in ``file``, finite."""
    try:
        state = load_file(str(file), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{_shown(file)} could not be read as safetensors ({e}); the file is damaged or incomplete"
        ) from e
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing weights: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_few(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped weights: {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{_shown(file)} does not fit the model of its config.json; " + "; ".join(problems))
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(
            f"{_shown(file)} holds non-finite (NaN or inf) weights: {_few(bad)}; the training run diverged or the "
            "file is damaged. Use an earlier checkpoint of the run."
        )
    # Checked above: exactly the expected keys; the skipped ones were filled from their packages.
    model.load_state_dict(state, strict=not skip)


def save_weights(model: nn.Module, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """``model.safetensors`` with every weight except those under ``skip`` (frozen backbones the packages ship)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "library": "mklvisita"})


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------------------ model folders
def write_model(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors + tokenizer files of an MKL-VisITA model into a fresh folder; weights that
    installed packages ship (``model.external_weight_prefixes()``: frozen backbones) are left out."""
    folder = Path(folder)
    save_weights(model, folder, skip=model.external_weight_prefixes())
    (folder / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))
    model.tokenizer.save_pretrained(str(folder))
    # transformers 5 records how a tokenizer read from a folder was loaded ("is_local", "local_files_only"); a
    # release that says "local files only" would refuse the Hub when shared there, so those keys are not kept.
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        settings = json.loads(tok_cfg.read_text())
        if {"is_local", "local_files_only"} & settings.keys():
            kept = {k: v for k, v in settings.items() if k not in ("is_local", "local_files_only")}
            tok_cfg.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def load_model(
    cls: type,
    name_or_path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    source_options: dict[str, dict[str, Any]] | None = None,
    **resolve_kwargs,
) -> nn.Module:
    """Build ``cls`` (MKLVisITA) from a checkpoint folder or Hub id (:func:`resolve`), strictly: the architecture
    from config.json (never timm's or the Hub's weights), frozen backbones from their packages (sha256 checked),
    every other weight from model.safetensors. Problems are :class:`CheckpointError` naming the file.
    ``source_options`` (source name -> {setting: value}) are merged into the config's ``kernels.options`` first."""
    hub = ("revision", "cache_dir", "force_download", "token", "local_files_only")  # others are not ours: ignored
    folder = resolve(name_or_path, **{k: v for k, v in resolve_kwargs.items() if k in hub})
    config = read_config(folder)
    for source, settings in (source_options or {}).items():
        if not isinstance(settings, dict):
            raise ValueError(f"source_options[{source!r}] must map settings to values, not {settings!r}")
        if source not in config.kernels.options:
            known = sorted(config.kernels.options)
            raise ValueError(f"source_options: the checkpoint has no source {source!r} with settings (it has {known})")
        config.kernels.options[source] = config.kernels.options[source] | settings
    check_tokenizer_file(folder)
    try:
        tokenizer = load_tokenizer(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{folder.name}: the tokenizer files could not be loaded ({type(e).__name__}); copy the tokenizer "
            "files of the run that trained the checkpoint, or save it again"
        ) from e
    arch = copy.deepcopy(config)
    arch.vision.pretrained = False
    arch.text.pretrained = False
    if arch.text.backbone_config is None:
        raise CheckpointError(f"{folder.name}/{CONFIG_NAME}: text.backbone_config is missing; re-save the checkpoint")
    try:
        model = cls(arch, tokenizer=tokenizer)
    except ConfigError as e:  # a source or option the registry does not know
        raise CheckpointError(f"{_shown(folder / CONFIG_NAME)}: {e}") from e
    filled = model.config.kernels.options  # the sources' settings with their defaults filled in
    model.config = config
    model.config.kernels.options = filled
    model.fill_external_weights()  # frozen backbones from their packages (sha256 checked); no-op otherwise
    load_weights_strict(model, folder / WEIGHTS_NAME, map_location, skip=model.external_weight_prefixes())
    return model.eval()
