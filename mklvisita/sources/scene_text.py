"""Scene text: words written in the image (a sign's "YIELD", a tape's "MEASURE") against the caption's words.

An ImageNet classifier sees a road sign as "street sign" whatever it says; a caption often names what it says. This
source reads the text with an OCR engine and the kernel "scene_text/match" asks how much of what the image says the
caption also says.

Decisions:
    - Engine: RapidOCR (``rapidocr-onnxruntime`` 1.4.4, Apache-2.0), whose wheel ships PaddleOCR's PP-OCRv4 text
      detector and recogniser as ONNX files: nothing is downloaded or trained. It runs on the model's own input (the
      letterboxed 224 x 224 image) with the detector's shorter side at ``kernels.options.scene_text.detector_side``
      px, 256 by default (scratch timings on one thread: the engine's default, 736, took ~220 ms per image, 256 ~18
      ms median and reads the same words on the tune half's signs; ``benchmarks/photo_score.py`` times the whole
      scoring call), no angle classifier, one thread, and lines read with confidence >= 0.5 kept. At 224, the
      input's own size (no upscaling; what the photo checkpoint serves with), the detector costs ~30 % less and
      reads other words on 5 of the 745 images the photo evaluations and example photos show: on the tune half it
      loses "tape" of a measuring tape and misreads "burley" as "burlej", on the test half it loses two words and
      gains one (those images read at both sides). It runs beside the image backbone
      (:mod:`mklvisita.sources.overlap`): the uint8 images and the engine (onnxruntime, which releases the GIL) on
      the overlap worker; the words become tensors after.
    - Words: lower-cased letter runs of 3 or more letters, a few function words left out (``STOP``), at most
      :data:`MAX_WORDS` per image; on the caption side the same rule on the words rebuilt from its word pieces.
    - Matching is fuzzy, because OCR misreads a letter ("CROSSINC") and captions inflect ("Measuring" / "MEASURE"):
      each word becomes a vector of hashed character trigrams (with word boundaries, :data:`DIM` buckets, unit norm),
      and a pair matches by m = max(0, (cos - theta) / (1 - theta)), theta = ``kernels.options.scene_text.match``.
    - Kernel: the mean over the image's words of their best match among the caption's words (late interaction, from
      the image's side: what the image says, found in the caption); 0 for an image with no text. Per-word maps: a
      caption word's match with each image word, spread over the cells of that word's text line.
"""

from __future__ import annotations

import re
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..features import ImageFeatures, TextFeatures
from ..kernel_functions import KernelFunction
from .base import FeatureSource, SourceContext, SourceEmbeddings, register_source
from .overlap import Prefetch, start_torch

DIM = 256  # hashed trigram buckets
MAX_WORDS = 16  # words kept per image
MIN_CONFIDENCE = 0.5
DET_SIDE = 256
Words = list[tuple[str, tuple[float, float, float, float]]]  # one image's words with their line's box (x0, y0, x1, y1)
STOP = frozenset(
    "the and for you your are this that with have has its our was not but all can out who let any from into".split()
)


def words_of(text: str) -> list[str]:
    """Lower-cased letter runs of 3+ letters, function words left out."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3 and w not in STOP]


@lru_cache(maxsize=65536)
def _trigram_vector(word: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    padded = f"#{word}#"
    counts: dict[int, float] = {}
    for i in range(len(padded) - 2):
        b = zlib.crc32(padded[i : i + 3].encode()) % DIM  # stable across runs, unlike hash()
        counts[b] = counts.get(b, 0.0) + 1.0
    norm = sum(v * v for v in counts.values()) ** 0.5
    return tuple(counts), tuple(v / norm for v in counts.values())


def word_vectors(words: list[str], n: int) -> torch.Tensor:
    """(n, DIM) unit trigram vectors of ``words`` (rows past len(words) are 0)."""
    out = torch.zeros(n, DIM)
    for i, w in enumerate(words[:n]):
        idx, val = _trigram_vector(w)
        out[i, list(idx)] = torch.tensor(val)
    return out


def soft_match(cos: torch.Tensor, theta: float) -> torch.Tensor:
    return ((cos - theta) / (1.0 - theta)).clamp_min(0.0)


def caption_word_vectors(tokenizer, input_ids: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, DIM): each word's trigram vector on its first word piece, 0 elsewhere."""
    out = np.zeros((*input_ids.shape, DIM), dtype=np.float32)  # filled in numpy: no tensor op per token
    for b, (ids, words) in enumerate(zip(input_ids.tolist(), word_mask.tolist())):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        starts: list[tuple[int, str]] = []
        for t, tok in enumerate(tokens):
            if not words[t]:
                continue
            if tok.startswith("##") and starts:
                starts[-1] = (starts[-1][0], starts[-1][1] + tok[2:])
            else:
                starts.append((t, tok.lstrip("\u2581\u0120")))
        for t, word in starts:
            found = words_of(word)
            if len(found) == 1 and found[0] == word.lower():
                idx, val = _trigram_vector(found[0])
                out[b, t, list(idx)] = val  # as word_vectors writes it (float32)
    return torch.from_numpy(out)


