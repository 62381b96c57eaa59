"""The image sources' work after the backbone on the overlap worker, beside the captions' encoder
(MKLVisITA.start_encode_image, overlap.start_torch): the same scores as on the calling thread, the caller's thread count
and autograd mode in the worker, errors raised in the caller, and auto's count of free cores."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mklvisita import Matcher
from mklvisita.sources import overlap
from mklvisita.sources.colour import ColourNames
from mklvisita.sources.concept import ConceptBridge
from mklvisita.sources.overlap import OVERLAP_ENV, Prefetch, start, start_torch
from mklvisita.sources.scene_text import SceneTextReader
from mklvisita.threads import inference_threads
from tests.overlap_fixtures import CAPTIONS, EXAMPLES, SIGN, WORKER, photo_matcher

PHOTOS = ["cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return photo_matcher()


@pytest.fixture
def image_work_threads(monkeypatch) -> list[str]:
    """The threads the concept bridge's and colour naming's image side ran on, in call order."""
    seen: list[str] = []
    for cls, name in ((ConceptBridge, "encode_image"), (ColourNames, "cells")):
        original = getattr(cls, name)

        def recorded(*args, _original=original, **kwargs):
            seen.append(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, recorded)
    return seen


def _photos() -> list[str]:
    return [str(EXAMPLES / p) for p in PHOTOS] + ([str(SIGN)] if SIGN.is_file() else [])


@pytest.mark.parametrize("photo", _photos(), ids=lambda p: Path(p).name)
def test_overlap_on_and_off_give_identical_scores(matcher, image_work_threads, monkeypatch, photo):
    """One photo x five captions, the demo's Match call: the image sources that start no detector (the concept
    bridge, colour naming) run on the calling thread before the pair passes (MKLVisITA.start_match_image) in both
    settings, and every number is the same."""
    monkeypatch.setattr(Prefetch, "collect", Prefetch.result)  # always the worker's run (taking back: tested below)
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(OVERLAP_ENV, mode)
        image_work_threads.clear()
        results[mode] = matcher.score([photo], CAPTIONS)
        assert image_work_threads == [threading.current_thread().name] * 2
    off, on = results["off"], results["on"]
    np.testing.assert_array_equal(on.similarity, off.similarity)
    np.testing.assert_array_equal(on.kernel_contributions, off.kernel_contributions)
    np.testing.assert_array_equal(on.score, off.score)
    assert np.abs(on.kernel_contributions).sum() > 0


def test_the_image_encoder_runs_the_sources_on_the_worker(matcher, image_work_threads, monkeypatch):
    """start_encode_image (the image side of retrieval's encoder): the image sources' work after the backbone on the
    worker with the overlap on, on the calling thread with it off; the same features."""
    monkeypatch.setattr(Prefetch, "collect", Prefetch.result)  # always the worker's run (taking back: tested below)
    pv, _ = matcher.processor.images([str(EXAMPLES / "coffee.jpg")])
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(OVERLAP_ENV, mode)
        image_work_threads.clear()
        with torch.inference_mode():
            got[mode] = matcher.model.start_encode_image(pv).collect()
        assert [name.startswith(WORKER) for name in image_work_threads] == [mode == "on"] * 2, image_work_threads
    for name, feats in got["off"].sources.items():
        for key, value in feats.items():
            assert torch.equal(got["on"].sources[name][key], value), (name, key)


def test_a_busy_worker_never_makes_the_call_wait(matcher, image_work_threads, monkeypatch):
    """The worker held by another call's job: the caller runs its own queued jobs (detectors and image sources)
    itself, and the scores are those of the overlap off."""
    photo = str(EXAMPLES / "astronaut.jpg")
    monkeypatch.setenv(OVERLAP_ENV, "off")
    expected = matcher.score([photo], CAPTIONS)
    monkeypatch.setenv(OVERLAP_ENV, "on")
    image_work_threads.clear()
    release = threading.Event()
    blocker = start(release.wait, 120)
    try:
        got = matcher.score([photo], CAPTIONS)  # would hang for two minutes if it waited for the worker
        with pytest.raises(TimeoutError):
            blocker.result(timeout=0)  # still held: everything ran here
    finally:
        release.set()
    assert blocker.result(timeout=60)
    assert image_work_threads == [threading.current_thread().name] * 2
    np.testing.assert_array_equal(got.similarity, expected.similarity)
    np.testing.assert_array_equal(got.kernel_contributions, expected.kernel_contributions)


def test_collect_runs_unstarted_work_here(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "on")
    release = threading.Event()
    blocker = start(release.wait, 60)
    try:
        queued = start(threading.current_thread)
        failing = start(int, "not a number")
        assert queued.collect() is threading.current_thread()  # not started: ran here
        assert queued.result() is threading.current_thread()  # and kept
        with pytest.raises(ValueError, match="not a number"):
            failing.collect()
    finally:
        release.set()
    assert blocker.result(timeout=60)
    ran = start(threading.current_thread)
    ran.result(timeout=30)
    assert ran.collect().name.startswith(WORKER)  # done on the worker: its result


def test_several_images_and_several_batches_score_alike(matcher, monkeypatch):
    """More images than one batch take encode_images's path; one batch the overlapped one: the same scores."""
    monkeypatch.setenv(OVERLAP_ENV, "on")
    photos = [str(EXAMPLES / p) for p in PHOTOS[:3]]
    one_batch = matcher.score(photos, CAPTIONS)
    batches = matcher.score(photos, CAPTIONS, batch_size=2)
    np.testing.assert_allclose(one_batch.similarity, batches.similarity, atol=1e-6)
    np.testing.assert_allclose(one_batch.kernel_contributions, batches.kernel_contributions, atol=1e-6)


def test_encode_image_equals_its_two_steps(matcher, monkeypatch):
    """encode_image (everything on the calling thread) and start_encode_image(...).result() (the sources on the
    worker) give the same features; with gradients recorded the sources run on the calling thread."""
    model = matcher.model
    pv, _ = matcher.processor.images([str(EXAMPLES / "astronaut.jpg")])
    monkeypatch.setenv(OVERLAP_ENV, "on")
    with torch.inference_mode():
        direct = model.encode_image(pv)
        job = model.start_encode_image(pv)
        later = job.result(timeout=120)
    for name, feats in direct.sources.items():
        for key, value in feats.items():
            assert torch.equal(later.sources[name][key], value), (name, key)
    seen: list[str] = []
    original = ConceptBridge.encode_image

    def recorded(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(ConceptBridge, "encode_image", recorded)
    with torch.enable_grad():
        graded = model.start_encode_image(pv).result(timeout=120)
    assert seen == [threading.current_thread().name]
    assert torch.allclose(graded.sources["concept"]["concept"].detach(), direct.sources["concept"]["concept"])


def test_start_torch_brings_the_callers_thread_count_and_mode(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "on")

    def state():
        return (
            threading.current_thread().name,
            torch.get_num_threads(),
            torch.is_inference_mode_enabled(),
            torch.is_grad_enabled(),
        )

    before = torch.get_num_threads()
    try:
        start(torch.set_num_threads, 2).result(timeout=30)  # the worker thread's own count differs from the call's
        with inference_threads(1):
            with torch.inference_mode():
                name, threads, inference, grad = start_torch(state).result(timeout=30)
            assert name.startswith(WORKER) and (threads, inference, grad) == (1, True, False)
            with torch.no_grad():
                name, threads, inference, grad = start_torch(state).result(timeout=30)
            assert name.startswith(WORKER) and (threads, inference, grad) == (1, False, False)
            name, threads, _, grad = start_torch(state).result(timeout=30)  # recording gradients: here, now
            assert name == threading.current_thread().name and grad
            name, threads, inference, grad = start_torch(state, graph=False).result(timeout=30)  # no graph wanted
            assert name.startswith(WORKER) and (threads, inference, grad) == (1, False, False)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv(OVERLAP_ENV, "off")
    with torch.inference_mode():
        assert start_torch(state).result()[0] == threading.current_thread().name  # off: here, now


@pytest.mark.parametrize("mode", ["on", "off"])
def test_an_error_after_the_backbone_reaches_the_caller_unchanged(matcher, monkeypatch, mode):
    monkeypatch.setenv(OVERLAP_ENV, mode)
    error = RuntimeError("the words' cells failed")
    raised_on: list[str] = []

    def broken(*args, **kwargs):
        raised_on.append(threading.current_thread().name)
        raise error

    with monkeypatch.context() as m:  # the scene-text source's features come after the pair passes, on the worker
        m.setattr(SceneTextReader, "features", broken)
        m.setattr(Prefetch, "collect", Prefetch.result)  # the worker runs each job (taking back: tested above)
        with pytest.raises(RuntimeError, match="the words' cells failed") as info:
            matcher.score([str(EXAMPLES / "cat.jpg")], CAPTIONS)
    assert info.value is error
    assert raised_on and raised_on[0].startswith(WORKER) == (mode == "on")
    r = matcher.score([str(EXAMPLES / "cat.jpg")], CAPTIONS)  # the worker still serves the next call
    assert np.isfinite(r.similarity).all()


def test_auto_does_not_count_its_own_busy_worker(tmp_path, monkeypatch):
    """A second start within a call (the worker running the first) must not read the worker as another job."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 2/300 12345\n")  # two runnable: the caller and one more
    monkeypatch.setattr(overlap, "LOADAVG", str(loadavg))
    monkeypatch.setattr(overlap, "_usable_cpus", lambda: 2)
    monkeypatch.delenv(OVERLAP_ENV, raising=False)
    monkeypatch.setattr(overlap, "_busy", 0)
    assert overlap._others_running() == 1 and overlap.overlap_enabled() is False  # another job holds the core
    monkeypatch.setattr(overlap, "_busy", 1)
    assert overlap._others_running() == 0 and overlap.overlap_enabled() is True  # that job is this worker
    monkeypatch.setattr(overlap, "_busy", 0)
    monkeypatch.setenv(OVERLAP_ENV, "on")
    assert start(lambda: overlap._busy).result(timeout=30) == 1  # marked while it runs
    assert overlap._busy == 0  # and no longer once it ran


def test_the_synset_cosines_split_with_the_worker(matcher, monkeypatch):
    """Half the WordNet product on the worker when it is free, both halves here when it is busy: the same numbers as
    one product, and a busy worker never makes the caller wait."""
    concept = matcher.model.sources["concept"]
    if not concept.expands:
        pytest.skip("the photo checkpoint has no WordNet expansion")
    sentence = torch.nn.functional.normalize(torch.randn(5, concept.class_text.shape[1]), dim=-1)
    with torch.inference_mode():
        plain = sentence @ concept._synset_matrix().T
        monkeypatch.setenv(OVERLAP_ENV, "off")
        off = concept._synset_cosines(sentence)
        monkeypatch.setenv(OVERLAP_ENV, "on")
        on = concept._synset_cosines(sentence)
        release = threading.Event()
        blocker = start(release.wait, 60)  # the worker is busy with another call's job
        try:
            busy = concept._synset_cosines(sentence)  # returns without waiting for the blocker
            with pytest.raises(TimeoutError):
                blocker.result(timeout=0)  # still running: the caller did not wait for it
        finally:
            release.set()
        assert blocker.result(timeout=60)
    assert torch.equal(on, off) and torch.equal(busy, off)
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
