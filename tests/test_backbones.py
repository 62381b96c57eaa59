"""Any timm backbone: a ViT, CNNs and a hybrid build, score, explain and train with random weights (as timm's tests).

Tiny random models only (timm's ``test_*`` models and a shrunken resnet18): no download, a few seconds each.
"""

import numpy as np
import pytest
import torch
from conftest import micro_config
from PIL import Image

from mklvisita import Matcher, MKLVisITA
from mklvisita.explain import explain_pair, image_rollout, layer_maps
from mklvisita.inputs import Processor
from mklvisita.pointing import pointing_game

CAPTIONS = ["a red circle", "a blue square left of a star", "two shapes"]


def _config(kind: str):
    cfg = micro_config()
    v = cfg.vision
    if kind in ("vit", "vit_stem"):
        v.model_name, v.patch_size = "test_vit", 8  # 32 px -> 4 x 4 patches, micro sizes
        if kind == "vit_stem":
            v.conv_stem = (8, 16, 16)  # three stride-2 convolutions in place of the 8 px patch projection
        return cfg
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 64, None, None, None, None
    if kind == "resnet":  # a real architecture shrunk by timm keyword arguments
        v.model_name = "resnet18"
        v.timm_args = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
    elif kind == "efficientnet":
        v.model_name = "test_efficientnet"
    elif kind == "hybrid":
        v.model_name, v.hybrid_layers, v.hybrid_width, v.hybrid_heads = "test_efficientnet", 2, 32, 2
    return cfg


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["vit", "vit_stem", "resnet", "efficientnet", "hybrid"])
def built(request):
    torch.manual_seed(0)
    model = MKLVisITA(_config(request.param)).eval()
    return request.param, model, Processor(model.config, model.tokenizer)


def test_levels_widths_and_grids_are_what_the_encoder_returns(built):
    kind, model, _ = built
    v = model.vision
    assert v.kind == ("vit" if kind.startswith("vit") else "hybrid" if kind == "hybrid" else "cnn")
    assert v.num_prefix_tokens == (0 if v.kind == "cnn" else 1)
    assert len(v.widths) == len(v.grids) == v.depth
    s = model.config.vision.image_size
    img = model.encode_image(torch.randn(2, 3, s, s))
    assert sorted(img.levels) == model.image_levels
    for lvl, tokens in img.levels.items():
        gh, gw = v.grids[lvl]
        assert tokens.shape == (2, v.num_prefix_tokens + gh * gw, v.widths[lvl])  # (B, prefix + H*W, C_level)
        assert torch.isfinite(tokens).all()
    assert img.pooled.shape == (2, v.pooled_width)
    if v.kind == "cnn":
        assert len(set(v.widths)) > 1  # stages differ in width: the per-level projections are needed
        assert [p.in_features for p in model.fusion.image_in] == [v.widths[lv] for lv in model.fusion_levels]
        # pooled = timm's pooled pre-logits (global average of the final map for these CNNs)
        torch.testing.assert_close(img.pooled, img.levels[v.depth - 1].mean(1))


def test_score_and_explain_on_every_backbone(built):
    kind, model, processor = built
    m = Matcher(model, processor)
    images = [_image(40, 30), _image(30, 50, seed=1)]
    r = m.score(images, CAPTIONS)
    assert r.itm.shape == r.similarity.shape == (2, 3)
    assert np.isfinite(r.itm).all() and np.isfinite(r.kernel_contributions).all()
    np.testing.assert_allclose(r.kernel_contributions.sum(-1), r.similarity, atol=1e-5)
    for method in ("gradcam", "attention", "kernel"):
        e = explain_pair(model, processor, images[1], CAPTIONS[1], method=method, heads=method != "kernel")
        n = len(CAPTIONS[1].split())
        assert e.word_heatmaps.shape == (n, 50, 30) and e.caption_heatmap.shape == (50, 30)
        assert np.isfinite(e.word_heatmaps).all() and e.word_heatmaps.min() >= 0 and e.word_heatmaps.max() <= 1
        assert all(k.shape == (n, 50, 30) and np.isfinite(k).all() for k in e.kernel_maps.values())
        assert e.rollout is None if kind in ("resnet", "efficientnet") else e.rollout.shape == (50, 30)
    lm = layer_maps(model, processor, images[0], CAPTIONS[0])
    assert lm.word_heatmaps.shape == (model.config.fusion.layers, 3, 30, 40) and np.isfinite(lm.word_heatmaps).all()


def test_rollout_only_where_there_is_attention(built):
    kind, model, processor = built
    s = model.config.vision.image_size
    if kind in ("resnet", "efficientnet"):
        with pytest.raises(ValueError, match="CNN"):
            model.encode_image(torch.randn(1, 3, s, s), output_attentions=True)
        with pytest.raises(ValueError, match="rollout"):
            image_rollout(model, processor, _image(20, 20))
        scenes = [{"image": _image(20, 20), "objects": [{"phrase": "a red circle", "mask": np.ones((20, 20), bool)}]}]
        with pytest.raises(ValueError, match="rollout"):
            pointing_game(model, processor, scenes, methods=("rollout",))
        assert "pointing_acc_rollout" not in pointing_game(model, processor, scenes)
    else:
        img = model.encode_image(torch.randn(1, 3, s, s), output_attentions=True)
        n = model.vision.num_prefix_tokens + model.vision.grid[0] * model.vision.grid[1]
        assert len(img.attentions) == model.vision.depth
        assert all(a.shape[-2:] == (n, n) for a in img.attentions)
        roll = image_rollout(model, processor, _image(20, 20))
        assert roll.shape == (20, 20) and roll.max() == pytest.approx(1.0)


