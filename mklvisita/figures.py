"""Figures for explanations and kernel weights: PIL images for the app, PNG / SVG / PDF for papers.

Every figure is a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas; ``pyplot`` is never used, so no
global figure registry fills up, nothing depends on a display, and rendering from several threads is safe.
A figure is released (``clf``) as soon as it has been rendered or saved: thousands of calls do not leak.

Each ``plot_*`` function returns a PIL image; ``save=path`` also writes the file (format from the suffix) and
``figure=True`` returns the unrendered :class:`Figure` instead, for further styling. :func:`overlay` blends a
heatmap onto an image with no figure at all (fast, for the app).

Command line (a figure set for one image and some captions)::

    python -m mklvisita.figures --checkpoint DIR|HUB_ID --image photo.jpg --caption "a dog" --caption "a cat" \
        --out figures/ [--format png svg] [--method gradcam] [--layer 0]
    python -m mklvisita.figures --checkpoint DIR --shapes 3 --out docs/figures   # a shapes test scene

Decisions: the Match tab's kernel bars (:func:`contribution_bars`) are drawn with PIL straight into an image, the
same chart as :func:`plot_contributions` (colours, stacking, total tick, legend, axis) without a matplotlib figure: a
figure costs about 100 ms of Python per request (layout and text), about as much as the model call it shows, and a web
server drawing one per request spends half its CPU there; the PIL chart costs a few ms. Its text uses the same fonts
in the same fallback order, glyph by glyph (:class:`FallbackText`). Files for papers stay matplotlib figures.

Text in figures falls back, glyph by glyph, through :data:`FONT_FALLBACK` (matplotlib >= 3.6 font
fallback), so captions in Chinese, Japanese, Korean or with emoji draw instead of missing-glyph boxes. The fonts are
Debian packages: DejaVu Sans (matplotlib ships it), Noto Sans CJK (``fonts-noto-cjk``: Chinese, Japanese, Korean;
Droid Sans Fallback from ``fonts-droid-fallback`` is used where it is the one installed, without Hangul) and
Symbola (``fonts-symbola``: emoji and symbols, monochrome; colour emoji fonts are bitmaps matplotlib cannot draw).
Families that are not installed are left out of the list (no warning per figure); without them such glyphs draw
as boxes, as before. Setting the list changes matplotlib's ``font.family`` for the process, once, at import.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .inputs import ImageInput, load_image

FigureLike = Union[Figure, Callable[[], Figure]]
DPI = 100
# Fallback order for text (module docstring): Latin, Greek and Cyrillic; CJK; emoji and symbols.
FONT_FALLBACK = ("DejaVu Sans", "Noto Sans CJK JP", "Droid Sans Fallback", "Symbola")
# Where the Debian packages put them: matplotlib's font cache, built before a package was installed, misses them.
FONT_FILES = {
    "Noto Sans CJK JP": "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "Droid Sans Fallback": "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "Symbola": "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf",
}


def _use_font_fallback() -> list[str]:
    """Set matplotlib's font family to the installed families of :data:`FONT_FALLBACK`; returns them."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name, file in FONT_FILES.items():
        if name not in installed and Path(file).is_file():
            try:
                font_manager.fontManager.addfont(file)
                installed.add(name)
            except (OSError, RuntimeError):  # an unreadable font file: that family is left out
                pass
    families = [name for name in FONT_FALLBACK if name in installed] or ["sans-serif"]
    matplotlib.rcParams["font.family"] = families
    return families


FONT_FAMILIES = _use_font_fallback()


# ------------------------------------------------------------------------------------------ rendering
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render(fig: FigureLike) -> Image.Image:
    """Draw a figure into an RGB PIL image and release it."""
    fig = fig() if callable(fig) and not isinstance(fig, Figure) else fig
    try:
        canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        return Image.fromarray(rgba[..., :3].copy(), "RGB")
    finally:
        fig.clf()


