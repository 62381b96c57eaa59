"""The clip-art composites task: generated photo-like scenes for training the photo checkpoint's fusion, held-out
titles for validation.

Decisions:

- **Spec** ``composites`` (the scheme alone). Training reads split ``train`` (train titles only); evaluation reads
  ``test`` by default or ``val`` (both held-out titles, different seeds: :mod:`mklvisita.data.composites`).
- **Scenes are rendered once** into a disk cache, as the shapes task does (:func:`cached_scenes`): uint8 pixels
  (N, S, S, 3), a per-pixel object label map (N, S, S) (0 background, k + 1 object k) and the pickled scene
  structures, keyed by (split, size, seed, image size, captions per scene) and a hash of the generator's source,
  written under a temporary name and renamed when complete. Training then reads arrays: the pixels of a scene are
  the same every epoch, so frozen backbone features may be cached per scene index too.
- **Image size**: ``PairOptions.image_size`` when it is at least ``MIN_SIZE``; below that (the shapes default, 64) the
  composites use ``DEFAULT_SIZE`` (224, the photo checkpoint's input), since clip art at 64 px loses what it shows.
- **Positives from claims**: caption j is true of image i when ``holds(claim_j, objects_i)``; the diagonal holds by
  construction. Items carry ``claim``, ``scene_objects`` and ``image_size`` for it.
- **Dense targets** (:func:`dense_targets`): ``word_targets`` (B, T, P), each description word's object coverage as a
  distribution over the patch grid (the object the claim names: :func:`mklvisita.data.composites.assignment`), and
  ``relation_targets`` (B, 2, T): the relation words of a relation or sides caption 1, the same words of its
  reversed negative 0, -1 elsewhere (an undirected caption's "beside" too: no verdict, and the reader's relation
  gate learns that it is no relation word to read). No ``patch_labels``: clip art has no closed attribute set.
- **Extra metrics**: the phrase pointing game on the first ``POINTING_SCENES`` scenes (each object's phrase, "a red
  apple") and the word pointing game (every description word of each multi-object caption, at its object).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.composite_claims import OPPOSITE, RELATION_WORD_SET, Claim, Scene, SceneObject, assignment, holds
from ..data.composites import ClipArtScenes
from .base import PairOptions, TaskError

TRAINED_ON = (
    "generated composites of public-domain clip art (Debian openclipart-png titles, train half of the titles) with "
    "captions that name, count, colour and relate the objects"
)
CANNOT_KNOW = "what no clip-art title names; photographs' textures and scenes beyond the frozen encoders' knowledge"
DEFAULT_SIZE = 224
MIN_SIZE = 96
CACHE_FORMAT = 1  # bump when the cache's files change
TEST_SIZE = 500  # scenes of an evaluation split (4 captions each)
POINTING_SCENES = 150


def image_size(options: PairOptions) -> int:
    return options.image_size if options.image_size >= MIN_SIZE else DEFAULT_SIZE


# --------------------------------------------------------------------------------------------------- cache
@dataclass
class CachedComposites:
    """ClipArtScenes rendered once: pixels, label maps and scene structures."""

    pixels: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N, S, S) uint8: 0 background, k + 1 object k
    scenes: list[Scene]
    image_size: int


def _generator_hash() -> str:
    """A hash of the generator's source (clip art, claims, scenes): an edit never reads stale scenes."""
    from ..data import clipart, composite_claims, composites

    sources = b"".join(Path(m.__file__).read_bytes() for m in (clipart, composite_claims, composites))
    return hashlib.sha256(sources).hexdigest()[:12]


def cache_key(scenes: ClipArtScenes) -> str:
    s = scenes
    undirected = f"-u{s.undirected_rate:g}" if s.undirected_rate else ""
    style = f"-p{s.photo_style:g}" if s.photo_style else ""
    return (
        f"{s.split}-n{s.size}-seed{s.seed}-px{s.image_size}-c{s.captions_per_image}-o{s.max_objects}{undirected}{style}"
        f"-art{len(s.library)}-{_generator_hash()}-f{CACHE_FORMAT}"
    )


def cached_scenes(scenes: ClipArtScenes, cache_dir: str | os.PathLike | None = None) -> CachedComposites:
    """The scenes rendered into the cache (built on first use, with a progress message on stderr)."""
    from .shapes import build_once, cache_root, read_cache, write_cache

    def render(i: int) -> tuple[dict, Any]:
        item = scenes[i]
        return item, item["scene"]

    folder = cache_root(cache_dir) / "composites" / cache_key(scenes)
    write = partial(write_cache, n=len(scenes), size=scenes.image_size, render=render, what="composites cache")
    build_once(folder, write, f"composites cache: {len(scenes)} {scenes.split} scenes")
    pixels, labels, structures = read_cache(folder)
    return CachedComposites(pixels, labels, structures, scenes.image_size)