def test_train_step_reaches_every_parameter_and_reloads(built, tmp_path):
    kind, model, processor = built
    torch.manual_seed(1)
    s = model.config.vision.image_size
    enc = processor.captions(CAPTIONS)
    model.train()
    try:
        out = model(torch.randn(3, 3, s, s), enc["input_ids"], enc["attention_mask"])
        out.loss.backward()
        assert torch.isfinite(out.loss)
        silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert silent == []  # DDP refuses parameters without gradients
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    again = MKLVisITA.from_pretrained(tmp_path / "ckpt")  # strict: every weight present and shaped
    pv = torch.randn(2, 3, s, s)
    with torch.no_grad():
        a, b = model.encode_image(pv), again.encode_image(pv)
    torch.testing.assert_close(a.pooled, b.pooled)


@pytest.mark.parametrize(
    "name, kind, rollout",
    [
        ("test_convnext", "cnn", False),  # four stages, LayerNorm CNN
        ("test_mambaout", "cnn", False),  # its final feature map is channels-last (B, H, W, C)
        ("test_vit_relpos", "vit", False),  # no CLS token; relative-position attention gives no probabilities
    ],
)
def test_more_timm_families_score_and_explain(name, kind, rollout):
    cfg = micro_config()
    v = cfg.vision
    v.model_name, v.image_size, v.patch_size, v.width, v.depth, v.heads = name, 64, None, None, None, None
    model = MKLVisITA(cfg).eval()
    assert model.vision.kind == kind and model.vision.has_attentions == rollout
    r = Matcher(model).score([_image(40, 30)], CAPTIONS)
    assert np.isfinite(r.itm).all() and np.isfinite(r.similarity).all()
    e = Matcher(model).explain(_image(40, 30), CAPTIONS[0])
    assert e.word_heatmaps.shape == (3, 30, 40) and np.isfinite(e.word_heatmaps).all()
    assert (e.rollout is not None) == rollout


def test_vit_config_cannot_be_a_hybrid():
    cfg = _config("vit")
    cfg.vision.hybrid_layers = 1
    with pytest.raises(ValueError, match="hybrid_layers"):
        MKLVisITA(cfg)


def test_conv_stem_keeps_the_grid_and_refuses_what_it_cannot_replace():
    plain, stem = MKLVisITA(_config("vit")), MKLVisITA(_config("vit_stem"))
    assert stem.vision.grid == plain.vision.grid == (4, 4)
    convs = [m for m in stem.vision.model.patch_embed.proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] and convs[-1].out_channels == stem.vision.width
    for field, value, match in (
        ("conv_stem", (8, 16), "stride of 4"),  # two layers cannot replace an 8 px patch
        ("pretrained", True, "random init only"),
    ):
        cfg = _config("vit_stem")
        setattr(cfg.vision, field, value)
        with pytest.raises(ValueError, match=match):
            MKLVisITA(cfg)
    cfg = _config("efficientnet")
    cfg.vision.conv_stem = (8, 16, 16)
    with pytest.raises(ValueError, match="is a CNN"):
        MKLVisITA(cfg)


def test_unknown_backbone_and_vit_sizes_on_a_cnn_are_plain_errors():
    cfg = _config("efficientnet")
    cfg.vision.model_name = "no_such_net"
    with pytest.raises(ValueError, match="not a timm model"):
        MKLVisITA(cfg)
    cfg = _config("efficientnet")
    cfg.vision.depth = 3
    with pytest.raises(ValueError, match="timm_args"):
        MKLVisITA(cfg)


# ------------------------------------------------------------------------------------------ weights by spec
def test_vision_and_text_weights_come_from_the_pretrained_module(monkeypatch, tmp_path):
    """``weights`` specs go through mklvisita.pretrained (sha256-checked there); the encoders load them strictly."""
    import timm
    from transformers import BertConfig, BertModel

    import mklvisita.pretrained as pretrained
    from mklvisita.tokenizer import builtin_tokenizer

    cfg = _config("efficientnet")
    source = timm.create_model("test_efficientnet", num_classes=10)  # a head, as shipped weights have
    text_dir = tmp_path / "text"
    tok = builtin_tokenizer([], 24)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2), False)
    bert.save_pretrained(text_dir)
    tok.save_pretrained(text_dir)
    asked = []

    def vision_state_dict(spec, model_name):
        asked.append((spec, model_name))
        return source.state_dict()

    def text_model_folder(spec):
        asked.append(spec)
        return text_dir

    monkeypatch.setattr(pretrained, "vision_state_dict", vision_state_dict)
    monkeypatch.setattr(pretrained, "text_model_folder", text_model_folder)
    cfg.vision.pretrained, cfg.vision.weights = True, "package:some-vision-weights"
    cfg.text.pretrained, cfg.text.weights = True, "file:some/folder"
    model = MKLVisITA(cfg)
    assert ("package:some-vision-weights", "test_efficientnet") in asked and "file:some/folder" in asked
    assert torch.equal(model.vision.model.conv_stem.weight, source.conv_stem.weight)
    assert torch.equal(model.text.model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert len(model.tokenizer) == len(tok)

    def wrong(spec, model_name):
        return {k: v for k, v in source.state_dict().items() if not k.startswith("conv_stem")}

    monkeypatch.setattr(pretrained, "vision_state_dict", wrong)
    cfg.text.pretrained = False
    with pytest.raises(ValueError, match="conv_stem"):
        MKLVisITA(cfg)
