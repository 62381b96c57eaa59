"""Kernel-weight analysis of a trained checkpoint (the paper's MKL analysis).

    python -m training.kernel_analysis --checkpoint assets/mklvisita-shapes [--limit 300] [--out kernels.json]

Reports, on held-out shapes test scenes:

- the learned global kernel weights beta, their entropy H(beta) against log M (M kernels; log M = uniform mix);
- each kernel's mean contribution beta_m K_m to S on true (image, caption) pairs and on their hard negatives;
- ``binding_acc`` (caption above its own hard negative) overall and per negative kind, for S, the ITM probability and
  the final score (the checkpoint's ranking rule, :func:`mklvisita.ranking.final_score`, through
  :func:`mklvisita.evaluation.negative_scores` as in the evaluation command), with every kernel on and with each
  kernel family (a source such as ``local``, or a function such as ``rbf``) switched off at evaluation time.

Decisions: switching a family off sets its kernel-weight logits to a large negative number, so beta renormalises over
the remaining kernels; S, and the ITM logit's learned-weighted S term with it, change. The fusion's own per-layer mix
of local kernels (the attention bias) is left as trained: this analysis is about the similarity's kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

KINDS = ("swap", "reverse", "change")


@contextlib.contextmanager
def kernels_off(model: Any, off: list[int]) -> Iterator[None]:
    """Temporarily give the kernels ``off`` no weight (beta renormalises over the others)."""
    logits = model.kernels.logits
    saved = logits.detach().clone()
    with torch.no_grad():
        logits[off] = -1e4
    try:
        yield
    finally:
        with torch.no_grad():
            logits.copy_(saved)


def _binding(pos: np.ndarray, neg: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    hit = pos > neg  # ties are misses
    out = {"all": float(hit.mean())}
    for k in KINDS:
        if (kinds == k).any():
            out[k] = float(hit[kinds == k].mean())
    return out


@torch.no_grad()
def analyse(model: Any, processor: Any, limit: int = 300, itm_weight: float | None = None) -> dict[str, Any]:
    """The analysis as a JSON-ready dict (see the module docstring); ``itm_weight`` overrides the checkpoint's
    ranking rule's (None: the checkpoint's own)."""
    from mklvisita.data import ShapesScenes
    from mklvisita.evaluation import negative_scores
    from mklvisita.ranking import resolve_ranking
    from mklvisita.retrieval import encode_captions, encode_images

    model.eval()
    ranking = resolve_ranking(model, itm_weight=itm_weight)
    scenes = ShapesScenes(split="test", size=limit)
    images, captions, negatives, kinds, owner = [], [], [], [], []
    for i in range(limit):
        item = scenes[i]
        images.append(item["image"])
        captions += item["captions"]
        negatives += item["negatives"]
        kinds += item["negative_kinds"]
        owner += [i] * len(item["captions"])
    kinds_a, owner_a, idx = np.array(kinds), np.array(owner), np.arange(len(captions))
    image_bank = encode_images(model, processor, images)
    text_bank = encode_captions(model, processor, captions)
    neg_bank = encode_captions(model, processor, negatives)

    names = model.kernel_names
    beta = model.kernel_weights().detach().cpu().numpy()
    entropy = float(-(beta * np.log(np.clip(beta, 1e-12, None))).sum())

    def contributions(bank: Any) -> np.ndarray:
        ii = torch.as_tensor(owner_a)
        out = model.similarity(image_bank.embeddings.select(ii), bank.embeddings.select(torch.as_tensor(idx)), True)
        return out.contributions.float().cpu().numpy().mean(0)  # (M,)

    def scores() -> dict[str, dict[str, float]]:
        ns = negative_scores(model, image_bank, text_bank, neg_bank, owner_a, ranking)
        res = {"sim": _binding(ns.pos_sim, ns.neg_sim, kinds_a)}
        if ns.pos_itm is not None and ns.neg_itm is not None:
            res["itm"] = _binding(ns.pos_itm, ns.neg_itm, kinds_a)
            res["final"] = _binding(ns.pos, ns.neg, kinds_a)
        return res

    families: dict[str, list[int]] = {}
    for m, name in enumerate(names):
        source, function = name.split("/", 1)
        families.setdefault(f"source:{source}", []).append(m)
        families.setdefault(f"function:{function}", []).append(m)
    switched = {}
    for family, members in families.items():
        if len(members) == len(names):  # switching every kernel off leaves nothing to rank with
            continue
        with kernels_off(model, members):
            switched[family] = scores()
    return {
        "scenes": limit,
        "pairs": len(captions),
        "kernels": names,
        "beta": dict(zip(names, beta.round(4).tolist())),
        "beta_entropy": round(entropy, 4),
        "log_M": round(math.log(len(names)), 4),
        "mean_contribution_true": dict(zip(names, contributions(text_bank).round(4).tolist())),
        "mean_contribution_negative": dict(zip(names, contributions(neg_bank).round(4).tolist())),
        "binding_all_kernels": scores(),
        "binding_family_off": switched,
    }


def _table(result: dict[str, Any]) -> str:
    lines = [f"beta entropy {result['beta_entropy']} (log M = {result['log_M']})", "", "kernel  beta  mean beta*K"]
    for name in result["kernels"]:
        lines.append(f"{name:18s} {result['beta'][name]:.3f}  {result['mean_contribution_true'][name]:+.3f}")
    lines += ["", "binding (S / ITM / final): all " + _row(result["binding_all_kernels"])]
    for family, res in result["binding_family_off"].items():
        lines.append(f"  without {family:18s} " + _row(res))
    return "\n".join(lines)


def _row(res: dict[str, dict[str, float]]) -> str:
    return " | ".join(
        f"{part}: " + " ".join(f"{k}={v:.3f}" for k, v in res[part].items())
        for part in ("sim", "itm", "final")
        if part in res
    )


def main(argv: list[str] | None = None) -> int:
    from mklvisita.inputs import Processor
    from mklvisita.model import MKLVisITA

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--limit", type=int, default=300, help="held-out test scenes (5 captions each)")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        model = MKLVisITA.from_pretrained(args.checkpoint)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = analyse(model, Processor(model.config, model.tokenizer), args.limit)
    print(_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
