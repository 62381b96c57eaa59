import json
import shutil
import time

import numpy as np
import pytest
import timm
import torch
from conftest import micro_config
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from mklvisita import CheckpointError, Matcher, MKLVisITA, MKLVisITAConfig
from mklvisita.config import ConfigError
from mklvisita.inputs import Processor
from mklvisita.losses import itc_loss, kernel_entropy_loss, sample_hard_negatives


def _batch(model, b=4):
    proc = Processor(model.config, model.tokenizer)
    s = model.config.vision.image_size
    caps = ["a red circle", "a blue square left of a star", "two shapes", "a small green cross"][:b]
    enc = proc.captions(caps)
    return torch.randn(b, 3, s, s), enc


def test_tiny_forward_backward_is_finite_and_fast():
    torch.manual_seed(0)
    model = MKLVisITA(MKLVisITAConfig.tiny()).train()
    pv, enc = _batch(model)
    neg = Processor(model.config, model.tokenizer).captions(["a", "b c", "d", "e f g"])
    t = time.perf_counter()
    out = model(
        pv,
        enc["input_ids"],
        enc["attention_mask"],
        neg_input_ids=neg["input_ids"],
        neg_attention_mask=neg["attention_mask"],
    )
    out.loss.backward()
    assert time.perf_counter() - t < 10  # generous: the point is "seconds, not minutes" on a CPU
    assert set(out.losses) == {"itc", "itm", "entropy"}
    assert torch.isfinite(out.loss)
    assert out.similarity.shape == (4, 4) and out.contributions.shape == (4, 4, 12)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert model.kernels.logits.grad is not None  # kernel weights are learned
    assert model.fusion.bias_logits.grad is not None  # per-level affinity weights too


def test_forward_computes_loss_only_when_asked():
    model = MKLVisITA(micro_config()).eval()
    pv, enc = _batch(model)
    out = model(pv, enc["input_ids"], enc["attention_mask"], return_loss=False)
    assert out.loss is None and out.losses == {}
    assert out.similarity.shape == (4, 4)


def test_fusion_returns_attentions_of_every_layer_on_its_level():
    cfg = micro_config()
    cfg.vision.depth = 4
    cfg.fusion.layers = 2
    cfg.fusion.image_pool = 1  # image queries at every token (the pooled image stream: tests/test_fusion.py)
    model = MKLVisITA(cfg).eval()
    assert model.fusion.image_levels == [1, 3]  # early fusion layers read lower ViT blocks
    pv, enc = _batch(model, 2)
    with torch.no_grad():
        img, txt = model.encode_image(pv), model.encode_text(**enc)
        m = model.match(img, txt)
    n = 1 + model.vision.grid[0] * model.vision.grid[1]
    t = enc["input_ids"].shape[1]
    assert len(m.attentions) == 2
    for a in m.attentions:
        assert a.t2i.shape == (2, cfg.fusion.heads, t, n) and a.i2t.shape == (2, cfg.fusion.heads, n, t)
        assert torch.allclose(a.t2i.sum(-1), torch.ones(2, cfg.fusion.heads, t), atol=1e-5)
    assert ((m.prob >= 0) & (m.prob <= 1)).all()


def test_every_preset_runs_without_nan():
    for cfg in (micro_config(), MKLVisITAConfig.tiny()):
        model = MKLVisITA(cfg).eval()
        pv, enc = _batch(model, 2)
        with torch.no_grad():
            out = model(pv, enc["input_ids"], enc["attention_mask"], return_loss=False)
        assert torch.isfinite(out.similarity).all()


@pytest.mark.slow
def test_base_preset_builds_at_full_size_with_no_network():
    model = MKLVisITA(MKLVisITAConfig.base(pretrained=False))
    assert model.vision.width == 768 and model.vision.depth == 12
    assert model.text.width == 768 and model.text.depth == 12
    assert len(model.fusion.layers) == 6
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert 150 < n < 400, n


def test_dual_encoder_baseline_has_no_itm():
    cfg = micro_config()
    cfg.kernels.sources, cfg.kernels.functions, cfg.fusion.enabled = ["global"], ["cosine"], False
    model = MKLVisITA(cfg)
    assert model.kernel_names == ["global/cosine"] and not model.has_itm
    pv, enc = _batch(model)
    out = model(pv, enc["input_ids"], enc["attention_mask"])
    assert set(out.losses) == {"itc", "entropy"}
    assert float(out.losses["entropy"]) == 0.0


def test_itc_loss_on_known_inputs():
    perfect = torch.eye(3) * 10
    assert itc_loss(perfect, torch.tensor(1.0)) < 1e-3
    uniform = torch.zeros(3, 3)
    assert torch.isclose(itc_loss(uniform, torch.tensor(1.0)), torch.log(torch.tensor(3.0)))
    # two captions of one image: with image_ids both are positives, so scoring them alike is better than
    # preferring one; without image_ids the other caption is a negative and the preference wins.
    ids = torch.tensor([0, 0, 1])
    alike = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    prefer = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    one = torch.tensor(1.0)
    assert itc_loss(alike, one, ids) < itc_loss(prefer, one, ids)
    assert itc_loss(prefer, one) < itc_loss(alike, one)
    # a hard negative caption scored above the positive raises the loss
    hard = torch.tensor([[9.0], [-9.0], [-9.0]])
    assert itc_loss(perfect, one, extra_text_similarity=hard) > itc_loss(perfect, one) + 0.01


