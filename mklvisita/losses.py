"""Losses as plain functions returning named terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positives_mask(
    batch: int, image_ids: torch.Tensor | None = None, positives: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """(B, B) bool, [i, j] = caption j is true of image i; the diagonal is always true.

    ``positives`` (from the task: shapes claims that hold, identical captions) wins; else ``image_ids`` makes the
    captions of one image positives of each other; else only the diagonal.
    """
    if positives is not None:
        pos = positives.to(device=device, dtype=torch.bool).clone()
    elif image_ids is not None:
        pos = image_ids[:, None] == image_ids[None, :]
    else:
        pos = torch.zeros(batch, batch, dtype=torch.bool, device=device)
    pos.diagonal().fill_(True)
    return pos


def itc_loss(
    similarity: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    extra_text_similarity: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE on the multi-kernel similarity, with multi-positive targets.

    similarity (B, B): image i x caption j, caption i belongs to image i. ``positives`` (B, B) bool marks every
    caption that is true of an image (soft targets spread over them, and none of them is pushed away);
    ``image_ids`` (B,) is the older, coarser form (captions of the same image). ``extra_text_similarity`` (B, K):
    more captions (hard negatives) used as distractors; ``extra_mask`` (B, K) bool says which of them may serve
    as a negative of image i (default: all).
    """
    b = similarity.shape[0]
    pos = positives_mask(b, image_ids, positives, similarity.device).to(similarity.dtype)
    targets = pos / pos.sum(-1, keepdim=True)
    i2t = similarity
    i2t_targets = targets
    if extra_text_similarity is not None:
        extra = extra_text_similarity
        if extra_mask is not None:  # a distractor that is not a negative of this image is left out of its softmax
            extra = extra.masked_fill(~extra_mask.bool(), -1e4)  # finite: 0 x -inf would be NaN in the sum
        i2t = torch.cat([similarity, extra], 1)
        i2t_targets = F.pad(targets, (0, extra.shape[1]))
    t_targets = pos.T / pos.T.sum(-1, keepdim=True)
    loss_i2t = -(F.log_softmax(i2t * logit_scale, -1) * i2t_targets).sum(-1).mean()
    loss_t2i = -(F.log_softmax(similarity.T * logit_scale, -1) * t_targets).sum(-1).mean()
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
    similarity: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    positives: torch.Tensor | None = None,
    sharpness: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF-style hard negatives sampled from the similarity, never a positive.

    Returns (neg_text_for_image (B,), image_has_negative (B,), neg_image_for_text (B,), text_has_negative (B,)):
    for image i a caption j drawn with probability softmax(sharpness * S[i]) over the captions that are not true
    of it (``positives``, see :func:`positives_mask`); for caption j an image likewise. A row with no negative at
    all (every caption of the batch holds for that image) gets ``has_negative = False`` and must be dropped.
    """
    b = similarity.shape[0]
    pos = positives_mask(b, image_ids, positives, similarity.device)
    s = similarity.float()

    def draw(scores: torch.Tensor, blocked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ok = (~blocked).any(-1)
        logits = (scores * sharpness).masked_fill(blocked, float("-inf"))
        logits = torch.where(ok[:, None], logits, torch.zeros_like(logits))  # no negative: any draw, flagged
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1), ok

    # Sharpness plays the role of ALBEF's trained logit scale: it tilts the draw toward the hardest negatives.
    neg_t, ok_i = draw(s, pos)
    neg_i, ok_t = draw(s.T, pos.T)
    return neg_t, ok_i, neg_i, ok_t


def dense_attribute_loss(heads: torch.nn.ModuleList, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the attribute heads over every patch.

    tokens (B, P, C): patch tokens (no prefix); labels (B, A, P) long: attribute a of the object covering patch p
    (the last class of each head = background).
    """
    terms = [F.cross_entropy(head(tokens).flatten(0, 1), labels[:, a].flatten()) for a, head in enumerate(heads)]
    return torch.stack(terms).mean()


def grounding_loss(attentions: list[torch.Tensor], targets: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Cross-entropy between a word's text->image attention and where the word's object is.

    attentions: one (B, heads, T', N) text->image probability tensor per fusion layer (T' >= T: captions padded
    together with negatives; N = prefix + P patches). targets (B, T, P): for a word that names an object, that
    object's patch coverage normalised to sum 1; all-zero rows (other words, [CLS], padding) are not supervised.
    """
    has = targets.sum(-1) > 0  # (B, T)
    if not has.any():
        return targets.new_zeros(())
    t = targets.shape[1]
    total = targets.new_zeros(())
    for a in attentions:
        p = a.mean(1)[:, :t, num_prefix_tokens:]  # (B, T, P): mean over heads, patches only
        ce = -(targets * torch.log(p + 1e-6)).sum(-1)  # (B, T)
        total = total + (ce * has).sum() / has.sum()
    return total / len(attentions)


def relation_loss(
    head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, float | None]:
    """Binary cross-entropy of relation verdicts: (loss, accuracy; None when no word has a target).

    states (N, T, W): fused text states; targets (N, T) long: 1 = the relation this word names holds between the
    caption's two objects, 0 = it does not, -1 = no target (every other word, captions without a relation)."""
    has = targets >= 0
    if not has.any():
        return states.new_zeros(()), None
    logits = head(states[has]).squeeze(-1)  # (n,)
    y = targets[has].to(logits.dtype)
    acc = float(((logits > 0).to(y.dtype) == y).float().mean())
    return F.binary_cross_entropy_with_logits(logits, y), acc
