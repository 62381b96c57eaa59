"""MKL-VisITA web demo: the Hugging Face Space's entry point. It builds the page from `demo/` and launches it.

Run `python app.py` for the embedded checkpoints ("photo", the default, and "shapes"); add Hub checkpoints or local
folders to the allow-list with `--checkpoint owner/name[@revision]` (repeatable) or `MKLVISITA_CHECKPOINTS="id1,id2"`.
`--host` / `--port` (or `$GRADIO_SERVER_NAME` / `$GRADIO_SERVER_PORT`) choose where it listens (127.0.0.1:7860 by
default); `--threads N` (or `$MKLVISITA_THREADS`) the CPU threads of each model call (1 by default: mklvisita.threads).

Where things are (the pattern of hysts' multi-tab Spaces: one module per tab):

- `demo/registry.py`: the checkpoint allow-list, the loaded Matchers and their result caches (no Gradio);
- `demo/match.py`, `demo/matrix.py`, `demo/search.py`, `demo/model_info.py`: each tab's handlers, returning plain data
  (no Gradio); `demo/inputs.py`: uploads, captions and the demo's limits; `demo/examples.py`: the examples;
- `demo/tabs/<tab>.py`: each tab's layout, `build(ctx)`; `demo/ui.py`: what the tabs share (session checkpoint,
  user errors).

Named API endpoints (see the README for a client snippet); they run on the session's checkpoint, "photo" for a
fresh `gradio_client`:

- `/match`   (image, captions one per line)                        -> ranking table, kernel-contribution plot, JSON
- `/explain` (image, caption, fusion layer, method, scale) -> caption heatmap, per-word heatmaps, word, per-kernel
  maps of the first word, JSON
- `/matrix`  (image files, captions one per line, score)            -> score-matrix plot, best matches, JSON
- `/search`  (text query, image query, gallery files, gallery captions, top k) -> images, captions, timings
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from demo import tabs
from demo.examples import EXAMPLES_DIR, load_examples
from demo.match import explain, match, select_word  # noqa: F401  (the handlers, for scripts and tests)
from demo.matrix import matrix  # noqa: F401
from demo.registry import CHECKPOINTS_ENV, DEFAULT_CHECKPOINT, Registry, allowed_checkpoints, describe, load_checkpoint
from demo.search import Gallery, load_example_gallery, search  # noqa: F401
from demo.server import example_images, prune_temp_folder
from demo.ui import Context
from mklvisita import Matcher
from mklvisita.threads import DEFAULT_THREADS, THREADS_ENV, default_threads, parse_threads

MAX_FILE_SIZE = "10mb"
QUEUE_MAX_SIZE = 16
CACHE_SECONDS = 600  # uploads and output images live this long in gradio's temp folder (a Space's disk stays bounded)

INTRO = """# MKL-VisITA: which caption fits this picture, and where does each word look?
Captions are ranked by **score**, the checkpoint's ranking rule: the similarity S (a learned mix of base kernels)
plus, where the checkpoint has a fusion head, the match probability ITM (absolute: one caption alone can score low)."""

# Read at 1400 px: figures keep their image toolbar in a strip of their own above them (it covered the score matrix's
# colour bar); the search results' captions (rank, score, file name) wrap instead of ending in "…", sit below their
# image (not over it), and the results start below the gallery's label and button; a card's code blocks wrap; the
# per-word gallery grows with the caption (a fixed height cut the last row of a long caption's word maps off).
CSS = """
#caption-heatmap img, #word-maps img {image-rendering: auto;}
#checkpoint-about p {margin: 0;}
#model-card pre, #model-card pre code {white-space: pre-wrap !important; overflow-wrap: anywhere;}
#word-maps, #word-maps .grid-wrap {height: auto !important; max-height: none !important;}
#word-maps .grid-wrap {overflow-y: visible !important;}
.figure .image-container {padding-top: 2.5rem;}
#search-images .caption-label {white-space: normal; overflow-wrap: anywhere; max-width: calc(100% - 0.5rem);}
#search-images .thumbnail-item {display: flex; flex-direction: column; aspect-ratio: auto; height: auto;}
#search-images .thumbnail-item img {flex: none; height: 180px; width: 100%; object-fit: contain;}
#search-images .caption-label {position: static; transform: none; margin: 4px auto 2px;}
#search-images, #search-images .grid-wrap {height: auto !important; max-height: none !important;}
#search-images .grid-wrap {overflow-y: visible !important;}
#search-images .grid-container {padding-top: 2.5rem;}
"""


def create_demo(
    matcher: Matcher | None = None,
    checkpoints: Sequence[str] = (),
    *,
    loader: Callable[[str], Matcher] = load_checkpoint,
    examples_dir: Path = EXAMPLES_DIR,
    cache_seconds: int = CACHE_SECONDS,
    default: str = DEFAULT_CHECKPOINT,
) -> gr.Blocks:
    """Build the demo.

    Args:
        matcher: the default checkpoint, already loaded (None: `loader(default)` loads it now).
        checkpoints: allow-listed checkpoints after the embedded ones (`dir_or_hub_id[@revision]`), loaded on demand.
        loader: loads an allow-listed checkpoint by name; tests pass a stub.
        examples_dir: folder with examples.json and the example images.
        cache_seconds: how long uploads and outputs stay in gradio's temp folder.
        default: the default checkpoint's name ("photo").
    """
    registry = Registry(matcher, checkpoints, loader, default_name=default)
    matcher = registry.get(None).matcher
    examples = load_examples(examples_dir)
    gallery = load_example_gallery(examples_dir) if examples else Gallery([], [], [], [])

    # Gradio's own cache deletion bounds the temp folder: every cache_seconds, uploads and outputs older than that go.
    with gr.Blocks(title="MKL-VisITA demo", delete_cache=(cache_seconds, cache_seconds)) as blocks:
        checkpoint = gr.State(registry.default)
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            selector = gr.Dropdown(
                registry.choices,
                value=registry.default,
                label="Checkpoint (allow-list)",
                elem_id="checkpoint",
                scale=1,
                min_width=200,
            )
            about = gr.Markdown(describe(matcher), elem_id="checkpoint-about")
        ctx = Context(registry, checkpoint, selector, about, examples, examples_dir, gallery)
        with gr.Tabs():
            tabs.match.build(ctx)
            tabs.matrix.build(ctx)
            tabs.search.build(ctx)
            model_outputs, show_model = tabs.model.build(ctx)
        blocks.load(show_model, [checkpoint], model_outputs, api_visibility="private")

    # api_open=False: direct POSTs to /run/<name> would skip the queue and its bounds (Spaces sets this by itself).
    blocks.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1, api_open=False)
    blocks.registry = registry  # for tests and for callers who want to inspect what is loaded
    return blocks


def launch_kwargs() -> dict[str, Any]:
    """Launch settings that suit a 2-CPU Space; tests launch with the same ones."""
    return {
        "max_file_size": MAX_FILE_SIZE,
        "ssr_mode": False,  # no Node server: one process, fewer moving parts, nothing rendered server-side
        "allowed_paths": example_images(),  # the only files served besides uploads and gradio's own cache
        "show_error": False,  # unexpected exceptions show a generic error, not a traceback; gr.Error still shows
        "mcp_server": False,
        "footer_links": ["api", "gradio"],
        "theme": gr.themes.Soft(),
        "css": CSS,
        "app_kwargs": {"lifespan": prune_temp_folder},  # gradio runs its own cache deletion beside it
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
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (also $GRADIO_SERVER_NAME; 0.0.0.0 for every interface; default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        help="port to listen on (also $GRADIO_SERVER_PORT; default 7860)",
    )
    parser.add_argument(
        "--threads",
        default=None,
        metavar="N|auto",
        help=f"CPU threads per model call (also ${THREADS_ENV}; default {DEFAULT_THREADS}: see mklvisita.threads)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        try:
            parse_threads(args.threads, "--threads")
        except ValueError as e:
            parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        os.environ[THREADS_ENV] = args.threads  # read by every model call (mklvisita.threads)
    # One line per user error in the server log (demo.ui); real faults keep gradio's traceback.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup requests
    threads = default_threads()
    logging.getLogger("mklvisita.demo").info("model calls use %s CPU thread(s) each", threads or "torch's default")
    allowed = [c for c in allowed_checkpoints(args.checkpoint) if c != DEFAULT_CHECKPOINT]
    blocks = create_demo(load_checkpoint(DEFAULT_CHECKPOINT), allowed)
    blocks.launch(server_name=args.host, server_port=args.port, **launch_kwargs())


if __name__ == "__main__":
    main()
