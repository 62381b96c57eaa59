"""Tune-half experiments on the photo checkpoint: what was tried to raise its retrieval and maps without
photo-caption data; ``colour``, ``scene_text`` and ``person_weight`` set the shipped fixed sources.

    python -m training.photo_experiments lexicon      # caption nouns looked up in WordNet (exact lemmas, not MiniLM)
    python -m training.photo_experiments calibration  # content-free calibration of the image's class logits
    python -m training.photo_experiments clipart      # an image adapter trained on public-domain clip art
    python -m training.photo_experiments reference    # hubness correction against a fixed (clip-art) reference set
    python -m training.photo_experiments mixture      # a mixture-likelihood concept kernel
    python -m training.photo_experiments weights      # a caption's visual classifier predicted from its embedding
    python -m training.photo_experiments captions     # caption rewrites before the sentence encoder
    python -m training.photo_experiments pointing     # word-map variants in the composite pointing game
    python -m training.photo_experiments colour       # the colour kernel's sigma, saliency power, weight
    python -m training.photo_experiments scene_text   # the scene-text kernel's match threshold, weight
    python -m training.photo_experiments person_weight  # the example photos against the person weight
    python -m training.photo_experiments photo_style    # how far the composites' photo style moves clip art to photos

Each prints one JSON line per setting: R@1 both ways and RSUM on the Tux Paint *tune* half with the shipped kernel
weights and with the best weights of the same grid as ``python -m training.photo --tune`` (one more kernel: one more
weight). The lines in ``docs/results/photo_tune_concept_kernels/`` came from the build with three concept kernels
(commit cf2203c); run against today's they add to its four kernels (the colour kernel is 0 for images other than
the stamps), and ``colour`` always puts its own colour kernel beside the three concept kernels. Nothing here reads
the test half. Needs ``apt-get install tuxpaint-stamps-default wordnet-base``;
``clipart`` and ``reference`` also ``openclipart-png openclipart-svg`` (public domain: clip art with titles). Results
and what they say: docs/experiments.md.

Decisions:
    - Features are computed once per split (CNN pooled feature and final map, the text encoder's last layer) and every
      variant recombines them through the checkpoint's own :class:`~mklvisita.sources.concept.ConceptBridge` and
      kernels, so a setting takes seconds and the unchanged setting reproduces ``training.evaluate``'s tune-half
      figures.
    - Clip art: the PNG is composited on white with the stamps' 10 % margin; its caption is the SVG's ``dc:title``
      when it names something (icon sets, flags beyond 120, generic titles and titles shared by more than 8 files are
      left out): 2,182 pairs. Before training, each stamp of the tune half is compared with every clip-art image used
      (cosine of the CNN's pooled features) and the maximum is printed, so an overlap of the two would be seen.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mklvisita.sources.colour import NUM_COLOURS
from mklvisita.sources.scene_text import DIM, MAX_WORDS, caption_word_vectors
from training.photo import CHOSEN_WEIGHTS, TUNE_GRID

CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "mklvisita-photo"
CLIPART = Path("/usr/share/openclipart")  # Debian openclipart-png / openclipart-svg
WORDNET = Path("/usr/share/wordnet")  # Debian wordnet-base


# ------------------------------------------------------------------------------------------------ shared parts
class Bench:
    """The photo checkpoint and cached features of the Tux Paint tune half."""

    def __init__(self, checkpoint: Path = CHECKPOINT, split: str = "tune"):
        from mklvisita.evaluation import load_eval_data
        from mklvisita.inputs import Processor
        from mklvisita.model import MKLVisITA

        torch.set_grad_enabled(False)
        self.model = MKLVisITA.from_pretrained(str(checkpoint)).eval()
        self.bridge = self.model.sources["concept"]
        self.processor = Processor(self.model.config, self.model.tokenizer)
        self.data = load_eval_data("tuxpaint", split)
        self.txt2img = np.asarray(self.data.txt2img)
        self.pixels: list[torch.Tensor] = []  # model inputs of the stamps, batch by batch (the colour experiment)
        self.pooled, self.maps = self.images(list(self.data.images), keep_pixels=True)
        self.text = self.captions(self.data.captions)

    def images(self, images: list, keep_pixels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, maps = [], []
        for i in range(0, len(images), 32):
            pv, _ = self.processor.images(images[i : i + 32])
            out = self.model.encode_image(pv)
            pooled.append(out.backbone_pooled)
            maps.append(out.backbone_map)
            if keep_pixels:
                self.pixels.append(pv)
        return torch.cat(pooled), torch.cat(maps)

    def captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.processor.captions(captions)
        txt = self.model.encode_text(enc["input_ids"], enc["attention_mask"])
        last = txt.levels[self.model.text.depth - 1]
        mask = txt.attention_mask.unsqueeze(-1).float()
        return {"last": last, "word": txt.word_mask, "sentence": (last * mask).sum(1) / mask.sum(1),
                "ids": enc["input_ids"]}  # fmt: skip

    def sources(self, pooled=None, maps=None, text=None) -> tuple[dict, dict, torch.Tensor]:
        text = self.text if text is None else text
        own_images = pooled is None and maps is None
        maps = self.maps if maps is None else maps
        img = self.bridge.image_features(self.pooled if pooled is None else pooled, maps)
        txt = self.bridge.text_features(text["sentence"], text["last"])
        sources = self.model.sources
        colours = sources["colour"].names if "colour" in sources else None
        if colours is not None:  # a checkpoint with the colour kernel: the stamps' colours from the cached inputs
            grid = tuple(self.model.vision.grids[-1])
            if own_images:
                cells = torch.cat([colours.cells(pv, grid) for pv in self.pixels])
            else:  # other images (clip art, a blank canvas): no colour evidence, the kernel is 0 for them
                cells = torch.zeros(*maps.shape[:2], NUM_COLOURS)
            img |= colours.image_features(cells, maps)
            txt |= colours.text_features(colours.token_colours(text["ids"], text["word"]))
        if "scene_text" in sources:  # a checkpoint with the scene-text kernel: the stamps' words, read once
            if own_images:
                if not hasattr(self, "_scene"):
                    grid = tuple(self.model.vision.grids[-1])
                    parts = [sources["scene_text"].reader.features(pv, grid) for pv in self.pixels]
                    self._scene = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                scene = self._scene
            else:  # other images: nothing read
                n = maps.shape[0]
                scene = {"words": torch.zeros(n, MAX_WORDS, DIM), "cells": torch.zeros(n, MAX_WORDS, maps.shape[1]),
                         "mask": torch.zeros(n, MAX_WORDS, dtype=torch.bool)}  # fmt: skip
            img |= {"scene_text": scene["words"], "scene_text_mask": scene["mask"], "scene_text_cells": scene["cells"]}
            txt["scene_text"] = caption_word_vectors(self.model.tokenizer, text["ids"], text["word"])
        person = sources["person"] if "person" in sources else None
        if person is not None:  # a checkpoint with the person kernel: faces in the stamps (none found so far)
            grid = tuple(self.model.vision.grids[-1])
            if own_images:
                cells = torch.cat([person.face_cells(pv, grid) for pv in self.pixels])
            else:
                cells = torch.zeros(maps.shape[:2])
            img |= person.image_features(cells)
            txt |= person.text_features(txt["concept_class"] ** 2, person.token_mass(text["ids"], text["word"]))
        return img, txt, text["word"]

    def values(self, img: dict, txt: dict, word: torch.Tensor) -> np.ndarray:
        """(images, captions, kernels): each kernel's own value (not weighted)."""
        m = self.model
        out = m.similarity(m.kernels.embed_image(by_source(img)), m.kernels.embed_text(by_source(txt), word))
        return (out.contributions / out.weights).float().numpy()


