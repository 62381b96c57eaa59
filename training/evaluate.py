"""Evaluate a checkpoint on a retrieval benchmark or the shapes test splits.

    python -m training.evaluate --checkpoint DIR|HUB_ID --data SPEC --out metrics.json
        [--split test] [--k 128] [--itm-weight 1.0] [--limit N] [--no-extra] [--batch-size 64] [--revision REV]

Data specs: ``shapes`` (held-out shapes test split: 1,000 scenes x 5 captions), ``shapes-compositional`` (the
held-out colour-shape pairs), ``karpathy:<json>:<image root>``, ``lavis:<json>:<image root>``, ``hf:<dataset id>``,
``tuxpaint[:<folder>]`` (single photo stamps), ``tuxpaint-relations[:<folder>]`` (composites of two or three photo
stamps with relation captions: binding per kind ``reverse`` / ``replace`` / ``swap``, phrase and word pointing;
``--split test`` or ``tune``), ``composites`` (generated clip-art scenes of held-out titles; ``--split test`` or
``val``) (resolved by :func:`mklvisita.tasks.get_task`). ``--limit N`` evaluates the first N images
(scenes) only, and ``--no-extra`` skips the task's extra metrics (the pointing games): a quick look during
research. Measured on the shared 2-core machine under load, tiny model, ``--limit 200``: 2m50s with everything,
75 s with ``--no-extra`` (53 s of it the ITM re-ranking; add ``--k 0`` when only binding is wanted).
On shapes the JSON adds ``binding_acc`` overall and per negative kind for the final score, the ITM probability and
the similarity (``binding_acc_swap``, ``binding_acc_swap_itm``, ``binding_acc_swap_sim``, ...; see
:mod:`mklvisita.evaluation`), ``pointing_acc`` / ``pointing_chance`` (phrase pointing game) and ``word_pointing_acc``
/ ``word_pointing_chance`` (the colour and shape words of each object in multi-object captions).

The protocol and the metrics live in :mod:`mklvisita.evaluation` (library code the trainer calls too). The JSON's
``meta.command`` records the call with absolute paths made portable (:func:`portable_argument`), so a result file
committed to the repository names no directory of the machine that wrote it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mklvisita.evaluation import EXTRA_METRICS, EvalData, evaluate_model, load_eval_data, pair_scores

__all__ = ["EXTRA_METRICS", "EvalData", "evaluate_model", "load_eval_data", "pair_scores", "main"]


def portable_argument(arg: str, cwd: Path | None = None) -> str:
    """An absolute path inside the working directory -> relative to it; one outside -> ``<outside>/<file name>``;
    anything else unchanged."""
    if not Path(arg).is_absolute():
        return arg
    cwd = (cwd or Path.cwd()).resolve()
    path = Path(arg).resolve()
    return path.relative_to(cwd).as_posix() if path.is_relative_to(cwd) else f"<outside>/{path.name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="release folder or Hugging Face Hub id")
    parser.add_argument("--revision", default=None, help="Hub revision (commit, tag or branch) to pin")
    parser.add_argument("--data", required=True, help="shapes | karpathy:<json>:<root> | tuxpaint | composites | ...")
    parser.add_argument("--split", default="test", help="split of --data (default: test)")
    parser.add_argument("--out", required=True, help="where to write the metrics JSON")
    parser.add_argument("--k", type=int, default=None, help="re-rank top k by ITM (default: the model's ranking.k)")
    parser.add_argument(
        "--itm-weight", type=float, default=None, help="final score = w * ITM + w_s * S: w (default: ranking's)"
    )
    parser.add_argument(
        "--similarity-weight",
        type=float,
        default=None,
        help="final score = w * ITM + w_s * S: w_s (default: ranking's)",
    )
    parser.add_argument(
        "--candidates", type=int, default=None, help="cascade: global kernels keep N per query; 0 = exhaustive S"
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0 = all)")
    parser.add_argument(
        "--no-extra", action="store_true", help="skip the task's extra metrics (shapes: the pointing games)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from mklvisita import Matcher
    from mklvisita.ranking import resolve_ranking

    matcher = Matcher.from_pretrained(args.checkpoint, revision=args.revision)
    model = matcher.model.to(args.device)
    data = load_eval_data(args.data, args.split, args.limit)
    # The checkpoint's ranking rule (mklvisita.ranking, its one owner), each flag that is given overriding its field.
    try:
        ranking = resolve_ranking(
            model,
            k=args.k,
            itm_weight=args.itm_weight,
            similarity_weight=args.similarity_weight,
            candidates=args.candidates,
        )
    except ValueError as e:
        parser.error(str(e))
    metrics = evaluate_model(
        model,
        matcher.processor,
        data,
        k=ranking.k,
        itm_weight=ranking.itm_weight,
        batch_size=args.batch_size,
        extra_metrics={} if args.no_extra else None,
        candidates=ranking.candidates,
        similarity_weight=ranking.similarity_weight,
    )
    result = {
        **metrics,
        "meta": {
            "checkpoint": args.checkpoint,
            "revision": args.revision,
            "data": args.data,
            "split": data.split,
            "n_images": len(data.images),
            "n_captions": len(data.captions),
            "k": ranking.k if model.has_itm else 0,
            "itm_weight": ranking.itm_weight,
            "similarity_weight": ranking.similarity_weight,
            "candidates": ranking.candidates,
            "command": "python -m training.evaluate "
            + " ".join(portable_argument(a) for a in (sys.argv[1:] if argv is None else argv)),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: round(v, 4) for key, v in metrics.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
