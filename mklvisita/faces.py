"""Faces: the person evidence an ImageNet-1k classifier lacks, for the concept kernels (``kernels.concept_faces``).

ImageNet-1k has no "person" class; its only classes under WordNet's person.n.01 are ballplayer, groom and scuba
diver, which is also where the WordNet expansion sends a caption about an astronaut, a woman or a fireman. So a
photo of a person gives the concept kernels nothing to agree with such a caption. This module detects frontal faces
and the bridge (:mod:`mklvisita.concepts`) mixes person mass into the image's class distribution when it finds one.

Decisions:
    - Detector: OpenCV's Haar cascade ``haarcascade_frontalface_alt2.xml`` (Viola-Jones), which the
      ``opencv-python`` 4.x wheel ships (``cv2.data.haarcascades``; OpenCV 5 wheels no longer do). Nothing
      is downloaded and nothing is trained here. It finds frontal faces only: profiles, faces under a helmet's visor
      and people seen from far away give no evidence (never evidence against a person).
    - It runs on the model's own input (the letterboxed 224 x 224 image, grey, histogram-equalised) with scale step
      1.2, 5 neighbours and faces of 24 px at least: ~12 ms per image on one thread (1.1 / 20 px took ~25 ms).
    - Evidence f is 1 when at least one face is found, else 0; the image's class distribution becomes
      (1 - w f) p + w f u, u uniform over the person classes, w = ``kernels.concept_faces``.
    - Only the pooled concept kernels (``concept``, ``concept_class``) use it; the per-position maps do not.
"""

from __future__ import annotations

import threading

import torch

CASCADE = "haarcascade_frontalface_alt2.xml"
SCALE_STEP, NEIGHBOURS, MIN_FACE = 1.2, 5, 24


def _cv2():
    try:
        import cv2
    except ImportError as e:  # an install without the requirements
        raise ImportError(
            "kernels.concept_faces needs OpenCV's face detector: pip install 'opencv-python>=4.8,<5'"
        ) from e
    return cv2


class FaceDetector:
    """Frontal faces in model inputs (module docstring). One cascade, loaded once; calls are serialised (an OpenCV
    cascade is not documented as safe to share between threads, and the app scores from several)."""

    def __init__(self, mean, std):
        cv2 = _cv2()
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

    def boxes(self, pixels: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
        """Normalised model inputs (B, 3, H, W) -> each image's faces as (x, y, w, h) in input pixels."""
        luma = torch.tensor((0.299, 0.587, 0.114)).view(3, 1, 1)
        out = []
        for x in pixels.detach().float().cpu():
            rgb = (x * self._std + self._mean).clamp(0.0, 1.0) * 255.0
            grey = self._cv2.equalizeHist((rgb * luma).sum(0).round().to(torch.uint8).numpy())
            with self._lock:
                found = self._cascade.detectMultiScale(grey, SCALE_STEP, NEIGHBOURS, minSize=(MIN_FACE, MIN_FACE))
            out.append([tuple(int(v) for v in b) for b in found])
        return out

    def evidence(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,) 1.0 where at least one face is found, else 0.0."""
        return torch.tensor([float(bool(b)) for b in self.boxes(pixels)], device=pixels.device)
