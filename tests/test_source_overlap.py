"""Sources' detectors beside the backbone (mklvisita.sources.overlap): the same scores as on the calling thread, the
worker's errors raised in the caller, and concurrent calls that finish."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mklvisita import Matcher
from mklvisita.sources import overlap
from mklvisita.sources.overlap import OVERLAP_ENV, Prefetch, overlap_enabled, start
from tests.overlap_fixtures import EXAMPLES, SIGN, WORKER, photo_matcher

CAPTIONS = ["an astronaut in an orange suit", "a woman smiling", "a give way sign", "a tabby cat lying on a rug"]


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return photo_matcher()


@pytest.fixture
def images() -> list[str]:
    """A photo with a face and, where Tux Paint is installed, a sign with words (else the cat)."""
    return [str(EXAMPLES / "astronaut.jpg"), str(SIGN if SIGN.is_file() else EXAMPLES / "cat.jpg")]


@pytest.fixture
def threads_seen(matcher, monkeypatch) -> dict[str, list[str]]:
    """The thread each detector ran on, per call (the detectors wrapped on this matcher's sources)."""
    seen: dict[str, list[str]] = {"faces": [], "text": []}
    detector, reader = matcher.model.sources["person"].detector, matcher.model.sources["scene_text"].reader

    def recorded(key, fn):
        def run(*args):
            seen[key].append(threading.current_thread().name)
            return fn(*args)

        return run

    monkeypatch.setattr(detector, "detect", recorded("faces", detector.detect))
    monkeypatch.setattr(reader, "read_images", recorded("text", reader.read_images))
    return seen


def _score(matcher: Matcher, images: list[str]) -> tuple[np.ndarray, np.ndarray]:
    r = matcher.score(images, CAPTIONS)
    return np.asarray(r.similarity), np.asarray(r.kernel_contributions)


def test_overlap_gives_the_sequential_scores(matcher, images, threads_seen, monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "off")
    sim_off, contrib_off = _score(matcher, images)
    assert threads_seen["faces"] == threads_seen["text"] == [threading.current_thread().name]
    monkeypatch.setenv(OVERLAP_ENV, "on")
    monkeypatch.setattr(Prefetch, "collect", Prefetch.result)  # the worker runs each job (taking back: its own tests)
    sim_on, contrib_on = _score(matcher, images)
    assert [n.startswith(WORKER) for n in threads_seen["faces"] + threads_seen["text"]] == [False, True] * 2
    np.testing.assert_array_equal(sim_on, sim_off)
    np.testing.assert_array_equal(contrib_on, contrib_off)
    # the detectors found something, so the comparison covers their features
    names = list(matcher.model.kernel_names)
    person = contrib_on[0, :, names.index("person/share")]
    assert person.max() > 0
    if SIGN.is_file():
        assert contrib_on[1, 2, names.index("scene_text/match")] > 0  # "a give way sign" matches the words read


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_detector_error_reaches_the_caller_unchanged(matcher, images, monkeypatch, mode):
    monkeypatch.setenv(OVERLAP_ENV, mode)
    detector = matcher.model.sources["person"].detector
    error = RuntimeError("cascade failed")
    raised_on: list[str] = []

    def broken(greys):
        raised_on.append(threading.current_thread().name)
        raise error

    with monkeypatch.context() as m:
        m.setattr(detector, "detect", broken)
        m.setattr(Prefetch, "collect", Prefetch.result)  # the worker runs each job (taking back: its own tests)
        with pytest.raises(RuntimeError, match="cascade failed") as info:
            matcher.score(images, CAPTIONS)
    assert info.value is error
    assert raised_on and raised_on[0].startswith(WORKER) == (mode == "on")
    sim, _ = _score(matcher, images)  # the worker still serves the next call
    assert np.isfinite(sim).all()


def test_concurrent_calls_finish_with_the_sequential_scores(matcher, images, monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "off")
    expected = [_score(matcher, [im])[0] for im in images]
    monkeypatch.setenv(OVERLAP_ENV, "on")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_score, matcher, [images[i % 2]]) for i in range(6)]
        results = [f.result(timeout=300)[0] for f in futures]  # a deadlock fails here instead of hanging
    for i, sim in enumerate(results):
        np.testing.assert_array_equal(sim, expected[i % 2])


def test_work_started_from_the_worker_runs_there(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "on")
    outer = start(lambda: (threading.current_thread(), start(threading.current_thread).result()))
    worker, inner = outer.result(timeout=30)  # with one worker, a queued inner job would never run
    assert worker is inner and worker.name.startswith(WORKER)


def test_the_switch(monkeypatch):
    for value, expected in [("on", True), ("1", True), ("OFF", False), ("0", False)]:
        monkeypatch.setenv(OVERLAP_ENV, value)
        assert overlap_enabled() is expected
    monkeypatch.delenv(OVERLAP_ENV)
    # auto: on only where a core is free now, besides the caller's
    monkeypatch.setattr(overlap, "_usable_cpus", lambda: 2)
    for others, expected in [(0, True), (1, False), (2, False), (None, True)]:
        monkeypatch.setattr(overlap, "_others_running", lambda n=others: n)
        assert overlap_enabled() is expected, others
    monkeypatch.setattr(overlap, "_usable_cpus", lambda: 1)
    monkeypatch.setattr(overlap, "_others_running", lambda: 0)
    assert overlap_enabled() is False
    monkeypatch.undo()
    monkeypatch.delenv(OVERLAP_ENV, raising=False)
    assert isinstance(overlap._others_running(), (int, type(None)))
    monkeypatch.setenv(OVERLAP_ENV, "sometimes")
    with pytest.raises(ValueError, match=OVERLAP_ENV):
        overlap_enabled()
    monkeypatch.setenv(OVERLAP_ENV, "off")
    assert start(threading.current_thread).result() is threading.current_thread()  # off: run here, now


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_its_own_worker(monkeypatch):
    monkeypatch.setenv(OVERLAP_ENV, "on")
    assert start(lambda: 1).result(timeout=30) == 1  # the parent's worker is running
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker thread is not here; a new one must serve it
        code = 1
        try:
            code = 0 if start(threading.current_thread).result(timeout=30).name.startswith(WORKER) else 1
        finally:
            os._exit(code)  # never return into the test runner
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
