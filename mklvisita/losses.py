"""Losses as plain functions returning named terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_loss(
    similarity: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    extra_text_similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE on the multi-kernel similarity.

    similarity (B, B): image i x caption j, caption i belongs to image i. ``image_ids`` (B,) makes every caption
    of the same image a positive (soft targets), as when a batch holds two captions of one image.
    ``extra_text_similarity`` (B, K): more captions that are negatives for every image (hard negatives).
    """
    b = similarity.shape[0]
    if image_ids is None:
        pos = torch.eye(b, device=similarity.device, dtype=similarity.dtype)
    else:
        pos = (image_ids[:, None] == image_ids[None, :]).to(similarity.dtype)
    targets = pos / pos.sum(-1, keepdim=True)
    i2t = similarity
    i2t_targets = targets
    if extra_text_similarity is not None:
        i2t = torch.cat([similarity, extra_text_similarity], 1)
        i2t_targets = F.pad(targets, (0, extra_text_similarity.shape[1]))
    loss_i2t = -(F.log_softmax(i2t * logit_scale, -1) * i2t_targets).sum(-1).mean()
    loss_t2i = -(F.log_softmax(similarity.T * logit_scale, -1) * targets.T).sum(-1).mean()
    return (loss_i2t + loss_t2i) / 2


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary matching: logits (N, 2), labels (N,) with 1 = match."""
    return F.cross_entropy(logits, labels)


def kernel_entropy_loss(entropy: torch.Tensor, num_kernels: int) -> torch.Tensor:
    """1 - H(beta) / log(M): 0 for the uniform mix, 1 when all weight sits on one kernel (the collapse to avoid)."""
    if num_kernels <= 1:
        return entropy.new_zeros(())
    return 1.0 - entropy / torch.log(torch.tensor(float(num_kernels), device=entropy.device))


@torch.no_grad()
def sample_hard_negatives(
    similarity: torch.Tensor, image_ids: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF-style hard negatives sampled from the similarity.

    Returns (neg_text_for_image (B,), neg_image_for_text (B,)): for image i a caption j drawn with probability
    softmax(S[i]) over non-matching captions; for caption j an image likewise. Pairs of the same image are
    excluded, so a batch needs at least two different images.
    """
    b = similarity.shape[0]
    if image_ids is None:
        image_ids = torch.arange(b, device=similarity.device)
    same = image_ids[:, None] == image_ids[None, :]
    s = similarity.float()

    if not (~same).any(-1).all():
        raise ValueError("hard-negative sampling needs at least two different images in the batch")

    def draw(scores: torch.Tensor) -> torch.Tensor:
        w = scores.softmax(-1).masked_fill(same, 0.0)
        return torch.multinomial(w, 1, generator=generator).squeeze(-1)

    # Scale sharpens the distribution toward the hardest negatives, as the trained logit scale does in ALBEF.
    return draw(s * 10), draw(s.T * 10)