def object_dicts(scene: Scene, labels: np.ndarray) -> list[dict[str, Any]]:
    """The ``objects`` entries of a rendered item, masks from the label map."""
    from ..data.composite_claims import Desc

    return [
        {"phrase": Desc(o.noun, o.colour).text(), "mask": labels == k + 1, "noun": o.noun, "colour": o.colour}
        for k, o in enumerate(scene.objects)
    ]


# -------------------------------------------------------------------------------------------------- training
class CompositePairs(Dataset):
    """Item i = caption ``i % C`` of scene ``i // C`` with its hard negative, read from the scene cache.

    Items: ``image`` (uint8 (S, S, 3)), ``caption``, ``negative``, ``image_id`` (the scene), ``claim``,
    ``negative_claim``, ``negative_kind``, ``scene_objects``, ``objects`` (dicts with masks) and ``image_size``.
    """

    def __init__(
        self,
        split: str,
        size: int,
        seed: int,
        image_size: int = DEFAULT_SIZE,
        cache_dir: str = "",
        undirected_rate: float = 0.0,
        photo_style: float = 0.0,
    ):
        self.scenes = ClipArtScenes(
            split=split,
            size=size,
            seed=seed,
            image_size=image_size,
            undirected_rate=undirected_rate,
            photo_style=photo_style,
        )
        self.per_scene = self.scenes.captions_per_image
        self.cache = cached_scenes(self.scenes, cache_dir)

    def __len__(self) -> int:
        return len(self.scenes) * self.per_scene

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene_index, k = divmod(index, self.per_scene)
        scene = self.cache.scenes[scene_index]
        return {
            "image": np.array(self.cache.pixels[scene_index]),  # a copy: torch must not see a read-only memmap
            "caption": scene.claims[k].text(),
            "negative": scene.negative_claims[k].text(),
            "image_id": scene_index,
            "claim": scene.claims[k],
            "negative_claim": scene.negative_claims[k],
            "negative_kind": scene.negative_kinds[k],
            "scene_objects": scene.objects,
            "objects": object_dicts(scene, np.asarray(self.cache.labels[scene_index])),
            "image_size": self.cache.image_size,
        }


def train_pairs(spec: str, split: str, options: PairOptions) -> CompositePairs:
    if spec != "composites":
        raise TaskError(f"unknown composites spec {spec!r}; use 'composites'")
    if split != "train":
        raise TaskError(f"composites split {split!r} holds the validation titles; train on split 'train'")
    return CompositePairs(
        split,
        options.size,
        options.seed,
        image_size(options),
        options.cache_dir,
        options.undirected_rate,
        options.photo_style,
    )


def positives(items: list[dict[str, Any]]) -> torch.Tensor:
    """(B, B) bool: ``[i, j]`` = claim j holds for scene i (diagonal True)."""
    size = int(items[0]["image_size"])
    rows = [[holds(c["claim"], it["scene_objects"], size) for c in items] for it in items]
    pos = torch.tensor(rows, dtype=torch.bool)
    pos.diagonal().fill_(True)
    return pos


def description_spans(claim: Claim) -> list[tuple[int, int]]:
    """For each description of a claim, the whitespace-word span [start, end) of its words without the article
    (a list's comma stays on its word: "an apple, a lion and a cup")."""
    words, cursor, spans = [w.rstrip(",") for w in claim.text().split()], 0, []
    for desc in claim.descs:
        phrase = desc.words().split()
        start = next(s for s in range(cursor, len(words) - len(phrase) + 1) if words[s : s + len(phrase)] == phrase)
        cursor = start + len(phrase)
        spans.append((start, cursor))
    return spans


def word_targets(
    claim: Claim,
    objects: list[SceneObject],
    masks: list[np.ndarray],
    token_word: list[int | None],
    grid: tuple[int, int],
) -> np.ndarray:
    """(T, P) float32: each description word's object coverage as a distribution (zeros elsewhere)."""
    from ..data.grounding import patch_coverage

    out = np.zeros((len(token_word), grid[0] * grid[1]), dtype=np.float32)
    image_size = masks[0].shape[0] if masks else 0
    chosen = assignment(claim, objects, image_size) if claim.kind != "count" else None
    if chosen is None:
        return out
    for (start, end), j in zip(description_spans(claim), chosen):
        cov = patch_coverage(masks[j], grid)
        if cov.sum() <= 0:
            continue
        for t, w in enumerate(token_word):
            if w is not None and start <= w < end:
                out[t] = cov / cov.sum()
    return out


