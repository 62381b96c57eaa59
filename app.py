"""MKL-VisITA web demo: match, explain and search image-text pairs in the browser or through `gradio_client`.

`app.py` only builds the UI and calls a `mklvisita.Matcher` (STYLE.md: the hysts Spaces pattern); it holds no
model logic. Run `python app.py` for the embedded default checkpoint; add Hub checkpoints to the allow-list with
`--checkpoint owner/name[@revision]` (repeatable) or `MKLVISITA_CHECKPOINTS="id1,id2"`.

Named API endpoints (see the README for a client snippet):

- `/match`   (image, captions one per line)                        -> ranking table, kernel-contribution plot, JSON
- `/explain` (image, caption, fusion layer, method, scale) -> caption heatmap, per-word heatmaps, word, per-kernel
  maps of the first word, JSON
- `/matrix`  (image files, captions one per line, score)            -> score-matrix plot, best matches, JSON
- `/search`  (text query, image query, gallery files, gallery captions, top k) -> images, captions, timings

Decisions:

- Example outputs are cached in memory per loaded checkpoint (`ResultCache`, a bounded LRU keyed by a digest of
  the inputs), filled lazily on first use. Gradio's own example cache lives on disk keyed by component id, so it
  would keep serving a previous checkpoint's outputs; ours is dropped with the checkpoint it belongs to.
- The checkpoint choice is per browser session (`gr.State`), so one visitor cannot switch the model under
  another; API calls use the embedded default. At most `MAX_LOADED` checkpoints stay in memory.
- Every model call shares one concurrency slot (`concurrency_id="model"`): a 2-CPU Space runs one at a time, the
  rest wait in a queue of at most `QUEUE_MAX_SIZE`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from matplotlib import patches
from PIL import Image

from mklvisita import Matcher, figures
from mklvisita.explain import METHODS
from mklvisita.explain import NORMALIZE as SCALES
from mklvisita.inputs import MAX_CAPTION_CHARS, MAX_CAPTIONS, check_whole_number, load_image

ROOT = Path(__file__).resolve().parent
ASSETS_DIR = ROOT / "assets"
EXAMPLES_DIR = ASSETS_DIR / "examples"

DEFAULT_CHECKPOINT = "embedded default"
DEFAULT_LAYER = "default"  # fusion-layer choice meaning mklvisita.explain.default_layer
CHECKPOINTS_ENV = "MKLVISITA_CHECKPOINTS"

# Input limits: small enough that one request cannot hold a 2-CPU Space for long. The caption length and the Match
# tab's number of captions are the library's (mklvisita.inputs), shared with the CLI.
MAX_MATRIX_IMAGES = 8
MAX_MATRIX_CAPTIONS = 8
MAX_GALLERY_IMAGES = 32  # Search tab, user uploads
MAX_GALLERY_CAPTIONS = 128
MAX_TOP_K = 16
MAX_SIDE = 512  # larger uploads are shrunk first: the model sees 64-224 px, and heatmaps are kept at this size
MAX_FILE_SIZE = "10mb"
QUEUE_MAX_SIZE = 16
CACHE_SECONDS = 600  # uploads and output images live this long in gradio's temp folder (a Space's disk stays bounded)
MAX_LOADED = 2  # checkpoints held in memory at once (the default is always one of them)
CACHE_ENTRIES = 64
EXPLAIN_CACHE_ENTRIES = 3  # an explanation holds full-size maps per word and per kernel: tens of MB each

SCORE_KINDS = ("itm", "similarity", "score")


# --------------------------------------------------------------------------------------------------------------
# Input checks. The library validates content (unreadable image, empty caption); the app adds the size limits.
# --------------------------------------------------------------------------------------------------------------


def user_errors(fn: Callable) -> Callable:
    """Turn the library's ValueErrors (bad image, bad caption, bad checkpoint) into messages shown in the UI."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:  # InvalidImageError, InvalidCaptionError, CheckpointError subclass ValueError
            raise gr.Error(str(e)) from e

    return wrapper


# image_mode=None: pass the uploaded file through untouched; mklvisita.inputs.load_image converts it exactly as the
# trainer and the evaluator do (EXIF, transparency, 16-bit, first frame).
IMAGE_UPLOAD = {"type": "filepath", "image_mode": None}
# Events that take an image upload skip gradio's preprocessing: gr.Image opens the file with PIL first, and a corrupt
# upload would fail there with a message the UI hides (show_error=False). The handlers get the upload's FileData
# (already checked to lie in gradio's upload folder) and read_image reports what is wrong.
RAW_INPUTS = {"preprocess": False}
FIGURE = {"type": "pil", "format": "png", "buttons": ["download", "fullscreen"]}  # crisp text, exportable


