"""The Match tab's handlers: one image, several captions ranked by the checkpoint's score; where each word looks.

No Gradio here: each handler takes the Matcher, the UI's values and the checkpoint's result cache, and returns
plain data (tables, PIL images, dicts, lists) that `demo/tabs/match.py` puts on the page. Bad input raises
`ValueError` with a plain message.

Decisions:

- One ranking rule, the checkpoint's own (`config.ranking`, also used by Matrix, Search, evaluation and training):
  captions are ranked by **score** = itm_weight × ITM + similarity_weight × S (S alone for a checkpoint without a
  fusion head), ties broken by S. The table says so under that name.
- The kernel bars show what differs between the captions: each kernel's contribution β·K minus its mean over the
  captions, so a kernel that gives every caption the same amount draws no bar; the tick is the caption's S minus
  the mean S (the bars' sum), and each caption's own S is written beside its name.
- Heatmaps are drawn with a perceptual colormap that is transparent where the map is low
  (`mklvisita.figures.overlay_transparent`), so the photo's own colours stay visible.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from mklvisita import Matcher, figures
from mklvisita.explain import METHODS, default_layer
from mklvisita.explain import NORMALIZE as SCALES
from mklvisita.inputs import MAX_CAPTIONS, check_whole_number

from . import batching
from .inputs import check_choice, image_digest, parse_captions, read_image
from .registry import EXPLAIN_CACHE_ENTRIES, ResultCache

DEFAULT_LAYER = "default"  # fusion-layer choice meaning mklvisita.explain's default layer
DEFAULT_METHOD = "default"  # explanation method meaning the Matcher's choice: the checkpoint's fusion.explain_method
# (Grad-CAM unless chosen otherwise at release) with fusion, else the kernel maps
FIGURE_CACHE_ENTRIES = 16  # contribution figures kept per checkpoint (about 0.7 MB each)


def rounded(x: Any, digits: int = 6) -> float | None:
    """Round for display and JSON; NaN (e.g. ITM of a checkpoint without fusion) becomes None (JSON null)."""
    x = float(x)
    return None if np.isnan(x) else round(x, digits)


def heat(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """A [0, 1] heatmap over the image: inferno, transparent where the map is low."""
    return figures.overlay_transparent(image, heatmap)


def methods(matcher: Matcher) -> list[str]:
    """The explanation methods this checkpoint supports (Grad-CAM and attention need the fusion branch)."""
    has_word_maps = bool(matcher.model.kernels.word_map_names)  # local kernels give per-word maps
    return [m for m in METHODS if (m == "kernel" and has_word_maps) or (m != "kernel" and matcher.model.has_itm)]


def default_method(matcher: Matcher) -> str | None:
    """The method the Method choice starts on: the checkpoint's own default map (``fusion.explain_method`` with the
    fusion branch, else the kernel maps), as ``matcher.explain`` takes it with no method named."""
    supported = methods(matcher)
    own = matcher.model.config.fusion.explain_method if matcher.model.has_itm else "kernel"
    return own if own in supported else (supported[0] if supported else None)


def layer_choices(matcher: Matcher) -> list[tuple[str, int | str]]:
    """(label, value) pairs: "default", then "fusion layer 1..L" (1-based labels, 0-based values as the API takes)."""
    n = len(matcher.fusion_kernel_weights())
    if not n:
        return [(f"{DEFAULT_LAYER} (no fusion layers)", DEFAULT_LAYER)]
    default = f"{DEFAULT_LAYER} (= fusion layer {default_layer(matcher.model) + 1})"
    return [(default, DEFAULT_LAYER)] + [(f"fusion layer {i + 1}", i) for i in range(n)]


# ------------------------------------------------------------------------------------------------------ ranking
class MatchView(NamedTuple):
    table: pd.DataFrame  # rank, caption, score, [ITM,] S; ranked
    figure: Image.Image  # kernel contributions relative to the captions' mean
    result: dict  # the /match JSON: kernel_names, ranking_rule, ranking [{rank, caption, itm, similarity, score, ...}]
    captions: list[str]  # ranked, for the explain selector


def relative_contributions(contrib: np.ndarray) -> np.ndarray:
    """(n_captions, n_kernels) β·K minus each kernel's mean over the captions; a row sums to its S minus the mean S."""
    contrib = np.asarray(contrib, dtype=np.float64)
    return contrib - contrib.mean(axis=0, keepdims=True)