def relation_targets(true_claim: Claim, claim: Claim | None, token_word: list[int | None]) -> np.ndarray:
    """(T,) int64: 1 / 0 at the relation words of ``claim`` when it is ``true_claim`` / its reversal, else -1."""
    out = np.full(len(token_word), -1, dtype=np.int64)
    if claim is None or true_claim.kind not in ("relation", "sides") or claim.kind != true_claim.kind:
        return out
    if true_claim.relation not in OPPOSITE:  # "beside": true in either order, nothing to judge
        return out
    if claim.descs != true_claim.descs:
        return out
    if claim.relation == true_claim.relation:
        label = 1
    elif claim.relation == OPPOSITE[true_claim.relation]:
        label = 0
    else:
        return out
    at = {i for i, w in enumerate(claim.text().split()) if w in RELATION_WORD_SET}
    for t, w in enumerate(token_word):
        if w is not None and w in at:
            out[t] = label
    return out


def dense_targets(
    items: list[dict[str, Any]], processor: Any, length: int, grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """``word_targets`` (B, T, P) and ``relation_targets`` (B, 2, T) for the grounding and relation losses."""
    targets, relations = [], []
    for it in items:
        _, token_word = processor.words(it["caption"])
        token_word = (token_word + [None] * length)[:length]
        _, neg_word = processor.words(it["negative"])
        neg_word = (neg_word + [None] * length)[:length]
        claim = it["claim"]
        relations.append(
            np.stack(
                [relation_targets(claim, claim, token_word), relation_targets(claim, it["negative_claim"], neg_word)]
            )
        )
        masks = [o["mask"] for o in it["objects"]]
        targets.append(word_targets(claim, it["scene_objects"], masks, token_word, grid))
    return {
        "word_targets": torch.from_numpy(np.stack(targets)),
        "relation_targets": torch.from_numpy(np.stack(relations)),
    }


# ------------------------------------------------------------------------------------------------ evaluation
def load_eval_data(spec: str, split: str = "test", limit: int = 0) -> Any:
    """``composites``: ``TEST_SIZE`` scenes of held-out titles (split ``test`` or ``val``), 4 captions each with its
    hard negative and the negative's kind; ``limit`` > 0 keeps the first ``limit`` scenes."""
    from .base import EvalData, LazyImages

    if spec != "composites":
        raise TaskError(f"unknown composites spec {spec!r}; use 'composites'")
    if split == "train":
        raise TaskError("evaluate composites on split 'test' or 'val' (held-out titles), not 'train'")
    scenes = ClipArtScenes(split=split, size=limit if limit > 0 else TEST_SIZE)
    captions, negatives, kinds, txt2img = [], [], [], []
    for i in range(len(scenes)):
        scene = scenes[i]["scene"]
        captions += [c.text() for c in scene.claims]
        negatives += [c.text() for c in scene.negative_claims]
        kinds += list(scene.negative_kinds)
        txt2img += [i] * len(scene.claims)
    return EvalData(
        spec, split, LazyImages(scenes), captions, np.asarray(txt2img), negatives, scenes, negative_kinds=kinds
    )


def word_pointing_examples(scenes: ClipArtScenes, n: int | None = None) -> Iterator[dict[str, Any]]:
    """Every caption that names two or more objects, with each description word as a target at its object's mask."""
    for i in range(len(scenes) if n is None else min(n, len(scenes))):
        item = scenes[i]
        scene = item["scene"]
        for claim in scene.claims:
            if len(claim.descs) < 2:
                continue
            chosen = assignment(claim, scene.objects, scenes.image_size)
            if chosen is None:  # cannot happen for a true generated caption
                continue
            targets = [
                (w, item["objects"][j]["mask"])
                for (start, end), j in zip(description_spans(claim), chosen)
                for w in range(start, end)
            ]
            yield {"image": item["image"], "caption": claim.text(), "targets": targets}


def extra_metrics(model: Any, processor: Any, data: Any) -> dict[str, float]:
    """Phrase pointing game and word pointing game (per method) on the first ``POINTING_SCENES`` scenes."""
    from ..pointing import pointing_game, word_pointing_game

    scenes = getattr(data, "source", None)
    if not isinstance(scenes, ClipArtScenes):
        return {}
    n = min(POINTING_SCENES, len(scenes))
    return pointing_game(model, processor, scenes, n=n) | word_pointing_game(
        model, processor, word_pointing_examples(scenes, n)
    )