def parse_captions(text: str | None, limit: int, what: str = "captions") -> list[str]:
    """Split a text box into captions, one per non-blank line, and enforce the app's limits."""
    lines = [line.strip() for line in (text or "").splitlines()]
    captions = [line for line in lines if line]
    if not captions:
        raise gr.Error(f"Enter at least one caption, one per line (up to {limit} {what}).")
    if len(captions) > limit:
        raise gr.Error(f"{len(captions)} {what} given; the limit is {limit}. Remove some lines and try again.")
    for i, caption in enumerate(captions, 1):
        if len(caption) > MAX_CAPTION_CHARS:
            raise gr.Error(
                f"Caption {i} is {len(caption):,} characters long; the limit is {MAX_CAPTION_CHARS}. Shorten it."
            )
    return captions


def read_image(x: Any, what: str = "The image") -> Image.Image:
    """Decode an upload (path, FileData, PIL or array) to RGB, at most MAX_SIDE pixels on its longer side."""
    if isinstance(x, dict):  # raw FileData (RAW_INPUTS events); gradio has checked that the path is an upload
        x = x.get("path")
    if x is None or (isinstance(x, str) and not x):
        raise gr.Error(f"{what} is missing: upload an image (PNG, JPEG, WebP, ...).")
    try:
        image = load_image(x)
    except ValueError as e:
        raise gr.Error(f"{what}: {e}") from e
    except Exception as e:  # PIL raises many types for corrupt files; the user only needs to know it is unreadable
        raise gr.Error(f"{what} could not be read as an image ({type(e).__name__}). Upload a PNG or JPEG.") from e
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)  # keeps the aspect ratio
    return image


def read_images(files: Sequence[Any] | None, limit: int, what: str = "images") -> tuple[list[Image.Image], list[str]]:
    """Decode a list of uploaded files; returns the images and their display names."""
    files = [f for f in (files or []) if f]
    if not files:
        raise gr.Error(f"Upload at least one image (up to {limit} {what}).")
    if len(files) > limit:
        raise gr.Error(f"{len(files)} {what} given; the limit is {limit}.")
    images, names = [], []
    for i, f in enumerate(files, 1):
        path = f.get("path") if isinstance(f, dict) else f
        name = (f.get("orig_name") if isinstance(f, dict) else None) or (
            Path(path).name if isinstance(path, str | os.PathLike) else f"image {i}"
        )
        images.append(read_image(path, what=f"Image {i} ({name})"))
        names.append(name)
    return images, names


