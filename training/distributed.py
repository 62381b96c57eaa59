"""Training across processes: the contrastive loss over the global batch.

With ``accelerate launch --num_processes N`` each process encodes its own sub-batch of ``batch_size`` captions; the
*global batch* of one micro-batch is ``N x batch_size`` (and an optimizer step sees ``grad_accum_steps`` of them).
This module makes the image-text contrastive loss (ITC) that of the global batch, as one process with
``batch_size x N`` computes it.

Decisions:

- **ITC over the global batch.** Every process gathers the kernel embeddings of all processes' images, captions and
  hard-negative captions (:func:`gather_with_grad`: all-gather forward; backward sums the gradient over processes
  and keeps this process's slice, as ``torch.distributed.nn.functional.all_gather`` does, written out because gloo
  has no reduce-scatter) and computes the full (G, G) InfoNCE of :func:`mklvisita.losses.itc_loss`, the same value
  on every process. DDP averages gradients over the N processes; the gathered copies carry N times this process's
  share back to it, so the averaged gradient is the one-process gradient (open_clip's ``gather_with_grad`` with the
  global loss). Cost: each process computes the G x G similarity a single process computes.
- **The positives mask** of the global batch comes from the task (:meth:`mklvisita.tasks.Task.positives`) on all
  processes' items (their pixels left out), gathered as pickles: a caption true of another process's image is a
  positive there, never a negative, exactly as in one process.
- **Per process, as in ALBEF:** ITM hard negatives are sampled from each process's own (B, B) block of the
  similarity, and the ITM, patch, grounding and relation losses are means over its own sub-batch; DDP averages
  them. Means over equal sub-batches average to the global mean; the word-level losses (grounding, relation) are
  ratios over the words that have targets, whose count differs between sub-batches, so their average weighs each
  process equally where one process weighs each word equally.
- **The embeddings are read from the model's own forward:** inside :func:`capture_similarity_inputs` the model's
  ``similarity`` method records its (image, caption) arguments; the forward's local ITC is then swapped for the
  global one in the loss (``loss + w * (itc_global - itc_local)``; the local term's gradient cancels exactly).
  The forward, its loss terms and its hard-negative sampling stay the library's; nothing is computed twice but the
  small local similarity.
- **Logged terms** are each term's mean over the micro-batches of every process that reported it
  (:func:`mean_over_processes`): processes may log different terms (a sub-batch without a relation caption has no
  ``relation_acc``), which a plain all-reduce of one vector per process would misalign.
- **CPU processes.** Without MPI, ``accelerate launch --cpu --num_processes N`` starts the script once (accelerate's
  multi-CPU launcher is ``mpirun``). The lone process finds N on its launcher's command line
  (:func:`mklvisita.processes.requested_cpu_processes`) and starts the N processes itself with torchrun's launcher
  (:func:`mklvisita.processes.launch_cpu_processes`), on accelerate's master address and port; ``torchrun
  --nproc_per_node N`` and ``accelerate launch --multi_gpu --num_processes N`` on a machine without a GPU start them
  directly. All use gloo.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mklvisita.kernels import KernelEmbeddings
from mklvisita.losses import itc_loss


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """(B, ...) on each process -> (N * B, ...) in process order; backward: sum over processes, own slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on this process's rows
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0 (equal dim 0 on all processes), differentiably.

    Dimensions past the first may differ between processes (captions padded to each sub-batch's longest): each is
    zero-padded at its end to the largest, as :meth:`KernelEmbeddings.cat` pads captions of different batches.
    Integer and bool tensors (masks) are gathered without gradient.
    """
    if world_size() == 1:
        return tensor
    shape = torch.tensor(tensor.shape, device=tensor.device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    if int(shape[0]) != tensor.shape[0]:
        raise ValueError(
            f"gather_with_grad: processes hold sub-batches of different sizes ({tensor.shape[0]} here, "
            f"{int(shape[0])} elsewhere); the training loader must give every process full batches (drop_last)"
        )
    pad: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape[1:].tolist())):
        pad += [0, int(want) - have]
    if any(pad):
        tensor = F.pad(tensor, pad)
    if tensor.is_floating_point():
        return _GatherWithGrad.apply(tensor)
    as_bytes = tensor.dtype == torch.bool  # gloo reduces and gathers no bool tensors
    t = tensor.to(torch.uint8) if as_bytes else tensor
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    out = torch.cat(parts)
    return out.bool() if as_bytes else out


def gather_embeddings(e: KernelEmbeddings) -> KernelEmbeddings:
    """Every process's :class:`KernelEmbeddings`, concatenated in process order (fields padded like ``cat``)."""
    if world_size() == 1:
        return e
    return e.map(gather_with_grad)  # every tensor, pooled and each source's, in the same order on every process


def item_metadata(items: list[dict[str, Any]]) -> bytes:
    """The collate's items without their pixels (what a task's ``positives`` reads), pickled for gathering."""
    keep = [
        {k: v for k, v in it.items() if k != "image" and not isinstance(v, (np.ndarray, torch.Tensor))} for it in items
    ]
    return pickle.dumps(keep)


def gather_items(metadata: bytes) -> list[dict[str, Any]]:
    """All processes' items (from :func:`item_metadata`), in process order: the global batch's rows."""
    if world_size() == 1:
        return pickle.loads(metadata)  # noqa: S301 - written by this run's own collate
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, metadata)
    return [it for part in parts for it in pickle.loads(part)]  # noqa: S301 - from this run's processes


