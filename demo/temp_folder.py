"""Housekeeping of Gradio's temp folder: the folders its cache deletion leaves empty are removed.

No Gradio here. Gradio stores every upload and output as ``<temp folder>/<content hash>/<file name>``; its cache
deletion (``delete_cache``) removes the files but never their folders, so a public demo would collect one empty
folder per distinct upload or output for good.

Decisions:

- Only EMPTY folders go, and only when their last change is older than the cache age: a folder Gradio has just made
  for a file it is about to write is younger than that, and ``os.rmdir`` refuses a folder that holds anything, so a
  file is never lost. The temp folder itself stays.
- It runs on the same schedule as Gradio's cache deletion (``app.py`` starts it with the server).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def prune_empty_folders(root: str | os.PathLike, age: float) -> int:
    """Remove the empty folders under ``root`` (not ``root``) unchanged for more than ``age`` seconds, deepest first.

    Returns how many were removed. Errors (a folder filled or removed meanwhile, no permission) skip that folder.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    now, removed = time.time(), 0
    for folder, _, _ in os.walk(root, topdown=False):
        if Path(folder) == root:
            continue
        try:
            if now - os.stat(folder).st_mtime > age and not os.listdir(folder):
                os.rmdir(folder)
                removed += 1
        except OSError:
            continue
    return removed
