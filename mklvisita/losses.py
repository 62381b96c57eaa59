"""Losses as plain functions returning named terms, and the training step's losses (:func:`training_losses`).

Decisions:
    - The model computes features and scores; what a training step does with them (ITC over the batch, ITM on
      sampled hard negatives, the dense, grounding and relation terms) is written here, once. ``MKLVisITA.forward``
      only calls :func:`training_losses`, so a wrapped model (DDP) still runs it through ``model(...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from .features import ImageFeatures, TextFeatures
from .kernels import KernelEmbeddings


@dataclass
class MKLVisITAOutput:
    loss: torch.Tensor | None  # weighted sum of `losses`
    losses: dict[str, torch.Tensor]  # named loss terms (itc, itm, entropy)
    similarity: torch.Tensor  # (B, B) multi-kernel similarity, image x caption
    contributions: torch.Tensor  # (B, B, M) beta_m K_m
    kernel_weights: torch.Tensor  # (M,) or (B, B, M) with the gate
    logs: dict[str, float] = field(default_factory=dict)  # detached numbers for trackers (kernel entropy, ...)


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


def relation_reader_loss(
    rel: Any, relation_targets: torch.Tensor, word_targets: torch.Tensor | None, true_rows: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The relation reader's terms (:class:`mklvisita.fusion.RelationReader`): (loss, logs).

    rel: the reader's :class:`~mklvisita.fusion.RelationEvidence` for N captions (T tokens), the first ``true_rows``
    of them true captions; relation_targets (N, T): 1 / 0 at a relation word whose relation holds / is reversed, -1
    elsewhere; word_targets (true_rows, T, P): which words of the true captions name an object. Terms: the verdict's
    binary cross-entropy where a target is known and the word has objects named on both sides (support > 0.5); on
    the true captions, the relation gate against "is a relation word" (the generator marks every relation word of a
    true caption) and, where grounding targets exist, the object gate against "names an object"."""
    t = min(rel.verdict.shape[1], relation_targets.shape[1])
    targets = relation_targets[:, :t]
    logs: dict[str, float] = {}
    total = rel.verdict.new_zeros(())
    known = (targets >= 0) & (rel.support[:, :t] > 0.5)
    if known.any():
        v, y = rel.verdict[:, :t][known], targets[known].to(rel.verdict.dtype)
        total = total + F.binary_cross_entropy_with_logits(v, y)
        logs["reader_acc"] = float(((v > 0).to(y.dtype) == y).float().mean())
    tokens = torch.zeros_like(targets[:true_rows], dtype=torch.bool)
    tokens[:, 1:] = True  # [CLS] is no word (padding positions are gated out at inference; harmless here)
    gate = rel.relation_gate[:true_rows, :t][tokens]
    total = total + F.binary_cross_entropy_with_logits(gate, (targets[:true_rows] >= 0)[tokens].to(gate.dtype))
    if word_targets is not None:
        tw = min(t, word_targets.shape[1])
        named = word_targets[:true_rows, :tw].sum(-1) > 0  # (true_rows, tw)
        rows = named.any(-1, keepdim=True) & tokens[:, :tw]  # captions with grounding targets (not counts)
        if rows.any():
            og = rel.object_gate[:true_rows, :tw][rows]
            total = total + F.binary_cross_entropy_with_logits(og, named[rows].to(og.dtype))
    return total, logs


