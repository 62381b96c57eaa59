"""The Search tab's saved gallery indexes: text → images over an index built by `python -m mklvisita index`.

No Gradio here; returns plain data for `demo/tabs/search.py`.

Decisions:

- An allow-list, like the checkpoints': only the index folders named in `$MKLVISITA_INDEXES` (comma-separated) can be
  opened, each shown by its folder name; the app never opens a path a visitor types.
- An index is opened memory-mapped once per checkpoint (in that checkpoint's result cache) and searched with
  `Matcher.search`: FAISS picks the candidates, the full model re-ranks them from their files. An index built by
  another checkpoint is refused with the library's message (a toast), naming no server path.
- Result images are returned as downscaled PIL images (at most `THUMB_SIDE` pixels a side), so the app serves no file
  from the index's folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from mklvisita import Matcher
from mklvisita.gallery import GalleryIndex
from mklvisita.inputs import check_caption, check_whole_number, load_image

from .inputs import MAX_TOP_K
from .registry import ResultCache

INDEXES_ENV = "MKLVISITA_INDEXES"
THUMB_SIDE = 512


def allowed_indexes(env: str | None = None) -> dict[str, str]:
    """The allow-listed index folders by display name (the folder's name; a number added to repeated names)."""
    spec = os.environ.get(INDEXES_ENV, "") if env is None else env
    out: dict[str, str] = {}
    for path in (p.strip() for p in spec.split(",")):
        if not path:
            continue
        name = Path(path).name or path
        label, n = name, 2
        while label in out:
            label, n = f"{name} ({n})", n + 1
        out[label] = path
    return out


def _thumbnail(path: Path) -> Image.Image | None:
    try:
        img = load_image(path)
    except ValueError:
        return None
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return img


def search_saved_index(
    matcher: Matcher,
    index_name: Any,
    query_text: Any,
    top_k: int | float = 5,
    cache: ResultCache | None = None,
    indexes: dict[str, str] | None = None,
) -> tuple[list[tuple[Image.Image, str]], dict[str, float]]:
    """Text → the top images of an allow-listed saved index: ([(image, "#rank score ... name")], ms per stage)."""
    indexes = allowed_indexes() if indexes is None else indexes
    if not indexes:
        raise ValueError(f"No saved index is allow-listed; start the app with {INDEXES_ENV}=folder1,folder2.")
    if index_name not in indexes:
        raise ValueError(f"Choose a saved index from the list ({', '.join(indexes)}).")
    if not isinstance(query_text, str) or not query_text.strip():
        raise ValueError("Enter a text query to search the saved index.")
    query = check_caption(query_text)
    top_k = check_whole_number(top_k, "top k", 1, MAX_TOP_K)
    path = indexes[index_name]

    def open_index() -> GalleryIndex:
        return GalleryIndex.open(path)

    index = cache.get_or_compute(("saved_index", path), open_index) if cache is not None else open_index()
    r = matcher.search(index, query, top_k=top_k)
    hits = []
    for rank, (f, s, p) in enumerate(zip(r.files, r.scores, r.itm), 1):
        img = _thumbnail(Path(f))
        if img is not None:
            itm = "" if p != p else f" (ITM {p:.3f})"  # NaN: no fusion head
            hits.append((img, f"#{rank} score {s:.3f}{itm} {Path(f).name}"))
    return hits, {k: round(1e3 * float(v), 3) for k, v in r.timings.items()}