def image_digest(image: Image.Image) -> str:
    """A content key for caching: the same pixels give the same key whatever file they came from."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: the allow-list, the loaded Matchers and their result caches.
# --------------------------------------------------------------------------------------------------------------


class ResultCache:
    """A small thread-safe LRU of handler results for one checkpoint (this is where example outputs live)."""

    def __init__(self, capacity: int = CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._subs: dict[str, ResultCache] = {}
        self.hits = 0

    def sub(self, name: str, capacity: int) -> ResultCache:
        """A smaller cache for bulky results (explanations) that lives and dies with this one."""
        with self._lock:
            return self._subs.setdefault(name, ResultCache(capacity))

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()  # outside the lock: a slow model call must not block cache reads
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Loaded:
    matcher: Matcher
    cache: ResultCache = field(default_factory=ResultCache)


def allowed_checkpoints(cli: Sequence[str] = (), env: str | None = None) -> list[str]:
    """The allow-list: the embedded default, then `--checkpoint` values, then `$MKLVISITA_CHECKPOINTS` (comma list)."""
    env = os.environ.get(CHECKPOINTS_ENV, "") if env is None else env
    entries = [DEFAULT_CHECKPOINT, *cli, *env.split(",")]
    out: list[str] = []
    for entry in (e.strip() for e in entries):
        if entry and entry not in out:
            out.append(entry)
    return out


def load_checkpoint(spec: str) -> Matcher:
    """Load `dir_or_hub_id[@revision]` (revision pins a Hub commit, branch or tag)."""
    name, _, revision = spec.partition("@")
    return Matcher.from_pretrained(name, revision=revision or None)


class Registry:
    """The allow-list and the Matchers loaded from it. The default is pinned; others are evicted LRU."""

    def __init__(
        self,
        default: Matcher,
        allowed: Sequence[str] = (),
        loader: Callable[[str], Matcher] = load_checkpoint,
        max_loaded: int = MAX_LOADED,
    ) -> None:
        self.choices = allowed_checkpoints(allowed, env="")
        self.loader = loader
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[str, Loaded] = OrderedDict({DEFAULT_CHECKPOINT: Loaded(default)})
        self._lock = threading.Lock()

    def check(self, choice: str | None) -> str:
        choice = choice or DEFAULT_CHECKPOINT
        if choice not in self.choices:
            raise gr.Error(f"Checkpoint {choice!r} is not in this demo's allow-list: {', '.join(self.choices)}.")
        return choice

    def get(self, choice: str | None) -> Loaded:
        choice = self.check(choice)
        with self._lock:  # one load at a time; a second request for the same id waits and reuses it
            if choice in self._loaded:
                self._loaded.move_to_end(choice)
                return self._loaded[choice]
            try:
                matcher = self.loader(choice)
            except Exception as e:
                raise gr.Error(f"Could not load checkpoint {choice!r}: {e}") from e
            self._loaded[choice] = entry = Loaded(matcher)
            while len(self._loaded) > self.max_loaded:
                oldest = next(k for k in self._loaded if k != DEFAULT_CHECKPOINT)
                del self._loaded[oldest]
            return entry

    def is_loaded(self, choice: str) -> bool:
        return choice in self._loaded


# --------------------------------------------------------------------------------------------------------------
# Figures come from mklvisita.figures (PIL images); the app only adds its best-match markers to the score matrix.
# --------------------------------------------------------------------------------------------------------------


def overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """A [0, 1] heatmap (H, W) blended over the image."""
    return figures.overlay(image, heatmap)


def matrix_figure(scores: np.ndarray, image_names: Sequence[str], captions: Sequence[str], kind: str) -> Image.Image:
    """The images × captions score matrix, marking each image's best caption and each caption's best image."""
    scores = np.asarray(scores)  # (n_images, n_captions)
    title = f"{kind}: red box = best caption per image, orange dot = best image per caption"
    fig = figures.plot_score_matrix(scores, image_names, captions, title=title, figure=True)
    ax = fig.axes[0]
    for i, j in enumerate(scores.argmax(1)):
        ax.add_patch(patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    for j, i in enumerate(scores.argmax(0)):
        ax.plot(j + 0.32, i - 0.3, marker="o", color="orange", markersize=5)
    return figures.render(fig)


# --------------------------------------------------------------------------------------------------------------
# Handlers: plain functions of (matcher, cache, UI values), unit-tested directly; create_demo wires them up.
# --------------------------------------------------------------------------------------------------------------


def _rounded(x: Any) -> float | None:
    """Round for display and JSON; NaN (e.g. ITM of a checkpoint without fusion) becomes None (JSON null)."""
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


def match(matcher: Matcher, image: Any, captions_text: str, cache: ResultCache | None = None) -> tuple:
    """Rank captions for one image by ITM probability.

    Returns:
        (ranking DataFrame, kernel-contribution figure, result dict, caption-selector update). The dict holds,
        per caption in ranked order, `itm`, `similarity`, `score` and `kernel_contributions` {kernel: β·K}.
    """
    img = read_image(image)
    captions = parse_captions(captions_text, MAX_CAPTIONS)

    def compute() -> dict:
        r = matcher.score([img], captions)
        itm, sim, score = (np.asarray(a)[0] for a in (r.itm, r.similarity, r.score))  # (n_captions,)
        contrib = np.asarray(r.kernel_contributions)[0]  # (n_captions, n_kernels)
        # ITM is NaN for a dual-encoder checkpoint (no fusion head): the final score then ranks alone.
        primary = score if np.isnan(itm).any() else itm
        order = sorted(range(len(captions)), key=lambda j: (-primary[j], -sim[j]))
        ranking = [
            {
                "rank": rank,
                "caption": captions[j],
                "itm": _rounded(itm[j]),
                "similarity": _rounded(sim[j]),
                "score": _rounded(score[j]),
                "kernel_contributions": {k: _rounded(v) for k, v in zip(r.kernel_names, contrib[j])},
            }
            for rank, j in enumerate(order, 1)
        ]
        return {"kernel_names": list(r.kernel_names), "ranking": ranking}

    key = ("match", image_digest(img), tuple(captions))
    result = cache.get_or_compute(key, compute) if cache is not None else compute()
    ranking = result["ranking"]
    table = pd.DataFrame(
        [[row["rank"], row["caption"], row["itm"], row["similarity"], row["score"]] for row in ranking],
        columns=["rank", "caption", "match probability (ITM)", "similarity S", "score"],
    )
    names = result["kernel_names"]
    fig = figures.plot_contributions(
        np.array([[row["kernel_contributions"][k] for k in names] for row in ranking]).reshape(len(ranking), -1),
        names,
        [row["caption"] for row in ranking],
        title="each kernel's contribution β·K to each caption's similarity S",
    )
    top = ranking[0]["caption"]
    return table, fig, result, gr.Dropdown(choices=[row["caption"] for row in ranking], value=top)


def _explanation(
    matcher: Matcher,
    image: Any,
    caption: str | None,
    layer: int | str,
    method: str,
    scale: str,
    cache: ResultCache | None,
) -> tuple[Image.Image, Any]:
    """Check the explain options and run (or fetch from the cache) `matcher.explain`."""
    img = read_image(image)
    caption = parse_captions(caption, 1, "caption")[0]
    if method not in METHODS:
        raise gr.Error(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if scale not in SCALES:
        raise gr.Error(f"Unknown scale {scale!r}; choose one of {', '.join(SCALES)}.")
    # "default": the explain module's choice (the last layer whose word attention reaches the ITM head).
    n_layers = len(matcher.fusion_kernel_weights())
    if layer in (None, "", DEFAULT_LAYER):
        layer = None
    else:
        try:
            layer = check_whole_number(layer, "the fusion layer", -99, 99)  # whether it exists: checked below
        except ValueError as e:
            raise gr.Error(str(e)) from e
    if layer is not None and n_layers and not -n_layers <= layer < n_layers:
        raise gr.Error(f"Fusion layer {layer} does not exist; this checkpoint has {n_layers} (0 to {n_layers - 1}).")

    def compute() -> Any:
        return matcher.explain(img, caption, layer=layer, method=method, normalize=scale)

    key = (image_digest(img), caption, layer, method, scale)
    if cache is None:
        return img, compute()
    return img, cache.sub("explain", EXPLAIN_CACHE_ENTRIES).get_or_compute(key, compute)


def _kernel_gallery(img: Image.Image, e: Any, word_index: int) -> list[tuple[np.ndarray, str]]:
    """One overlay per local kernel: which patches that kernel matches to the chosen word (MKL's own view)."""
    maps = getattr(e, "kernel_maps", None) or {}
    return [(overlay(img, m[word_index]), name) for name, m in maps.items() if word_index < len(m)]


def explain(
    matcher: Matcher,
    image: Any,
    caption: str | None,
    layer: int | str = DEFAULT_LAYER,
    method: str = "gradcam",
    scale: str = "per_map",
    cache: ResultCache | None = None,
) -> tuple:
    """Heatmaps for one image-caption pair: where the caption, and each of its words, looks in the image.

    Args:
        layer: fusion layer (0-based) or "default" (the layer whose word attention reaches the ITM head).
        method: "gradcam", "attention" or "kernel".
        scale: "per_map" (each map on its own scale) or "shared" (word maps on one scale, so they compare).

    Returns:
        (caption overlay (H, W, 3) uint8, per-word gallery [(overlay, word)], word-selector update,
        per-kernel gallery for the first word [(overlay, kernel)], info dict).
    """
    img, e = _explanation(matcher, image, caption, layer, method, scale, cache)
    words = list(e.tokens)
    word_maps = np.asarray(e.word_heatmaps, dtype=np.float32)  # (n_words, H, W) in [0, 1], scaled by the library
    gallery = [(overlay(img, m), w) for w, m in zip(words, word_maps)]
    # Where each word looks hardest, in original-image pixels (x, y): a quick check of localisation.
    peaks = {w: [int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape)[::-1]] for w, m in zip(words, word_maps)}
    info = {
        "caption": parse_captions(caption, 1, "caption")[0],
        "tokens": words,
        "itm": _rounded(e.itm),
        "similarity": _rounded(e.similarity),
        "kernel_weights": {k: _rounded(v) for k, v in e.kernel_weights.items()},
        "kernel_contributions": {k: _rounded(v) for k, v in (getattr(e, "contributions", None) or {}).items()},
        "layer": int(getattr(e, "layer", layer)),
        "method": method,
        "scale": scale,
        "word_peaks": peaks,
    }
    selector = gr.Dropdown(choices=words, value=words[0] if words else None)
    kernels = _kernel_gallery(img, e, 0) if words else []
    return overlay(img, np.asarray(e.caption_heatmap)), gallery, selector, kernels, info


