"""What the demo accepts: captions from a text box, images from uploads, and the demo's own size limits.

No Gradio here. The library validates content (unreadable image, empty caption; `mklvisita.inputs`, which also owns
the caption length and the Match tab's caption count); this module adds the limits that keep one request on a
2-CPU Space short. Every problem is a `ValueError` whose message names what the user gave (the file's own name,
never a server path) and what to do.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mklvisita.inputs import MAX_CAPTION_CHARS, MAX_CAPTIONS, MAX_IMAGES, load_image

MAX_MATRIX_IMAGES = MAX_IMAGES
MAX_MATRIX_CAPTIONS = 8
MAX_GALLERY_IMAGES = 32  # Search tab, user uploads
MAX_GALLERY_CAPTIONS = 128
MAX_TOP_K = 16
MAX_SIDE = 512  # larger uploads are shrunk first: the model sees 64-224 px, and heatmaps are kept at this size

__all__ = [
    "MAX_CAPTIONS",
    "MAX_CAPTION_CHARS",
    "MAX_GALLERY_CAPTIONS",
    "MAX_GALLERY_IMAGES",
    "MAX_MATRIX_CAPTIONS",
    "MAX_MATRIX_IMAGES",
    "MAX_SIDE",
    "MAX_TOP_K",
    "check_choice",
    "image_digest",
    "parse_captions",
    "read_image",
    "read_images",
]


def parse_captions(text: Any, limit: int, what: str = "captions") -> list[str]:
    """Split a text box into captions, one per non-blank line, and enforce the limits."""
    if text is not None and not isinstance(text, str):
        raise ValueError(f"The {what} must be text, one per line; got {type(text).__name__}.")
    captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"Enter at least one caption, one per line (up to {limit} {what}).")
    if len(captions) > limit:
        raise ValueError(f"{len(captions)} {what} given; the limit is {limit}. Remove some lines and try again.")
    for i, caption in enumerate(captions, 1):
        if len(caption) > MAX_CAPTION_CHARS:
            raise ValueError(
                f"Caption {i} is {len(caption):,} characters long; the limit is {MAX_CAPTION_CHARS}. Shorten it."
            )
    return captions


def _upload_name(x: Any) -> str | None:
    """The name the user's file had (gradio's FileData keeps it as `orig_name`; the path is gradio's copy)."""
    if isinstance(x, dict):
        return x.get("orig_name") or (Path(x["path"]).name if x.get("path") else None)
    if isinstance(x, str | os.PathLike) and str(x):
        return Path(x).name
    return None


def read_image(x: Any, what: str = "The image") -> Image.Image:
    """Decode an upload (path, FileData dict, PIL or array) to RGB, at most MAX_SIDE pixels on its longer side."""
    name = _upload_name(x)
    if isinstance(x, dict):  # raw FileData (events without preprocessing); gradio has checked the path is an upload
        x = x.get("path")
    if x is None or (isinstance(x, str) and not x):
        raise ValueError(f"{what} is missing: upload an image (PNG, JPEG, WebP, ...).")
    label = f"{what} ({name})" if name else what
    try:
        image = load_image(x)
    except ValueError as e:  # the library names the file by its base name; gradio's copy may be named otherwise
        message = str(e)
        if name and isinstance(x, str | os.PathLike) and Path(x).name != name:
            message = message.replace(Path(x).name, name)
        raise ValueError(f"{what}: {message}") from None
    except Exception as e:  # PIL raises many types for corrupt files; the user only needs to know it is unreadable
        raise ValueError(f"{label} could not be read as an image ({type(e).__name__}). Upload a PNG or JPEG.") from None
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)  # keeps the aspect ratio
    return image


def read_images(files: Sequence[Any] | None, limit: int, what: str = "images") -> tuple[list[Image.Image], list[str]]:
    """Decode a list of uploaded files; returns the images and their display names (the user's file names)."""
    if files is not None and not isinstance(files, list | tuple):
        files = [files]
    files = [f for f in (files or []) if f]
    if not files:
        raise ValueError(f"Upload at least one image (up to {limit} {what}).")
    if len(files) > limit:
        raise ValueError(f"{len(files)} {what} given; the limit is {limit}.")
    images, names = [], []
    for i, f in enumerate(files, 1):
        name = _upload_name(f) or f"image {i}"
        images.append(read_image(f, what=f"Image {i}"))
        names.append(name)
    return images, names


def image_digest(image: Image.Image) -> str:
    """A content key for caching: the same pixels give the same key whatever file they came from."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")
    return value
