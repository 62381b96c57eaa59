"""The Model tab's handler: the checkpoint's kernels and their weights, its card and its metrics.

No Gradio here; returns plain data for `demo/tabs/model.py`.

Decisions:

- Every kernel of the similarity S is listed, the photo checkpoint's concept kernels included; the fusion layers'
  weights (their attention bias over the local kernels) follow, one column per layer, named "fusion layer 1..L" in
  the table, the figure and the Match tab's layer selector alike (the API takes the 0-based index), and a last row
  "× bias scale" gives each layer's scale of that bias as served (learned, times `fusion.affinity_bias_scale`).
- The card's YAML front matter (Hub metadata, :mod:`mklvisita.cards`) is not Markdown: it is taken off the top
  (`mklvisita.cards.split_front_matter`) and shown as a YAML block at the end, so it does not render as a heading.
- Metrics are rounded to 4 significant digits for display (no `11.700000000000001`); nested groups are kept.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pandas as pd
from PIL import Image

from mklvisita import Matcher, figures
from mklvisita.cards import split_front_matter

from .match import rounded


class ModelView(NamedTuple):
    weights_plot: Image.Image  # global kernel weights β of S
    levels_plot: Image.Image | None  # fusion layers' weights over the local kernels; None without fusion
    table: pd.DataFrame  # one row per kernel: its weight in S, then in each fusion layer
    card: str  # Markdown, front matter moved to a code block
    metrics: dict  # rounded for display


def fusion_layer_name(i: int) -> str:
    """The name a fusion layer (0-based index) has everywhere in the UI."""
    return f"fusion layer {i + 1}"


def card_markdown(card: str) -> str:
    """The card for display: its body, then its metadata as a YAML code block."""
    if not card.strip():
        return "_This checkpoint has no card._"
    meta, body = split_front_matter(card)
    return body.strip() + (f"\n\n**Card metadata**\n\n```yaml\n{meta.strip()}\n```\n" if meta.strip() else "")


def round_metrics(x: Any) -> Any:
    """Floats to 4 significant digits (whole numbers from 1,000 up), recursively; other values as they are."""
    if isinstance(x, dict):
        return {k: round_metrics(v) for k, v in x.items()}
    if isinstance(x, list):
        return [round_metrics(v) for v in x]
    if isinstance(x, float):
        if x != x:  # NaN
            return None
        return float(round(x)) if abs(x) >= 1000 else float(f"{x:.4g}")
    return x


def model_info(matcher: Matcher) -> ModelView:
    """The checkpoint's learned kernel weights (global and per fusion layer: figures and a table), card, metrics."""
    weights = matcher.kernel_weights()
    levels = matcher.fusion_kernel_weights()
    names = list(dict.fromkeys([*weights, *(k for lv in levels for k in lv)]))
    # One row per kernel (a checkpoint may have a dozen: as columns they would scroll sideways). Fusion layers weigh
    # only the local kernels (their attention bias): other kernels' cells stay empty.
    table = pd.DataFrame(
        [
            [
                k,
                rounded(weights[k], 3) if k in weights else None,
                *[rounded(lv[k], 3) if k in lv else None for lv in levels],
            ]
            for k in names
        ],
        columns=["kernel", "similarity S", *[fusion_layer_name(i) for i in range(len(levels))]],
    )
    scales = matcher.fusion_bias_scales()
    if scales:  # how strongly each layer's mix biases its attention (learned too; with one local kernel the mix is 1)
        table.loc[len(table)] = ["× bias scale", None, *[rounded(x, 3) for x in scales]]
    global_plot = figures.plot_kernel_weights(weights, title="kernel weights β of the similarity S")
    levels_plot = None
    if levels:
        fig = figures.plot_fusion_kernel_weights(
            levels, title="fusion layers' weights over the local kernels", figure=True
        )
        fig.axes[0].set_yticks(range(len(levels)), [fusion_layer_name(i) for i in range(len(levels))], fontsize=8)
        levels_plot = figures.render(fig)
    return ModelView(
        global_plot, levels_plot, table, card_markdown(matcher.card or ""), round_metrics(matcher.metrics or {})
    )
