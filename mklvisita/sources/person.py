"""Faces: the person evidence an ImageNet-1k classifier lacks, for the "person" kernel.

ImageNet-1k has no "person" class; its only classes under WordNet's person.n.01 are ballplayer, groom and scuba
diver, which is also where the WordNet expansion sends a caption about an astronaut, a woman or a fireman. So a
photo of a person gave the concept kernels nothing to agree with such a caption. This source detects frontal faces
and asks whether the caption names a person.

Decisions:
    - Detector: OpenCV's Haar cascade ``haarcascade_frontalface_alt2.xml`` (Viola-Jones), which the
      ``opencv-python`` 4.x wheel ships (``cv2.data.haarcascades``; OpenCV 5 wheels no longer do). Nothing is
      downloaded and nothing is trained here. It finds frontal faces only: profiles, faces under a helmet's visor
      and people seen from far away give no evidence (never evidence against a person).
    - It runs on the model's own input (the letterboxed 224 x 224 image, grey, histogram-equalised) with scale step
      ``kernels.options.person.scale_step`` (1.2 by default; the photo checkpoint serves with 1.3, which visits
      fewer window sizes: ~30 % less time on the example photos, and the astronaut's face, the only face in the
      745 images below, is found at 45 instead of 46 px), 5 neighbours and faces of 32 px at least (a seventh of
      the input's side). The smallest scales hold most of
      the cascade's windows: in ``benchmarks/photo_score.py``'s parts on the cat photo, face detection took 14.0 ms
      at 24 px and 9.6 ms at 32 px (``docs/results/benchmarks/photo_score_captions_on_worker_quiet_60.json``,
      ``photo_score_min_face_32_quiet_60_run1.json``), and over the 745 images the photo evaluations and the example
      photos show (Tux Paint stamps and their composites, both halves) 32 px finds the same boxes as 24 px did. A
      face smaller than that gives no evidence, never evidence against.
    - It runs beside the image backbone (:mod:`mklvisita.sources.overlap`): the grey images and the cascade (OpenCV,
      which releases the GIL) on the overlap worker; the boxes become cells after.
    - Image side: each cell's share covered by face boxes (B, P) and f = 1 when any face was found, else 0.
    - Text side: the caption's person mass pi = its (expanded) class distribution's mass on
      ``kernels.options.person.classes`` (:mod:`mklvisita.sources.concept`), and for the per-word maps each token's
      person mass *alone*: the same expansion applied to the token's own embedding, computed once per vocabulary
      entry when the checkpoint is built (``fill_tokens``) and saved with it (fp16), so scoring only looks it up
      ("astronaut" 1.0, "a" 0.1, "suit" 0).
    - Kernel "person/share" = f * pi; its per-word maps are each token's person mass times the face cells.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..features import ImageFeatures, TextFeatures
from ..kernel_functions import ShareKernel
from .base import FeatureSource, SourceContext, SourceEmbeddings, register_source
from .overlap import Prefetch, start_torch

Box = tuple[int, int, int, int]  # (x, y, w, h) in input pixels

CASCADE = "haarcascade_frontalface_alt2.xml"
SCALE_STEP, NEIGHBOURS, MIN_FACE = 1.2, 5, 32


def _cv2():
    try:
        import cv2
    except ImportError as e:  # an install without the requirements
        raise ImportError(
            "kernels.sources 'person' needs OpenCV's face detector: pip install 'opencv-python>=4.8,<5'"
        ) from e
    return cv2


class FaceDetector:
    """Frontal faces in model inputs (module docstring). One cascade, loaded once; calls are serialised (an OpenCV
    cascade is not documented as safe to share between threads, and the app scores from several)."""

    def __init__(self, mean, std, scale_step: float = SCALE_STEP):
        cv2 = _cv2()
        self.scale_step = float(scale_step)
        path = cv2.data.haarcascades + CASCADE
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise ImportError(
                f"OpenCV has no {CASCADE}: OpenCV 5 wheels stopped shipping the Haar cascades. Install "
                "'opencv-python>=4.8,<5'"
            )
        self._cv2 = cv2
        self._lock = threading.Lock()
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def boxes(self, pixels: torch.Tensor) -> list[list[Box]]:
        """Normalised model inputs (B, 3, H, W) -> each image's faces as (x, y, w, h) in input pixels."""
        return self.detect(self.greys(pixels))

    def greys(self, pixels: torch.Tensor) -> list[np.ndarray]:
        """Normalised model inputs (B, 3, H, W) -> the grey uint8 images (H, W) the cascade reads (torch code: on the
        overlap worker only through :func:`~mklvisita.sources.overlap.start_torch`)."""
        luma = torch.tensor((0.299, 0.587, 0.114)).view(3, 1, 1)
        out = []
        for x in pixels.detach().float().cpu():
            rgb = (x * self._std + self._mean).clamp(0.0, 1.0) * 255.0
            out.append((rgb * luma).sum(0).round().to(torch.uint8).numpy())
        return out

    def detect(self, greys: list[np.ndarray]) -> list[list[Box]]:
        """Grey uint8 images -> each one's faces as (x, y, w, h). OpenCV only, no torch: it may run on the overlap
        worker."""
        out = []
        for grey in greys:
            grey = self._cv2.equalizeHist(grey)
            with self._lock:
                found = self._cascade.detectMultiScale(grey, self.scale_step, NEIGHBOURS, minSize=(MIN_FACE, MIN_FACE))
            out.append([tuple(int(v) for v in b) for b in found])
        return out


