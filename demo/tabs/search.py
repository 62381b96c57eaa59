"""The Search tab's layout: text → images and image → captions over the example gallery or your uploads.

The handler lives in `demo/search.py`.
"""

from __future__ import annotations

import gradio as gr

from ..batching import event_concurrency
from ..inputs import MAX_GALLERY_CAPTIONS, MAX_GALLERY_IMAGES, MAX_TOP_K
from ..saved_index import INDEXES_ENV, allowed_indexes, search_saved_index
from ..search import SearchView, search
from ..ui import IMAGE_UPLOAD, RAW_INPUTS, Context, with_checkpoint


def show(view: SearchView) -> tuple:
    return view.images, view.captions, view.timings


def build(ctx: Context) -> None:
    with gr.Tab("Search", id="search"):
        gr.Markdown(
            "Searches the example gallery shipped in `assets/` unless you upload images or captions. "
            "Stage 1 ranks every candidate by the similarity S on cached embeddings; stage 2 re-scores the top k "
            "with the fusion (ITM) head where the checkpoint has one. Results are ordered by **score**, the same "
            "ranking rule as the Match tab."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                s_text = gr.Textbox(label="Text query → images", placeholder="a cup of coffee", elem_id="search-text")
                s_image = gr.Image(label="Image query → captions", height=200, elem_id="search-image", **IMAGE_UPLOAD)
                s_k = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="top k")
                with gr.Accordion("Your own gallery (optional)", open=False):
                    s_files = gr.File(
                        file_count="multiple",
                        file_types=["image"],
                        label=f"Gallery images (up to {MAX_GALLERY_IMAGES})",
                    )
                    s_captions = gr.Textbox(lines=4, label=f"Gallery captions (up to {MAX_GALLERY_CAPTIONS})")
                s_button = gr.Button("Search", variant="primary", elem_id="search-button")
            with gr.Column(scale=3, min_width=480):
                s_images = gr.Gallery(
                    label="Top images",
                    columns=3,
                    height=540,  # the default top 5: two rows, each caption (rank, score, file) in full
                    object_fit="contain",
                    elem_id="search-images",
                )
                s_caps = gr.Dataframe(
                    label="Top captions",
                    elem_id="search-captions",
                    wrap=True,
                    column_widths=["9%", "55%", "12%", "12%", "12%"],
                    interactive=False,
                )
                with gr.Accordion("Time per stage (ms)", open=False):
                    s_time = gr.JSON(show_label=False)
        s_button.click(
            with_checkpoint(ctx.registry, search, show, example_gallery=ctx.example_gallery),
            [ctx.checkpoint, s_text, s_image, s_files, s_captions, s_k],
            [s_images, s_caps, s_time],
            api_name="search",
            **RAW_INPUTS,
            **event_concurrency(),  # text queries over one gallery meet in demo.batching: one model call
        )
        _saved_index(ctx)


def _saved_index(ctx: Context) -> None:
    """Text → images over a saved gallery index from the allow-list (`$MKLVISITA_INDEXES`), opened memory-mapped; no
    section (and no `/search_index` endpoint) when nothing is allow-listed."""
    indexes = allowed_indexes()
    if not indexes:
        return
    with gr.Accordion("Saved gallery index", open=True):
        gr.Markdown(
            "Searches an index built once with `python -m mklvisita index FOLDER --out INDEX`: FAISS picks the "
            "candidates, the checkpoint re-ranks them. This app allow-lists "
            + ", ".join(f"`{n}`" for n in indexes)
            + f" (`{INDEXES_ENV}`)."
        )
        with gr.Row():
            choice = gr.Dropdown(list(indexes), value=next(iter(indexes)), label="Index", elem_id="index-choice")
            text = gr.Textbox(label="Text query → images", placeholder="a red bicycle", elem_id="index-text")
            k = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="top k")
        button = gr.Button("Search the index", elem_id="index-button")
        hits = gr.Gallery(label="Top images", columns=5, height=360, object_fit="contain", elem_id="index-images")
        with gr.Accordion("Time per stage (ms)", open=False):
            times = gr.JSON(show_label=False)
    button.click(
        with_checkpoint(ctx.registry, search_saved_index, lambda r: r, indexes=indexes),
        [ctx.checkpoint, choice, text, k],
        [hits, times],
        api_name="search_index",
    )