def save_figure(fig: FigureLike, path: str | Path) -> Path:
    """Write a figure (or a function returning one) to ``path``; the format follows the suffix (png, svg, pdf)."""
    fig = fig() if callable(fig) and not isinstance(fig, Figure) else fig
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"unsupported figure format {fmt!r} ({path.name}); use .png, .svg or .pdf")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
        # svg/pdf metadata without dates keeps the files reproducible
        metadata = {"Date": None} if fmt in ("svg", "pdf") else None
        canvas.print_figure(str(path), format=fmt, dpi=DPI, metadata=metadata)
    finally:
        fig.clf()
    return path


def _finish(fig: Figure, save: str | Path | None, figure: bool) -> Image.Image | Figure:
    if figure:
        return fig
    if save is not None:
        buf = io.BytesIO()
        fig.canvas.print_figure(buf, format="png", dpi=DPI)  # keep the figure intact for the PIL render below
        save_figure(fig, save)  # releases it
        return Image.open(buf).convert("RGB")
    return render(fig)


# ------------------------------------------------------------------------------------------ overlays
def _fit(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A heatmap resized (bilinear) to ``size`` = (W, H) when it does not already match."""
    h = np.asarray(heatmap, dtype=np.float32)
    if h.shape != (size[1], size[0]):
        h = np.asarray(Image.fromarray(h, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return h


@functools.lru_cache(maxsize=16)
def _colour_table(cmap: str) -> np.ndarray:
    """A colour map's N colours, (N, 3) float32 in [0, 1]."""
    cm = matplotlib.colormaps[cmap]
    return np.asarray(cm(np.arange(cm.N))[:, :3], dtype=np.float32)


def _colours(cmap: str, h: np.ndarray) -> np.ndarray:
    """``matplotlib.colormaps[cmap](h)[..., :3]`` for a [0, 1] map, as float32 from a table (the same bins: value v
    takes colour ``min(int(v * N), N - 1)``), without the float64 RGBA image the colour map's call builds."""
    table = _colour_table(cmap)
    index = np.minimum((h * len(table)).astype(np.intp), len(table) - 1)
    return table[index]


def overlay(image: ImageInput, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend a [0, 1] heatmap over an image (no matplotlib figure: fast enough for every UI update).

    The heatmap is resized to the image when its shape differs; values outside [0, 1] are clipped.
    """
    img = load_image(image)
    h = np.clip(np.nan_to_num(_fit(heatmap, img.size)), 0.0, 1.0)
    colours = _colours(cmap, h)  # (H, W, 3) in [0, 1]
    base = np.asarray(img, dtype=np.float32) / 255.0
    out = (1.0 - alpha) * base + alpha * colours
    return Image.fromarray((out * 255.0).round().astype(np.uint8), "RGB")


def overlay_transparent(
    image: ImageInput,
    heatmap: np.ndarray,
    cmap: str = "inferno",
    max_alpha: float = 0.75,
    floor: float = 0.35,
) -> Image.Image:
    """Blend a [0, 1] heatmap over an image with a perceptual colormap, opaque only where the map is high.

    The colour's opacity grows with the map, from 0 at ``floor`` (and below) to ``max_alpha`` at 1, so the image
    shows through unchanged wherever the map is low and its own colours can still be checked (a uniform blend, as
    :func:`overlay` does, tints the whole picture). The heatmap is resized to the image when its shape differs.
    """
    img = load_image(image)
    h = np.clip(np.nan_to_num(_fit(heatmap, img.size)), 0.0, 1.0)  # (H, W)
    colours = _colours(cmap, h)  # (H, W, 3) in [0, 1]
    alpha = max_alpha * np.clip((h - floor) / max(1e-6, 1.0 - floor), 0.0, 1.0)[..., None]  # (H, W, 1)
    base = np.asarray(img, dtype=np.float32) / 255.0
    out = (1.0 - alpha) * base + alpha * colours
    return Image.fromarray((out * 255.0).round().astype(np.uint8), "RGB")


def _show_heatmap(ax, img: Image.Image, heatmap: np.ndarray, cmap: str, alpha: float, title: str | None):
    ax.imshow(img)
    im = ax.imshow(_fit(heatmap, img.size), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return im


def plot_heatmap(
    image: ImageInput,
    heatmap: np.ndarray,
    *,
    title: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    save: str | Path | None = None,
    figure: bool = False,
) -> Image.Image | Figure:
    """One heatmap over the image, with a colour bar."""
    img = load_image(image)
    aspect = img.height / img.width
    fig = _new_figure(4.2, max(2.0, 3.4 * aspect + 0.5))
    ax = fig.add_subplot()
    im = _show_heatmap(ax, img, heatmap, cmap, alpha, title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _finish(fig, save, figure)


def plot_word_maps(
    image: ImageInput,
    tokens: Sequence[str],
    maps: np.ndarray,
    *,
    caption_map: np.ndarray | None = None,
    title: str | None = None,
    ncols: int = 4,
    cmap: str = "jet",
    alpha: float = 0.5,
    save: str | Path | None = None,
    figure: bool = False,
) -> Image.Image | Figure:
    """A grid of per-word heatmaps (n_words, H, W), the caption's map first when given; one shared colour bar."""
    img = load_image(image)
    panels = ([("caption", caption_map)] if caption_map is not None else []) + list(zip(tokens, maps))
    if not panels:
        raise ValueError("no maps to plot")
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    aspect = img.height / img.width
    fig = _new_figure(2.2 * ncols + 0.8, 2.2 * aspect * nrows + (0.5 if title else 0.2))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    im = None
    for ax, (label, m) in zip(axes, panels):
        im = _show_heatmap(ax, img, m, cmap, alpha, label)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, save, figure)


# ------------------------------------------------------------------------------------------ kernel weights
def plot_kernel_weights(
    weights: dict[str, float],
    *,
    pair_weights: dict[str, float] | None = None,
    title: str = "kernel weights",
    save: str | Path | None = None,
    figure: bool = False,
) -> Image.Image | Figure:
    """Global kernel weights beta as bars; with ``pair_weights`` (the effective beta of one pair) side by side."""
    names = list(weights)
    y = np.arange(len(names))
    fig = _new_figure(5.0, 0.3 * len(names) + 1.2)
    ax = fig.add_subplot()
    if pair_weights is None:
        ax.barh(y, [weights[n] for n in names], color="tab:blue")
    else:
        ax.barh(y - 0.2, [weights[n] for n in names], height=0.4, label="global", color="tab:blue")
        ax.barh(y + 0.2, [pair_weights.get(n, 0.0) for n in names], height=0.4, label="this pair", color="tab:orange")
        ax.legend(fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("weight (sums to 1)")
    ax.set_title(title, fontsize=10)
    return _finish(fig, save, figure)


def plot_fusion_kernel_weights(
    weights: np.ndarray | Sequence[dict[str, float]],
    names: Sequence[str] | None = None,
    *,
    image_levels: Sequence[int] | None = None,
    title: str = "kernel weights per fusion layer",
    save: str | Path | None = None,
    figure: bool = False,
) -> Image.Image | Figure:
    """Each fusion layer's weights over the local kernels, (L, n) as an annotated heatmap."""
    if len(weights) and isinstance(weights[0], dict):
        names = list(weights[0]) if names is None else list(names)
        weights = np.array([[row[n] for n in names] for row in weights], dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"fusion kernel weights must be (layers, kernels), got shape {w.shape}")
    names = list(names) if names is not None else [f"kernel {i}" for i in range(w.shape[1])]
    fig = _new_figure(1.1 * w.shape[1] + 2.0, 0.45 * w.shape[0] + 1.4)
    ax = fig.add_subplot()
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(w.max())), aspect="auto")
    for (i, j), v in np.ndenumerate(w):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < w.max() / 2 else "black")
    ax.set_xticks(range(w.shape[1]), names, fontsize=8, rotation=30, ha="right")
    rows = [f"layer {i}" + (f" (block {image_levels[i]})" if image_levels else "") for i in range(w.shape[0])]
    ax.set_yticks(range(w.shape[0]), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _finish(fig, save, figure)


def plot_contributions(
    contributions: np.ndarray,
    kernel_names: Sequence[str],
    captions: Sequence[str],
    *,
    title: str = "kernel contributions to the similarity",
    save: str | Path | None = None,
    figure: bool = False,
) -> Image.Image | Figure:
    """Stacked bars of beta_m K_m per caption, (n_captions, n_kernels); positive parts stack right, negative left.

    A black tick marks each caption's total similarity S (the sum of its contributions).
    """
    c = np.asarray(contributions, dtype=np.float32)
    if c.ndim != 2 or c.shape != (len(captions), len(kernel_names)):
        raise ValueError(
            f"contributions must be (n_captions={len(captions)}, n_kernels={len(kernel_names)}), got shape {c.shape}"
        )
    fig = _new_figure(8.0, max(0.5 * len(captions), 0.18 * len(kernel_names)) + 1.4)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    y = np.arange(len(captions))
    pos_left, neg_left = np.zeros(len(captions)), np.zeros(len(captions))
    for k, name in enumerate(kernel_names):
        v = c[:, k]
        left = np.where(v >= 0, pos_left, neg_left)
        ax.barh(y, v, left=left, color=cmap(k % 20), label=name, height=0.6)
        pos_left += np.clip(v, 0, None)
        neg_left += np.clip(v, None, 0)
    ax.scatter(c.sum(1), y, marker="|", s=300, color="black", label="S (total)", zorder=3)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_yticks(y, [_short(t) for t in captions], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("contribution β_m·K_m")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _finish(fig, save, figure)


def plot_score_matrix(
    scores: np.ndarray,
    image_labels: Sequence[str],
    caption_labels: Sequence[str],
    *,
    title: str = "scores",
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
    save: str | Path | None = None,
    figure: bool = False,
) -> Image.Image | Figure:
    """An (n_images, n_captions) score matrix with every value written in its cell."""
    s = np.asarray(scores, dtype=np.float32)
    if s.shape != (len(image_labels), len(caption_labels)):
        raise ValueError(
            f"scores must be (n_images={len(image_labels)}, n_captions={len(caption_labels)}), got shape {s.shape}"
        )
    fig = _new_figure(1.2 * s.shape[1] + 2.5, 0.5 * s.shape[0] + 2.0)
    ax = fig.add_subplot()
    im = ax.imshow(s, cmap=cmap, aspect="auto")
    mid = (float(s.min()) + float(s.max())) / 2
    for (i, j), v in np.ndenumerate(s):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color="white" if v < mid else "black")
    ax.set_xticks(range(s.shape[1]), [_short(t, 24) for t in caption_labels], fontsize=8, rotation=30, ha="right")
    ax.set_yticks(range(s.shape[0]), [_short(t, 24) for t in image_labels], fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _finish(fig, save, figure)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------------------------------ charts drawn with PIL
PX_PER_PT = DPI / 72  # text sizes in points, as the matplotlib figures give them, in pixels at DPI


class FallbackText:
    """PIL text with per-glyph font fallback: each character is drawn with the first of ``families`` (matplotlib
    family names, the figures' :data:`FONT_FAMILIES` by default) whose font has it, the first font where none has it.

    A font's character map is read (fontTools, which matplotlib requires) only when a character is missing from the
    fonts before it, so Latin text never opens the CJK font. Thread-safe.
    """

    def __init__(self, families: Sequence[str] | None = None) -> None:
        from matplotlib import font_manager

        found = []
        for family in families or FONT_FAMILIES:
            try:
                found.append(
                    font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
                )
            except ValueError:  # not installed: left out, as in the matplotlib figures
                pass
        found = found or [font_manager.findfont(font_manager.FontProperties())]
        # (file, face index): a collection (.ttc) holds several faces; matplotlib >= 3.10 says which one it found
        self.paths = list(dict.fromkeys((str(p), int(getattr(p, "face_index", 0))) for p in found))
        self._charmaps: dict[int, set[int]] = {}
        self._runs: dict[str, list[tuple[int, str]]] = {}  # text -> its runs
        self._masks: dict[tuple[str, int], tuple[Image.Image, int, float]] = {}  # (text, px) -> drawn
        self._fonts: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
        self._lock = threading.RLock()

    def _has(self, i: int, char: str) -> bool:
        if i not in self._charmaps:
            from fontTools.ttLib import TTFont

            try:
                file, face = self.paths[i]
                with TTFont(file, fontNumber=face, lazy=True) as font:
                    self._charmaps[i] = set(font.getBestCmap() or {})
            except Exception:  # an unreadable font: treated as having no glyphs
                self._charmaps[i] = set()
        return ord(char) in self._charmaps[i]

    def runs(self, text: str) -> list[tuple[int, str]]:
        """``text`` cut into (font index, piece) runs; spaces stay with the run they are in."""
        with self._lock:
            if text in self._runs:
                return self._runs[text]
        out: list[tuple[int, str]] = []
        with self._lock:
            if self._has_all(0, text):  # the common case: the first font has every character
                out = [(0, text)] if text else []
                chars = ""
            else:
                chars = text
            for char in chars:
                if char.isspace() and out:
                    i = out[-1][0]
                else:
                    i = next((j for j in range(len(self.paths)) if self._has(j, char)), 0)
                if out and out[-1][0] == i:
                    out[-1] = (i, out[-1][1] + char)
                else:
                    out.append((i, char))
            if len(self._runs) >= 4096:  # labels repeat (names, titles, ticks); captions come and go
                self._runs.clear()
            self._runs[text] = out
        return out

    def _has_all(self, i: int, text: str) -> bool:
        if not text:
            return True
        self._has(i, text[0])  # reads the font's character map on first use
        return set(map(ord, text)) <= self._charmaps[i]

    def font(self, i: int, px: int) -> ImageFont.FreeTypeFont:
        """Font ``i`` at ``px`` pixels, laid out left to right glyph by glyph (as matplotlib lays text out)."""
        with self._lock:
            key = (i, px)
            if key not in self._fonts:
                file, face = self.paths[i]
                self._fonts[key] = ImageFont.truetype(file, px, index=face, layout_engine=ImageFont.Layout.BASIC)
            return self._fonts[key]

    def length(self, text: str, px: int) -> float:
        """Width of ``text`` in pixels at size ``px``."""
        return self._rendered(text, px)[2]

    def _rendered(self, text: str, px: int) -> tuple[Image.Image, int, float]:
        """``text`` at ``px`` as a coverage mask ("L"), its baseline's row in it, and its advance width; kept (labels,
        ticks and titles repeat from chart to chart)."""
        key = (text, px)
        with self._lock:
            if key in self._masks:
                return self._masks[key]
            runs = [(self.font(i, px), piece) for i, piece in self.runs(text)]
            ascent = max([f.getmetrics()[0] for f, _ in runs], default=px)
            descent = max([f.getmetrics()[1] for f, _ in runs], default=0)
            width = sum(f.getlength(piece) for f, piece in runs)
            mask = Image.new("L", (max(1, math.ceil(width) + 2), ascent + descent + 2), 0)
            pen, x = ImageDraw.Draw(mask), 0.0
            for f, piece in runs:
                pen.text((x, ascent + 1), piece, font=f, fill=255, anchor="ls")
                x += f.getlength(piece)
            if len(self._masks) >= 2048:
                self._masks.clear()
            self._masks[key] = out = (mask, ascent + 1, width)
            return out

    def draw(
        self,
        draw: ImageDraw.ImageDraw,
        xy: tuple[float, float],
        text: str,
        px: int,
        fill: Any = "black",
        align: str = "left",
    ) -> None:
        """Draw ``text`` with its vertical middle at ``xy[1]`` and its left end, centre or right end at ``xy[0]``."""
        mask, baseline_row, width = self._rendered(text, px)
        x = xy[0] - {"left": 0.0, "center": width / 2, "right": width}[align]
        baseline = xy[1] + 0.36 * px  # the middle of a capital letter (DejaVu Sans: cap height 0.73 em)
        draw.bitmap((round(x), round(baseline) - baseline_row), mask, fill=fill)


_TEXT: FallbackText | None = None


def fallback_text() -> FallbackText:
    """The process's :class:`FallbackText` over :data:`FONT_FAMILIES` (made on first use)."""
    global _TEXT
    if _TEXT is None:
        _TEXT = FallbackText()
    return _TEXT


def _nice_ticks(lo: float, hi: float, n: int) -> tuple[np.ndarray, list[str]]:
    """About ``n`` round tick values inside [lo, hi] and their labels (matplotlib's locator; a real minus sign)."""
    from matplotlib.ticker import MaxNLocator

    ticks = MaxNLocator(nbins=max(2, n), steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    ticks = ticks[(ticks >= lo - 1e-12) & (ticks <= hi + 1e-12)]
    decimals = next((d for d in range(8) if np.allclose(ticks * 10**d, np.round(ticks * 10**d), atol=1e-6)), 8)
    labels = [f"{0.0 if abs(t) < 1e-12 else t:.{decimals}f}".replace("-", "\u2212") for t in ticks]
    return ticks, labels


def contribution_bars(
    contributions: np.ndarray,
    kernel_names: Sequence[str],
    labels: Sequence[str],
    *,
    title: str = "kernel contributions to the similarity",
    xlabel: str = "contribution β_m·K_m",
    total_label: str = "S (total)",
    width: int = 800,
) -> Image.Image:
    """The chart of :func:`plot_contributions`, drawn with PIL into an RGB image (no matplotlib figure: a few ms).

    Stacked bars of (n_rows, n_kernels) contributions, one row per label from the top, positive parts stacking right
    and negative parts left; a black tick at each row's sum; a legend of the kernels on the right.
    """
    c = np.asarray(contributions, dtype=np.float64)
    if c.ndim != 2 or c.shape != (len(labels), len(kernel_names)):
        raise ValueError(
            f"contributions must be (n_captions={len(labels)}, n_kernels={len(kernel_names)}), got shape {c.shape}"
        )
    c = np.nan_to_num(c)
    n, k = c.shape
    text = fallback_text()
    size = {name: round(pt * PX_PER_PT) for name, pt in (("title", 10), ("label", 8), ("tick", 10), ("legend", 7))}
    height = round((max(0.5 * n, 0.18 * k) + 1.4) * DPI)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    labels = [_short(t, 64) for t in labels]

    # Layout: title above the axes, row labels left of them, tick labels and the axis label below, the legend right.
    pad, tick = 6, 4
    legend_w = 30 + max([text.length(s, size["legend"]) for s in [total_label, *kernel_names]], default=0)
    top = pad + round(1.6 * size["title"])
    bottom = height - pad - round(1.4 * size["tick"]) - round(1.6 * size["tick"]) - tick
    left = pad + max([text.length(s, size["label"]) for s in labels], default=0) + 2 * tick + 4
    right = width - pad - legend_w - 12
    if right - left < 80:  # very long labels: the axes keep 80 px at least
        left = right - 80

    pos = np.clip(c, 0, None).sum(1)
    neg = np.clip(c, None, 0).sum(1)
    totals = c.sum(1)
    lo = min(0.0, float(neg.min(initial=0.0)), float(totals.min(initial=0.0)))
    hi = max(0.0, float(pos.max(initial=0.0)), float(totals.max(initial=0.0)))
    span = hi - lo or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (right - left)

    row = (bottom - top) / max(n, 1)

    def y(r: int) -> float:
        return top + (r + 0.5) * row

    # Bars, kernel by kernel: positive parts stack right from 0, negative parts left.
    cmap = matplotlib.colormaps["tab20"]
    colours = [tuple(round(255 * v) for v in cmap(j % 20)[:3]) for j in range(k)]
    pos_left, neg_left = np.zeros(n), np.zeros(n)
    for j in range(k):
        v = c[:, j]
        start = np.where(v >= 0, pos_left, neg_left)
        for r in range(n):
            x0, x1 = sorted((x(start[r]), x(start[r] + v[r])))
            if x1 - x0 >= 0.5:  # at least half a pixel: one pixel wide at least
                a, b = round(x0), max(round(x0), round(x1) - 1)
                draw.rectangle([a, round(y(r) - 0.3 * row), b, round(y(r) + 0.3 * row)], colours[j])
        pos_left += np.clip(v, 0, None)
        neg_left += np.clip(v, None, 0)
    draw.line([(round(x(0.0)), top), (round(x(0.0)), bottom)], fill=(128, 128, 128), width=1)
    half = min(12.0, 0.4 * row)
    for r in range(n):  # the total of each row
        xt = round(x(totals[r]))
        draw.rectangle([xt - 1, round(y(r) - half), xt + 1, round(y(r) + half)], "black")
    draw.rectangle([left, top, right, bottom], outline="black", width=1)

    # Axes text: row labels, x ticks, the axis label, the title.
    for r, label in enumerate(labels):
        draw.line([(left - tick, round(y(r))), (left, round(y(r)))], fill="black")
        text.draw(draw, (left - 2 * tick - 2, y(r)), label, size["label"], align="right")
    ticks, tick_labels = _nice_ticks(lo, hi, int((right - left) // (3 * size["tick"])))  # as matplotlib spaces them
    for t, s in zip(ticks, tick_labels):
        xt = round(x(t))
        draw.line([(xt, bottom), (xt, bottom + tick)], fill="black")
        text.draw(draw, (xt, bottom + tick + 0.8 * size["tick"]), s, size["tick"], align="center")
    text.draw(draw, ((left + right) / 2, height - pad - 0.7 * size["tick"]), xlabel, size["tick"], align="center")
    text.draw(draw, ((left + right) / 2, pad + 0.7 * size["title"]), title, size["title"], align="center")

    # Legend: the total's tick, then each kernel's colour.
    step = round(1.5 * size["legend"])
    ly = (top + bottom) / 2 - step * (k + 1) / 2 + step / 2
    lx = right + 14
    draw.rectangle([lx + 9, round(ly - 0.6 * size["legend"]), lx + 10, round(ly + 0.6 * size["legend"])], "black")
    text.draw(draw, (lx + 26, ly), total_label, size["legend"])
    for j, name in enumerate(kernel_names):
        yy = ly + (j + 1) * step
        draw.rectangle([lx, round(yy - 0.3 * size["legend"]), lx + 19, round(yy + 0.3 * size["legend"])], colours[j])
        text.draw(draw, (lx + 26, yy), name, size["legend"])
    return img


# ------------------------------------------------------------------------------------------ figure sets
def explanation_figures(image: ImageInput, explanation: Any, caption: str | None = None) -> dict[str, Image.Image]:
    """The figures of one :class:`~mklvisita.explain.Explanation` as PIL images, by name."""
    e = explanation
    label = caption or " ".join(e.tokens)
    out = {
        "caption": plot_heatmap(image, e.caption_heatmap, title=f"{e.method}: {_short(label)} (itm {e.itm:.2f})"),
        "words": plot_word_maps(image, e.tokens, e.word_heatmaps, caption_map=e.caption_heatmap),
    }
    if e.kernel_maps:
        names = list(e.kernel_maps)
        means = [m.mean(0) for m in e.kernel_maps.values()]  # each kernel's map over the whole caption
        out["kernels"] = plot_word_maps(image, names, np.stack(means), title="local kernels")
    if e.rollout is not None:
        out["rollout"] = plot_heatmap(image, e.rollout, title="ViT attention rollout")
    return out


def write_figure_set(
    model: Any,
    processor: Any,
    image: ImageInput,
    captions: Sequence[str],
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("png",),
    method: str = "gradcam",
    layer: int | None = None,
    normalize: str = "per_map",
) -> list[Path]:
    """Explain every caption against the image and write all figures to ``out_dir``; returns the files written."""
    from .explain import explain_pair

    method = method if model.has_itm or method == "kernel" else "kernel"
    out_dir = Path(out_dir)
    img = load_image(image)
    written: list[Path] = []

    def write(name: str, build: Callable[[], Figure]) -> None:
        for fmt in formats:
            written.append(save_figure(build, out_dir / f"{name}.{fmt}"))

    exps = [explain_pair(model, processor, img, c, layer=layer, method=method, normalize=normalize) for c in captions]
    for i, (c, e) in enumerate(zip(captions, exps)):
        slug = f"{i:02d}_" + re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_")[:40]
        write(
            f"{slug}_caption",
            lambda e=e, c=c: plot_heatmap(
                img, e.caption_heatmap, title=f"{e.method} layer {e.layer}: {_short(c)}", figure=True
            ),
        )
        write(
            f"{slug}_words",
            lambda e=e: plot_word_maps(
                img,
                e.tokens,
                e.word_heatmaps,
                caption_map=e.caption_heatmap,
                title=f"{e.method}, itm {e.itm:.2f}",
                figure=True,
            ),
        )
        if e.kernel_maps:
            write(
                f"{slug}_kernels",
                lambda e=e: plot_word_maps(
                    img,
                    list(e.kernel_maps),
                    np.stack([m.mean(0) for m in e.kernel_maps.values()]),
                    title="local kernel maps (mean over words)",
                    figure=True,
                ),
            )
    e0 = exps[0]
    if e0.rollout is not None:
        write("rollout", lambda: plot_heatmap(img, e0.rollout, title="ViT attention rollout", figure=True))
    write(
        "kernel_weights",
        lambda: plot_kernel_weights(
            e0.kernel_weights, pair_weights=e0.pair_kernel_weights if model.config.kernels.gate else None, figure=True
        ),
    )
    if e0.fusion_kernel_weights:
        write(
            "fusion_kernel_weights",
            lambda: plot_fusion_kernel_weights(e0.fusion_kernel_weights, image_levels=model.fusion_levels, figure=True),
        )
    names = list(e0.contributions)
    contrib = np.array([[e.contributions[n] for n in names] for e in exps])
    write("contributions", lambda: plot_contributions(contrib, names, list(captions), figure=True))
    rows = np.array([[e.itm for e in exps], [e.similarity for e in exps]])
    write(
        "scores",
        lambda: plot_score_matrix(
            rows, ["itm", "similarity"], list(captions), title="scores of the image with each caption", figure=True
        ),
    )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mklvisita.figures", description="Write the explanation figure set for an image and captions."
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint folder or Hub id (default: the embedded shapes checkpoint with --shapes, else the demo's)",
    )
    parser.add_argument("--revision", default=None, help="Hub revision to pin")
    parser.add_argument("--image", default=None, help="image file")
    parser.add_argument("--caption", action="append", default=[], help="a caption (repeat for several)")
    parser.add_argument(
        "--shapes",
        type=int,
        default=None,
        metavar="INDEX",
        help="use shapes test scene INDEX (its image, captions and first hard negative)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", nargs="+", default=["png"], choices=["png", "svg", "pdf"])
    parser.add_argument(
        "--method",
        default=None,
        choices=["gradcam", "attention", "kernel"],
        help="map method (default: gradcam, or kernel for a checkpoint without fusion such as the photo one)",
    )
    parser.add_argument("--layer", type=int, default=None, help="fusion layer (default: the second to last)")
    parser.add_argument("--normalize", default="per_map", choices=["per_map", "shared"])
    args = parser.parse_args(argv)

    if args.shapes is not None:
        from .data import ShapesScenes

        item = ShapesScenes(split="test", size=max(1000, args.shapes + 1), seed=0)[args.shapes]
        image, captions = item["image"], args.caption or [*item["captions"][:2], item["negatives"][0]]
    elif args.image is not None and args.caption:
        image, captions = args.image, args.caption
    else:
        parser.error("give --image and at least one --caption, or --shapes INDEX")

    from .inputs import Processor
    from .model import MKLVisITA

    try:
        if args.checkpoint is None:
            from .matcher import Matcher

            m = Matcher.default("shapes" if args.shapes is not None else None)
            model, processor = m.model, m.processor
        else:
            model = MKLVisITA.from_pretrained(args.checkpoint, revision=args.revision).eval()
            processor = Processor(model.config, model.tokenizer)
        files = write_figure_set(
            model,
            processor,
            image,
            captions,
            args.out,
            formats=args.format,
            method=args.method or (model.config.fusion.explain_method if model.config.fusion.enabled else "kernel"),
            layer=args.layer,
            normalize=args.normalize,
        )
    except ValueError as e:  # bad input or checkpoint: a plain message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
