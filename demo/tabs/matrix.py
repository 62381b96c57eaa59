"""The Matrix tab's layout: several images × several captions, the score matrix and the best matches.

The handler lives in `demo/matrix.py`.
"""

from __future__ import annotations

import gradio as gr

from ..examples import checkpoint_for
from ..inputs import MAX_MATRIX_CAPTIONS, MAX_MATRIX_IMAGES
from ..matrix import SCORE_KINDS, MatrixView, matrix
from ..ui import FIGURE, IMAGE_CALL, PRIVATE, Context, with_checkpoint


def show(view: MatrixView) -> tuple:
    return view.figure, view.best, view.result


def build(ctx: Context) -> None:
    with gr.Tab("Matrix", id="matrix"):
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                x_files = gr.File(
                    file_count="multiple",
                    file_types=["image"],
                    label=f"Images (up to {MAX_MATRIX_IMAGES})",
                    elem_id="matrix-images",
                )
                x_captions = gr.Textbox(lines=6, label=f"Captions, one per line (up to {MAX_MATRIX_CAPTIONS})")
                x_kind = gr.Radio(
                    list(SCORE_KINDS),
                    value="score",
                    label="Score",
                    info="score: the ranking score Match and Search use; itm: match probability; similarity: S",
                )
                x_button = gr.Button("Score matrix", variant="primary")
            with gr.Column(scale=3, min_width=480):
                gr.Markdown("**Score matrix**")
                # no label over the figure: it would cover the first row's name and cell
                x_plot = gr.Image(show_label=False, interactive=False, elem_id="matrix-plot", **FIGURE)
                x_best = gr.Dataframe(
                    label="Best match per image and per caption",
                    wrap=True,
                    column_widths=["18%", "36%", "34%", "12%"],
                    interactive=False,
                    elem_id="matrix-best",
                )
                with gr.Accordion("All scores (JSON)", open=False):
                    x_json = gr.JSON(show_label=False)
        matrix_fn = with_checkpoint(ctx.registry, matrix, show)
        x_inputs, x_outputs = [ctx.checkpoint, x_files, x_captions, x_kind], [x_plot, x_best, x_json]
        x_button.click(
            matrix_fn,
            x_inputs,
            x_outputs,
            api_name="matrix",
            **IMAGE_CALL,  # raw FileData: gr.File's preprocessing would leave an empty temp file per image (demo.ui)
        )
        if ctx.examples:
            # One example per checkpoint, each with its checkpoint as an input, as the Match examples: loading one
            # switches the page to the checkpoint its images are for (photos mean nothing to the shapes model).
            kinds = dict.fromkeys(checkpoint_for(e, ctx.registry.default) for e in ctx.examples)
            rows = []
            for kind in kinds:
                chosen = [e for e in ctx.examples if checkpoint_for(e, ctx.registry.default) == kind]
                chosen = chosen[: min(MAX_MATRIX_IMAGES, MAX_MATRIX_CAPTIONS)]
                files = [str(ctx.examples_dir / e["image"]) for e in chosen]
                rows.append([files, "\n".join(dict.fromkeys(e["captions"][0] for e in chosen)), kind])
            examples = gr.Examples(
                rows,
                inputs=[x_files, x_captions, ctx.selector],
                label="Examples: the example images against each one's first caption, on their checkpoint",
                elem_id="matrix-examples",
                **PRIVATE,
            )
            if ctx.switch_after is not None:  # switch, then score on the example's checkpoint
                ctx.switch_after(examples.load_input_event).success(
                    matrix_fn, x_inputs, x_outputs, **PRIVATE, **IMAGE_CALL
                )
