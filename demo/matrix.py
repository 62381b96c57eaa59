"""The Matrix tab's handler: several images × several captions, with the best match per image and per caption.

No Gradio here; returns plain data for `demo/tabs/matrix.py`. The default score is the checkpoint's ranking score
(the same rule Match and Search rank by); ITM and S alone can be shown too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib import patches
from PIL import Image

from mklvisita import Matcher, figures

from . import batching
from .inputs import MAX_MATRIX_CAPTIONS, MAX_MATRIX_IMAGES, check_choice, image_digest, parse_captions, read_images
from .registry import ResultCache

SCORE_KINDS = ("score", "itm", "similarity")
SCORE_LABELS = {"score": "score", "itm": "ITM", "similarity": "S"}
FIGURE_WIDTH = 7.2  # inches at figures.DPI (100): the Matrix tab's plot column at a 1400 px page


class MatrixView(NamedTuple):
    figure: Image.Image  # the score matrix with best-match markers
    best: pd.DataFrame  # direction, query, best match, score
    result: dict  # the /matrix JSON: images, captions, kernel_names, itm, similarity, score (nested lists)


def matrix_figure(scores: np.ndarray, image_names: Sequence[str], captions: Sequence[str], kind: str) -> Image.Image:
    """The images × captions score matrix, marking each image's best caption and each caption's best image."""
    scores = np.asarray(scores)  # (n_images, n_captions)
    title = f"{SCORE_LABELS[kind]}: red box = best caption per image, orange dot = best image per caption"
    fig = figures.plot_score_matrix(scores, image_names, captions, title=title, figure=True)
    # The tab shows the figure about FIGURE_WIDTH wide at 1400 px: drawn wider, it would be scaled down and its
    # numbers shrunk below reading size.
    width, height = fig.get_size_inches()
    fig.set_size_inches(min(width, FIGURE_WIDTH), height)
    ax = fig.axes[0]
    for i, j in enumerate(scores.argmax(1)):
        ax.add_patch(patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    for j, i in enumerate(scores.argmax(0)):
        ax.plot(j + 0.32, i - 0.3, marker="o", color="orange", markersize=5)
    return figures.render(fig)


def matrix(
    matcher: Matcher,
    files: Sequence[Any] | None,
    captions_text: Any,
    kind: str = "score",
    cache: ResultCache | None = None,
) -> MatrixView:
    """Score every uploaded image against every caption; `kind` picks the score the figure and table show."""
    kind = check_choice(kind, SCORE_KINDS, "score")
    if kind == "itm" and not matcher.model.has_itm:
        raise ValueError("This checkpoint has no fusion head, so no ITM; choose score or similarity.")
    images, names = read_images(files, MAX_MATRIX_IMAGES)
    captions = parse_captions(captions_text, MAX_MATRIX_CAPTIONS)

    def compute() -> dict:
        with batching.exclusive():
            r = matcher.score(images, captions)
        plain = {k: np.asarray(getattr(r, k), dtype=np.float64) for k in SCORE_KINDS}
        return {
            "images": names,
            "captions": captions,
            "kernel_names": list(r.kernel_names),
            # NaN (ITM without a fusion head) becomes null: the payload stays plain JSON
            **{k: [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in a] for k, a in plain.items()},
        }

    key = ("matrix", tuple(image_digest(im) for im in images), tuple(captions))
    result = dict(cache.get_or_compute(key, compute) if cache is not None else compute())
    result["images"] = names  # the same pixels may arrive under another file name
    scores = np.asarray(result[kind], dtype=np.float64)  # (n_images, n_captions)
    label = SCORE_LABELS[kind]
    rows = [["image → caption", names[i], captions[j], round(scores[i, j], 3)] for i, j in enumerate(scores.argmax(1))]
    rows += [["caption → image", captions[j], names[i], round(scores[i, j], 3)] for j, i in enumerate(scores.argmax(0))]
    best = pd.DataFrame(rows, columns=["direction", "query", "best match", label])
    return MatrixView(matrix_figure(scores, names, captions, kind), best, result)