def by_source(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Bench's flat features (one key per kernel feature, as the experiments edit them) -> the model's raw
    features by source name (:mod:`mklvisita.sources`)."""
    out = {"concept": {k: flat[k] for k in ("concept", "concept_class", "concept_local") if k in flat}}
    for source in ("colour", "person"):
        if source in flat:
            out[source] = {source: flat[source], f"{source}_local": flat[f"{source}_local"]}
    if "scene_text" in flat:
        out["scene_text"] = {"words": flat["scene_text"]}
        if "scene_text_mask" in flat:  # the image side: which rows are words, and their text lines
            out["scene_text"] |= {"mask": flat["scene_text_mask"], "cells": flat["scene_text_cells"]}
    return out


def scores(values: np.ndarray, txt2img: np.ndarray, weights=None) -> dict:
    """R@1 and RSUM with ``weights`` (the shipped ones when None, padded with 0 for extra kernels) and the best of the
    weight grid (R@1 sum, then RSUM; the first weight, the ``concept`` kernel's, is never 0, as in ``--tune``)."""
    from mklvisita.metrics import retrieval_metrics

    def row(m: dict) -> list[float]:
        return [round(m["i2t_r1"], 1), round(m["t2i_r1"], 1), round(m["rsum"], 1)]

    k = values.shape[-1]
    if k == 1:
        only = row(retrieval_metrics(values[..., 0], txt2img))
        return {"shipped_w": only, "best_w": [1.0], "best": only}
    shipped = np.asarray(weights or (*CHOSEN_WEIGHTS, *[0.0] * (k - len(CHOSEN_WEIGHTS))))[:k]
    best = None
    for w in itertools.product(TUNE_GRID, repeat=k):
        if not math.isclose(sum(w), 1.0) or w[0] == 0.0:
            continue
        m = retrieval_metrics(values @ np.asarray(w), txt2img)
        key = (m["i2t_r1"] + m["t2i_r1"], m["rsum"])
        if best is None or key > best[0]:
            best = (key, w, m)
    return {
        "shipped_w": row(retrieval_metrics(values @ shipped, txt2img)),
        "best_w": list(best[1]),
        "best": row(best[2]),
    }


def report(experiment: str, setting: dict, result: dict) -> None:
    print(json.dumps({"experiment": experiment, **setting, **result}), flush=True)


# ------------------------------------------------------------------------------------------------ experiments
def lexicon(b: Bench) -> None:
    """Caption nouns looked up in WordNet (exact lemmas, compounds of up to 3 words, plural rules and noun.exc),
    each sense's ImageNet classes by the expansion's hierarchy rule, senses weighted 1 / rank^gamma; mixed into the
    caption's class distribution (``mix``) or a fourth kernel (Bhattacharyya with the image's classes)."""
    from timm.data import ImageNetInfo

    from training.wordnet import read_hypernyms, synset_classes

    if not (WORDNET / "index.noun").is_file():
        sys.exit("WordNet 3.0 not found: apt-get install wordnet-base")
    index, exc, adj = {}, {}, set()
    for line in open(WORDNET / "index.noun", encoding="latin-1"):
        if not line.startswith("  "):
            f = line.split()
            index[f[0]] = ["n" + o for o in f[6 + int(f[3]) :]]
    for line in open(WORDNET / "noun.exc", encoding="latin-1"):
        exc.setdefault(*line.split()[:2])
    for line in open(WORDNET / "index.adj", encoding="latin-1"):
        adj.add(line.split()[0])
    info = ImageNetInfo()
    classes = [info.index_to_label_name(i) for i in range(1000)]
    links = synset_classes(sorted({s for offs in index.values() for s in offs}), classes, read_hypernyms(), 64)
    stop = set("a an the of and or with in on at to for from by is are was it its this that your you our".split())
    rules = (("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y"))

    def lemma(w: str) -> str | None:
        cands = [w, exc.get(w, "")] + [w[: -len(s)] + r for s, r in (*rules, ("s", "")) if w.endswith(s)]
        return next((c for c in cands if c in index), None)

    def terms(caption: str) -> list[tuple[str, bool]]:
        ws, out, i = re.findall(r"[a-z][a-z'\-]*", caption.lower().replace("’", "'")), [], 0
        while i < len(ws):
            for n in range(min(3, len(ws) - i), 0, -1):
                lem = None if n == 1 and ws[i] in stop else lemma("_".join(ws[i : i + n]))
                if lem:
                    out.append(lem)
                    i += n
                    break
            else:
                i += 1
        return [(t, k == len(out) - 1) for k, t in enumerate(out)]

    def distribution(caption: str, gamma: float, max_classes: int) -> torch.Tensor | None:
        parts = []
        for term, last in terms(caption):
            if term in adj and not last and "_" not in term:  # "red" in "red apple": a modifier
                continue
            d, total = torch.zeros(1000), 0.0
            for rank, synset in enumerate(index[term]):
                cls = links.get(synset)
                if cls and len(cls) <= max_classes:
                    w = (rank + 1) ** -gamma
                    d[cls] += w / len(cls)
                    total += w
            if total:
                parts.append(d / total)
        return torch.stack(parts).mean(0) if parts else None

    img, txt, word = b.sources()
    q = txt["concept_class"] ** 2
    for gamma, max_classes in ((0.0, 64), (1.0, 64), (2.0, 64), (1.0, 16)):
        lex = [distribution(c, gamma, max_classes) for c in b.data.captions]
        lex = torch.stack([x if x is not None else q[i] for i, x in enumerate(lex)])
        for share in (0.3, 0.5):
            mixed = dict(txt, concept_class=((1 - share) * q + share * lex).sqrt())
            report(
                "lexicon",
                {"gamma": gamma, "max_classes": max_classes, "mix": share},
                scores(b.values(img, mixed, word), b.txt2img),
            )
        fourth = (img["concept_class"] @ lex.sqrt().T).numpy()[..., None]
        values = np.concatenate([b.values(img, txt, word), fourth], -1)
        report("lexicon", {"gamma": gamma, "max_classes": max_classes, "kernel": "fourth"}, scores(values, b.txt2img))


def calibration(b: Bench) -> None:
    """logits - alpha * logits(blank canvas) for the pooled classes (and the per-position ones, ``local``)."""
    from PIL import Image

    for colour in ((255, 255, 255), (128, 128, 128)):
        blank_pooled, blank_map = b.images([Image.new("RGB", (224, 224), colour)])
        for alpha, local in itertools.product((0.25, 0.5, 0.75, 1.0), (False, True)):
            img, txt, word = b.sources()
            p = (
                (b.bridge.class_logits(b.pooled) - alpha * b.bridge.class_logits(blank_pooled)) / b.bridge.temperature
            ).softmax(-1)
            img["concept"], img["concept_class"] = p @ b.bridge.class_text, p.sqrt()
            if local:
                lm = b.bridge.class_logits(b.maps) - alpha * b.bridge.class_logits(blank_map).mean(1, keepdim=True)
                img["concept_local"] = lm - lm.mean(-1, keepdim=True)
            setting = {"canvas": colour[0], "alpha": alpha, "local": local}
            report("calibration", setting, scores(b.values(img, txt, word), b.txt2img))


def clipart_pairs(max_flags: int = 120) -> list[tuple[Path, str]]:
    """(PNG, caption) pairs of Debian's openclipart packages (public domain), captions from the SVGs' titles."""
    png_root, svg_root = CLIPART / "png", CLIPART / "svg"
    if not png_root.is_dir():
        sys.exit("openclipart not found: apt-get install openclipart-png openclipart-svg")
    skip = {"computer", "shapes", "special", "logos", "buttons"}
    skip_sub = {"signs_and_symbols/map_symbols", "signs_and_symbols/led", "transportation/aiga-symbols"}
    skip_sub |= {"recreation/games", "people/smilies", "people/stickmen"}
    generic = re.compile(
        r"collection|theme|icon|svg|hash\(|sibmission|submission|various|clipart$|cliparts|^people$|^advertising$|"
        r"^map symbols$|symbol|^card$|gramastar|^untitled|^drawing|^image",
        re.I,
    )

    def title(png: Path) -> str:
        svg = svg_root / png.relative_to(png_root).with_suffix(".svg")
        found = (
            re.search(r"<dc:title>(.*?)</dc:title>", svg.read_text(errors="ignore"), re.S) if svg.is_file() else None
        )
        t = re.sub(r"^clipart by [^-]+- ?", "", html.unescape(found.group(1).strip()) if found else "", flags=re.I)
        return re.sub(r"\s+", " ", re.sub(r"[_\d]+", " ", t)).strip(" -.,")

    items = []
    for png in sorted(png_root.rglob("*.png")):
        parts = png.relative_to(png_root).parts
        if parts[0] not in skip and "/".join(parts[:2]) not in skip_sub:
            items.append((png, title(png)))
    counts = Counter(t.lower() for _, t in items)
    out, flags = [], 0
    for png, t in items:
        if len(t) < 3 or generic.search(t) or counts[t.lower()] > 8:
            continue
        if "flags" in png.parts:
            flags += 1
            if flags > max_flags:
                continue
            t = t if "flag" in t.lower() else f"the flag of {t}"
        out.append((png, t))
    return out


def clipart_features(b: Bench, pairs: list[tuple[Path, str]]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from PIL import Image

    from mklvisita.tasks.tuxpaint import centred_on_square

    def load(png: Path) -> Image.Image:
        with Image.open(png) as im:
            rgba = im.convert("RGBA")
        rgba.thumbnail((1024, 1024))
        return centred_on_square(rgba)  # as the stamps are shown: on white, a 10 % margin

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a few clip-art PNGs are huge renders
    try:
        pooled, maps = zip(*(b.images([load(p) for p, _ in pairs[i : i + 64]]) for i in range(0, len(pairs), 64)))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return torch.cat(pooled), torch.cat(maps), b.captions([t for _, t in pairs])


def clipart(b: Bench) -> None:
    """A linear map of the CNN's pooled feature into the sentence space, trained with InfoNCE on clip art, alone or
    as a residual on the bridge embedding (scaled by ``alpha`` at use), as a fourth kernel or instead of ``concept``."""
    from mklvisita.metrics import retrieval_metrics

    pairs = clipart_pairs()
    pooled, _, text = clipart_features(b, pairs)
    overlap = F.normalize(b.pooled, dim=-1) @ F.normalize(pooled, dim=-1).T
    print(json.dumps({"clipart_pairs": len(pairs), "max_cos_stamp_vs_clipart": round(overlap.max().item(), 3)}))
    target = F.normalize(text["sentence"], dim=-1)
    base = b.values(*b.sources())
    caption = F.normalize(b.text["sentence"], dim=-1)
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    val, train = perm[: len(pairs) // 10], perm[len(pairs) // 10 :]
    mu, sd = pooled[train].mean(0), pooled[train].std(0) + 1e-3

    def bridge(f: torch.Tensor) -> torch.Tensor:
        p = (b.bridge.class_logits(f) / b.bridge.temperature).softmax(-1)
        return F.normalize(p @ b.bridge.class_text, dim=-1)

    for residual, epochs in ((True, 2), (True, 5), (True, 15), (True, 60), (False, 30), (False, 60)):
        torch.manual_seed(0)
        head = torch.nn.Linear(pooled.shape[1], target.shape[1])
        if residual:
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)

        def embed(f: torch.Tensor, alpha: float = 1.0, head=head, residual=residual) -> torch.Tensor:
            x = head((f - mu) / sd)
            return F.normalize(bridge(f) + alpha * x if residual else x, dim=-1)

        with torch.enable_grad():
            for _ in range(epochs):
                order = train[torch.randperm(len(train))]
                for s in range(0, len(order), 256):
                    idx = order[s : s + 256]
                    logits = embed(pooled[idx]) @ target[idx].T / 0.05
                    labels = torch.arange(len(idx))
                    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        hits = (embed(pooled[val]) @ target[val].T).argmax(1) == torch.arange(len(val))
        plain = (bridge(pooled[val]) @ target[val].T).argmax(1) == torch.arange(len(val))
        for alpha in (0.1, 0.25, 0.5, 1.0) if residual else (1.0,):
            k = (embed(b.pooled, alpha) @ caption.T).numpy()
            alone = retrieval_metrics(k, b.txt2img)
            setting = {
                "residual": residual,
                "epochs": epochs,
                "alpha": alpha,
                "clipart_val_i2t_r1": round(hits.float().mean().item(), 3),
                "bridge_clipart_val_i2t_r1": round(plain.float().mean().item(), 3),
                "alone": [round(alone["i2t_r1"], 1), round(alone["t2i_r1"], 1)],
            }
            for kernel, values in (
                ("fourth", [base, k[..., None]]),
                ("instead of concept", [k[..., None], base[..., 1:]]),
            ):
                report("clipart", {**setting, "kernel": kernel}, scores(np.concatenate(values, -1), b.txt2img))


def reference(b: Bench) -> None:
    """S minus lambda x each caption's mean similarity to its k nearest clip-art images (``caption``), each image's
    to its k nearest clip-art titles (``image``), or both: a hubness correction whose statistics come from a fixed
    reference set, not from the gallery being searched (k = 0: the mean over the whole set)."""
    pairs = clipart_pairs()
    pooled, maps, text = clipart_features(b, pairs)
    w = np.asarray(CHOSEN_WEIGHTS)
    s = b.values(*b.sources()) @ w
    img_ref, txt_ref, _ = b.sources(pooled, maps, text)
    img, txt, word = b.sources()
    ref_images = b.values(img_ref, txt, word) @ w  # (clip art, captions)
    ref_titles = b.values(img, txt_ref, text["word"]) @ w  # (images, titles)
    for k, lam, side in itertools.product((10, 50, 0), (0.25, 0.5, 1.0), ("caption", "image", "both")):
        per_caption = np.sort(ref_images, 0)[-k:].mean(0) if k else ref_images.mean(0)
        per_image = np.sort(ref_titles, 1)[:, -k:].mean(1) if k else ref_titles.mean(1)
        corrected = (
            s
            - lam * (per_caption[None] if side != "image" else 0)
            - lam * (per_image[:, None] if side != "caption" else 0)
        )
        report("reference", {"k": k, "lambda": lam, "side": side}, scores(corrected[..., None], b.txt2img, (1.0,)))


def mixture(b: Bench) -> None:
    """kappa * log sum_c p_c exp(cos(class c, caption) / kappa): the caption's likelihood under the image's class
    mixture (kappa -> infinity: the ``concept`` kernel's expectation; kappa -> 0: the best class's cosine)."""
    base = b.values(*b.sources())
    cos = b.bridge.class_text @ F.normalize(b.text["sentence"], dim=-1).T  # (classes, captions)
    for temperature, kappa in itertools.product((0.5, 1.0), (0.01, 0.02, 0.05, 0.1)):
        logp = (b.bridge.class_logits(b.pooled) / temperature).log_softmax(-1)
        k = (kappa * torch.logsumexp(logp[:, :, None] + cos[None] / kappa, dim=1)).numpy()[..., None]
        for kernel, values in (("fourth", [base, k]), ("instead of concept", [k, base[..., 1:]])):
            setting = {"T": temperature, "kappa": kappa, "kernel": kernel}
            report("mixture", setting, scores(np.concatenate(values, -1), b.txt2img))


def weights(b: Bench) -> None:
    """A caption's own visual classifier: ridge regression from the class prompts' embeddings to the ImageNet head's
    rows (1,000 pairs: the label set and the network's weights, nothing else), applied to the caption's embedding;
    its cosine with the image's pooled feature is a fourth kernel."""
    w = b.bridge.class_weight.float()
    e = b.bridge.class_text.float()
    caption = F.normalize(b.text["sentence"], dim=-1)
    base = b.values(*b.sources())
    for lam in (0.01, 0.1, 1.0, 10.0):
        m = torch.linalg.solve(e.T @ e + lam * torch.eye(e.shape[1]), e.T @ w)  # (D_text, C)
        k = (F.normalize(b.pooled, dim=-1) @ F.normalize(caption @ m, dim=-1).T).numpy()[..., None]
        report("weights", {"lambda": lam}, scores(np.concatenate([base, k], -1), b.txt2img))


def captions(b: Bench) -> None:
    def bare(c: str) -> str:
        c = re.sub(r"[.!]+$", "", c.strip())
        return c[:1].lower() + c[1:]

    forms = {
        "as written": lambda c: c,
        "final punctuation off": lambda c: re.sub(r"[.!]+$", "", c.strip()),
        "lower case, punctuation off": lambda c: re.sub(r"[.!]+$", "", c.strip()).lower(),
        "a photo of <caption>": lambda c: f"a photo of {bare(c)}",
        "a photo of <caption without article>": lambda c: (
            f"a photo of {re.sub(r'^(a|an|the) ', '', bare(c), flags=re.I)}"
        ),
    }
    for name, form in forms.items():
        img, txt, word = b.sources(text=b.captions([form(c) for c in b.data.captions]))
        report("captions", {"form": name}, scores(b.values(img, txt, word), b.txt2img))


def pointing(b: Bench) -> None:
    """The composite pointing game (``concept_local`` maps) on the tune half: ``kernels.map_shifts`` 1-3 (what the
    photo checkpoint ships: 2), two controls for it (the one-pass map blurred; four moved passes interleaved into a
    grid twice as fine instead of averaged), and, with one pass, the word temperature tau, the WordNet expansion of
    each word's distribution, stop words left out of the caption map, or per-position probabilities."""
    from mklvisita import explain, pointing
    from mklvisita.tasks.tuxpaint import CompositeScenes, find_stamps

    scenes = CompositeScenes(find_stamps(split="tune"), n=150)
    items = [scenes[i] for i in range(len(scenes))]
    bridge, m = b.bridge, b.model
    shipped_shifts = m.config.kernels.map_shifts
    for shifts in (1, 2, 3):
        m.config.kernels.map_shifts = shifts
        acc = pointing.pointing_game(m, b.processor, items, methods=["kernel"])["pointing_acc_kernel"]
        print(json.dumps({"experiment": "pointing", "map_shifts": shifts, "pointing_tune": round(acc, 3)}), flush=True)
    m.config.kernels.map_shifts = 1  # the variants below change one thing of the one-pass maps
    text_features, image_features = bridge.text_features, bridge.image_features
    stop = set("a an the of and or with in on at to for from by is are was it its this that your you our".split())
    v = m.config.vision
    gh, gw = m.vision.grids[-1]

    def blurred(grid: np.ndarray, sigma: float) -> np.ndarray:
        """A (gh, gw) map upsampled to the input's pixels and blurred (Gaussian, ``sigma`` pixels)."""
        size = v.image_size
        x = F.interpolate(torch.as_tensor(grid, dtype=torch.float32)[None, None], size=(size, size), mode="bilinear")
        r = int(3 * sigma)
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1) / sigma) ** 2)
        k = (k / k.sum()).view(1, 1, 1, -1)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k)
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(-1, -2))
        return x[0, 0].numpy()

    def interleaved(image, phrase_text_emb, p) -> np.ndarray:
        """Four passes moved by -/+ a quarter cell, each cell's value put in its place on a (2 gh, 2 gw) grid."""
        pv, _ = b.processor.images([image])
        q = round(v.image_size / gw / 4)
        out = np.zeros((2 * gh, 2 * gw), np.float32)
        for oy, ox in itertools.product((0, 1), (0, 1)):
            moved = explain.shift_input(pv, q if oy == 0 else -q, q if ox == 0 else -q, b.processor.pad_pixel)
            maps = m.kernels.word_patch_maps(m.embed_image(m.encode_image(moved)), phrase_text_emb)[0]
            caption = explain._words_and_caption(maps[0], p)[1]  # the photo model's one map kernel; word pieces
            out[oy::2, ox::2] = caption.reshape(gh, gw).numpy()
        return out

    def run(tau=None, expand=0.0, drop_stop=False, prob_t=None, blur=None, interleave=False) -> float:
        def text(sentence, tokens):
            out = text_features(sentence, tokens)
            unit = F.normalize(tokens, dim=-1)
            qw = (unit @ bridge.class_text.T / (tau or bridge.text_temperature)).softmax(-1)
            if expand:
                flat = bridge.synset_expansion(unit.reshape(-1, unit.shape[-1])).reshape(qw.shape)
                qw = (1 - expand) * qw + expand * flat
            out["concept_local"] = qw - 1.0 / qw.shape[-1]
            return out

        def image(pooled, fmap):
            out = image_features(pooled, fmap)
            if prob_t:
                p = (bridge.class_logits(fmap) / prob_t).softmax(-1)
                out["concept_local"] = p - 1.0 / p.shape[-1]
            return out

        bridge.text_features, bridge.image_features = text, image
        hits = total = 0
        try:
            for item in items:
                for obj in item["objects"]:
                    p = explain._run(m, b.processor, item["image"], obj["phrase"], grad_layers=[], rollout=False)
                    words, caption_map = explain._words_and_caption(explain._kernel_token_maps(p, m), p)
                    if drop_stop:
                        keep = torch.tensor([w.lower() not in stop for w in p.words], dtype=words.dtype)
                        caption_map = keep @ words if keep.any() else caption_map
                    grid = caption_map.reshape(gh, gw).numpy()
                    if blur:
                        grid = blurred(grid, blur)
                    if interleave:
                        enc = b.processor.captions([obj["phrase"]])
                        txt = m.encode_text(enc["input_ids"], enc["attention_mask"])
                        grid = interleaved(item["image"], m.embed_text(txt), p)
                    full = p.box.to_original(grid)
                    r, c = np.unravel_index(int(np.argmax(full)), full.shape)
                    hits += bool(np.asarray(obj["mask"])[r, c])
                    total += 1
        finally:
            bridge.text_features, bridge.image_features = text_features, image_features
        return round(hits / total, 3)

    settings = [{}, {"blur": 8}, {"blur": 16}, {"blur": 32}, {"interleave": True}, {"drop_stop": True}]
    settings += [{"expand": 0.5}, {"expand": 1.0}, {"prob_t": 0.5}, {"prob_t": 1.0}]
    settings += [{"tau": t} for t in (0.01, 0.03, 0.04, 0.05, 0.07, 0.1, 0.2)]
    for s in settings:
        print(json.dumps({"experiment": "pointing", "map_shifts": 1, **s, "pointing_tune": run(**s)}), flush=True)
    m.config.kernels.map_shifts = shipped_shifts


