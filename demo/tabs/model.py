"""The Model tab's layout: every kernel and its weights (global and per fusion layer), the card and the metrics of
the checkpoint chosen above the tabs. The handler lives in `demo/model_info.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from ..model_info import ModelView, model_info
from ..ui import FIGURE, PRIVATE, Context, user_errors


def show(view: ModelView) -> tuple:
    return (
        view.weights_plot,
        gr.Image(value=view.levels_plot, visible=view.levels_plot is not None),
        view.table,
        view.card,
        view.metrics,
    )


def build(ctx: Context) -> tuple[list, Callable]:
    """Lay the tab out; returns its outputs and the function that fills them, for the page's load event."""
    with gr.Tab("Model", id="model"):
        gr.Markdown(
            "The checkpoint chosen above the tabs: every base kernel of the similarity S with its learned weight β "
            "(the photo checkpoint's concept kernels included), and where the checkpoint has a fusion branch, each "
            "fusion layer's weights over the local kernels (its attention bias)."
        )
        with gr.Row():
            # the figures carry their own titles: a component label would cover them
            k_plot = gr.Image(show_label=False, interactive=False, elem_id="model-weights", **FIGURE)
            k_levels = gr.Image(show_label=False, interactive=False, elem_id="model-levels", **FIGURE)
        k_table = gr.Dataframe(
            label="Kernel weights: one row per kernel; its weight in S and in each fusion layer",
            interactive=False,
            elem_id="model-table",
        )
        with gr.Row():
            k_card = gr.Markdown(label="Checkpoint card", container=True, max_height=500, elem_id="model-card")
            k_metrics = gr.JSON(label="Metrics (rounded)")

    def show_model(choice: str) -> tuple:
        return show(model_info(ctx.registry.get(choice).matcher))

    outputs = [k_plot, k_levels, k_table, k_card, k_metrics]
    ctx.checkpoint.change(user_errors(show_model), [ctx.checkpoint], outputs, **PRIVATE)
    return outputs, show_model
