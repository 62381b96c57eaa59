"""Choose the photo-fusion checkpoint's ITM weight and default map on the Tux Paint tune half, never the test half.

    python -m training.photo_fusion_tune --checkpoint runs/photo_fusion/release \
        --out docs/results/photo_fusion/itm_weight_tune.json [--write runs/photo_fusion/release]

Decisions:
    - One encoding, every weight: the banks, S for every pair, ITM for the top-k pairs of each query (k = the
      checkpoint's ``ranking.k``) and for each relation caption and its hard negative are computed once; each weight
      only recombines them (``final = w x ITM + S``, as :func:`mklvisita.ranking.final_score`), so the sweep costs one
      evaluation. Retrieval follows the cascade with exhaustive S: the top k by S are re-ranked by the final score and
      stay above every caption (image) outside them, which keep S's order.
    - The rule: the largest relation-binding accuracy (``tuxpaint-relations`` tune: relation reversed, object replaced,
      objects swapped, every caption against its hard negative) among the weights whose single-stamp R@1 (``tuxpaint``
      tune, the mean of both directions) is within 1 point of S alone (w = 0); ties go to the smaller weight.
    - The default explanation (``fusion.explain_method``): with the chosen head scale and weight, the phrase
      pointing game (:func:`mklvisita.pointing.pointing_game`: each stamp's phrase explained against its scene, is the
      map's peak on the stamp) on the tune half's relation scenes, per method of ``--explain-methods``; the best one
      is the default map of :meth:`mklvisita.Matcher.explain` and the demo (ties go to the first listed, Grad-CAM).
      The other stays available by name.
    - With a relation reader, ``fusion.reader_head_nouns`` (where the reader places each named object: its last word
      piece, or the mean of its words as trained) is swept with the head scales and weights under the same rule (ties
      keep the trained behaviour): it changes no weight, only how the reader reads the maps.
    - ``--reader-attention-powers`` sweeps ``fusion.reader_attention_power`` the same way (the reader's centroids
      from the last layer's attention raised to a power: where a word looks most rather than the mean of its map;
      ties keep the trained 1).
    - ``--affinity-bias-scales`` sweeps ``fusion.affinity_bias_scale`` the same way (the concept maps' bias on the
      words' attention scaled at serving: the fusion learned how far to follow those maps on clip art, and the
      ImageNet classifier behind them was trained on photographs; ties keep the trained 1).
    - ``--write`` saves the checkpoint again with the chosen ``ranking.itm_weight``, ``fusion.itm_head_scale``,
      ``fusion.affinity_bias_scale``, ``fusion.reader_head_nouns``, ``fusion.reader_attention_power`` and
      ``fusion.explain_method`` (nothing else changes).
    - ``--source-options JSON`` serves the checkpoint with other settings of its feature sources (``kernels.options``,
      e.g. the cost settings ``{"colour": {"stride": 2}, "scene_text": {"detector_side": 224}, "person":
      {"scale_step": 1.3}}``): set before the sweep, so the weight and the map are chosen with the features the
      checkpoint will serve, and written with ``--write``. Only settings of sources the checkpoint has; no weight
      changes.
    - ``--beta-from CHECKPOINT`` first copies that checkpoint's kernel weights beta (same kernels, e.g. the photo
      checkpoint's tune-half grid) over the learned ones, so the learned and the grid beta are compared on the tune
      half by the sweep's S-alone row (``itm_weight`` 0) of each run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Small weights too: a hard negative's S is within a few hundredths of its caption's, so even 0.05 x a confident ITM
# can decide a binding pair while it barely moves a retrieval ranking.
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


@torch.no_grad()
def _encode(model: Any, processor: Any, spec: str, split: str, k: int, limit: int = 0) -> dict[str, Any]:
    """One data spec's encodings, S of every pair, and the pairs ITM scores: the top k of each query, and each
    caption and its hard negative on the caption's image."""
    from mklvisita.evaluation import load_eval_data
    from mklvisita.retrieval import encode_captions, encode_images, similarity_matrix

    data = load_eval_data(spec, split, limit)
    images = encode_images(model, processor, data.images)
    texts = encode_captions(model, processor, data.captions)
    sim = similarity_matrix(model, images, texts).float()  # (n_img, n_txt)
    k_i, k_t = min(k, sim.shape[1]), min(k, sim.shape[0])
    top_i = sim.topk(k_i, dim=1).indices  # (n_img, k): captions of each image query
    top_t = sim.T.topk(k_t, dim=1).indices  # (n_txt, k): images of each caption query
    pairs = {(int(i), int(t)) for i in range(sim.shape[0]) for t in top_i[i]}
    pairs |= {(int(i), int(t)) for t in range(sim.shape[1]) for i in top_t[t]}
    ordered = sorted(pairs)
    out = {"sim": sim.numpy(), "top_i": top_i.numpy(), "top_t": top_t.numpy(), "data": data, "images": images}
    out.update(texts=texts, ii=torch.tensor([p[0] for p in ordered]), tt=torch.tensor([p[1] for p in ordered]))
    if data.negatives is not None:
        out["negs"] = encode_captions(model, processor, data.negatives)
    return out