def colour(b: Bench) -> None:
    """The colour kernel (:mod:`mklvisita.sources.colour`) beside the three concept kernels: its naming softness sigma
    and saliency power, with the four-weight grid. The first three kernels' values are the checkpoint's own."""
    from mklvisita.sources.colour import ColourNames

    img, txt, word = b.sources()
    concept = b.values(img, txt, word)[..., :3]  # (images, captions, 3): concept, concept_class, concept_local
    v = b.model.config.vision
    grid = tuple(b.model.vision.grids[-1])
    for sigma, power in itertools.product((15.0, 20.0, 25.0, 30.0), (0.0, 1.0, 2.0, 3.0, 4.0)):
        names = ColourNames(sigma, power, b.model.tokenizer, v.mean, v.std, v.pad_value)
        h = names.image_features(torch.cat([names.cells(pv, grid) for pv in b.pixels]), b.maps)["colour"]
        q = names.text_features(names.token_colours(b.text["ids"], b.text["word"]))["colour"]
        values = np.concatenate([concept, (h @ q.T).numpy()[..., None]], -1)
        report("colour", {"sigma": sigma, "saliency_power": power}, scores(values, b.txt2img))


def scene_text(b: Bench) -> None:
    """The scene-text kernel (:mod:`mklvisita.sources.scene_text`) beside the checkpoint's other kernels: its match
    threshold theta, with the grid of weights (one more kernel). Words are read once; the other kernels are the
    checkpoint's."""
    from mklvisita.sources.scene_text import SceneTextReader, soft_match

    img, txt, word = b.sources()
    keep = [i for i, n in enumerate(b.model.kernel_names) if not n.startswith("scene_text/")]
    base = b.values(img, txt, word)[..., keep]
    v = b.model.config.vision
    reader = SceneTextReader(v.mean, v.std)
    grid = tuple(b.model.vision.grids[-1])
    parts = [reader.features(pv, grid) for pv in b.pixels]
    words, mask = torch.cat([p["words"] for p in parts]), torch.cat([p["mask"] for p in parts]).float()
    caption = caption_word_vectors(b.model.tokenizer, b.text["ids"], b.text["word"])
    print(json.dumps({"experiment": "scene_text", "images_with_words": int((mask.sum(-1) > 0).sum())}), flush=True)
    cos = torch.einsum("iwd,jtd->ijwt", words, caption)  # (images, captions, W, T)
    for theta in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        best = soft_match(cos, theta).amax(-1)  # (images, captions, W)
        k = (best * mask[:, None, :]).sum(-1) / mask.sum(-1).clamp_min(1.0)[:, None]
        values = np.concatenate([base, k.numpy()[..., None]], -1)
        report("scene_text", {"theta": theta}, scores(values, b.txt2img))


