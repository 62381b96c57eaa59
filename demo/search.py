"""The Search tab's handler: text → images and image → captions over a gallery (yours, or the shipped examples).

No Gradio here; returns plain data for `demo/tabs/search.py`. Retrieval is the library's two-stage cascade
(`Matcher.search_images` / `search_captions`): S ranks every candidate from cached embeddings, the fusion head
re-scores the top k, and results are ordered by the checkpoint's ranking score, the same rule as the Match tab.
Gallery embeddings are cached per checkpoint, so a second query over the same gallery only encodes the query, and
concurrent text queries over the same gallery have their queries encoded in one model call (`demo.batching`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from mklvisita import Matcher
from mklvisita.inputs import check_whole_number

from . import batching
from .examples import EXAMPLES_DIR
from .inputs import (
    MAX_GALLERY_CAPTIONS,
    MAX_GALLERY_IMAGES,
    MAX_TOP_K,
    image_digest,
    parse_captions,
    read_image,
    read_images,
)
from .match import rounded
from .registry import ResultCache

CAPTION_COLUMNS = ["rank", "caption", "score", "ITM", "S"]


@dataclass
class Gallery:
    """A search gallery: images with display names, and captions."""

    images: list[Image.Image]
    names: list[str]
    paths: list[str | None]
    captions: list[str]


def load_example_gallery(examples_dir: Path = EXAMPLES_DIR) -> Gallery:
    """The gallery shipped in assets/examples: every example image, and every distinct example caption."""
    spec = json.loads((examples_dir / "examples.json").read_text())["examples"]
    paths = [str(examples_dir / ex["image"]) for ex in spec]
    captions = list(dict.fromkeys(c for ex in spec for c in ex["captions"]))
    return Gallery([read_image(p) for p in paths], [Path(p).name for p in paths], paths, captions)


class SearchView(NamedTuple):
    images: list[tuple[Any, str]]  # (image or its path, "#rank name: score ..."), best first
    captions: pd.DataFrame  # rank, caption, score, [ITM,] S
    timings: dict[str, float]  # milliseconds per stage


def _label(rank: int, name: str, score: float, itm: float) -> str:
    # the numbers first: a gallery cuts long labels at the right
    return f"#{rank} score {score:.3f}" + ("" if np.isnan(itm) else f" (ITM {itm:.3f})") + f" {name}"


def search(
    matcher: Matcher,
    query_text: Any,
    query_image: Any,
    gallery_files: Sequence[Any] | None,
    gallery_captions: Any,
    top_k: int | float = 5,
    cache: ResultCache | None = None,
    example_gallery: Gallery | None = None,
) -> SearchView:
    """Text → top images and image → top captions over a gallery (the uploaded one, else the shipped examples)."""
    if query_text is not None and not isinstance(query_text, str):
        raise ValueError(f"The text query must be text; got {type(query_text).__name__}.")
    has_text, has_image = bool((query_text or "").strip()), query_image not in (None, "")
    if not has_text and not has_image:
        raise ValueError("Enter a text query (searches images), upload a query image (searches captions), or both.")
    top_k = check_whole_number(top_k, "top k", 1, MAX_TOP_K)
    example_gallery = example_gallery or load_example_gallery()
    timings: dict[str, float] = {}
    image_hits: list[tuple[Any, str]] = []
    has_itm = matcher.model.has_itm  # no fusion head (the photo checkpoint): no ITM column, as on the Match tab
    columns = [c for c in CAPTION_COLUMNS if has_itm or c != "ITM"]
    caption_hits = pd.DataFrame(columns=columns)

    def indexed(kind: str, digest: tuple, build: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        build = batching.exclusive()(build)  # one model call at a time
        index = cache.get_or_compute(("index", kind, digest), build) if cache is not None else build()
        timings[f"index {kind} (cached after the first call)"] = 1e3 * (time.perf_counter() - t0)
        return index

    if has_text:
        query = parse_captions(query_text, 1, "text query")[0]
        if gallery_files:
            images, names = read_images(gallery_files, MAX_GALLERY_IMAGES, "gallery images")
            shown: list[Any] = images
        else:
            images, names, shown = example_gallery.images, example_gallery.names, example_gallery.paths
        index = indexed("images", tuple(image_digest(i) for i in images), lambda: matcher.index_images(images))
        r = batching.search_images(matcher, index, query, min(top_k, len(images)))  # with concurrent queries
        timings.update({f"text→image {k}": 1e3 * float(v) for k, v in r.timings.items()})
        image_hits = [
            (shown[i], _label(rank, names[i], s, p))
            for rank, (i, s, p) in enumerate(zip(r.indices, r.scores, r.itm), 1)
        ]
    if has_image:
        img = read_image(query_image, "The query image")
        if isinstance(gallery_captions, str) and gallery_captions.strip():
            captions = parse_captions(gallery_captions, MAX_GALLERY_CAPTIONS, "gallery captions")
        else:
            captions = example_gallery.captions
        index = indexed("captions", tuple(captions), lambda: matcher.index_captions(captions))
        with batching.exclusive():
            r = matcher.search_captions(index, img, top_k=min(top_k, len(captions)))
        timings.update({f"image→text {k}": 1e3 * float(v) for k, v in r.timings.items()})
        caption_hits = pd.DataFrame(
            [
                [rank, captions[i], rounded(s, 3), *([rounded(p, 3)] if has_itm else []), rounded(q, 3)]
                for rank, (i, s, p, q) in enumerate(zip(r.indices, r.scores, r.itm, r.similarity), 1)
            ],
            columns=columns,
        )
    return SearchView(image_hits, caption_hits, {k: round(v, 3) for k, v in timings.items()})