def select_word(
    matcher: Matcher,
    image: Any,
    caption: str | None,
    layer: int | str,
    method: str,
    scale: str,
    word: str | None,
    cache: ResultCache | None = None,
) -> tuple:
    """Show one word: select it in the per-word gallery and draw each local kernel's map for it."""
    img, e = _explanation(matcher, image, caption, layer, method, scale, cache)
    words = list(e.tokens)
    if word not in words:
        raise gr.Error(f"{word!r} is not a word of the explained caption; pick one of: {', '.join(words)}.")
    i = words.index(word)
    return gr.Gallery(selected_index=i), _kernel_gallery(img, e, i)


def matrix(
    matcher: Matcher,
    files: Sequence[Any] | None,
    captions_text: str,
    kind: str = "itm",
    cache: ResultCache | None = None,
) -> tuple:
    """Score every uploaded image against every caption.

    Returns:
        (matrix figure, best-match DataFrame, result dict with `itm`, `similarity`, `score` as nested lists).
    """
    if kind not in SCORE_KINDS:
        raise gr.Error(f"Unknown score {kind!r}; choose one of {', '.join(SCORE_KINDS)}.")
    images, names = read_images(files, MAX_MATRIX_IMAGES)
    captions = parse_captions(captions_text, MAX_MATRIX_CAPTIONS)

    def compute() -> dict:
        r = matcher.score(images, captions)
        return {
            "images": names,
            "captions": captions,
            "kernel_names": list(r.kernel_names),
            **{k: np.round(np.asarray(getattr(r, k), dtype=np.float64), 6).tolist() for k in SCORE_KINDS},
        }

    key = ("matrix", tuple(image_digest(im) for im in images), tuple(captions))
    result = dict(cache.get_or_compute(key, compute) if cache is not None else compute())
    result["images"] = names  # the same pixels may arrive under another file name
    scores = np.asarray(result[kind])  # (n_images, n_captions)
    rows = [["image → caption", names[i], captions[j], scores[i, j]] for i, j in enumerate(scores.argmax(1))]
    rows += [["caption → image", captions[j], names[i], scores[i, j]] for j, i in enumerate(scores.argmax(0))]
    best = pd.DataFrame(rows, columns=["direction", "query", "best match", kind])
    return matrix_figure(scores, names, captions, kind), best, result


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


