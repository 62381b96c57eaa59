"""The shapes task: generated scenes for training, their positives from claims, binding and pointing for evaluation.

Decisions:

- **Scenes are rendered once.** Training reads a disk cache of the scenes (:func:`cached_scenes`): uint8 pixels
  (N, S, S, 3), a per-pixel object label map (N, S, S) (0 = background, k + 1 = object k; masks are disjoint) and the
  scene structures (objects, claims, negatives), built once with a progress message and memory-mapped after that.
  The key is (split, size, seed, image size, captions per scene, objects, noise) plus a hash of the generator's
  source, so an edit of ``mklvisita/data/shapes.py`` never reads stale scenes. The folder is written under a
  temporary name and renamed when complete: an interrupted build is never read.
- **Cache location**: ``PairOptions.cache_dir``, else ``$MKLVISITA_CACHE``, else ``~/.cache/mklvisita``.
- **Positives from claims**: caption j is true of image i when ``holds(claim_j, objects_i)``; the diagonal holds
  by construction. Items carry ``claim``, ``scene_objects`` and ``image_size`` for it.
- **Negative kinds for evaluation**: the generator's swap / reverse / change, with a changed count ("two shapes" ->
  "three shapes") reported apart as ``count``.
- **Extra metrics**: the phrase pointing game (``pointing_acc``) and the word pointing game (``word_pointing_acc``:
  in each multi-object caption, the maps of each object's colour word and shape word must peak inside it).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.shapes import OPPOSITE, SHAPES_VOCABULARY, Claim, Desc, Scene, SceneObject, ShapesScenes, holds
from .base import EvalData, PairOptions, TaskError

VOCABULARY = SHAPES_VOCABULARY
# For the card of a model trained on this task (mklvisita.cards).
TRAINED_ON = (
    "procedurally generated shapes scenes only: coloured circles, squares, triangles, stars, crosses and diamonds on "
    "plain backgrounds, with captions about colour, size, count and left/right/above/below"
)
CANNOT_KNOW = "photographs and real objects: it has only ever seen coloured shapes on plain backgrounds"
CACHE_ENV = "MKLVISITA_CACHE"
CACHE_FORMAT = 2  # bump when the cache's files change
TEST_SIZE = 1000  # scenes of the held-out test splits (5 captions each)
SPLIT_OF_SPEC = {"shapes": None, "shapes-compositional": "test_compositional"}


# --------------------------------------------------------------------------------------------------- cache
@dataclass
class CachedScenes:
    """A ShapesScenes rendered once: everything its items hold, as arrays."""

    pixels: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N, S, S) uint8: 0 background, k + 1 object k
    scene_tuples: list[tuple]  # see _scene_tuple
    image_size: int

    def scene(self, index: int) -> Scene:
        return _scene(self.scene_tuples[index])


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mklvisita")


def build_once(folder: Path, build: Callable[[Path], None], what: str) -> Path:
    """``folder``, built by ``build(tmp)`` into a temp folder and renamed into place if it does not exist yet, so a
    killed build never leaves a half folder under the final name; ``what`` names it in the progress message."""
    if not folder.is_dir():
        print(f"{what}: rendering once into {folder}", file=sys.stderr)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same folder first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _generator_hash() -> str:
    from ..data import shapes

    return hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()[:12]


def cache_key(scenes: ShapesScenes) -> str:
    s = scenes
    return (
        f"{s.split}-n{s.size}-seed{s.seed}-px{s.image_size}-c{s.captions_per_image}-o{s.max_objects}"
        f"-z{s.noise_std:g}-{_generator_hash()}-f{CACHE_FORMAT}"
    )


# Scenes are pickled as plain tuples: unpickling 20,000 scenes of frozen dataclasses takes seconds, tuples a fraction.
def _claim_tuple(c: Claim) -> tuple:
    return (c.kind, tuple((d.shape, d.colour, d.size) for d in c.descs), c.relation, c.count, c.template)


def _claim(t: tuple) -> Claim:
    kind, descs, relation, count, template = t
    return Claim(kind, tuple(Desc(*d) for d in descs), relation, count, template)


def _scene_tuple(s: Scene) -> tuple:
    objects = tuple((o.shape, o.colour, o.size, o.cx, o.cy, o.radius, o.angle) for o in s.objects)
    claims = tuple(_claim_tuple(c) for c in s.claims)
    return objects, claims, tuple(_claim_tuple(c) for c in s.negative_claims), tuple(s.negative_kinds), s.background


def _scene(t: tuple) -> Scene:
    objects, claims, negatives, kinds, background = t
    return Scene(
        [SceneObject(*o) for o in objects],
        [_claim(c) for c in claims],
        [_claim(c) for c in negatives],
        list(kinds),
        background,
    )


def read_cache(folder: Path) -> tuple[np.ndarray, np.ndarray, list]:
    """(pixels, labels, scene structures) of a cache folder written by :func:`write_cache`, memory-mapped."""
    with (folder / "scenes.pkl").open("rb") as f:
        structures = pickle.load(f)  # written by write_cache, never downloaded
    return np.load(folder / "pixels.npy", mmap_mode="r"), np.load(folder / "labels.npy", mmap_mode="r"), structures


def write_cache(tmp: Path, n: int, size: int, render: Callable[[int], tuple[dict, Any]], what: str) -> None:
    """Render ``n`` items into ``tmp``: pixels (n, size, size, 3) and object labels (n, size, size) as uint8 .npy
    files (label k + 1 = the item's k-th object), and the pickled scene structures. ``render(i)`` gives (item,
    structure); ``what`` names the cache in the progress messages."""
    tmp.mkdir(parents=True)
    pixels = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    structures = []
    t0, every = time.perf_counter(), max(1, n // 10)
    for i in range(n):
        item, structure = render(i)
        pixels[i] = np.asarray(item["image"], dtype=np.uint8)
        for k, obj in enumerate(item["objects"]):
            labels[i][obj["mask"]] = k + 1
        structures.append(structure)
        if (i + 1) % every == 0 or i + 1 == n:
            print(f"{what}: {i + 1}/{n} scenes ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    pixels.flush()
    labels.flush()
    del pixels, labels
    with (tmp / "scenes.pkl").open("wb") as f:
        pickle.dump(structures, f, protocol=pickle.HIGHEST_PROTOCOL)


def _render_shapes(scenes: ShapesScenes, i: int) -> tuple[dict, Any]:
    scene = scenes.scene(i)
    return scenes.render(scene, i), _scene_tuple(scene)


def cached_scenes(scenes: ShapesScenes, cache_dir: str | os.PathLike | None = None) -> CachedScenes:
    """The scenes rendered into the cache (built on first use, with a progress message on stderr)."""
    folder = cache_root(cache_dir) / "shapes" / cache_key(scenes)
    render = partial(_render_shapes, scenes)
    write = partial(write_cache, n=len(scenes), size=scenes.image_size, render=render, what="shapes cache")
    build_once(folder, write, f"shapes cache: {len(scenes)} {scenes.split} scenes")
    return CachedScenes(*read_cache(folder), scenes.image_size)


def object_dicts(scene: Scene, labels: np.ndarray) -> list[dict[str, Any]]:
    """The ``objects`` entries of a rendered item, masks from the label map."""
    return [
        {
            "phrase": o.phrase,
            "mask": labels == k + 1,
            "colour": o.colour,
            "shape": o.shape,
            "size": o.size,
            "center": (o.cx, o.cy),
            "radius": o.radius,
        }
        for k, o in enumerate(scene.objects)
    ]


# -------------------------------------------------------------------------------------------------- training
class ShapesTrainPairs(Dataset):
    """Item i = caption ``i % C`` of scene ``i // C`` with its hard negative, read from the scene cache.

    Items: ``image`` (uint8 (S, S, 3)), ``caption``, ``negative``, ``image_id`` (the scene), ``claim``,
    ``scene_objects`` (the scene's :class:`SceneObject` list), ``objects`` (dicts with masks, as rendered items
    have) and ``image_size``.

    ``reverse_rate`` (training only): the generator mostly tries an attribute swap before a reversed relation, so a
    relation caption's negative is its reversal mainly when no swap exists (37 % of relation captions; about 12 % of
    all negatives, in training as in the test split). With probability ``reverse_rate`` (fixed per item: a seeded
    draw of its own, so scenes, cache and evaluation splits are unchanged) a relation caption's negative becomes
    the same caption with the opposite relation, unless that holds too ("a small square above a small square").
    """

    def __init__(
        self,
        split: str,
        size: int,
        seed: int,
        image_size: int = 64,
        cache_dir: str = "",
        reverse_rate: float = 0.0,
    ):
        if not 0.0 <= reverse_rate <= 1.0:
            raise ValueError(f"reverse_rate must be in [0, 1], got {reverse_rate}")
        self.scenes = ShapesScenes(split=split, size=size, seed=seed, image_size=image_size)
        self.per_scene = self.scenes.captions_per_image
        self.cache = cached_scenes(self.scenes, cache_dir)
        self.seed, self.reverse_rate = seed, reverse_rate

    def _negative(self, scene: Scene, k: int, index: int) -> Claim:
        claim, negative = scene.claims[k], scene.negative_claims[k]
        if self.reverse_rate <= 0 or claim.kind != "relation" or scene.negative_kinds[k] == "reverse":
            return negative
        if np.random.default_rng([self.seed, 7, index]).random() >= self.reverse_rate:
            return negative
        reversed_ = Claim("relation", claim.descs, OPPOSITE[claim.relation], template=claim.template)
        return negative if holds(reversed_, scene.objects, self.cache.image_size) else reversed_

    def __len__(self) -> int:
        return len(self.scenes) * self.per_scene

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene_index, k = divmod(index, self.per_scene)
        scene = self.cache.scene(scene_index)
        negative = self._negative(scene, k, index)
        return {
            "image": np.array(self.cache.pixels[scene_index]),  # a copy: torch must not see a read-only memmap
            "caption": scene.claims[k].text(),
            "negative": negative.text(),
            "image_id": scene_index,
            "claim": scene.claims[k],
            "negative_claim": negative,
            "scene_objects": scene.objects,
            "objects": object_dicts(scene, np.asarray(self.cache.labels[scene_index])),
            "image_size": self.cache.image_size,
        }


def train_pairs(spec: str, split: str, options: PairOptions) -> ShapesTrainPairs:
    if spec != "shapes":
        raise TaskError(f"{spec} is a held-out test split; train on 'shapes'")
    return ShapesTrainPairs(
        split, options.size, options.seed, options.image_size, options.cache_dir, options.reverse_rate
    )


def positives(items: list[dict[str, Any]]) -> torch.Tensor:
    """(B, B) bool: ``[i, j]`` = claim j holds for scene i (diagonal True)."""
    size = int(items[0]["image_size"])
    rows = [[holds(c["claim"], it["scene_objects"], size) for c in items] for it in items]
    pos = torch.tensor(rows, dtype=torch.bool)
    pos.diagonal().fill_(True)
    return pos


def dense_targets(
    items: list[dict[str, Any]], processor: Any, length: int, grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """``patch_labels`` (B, 3, P), ``word_targets`` (B, T, P) and ``relation_targets`` (B, 2, T) for the dense losses
    (mklvisita.data.grounding)."""
    from ..data.grounding import patch_attribute_labels, relation_word_targets, word_patch_targets

    labels, targets, relations = [], [], []
    for it in items:
        _, token_word = processor.words(it["caption"])
        token_word = (token_word + [None] * length)[:length]
        negative = it.get("negative_claim")
        _, neg_word = processor.words(it["negative"]) if negative is not None else ([], [])
        relations.append(
            np.stack(
                [
                    relation_word_targets(it["claim"], it["claim"], token_word),
                    relation_word_targets(it["claim"], negative, (neg_word + [None] * length)[:length]),
                ]
            )
        )
        labels.append(patch_attribute_labels(it["objects"], grid))
        masks = [o["mask"] for o in it["objects"]]
        targets.append(
            word_patch_targets(it["claim"], it["scene_objects"], masks, token_word, grid, int(it["image_size"]))
        )
    return {
        "patch_labels": torch.from_numpy(np.stack(labels)),
        "word_targets": torch.from_numpy(np.stack(targets)),
        "relation_targets": torch.from_numpy(np.stack(relations)),
    }


# ------------------------------------------------------------------------------------------------ evaluation
def negative_kind(claim: Claim, kind: str) -> str:
    """The generator's negative kind, with a changed count reported as ``count``."""
    return "count" if claim.kind == "count" else kind


