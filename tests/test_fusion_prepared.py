"""The fusion's caption-independent image side computed once per image beforehand (HierarchicalFusion.prepare_image,
MKLVisITA.prepare_fusion_image / start_match_image): the same ITM as the fusion computing it itself; match split in
two (fuse_pairs, then finish_match with S) gives match's numbers; and in a Matcher call the pairs pass through the
fusion on the calling thread while the worker still runs the detectors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mklvisita import Matcher
from mklvisita.matcher import EMBEDDED
from mklvisita.model import MKLVisITA
from mklvisita.retrieval import encode_captions, match_pairs
from mklvisita.sources.overlap import OVERLAP_ENV, usable_cpus

EXAMPLES = EMBEDDED["photo"].parent / "examples"
CAPTIONS = ["a tabby cat lying on a rug", "an astronaut in an orange suit", "a cup of coffee on a saucer"]
WORKER = "mklvisita-overlap"


def _matcher(name: str) -> Matcher:
    if not (EMBEDDED[name] / "model.safetensors").is_file():
        pytest.skip(f"no shipped {name} checkpoint")
    return Matcher.default(name)


@pytest.fixture(scope="module")
def photo() -> Matcher:
    return _matcher("photo")


@pytest.mark.parametrize("name", ["photo", "shapes"])
@pytest.mark.parametrize("maps", [False, True])
def test_a_prepared_image_gives_the_same_match(name, maps):
    matcher = _matcher(name)
    model = matcher.model
    images = [str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "astronaut.jpg")]
    with torch.inference_mode():
        pv, _ = matcher.processor.images(images)
        img = model.encode_image(pv)
        enc = matcher.processor.captions(CAPTIONS)
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
        index = torch.tensor([0, 0, 0, 1, 1, 1])
        pairs = txt.select(torch.tensor([0, 1, 2, 0, 1, 2]))
        itself = model.match(img, pairs, image_index=index, output_attentions=maps)
        prepared = model.prepare_fusion_image(img, output_attentions=maps)
        given = model.match(img, pairs, image_index=index, output_attentions=maps, fusion_image=prepared)
    assert torch.equal(given.logits, itself.logits)
    assert len(given.attentions) == (len(model.fusion.layers) if maps else 0)
    for a, b in zip(given.attentions, itself.attentions):
        assert torch.equal(a.t2i, b.t2i) and torch.equal(a.i2t, b.i2t)
    assert torch.isfinite(given.prob).all()


def test_the_prepared_path_scores_as_match_pairs(photo):
    """Matcher.score (one batch: the fusion's image side prepared on the worker) against retrieval.match_pairs on the
    same banks (the fusion computing it per batch of pairs)."""
    images = [str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "rocket.jpg")]
    got = photo.score(images, CAPTIONS)
    model = photo.model
    with torch.inference_mode():
        ii = torch.arange(2).repeat_interleave(len(CAPTIONS))
        tt = torch.arange(len(CAPTIONS)).repeat(2)
        images_bank = photo._encode(images, CAPTIONS, 64, ii, tt)[0]
        texts_bank = encode_captions(model, photo.processor, CAPTIONS)
        expected = match_pairs(model, images_bank, texts_bank, ii, tt).view(2, -1).numpy()
    np.testing.assert_allclose(got.itm, expected, rtol=0, atol=1e-6)


def test_fuse_pairs_then_finish_match_give_match_exactly(photo):
    """The pairs' passes before S is known, and S added after: match's logits bit for bit, also with image embeddings
    of the fusion's affinity source alone (what a score has before the detectors' sources are done)."""
    model = photo.model
    with torch.inference_mode():
        pv, _ = photo.processor.images([str(EXAMPLES / "cat.jpg")])
        img = model.encode_image(pv)
        enc = photo.processor.captions(CAPTIONS)
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
        index = torch.zeros(len(CAPTIONS), dtype=torch.long)
        s = model.similarity(model.embed_image(img), model.embed_text(txt)).similarity[0]
        whole = model.match(img, txt, image_index=index, output_attentions=False, similarity=s)
        alone = model.embed_image(img, [model.kernels.affinity_source])
        assert set(alone.sources) == {model.kernels.affinity_source}
        fused = model.fuse_pairs(img, txt, alone, None, index, False)
        split = model.finish_match(fused, s)
        with pytest.raises(ValueError, match="pass each pair's S"):
            model.finish_match(fused)
    assert torch.equal(split.logits, whole.logits) and torch.equal(split.prob, whole.prob)


def test_a_model_without_fusion_prepares_nothing():
    matcher = _matcher("photo-sources")
    pv, _ = matcher.processor.images([str(EXAMPLES / "cat.jpg")])
    with torch.inference_mode():
        started = matcher.model.start_match_image(pv)
        assert started.fusion is None
        assert started.sources.collect().sources
        with pytest.raises(RuntimeError, match="no fusion"):
            matcher.model.prepare_fusion_image(started.sources.collect())


@pytest.mark.skipif(usable_cpus() < 2, reason="one CPU: no worker")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_pairs_pass_on_the_caller_while_the_worker_reads_text(photo, monkeypatch, mode):
    """Matcher.score: the fusion's image side and the pair passes (one pass for the three pairs) on the calling
    thread, before the detectors' sources are needed: the worker's text detector is held until the pairs have passed
    (were the call to need its words first, it would wait forever); the same numbers with the overlap off."""
    caller = threading.current_thread().name
    fused, passes, prepared, read = threading.Event(), [], [], []
    original_fuse, original_prepare = MKLVisITA.fuse_pairs, MKLVisITA.prepare_fusion_image
    reader = photo.model.sources["scene_text"].reader
    original_read = reader.read_images

    def fuse(self, img, txt, *args, **kwargs):
        passes.append((threading.current_thread().name, len(txt.pooled)))
        out = original_fuse(self, img, txt, *args, **kwargs)
        fused.set()
        return out

    def prepare(*args, **kwargs):
        prepared.append(threading.current_thread().name)
        return original_prepare(*args, **kwargs)

    def read_images(*args, **kwargs):
        read.append(threading.current_thread().name)
        if read[-1].startswith(WORKER):
            assert fused.wait(60)  # the pairs pass while the worker still reads
        return original_read(*args, **kwargs)

    monkeypatch.setattr(MKLVisITA, "fuse_pairs", fuse)
    monkeypatch.setattr(MKLVisITA, "prepare_fusion_image", prepare)
    monkeypatch.setattr(reader, "read_images", read_images)
    photo_path = str(EXAMPLES / "astronaut.jpg")
    monkeypatch.setenv(OVERLAP_ENV, mode)
    got = photo.score([photo_path], CAPTIONS)
    assert passes == [(caller, len(CAPTIONS))] and prepared == [caller] and len(read) == 1
    if mode == "off":
        assert read == [caller]
    monkeypatch.setenv(OVERLAP_ENV, "off")
    monkeypatch.setattr(MKLVisITA, "fuse_pairs", original_fuse)
    expected = photo.score([photo_path], CAPTIONS)
    for field in ("itm", "similarity", "score"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field), err_msg=field)


def test_a_fusion_that_reads_a_detector_source_fuses_after_every_source(photo, monkeypatch):
    """Where the fusion's affinity source is not among the early sources (one after a detector), Matcher.score
    collects every source first and fuses then: the same scores as fusing beside the detectors (float rounding)."""
    photo_path = str(EXAMPLES / "rocket.jpg")
    early = photo.score([photo_path], CAPTIONS)
    seen = []

    def cannot_read(self, img):
        seen.append(sorted(img.sources))
        return False

    monkeypatch.setattr(Matcher, "_fusion_can_read", cannot_read)
    late = photo.score([photo_path], CAPTIONS)
    assert seen == [["colour", "concept"]]  # asked once, with the early sources only
    for field in ("itm", "similarity", "score"):
        np.testing.assert_allclose(getattr(late, field), getattr(early, field), rtol=0, atol=1e-6, err_msg=field)