@torch.no_grad()
def _scores(model: Any, enc: dict[str, Any]) -> dict[str, Any]:
    """ITM of the top-k pairs (NaN elsewhere) and the binding pairs' (S, ITM) under the model's current config."""
    from mklvisita.retrieval import match_pairs

    sim = enc["sim"]
    itm = np.full(sim.shape, np.nan, dtype=np.float32)
    itm[enc["ii"].numpy(), enc["tt"].numpy()] = match_pairs(model, enc["images"], enc["texts"], enc["ii"], enc["tt"])
    out = {**enc, "itm": itm}
    if "negs" in enc:
        from mklvisita.evaluation import pair_scores

        idx = np.arange(len(enc["data"].captions))
        image_of = np.asarray(enc["data"].txt2img)
        out["pos"] = pair_scores(model, enc["images"], enc["texts"], image_of, idx)
        out["neg"] = pair_scores(model, enc["images"], enc["negs"], image_of, idx)
    return out


def _ranked(s: dict[str, Any], w: float) -> tuple[np.ndarray, np.ndarray]:
    """i2t (n_img, n_txt) and t2i (n_txt, n_img) scores under weight w: the top k by S re-ranked by w x ITM + S,
    placed above everything outside them (which keeps S's order)."""
    sim, itm = s["sim"], s["itm"]
    lift = float(np.abs(sim).max() + abs(w) + 1.0) * 4
    i2t = sim.astype(np.float64).copy()
    rows = np.arange(sim.shape[0])[:, None]
    i2t[rows, s["top_i"]] = w * itm[rows, s["top_i"]] + sim[rows, s["top_i"]] + lift
    t2i = sim.T.astype(np.float64).copy()
    cols = np.arange(sim.shape[1])[:, None]
    t2i[cols, s["top_t"]] = w * itm.T[cols, s["top_t"]] + sim.T[cols, s["top_t"]] + lift
    return i2t, t2i