def load_eval_data(spec: str, split: str = "test", limit: int = 0) -> Any:
    """``shapes`` (split ``test`` by default) or ``shapes-compositional``: 1,000 scenes x 5 captions, each caption
    with its hard negative and the negative's kind; ``limit`` > 0 keeps the first ``limit`` scenes."""
    from ..data import shapes_retrieval_set

    if spec not in SPLIT_OF_SPEC:
        raise TaskError(f"unknown shapes spec {spec!r}; use 'shapes' or 'shapes-compositional'")
    split = SPLIT_OF_SPEC[spec] or split
    size = limit if limit > 0 else TEST_SIZE
    rset = shapes_retrieval_set(split=split, size=size)
    scenes = ShapesScenes(split=split, size=size)
    structures = [scenes.scene(i) for i in range(size)]
    negatives = [n.text() for s in structures for n in s.negative_claims]
    kinds = [negative_kind(c, k) for s in structures for c, k in zip(s.claims, s.negative_kinds)]
    if len(negatives) != len(rset.captions):
        raise RuntimeError(f"shapes {split}: {len(negatives)} negatives for {len(rset.captions)} captions")
    return EvalData(
        spec, split, rset.images, list(rset.captions), rset.txt2img, negatives, scenes, negative_kinds=kinds, k=16
    )