def search(
    matcher: Matcher,
    query_text: str | None,
    query_image: Any,
    gallery_files: Sequence[Any] | None,
    gallery_captions: str | None,
    top_k: int | float = 5,
    cache: ResultCache | None = None,
    example_gallery: Gallery | None = None,
) -> tuple:
    """Text → top images and image → top captions over a gallery (the uploaded one, else the shipped examples).

    Returns:
        (image results [(image, label)], caption results DataFrame, timings dict in milliseconds per stage).
    """
    has_text, has_image = bool((query_text or "").strip()), query_image not in (None, "")
    if not has_text and not has_image:
        raise gr.Error("Enter a text query (searches images), upload a query image (searches captions), or both.")
    try:
        top_k = check_whole_number(top_k, "top k", 1, MAX_TOP_K)
    except ValueError as e:
        raise gr.Error(str(e)) from e
    if not 1 <= top_k <= MAX_TOP_K:
        raise gr.Error(f"top k must be between 1 and {MAX_TOP_K}.")
    example_gallery = example_gallery or load_example_gallery()
    timings: dict[str, float] = {}
    image_hits: list[tuple[Any, str]] = []
    caption_hits = pd.DataFrame(columns=["rank", "caption", "score", "match probability (ITM)", "similarity S"])

    def indexed(kind: str, items: Sequence[Any], digest: tuple, build: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
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
        index = indexed("images", images, tuple(image_digest(i) for i in images), lambda: matcher.index_images(images))
        r = matcher.search_images(index, query, top_k=min(top_k, len(images)))
        timings.update({f"text→image {k}": 1e3 * float(v) for k, v in r.timings.items()})
        image_hits = [
            (shown[i], f"#{rank} {names[i]}: score {s:.3f}, ITM {p:.3f}")
            for rank, (i, s, p) in enumerate(zip(r.indices, r.scores, r.itm), 1)
        ]
    if has_image:
        img = read_image(query_image, "The query image")
        if (gallery_captions or "").strip():
            captions = parse_captions(gallery_captions, MAX_GALLERY_CAPTIONS, "gallery captions")
        else:
            captions = example_gallery.captions
        index = indexed("captions", captions, tuple(captions), lambda: matcher.index_captions(captions))
        r = matcher.search_captions(index, img, top_k=min(top_k, len(captions)))
        timings.update({f"image→text {k}": 1e3 * float(v) for k, v in r.timings.items()})
        caption_hits = pd.DataFrame(
            [
                [rank, captions[i], _rounded(s), _rounded(p), _rounded(q)]
                for rank, (i, s, p, q) in enumerate(zip(r.indices, r.scores, r.itm, r.similarity), 1)
            ],
            columns=caption_hits.columns,
        )
    return image_hits, caption_hits, {k: round(v, 3) for k, v in timings.items()}


def model_info(matcher: Matcher) -> tuple:
    """The checkpoint's learned kernel weights (global and per fusion layer: figures and a table), card and metrics."""
    weights = matcher.kernel_weights()
    levels = matcher.fusion_kernel_weights()
    names = list(dict.fromkeys([*weights, *(k for lv in levels for k in lv)]))
    # Fusion layers weigh only the local kernels (their attention bias): other kernels' cells stay empty.
    table = pd.DataFrame(
        [["similarity S", *[_rounded(weights[k]) if k in weights else None for k in names]]]
        + [
            [f"fusion layer {i + 1}", *[_rounded(lv[k]) if k in lv else None for k in names]]
            for i, lv in enumerate(levels)
        ],
        columns=["where", *names],
    )
    card = matcher.card or "_This checkpoint has no card._"
    global_plot = figures.plot_kernel_weights(weights, title="kernel weights β of the similarity S")
    levels_plot = figures.plot_fusion_kernel_weights(levels) if levels else None
    return global_plot, levels_plot, table, card, dict(matcher.metrics or {})


def layer_choices(matcher: Matcher) -> list[tuple[str, int]]:
    n = len(matcher.fusion_kernel_weights())
    return [(DEFAULT_LAYER, DEFAULT_LAYER)] + [(str(i + 1), i) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# The UI
# --------------------------------------------------------------------------------------------------------------

INTRO = """# MKL-VisITA: which caption fits this picture, and where does each word look?
Match probability (ITM) comes from the cross-modal fusion head and is absolute: one caption alone can score low.
Similarity S is the learned mix of base kernels; its bars show each kernel's share."""


def load_examples(examples_dir: Path = EXAMPLES_DIR) -> list[dict]:
    path = examples_dir / "examples.json"
    return json.loads(path.read_text())["examples"] if path.exists() else []


def create_demo(
    matcher: Matcher,
    checkpoints: Sequence[str] = (),
    *,
    loader: Callable[[str], Matcher] = load_checkpoint,
    examples_dir: Path = EXAMPLES_DIR,
    cache_seconds: int = CACHE_SECONDS,
) -> gr.Blocks:
    """Build the demo around a loaded Matcher.

    Args:
        matcher: the default checkpoint, already loaded (`Matcher.default()` for `python app.py`).
        checkpoints: extra allow-listed checkpoints (`dir_or_hub_id[@revision]`), loaded on demand by `loader`.
        loader: loads an allow-listed checkpoint; tests pass a stub.
        examples_dir: folder with examples.json and the example images.
    """
    registry = Registry(matcher, checkpoints, loader)
    examples = load_examples(examples_dir)
    example_gallery = load_example_gallery(examples_dir) if examples else Gallery([], [], [], [])
    model_call = {"concurrency_id": "model", "concurrency_limit": 1}
    image_call = {**model_call, **RAW_INPUTS}

    def with_checkpoint(fn: Callable, **extra: Any) -> Callable:
        """Adapt a handler to the UI: the session's checkpoint name comes first, the Matcher and cache are looked up."""

        @functools.wraps(fn)
        def wrapper(checkpoint: str, *args: Any) -> Any:
            entry = registry.get(checkpoint)
            return fn(entry.matcher, *args, cache=entry.cache, **extra)

        # gradio reads the signature for the API docs; the state input is not part of the public API.
        params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("cache", *extra)]
        wrapper.__signature__ = inspect.Signature([params[0].replace(name="checkpoint", annotation=str), *params[1:]])
        return user_errors(wrapper)

    # Gradio's own cache deletion bounds the temp folder: every cache_seconds, uploads and outputs older than that go.
    with gr.Blocks(title="MKL-VisITA demo", delete_cache=(cache_seconds, cache_seconds)) as demo:
        checkpoint = gr.State(DEFAULT_CHECKPOINT)
        gr.Markdown(INTRO)
        with gr.Tabs():
            # ---------------------------------------------------------------------------------- Match
            with gr.Tab("Match", id="match"):
                with gr.Row():
                    with gr.Column(scale=2):
                        m_image = gr.Image(label="Image", height=320, elem_id="match-image", **IMAGE_UPLOAD)
                        m_captions = gr.Textbox(
                            lines=6,
                            label=f"Captions, one per line (up to {MAX_CAPTIONS}, {MAX_CAPTION_CHARS} characters each)",
                            placeholder="a red circle left of a blue square\na green triangle",
                            elem_id="match-captions",
                        )
                        m_button = gr.Button("Match", variant="primary", elem_id="match-button")
                    with gr.Column(scale=3):
                        m_table = gr.Dataframe(label="Captions ranked by match probability", elem_id="match-ranking")
                        m_contrib = gr.Image(
                            label="Kernel contributions", show_label=False, interactive=False, **FIGURE
                        )
                gr.Markdown("### Where does each word look?")
                with gr.Row():
                    e_caption = gr.Dropdown(
                        label="Explain caption (pick a ranked one or type your own)",
                        choices=[],
                        allow_custom_value=True,  # any caption can be explained, not only the ranked ones
                        elem_id="explain-caption",
                        scale=3,
                    )
                    e_layer = gr.Dropdown(
                        label="Fusion layer",
                        choices=layer_choices(matcher),
                        value=DEFAULT_LAYER,
                        elem_id="explain-layer",
                        scale=1,
                    )
                    e_method = gr.Radio(list(METHODS), value="gradcam", label="Method", scale=2)
                    e_scale = gr.Radio([("per map", "per_map"), ("shared", "shared")], value="per_map", label="Scale")
                with gr.Row():
                    e_heat = gr.Image(label="Caption heatmap", interactive=False, elem_id="caption-heatmap", scale=2)
                    with gr.Column(scale=3):
                        e_words = gr.Gallery(label="Per-word heatmaps", columns=5, height=260, elem_id="word-maps")
                        with gr.Row():
                            e_word = gr.Dropdown(label="Word", choices=[], elem_id="explain-word", scale=1)
                            e_kernels = gr.Gallery(
                                label="The word under each local kernel",
                                columns=4,
                                height=160,
                                elem_id="kernel-maps",
                                scale=3,
                            )
                with gr.Accordion("Numbers (JSON)", open=False):
                    m_json = gr.JSON(label="Match result")
                    e_json = gr.JSON(label="Explanation")
                m_inputs = [checkpoint, m_image, m_captions]
                m_outputs = [m_table, m_contrib, m_json, e_caption]
                e_inputs = [checkpoint, m_image, e_caption, e_layer, e_method, e_scale]
                e_outputs = [e_heat, e_words, e_word, e_kernels, e_json]
                match_fn = with_checkpoint(match)
                explain_fn = with_checkpoint(explain)
                m_button.click(match_fn, m_inputs, m_outputs, api_name="match", **image_call).success(
                    explain_fn, e_inputs, e_outputs, api_name="explain", **image_call
                )
                for control in (e_caption, e_layer, e_method, e_scale):
                    control.input(explain_fn, e_inputs, e_outputs, api_visibility="private", **image_call)
                e_word.input(
                    with_checkpoint(select_word),
                    [*e_inputs, e_word],
                    [e_words, e_kernels],
                    api_visibility="private",
                    **image_call,
                )
                if examples:
                    ex = gr.Examples(
                        [[str(examples_dir / e["image"]), "\n".join(e["captions"])] for e in examples],
                        inputs=[m_image, m_captions],
                        label="Examples (outputs are cached per checkpoint after the first click)",
                        api_visibility="private",
                    )
                    ex.load_input_event.then(
                        match_fn, m_inputs, m_outputs, api_visibility="private", **image_call
                    ).success(explain_fn, e_inputs, e_outputs, api_visibility="private", **image_call)

            # ---------------------------------------------------------------------------------- Matrix
            with gr.Tab("Matrix", id="matrix"):
                with gr.Row():
                    with gr.Column(scale=2):
                        x_files = gr.File(
                            file_count="multiple",
                            file_types=["image"],
                            label=f"Images (up to {MAX_MATRIX_IMAGES})",
                            elem_id="matrix-images",
                        )
                        x_captions = gr.Textbox(lines=6, label=f"Captions, one per line (up to {MAX_MATRIX_CAPTIONS})")
                        x_kind = gr.Radio(list(SCORE_KINDS), value="itm", label="Score")
                        x_button = gr.Button("Score matrix", variant="primary")
                    with gr.Column(scale=3):
                        x_plot = gr.Image(label="Score matrix", interactive=False, **FIGURE)
                        x_best = gr.Dataframe(label="Best match per image and per caption")
                        x_json = gr.JSON(label="All scores")
                x_button.click(
                    with_checkpoint(matrix),
                    [checkpoint, x_files, x_captions, x_kind],
                    [x_plot, x_best, x_json],
                    api_name="matrix",
                    **model_call,
                )
                if examples:
                    gr.Examples(
                        [
                            [
                                [str(examples_dir / e["image"]) for e in examples[:MAX_MATRIX_IMAGES]],
                                "\n".join(dict.fromkeys(e["captions"][0] for e in examples[:MAX_MATRIX_CAPTIONS])),
                            ]
                        ],
                        inputs=[x_files, x_captions],
                        label="Example: every example image against each one's first caption",
                        api_visibility="private",
                    )

            # ---------------------------------------------------------------------------------- Search
            with gr.Tab("Search", id="search"):
                gr.Markdown(
                    "Searches the example gallery shipped in `assets/` unless you upload images or captions. "
                    "Stage 1 ranks every candidate by the similarity S on cached embeddings; stage 2 re-scores the "
                    "top k with the fusion (ITM) head."
                )
                with gr.Row():
                    with gr.Column(scale=2):
                        s_text = gr.Textbox(label="Text query → images", placeholder="a cup of coffee")
                        s_image = gr.Image(label="Image query → captions", height=200, **IMAGE_UPLOAD)
                        s_k = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="top k")
                        with gr.Accordion("Your own gallery (optional)", open=False):
                            s_files = gr.File(
                                file_count="multiple",
                                file_types=["image"],
                                label=f"Gallery images (up to {MAX_GALLERY_IMAGES})",
                            )
                            s_captions = gr.Textbox(lines=4, label=f"Gallery captions (up to {MAX_GALLERY_CAPTIONS})")
                        s_button = gr.Button("Search", variant="primary")
                    with gr.Column(scale=3):
                        s_images = gr.Gallery(label="Top images", columns=3, height=300)
                        s_caps = gr.Dataframe(label="Top captions")
                        s_time = gr.JSON(label="Time per stage (ms)")
                s_button.click(
                    with_checkpoint(search, example_gallery=example_gallery),
                    [checkpoint, s_text, s_image, s_files, s_captions, s_k],
                    [s_images, s_caps, s_time],
                    api_name="search",
                    **image_call,
                )

            # ---------------------------------------------------------------------------------- Model
            with gr.Tab("Model", id="model"):
                with gr.Row():
                    k_choice = gr.Dropdown(
                        registry.choices, value=DEFAULT_CHECKPOINT, label="Checkpoint (allow-list)", scale=3
                    )
                    k_button = gr.Button("Load", scale=1)
                k_status = gr.Markdown(f"Using **{DEFAULT_CHECKPOINT}**.")
                with gr.Row():
                    k_plot = gr.Image(label="Learned kernel weights (similarity S)", interactive=False, **FIGURE)
                    k_levels = gr.Image(
                        label="Fusion layers' weights over the local kernels", interactive=False, **FIGURE
                    )
                k_table = gr.Dataframe(label="Kernel weights per level")
                with gr.Row():
                    k_card = gr.Markdown(label="Checkpoint card", container=True, max_height=500)
                    k_metrics = gr.JSON(label="Metrics")

                def show_model(choice: str) -> tuple:
                    return model_info(registry.get(choice).matcher)

                def choose(choice: str) -> tuple:
                    choice = registry.check(choice)  # refuses anything outside the allow-list
                    entry = registry.get(choice)
                    return (
                        choice,
                        f"Using **{choice}**.",
                        gr.Dropdown(choices=layer_choices(entry.matcher), value=DEFAULT_LAYER),
                        *model_info(entry.matcher),
                    )

                k_button.click(
                    user_errors(choose),
                    [k_choice],
                    [checkpoint, k_status, e_layer, k_plot, k_levels, k_table, k_card, k_metrics],
                    api_visibility="private",
                    **model_call,
                )
                demo.load(
                    user_errors(show_model),
                    [checkpoint],
                    [k_plot, k_levels, k_table, k_card, k_metrics],
                    api_visibility="private",
                )

    # api_open=False: direct POSTs to /run/<name> would skip the queue and its bounds (Spaces sets this by itself).
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1, api_open=False)
    demo.registry = registry  # for tests and for callers who want to inspect what is loaded
    return demo


CSS = "#caption-heatmap img, #word-maps img {image-rendering: auto;}"


def launch_kwargs() -> dict[str, Any]:
    """Launch settings that suit a 2-CPU Space; tests launch with the same ones."""
    return {
        "max_file_size": MAX_FILE_SIZE,
        "ssr_mode": False,  # no Node server: one process, fewer moving parts, nothing rendered server-side
        "allowed_paths": [str(EXAMPLES_DIR)],  # the only files served besides uploads and gradio's own cache
        "show_error": False,  # unexpected exceptions show a generic error, not a traceback; gr.Error still shows
        "mcp_server": False,
        "footer_links": ["api", "gradio"],
        "theme": gr.themes.Soft(),
        "css": CSS,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MKL-VisITA web demo (Gradio).")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="DIR_OR_HUB_ID[@REVISION]",
        help=f"add a checkpoint to the allow-list (repeatable; also ${CHECKPOINTS_ENV}, comma-separated)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    allowed = allowed_checkpoints(args.checkpoint)[1:]  # the default is always first
    demo = create_demo(Matcher.default(), allowed)
    demo.launch(server_name=args.host, server_port=args.port, **launch_kwargs())


if __name__ == "__main__":
    main()
