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

Decisions: text in figures falls back, glyph by glyph, through :data:`FONT_FALLBACK` (matplotlib >= 3.6 font
fallback), so captions in Chinese, Japanese, Korean or with emoji draw instead of missing-glyph boxes. The fonts are
Debian packages: DejaVu Sans (matplotlib ships it), Noto Sans CJK (``fonts-noto-cjk``: Chinese, Japanese, Korean;
Droid Sans Fallback from ``fonts-droid-fallback`` is used where it is the one installed, without Hangul) and
Symbola (``fonts-symbola``: emoji and symbols, monochrome; colour emoji fonts are bitmaps matplotlib cannot draw).
Families that are not installed are left out of the list (no warning per figure); without them such glyphs draw
as boxes, as before. Setting the list changes matplotlib's ``font.family`` for the process, once, at import.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

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


def overlay(image: ImageInput, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend a [0, 1] heatmap over an image (no matplotlib figure: fast enough for every UI update).

    The heatmap is resized to the image when its shape differs; values outside [0, 1] are clipped.
    """
    img = load_image(image)
    h = np.clip(np.nan_to_num(_fit(heatmap, img.size)), 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](h)[..., :3]  # (H, W, 3) in [0, 1]
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
    colours = matplotlib.colormaps[cmap](h)[..., :3]  # (H, W, 3) in [0, 1]
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
            method=args.method or ("gradcam" if model.config.fusion.enabled else "kernel"),
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