def person_weight(b: Bench) -> None:
    """The person kernel's weight, which the stamps cannot choose (no face in any): for each normalised weight, the
    other kernels keeping their ratios, the example photos' ranks of their own caption among the example captions
    and where the one-pass word map of "astronaut" peaks (x, y as fractions). Example photos, not the tune half."""
    m = b.model
    names = m.kernel_names
    if "person/share" not in names:
        raise ValueError("this checkpoint has no person kernel (kernels.sources 'person')")
    root = Path(__file__).resolve().parent.parent / "assets" / "examples"
    examples = [e for e in json.loads((root / "examples.json").read_text())["examples"] if e["kind"] == "photo"]
    captions = list(dict.fromkeys(c for e in examples for c in e["captions"]))
    pv, _ = b.processor.images([root / e["image"] for e in examples])
    enc = b.processor.captions(captions)
    img, txt = m.embed_image(m.encode_image(pv)), m.embed_text(m.encode_text(enc["input_ids"], enc["attention_mask"]))
    out = m.similarity(img, txt)
    values = (out.contributions / out.weights).float().numpy()  # (photos, captions, kernels)
    own = [captions.index(e["captions"][0]) for e in examples]
    a = next(i for i, e in enumerate(examples) if e["image"] == "astronaut.jpg")
    token = m.tokenizer.convert_ids_to_tokens(enc["input_ids"][own[a]]).index("astronaut")
    maps = m.kernels.word_patch_maps(img.select([a]), txt.select([own[a]]))[0][:, token]  # (word-map kernels, P)
    gh, gw = m.vision.grids[-1]
    ip = names.index("person/share")
    for weight in (0.02, 0.04, 0.06, 0.08, 0.1, 0.17, 0.3, 0.5, 0.7):
        w = out.weights.detach().float().numpy().copy()
        w[ip] = 0.0
        w = w / w.sum() * (1.0 - weight)
        w[ip] = weight
        s = values @ w
        ranks = [1 + int((s[i] > s[i, own[i]]).sum()) for i in range(len(examples))]
        mw = torch.tensor([w[names.index(n)] for n in m.kernels.word_map_names])
        r, c = divmod(int(((mw / mw.sum())[:, None] * maps).sum(0).argmax()), gw)
        report("person_weight", {"weight": weight}, {"example_ranks": ranks,
               "astronaut_map_peak": [round((c + 0.5) / gw, 2), round((r + 0.5) / gh, 2)]})  # fmt: skip


