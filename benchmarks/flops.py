"""Forward GFLOP/s of a Match (1 image x 5 captions) against a square fp32 matmul on the same machine.

    python -m benchmarks.flops [--quick] [--matmul 2048] [--repeats 5] [--configs base,base-pool4] [--out DIR]

Decisions: FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over the model calls of a Match
(encoders, kernel embeddings, similarity, fusion + ITM; preprocessing excluded, as it does no FLOPs the counter
sees), then divided by the p50 time of the same calls; the matmul's 2 n^3 / t is the machine's practical ceiling.
The ratio says how much of that ceiling the model's forward reaches (small ops and attention reach little of it).
Rows and ``--configs`` as in :mod:`benchmarks.latency` (the same matchers, so the base rows use the same tokenizer).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import device, parser, report, setup, time_calls
from benchmarks.latency import BASE_VARIANTS, CAPTIONS, CONFIGS, IMAGE, matchers


def matmul_gflops(n: int, repeats: int) -> float:
    dev = device()
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    t = time_calls(lambda: a @ b, repeats)
    return 2 * n**3 / (t["p50_ms"] / 1000) / 1e9


def match_call(m: Any) -> Any:
    m.model.to(device())
    from mklvisita.retrieval import ImageBank, TextBank, match_pairs

    model, proc = m.model, m.processor
    dev = next(model.parameters()).device
    pv, _ = proc.images([str(IMAGE)])
    enc = proc.captions(CAPTIONS)
    pv, ids, mask = pv.to(dev), enc["input_ids"].to(dev), enc["attention_mask"].to(dev)

    def run():
        with torch.inference_mode():
            img, txt = model.encode_image(pv), model.encode_text(ids, mask)
            ei, et = model.embed_image(img), model.embed_text(txt)
            model.similarity(ei, et)
            if model.has_itm:
                keep = img.keep(model.fusion_levels)
                tk = txt.keep([model.text.depth - 1])
                ii = torch.zeros(len(CAPTIONS), dtype=torch.long)
                match_pairs(model, ImageBank(ei, keep), TextBank(et, tk), ii, torch.arange(len(CAPTIONS)))

    return run


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--matmul", type=int, default=2048, help="side of the square fp32 matmul")
    p.add_argument("--repeats", type=int, default=5)
    names, default = ", ".join(CONFIGS + list(BASE_VARIANTS)), ", ".join(CONFIGS)
    p.add_argument("--configs", default=None, help=f"comma-separated rows from: {names} (default: {default})")
    args = p.parse_args(argv)
    setup(args)
    repeats = 2 if args.quick else args.repeats
    peak = matmul_gflops(128 if args.quick else args.matmul, repeats)
    rows = [
        {
            "config": f"fp32 matmul {128 if args.quick else args.matmul}^2",
            "gflop": float("nan"),
            "p50_ms": float("nan"),
            "gflops_per_s": peak,
            "of_matmul": 1.0,
        }
    ]
    configs = args.configs.split(",") if args.configs else None
    for name, build in matchers(args.quick, configs).items():
        run = match_call(build())
        with FlopCounterMode(display=False) as counter:
            run()
        flop = counter.get_total_flops()
        t = time_calls(run, repeats)
        rate = flop / (t["p50_ms"] / 1000) / 1e9
        rows.append(
            {"config": name, "gflop": flop / 1e9, "p50_ms": t["p50_ms"], "gflops_per_s": rate, "of_matmul": rate / peak}
        )
    return report("flops", args, rows)


if __name__ == "__main__":
    main()
    sys.exit(0)