class SceneTextReader:
    """The OCR engine (module docstring), loaded once; calls are serialised (one engine, several app threads)."""

    def __init__(self, mean, std, detector_side: int = DET_SIDE):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError(
                "kernels.sources 'scene_text' needs the OCR engine: pip install rapidocr-onnxruntime==1.4.4 "
                "(it installs on Python 3.10-3.12)"
            ) from e
        self._engine = RapidOCR(
            det_limit_side_len=detector_side,
            det_limit_type="min",
            use_cls=False,
            intra_op_num_threads=1,
            inter_op_num_threads=1,
        )
        self._lock = threading.Lock()
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def read(self, pixels: torch.Tensor) -> list[Words]:
        """Normalised model inputs (B, 3, H, W) -> per image, its words with their line's box (x0, y0, x1, y1)."""
        return self.read_images(self.images(pixels))

    def images(self, pixels: torch.Tensor) -> list[np.ndarray]:
        """Normalised model inputs (B, 3, H, W) -> the uint8 RGB images (H, W, 3) the engine reads (torch code: on
        the overlap worker only through :func:`~mklvisita.sources.overlap.start_torch`)."""
        out = []
        for x in pixels.detach().float().cpu():
            rgb = ((x * self._std + self._mean).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
            out.append(rgb.permute(1, 2, 0).contiguous().numpy())
        return out

    def read_images(self, images: list[np.ndarray]) -> list[Words]:
        """uint8 RGB images -> per image, its words with their line's box. The engine only, no torch: it may run on
        the overlap worker."""
        out = []
        for image in images:
            with self._lock:
                result, _ = self._engine(image)
            found = []
            for box, text, score in result or []:
                if float(score) < MIN_CONFIDENCE:
                    continue
                xs, ys = [p[0] for p in box], [p[1] for p in box]
                found += [(w, (min(xs), min(ys), max(xs), max(ys))) for w in words_of(text)]
            out.append(found[:MAX_WORDS])
        return out

    def features(
        self, pixels: torch.Tensor, grid: tuple[int, int], read: list[Words] | None = None
    ) -> dict[str, torch.Tensor]:
        """words (B, MAX_WORDS, DIM), mask (B, MAX_WORDS), cells (B, MAX_WORDS, P): each word's line over the grid.
        ``read``: what :meth:`read` gives for ``pixels``, when it was read already (else it is read here)."""
        b, _, height, width = pixels.shape
        gh, gw = grid
        vectors = torch.zeros(b, MAX_WORDS, DIM)
        mask = torch.zeros(b, MAX_WORDS, dtype=torch.bool)
        cells = torch.zeros(b, MAX_WORDS, gh, gw)
        for i, found in enumerate(self.read(pixels) if read is None else read):
            if not found:
                continue
            vectors[i, : len(found)] = word_vectors([w for w, _ in found], len(found))
            mask[i, : len(found)] = True
            for j, (_, (x0, y0, x1, y1)) in enumerate(found):
                box = torch.zeros(1, 1, height, width)
                top, left = min(max(0, int(y0)), height - 1), min(max(0, int(x0)), width - 1)  # the detector's boxes
                box[..., top : max(top + 1, round(y1)), left : max(left + 1, round(x1))] = 1  # may leave the image
                cells[i, j] = F.adaptive_avg_pool2d(box, grid)[0, 0]
        device = pixels.device
        return {"words": vectors.to(device), "mask": mask.to(device), "cells": cells.flatten(2).to(device)}


@dataclass
class SceneTextOptions:
    """Settings of the scene-text source (``kernels.options.scene_text``)."""

    match: float = 0.5  # trigram cosine at which two words start to match (theta)
    detector_side: int = DET_SIDE  # the text detector's shorter side, px (the input's own side or more; a cost setting)

    def validate(self) -> None:
        if not 0.0 <= self.match < 1.0:
            raise ConfigError(f"kernels.options.scene_text.match must be within [0, 1), not {self.match}")
        side = self.detector_side
        if not (isinstance(side, int) and not isinstance(side, bool) and 32 <= side <= 1024 and side % 32 == 0):
            raise ConfigError(
                f"kernels.options.scene_text.detector_side must be a multiple of 32 from 32 to 1024, not {side!r}"
            )


class MatchKernel(KernelFunction):
    """The word match: max(0, (cos - theta) / (1 - theta)) of two trigram vectors."""

    name = "match"

    def __init__(self, theta: float):
        super().__init__()
        self.theta = float(theta)

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return soft_match(cos, self.theta)


@register_source
class SceneTextSource(FeatureSource):
    """The "scene_text" source: words read in the image against the caption's words (module docstring)."""

    name = "scene_text"
    features = ("scene_text",)
    config_class = SceneTextOptions
    map_features = ("scene_text",)

    def __init__(self, ctx: SourceContext, enabled: list[str], options: SceneTextOptions):
        super().__init__(ctx, enabled, options)
        if ctx.tokenizer is None:
            raise ConfigError("kernels.sources 'scene_text' needs the tokenizer (the caption's words)")
        self.functions["scene_text"] = nn.ModuleList([MatchKernel(options.match)])
        self.reader = SceneTextReader(ctx.image.mean, ctx.image.std, options.detector_side)
        self.tokenizer = ctx.tokenizer
        self.grid = tuple(ctx.vision.grids[-1])

    def prefetch_image(self, pixel_values: torch.Tensor) -> Prefetch:
        return start_torch(self.reader.read, pixel_values, graph=False)  # uint8 images and OCR, beside the backbone

    def encode_image(
        self, pixel_values: torch.Tensor, img: ImageFeatures, prefetched: Prefetch | None = None
    ) -> dict[str, torch.Tensor]:
        read = None if prefetched is None else prefetched.collect()
        return self.reader.features(pixel_values, self.grid, read)  # words, mask, cells

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        return {"words": caption_word_vectors(self.tokenizer, input_ids, txt.word_mask).to(txt.pooled.device)}

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        return SourceEmbeddings({}, dict(feats))  # kept whole: late interaction between words

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        words = feats["words"]
        return SourceEmbeddings({}, {"words": words, "mask": words.abs().sum(-1) > 0})  # the words' rows

    def kernel_values(self, feature: str, img: dict, txt: dict, pairwise: bool) -> torch.Tensor:
        """Mean over the image's words of their best match among the caption's: (Bi, Bt, 1) or (B, 1). Most images
        say nothing, so only the images with a word are compared, chunked so a (ci, Bt, W, T) block stays near 2^24."""
        fn = self.functions[feature][0]
        iw, tw = img["words"], txt["words"]
        w = img["mask"].float()  # (Bi, W)
        count = w.sum(-1)  # (Bi,)
        if pairwise:
            best = fn(torch.einsum("bwd,btd->bwt", iw, tw)).amax(-1)  # (B, W)
            return ((best * w).sum(-1) / count.clamp_min(1.0)).unsqueeze(-1)
        out = torch.zeros(iw.shape[0], tw.shape[0], 1, dtype=tw.dtype, device=tw.device)
        rows = torch.nonzero(count > 0).flatten()
        chunk = max(1, 2**24 // max(1, tw.shape[0] * tw.shape[1] * iw.shape[1]))
        for i in range(0, len(rows), chunk):
            r = rows[i : i + chunk]
            best = fn(torch.einsum("iwd,jtd->ijwt", iw[r], tw)).amax(-1)  # (ci, Bt, W)
            out[r, :, 0] = (best * w[r, None, :]).sum(-1) / count[r, None]
        return out

    def word_maps(self, feature: str, img: dict, txt: dict) -> torch.Tensor:
        """A caption word's matches, over the matched words' text lines: (B, 1, T, P)."""
        m = self.functions[feature][0](torch.einsum("bwd,btd->bwt", img["words"], txt["words"]))
        m = m * img["mask"].unsqueeze(-1)
        return torch.einsum("bwt,bwp->btp", m, img["cells"]).unsqueeze(1)
