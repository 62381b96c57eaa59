"""The fusion's caption-independent image side computed once per image beforehand (HierarchicalFusion.prepare_image,
MKLVisITA.prepare_fusion_image / start_match_image): the same ITM as the fusion computing it itself, and in a
Matcher call it runs on the overlap worker beside the captions' encoder."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mklvisita import Matcher
from mklvisita.matcher import EMBEDDED
from mklvisita.model import MKLVisITA
from mklvisita.retrieval import encode_captions, match_pairs
from mklvisita.sources.overlap import OVERLAP_ENV, Prefetch, usable_cpus

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
        images_bank = photo._encode(images, CAPTIONS, 64)[0]
        texts_bank = encode_captions(model, photo.processor, CAPTIONS)
        ii = torch.arange(2).repeat_interleave(len(CAPTIONS))
        tt = torch.arange(len(CAPTIONS)).repeat(2)
        expected = match_pairs(model, images_bank, texts_bank, ii, tt).view(2, -1).numpy()
    np.testing.assert_allclose(got.itm, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_image_side_runs_on_the_worker_when_the_overlap_is_on(photo, monkeypatch, mode):
    monkeypatch.setenv(OVERLAP_ENV, mode)
    monkeypatch.setattr(Prefetch, "collect", Prefetch.result)  # always the worker's run (taking back: its own tests)
    seen: list[str] = []
    original = MKLVisITA.prepare_fusion_image

    def recorded(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(MKLVisITA, "prepare_fusion_image", recorded)
    photo.score([str(EXAMPLES / "coffee.jpg")], CAPTIONS)
    assert len(seen) == 1
    assert seen[0].startswith(WORKER) == (mode == "on")


def test_a_model_without_fusion_prepares_nothing():
    matcher = _matcher("photo-sources")
    pv, _ = matcher.processor.images([str(EXAMPLES / "cat.jpg")])
    with torch.inference_mode():
        job, fusion_job = matcher.model.start_match_image(pv)
        assert fusion_job is None
        assert job.collect().sources
        with pytest.raises(RuntimeError, match="no fusion"):
            matcher.model.prepare_fusion_image(job.collect())


@pytest.mark.skipif(usable_cpus() < 2, reason="one CPU: the pairs pass in one piece")
def test_the_pairs_pass_in_two_halves_the_second_on_the_worker(photo, monkeypatch):
    """Matcher.score's fusion passes: the first half of the pairs on the calling thread, the second started on the
    worker; the same numbers with the overlap off (both halves here) and on."""
    monkeypatch.setattr(Prefetch, "collect", Prefetch.result)  # always the worker's run (taking back: its own tests)
    passes: list[tuple[str, int]] = []
    original = MKLVisITA.match

    def recorded(self, img, txt, *args, **kwargs):
        passes.append((threading.current_thread().name, len(txt.pooled)))
        return original(self, img, txt, *args, **kwargs)

    monkeypatch.setattr(MKLVisITA, "match", recorded)
    photo_path = str(EXAMPLES / "astronaut.jpg")
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(OVERLAP_ENV, mode)
        passes.clear()
        results[mode] = photo.score([photo_path], CAPTIONS)
        assert sorted(n for _, n in passes) == [1, 2]  # 3 pairs: 2 here, 1 on the worker
        on_worker = {n: name.startswith(WORKER) for name, n in passes}
        assert on_worker == {2: False, 1: mode == "on"}
    np.testing.assert_array_equal(results["on"].itm, results["off"].itm)
    np.testing.assert_array_equal(results["on"].score, results["off"].score)