@dataclass
class PersonOptions:
    """Settings of the person source (``kernels.options.person``)."""

    classes: list[int] = field(default_factory=list)  # the ImageNet classes under WordNet's person, whose mass in a
    # caption's (expanded) class distribution says it names a person
    scale_step: float = SCALE_STEP  # the face detector's step between window sizes (larger: fewer; a cost setting)

    def validate(self) -> None:
        if not (self.classes and all(0 <= c < 1000 for c in self.classes)):
            raise ConfigError("kernels.sources 'person' needs kernels.options.person.classes: ImageNet classes (0-999)")
        if not (isinstance(self.scale_step, (int, float)) and 1.05 <= self.scale_step <= 2.0):
            raise ConfigError(f"kernels.options.person.scale_step must be within [1.05, 2], not {self.scale_step!r}")


@register_source
class PersonSource(FeatureSource):
    """The "person" source (module docstring): face cells on the image side, person mass on the caption side."""

    name = "person"
    features = ("person",)
    config_class = PersonOptions
    pooled_features = ("person",)
    map_features = ("person",)

    def __init__(self, ctx: SourceContext, enabled: list[str], options: PersonOptions):
        super().__init__(ctx, enabled, options)
        if "concept" not in ctx.built or ctx.tokenizer is None:
            raise ConfigError("kernels.sources 'person' needs the concept sources and the tokenizer")
        self.functions["person"] = nn.ModuleList([ShareKernel()])  # fixed features, one kernel
        self.detector = FaceDetector(ctx.image.mean, ctx.image.std, options.scale_step)
        self.person_classes = list(options.classes)
        self.grid = tuple(ctx.vision.grids[-1])
        vocab = max(ctx.tokenizer.get_vocab().values()) + 1
        self.register_buffer("token_person", torch.zeros(vocab, dtype=torch.float16))  # (V,) filled by fill_tokens

    def prefetch_image(self, pixel_values: torch.Tensor) -> Prefetch:
        return start_torch(self.detector.boxes, pixel_values, graph=False)  # grey images, cascade: beside the backbone

    def encode_image(
        self, pixel_values: torch.Tensor, img: ImageFeatures, prefetched: Prefetch | None = None
    ) -> dict[str, torch.Tensor]:
        boxes = self.detector.boxes(pixel_values) if prefetched is None else prefetched.collect()
        return self.image_features(self.cells(boxes, pixel_values, self.grid))

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        q = txt.sources["concept"]["concept_class"] ** 2  # the concept source's caption class distribution
        return self.text_features(q, self.token_mass(input_ids, txt.word_mask))

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        return SourceEmbeddings({"person": feats["person"].unsqueeze(1)}, {"local": feats["person_local"]})  # (B,1,1)

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        return self.embed_image(feats)

    def word_maps(self, feature: str, img: dict, txt: dict) -> torch.Tensor:
        """Each token's own person mass over the cells the faces cover: (B, 1, T, P)."""
        return (txt["local"].unsqueeze(-1) * img["local"].unsqueeze(1)).unsqueeze(1)

    def face_cells(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Normalised model inputs (B, 3, H, W) -> each grid cell's share covered by faces (B, gh * gw)."""
        return self.cells(self.detector.boxes(pixels), pixels, grid)

    @staticmethod
    def cells(faces: list[list[Box]], pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Each image's face boxes in the inputs ``pixels`` (B, 3, H, W) -> each grid cell's share covered (B, P)."""
        _, _, height, width = pixels.shape
        masks = torch.zeros(pixels.shape[0], 1, height, width)
        for i, boxes in enumerate(faces):
            for x, y, w, h in boxes:
                masks[i, 0, y : y + h, x : x + w] = 1.0
        return F.adaptive_avg_pool2d(masks, grid).flatten(1).to(pixels.device)

    @staticmethod
    def image_features(face_cells: torch.Tensor) -> dict[str, torch.Tensor]:
        found = (face_cells.sum(-1, keepdim=True) > 0).to(face_cells.dtype)  # (B, 1)
        return {"person": found, "person_local": face_cells}

    def text_features(self, class_distribution: torch.Tensor, token_mass: torch.Tensor) -> dict[str, torch.Tensor]:
        """The caption's class distribution (B, K) and its tokens' person mass (B, T) -> pi (B, 1) and the tokens."""
        pi = class_distribution[:, self.person_classes].sum(-1, keepdim=True)
        return {"person": pi, "person_local": token_mass}

    def token_mass(self, input_ids: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) each word piece's person mass (0 for [CLS], [SEP], padding)."""
        ids = input_ids.clamp(0, self.token_person.shape[0] - 1)
        return self.token_person[ids].float() * word_mask.float()

    @torch.no_grad()
    def fill_tokens(self, tokenizer, encode: Callable[[list[str]], torch.Tensor], concepts, batch_size: int = 256):
        """token_person <- for every vocabulary entry that is a word (not a continuation piece or a special token),
        the person mass of the concept bridge's expanded class distribution of that word embedded alone."""
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_tokens)
        words = sorted((t, i) for t, i in vocab.items() if t.isalpha() and t not in special)
        mass = torch.zeros_like(self.token_person, dtype=torch.float32)
        for k in range(0, len(words), batch_size):
            chunk = words[k : k + batch_size]
            emb = F.normalize(encode([t for t, _ in chunk]).float(), dim=-1)
            q = concepts.text_features(emb, emb.unsqueeze(1))["concept_class"] ** 2  # (n, K)
            mass[[i for _, i in chunk]] = q[:, self.person_classes].sum(-1)
        self.token_person.copy_(mass.half())
