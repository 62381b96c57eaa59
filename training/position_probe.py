"""Do object positions reach the fused words? A linear probe on a shapes checkpoint (docs/experiments.md).

    python -m training.position_probe --checkpoint assets/mklvisita-shapes [--scenes 1500] [--limit 700]

For each true relation caption of validation scenes ("a purple cross to the left of a large star"), the fused text
states of the two shape words at the input of the last fusion layer are collected; ridge read-outs (fit on the first
70 %, scored on the rest) predict each object's centre and the subject-object offset. Prints R^2 and the accuracy of
the offset's sign. A research diagnostic: nothing else imports it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mklvisita import Matcher
from mklvisita.data.grounding import claim_assignment
from mklvisita.data.shapes import ShapesScenes


def collect(checkpoint: str, scenes: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2W) [subject word state, object word state] and (N, 4) object centres (x0, y0, x1, y1) in [0, 1]."""
    m = Matcher.from_pretrained(checkpoint)
    model, proc = m.model.eval(), m.processor
    ds = ShapesScenes("val", size=scenes, seed=0)
    grab: dict[str, torch.Tensor] = {}
    last_in = model.fusion.layers[-2]  # its text output is the last layer's input
    hook = last_in.register_forward_hook(lambda mod, inp, out: grab.__setitem__("txt", out[0]))
    feats, centres = [], []
    try:
        for i in range(len(ds)):
            scene, item = ds.scene(i), ds[i]
            for claim, text in zip(scene.claims, item["captions"]):
                chosen = claim_assignment(claim, scene.objects, ds.image_size) if claim.kind == "relation" else None
                if chosen is None:
                    continue
                enc = proc.captions([text])
                ids = enc["input_ids"][0].tolist()
                s0, s1 = (proc.tokenizer.encode(d.shape, add_special_tokens=False)[0] for d in claim.descs)
                p0, p1 = ids.index(s0), len(ids) - 1 - ids[::-1].index(s1)  # subject first, object last
                pv, _ = proc.images([item["image"]])
                with torch.no_grad():
                    model.match(model.encode_image(pv), model.encode_text(enc["input_ids"], enc["attention_mask"]))
                t = grab["txt"][0]
                a, b = scene.objects[chosen[0]], scene.objects[chosen[1]]
                feats.append(torch.cat([t[p0], t[p1]]).numpy())
                centres.append([a.cx, a.cy, b.cx, b.cy])
            if len(feats) >= limit:
                break
    finally:
        hook.remove()
    return np.asarray(feats), np.asarray(centres) / ds.image_size


def ridge_r2(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> tuple[float, np.ndarray, np.ndarray]:
    """R^2 on the held-out 30 % of a ridge fit on the first 70 %; also the held-out predictions and targets."""
    a = np.c_[x, np.ones(len(x))]
    n = int(0.7 * len(x))
    w = np.linalg.solve(a[:n].T @ a[:n] + alpha * np.eye(a.shape[1]), a[:n].T @ y[:n])
    pred, true = a[n:] @ w, y[n:]
    return float(1 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum()), pred, true


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="assets/mklvisita-shapes")
    p.add_argument("--scenes", type=int, default=1500, help="validation scenes to draw captions from")
    p.add_argument("--limit", type=int, default=700, help="relation captions to collect")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x, c = collect(args.checkpoint, args.scenes, args.limit)
    w = x.shape[1] // 2
    print(f"{len(x)} relation captions")
    print(f"subject word -> its x: R2 {ridge_r2(x[:, :w], c[:, 0])[0]:.3f}")
    print(f"subject word -> its y: R2 {ridge_r2(x[:, :w], c[:, 1])[0]:.3f}")
    print(f"object word -> its x: R2 {ridge_r2(x[:, w:], c[:, 2])[0]:.3f}")
    for axis, (i, j) in (("dx", (0, 2)), ("dy", (1, 3))):
        r2, pred, true = ridge_r2(x, c[:, i] - c[:, j])
        print(f"pair -> {axis}: R2 {r2:.3f}  sign accuracy {((pred > 0) == (true > 0)).mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
