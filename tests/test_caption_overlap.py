"""A score's captions on the overlap worker beside the image backbone (Matcher.score), the image sources' work taken
back by the caller while the worker is busy (Prefetch.claim, MKLVisITA.start_match_image): identical scores with the
overlap on and off, each detector where the schedule puts it, and errors where they belong."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mklvisita import Matcher
from mklvisita.inputs import InvalidCaptionError, InvalidImageError
from mklvisita.sources import overlap
from mklvisita.sources.overlap import OVERLAP_ENV, Prefetch, done, start, usable_cpus
from tests.overlap_fixtures import CAPTIONS, EXAMPLES, SIGN, WORKER, photo_matcher


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return photo_matcher()


def _photos() -> list[str]:
    return [str(EXAMPLES / "astronaut.jpg"), str(EXAMPLES / "cat.jpg")] + ([str(SIGN)] if SIGN.is_file() else [])


def _recorded(monkeypatch, owner, name: str, seen: list[str], then=None) -> None:
    """Record the thread ``owner.name`` runs on in ``seen`` (and call ``then`` after it ran)."""
    original = getattr(owner, name)

    def run(*args, **kwargs):
        seen.append(threading.current_thread().name)
        out = original(*args, **kwargs)
        if then is not None:
            then()
        return out

    monkeypatch.setattr(owner, name, run)


@pytest.mark.parametrize("photo", _photos(), ids=lambda p: Path(p).name)
def test_overlap_on_and_off_score_identically(matcher, monkeypatch, photo):
    """The schedule as it runs (the caller taking work back from the busy worker) against every function run on the
    calling thread: every number the same, bit for bit."""
    results = {}
    for mode in ("off", "on", "on"):
        monkeypatch.setenv(OVERLAP_ENV, mode)
        results.setdefault(mode, []).append(matcher.score([photo], CAPTIONS))
    off = results["off"][0]
    for on in results["on"]:
        for field in ("itm", "similarity", "kernel_contributions", "score"):
            np.testing.assert_array_equal(getattr(on, field), getattr(off, field), err_msg=field)
    assert np.isfinite(off.itm).all() and np.abs(off.kernel_contributions).sum() > 0


@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_captions_encode_on_the_worker_beside_the_image_backbone(matcher, monkeypatch, mode):
    monkeypatch.setenv(OVERLAP_ENV, mode)
    monkeypatch.setattr(Prefetch, "collect", Prefetch.result)  # always the worker's run (taking back: below)
    text, image = [], []
    _recorded(monkeypatch, matcher.model.text, "forward", text)
    _recorded(monkeypatch, matcher.model.vision, "forward", image)
    matcher.score([str(EXAMPLES / "cat.jpg")], CAPTIONS)
    assert image == [threading.current_thread().name]  # the image backbone: always the calling thread
    assert len(text) == 1 and text[0].startswith(WORKER) == (mode == "on")


@pytest.mark.skipif(usable_cpus() < 2, reason="one CPU: nothing to share")
def test_the_caller_takes_the_last_detector_the_busy_worker_has_not_started(matcher, monkeypatch):
    """The worker held (as by a score's captions) while the backbone runs: start_match_image computes the sources that
    start no detector (the concept bridge, colour naming) and the fusion's image side here, the detectors still
    queued; collecting the other sources, the caller runs the last queued detector (faces) itself and leaves the
    first (text) to the worker, which it releases from inside the face detector; the features equal those of
    encode_image with the overlap off."""
    monkeypatch.setenv(OVERLAP_ENV, "on")
    sources = matcher.model.sources
    caller = threading.current_thread().name
    faces, text, fusion = [], [], []
    release, text_started = threading.Event(), threading.Event()

    def free_the_worker() -> None:  # inside the caller's face detector: let the worker go, wait until it reads text
        release.set()
        assert text_started.wait(60)

    _recorded(monkeypatch, sources["person"].detector, "detect", faces, then=free_the_worker)
    original = sources["scene_text"].reader.read_images

    def read(*args, **kwargs):
        text.append(threading.current_thread().name)
        text_started.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(sources["scene_text"].reader, "read_images", read)
    _recorded(monkeypatch, type(matcher.model), "prepare_fusion_image", fusion)
    pv, _ = matcher.processor.images([str(EXAMPLES / "astronaut.jpg")])
    with torch.inference_mode():
        blocker = start(release.wait, 120)
        started = matcher.model.start_match_image(pv)
        assert fusion == [caller] and not faces and not text  # the detectors wait behind the held worker
        assert list(started.early.sources) == ["concept", "colour"]
        got = started.sources.collect()
        assert blocker.result(timeout=60)
        monkeypatch.setenv(OVERLAP_ENV, "off")
        expected = matcher.model.encode_image(pv)
    assert faces[0] == caller and text[0].startswith(WORKER)
    for name, feats in expected.sources.items():
        for key, value in feats.items():
            assert torch.equal(got.sources[name][key], value), (name, key)
            if name in started.early.sources:
                assert torch.equal(started.early.sources[name][key], value), (name, key)


def test_claim_runs_unstarted_work_here_and_leaves_the_rest(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "on")
    release, running = threading.Event(), threading.Event()
    blocker = start(lambda: running.set() or release.wait(60))
    try:
        queued = start(threading.current_thread)
        failing = start(int, "not a number")
        assert running.wait(30)
        assert blocker.claim() is False  # running on the worker: left there
        assert queued.claim() is True and queued.result(timeout=0) is threading.current_thread()  # ran here
        assert queued.claim() is False  # once
        assert failing.claim() is True  # its error is kept for collect
        with pytest.raises(ValueError, match="not a number"):
            failing.collect()
    finally:
        release.set()
    assert blocker.result(timeout=60)
    assert done(3).claim() is False and done(3).collect() == 3


@pytest.mark.parametrize("mode", ["on", "off"])
def test_bad_inputs_fail_before_any_work_starts_and_the_worker_serves_the_next_call(matcher, monkeypatch, mode):
    monkeypatch.setenv(OVERLAP_ENV, mode)
    text = []
    _recorded(monkeypatch, matcher.model.text, "forward", text)
    with pytest.raises(InvalidCaptionError, match="empty"):
        matcher.score([str(EXAMPLES / "cat.jpg")], ["a cat", "   "])
    with pytest.raises(InvalidImageError):  # a bad image is reported before a bad caption
        matcher.score([str(EXAMPLES / "no-such-photo.jpg")], ["   "])
    with pytest.raises(InvalidCaptionError, match="no words"):  # found by the tokenizer, in the captions' job
        matcher.score([str(EXAMPLES / "cat.jpg")], ["a cat", "\u200b"])
    assert text == []  # the text encoder never ran for a call that failed
    r = matcher.score([str(EXAMPLES / "cat.jpg")], CAPTIONS[:2])
    assert np.isfinite(r.score).all()


def test_auto_counts_the_worker_from_the_moment_a_job_is_started(tmp_path, monkeypatch):
    """A job counts as this process's from its start until it ran or was taken back, so the start that follows it
    (while the worker wakes for it) does not read the worker as another job; the count comes back to zero."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 2/300 12345\n")  # the caller and one more thread runnable
    monkeypatch.setattr(overlap, "LOADAVG", str(loadavg))
    monkeypatch.setattr(overlap, "_usable_cpus", lambda: 2)
    monkeypatch.delenv(OVERLAP_ENV, raising=False)  # auto
    assert overlap._busy == 0 and overlap.overlap_enabled() is False  # the other thread is another job's
    monkeypatch.setenv(OVERLAP_ENV, "on")
    release = threading.Event()
    blocker = start(release.wait, 60)
    try:
        queued, dropped = start(threading.current_thread), start(threading.current_thread)
        assert overlap._busy == 3  # counted before the worker runs them
        monkeypatch.delenv(OVERLAP_ENV)
        assert overlap.overlap_enabled() is True  # auto: the runnable thread is this process's worker
        assert queued.claim() and dropped.cancel() and dropped.cancel()  # dropped (and still dropped)
        assert overlap._busy == 1  # taken back and dropped, each once
    finally:
        release.set()
    assert blocker.result(timeout=60)
    assert overlap._busy == 0


