"""Inputs, in one place shared by the Matcher, the app, the trainer and the evaluator.

Images: any PIL mode (palette with transparency, RGBA, LA, CMYK, 16-bit, 1-bit), EXIF orientation applied,
animated images reduced to their first frame, tiny / huge / extreme aspect ratios. Preprocessing is a
*letterbox*: the longer side is resized to the model's input size and the shorter one padded, so nothing is
cropped away and every map the model makes can be mapped back exactly onto the original image
(:meth:`Letterbox.to_original`). Images above :data:`MAX_PIXELS` are refused before decoding (decompression bombs).

Captions: stripped; empty, whitespace-only, longer than :data:`MAX_CAPTION_CHARS` characters, holding lone
surrogates, or reducing to no tokens (zero-width spaces, NULs) is an error; any other unicode is accepted; captions
longer than the model's ``text.max_length`` tokens are truncated. Text that looks like a special token ("[SEP]",
"[MASK]") is read as plain text, never as the special token. Tokenising happens here, never inside ``forward``.

Limits live here, once: the library, the CLI and the app apply the same ones (:data:`MAX_CAPTION_CHARS`,
:data:`MAX_CAPTIONS`, :data:`MAX_IMAGES`). Error messages name the file the user gave by its base name, never a
server path.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MKLVisITAConfig

MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger images are refused before they are decoded
MAX_CAPTION_CHARS = 300  # a caption's length; longer text is refused (the model sees at most text.max_length tokens)
MAX_CAPTIONS = 16  # captions of one request in the CLI and the app's Match tab
MAX_IMAGES = 8  # images of one request in the CLI and the app's Matrix tab

ImageInput = Union[Image.Image, str, os.PathLike, bytes, np.ndarray]


class InvalidImageError(ValueError):
    """An image could not be read; the message says why and what to do."""


class InvalidCaptionError(ValueError):
    """A caption is empty or not text."""


def load_image(image: ImageInput) -> Image.Image:
    """Any supported image input -> an RGB PIL image (EXIF-rotated, first frame). Raises InvalidImageError."""
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise InvalidImageError(f"{path.name} is a folder, not an image file. Give the image files in it.")
        if path.exists() and not path.is_file():  # a device (/dev/zero), a pipe or a socket: never read it
            raise InvalidImageError(
                f"{path.name} is not a regular file (a device, pipe or socket). Give an image file."
            )
        if not path.is_file():
            raise InvalidImageError(f"image file not found: {path.name}. Check the path.")
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as e:
            raise InvalidImageError(f"{path.name} is too large to decode safely. Downscale it first.") from e
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidImageError(f"{path.name} is not an image that can be read. Use a PNG, JPEG, WebP, ...") from e
        return _normalise(opened, path.name)
    if isinstance(image, (bytes, bytearray)):
        try:
            opened = Image.open(io.BytesIO(image))
        except Image.DecompressionBombError as e:
            raise InvalidImageError("the uploaded image is too large to decode safely. Downscale it first.") from e
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidImageError("the uploaded bytes are not an image (PNG, JPEG, WebP, ... expected)") from e
        return _normalise(opened, "the image")
    if isinstance(image, Image.Image):
        return _normalise(image, "the image")
    raise InvalidImageError(f"expected a PIL image, a file path, bytes or an array, got {type(image).__name__}")


def _check_size(w: int, h: int, name: str) -> None:
    if w < 1 or h < 1:
        raise InvalidImageError(f"{name} is empty ({w}x{h} pixels)")
    if w * h > MAX_PIXELS:
        raise InvalidImageError(
            f"{name} is too large ({w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is {MAX_PIXELS / 1e6:.0f}). "
            "Downscale it first."
        )


def _normalise(img: Image.Image, name: str) -> Image.Image:
    _check_size(*img.size, name)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)  # first frame of GIF / APNG / WebP animations
        if img.format == "JPEG":
            img.draft("RGB", (4096, 4096))  # decode huge JPEGs at reduced scale: bounded memory
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise InvalidImageError(f"{name} is too large to decode safely. Downscale it first.") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"{name} is truncated or corrupt and could not be decoded.") from e
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High bit depth: stretch the actual range to 8 bits (PIL's convert would clip everything above 255).
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(a.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have no colour of their own: composite onto white, as a viewer would show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InvalidImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    _check_size(a.shape[1], a.shape[0], "the image array")
    if a.dtype.kind not in "buif":  # object, complex, strings, ...
        raise InvalidImageError(f"an image array must hold real numbers (0-255 or 0-1), got dtype {a.dtype}")
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all():
            raise InvalidImageError("the image array holds NaN or infinite values")
        a = a * 255.0 if a.max() <= 1.0 else a
        a = a.clip(0, 255).round().astype(np.uint8)
    return _to_rgb(Image.fromarray(a))


def check_caption(caption: Any) -> str:
    """Validate one caption: text, not empty, at most MAX_CAPTION_CHARS characters, encodable. Returns it stripped.
    Raises InvalidCaptionError."""
    if not isinstance(caption, str):
        raise InvalidCaptionError(f"a caption must be text, got {type(caption).__name__}")
    text = caption.strip()
    if not text:
        raise InvalidCaptionError("a caption is empty; type a few words describing the image")
    if len(text) > MAX_CAPTION_CHARS:
        raise InvalidCaptionError(
            f"a caption is {len(text):,} characters long; the limit is {MAX_CAPTION_CHARS}. Shorten it."
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidCaptionError("a caption holds invalid characters (lone surrogates); retype it") from e
    return text


def check_whole_number(value: Any, name: str, low: int, high: int) -> int:
    """A whole number in [low, high]: ints, integral floats and digit strings; bools, 1.5 and "abc" refused."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    if isinstance(value, str):
        value = value.strip()
        number = int(value) if re.fullmatch(r"-?[0-9]{1,9}", value) else None  # not "--1", "²" or 10**1000 digits
    elif isinstance(value, (float, np.floating)):
        number = int(value) if float(value).is_integer() else None
    elif isinstance(value, (int, np.integer)):
        number = int(value)
    else:
        number = None
    if number is None or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return number


