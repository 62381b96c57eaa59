"""The real retrieval benchmarks (Karpathy JSON, LAVIS/BLIP JSON, Hugging Face datasets): pairs and evaluation data.

Decisions:

- One training pair per caption; images are opened in ``__getitem__`` (in the DataLoader workers), never up front.
- Positives: the default :func:`mklvisita.tasks.caption_positives` (captions of the same image, and identical
  caption text); nothing is inferred from similarity.
- No hard negatives and no extra metrics: the protocol's retrieval metrics and ITM P/R/F1 are generic.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from .base import EvalData, PairOptions


class RetrievalPairs(Dataset):
    """A real benchmark's training pairs (one per caption)."""

    def __init__(self, spec: str, split: str):
        from ..data import load_retrieval_set

        self.set = load_retrieval_set(spec, split=split)

    def __len__(self) -> int:
        return len(self.set.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = int(self.set.txt2img[index])
        return {
            "image": self.set.load_image(image_id),
            "caption": self.set.captions[index],
            "negative": None,
            "image_id": image_id,
        }


def train_pairs(spec: str, split: str, options: PairOptions) -> RetrievalPairs:
    return RetrievalPairs(spec, split)


def load_eval_data(spec: str, split: str = "test", limit: int = 0) -> Any:
    from ..data import load_retrieval_set

    rset = load_retrieval_set(spec, split=split)
    if 0 < limit < len(rset):
        rset = rset.subset(range(limit))
    return EvalData(spec, split, rset.images, list(rset.captions), rset.txt2img, None, rset)
