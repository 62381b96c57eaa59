"""Data: procedurally generated shapes scenes and readers for the real retrieval benchmarks."""

from mklvisita.data.benchmarks import (
    CaptionPairs,
    RetrievalSet,
    load_hf,
    load_karpathy,
    load_lavis,
    load_retrieval_set,
    shapes_retrieval_set,
)
from mklvisita.data.shapes import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SHAPES_VOCABULARY,
    SPLITS,
    Claim,
    Desc,
    Scene,
    SceneObject,
    ShapesScenes,
    holds,
)

__all__ = [
    "COLOURS",
    "HELD_OUT_PAIRS",
    "SHAPES",
    "SHAPES_VOCABULARY",
    "SPLITS",
    "CaptionPairs",
    "Claim",
    "Desc",
    "RetrievalSet",
    "Scene",
    "SceneObject",
    "ShapesScenes",
    "holds",
    "load_hf",
    "load_karpathy",
    "load_lavis",
    "load_retrieval_set",
    "shapes_retrieval_set",
]