def training_losses(
    model: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    neg_input_ids: torch.Tensor | None = None,
    neg_attention_mask: torch.Tensor | None = None,
    return_loss: bool = True,
    positives: torch.Tensor | None = None,
    patch_labels: torch.Tensor | None = None,
    word_targets: torch.Tensor | None = None,
    relation_targets: torch.Tensor | None = None,
) -> MKLVisITAOutput:
    """One training step's losses for an :class:`~mklvisita.model.MKLVisITA` batch (caption i describes image i).

    Args:
        image_ids: (B,) captions of the same image are positives of each other (coarse form of ``positives``).
        neg_input_ids, neg_attention_mask: one hard-negative caption per image (e.g. attributes swapped).
        return_loss: False = the similarity, kernel contributions and weights only.
        positives: (B, B) bool, [i, j] = caption j is true of image i (the task knows: shapes claims that
            hold, identical captions). ITC spreads its targets over them and ITM never samples one as a
            negative. With it, each image's own dataset negative is its only extra ITC distractor (another
            image's negative may be true of it).
        patch_labels: (B, A, P) long, each patch's attribute classes (with ``loss.patch_weight``).
        word_targets: (B, T, P) float, for each word that names an object a distribution over that object's
            patches (zero rows elsewhere), for the grounding loss (with ``loss.grounding_weight``).
        relation_targets: (B, 2, T) long, for the relation word of caption i (row 0) and of its hard negative
            (row 1): 1 = the relation holds, 0 = it does not, -1 = no target (with ``loss.relation_weight``).
    """
    cfg = model.config.loss
    img, txt = model.encode_image(pixel_values), model.encode_text(input_ids, attention_mask)
    ei, et = model.embed_image(img), model.embed_text(txt)
    sim = model.similarity(ei, et)
    entropy = model.kernels.entropy(sim.weights)
    logs = {"kernel_entropy": float(entropy.detach()), "logit_scale": float(model.logit_scale.detach().exp())}
    if not return_loss:
        return MKLVisITAOutput(None, {}, sim.similarity, sim.contributions, sim.weights, logs)

    b = pixel_values.shape[0]
    ar = torch.arange(b, device=pixel_values.device)
    pos = positives_mask(b, image_ids, positives, pixel_values.device)
    neg = en = None
    if neg_input_ids is not None:
        neg = model.encode_text(neg_input_ids, neg_attention_mask)
        en = model.embed_text(neg)
    scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
    extra = extra_mask = None
    if en is not None and cfg.hard_negative_itc:
        extra = model.similarity(ei, en).similarity  # (B, B): image i x negative caption j
        extra_mask = torch.eye(b, dtype=torch.bool, device=ar.device) if positives is not None else None
    losses = {
        "itc": itc_loss(sim.similarity, scale, extra_text_similarity=extra, positives=pos, extra_mask=extra_mask),
        "entropy": kernel_entropy_loss(entropy, model.kernels.num_kernels),
    }
    loss = cfg.itc_weight * losses["itc"] + cfg.entropy_weight * losses["entropy"]
    logs["positives_per_image"] = float(pos.float().sum(-1).mean())
    if model.patch_heads is not None and patch_labels is not None:
        tokens = img.levels[model.vision.depth - 1][:, model.vision.num_prefix_tokens :]  # (B, P, C)
        losses["patch"] = dense_attribute_loss(model.patch_heads, tokens, patch_labels)
        loss = loss + cfg.patch_weight * losses["patch"]
    if model.fusion is not None and cfg.itm_weight > 0:
        step = _Step(img, txt, ei, et, neg, en, sim.similarity, pos)
        for name, (weight, term) in _itm_terms(model, step, word_targets, relation_targets, logs).items():
            losses[name] = term
            loss = loss + weight * term
    return MKLVisITAOutput(loss, losses, sim.similarity, sim.contributions, sim.weights, logs)


@dataclass
class _Step:
    """A training step's features: images, captions, the dataset's negative captions (or None), their embeddings,
    the similarity (B, B) and the positives mask (B, B)."""

    img: ImageFeatures
    txt: TextFeatures
    ei: KernelEmbeddings
    et: KernelEmbeddings
    neg: TextFeatures | None
    en: KernelEmbeddings | None
    similarity: torch.Tensor
    positives: torch.Tensor