def test_kernel_entropy_loss_and_hard_negatives():
    assert kernel_entropy_loss(torch.log(torch.tensor(4.0)), 4) == pytest.approx(0.0, abs=1e-6)
    assert kernel_entropy_loss(torch.tensor(0.0), 4) == pytest.approx(1.0)
    sim = torch.tensor([[1.0, 0.9, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.5, 1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, ok_i, i, ok_t = sample_hard_negatives(sim, generator=g)
        assert (t != torch.arange(3)).all() and (i != torch.arange(3)).all() and ok_i.all() and ok_t.all()
    ids = torch.tensor([0, 0, 1])
    t, _, i, _ = sample_hard_negatives(sim, ids, generator=g)
    assert t[0] == 2 and t[1] == 2  # the other caption of image 0 is never a negative for it
    _, ok_i, _, ok_t = sample_hard_negatives(sim, torch.zeros(3, dtype=torch.long))
    assert not ok_i.any() and not ok_t.any()  # one image: no negative anywhere, every row flagged


def test_positives_mask_keeps_true_captions_out_of_negatives():
    # caption 2 is also true of image 0 (a shapes claim like "three shapes"): never a negative of image 0
    pos = torch.tensor([[True, False, True], [False, True, False], [False, False, True]])
    sim = torch.tensor([[0.0, -5.0, 5.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        t, ok_i, i, ok_t = sample_hard_negatives(sim, positives=pos, generator=g)
        assert t[0] == 1 and ok_i.all() and ok_t.all()  # the only caption not true of image 0
        assert i[2] == 1  # caption 2 holds for images 0 and 2: its negative image can only be 1
    # ITC with the mask: scoring both true captions of image 0 alike beats preferring one of them
    one = torch.tensor(1.0)
    alike = torch.tensor([[5.0, -5.0, 5.0], [-5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    prefer = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    assert itc_loss(alike, one, positives=pos) < itc_loss(prefer, one, positives=pos)
    assert itc_loss(prefer, one) < itc_loss(alike, one)
    # a dataset negative masked out for an image is no distractor for it
    hard = torch.tensor([[9.0, -9.0, -9.0], [-9.0, -9.0, -9.0], [-9.0, -9.0, -9.0]])
    own = torch.eye(3, dtype=torch.bool)
    masked_out = itc_loss(torch.eye(3) * 10, one, extra_text_similarity=hard, extra_mask=~own)
    assert masked_out < 1e-3
    assert itc_loss(torch.eye(3) * 10, one, extra_text_similarity=hard, extra_mask=own) > masked_out + 0.04


# ------------------------------------------------------------------------------------------------- checkpoints
def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20 + 7 * i, 30, 3), dtype=np.uint8)) for i in range(3)]


CAPTIONS = ["a red circle", "a blue square above a green star", "a man riding a horse"]


def test_save_load_gives_identical_scores(tiny_checkpoint, tmp_path):
    files = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    a = Matcher.from_pretrained(tiny_checkpoint)
    a.model.save_pretrained(tmp_path / "again")
    b = Matcher.from_pretrained(tmp_path / "again")
    ra, rb = a.score(_images(), CAPTIONS), b.score(_images(), CAPTIONS)
    np.testing.assert_array_equal(ra.itm, rb.itm)
    np.testing.assert_array_equal(ra.similarity, rb.similarity)
    assert MKLVisITAConfig.from_dict(json.loads((tmp_path / "again" / "config.json").read_text())) == a.config


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_strict_loading_names_what_is_wrong(tiny_checkpoint, tmp_path):
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))

    d = _copy(tiny_checkpoint, tmp_path / "missing")
    save_file({k: v for k, v in weights.items() if k != "itm_head.weight"}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing weights: itm_head.weight"):
        MKLVisITA.from_pretrained(d)

    d = _copy(tiny_checkpoint, tmp_path / "unexpected")
    save_file({**weights, "extra.head": torch.zeros(2)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected weights: extra.head"):
        MKLVisITA.from_pretrained(d)

    d = _copy(tiny_checkpoint, tmp_path / "shape")
    save_file({**weights, "logit_scale": torch.zeros(3)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped weights: logit_scale"):
        MKLVisITA.from_pretrained(d)

    d = _copy(tiny_checkpoint, tmp_path / "half")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        MKLVisITA.from_pretrained(d)

    d = _copy(tiny_checkpoint, tmp_path / "nofile")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MKLVisITA.from_pretrained(d)

    d = _copy(tiny_checkpoint, tmp_path / "pickle")
    torch.save(weights, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        MKLVisITA.from_pretrained(d)


def test_config_errors_name_the_field(tiny_checkpoint, tmp_path):
    for patch, message in [
        (lambda c: c["fusion"].update(layerz=3), r"fusion.layerz: unknown config field \(did you mean 'layers'\?\)"),
        (lambda c: c["vision"].update(image_size="big"), "vision.image_size: expected an integer"),
        (lambda c: c["kernels"].update(functions=["cosine", "laplace"]), "unknown function 'laplace'"),
    ]:
        d = _copy(tiny_checkpoint, tmp_path / f"cfg{len(list(tmp_path.iterdir()))}")
        cfg = json.loads((d / "config.json").read_text())
        patch(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=message):
            MKLVisITA.from_pretrained(d)
    with pytest.raises(ConfigError, match="unknown config field"):
        MKLVisITAConfig.from_dict({"visoin": {}})


def test_hub_ids_resolve_through_the_cache_with_a_pinned_revision(tiny_checkpoint, tmp_path, monkeypatch):
    """The Hub path itself, offline: a snapshot laid out as huggingface_hub caches it, at two revisions."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--mklvisita-micro"
    commits = {"main": "a" * 40, "v1": "b" * 40}
    for ref, commit in commits.items():
        shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    # revision v1 holds different weights
    w = load_file(str(repo / "snapshots" / commits["v1"] / "model.safetensors"))
    w["logit_scale"] = torch.tensor(1.234)
    save_file(w, str(repo / "snapshots" / commits["v1"] / "model.safetensors"))

    main = MKLVisITA.from_pretrained("someone/mklvisita-micro", cache_dir=cache, local_files_only=True)
    v1 = MKLVisITA.from_pretrained("someone/mklvisita-micro", revision="v1", cache_dir=cache, local_files_only=True)
    assert float(v1.logit_scale.detach()) == pytest.approx(1.234)
    assert float(main.logit_scale.detach()) != pytest.approx(1.234)
    with pytest.raises(CheckpointError, match="could not get checkpoint 'someone/absent'"):
        MKLVisITA.from_pretrained("someone/absent", cache_dir=cache, local_files_only=True)


def test_backbones_by_name_load_pretrained_weights_from_a_folder(tmp_path):
    """The real loading path of named backbones, offline: save tiny backbones, load them by path."""
    torch.manual_seed(0)
    text_dir = tmp_path / "tiny-bert"
    tok = MKLVisITA(micro_config()).tokenizer
    bert = BertModel(
        BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        ),
        add_pooling_layer=False,
    )
    bert.save_pretrained(text_dir)
    tok.save_pretrained(text_dir)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))

    cfg = micro_config()
    cfg.text.model_name, cfg.text.pretrained = str(text_dir), True
    cfg.vision.pretrained, cfg.vision.pretrained_file = True, str(tmp_path / "vit.safetensors")
    model = MKLVisITA(cfg)
    assert torch.equal(model.text.model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert torch.equal(model.vision.model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    # Saved and reloaded, the checkpoint needs neither the backbone folder nor the weights file.
    model.save_pretrained(tmp_path / "release")
    shutil.rmtree(text_dir)
    (tmp_path / "vit.safetensors").unlink()
    again = MKLVisITA.from_pretrained(tmp_path / "release")
    assert torch.equal(again.text.model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)


def test_every_parameter_gets_a_gradient():
    """DDP refuses parameters that never receive a gradient."""
    model = MKLVisITA(micro_config()).train()
    pv, enc = _batch(model)
    neg = Processor(model.config, model.tokenizer).captions(["a", "b c", "d", "e f g"])
    model(
        pv,
        enc["input_ids"],
        enc["attention_mask"],
        neg_input_ids=neg["input_ids"],
        neg_attention_mask=neg["attention_mask"],
    ).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_a_batch_of_one_image_still_trains():
    model = MKLVisITA(micro_config()).train()
    pv, enc = _batch(model, 2)
    ids = torch.zeros(2, dtype=torch.long)  # two captions of the same image
    out = model(pv, enc["input_ids"], enc["attention_mask"], image_ids=ids)
    assert "itm" not in out.losses and torch.isfinite(out.loss)
    neg = Processor(model.config, model.tokenizer).captions(["x", "y"])
    out = model(
        pv,
        enc["input_ids"],
        enc["attention_mask"],
        image_ids=ids,
        neg_input_ids=neg["input_ids"],
        neg_attention_mask=neg["attention_mask"],
    )
    assert "itm" in out.losses


def test_itm_negatives_option_is_validated_and_used():
    cfg = micro_config()
    cfg.loss.itm_negatives = "random"
    model = MKLVisITA(cfg).train()
    pv, enc = _batch(model)
    assert torch.isfinite(model(pv, enc["input_ids"], enc["attention_mask"]).losses["itm"])
    cfg.loss.itm_negatives = "hardest"
    with pytest.raises(ConfigError, match="itm_negatives"):
        MKLVisITA(cfg)
