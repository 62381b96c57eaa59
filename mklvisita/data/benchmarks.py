"""Readers for image-text retrieval benchmarks (Flickr30K, MSCOCO) and the shapes test set.

Every reader returns a :class:`RetrievalSet`: images, captions and the two ground-truth maps the protocol
needs (``txt2img``: the image of each caption; ``img2txt``: the captions of each image).

Decisions:

- ``images`` holds image *paths* (str) for the JSON readers and PIL images for Hugging Face datasets and
  shapes; for those two it is a lazy, list-like sequence that decodes (or renders) an image only when
  indexed, so a 31K-image split costs no memory until used. :meth:`RetrievalSet.load_image` opens either.
- Missing image files: the JSON readers check that the first few files exist when loading (a wrong image
  root fails at once, naming the file and the root) and :meth:`RetrievalSet.load_image` checks every file
  on access with the same message. :meth:`RetrievalSet.check_images` checks them all, on demand.
- Karpathy ``split="train"`` includes ``restval`` by default (the usual 113K COCO / 29K Flickr training set);
  ``split="restval"`` alone also works.
- LAVIS/BLIP JSONs hold one split per file; a path to a folder picks the file ending in ``_<split>.json``, and
  a file whose name ends in another split's suffix is refused rather than silently used for ``split``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

KARPATHY_SPLITS = ("train", "restval", "val", "test")
SPEC_FORMS = "'karpathy:<json>:<image root>', 'lavis:<json or folder>:<image root>', 'hf:<dataset id or path>'"
_CHECK_FIRST = 8  # image files checked at load time; enough to catch a wrong image root


class LazyImages(Sequence):
    """A read-only list of images produced on access by ``getter(i)`` (slices return plain lists)."""

    def __init__(self, length: int, getter: Callable[[int], Any]) -> None:
        self._length, self._getter = length, getter

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._getter(i) for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"image index {index} out of range for {self._length} images")
        return self._getter(index)


@dataclass
class RetrievalSet:
    """Images, captions and their ground truth for retrieval evaluation or training.

    Attributes:
        images: image paths (str) or PIL images, possibly a lazy sequence (see the module docstring).
        captions: every caption, grouped by image in image order.
        txt2img: (n_captions,) int64, the index of each caption's image.
        img2txt: for each image, the indices of its captions.
        name: where the set came from, for messages and reports.
        split: the split it holds.
        image_root: the folder image paths were joined to, if any.
    """

    images: Sequence
    captions: list[str]
    txt2img: np.ndarray
    img2txt: list[list[int]]
    name: str = ""
    split: str = ""
    image_root: str | None = None

    def __post_init__(self) -> None:
        self.txt2img = np.asarray(self.txt2img, dtype=np.int64)
        if len(self.txt2img) != len(self.captions) or len(self.img2txt) != len(self.images):
            raise ValueError(
                f"inconsistent RetrievalSet {self.name!r}: {len(self.images)} images, {len(self.captions)} captions, "
                f"{len(self.txt2img)} txt2img entries, {len(self.img2txt)} img2txt entries"
            )
        for i, texts in enumerate(self.img2txt):
            if any(not 0 <= t < len(self.captions) or self.txt2img[t] != i for t in texts):
                raise ValueError(
                    f"inconsistent RetrievalSet {self.name!r}: img2txt[{i}] = {texts} disagrees with txt2img"
                )

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"RetrievalSet(name={self.name!r}, split={self.split!r}, images={len(self.images)}, "
            f"captions={len(self.captions)})"
        )

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` as a PIL RGB image; a missing file raises FileNotFoundError naming it and the root."""
        image = self.images[index]
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        _require_file(str(image), self.image_root, self.name)
        with Image.open(image) as im:
            return im.convert("RGB")

    def check_images(self) -> None:
        """Check that every image file exists (slow on big sets); raises FileNotFoundError naming the first few."""
        missing = [p for p in self.images if isinstance(p, (str, os.PathLike)) and not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.images)} image files of {self.name!r} are missing under image root "
                f"{self.image_root!r}, e.g. {[str(p) for p in missing[:3]]}; check the image root"
            )

    def subset(self, image_indices: Sequence[int]) -> RetrievalSet:
        """The images ``image_indices`` with all their captions, renumbered (e.g. for COCO 5-fold 1K)."""
        images, captions, txt2img, img2txt = [], [], [], []
        for new, old in enumerate(image_indices):
            images.append(self.images[old])
            img2txt.append(list(range(len(captions), len(captions) + len(self.img2txt[old]))))
            for t in self.img2txt[old]:
                captions.append(self.captions[t])
                txt2img.append(new)
        return RetrievalSet(images, captions, np.asarray(txt2img), img2txt, self.name, self.split, self.image_root)

    def folds(self, n_folds: int = 5) -> list[RetrievalSet]:
        """Consecutive equal folds of images (COCO 5K test -> five 1K folds); the remainder is dropped."""
        size = len(self) // n_folds
        if size == 0:
            raise ValueError(f"cannot split {len(self)} images into {n_folds} folds")
        return [self.subset(range(k * size, (k + 1) * size)) for k in range(n_folds)]

    def pairs(self) -> CaptionPairs:
        """Training view: a list-like of ``(image, caption, image_index)``, one per caption."""
        return CaptionPairs(self)


