"""What does a shapes checkpoint's image side know of each attribute? (docs/experiments.md)

    python -m training.shape_probe --checkpoint assets/mklvisita-shapes [--scenes 500] [--out probe.json]

Two views on validation scenes, both per attribute (colour, shape, size):

- ``patch_acc_<attr>``: the training-time patch heads (``loss.patch_classes``) on the last ViT level, scored on the
  patches an object covers (``mklvisita.data.grounding.patch_attribute_labels``; background patches left out), with
  the chance level of always answering the most frequent class;
- ``change_acc_<attr>``: binding on the single-attribute-changed hard negatives (``negative_kinds == "change"``),
  split by the attribute that changed, for the final score (the checkpoint's ranking rule, :mod:`mklvisita.ranking`),
  with counts.

On the shapes checkpoint trained without the convolutional stem it found shape the weak attribute: the patch heads
named an object patch's shape 27 % of the time (colour 97 %, size 90 %) and a changed shape word was caught in 69 % of
captions (colour and size 95 %; docs/results/shape_probe/stage2_no_stem.json). A research diagnostic: nothing else
imports it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mklvisita import Matcher
from mklvisita.data.grounding import PATCH_CLASSES, patch_attribute_labels
from mklvisita.data.shapes import COLOURS, SHAPES, SIZES, ShapesScenes
from mklvisita.evaluation import EvalData, load_eval_data, negative_scores

ATTRIBUTES = ("colour", "shape", "size")


def changed_attribute(caption: str, negative: str) -> str | None:
    """Which attribute a single-attribute change altered ("colour", "shape", "size"), from the words that differ;
    None when the change is not one attribute word (a count, or a changed article alone)."""
    vocab = {"colour": set(COLOURS), "shape": set(SHAPES), "size": set(SIZES)}
    a, b = caption.split(), negative.split()
    if len(a) != len(b):
        return None
    diff = [(x, y) for x, y in zip(a, b) if x != y and x not in ("a", "an")]
    if len(diff) != 1:
        return None
    return next((attr for attr, words in vocab.items() if diff[0][0] in words and diff[0][1] in words), None)


@torch.no_grad()
def patch_accuracy(model, processor, scenes: ShapesScenes, batch_size: int = 50) -> dict[str, float]:
    """The patch heads' accuracy per attribute on object patches, with the majority-class chance level."""
    if model.patch_heads is None:
        raise ValueError(
            "this checkpoint has no patch heads (trained with loss.patch_weight = 0): nothing to probe; "
            "use a checkpoint trained with the patch attribute loss"
        )
    grid = model.vision.grid
    correct, counts = np.zeros(len(ATTRIBUTES)), [np.zeros(n) for n in PATCH_CLASSES]
    total = 0
    for start in range(0, len(scenes), batch_size):
        items = [scenes[i] for i in range(start, min(len(scenes), start + batch_size))]
        pixels, _ = processor.images([it["image"] for it in items])
        image = model.encode_image(pixels)
        tokens = image.levels[model.vision.depth - 1][:, model.vision.num_prefix_tokens :]
        preds = [head(tokens).argmax(-1).numpy() for head in model.patch_heads]
        for b, item in enumerate(items):
            labels = patch_attribute_labels(item["objects"], grid)
            on_object = labels[1] != PATCH_CLASSES[1] - 1  # background is each head's last class
            total += int(on_object.sum())
            for a in range(len(ATTRIBUTES)):
                correct[a] += (preds[a][b][on_object] == labels[a][on_object]).sum()
                counts[a] += np.bincount(labels[a][on_object], minlength=PATCH_CLASSES[a])
    out = {"patch_n": float(total)}
    for a, attr in enumerate(ATTRIBUTES):
        out[f"patch_acc_{attr}"] = float(correct[a] / max(total, 1))
        out[f"patch_chance_{attr}"] = float(counts[a].max() / max(total, 1))
    return out


@torch.no_grad()
def change_accuracy(model, processor, scenes: int | EvalData) -> dict[str, float]:
    """Binding (final score) on single-attribute-changed negatives, split by the attribute changed; ``scenes``: the
    number of validation scenes, or the shapes evaluation data already loaded."""
    from mklvisita.retrieval import encode_captions, encode_images

    data = scenes if isinstance(scenes, EvalData) else load_eval_data("shapes", "val", scenes)
    images = encode_images(model, processor, data.images, batch_size=64)
    pos_bank = encode_captions(model, processor, data.captions, batch_size=64)
    neg_bank = encode_captions(model, processor, data.negatives, batch_size=64)
    ns = negative_scores(model, images, pos_bank, neg_bank, data.txt2img)  # the model's ranking rule
    pos, neg = ns.pos, ns.neg
    out: dict[str, float] = {}
    which = [
        changed_attribute(c, n) if kind == "change" else None
        for c, n, kind in zip(data.captions, data.negatives, data.negative_kinds)
    ]
    for attr in ATTRIBUTES:
        sel = np.array([w_ == attr for w_ in which])
        out[f"change_n_{attr}"] = float(sel.sum())
        if sel.any():
            out[f"change_acc_{attr}"] = float((pos[sel] > neg[sel]).mean())
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a shapes release folder or Hub id")
    parser.add_argument("--scenes", type=int, default=500, help="validation scenes to probe")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    m = Matcher.from_pretrained(args.checkpoint)
    model = m.model.eval()
    data = load_eval_data("shapes", "val", args.scenes)  # its source: the same scenes (seed 0) for the patch heads
    result = patch_accuracy(model, m.processor, data.source)
    result |= change_accuracy(model, m.processor, data)
    for key, value in result.items():
        print(f"{key:24s} {value:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "scenes": args.scenes, "metrics": result}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
