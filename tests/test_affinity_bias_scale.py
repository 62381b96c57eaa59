"""fusion.affinity_bias_scale: the concept maps' bias on the words' attention scaled at serving. 1 is the trained
model (nothing changes); a factor a gives exactly what the model gives with every layer's learned bias scale times a;
the tune sweep sets it per row, records it, restores it and chooses it by the same rule as the other settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mklvisita import Matcher, MKLVisITA
from mklvisita.config import ConfigError, MKLVisITAConfig
from mklvisita.inputs import Processor

CAPTIONS = ["a red circle left of a blue square", "a blue square left of a red circle", "a green triangle"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MKLVisITA(MKLVisITAConfig.tiny()).eval()
    with torch.no_grad():  # a bias that matters: the kernels' maps weigh in the attention logits
        model.fusion.bias_scale.fill_(3.0)
    processor = Processor(model.config, model.tokenizer)
    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(2)]
    with torch.inference_mode():
        pv, _ = processor.images(images)
        img = model.encode_image(pv)
        enc = processor.captions(CAPTIONS)
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
    return model, img, txt


def _match(model, img, txt, maps: bool):
    index = torch.tensor([0, 1, 0])
    with torch.inference_mode():
        return model.match(img, txt, image_index=index, output_attentions=maps)


@pytest.mark.parametrize("maps", [False, True], ids=["scoring", "explanations"])
def test_a_factor_is_the_learned_bias_scale_times_it(tiny, maps):
    model, img, txt = tiny
    trained = _match(model, img, txt, maps).logits
    try:
        model.config.fusion.affinity_bias_scale = 2.5
        served = _match(model, img, txt, maps).logits
        model.config.fusion.affinity_bias_scale = 1.0
        with torch.no_grad():
            model.fusion.bias_scale.mul_(2.5)
        learned = _match(model, img, txt, maps).logits
    finally:
        model.config.fusion.affinity_bias_scale = 1.0
        with torch.no_grad():
            model.fusion.bias_scale.fill_(3.0)
    torch.testing.assert_close(served, learned, rtol=1e-5, atol=1e-5)
    assert (served - trained).abs().max() > 1e-4  # it moved the match logits
    torch.testing.assert_close(_match(model, img, txt, maps).logits, trained, rtol=0, atol=0)  # 1: as trained


def test_a_loaded_checkpoint_reads_the_factor_from_its_config_at_call_time(tiny, tmp_path):
    """The sweep and the saved config set ``model.config``, which a loaded model holds apart from its modules'."""
    model, img, txt = tiny
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MKLVisITA.from_pretrained(tmp_path / "ckpt").eval()
    trained = _match(loaded, img, txt, False).logits
    loaded.config.fusion.affinity_bias_scale = 2.5
    served = _match(loaded, img, txt, False).logits
    with torch.no_grad():
        loaded.fusion.bias_scale.mul_(2.5)
    loaded.config.fusion.affinity_bias_scale = 1.0
    torch.testing.assert_close(served, _match(loaded, img, txt, False).logits, rtol=1e-5, atol=1e-5)
    assert (served - trained).abs().max() > 1e-4


def test_out_of_range_is_refused():
    config = MKLVisITAConfig.tiny()
    config.fusion = dataclasses.replace(config.fusion, affinity_bias_scale=-1.0)
    with pytest.raises(ConfigError, match="affinity_bias_scale"):
        config.validate()


def test_the_model_tab_shows_the_scale_as_served(tiny):
    model, _, _ = tiny
    matcher = Matcher(model, Processor(model.config, model.tokenizer))
    learned = matcher.fusion_bias_scales()
    try:
        model.config.fusion.affinity_bias_scale = 2.0
        assert matcher.fusion_bias_scales() == pytest.approx([2.0 * x for x in learned])
    finally:
        model.config.fusion.affinity_bias_scale = 1.0


def test_the_tune_sweep_sets_records_restores_and_chooses_the_factor(tiny, monkeypatch):
    """The sweep's plumbing with the encodings faked: binding rises with the factor up to 3, ties keep the trained
    factor, and the model leaves the sweep as it came in."""
    from training import photo_fusion_tune as tune

    model, _, _ = tiny
    n = 4
    stamps = {"sim": np.eye(n), "top_i": np.arange(n)[:, None], "top_t": np.arange(n)[:, None]}
    stamps["data"] = type("D", (), {"txt2img": list(range(n))})()
    relations = {**stamps, "data": type("D", (), {"txt2img": list(range(n)), "negative_kinds": ["reverse"] * n})()}
    monkeypatch.setattr(tune, "_encode", lambda model, proc, spec, *a, **k: stamps if spec == "tuxpaint" else relations)
    seen = []

    def scores(model, enc):
        a = model.config.fusion.affinity_bias_scale
        seen.append(a)
        right = min(int(a), 3)  # pairs the ITM gets right: 1 at the trained factor, 3 from a factor of 3 on
        out = {**enc, "itm": np.eye(n)}
        if enc is relations:
            pos_itm = np.array([1.0] * right + [0.0] * (n - right))
            out["pos"], out["neg"] = (np.zeros(n), pos_itm), (np.zeros(n), np.full(n, 0.5))
        return out

    monkeypatch.setattr(tune, "_scores", scores)
    got = tune.sweep(model, None, weights=(0.0, 1.0), affinity_scales=(1.0, 4.0, 3.0))
    assert sorted(set(seen)) == [1.0, 3.0, 4.0] and model.config.fusion.affinity_bias_scale == 1.0
    assert {r["affinity_bias_scale"] for r in got["rows"]} == {1.0, 3.0, 4.0}
    assert got["chosen_affinity_bias_scale"] == 3.0 and got["chosen_itm_weight"] == 1.0  # 3 and 4 tie: the nearer 1