class CaptionPairs(Sequence):
    """``(image, caption, image_index)`` per caption of a RetrievalSet; images come from ``set.images``."""

    def __init__(self, retrieval_set: RetrievalSet) -> None:
        self.set = retrieval_set

    def __len__(self) -> int:
        return len(self.set.captions)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image_index = int(self.set.txt2img[index])
        return self.set.images[image_index], self.set.captions[index], image_index

    def __iter__(self) -> Iterator[tuple[Any, str, int]]:
        for i in range(len(self)):
            yield self[i]


def _require_file(path: str, root: str | None, name: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"image file {path!r} of {name!r} not found (image root {root!r}); check the image root, "
            "e.g. the last part of 'karpathy:<json>:<image root>'"
        )


def _from_groups(
    images: list, groups: list[list[str]], name: str, split: str, root: str | None, check: bool
) -> RetrievalSet:
    captions: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for i, caps in enumerate(groups):
        img2txt.append(list(range(len(captions), len(captions) + len(caps))))
        captions.extend(caps)
        txt2img.extend([i] * len(caps))
    if check:
        for path in images[:_CHECK_FIRST]:
            _require_file(path, root, name)
    return RetrievalSet(images, captions, np.asarray(txt2img, dtype=np.int64), img2txt, name, split, root)


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"annotation file {path!r} is not valid JSON: {e}") from e


def _caption_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: caption must be a non-empty string, got {value!r}")
    return value.strip()


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str = "test",
    include_restval: bool | None = None,
    check_files: bool = True,
) -> RetrievalSet:
    """Read a Karpathy split file (``dataset_flickr30k.json``, ``dataset_coco.json``).

    Args:
        json_path: the Karpathy JSON: ``{"images": [{"filename", "split", "sentences": [{"raw"}], "filepath"?}]}``.
        image_root: folder holding the images; the path is ``image_root/filepath/filename`` (COCO's ``filepath``
            is e.g. ``val2014``) or ``image_root/filename``.
        split: "train", "restval", "val" or "test".
        include_restval: add ``restval`` images to ``split="train"``; None means True for train.
        check_files: check that the first few image files exist now.
    """
    json_path, image_root = str(json_path), str(image_root)
    name = os.path.basename(json_path)
    data = _read_json(json_path)
    records = data.get("images") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{name} is not a Karpathy split file: expected an object with an 'images' list")
    if include_restval is None:
        include_restval = split == "train"
    wanted = {split, "restval"} if split == "train" and include_restval else {split}
    images, groups, present = [], [], set()
    for i, rec in enumerate(records):
        for key in ("filename", "split", "sentences"):
            if key not in rec:
                raise ValueError(f"{name}: image record {i} has no {key!r} key (keys: {sorted(rec)})")
        present.add(rec["split"])
        if rec["split"] not in wanted:
            continue
        caps = []
        for j, sent in enumerate(rec["sentences"]):
            where = f"{name}: image record {i} ({rec['filename']}), sentence {j}"
            if "raw" in sent:
                caps.append(_caption_text(sent["raw"], where))
            elif "tokens" in sent:
                caps.append(_caption_text(" ".join(sent["tokens"]), where))
            else:
                raise ValueError(f"{where} has no 'raw' key")
        images.append(os.path.join(image_root, rec.get("filepath", ""), rec["filename"]))
        groups.append(caps)
    if not images:
        raise ValueError(f"{name} has no images in split {split!r}; splits present: {sorted(present)}")
    return _from_groups(images, groups, name, split, image_root, check_files)


def _lavis_file(path: str, split: str) -> str:
    if os.path.isdir(path):
        matches = sorted(f for f in os.listdir(path) if f.endswith(f"_{split}.json"))
        if len(matches) != 1:
            found = sorted(f for f in os.listdir(path) if f.endswith(".json"))
            raise ValueError(f"expected one file ending in '_{split}.json' in {path!r}, found {matches or found}")
        return os.path.join(path, matches[0])
    stem = os.path.basename(path).rsplit(".", 1)[0]
    for other in ("train", "val", "test"):
        if stem.endswith(f"_{other}") and other != split:
            raise ValueError(
                f"{os.path.basename(path)} holds the {other!r} split but split={split!r} was asked; "
                f"pass split={other!r} or the {split} file"
            )
    return path