def contributions_figure(
    contrib: np.ndarray, kernel_names: list[str], captions: list[str], sim: np.ndarray
) -> Image.Image:
    """The bars of :func:`relative_contributions`, captions in ranked order, each caption's own S beside its name
    (drawn with PIL: :func:`mklvisita.figures.contribution_bars`, a few ms instead of a matplotlib figure's ~100)."""
    labels = [f"{c if len(c) <= 36 else c[:35] + '…'}   S={s:.3f}" for c, s in zip(captions, sim)]
    return figures.contribution_bars(
        relative_contributions(contrib),
        kernel_names,
        labels,
        title="what sets the captions apart: each kernel's β·K minus its mean",
        xlabel="β·K − mean over captions   (| = S − mean S, the sum of a row's bars)",
        total_label="S − mean S",
    )


def match(matcher: Matcher, image: Any, captions_text: Any, cache: ResultCache | None = None) -> MatchView:
    """Rank captions for one image by the checkpoint's score (see the module's decisions).

    Returns:
        A MatchView; its `result` holds, per caption in ranked order, `itm` (null without fusion), `similarity`,
        `score` and `kernel_contributions` {kernel: β·K}, plus the `ranking_rule` in words.
    """
    from .registry import ranking_rule

    img = read_image(image)
    captions = parse_captions(captions_text, MAX_CAPTIONS)

    def compute() -> dict:
        r = batching.score(matcher, img, captions)  # batched with concurrent Match requests
        itm, sim, score = (np.asarray(a)[0] for a in (r.itm, r.similarity, r.score))  # (n_captions,)
        contrib = np.asarray(r.kernel_contributions)[0]  # (n_captions, n_kernels)
        order = sorted(range(len(captions)), key=lambda j: (-score[j], -sim[j]))
        ranking = [
            {
                "rank": rank,
                "caption": captions[j],
                "itm": rounded(itm[j]),
                "similarity": rounded(sim[j]),
                "score": rounded(score[j]),
                "kernel_contributions": {k: rounded(v) for k, v in zip(r.kernel_names, contrib[j])},
            }
            for rank, j in enumerate(order, 1)
        ]
        return {"kernel_names": list(r.kernel_names), "ranking_rule": ranking_rule(matcher), "ranking": ranking}

    key = ("match", image_digest(img), tuple(captions))
    result = cache.get_or_compute(key, compute) if cache is not None else compute()
    ranking = result["ranking"]
    has_itm = any(row["itm"] is not None for row in ranking)
    columns = ["rank", "caption", "score", *(["ITM"] if has_itm else []), "S"]
    table = pd.DataFrame(
        [
            [row["rank"], row["caption"], _show(row["score"]), *([_show(row["itm"])] if has_itm else [])]
            + [_show(row["similarity"])]
            for row in ranking
        ],
        columns=columns,
    )
    names = result["kernel_names"]
    contrib = np.array([[row["kernel_contributions"][k] for k in names] for row in ranking], dtype=np.float64)
    sims = np.array([row["similarity"] for row in ranking], dtype=np.float64)
    ranked = [row["caption"] for row in ranking]

    def draw() -> Image.Image:
        return contributions_figure(contrib.reshape(len(ranking), -1), names, ranked, sims)

    # Drawn from the cached numbers alone, so cached beside them: a repeated request (an example) draws nothing; each
    # caller gets its own copy of the image. Off with batching (MKLVISITA_BATCHING=off: serving as before both).
    keep = cache is not None and batching.enabled()
    figures_cache = cache.sub("match figures", FIGURE_CACHE_ENTRIES) if keep else None
    fig = figures_cache.get_or_compute(key, draw).copy() if figures_cache is not None else draw()
    return MatchView(table, fig, result, ranked)