class MetadataCollate:
    """A training collate that also hands on its items' metadata (``batch["items"]``, bytes) for the global
    positives mask; the train loop removes the key before the forward."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(items)
        batch["items"] = item_metadata(items)
        return batch


@contextmanager
def capture_similarity_inputs(model: torch.nn.Module) -> Iterator[list[tuple[KernelEmbeddings, KernelEmbeddings]]]:
    """Record the (image, caption) embeddings of every all-pairs ``model.similarity`` call made inside the block
    (the forward's captions first, then its hard negatives'); pairwise calls (ITM's score bias) are not recorded."""
    calls: list[tuple[KernelEmbeddings, KernelEmbeddings]] = []
    real = model.similarity

    def similarity(img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool = False) -> Any:
        if not pairwise:
            calls.append((img, txt))
        return real(img, txt, pairwise)

    model.similarity = similarity  # an instance attribute shadows the method for this block only
    try:
        yield calls
    finally:
        del model.similarity


def global_itc_loss(
    model: Any,
    calls: list[tuple[KernelEmbeddings, KernelEmbeddings]],
    positives: torch.Tensor | None,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward's ITC over the global batch, from the embeddings :func:`capture_similarity_inputs` recorded.

    Same rule as the forward's (:func:`mklvisita.losses.training_losses`): the captions' similarity (G, G), the
    dataset hard negatives as extra distractors when the forward used them (with a positives mask, each image's own
    negative only), temperature ``exp(logit_scale)`` capped at 100. ``positives``: the global (G, G) mask; without
    it the gathered ``image_ids`` (G,) make captions of one image positives (neither: the diagonal only).
    """
    if not calls:
        raise RuntimeError(
            "the model's forward made no all-pairs model.similarity call, so there are no embeddings to gather for "
            "the global-batch ITC; training/distributed.py must follow how mklvisita.losses.training_losses computes it"
        )
    ei, et = calls[0]
    ei_all = gather_embeddings(ei)
    sim = model.similarity(ei_all, gather_embeddings(et)).similarity  # (G, G)
    extra = extra_mask = None
    negatives = [txt for img, txt in calls[1:] if img is ei]
    if negatives:
        extra = model.similarity(ei_all, gather_embeddings(negatives[0])).similarity  # (G, G)
        if positives is not None:
            extra_mask = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
    pos = None if positives is None else positives.to(sim.device)
    ids = None if pos is not None or image_ids is None else image_ids.to(sim.device)
    return itc_loss(sim, scale, ids, extra_text_similarity=extra, positives=pos, extra_mask=extra_mask)


def global_batch_loss(
    model: Any, unwrapped: Any, batch: dict[str, Any], task: Any, itc_weight: float
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """Run the forward on this process's sub-batch and swap its ITC for the global batch's.

    Returns (the forward's output, the loss to back-propagate, the loss terms with ``itc`` the global one).
    ``model``: the prepared (DDP) model; ``unwrapped``: the model itself; ``batch["items"]``: from
    :class:`MetadataCollate`.
    """
    metadata = batch.pop("items")
    with capture_similarity_inputs(unwrapped) as calls:
        out = model(**batch, return_loss=True)
    items = gather_items(metadata)  # every process takes part, whichever mask it needs
    positives = task.positives(items) if batch.get("positives") is not None else None
    ids = batch.get("image_ids")
    itc = global_itc_loss(unwrapped, calls, positives, None if ids is None else gather_with_grad(ids))
    loss = out.loss + itc_weight * (itc - out.losses["itc"])
    return out, loss, {**out.losses, "itc": itc}


def mean_over_processes(terms: dict[str, tuple[float, int]], n_proc: int) -> dict[str, float]:
    """Each term's mean over the micro-batches of every process that reported it: ``terms`` maps a name to this
    process's (sum, count). One small gather per step; processes may report different terms (a sub-batch with no
    relation caption has no ``relation_acc``)."""
    parts = [terms]
    if n_proc > 1:
        from accelerate.utils import gather_object

        parts = gather_object([terms])
    names = list(dict.fromkeys(k for part in parts for k in part))
    out = {}
    for k in names:
        total = sum(part[k][0] for part in parts if k in part)
        count = sum(part[k][1] for part in parts if k in part)
        out[k] = total / count
    return out
