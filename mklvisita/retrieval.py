"""Two-stage retrieval on cached features (ALBEF / BLIP protocol).

Stage 1: the multi-kernel similarity S ranks every candidate from cached per-kernel embeddings (one matrix
product per pooled kernel, late interaction over cached tokens for the local ones). Stage 2: the fusion/ITM
head re-scores the top k of each query; final score = itm_weight * ITM + S. Entries outside the top k keep S's
order, shifted below every re-scored one. Cost: N_img + N_txt encodings plus k * (N_img + N_txt) fusion passes
(pairs shared by both directions are scored once), not N_img * N_txt.

The evaluation command, the trainer's per-epoch evaluation and the Matcher's search all call these functions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .inputs import ImageInput, Processor
from .kernels import KernelEmbeddings
from .model import ImageFeatures, MKLVisITA, TextFeatures

OUTSIDE_TOP_K = -100.0  # added to S outside the re-ranked top k (S and ITM are both within [-1, 2])


@dataclass
class ImageBank:
    embeddings: KernelEmbeddings  # per-kernel projections, stage 1
    features: ImageFeatures | None  # fusion-level tokens, stage 2 (None for a similarity-only bank)

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclass
class TextBank:
    embeddings: KernelEmbeddings
    features: TextFeatures | None

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclass
class RetrievalScores:
    i2t: np.ndarray  # (n_img, n_txt) final scores ranking captions for each image
    t2i: np.ndarray  # (n_txt, n_img) final scores ranking images for each caption
    similarity: np.ndarray  # (n_img, n_txt) stage-1 multi-kernel similarity
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    itm_pairs: int = 0  # fusion passes made in stage 2


def _device(model: MKLVisITA) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def encode_images(
    model: MKLVisITA,
    processor: Processor,
    images: Sequence[ImageInput],
    batch_size: int = 64,
    keep_features: bool = True,
) -> ImageBank:
    """Encode images once: kernel embeddings for stage 1 and (optionally) fusion tokens for stage 2."""
    dev = _device(model)
    embs, feats = [], []
    keep = model.fusion.image_levels if (keep_features and model.has_itm) else None
    for i in range(0, len(images), batch_size):
        pv, _ = processor.images(list(images[i : i + batch_size]))
        img = model.encode_image(pv.to(dev))
        embs.append(model.embed_image(img))
        if keep is not None:
            feats.append(img.keep(keep))
    return ImageBank(KernelEmbeddings.cat(embs), ImageFeatures.cat(feats) if feats else None)


@torch.inference_mode()
def encode_captions(
    model: MKLVisITA, processor: Processor, captions: Sequence[str], batch_size: int = 256, keep_features: bool = True
) -> TextBank:
    """Encode captions once (truncated to text.max_length); fusion needs only the last layer's tokens."""
    dev = _device(model)
    embs, feats = [], []
    last = model.text.depth - 1
    for i in range(0, len(captions), batch_size):
        enc = processor.captions(list(captions[i : i + batch_size]))
        txt = model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        embs.append(model.embed_text(txt))
        if keep_features and model.has_itm:
            feats.append(txt.keep([last]))
    return TextBank(KernelEmbeddings.cat(embs), TextFeatures.cat(feats) if feats else None)


@torch.inference_mode()
def similarity_matrix(model: MKLVisITA, images: ImageBank, texts: TextBank, chunk: int = 256) -> torch.Tensor:
    """Stage 1: S for every (image, caption) pair, (n_img, n_txt), chunked over images."""
    rows = [
        model.similarity(images.embeddings.select(slice(i, i + chunk)), texts.embeddings).similarity
        for i in range(0, len(images), chunk)
    ]
    return torch.cat(rows).float().cpu()


@torch.inference_mode()
def match_pairs(
    model: MKLVisITA,
    images: ImageBank,
    texts: TextBank,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch_size: int = 128,
) -> torch.Tensor:
    """ITM match probability of the pairs (image_index[k], text_index[k]): (K,)."""
    if images.features is None or texts.features is None:
        raise ValueError("these banks were encoded without fusion features; re-encode with keep_features=True")
    dev = _device(model)
    out = []
    for i in range(0, len(image_index), batch_size):
        ii = image_index[i : i + batch_size].to(dev)
        tt = text_index[i : i + batch_size].to(dev)
        uniq, inv = torch.unique(ii, return_inverse=True)  # the fusion's image-only work once per image
        img = images.features.select(uniq)
        txt = texts.features.select(tt)
        emb_i, emb_t = images.embeddings.select(uniq), texts.embeddings.select(tt)
        m = model.match(img, txt, emb_i, emb_t, image_index=inv, output_attentions=False)
        out.append(m.prob.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def two_stage_scores(
    model: MKLVisITA, images: ImageBank, texts: TextBank, k: int = 128, itm_weight: float = 1.0, batch_size: int = 128
) -> RetrievalScores:
    """Rank with S, re-score each query's top k with ITM. k = 0 (or a model without fusion): S only."""
    t0 = time.perf_counter()
    sim = similarity_matrix(model, images, texts)  # (n_img, n_txt)
    timings = {"similarity": time.perf_counter() - t0}
    if k <= 0 or not model.has_itm:
        s = sim.numpy()
        return RetrievalScores(s.copy(), s.T.copy(), s, timings)

    t1 = time.perf_counter()
    n_img, n_txt = sim.shape
    ki, kt = min(k, n_txt), min(k, n_img)
    top_t = sim.topk(ki, dim=1).indices  # (n_img, ki): captions to re-score per image
    top_i = sim.topk(kt, dim=0).indices  # (kt, n_txt): images to re-score per caption
    pair_i = torch.cat([torch.arange(n_img).repeat_interleave(ki), top_i.flatten()])
    pair_t = torch.cat([top_t.flatten(), torch.arange(n_txt).repeat(kt)])
    pair_id, inverse = torch.unique(pair_i * n_txt + pair_t, return_inverse=True)  # both directions share pairs
    prob = match_pairs(model, images, texts, pair_id // n_txt, pair_id % n_txt, batch_size)
    final = itm_weight * prob + sim.flatten()[pair_id]

    i2t = sim + OUTSIDE_TOP_K
    t2i = sim.T.clone() + OUTSIDE_TOP_K
    n1 = n_img * ki
    first, second = inverse[:n1], inverse[n1:]
    i2t[pair_i[:n1], pair_t[:n1]] = final[first]
    t2i[pair_t[n1:], pair_i[n1:]] = final[second]
    timings["rerank"] = time.perf_counter() - t1
    return RetrievalScores(i2t.numpy(), t2i.numpy(), sim.numpy(), timings, int(len(pair_id)))