def _itm_terms(
    model: Any,
    step: _Step,
    word_targets: torch.Tensor | None,
    relation_targets: torch.Tensor | None,
    logs: dict[str, float],
) -> dict[str, tuple[float, torch.Tensor]]:
    """ITM on the positives, sampled hard negatives and the dataset's own negatives, and the grounding and relation
    terms read from the same fusion pass: name -> (weight, term); accuracies go to ``logs``."""
    cfg = model.config.loss
    img, txt, ei, et, neg, en, pos = step.img, step.txt, step.ei, step.et, step.neg, step.en, step.positives
    b = step.similarity.shape[0]
    ar = torch.arange(b, device=step.similarity.device)
    terms: dict[str, tuple[float, torch.Tensor]] = {}
    img_idx, txt_idx = [ar], [ar]  # positives first
    if cfg.itm_sampled != "none" and b > 1:
        scores = step.similarity.detach()
        if cfg.itm_negatives == "random":
            scores = torch.zeros_like(scores)  # uniform over the captions that are not true of the image
        neg_t, ok_i, neg_i, ok_t = sample_hard_negatives(scores, positives=pos)
        if cfg.itm_sampled in ("both", "text"):  # a hard caption for each image
            img_idx.append(ar[ok_i])
            txt_idx.append(neg_t[ok_i])
        if cfg.itm_sampled in ("both", "image"):  # a hard image for each caption
            img_idx.append(neg_i[ok_t])
            txt_idx.append(ar[ok_t])
    texts, t_embs = txt, et
    if neg is not None:  # the dataset's own hard negative caption of each image
        texts, t_embs = TextFeatures.cat([txt, neg]), KernelEmbeddings.cat([et, en])
        img_idx.append(ar)
        txt_idx.append(ar + b)
    if sum(len(i) for i in img_idx[1:]) == 0:  # positives only: nothing to discriminate
        return terms
    ii, tt = torch.cat(img_idx), torch.cat(txt_idx)
    # The fusion's caption-independent image work once per image of the batch (image_index), not once per pair.
    m = model.match(img, texts.select(tt), ei, t_embs.select(tt), image_index=ii)
    labels = torch.zeros(len(ii), dtype=torch.long, device=ii.device)
    labels[:b] = 1
    terms["itm"] = (cfg.itm_weight, itm_loss(m.logits, labels))
    if cfg.grounding_weight > 0 and word_targets is not None:  # the first b pairs are the positives
        t2i = [a.t2i[:b] for a in m.attentions]
        terms["grounding"] = (cfg.grounding_weight, grounding_loss(t2i, word_targets, model.vision.num_prefix_tokens))
    if model.relation_head is not None and relation_targets is not None and m.text_states is not None:
        states = m.text_states[:b]  # the positives' captions, then (when given) the dataset negatives'
        targets = relation_targets[:, 0]
        if neg is not None:
            states, targets = torch.cat([states, m.text_states[-b:]]), torch.cat([targets, relation_targets[:, 1]])
        t = min(states.shape[1], targets.shape[1])
        term, acc = relation_loss(model.relation_head, states[:, :t], targets[:, :t])
        terms["relation"] = (cfg.relation_weight, term)
        if acc is not None:
            logs["relation_acc"] = acc
    if m.relation is not None and relation_targets is not None and cfg.relation_weight > 0:
        # the positives' captions (the first b pairs), then the dataset negatives' (the last b) when given
        rows = torch.cat([ar, ar + len(ii) - b]) if neg is not None else ar
        rel = type(m.relation)(*(getattr(m.relation, f.name)[rows] for f in fields(m.relation)))
        targets = relation_targets[:, 0] if neg is None else torch.cat([relation_targets[:, 0], relation_targets[:, 1]])
        term, more = relation_reader_loss(rel, targets, word_targets, b)
        terms["reader"] = (cfg.relation_weight, term)
        logs.update(more)
    hit = m.logits.argmax(-1) == labels
    logs["itm_acc"] = float(hit.float().mean())
    logs["itm_acc_pos"] = float(hit[:b].float().mean())
    if neg is not None:
        logs["itm_acc_dataset_neg"] = float(hit[-b:].float().mean())
    return terms
