"""What the launched server adds to gradio's defaults: which files it serves, and a temp folder that empties.

The Gradio side of the demo (FastAPI lifespan); `app.launch_kwargs` passes both to `launch`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .examples import EXAMPLES_DIR
from .temp_folder import prune_empty_folders

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def example_images(examples_dir: Path = EXAMPLES_DIR) -> list[str]:
    """The example images, file by file: the examples folder's other files (its script, its JSON) are not served."""
    return [str(p) for p in sorted(examples_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


@contextlib.asynccontextmanager
async def prune_temp_folder(server: Any) -> AsyncIterator[None]:
    """While the server runs: on gradio's cache-deletion schedule, remove the folders it left empty
    (`demo.temp_folder`). `server` is gradio's FastAPI app."""
    frequency, age = server.get_blocks().delete_cache or (None, None)

    async def loop() -> None:
        from gradio.utils import get_upload_folder  # the temp folder ($GRADIO_TEMP_DIR), read when it runs

        while True:
            await asyncio.sleep(frequency)
            await asyncio.to_thread(prune_empty_folders, get_upload_folder(), age)

    task = asyncio.create_task(loop()) if frequency and age else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