def _show(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ------------------------------------------------------------------------------------------------- explanations
class ExplainView(NamedTuple):
    caption_map: Image.Image  # the caption's heatmap over the image, at the image's size
    words: list[tuple[Image.Image, str]]  # one overlay per word
    word: str | None  # the word whose kernel maps are shown (the first)
    kernels: list[tuple[Image.Image, str]]  # one overlay per local kernel, for `word`
    info: dict  # the /explain JSON


def check_layer(matcher: Matcher, layer: Any) -> int | None:
    """`"default"` (or empty) -> None; else a whole number that is one of the checkpoint's fusion layers (0-based)."""
    if layer in (None, "", DEFAULT_LAYER):
        return None
    layer = check_whole_number(layer, "the fusion layer", -99, 99)  # whether it exists: checked below
    n = len(matcher.fusion_kernel_weights())
    if not n:
        raise ValueError("This checkpoint has no fusion layers; choose the fusion layer 'default'.")
    if not -n <= layer < n:
        raise ValueError(f"Fusion layer {layer} does not exist; this checkpoint has {n} (0 to {n - 1} in the API).")
    return layer


def _explanation(
    matcher: Matcher,
    image: Any,
    caption: Any,
    layer: Any,
    method: str | None,
    scale: str,
    cache: ResultCache | None,
) -> tuple[Image.Image, Any]:
    """Check the explain options and run (or fetch from the cache) `matcher.explain`."""
    img = read_image(image)
    caption = parse_captions(caption, 1, "caption")[0]
    supported = methods(matcher)
    method = None if method in (None, "", DEFAULT_METHOD) else check_choice(method, METHODS, "method")
    if method is not None and method not in supported:
        raise ValueError(f"This checkpoint cannot explain by {method!r}; choose one of {', '.join(supported)}.")
    scale = check_choice(scale, SCALES, "scale")
    layer = check_layer(matcher, layer)

    def compute() -> Any:
        with batching.exclusive():
            return matcher.explain(img, caption, layer=layer, method=method, normalize=scale)

    key = (image_digest(img), caption, layer, method, scale)
    if cache is None:
        return img, compute()
    return img, cache.sub("explain", EXPLAIN_CACHE_ENTRIES).get_or_compute(key, compute)


def _kernel_gallery(img: Image.Image, e: Any, word_index: int) -> list[tuple[Image.Image, str]]:
    """One overlay per local kernel: which patches that kernel matches to the chosen word (MKL's own view)."""
    maps = getattr(e, "kernel_maps", None) or {}
    return [(heat(img, m[word_index]), name) for name, m in maps.items() if word_index < len(m)]


def explain(
    matcher: Matcher,
    image: Any,
    caption: Any,
    layer: int | str = DEFAULT_LAYER,
    method: str | None = DEFAULT_METHOD,
    scale: str = "per_map",
    cache: ResultCache | None = None,
) -> ExplainView:
    """Heatmaps for one image-caption pair: where the caption, and each of its words, looks in the image.

    Args:
        layer: fusion layer (0-based, as the API takes it; the UI labels it "fusion layer 1..L") or "default" (the
            last layer whose word attention reaches the ITM head).
        method: "gradcam", "attention", "kernel", or "default" (the checkpoint's ``fusion.explain_method`` with a
            fusion head, else the kernel maps).
        scale: "per_map" (each map on its own scale) or "shared" (word maps on one scale, so they compare).
    """
    img, e = _explanation(matcher, image, caption, layer, method, scale, cache)
    words = list(e.tokens)
    word_maps = np.asarray(e.word_heatmaps, dtype=np.float32)  # (n_words, H, W) in [0, 1], scaled by the library
    gallery = [(heat(img, m), w) for w, m in zip(words, word_maps)]
    # Where each word looks hardest, in original-image pixels (x, y): a quick check of localisation.
    peaks = {w: [int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape)[::-1]] for w, m in zip(words, word_maps)}
    used_layer = int(getattr(e, "layer", -1))
    info = {
        "caption": parse_captions(caption, 1, "caption")[0],
        "tokens": words,
        "itm": rounded(e.itm),
        "similarity": rounded(e.similarity),
        "kernel_weights": {k: rounded(v) for k, v in e.kernel_weights.items()},
        "kernel_contributions": {k: rounded(v) for k, v in (getattr(e, "contributions", None) or {}).items()},
        "layer": used_layer,
        "method": e.method,
        "scale": scale,
        "word_peaks": peaks,
    }
    kernels = _kernel_gallery(img, e, 0) if words else []
    return ExplainView(heat(img, np.asarray(e.caption_heatmap)), gallery, words[0] if words else None, kernels, info)


def select_word(
    matcher: Matcher,
    image: Any,
    caption: Any,
    layer: Any,
    method: str | None,
    scale: str,
    word: str | None,
    cache: ResultCache | None = None,
) -> tuple[int, list[tuple[Image.Image, str]]]:
    """One word of the explained caption: its index (to select it in the per-word gallery) and its kernel maps."""
    img, e = _explanation(matcher, image, caption, layer, method, scale, cache)
    words = list(e.tokens)
    if word not in words:
        raise ValueError(f"{word!r} is not a word of the explained caption; pick one of: {', '.join(words)}.")
    i = words.index(word)
    return i, _kernel_gallery(img, e, i)
