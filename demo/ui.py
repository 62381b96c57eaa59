"""What every tab's layout shares: the session's checkpoint, handler adapters, and how user errors are reported.

This is the Gradio side of the demo (with `demo/tabs/`); the handlers it adapts return plain data.

Decisions:

- The checkpoint is chosen once for the page (a selector above the tabs, with one line on what that checkpoint
  was trained on and cannot know) and kept per browser session (`gr.State`), so one visitor cannot switch the model
  under another. API calls start on the default ("photo"). Loading an example switches to the checkpoint it is for.
- A user error (the library's and the demo's `ValueError`s: bad image, bad caption, limits, checkpoint not
  allowed) becomes a toast with its plain message and ONE line in the server log (logger `mklvisita.demo`), no
  traceback. Anything else is a real fault: it propagates, Gradio logs its traceback and shows a generic error.
- Every model call shares one concurrency slot (`concurrency_id="model"`): a 2-CPU Space runs one at a time. Match
  and Search events are the exception: they run up to 16 at a time (`demo.batching.event_concurrency`) and meet in
  `demo.batching`, which makes one model call of those that can share one, under the lock every model call holds.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from .registry import Registry
from .search import Gallery

log = logging.getLogger("mklvisita.demo")

# image_mode=None: pass the uploaded file through untouched; mklvisita.inputs.load_image converts it exactly as the
# trainer and the evaluator do (EXIF, transparency, 16-bit, first frame).
IMAGE_UPLOAD = {"type": "filepath", "image_mode": None}
# Events that take an image upload skip gradio's preprocessing. The handlers get the upload's FileData (already checked
# to lie in gradio's upload folder, with the user's file name), decode it and report what is wrong. Two reasons:
# - gr.Image opens the file with PIL first, and a corrupt upload would fail there with a message the UI hides
#   (show_error=False);
# - gr.File(type="filepath") (gradio 6.31, `File._process_single_file`) opens a NamedTemporaryFile(delete=False) in the
#   temp folder for every file it receives, only to rename a Python object: the empty file is tracked by nothing, so
#   delete_cache never removes it and the temp folder would grow by one file per uploaded image for good.
RAW_INPUTS = {"preprocess": False}
# crisp text, exportable; the "figure" class puts the toolbar above the figure, not over its colour bar (app.CSS)
FIGURE = {"type": "pil", "format": "png", "buttons": ["download", "fullscreen"], "elem_classes": ["figure"]}
MODEL_CALL = {"concurrency_id": "model", "concurrency_limit": 1}
IMAGE_CALL = {**MODEL_CALL, **RAW_INPUTS}
PRIVATE = {"api_visibility": "private"}


@dataclass
class Context:
    """What the tabs' `build` functions share."""

    registry: Registry
    checkpoint: gr.State  # the session's checkpoint name
    selector: gr.Dropdown  # the page's checkpoint selector (loading an example sets it)
    about: gr.Markdown  # one line: what the chosen checkpoint was trained on and cannot know
    examples: list[dict]
    examples_dir: Path
    example_gallery: Gallery
    # Chains the page's checkpoint switch (to the selector's value) after an event and returns the chained event;
    # set by the Match tab, used by every tab whose examples carry their checkpoint.
    switch_after: Callable[[Any], Any] | None = None


def user_errors(fn: Callable) -> Callable:
    """Show a handler's ValueErrors to the user as toasts, logging one line each (see the module's decisions)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as e:  # InvalidImageError, InvalidCaptionError, CheckpointError, ... subclass ValueError
            message = str(e)
            log.warning("user error in %s: %s", getattr(fn, "__name__", "handler"), " ".join(message.split()))
            raise gr.Error(message, print_exception=False) from None

    return wrapper


def with_checkpoint(registry: Registry, fn: Callable, present: Callable[[Any], Any], **extra: Any) -> Callable:
    """Adapt a handler to the UI: the session's checkpoint name comes first, its Matcher and cache are looked up, and
    `present` turns the handler's plain result into the components' values."""

    @functools.wraps(fn)
    def wrapper(checkpoint: str, *args: Any) -> Any:
        entry = registry.get(checkpoint)
        return present(fn(entry.matcher, *args, cache=entry.cache, **extra))

    # gradio reads the signature for the API docs; the state input is not part of the public API.
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("cache", *extra)]
    wrapper.__signature__ = inspect.Signature([params[0].replace(name="checkpoint", annotation=str), *params[1:]])
    return user_errors(wrapper)