def domain_accuracy(a: torch.Tensor, b: torch.Tensor, folds: int = 5, decay: float = 1e-2) -> float:
    """How well a logistic classifier tells the rows of ``a`` from those of ``b`` (unit features), cross-validated over
    ``folds`` interleaved folds: 0.5 = the two sets look alike to a linear read-out, 1.0 = always told apart."""
    x = F.normalize(torch.cat([a, b]).float(), dim=-1)
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    right = 0
    for k in range(folds):
        test = order[k::folds]
        train = order[torch.arange(len(order)) % folds != k]
        w = torch.zeros(x.shape[1], requires_grad=True)
        c = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, c], max_iter=200, line_search_fn="strong_wolfe")

        def loss(w=w, c=c, train=train, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            out = F.binary_cross_entropy_with_logits(x[train] @ w + c, y[train]) + decay * w.square().sum()
            out.backward()
            return out

        with torch.enable_grad():
            opt.step(loss)
        right += int(((x[test] @ w + c > 0).float() == y[test]).sum())
    return right / len(x)


def photo_style(b: Bench) -> None:
    """The composites' photo style (``data.photo_style``, :func:`mklvisita.data.composites.photo_like`): as many
    clip-art objects as there are tune-half stamps, shown like the stamps (on white, a 10 % margin), plain and
    styled; how well EfficientNet-Lite0's pooled feature tells each set from the photo stamps, and the cosine of the
    two sets' mean features."""
    from PIL import Image

    from mklvisita.data.clipart import ClipArtLibrary
    from mklvisita.data.composites import photo_like
    from mklvisita.tasks.tuxpaint import centred_on_square

    library = ClipArtLibrary()
    rng = np.random.default_rng(0)
    chosen = rng.choice(library.indices("train"), len(b.pooled), replace=False)
    arts = [library.rgba(int(i)) for i in chosen]
    for style, images in (
        ("plain", [Image.fromarray(a, "RGBA") for a in arts]),
        ("styled", [Image.fromarray(photo_like(a, rng), "RGBA") for a in arts]),
    ):
        pooled, _ = b.images([centred_on_square(im) for im in images])
        cos = F.cosine_similarity(b.pooled.mean(0), pooled.mean(0), dim=0)
        accuracy = domain_accuracy(b.pooled, pooled)
        result = {"domain_accuracy": round(accuracy, 3), "mean_cosine": round(float(cos), 4)}
        report("photo_style", {"clipart": style, "n": len(pooled)}, result)


EXPERIMENTS = {
    f.__name__: f
    for f in (lexicon, calibration, clipart, reference, mixture, weights, captions, pointing)
    + (colour, scene_text, person_weight)  # the fixed sources
    + (photo_style,)  # the composites' rendering
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.photo_experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    args = parser.parse_args(argv)
    bench = Bench(Path(args.checkpoint))
    report("shipped", {}, scores(bench.values(*bench.sources()), bench.txt2img))
    for name in args.experiments:
        EXPERIMENTS[name](bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