def word_pointing_examples(scenes: ShapesScenes, n: int | None = None) -> Iterator[dict[str, Any]]:
    """Every caption that names two or more objects, with the colour word and the shape word of each named object
    as targets (whitespace word index, the object's mask), for :func:`mklvisita.pointing.word_pointing_game`."""
    from ..data.grounding import claim_assignment

    for i in range(len(scenes) if n is None else min(n, len(scenes))):
        scene = scenes.scene(i)
        claims = [c for c in scene.claims if len(c.descs) >= 2]
        if not claims:
            continue
        item = scenes.render(scene, i)
        for claim in claims:
            chosen = claim_assignment(claim, scene.objects, scenes.image_size)
            if chosen is None:  # cannot happen for a true generated caption
                continue
            words, cursor, targets = claim.text().split(), 0, []
            for desc, j in zip(claim.descs, chosen):
                phrase = desc.text().split()[1:]  # without the article
                start = next((s for s in range(cursor, len(words)) if words[s : s + len(phrase)] == phrase), None)
                if start is None:  # cannot happen for generator captions
                    break
                cursor = start + len(phrase)
                mask = item["objects"][j]["mask"]
                if desc.colour is not None:
                    targets.append((start + phrase.index(desc.colour), mask))
                targets.append((start + phrase.index(desc.shape), mask))
            yield {"image": item["image"], "caption": claim.text(), "targets": targets}


def extra_metrics(model: Any, processor: Any, data: Any) -> dict[str, float]:
    """Phrase pointing game (``pointing_acc``, ``pointing_chance``, per method) and word pointing game
    (``word_pointing_acc``, ``word_pointing_chance``, per method) on the evaluated scenes."""
    from ..pointing import pointing_game, word_pointing_game

    scenes = getattr(data, "source", None)
    if not isinstance(scenes, ShapesScenes):
        return {}
    return pointing_game(model, processor, scenes) | word_pointing_game(
        model, processor, word_pointing_examples(scenes)
    )
