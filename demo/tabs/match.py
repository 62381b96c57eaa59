"""The Match tab's layout: one image, captions ranked by score, kernel bars, caption and per-word heatmaps.

Handlers live in `demo/match.py`. This tab also owns the explanation controls (fusion layer, method), whose choices
depend on the checkpoint, so it wires the page's checkpoint selector and the examples that switch checkpoints.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from mklvisita.inputs import MAX_CAPTION_CHARS, MAX_CAPTIONS

from ..batching import event_concurrency
from ..examples import checkpoint_for
from ..match import (
    DEFAULT_LAYER,
    ExplainView,
    MatchView,
    default_method,
    explain,
    layer_choices,
    match,
    methods,
    select_word,
)
from ..registry import describe, ranking_rule
from ..ui import (
    FIGURE,
    IMAGE_CALL,
    IMAGE_UPLOAD,
    MODEL_CALL,
    PRIVATE,
    RAW_INPUTS,
    Context,
    user_errors,
    with_checkpoint,
)

LAYER_INFO = (
    "“default” is the last fusion layer whose words still reach the ITM head (the last one when the words read the "
    "image before the [CLS] reads them, else the one before it); fusion layer 1 reads the lowest image level."
)
METHOD_INFO = (
    "gradcam: attention × its gradient; attention: raw; kernel: each local kernel's word↔patch affinity. "
    "Starts on the checkpoint's own default."
)


def show_match(view: MatchView) -> tuple:
    return view.table, view.figure, view.result, gr.Dropdown(choices=view.captions, value=view.captions[0])


def show_explanation(view: ExplainView) -> tuple:
    words = [w for _, w in view.words]
    return view.caption_map, view.words, gr.Dropdown(choices=words, value=view.word), view.kernels, view.info


def leave_preview() -> Any:
    """Before a new explanation: the per-word gallery back to its grid, out of any preview of an old word (the word
    selector is reset to the new caption's first word with it)."""
    return gr.Gallery(selected_index=None)


def show_word(picked: tuple[int, list]) -> tuple:
    index, kernels = picked
    return gr.Gallery(selected_index=index), kernels


def build(ctx: Context) -> dict[str, Any]:
    registry = ctx.registry
    default = registry.get(None).matcher
    with gr.Tab("Match", id="match"):
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                m_image = gr.Image(label="Image", height=300, elem_id="match-image", **IMAGE_UPLOAD)
                m_captions = gr.Textbox(
                    lines=5,
                    label=f"Captions, one per line (up to {MAX_CAPTIONS}, {MAX_CAPTION_CHARS} characters each)",
                    placeholder="a tabby cat lying on a rug\na cup of coffee on a saucer",
                    elem_id="match-captions",
                )
                m_button = gr.Button("Match", variant="primary", elem_id="match-button")
            with gr.Column(scale=3, min_width=480):
                m_rule = gr.Markdown(rule_line(default), elem_id="match-rule")
                m_table = gr.Dataframe(
                    pd.DataFrame(columns=["rank", "caption", "score", "ITM", "S"]),
                    label="Captions ranked by score",
                    elem_id="match-ranking",
                    wrap=True,  # long captions wrap: the numeric columns stay in view
                    column_widths=["9%", "55%", "12%", "12%", "12%"],
                    interactive=False,
                )
                m_contrib = gr.Image(show_label=False, interactive=False, elem_id="match-contributions", **FIGURE)
        if ctx.examples:
            examples = gr.Examples(
                [
                    [str(ctx.examples_dir / e["image"]), "\n".join(e["captions"]), checkpoint_for(e, registry.default)]
                    for e in ctx.examples
                ],
                inputs=[m_image, m_captions, ctx.selector],
                label="Examples: photos run on the photo checkpoint, shapes scenes on the shapes one",
                examples_per_page=8,
                elem_id="match-examples",
                **PRIVATE,
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
                choices=layer_choices(default),
                value=DEFAULT_LAYER,
                info=LAYER_INFO,
                elem_id="explain-layer",
                scale=2,
            )
            e_method = gr.Radio(
                methods(default), value=default_method(default), label="Method", info=METHOD_INFO, scale=2
            )
            e_scale = gr.Radio(
                [("per map", "per_map"), ("shared", "shared")],
                value="per_map",
                label="Scale",
                info="shared: word maps on one scale, so they compare",
                scale=1,
            )
        with gr.Row():
            e_heat = gr.Image(label="Caption heatmap", interactive=False, elem_id="caption-heatmap", scale=2)
            with gr.Column(scale=3):
                e_words = gr.Gallery(
                    label="Per-word heatmaps (click one for its kernel maps)",
                    columns=4,
                    object_fit="contain",
                    elem_id="word-maps",
                )
                with gr.Row():
                    e_word = gr.Dropdown(label="Word", choices=[], elem_id="explain-word", scale=1)
                    e_kernels = gr.Gallery(
                        label="The word under each local kernel",
                        columns=4,
                        height=220,
                        object_fit="contain",
                        elem_id="kernel-maps",
                        allow_preview=False,  # one kernel alone would otherwise open enlarged
                        scale=3,
                    )
        with gr.Accordion("Numbers (JSON)", open=False):
            m_json = gr.JSON(label="Match result")
            e_json = gr.JSON(label="Explanation")

    m_inputs = [ctx.checkpoint, m_image, m_captions]
    m_outputs = [m_table, m_contrib, m_json, e_caption]
    e_inputs = [ctx.checkpoint, m_image, e_caption, e_layer, e_method, e_scale]
    e_outputs = [e_heat, e_words, e_word, e_kernels, e_json]
    match_fn = with_checkpoint(registry, match, show_match)
    explain_fn = with_checkpoint(registry, explain, show_explanation)
    word_fn = with_checkpoint(registry, select_word, show_word)
    reset = {"fn": leave_preview, "inputs": None, "outputs": [e_words], "queue": False, **PRIVATE}
    # Match requests run side by side and meet in demo.batching, which makes one model call of them.
    match_call = {**RAW_INPUTS, **event_concurrency()}
    m_button.click(match_fn, m_inputs, m_outputs, api_name="match", **match_call).success(**reset).success(
        explain_fn, e_inputs, e_outputs, api_name="explain", **IMAGE_CALL
    )
    for control in (e_caption, e_layer, e_method, e_scale):
        control.input(**reset).then(explain_fn, e_inputs, e_outputs, **PRIVATE, **IMAGE_CALL)
    e_word.input(word_fn, [*e_inputs, e_word], [e_words, e_kernels], **PRIVATE, **IMAGE_CALL)

    def picked(event: gr.SelectData) -> str:
        return (event.value or {}).get("caption") or gr.skip()

    e_words.select(picked, None, [e_word], **PRIVATE).then(
        word_fn, [*e_inputs, e_word], [e_words, e_kernels], **PRIVATE, **IMAGE_CALL
    )

    # The page's checkpoint: switching sets the session's state and this tab's checkpoint-dependent choices.
    def switch(choice: str) -> tuple:
        choice = registry.check(choice)  # refuses anything outside the allow-list before loading
        matcher = registry.get(choice).matcher
        supported = methods(matcher)
        return (
            choice,
            choice,
            describe(matcher),
            rule_line(matcher),
            gr.Dropdown(choices=layer_choices(matcher), value=DEFAULT_LAYER),
            gr.Radio(choices=supported, value=default_method(matcher)),
        )

    switch_outputs = [ctx.checkpoint, ctx.selector, ctx.about, m_rule, e_layer, e_method]
    switch_fn = user_errors(switch)
    ctx.switch_after = lambda event: event.then(switch_fn, [ctx.selector], switch_outputs, **PRIVATE, **MODEL_CALL)

    def rematch(checkpoint: str, image: Any, captions: str) -> tuple:
        """After a switch, rank the inputs on the page again (nothing to do while they are empty)."""
        if not image or not (captions or "").strip():
            return tuple(gr.skip() for _ in m_outputs)
        return match_fn(checkpoint, image, captions)

    def reexplain(checkpoint: str, image: Any, caption: str | None, *options: Any) -> tuple:
        if not image or not (caption or "").strip():
            return tuple(gr.skip() for _ in e_outputs)
        return explain_fn(checkpoint, image, caption, *options)

    ctx.selector.input(switch_fn, [ctx.selector], switch_outputs, **PRIVATE, **MODEL_CALL).success(
        rematch, m_inputs, m_outputs, **PRIVATE, **IMAGE_CALL
    ).success(**reset).success(reexplain, e_inputs, e_outputs, **PRIVATE, **IMAGE_CALL)
    if ctx.examples:
        ctx.switch_after(examples.load_input_event).success(
            match_fn, m_inputs, m_outputs, **PRIVATE, **IMAGE_CALL
        ).success(**reset).success(explain_fn, e_inputs, e_outputs, **PRIVATE, **IMAGE_CALL)
    return {"layer": e_layer, "method": e_method}


def rule_line(matcher: Any) -> str:
    rule = ranking_rule(matcher)
    return f"Ranked by **{rule}**: the checkpoint's ranking rule (S = similarity, ITM = match probability)."