def check_batch_size(batch_size: Any) -> int:
    """A positive int (bool refused). Raises ValueError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    return batch_size


@dataclass(frozen=True)
class Letterbox:
    """How one image was resized and padded into the square model input; maps back to the original frame."""

    width: int  # original image size
    height: int
    size: int  # model input side
    scale: float  # original pixels -> input pixels
    pad_x: int  # left padding in input pixels
    pad_y: int  # top padding
    inner_w: int  # size of the resized image inside the input
    inner_h: int

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> Letterbox:
        scale = size / max(width, height)
        iw, ih = max(1, round(width * scale)), max(1, round(height * scale))
        return cls(width, height, size, scale, (size - iw) // 2, (size - ih) // 2, iw, ih)

    def map_size(self, max_side: int | None = None) -> tuple[int, int]:
        """(W, H) of maps in the original frame: the image's own size, or scaled down (aspect ratio kept) so the
        longer side is at most ``max_side`` pixels (None: no limit)."""
        if max_side is None or max(self.width, self.height) <= max_side:
            return self.width, self.height
        scale = max_side / max(self.width, self.height)
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))

    def to_original(self, grid: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """A map over the model input (any resolution, e.g. the patch grid) -> the original image's frame: H x W,
        or ``size`` = (W, H) for the same frame at another resolution (see :meth:`map_size`). float32."""
        grid = np.asarray(grid, dtype=np.float32)
        full = Image.fromarray(grid, mode="F").resize((self.size, self.size), Image.Resampling.BILINEAR)
        inner = full.crop((self.pad_x, self.pad_y, self.pad_x + self.inner_w, self.pad_y + self.inner_h))
        size = size or (self.width, self.height)
        return np.asarray(inner.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


class Processor:
    """Turns images and captions into model inputs; the one preprocessing path of the project."""

    def __init__(self, config: MKLVisITAConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        v = config.vision
        self.size = v.image_size
        self._mean = torch.tensor(v.mean).view(3, 1, 1)
        self._std = torch.tensor(v.std).view(3, 1, 1)

    @property
    def pad_pixel(self) -> torch.Tensor:
        """(3,) the letterbox padding colour as the model sees it (normalised like every pixel)."""
        pad = torch.tensor(self.config.vision.pad_value, dtype=torch.float32) / 255.0
        return (pad - self._mean.flatten()) / self._std.flatten()

    def letterbox(self, image: Image.Image) -> tuple[torch.Tensor, Letterbox]:
        box = Letterbox.fit(image.width, image.height, self.size)
        resized = image.resize((box.inner_w, box.inner_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        canvas = Image.new("RGB", (self.size, self.size), tuple(self.config.vision.pad_value))
        canvas.paste(resized, (box.pad_x, box.pad_y))
        x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        return (x - self._mean) / self._std, box

    def images(self, images: list[ImageInput]) -> tuple[torch.Tensor, list[Letterbox]]:
        """Load, validate and letterbox images: pixel_values (B, 3, S, S) and each image's Letterbox."""
        if not images:
            raise InvalidImageError("no image given")
        out = [self.letterbox(load_image(im)) for im in images]
        return torch.stack([x for x, _ in out]), [b for _, b in out]

    def captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Validate and tokenise: input_ids and attention_mask (B, T), truncated to text.max_length."""
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise InvalidCaptionError("no caption given")
        texts = [check_caption(c) for c in captions]
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.text.max_length,
            return_tensors="pt",
            split_special_tokens=True,  # "[SEP]" typed in a caption is text
            return_special_tokens_mask=True,
        )
        content = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).any(dim=1)  # (B,)
        for i in (~content).nonzero().flatten().tolist():
            raise InvalidCaptionError(
                f"caption {i + 1} has no words the model can read (only spaces or invisible characters); retype it"
            )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def words(self, caption: str) -> tuple[list[str], list[int | None]]:
        """The caption's whitespace words the model sees, and for each token position the word it belongs to.

        Sub-word pieces (and punctuation split off a word) map back to their whitespace word; special tokens map
        to None. Words cut off by truncation are not returned.
        """
        text = check_caption(caption)
        spans, start = [], None
        for i, ch in enumerate(text + " "):
            if ch.isspace():
                if start is not None:
                    spans.append((start, i))
                    start = None
            elif start is None:
                start = i
        enc = self.tokenizer(
            text,
            truncation=True,
            max_length=self.config.text.max_length,
            return_offsets_mapping=True,
            split_special_tokens=True,
        )
        token_word: list[int | None] = []
        for a, b in enc["offset_mapping"]:
            if a == b:  # special tokens ([CLS], [SEP]) cover no characters
                token_word.append(None)
                continue
            token_word.append(next(k for k, (s, e) in enumerate(spans) if s <= a < e))
        seen = sorted({w for w in token_word if w is not None})
        # Renumber so words are 0..n-1 in the order kept.
        remap = {w: i for i, w in enumerate(seen)}
        return [text[spans[w][0] : spans[w][1]] for w in seen], [None if w is None else remap[w] for w in token_word]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(directory))