def sweep(
    model: Any,
    processor: Any,
    split: str = "tune",
    weights: tuple[float, ...] = WEIGHTS,
    limit: int = 0,
    head_scales: tuple[float, ...] = (1.0,),
    head_nouns: tuple[bool, ...] = (False,),
    reader_powers: tuple[float, ...] = (1.0,),
    affinity_scales: tuple[float, ...] = (1.0,),
) -> dict[str, Any]:
    """Per ITM head scale and weight: single-stamp retrieval and relation binding on ``split``; the chosen pair by
    the module's rule. ``limit`` > 0: the first ``limit`` images of each set (a quick check, not a choice)."""
    from mklvisita.evaluation import binding_metrics
    from mklvisita.metrics import retrieval_metrics

    k = model.config.ranking.k
    encoded = [_encode(model, processor, spec, split, k, limit) for spec in ("tuxpaint", "tuxpaint-relations")]
    trained_scale = model.config.fusion.itm_head_scale
    reader = model.fusion.relation_reader
    trained_nouns = model.config.fusion.reader_head_nouns
    trained_power = model.config.fusion.reader_attention_power
    trained_affinity = model.config.fusion.affinity_bias_scale
    rows = []
    settings = ((a, q, n, g) for a in affinity_scales for q in reader_powers for n in head_nouns for g in head_scales)
    try:
        for affinity, power, nouns, g in settings:
            model.config.fusion.affinity_bias_scale = affinity
            model.config.fusion.itm_head_scale = g
            model.config.fusion.reader_head_nouns = nouns
            _set_reader_power(model, power)
            if reader is not None:
                reader.head_nouns = nouns
            stamps, relations = (_scores(model, enc) for enc in encoded)
            for w in weights:
                i2t, t2i = _ranked(stamps, w)
                single = retrieval_metrics(i2t, stamps["data"].txt2img, t2i)
                r_i2t, r_t2i = _ranked(relations, w)
                rel = retrieval_metrics(r_i2t, relations["data"].txt2img, r_t2i)
                (ps, pi), (ns, ni) = relations["pos"], relations["neg"]
                binding = binding_metrics(w * pi + ps, w * ni + ns, relations["data"].negative_kinds)
                rows.append(
                    {
                        "affinity_bias_scale": affinity,
                        "reader_head_nouns": nouns,
                        "reader_attention_power": power,
                        "itm_head_scale": g,
                        "itm_weight": w,
                        "single_i2t_r1": single["i2t_r1"],
                        "single_t2i_r1": single["t2i_r1"],
                        "single_r1_mean": (single["i2t_r1"] + single["t2i_r1"]) / 2,
                        "relations_i2t_r1": rel["i2t_r1"],
                        "relations_t2i_r1": rel["t2i_r1"],
                        **binding,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        model.config.fusion.affinity_bias_scale = trained_affinity
        model.config.fusion.itm_head_scale = trained_scale
        model.config.fusion.reader_head_nouns = trained_nouns
        _set_reader_power(model, trained_power)
        if reader is not None:
            reader.head_nouns = trained_nouns
    floor = next(r["single_r1_mean"] for r in rows if r["itm_weight"] == 0.0) - 1.0
    allowed = [r for r in rows if r["single_r1_mean"] >= floor] or rows[:1]

    def rule(r: dict[str, Any]) -> tuple:  # binding; ties: the smaller weight, the larger scale, the trained reading,
        # the affinity factor nearest the trained one
        trained = (
            r["affinity_bias_scale"] == trained_affinity,
            r["reader_head_nouns"] == trained_nouns,
            r["reader_attention_power"] == trained_power,
        )
        nearest = -abs(r["affinity_bias_scale"] - trained_affinity)
        return r["binding_acc"], -r["itm_weight"], r["itm_head_scale"], *trained, nearest

    chosen = max(allowed, key=rule)
    return {
        "split": split,
        "k": k,
        "rows": rows,
        "single_r1_floor": floor,
        "chosen_itm_weight": chosen["itm_weight"],
        "chosen_itm_head_scale": chosen["itm_head_scale"],
        "chosen_reader_head_nouns": chosen["reader_head_nouns"],
        "chosen_reader_attention_power": chosen["reader_attention_power"],
        "chosen_affinity_bias_scale": chosen["affinity_bias_scale"],
    }


def _set_reader_power(model: Any, power: float) -> None:
    """``fusion.reader_attention_power`` in the config and the last fusion layer (whose centroids the reader reads)."""
    model.config.fusion.reader_attention_power = float(power)
    model.fusion.layers[-1].centroid_power = float(power)


def choose_explain_method(
    model: Any,
    processor: Any,
    methods: tuple[str, ...],
    split: str = "tune",
    limit: int = 0,
    stamps: str | None = None,
) -> dict[str, Any]:
    """Phrase pointing of each map method on ``split``'s relation scenes (the model's current config); the best one
    (ties: the first of ``methods``). ``stamps``: the Tux Paint stamps folder (None: the installed one)."""
    from mklvisita.pointing import pointing_game
    from mklvisita.tasks.tuxpaint import find_stamps
    from mklvisita.tasks.tuxpaint_relations import RelationScenes

    scenes = RelationScenes(find_stamps(stamps, split))
    n = min(limit, len(scenes)) if limit else len(scenes)
    layouts = sorted(set(scenes.layouts))
    if limit:  # a quick check: the first scenes of every layout, not only the first layout's
        per = max(1, n // len(layouts))
        scenes.layouts = [lay for lay in layouts for _ in range(per)]
        n = len(scenes.layouts)
    got = pointing_game(model, processor, scenes, n=n, methods=list(methods))
    pointing = {m: got[f"pointing_acc_{m}"] for m in methods}
    best = max(methods, key=lambda m: (pointing[m], -methods.index(m)))
    return {"explain_pointing": pointing, "explain_pointing_n": got["pointing_n"], "chosen_explain_method": best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="release folder of a checkpoint with fusion")
    parser.add_argument("--out", required=True, help="where to write the sweep's JSON")
    parser.add_argument("--split", default="tune", choices=["tune"], help="the Tux Paint half to choose on")
    parser.add_argument("--limit", type=int, default=0, help="the first N images of each set only (a quick check)")
    parser.add_argument("--beta-from", help="use this checkpoint's kernel weights beta (same kernels) instead")
    parser.add_argument("--write", help="save the checkpoint with the chosen ranking.itm_weight to this folder")
    parser.add_argument(
        "--source-options",
        help='JSON: settings of the sources to serve with, merged into kernels.options (e.g. {"colour": {"stride": 2}})'
        "; chosen with and written with them",
    )
    parser.add_argument(
        "--head-scales",
        default="1",
        help="comma-separated ITM head scales to sweep with the weights (fusion.itm_head_scale; > 0 keeps Grad-CAM)",
    )
    parser.add_argument(
        "--explain-methods",
        default="gradcam,attention",
        help="comma-separated map methods for the default explanation, chosen by phrase pointing (first wins ties; "
        "one method: no pointing run)",
    )
    parser.add_argument(
        "--reader-attention-powers",
        default="1",
        help="comma-separated powers: sweep fusion.reader_attention_power too (only with a relation reader; 1 = as "
        "trained)",
    )
    parser.add_argument(
        "--affinity-bias-scales",
        default="1",
        help="comma-separated factors: sweep fusion.affinity_bias_scale too (only with the affinity bias; 1 = as "
        "trained)",
    )
    parser.add_argument(
        "--reader-head-nouns",
        default="0,1",
        help="comma-separated 0/1: sweep fusion.reader_head_nouns too (only with a relation reader; 0 = as trained)",
    )
    args = parser.parse_args(argv)

    from mklvisita import MKLVisITA
    from mklvisita.inputs import Processor

    if args.source_options:
        try:
            options = json.loads(args.source_options)
        except json.JSONDecodeError as e:
            parser.error(f"--source-options is not JSON ({e})")
    else:
        options = None
    model = MKLVisITA.from_pretrained(args.checkpoint, source_options=options).eval()
    if not model.has_itm:
        parser.error("the checkpoint has no fusion/ITM branch: there is no ITM weight to choose")
    torch.set_num_threads(1)
    if args.beta_from:
        other = MKLVisITA.from_pretrained(args.beta_from)
        if other.kernel_names != model.kernel_names:
            parser.error(f"--beta-from has kernels {other.kernel_names}, this checkpoint {model.kernel_names}")
        with torch.no_grad():
            model.kernels.logits.copy_(other.kernels.logits)
    try:
        scales = tuple(float(x) for x in args.head_scales.split(","))
    except ValueError:
        parser.error(f"--head-scales takes comma-separated numbers, not {args.head_scales!r}")
    if not all(0 < g <= 10 for g in scales):
        parser.error("--head-scales must be within (0, 10]: at 0 the fusion gives Grad-CAM nothing to explain")
    methods = tuple(m.strip() for m in args.explain_methods.split(",") if m.strip())
    if not methods or any(m not in ("gradcam", "attention") for m in methods):
        parser.error(f"--explain-methods takes gradcam and/or attention, not {args.explain_methods!r}")
    try:
        nouns = tuple(dict.fromkeys(bool(int(x)) for x in args.reader_head_nouns.split(",")))
    except ValueError:
        parser.error(f"--reader-head-nouns takes comma-separated 0 / 1, not {args.reader_head_nouns!r}")
    try:
        powers = tuple(dict.fromkeys(float(x) for x in args.reader_attention_powers.split(",")))
    except ValueError:
        parser.error(f"--reader-attention-powers takes comma-separated numbers, not {args.reader_attention_powers!r}")
    if not all(1.0 <= q <= 4.0 for q in powers):
        parser.error("--reader-attention-powers must be within [1, 4]")
    try:
        affinity = tuple(dict.fromkeys(float(x) for x in args.affinity_bias_scales.split(",")))
    except ValueError:
        parser.error(f"--affinity-bias-scales takes comma-separated numbers, not {args.affinity_bias_scales!r}")
    if not all(0.0 < a <= 10.0 for a in affinity):
        parser.error("--affinity-bias-scales must be within (0, 10]")
    if not model.fusion.use_bias:
        affinity = (model.config.fusion.affinity_bias_scale,)  # nothing to scale
    if model.fusion.relation_reader is None:
        nouns = (model.config.fusion.reader_head_nouns,)  # nothing reads it without a reader
        powers = (model.config.fusion.reader_attention_power,)
    processor = Processor(model.config, model.tokenizer)
    result = sweep(
        model,
        processor,
        args.split,
        limit=args.limit,
        head_scales=scales,
        head_nouns=nouns,
        reader_powers=powers,
        affinity_scales=affinity,
    )
    model.config.ranking.itm_weight = float(result["chosen_itm_weight"])
    model.config.fusion.itm_head_scale = float(result["chosen_itm_head_scale"])
    model.config.fusion.affinity_bias_scale = float(result["chosen_affinity_bias_scale"])
    model.config.fusion.reader_head_nouns = bool(result["chosen_reader_head_nouns"])
    _set_reader_power(model, result["chosen_reader_attention_power"])
    if model.fusion.relation_reader is not None:
        model.fusion.relation_reader.head_nouns = model.config.fusion.reader_head_nouns
    if len(methods) > 1:
        result |= choose_explain_method(model, processor, methods, args.split, args.limit)
    else:
        result["chosen_explain_method"] = methods[0]
    result["beta"] = dict(zip(model.kernel_names, [round(x, 4) for x in model.kernel_weights().tolist()]))
    result["command"] = "python -m training.photo_fusion_tune " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"chosen itm_weight {result['chosen_itm_weight']}, itm_head_scale {result['chosen_itm_head_scale']}, "
        f"affinity_bias_scale {result['chosen_affinity_bias_scale']}, "
        f"reader_head_nouns {result['chosen_reader_head_nouns']}, explain_method {result['chosen_explain_method']} "
        f"({out})"
    )
    if args.write:
        model.config.fusion.explain_method = result["chosen_explain_method"]
        model.save_pretrained(args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