def load_lavis(
    json_path: str | os.PathLike, image_root: str | os.PathLike, split: str = "test", check_files: bool = True
) -> RetrievalSet:
    """Read a LAVIS/BLIP retrieval JSON (e.g. ``flickr30k_test.json``, ``coco_karpathy_train.json``).

    Train files are lists of ``{"image": relpath, "caption": str, "image_id": ...}`` (one row per caption,
    grouped here by image in order of first appearance); val/test files are lists of
    ``{"image": relpath, "caption": [str, ...]}``. ``json_path`` may be a folder holding ``*_<split>.json``.
    """
    path, image_root = _lavis_file(str(json_path), split), str(image_root)
    name = os.path.basename(path)
    records = _read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{name} is not a LAVIS retrieval file: expected a list of records")
    index: dict[str, int] = {}
    images, groups = [], []
    for i, rec in enumerate(records):
        for key in ("image", "caption"):
            if not isinstance(rec, dict) or key not in rec:
                raise ValueError(f"{name}: record {i} has no {key!r} key")
        rel = rec["image"]
        if rel not in index:
            index[rel] = len(images)
            images.append(os.path.join(image_root, rel))
            groups.append([])
        caps = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        groups[index[rel]].extend(_caption_text(c, f"{name}: record {i}") for c in caps)
    if not images:
        raise ValueError(f"{name} holds no records")
    return _from_groups(images, groups, name, split, image_root, check_files)


def load_hf(
    source: Any,
    split: str = "test",
    image_column: str = "image",
    caption_column: str = "caption",
    split_column: str = "split",
) -> RetrievalSet:
    """Read a Hugging Face dataset such as ``nlphuji/flickr30k``.

    Args:
        source: a Hub dataset id, a local folder (``load_dataset`` folder or ``save_to_disk`` output), or an
            already loaded ``datasets.Dataset`` / ``DatasetDict``.
        split: the split to keep. If the rows carry ``split_column`` (nlphuji/flickr30k keeps every row in one
            "test" split with a ``split`` column of train/val/test), rows are filtered on it; otherwise the
            dataset split of that name is used.
        image_column: column of PIL images (decoded lazily, on access).
        caption_column: column of caption lists (or single captions).
        split_column: column naming each row's split, if any.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading Hugging Face datasets needs the 'datasets' package: pip install datasets") from e
    name = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    name = str(name)
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        is_saved = os.path.isdir(path) and any(
            os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
        )
        source = datasets.load_from_disk(path) if is_saved else datasets.load_dataset(path)
    if isinstance(source, (datasets.DatasetDict, dict)):
        if split in source:
            ds = source[split]
        elif len(source) == 1:
            ds = next(iter(source.values()))
        else:
            raise ValueError(f"{name} has no split {split!r}; splits present: {sorted(source)}")
    else:
        ds = source
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise ValueError(f"{name} has no column {column!r}; columns: {ds.column_names}")
    if split_column in ds.column_names:
        row_splits = ds[split_column]
        rows = [i for i, s in enumerate(row_splits) if s == split]
        if not rows:
            raise ValueError(
                f"{name} has no rows with {split_column}={split!r}; splits present: {sorted(set(row_splits))}"
            )
        ds = ds.select(rows)
    groups = []
    for i, caps in enumerate(ds[caption_column]):
        caps = caps if isinstance(caps, list) else [caps]
        groups.append([_caption_text(c, f"{name}: row {i} of split {split!r}") for c in caps])
    images = LazyImages(len(ds), functools.partial(_row_image, ds, image_column))
    return _from_groups(images, groups, name, split, None, check=False)


# Module-level getters (not lambdas) keep lazy sets picklable for DataLoader workers.
def _row_image(ds: Any, column: str, index: int) -> Any:
    return ds[index][column]


def _scene_image(scenes: Any, index: int) -> Image.Image:
    return scenes[index]["image"]


def shapes_retrieval_set(split: str = "test", size: int = 1000, seed: int = 0, image_size: int = 64) -> RetrievalSet:
    """The shapes scenes as a retrieval set (images rendered lazily, five captions each)."""
    from mklvisita.data.shapes import ShapesScenes

    scenes = ShapesScenes(split=split, size=size, seed=seed, image_size=image_size)
    groups = [[c.text() for c in scenes.scene(i).claims] for i in range(size)]
    images = LazyImages(size, functools.partial(_scene_image, scenes))
    return _from_groups(images, groups, f"shapes/{split}", split, None, check=False)


def _split_json_spec(rest: str, spec: str) -> tuple[str, str]:
    # Split at the ':' after '.json' so a path may itself contain ':'; folders (LAVIS) split at the first ':'.
    at = rest.find(".json:")
    if at >= 0:
        return rest[: at + 5], rest[at + 6 :]
    if ":" in rest:
        json_path, root = rest.split(":", 1)
        return json_path, root
    raise ValueError(f"data spec {spec!r} names no image root; accepted forms: {SPEC_FORMS}")


def load_retrieval_set(spec: str, split: str = "test") -> RetrievalSet:
    """Load a real retrieval set from a spec string: one of ``SPEC_FORMS`` (the reader of the retrieval task; which
    task a spec belongs to is decided by :func:`mklvisita.tasks.get_task`)."""
    scheme, _, rest = spec.partition(":")
    if scheme in ("karpathy", "lavis") and rest:
        json_path, root = _split_json_spec(rest, spec)
        reader = load_karpathy if scheme == "karpathy" else load_lavis
        return reader(json_path, root, split=split)
    if scheme == "hf" and rest:
        return load_hf(rest, split=split)
    raise ValueError(f"unknown data spec {spec!r}; accepted forms: {SPEC_FORMS}")
