"""Match and explain latency (p50 / p95) of MKL-VisITA against the same backbones run as a plain dual encoder.

    python -m benchmarks.latency [--quick] [--repeats 10] [--threads N] [--out DIR]

Decisions: "Match" is ``Matcher.score`` on one photo (``assets/examples/cat.jpg``) x five captions, decoding and
preprocessing included (what the demo's Match tab pays); the dual encoder is the same preprocessing plus the model's
own image and text encoders, nothing else, so the ratio is the price of the kernels and the fusion. Configs: the
shipped tiny (shapes) checkpoint, the photo checkpoint when ``assets/mklvisita-photo`` holds one, and the base preset
(random init: weights do not change the time), also with the original fusion (``image_pool`` 1, full image MLP) to
show what the cheaper fusion saves. ``--quick``: a micro model, two repeats.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from benchmarks.common import ROOT, parser, report, setup, time_calls

IMAGE = ROOT / "assets" / "examples" / "cat.jpg"
CAPTIONS = [
    "a tabby cat lying on a rug",
    "a cup of coffee on a saucer",
    "a rocket lifting off from a launch pad",
    "an astronaut in an orange suit",
    "a red circle left of a blue square",
]


def micro_config():
    from mklvisita import MKLVisITAConfig

    cfg = MKLVisITAConfig.tiny()
    cfg.vision = dataclasses.replace(cfg.vision, image_size=32, depth=2, width=32, heads=2)
    cfg.text = dataclasses.replace(cfg.text, width=32, heads=2)
    cfg.kernels = dataclasses.replace(cfg.kernels, proj_dim=16)
    cfg.fusion = dataclasses.replace(cfg.fusion, width=32, heads=2)
    return cfg


def matchers(quick: bool) -> dict[str, Any]:
    """name -> a zero-argument function building the Matcher (built one at a time to bound memory)."""
    from mklvisita import Matcher, MKLVisITA, MKLVisITAConfig
    from mklvisita.matcher import EMBEDDED

    def random(cfg):
        torch.manual_seed(0)
        return lambda: Matcher(MKLVisITA(cfg))

    if quick:
        return {"micro (random init)": random(micro_config())}
    out = {}
    for name, label in (("shapes", "tiny (shapes checkpoint)"), ("photo", "photo checkpoint")):
        if (EMBEDDED[name] / "model.safetensors").is_file():
            out[label] = lambda name=name: Matcher.default(name)
    base = MKLVisITAConfig.base()
    out["base"] = random(base)
    orig = dataclasses.replace(base, fusion=dataclasses.replace(base.fusion, image_pool=1, image_mlp_ratio=None))
    out["base, original fusion"] = random(orig)
    return out


def dual_encoder(matcher) -> Any:
    """The model's own image and text encoders on the same inputs: a plain dual encoder of the same backbones."""
    model, proc = matcher.model, matcher.processor
    dev = next(model.parameters()).device

    def run():
        with torch.inference_mode():
            pv, _ = proc.images([str(IMAGE)])
            enc = proc.captions(CAPTIONS)
            model.encode_image(pv.to(dev))
            model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))

    return run


def measure_one(name: str, m: Any, repeats: int) -> dict[str, Any]:
    m.model.to("cuda" if torch.cuda.is_available() else "cpu")
    match = time_calls(lambda: m.score([str(IMAGE)], CAPTIONS), repeats)
    dual = time_calls(dual_encoder(m), repeats)
    explain = time_calls(lambda: m.explain(str(IMAGE), CAPTIONS[0]), max(2, repeats // 2))
    return {
        "config": name,
        "match_p50_ms": match["p50_ms"],
        "match_p95_ms": match["p95_ms"],
        "dual_p50_ms": dual["p50_ms"],
        "dual_p95_ms": dual["p95_ms"],
        "match_over_dual": match["p50_ms"] / dual["p50_ms"],
        "explain_p50_ms": explain["p50_ms"],
        "explain_p95_ms": explain["p95_ms"],
    }


def measure(quick: bool, repeats: int) -> list[dict[str, Any]]:
    return [measure_one(name, build(), repeats) for name, build in matchers(quick).items()]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    setup(args)
    rows = measure(args.quick, 2 if args.quick else args.repeats)
    return report("latency", args, rows, {"captions": CAPTIONS, "image": IMAGE.name})


if __name__ == "__main__":
    main()
    sys.exit(0)