def test_a_score_leaves_no_job_counted(matcher, monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "on")
    release = threading.Event()
    blocker = start(release.wait, 120)  # the worker held: the call takes its jobs back
    try:
        matcher.score([str(EXAMPLES / "astronaut.jpg")], CAPTIONS)
        assert overlap._busy == 1  # the blocker only
    finally:
        release.set()
    assert blocker.result(timeout=60)
    matcher.score([str(EXAMPLES / "astronaut.jpg")], CAPTIONS)  # the worker free: its jobs run there
    assert overlap._busy == 0


def test_auto_decides_once_per_score(matcher, monkeypatch):
    """auto, a core free when the call starts and none an instant later (as the call's own threads wake): the whole
    call keeps the first reading, every part where the overlap puts it; outside a call each start reads again."""
    readings = iter([0] + [5] * 1000)  # others running: none at the first reading, then five
    monkeypatch.setattr(overlap, "_others_running", lambda: next(readings))
    monkeypatch.setattr(overlap, "_usable_cpus", lambda: 2)
    monkeypatch.delenv(OVERLAP_ENV, raising=False)
    monkeypatch.setattr(Prefetch, "collect", Prefetch.result)  # always the worker's run (taking back: above)
    text, faces = [], []
    _recorded(monkeypatch, matcher.model.text, "forward", text)
    _recorded(monkeypatch, matcher.model.sources["person"].detector, "detect", faces)
    matcher.score([str(EXAMPLES / "cat.jpg")], CAPTIONS)
    assert text[0].startswith(WORKER) and faces[0].startswith(WORKER)
    assert start(threading.current_thread).result() is threading.current_thread()  # a later start: busy, here
