"""The inference thread policy: one thread per Matcher call by default, overridable, restored afterwards."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mklvisita.threads import DEFAULT_THREADS, THREADS_ENV, default_threads, inference_threads, parse_threads


@pytest.fixture
def two_threads():
    """torch at 2 threads before each test (torch's default on a 2-core machine), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_parse_threads() -> None:
    assert parse_threads("3") == 3 and parse_threads(2) == 2
    assert parse_threads("auto") is None and parse_threads("0") is None and parse_threads(None) is None
    for bad in ("-1", "two", "1.5", -2, 1.5, True):
        with pytest.raises(ValueError, match="whole number of threads"):
            parse_threads(bad)


def test_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert default_threads() == DEFAULT_THREADS == 1
    monkeypatch.setenv(THREADS_ENV, "2")
    assert default_threads() == 2
    monkeypatch.setenv(THREADS_ENV, "lots")
    with pytest.raises(ValueError, match=THREADS_ENV):
        default_threads()


def test_block_sets_and_restores(two_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    with inference_threads() as n:
        assert n == 1 == torch.get_num_threads()
        with inference_threads(2) as inner:  # a nested call keeps the outermost count
            assert inner == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with inference_threads("auto") as n:  # torch's own default: left alone
        assert n == 2
    with pytest.raises(RuntimeError), inference_threads(1):
        raise RuntimeError("a failing call")
    assert torch.get_num_threads() == 2  # restored after an exception too


def test_a_call_in_another_thread_leaves_this_one_alone(two_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    seen: dict[str, int] = {}
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        torch.set_num_threads(2)  # a worker thread at torch's default for this machine
        with inference_threads():
            seen["worker"] = torch.get_num_threads()
            inside.set()
            release.wait(10)
        seen["worker after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main during"] = torch.get_num_threads()
    with inference_threads(1):
        pass  # a call ending here must not restore anything under the worker's running call
    release.set()
    t.join(10)
    assert seen == {"worker": 1, "main during": 2, "worker after": 2}, seen
    assert torch.get_num_threads() == 2


def test_matcher_calls_run_under_the_policy(two_threads, matcher_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    seen: list[int] = []
    encode = matcher_tiny.model.encode_text

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return encode(*args, **kwargs)

    monkeypatch.setattr(matcher_tiny.model, "encode_text", spy)
    matcher_tiny.score([np.zeros((32, 32, 3), dtype=np.uint8)], ["a red circle"])
    matcher_tiny.threads = 2
    matcher_tiny.index_captions(["a blue square"])
    monkeypatch.setenv(THREADS_ENV, "2")
    matcher_tiny.threads = None
    matcher_tiny.index_captions(["a green triangle"])
    assert seen == [1, 2, 2], seen
    assert torch.get_num_threads() == 2  # restored after each call


@pytest.fixture(scope="module")
def matcher_tiny():
    from mklvisita import Matcher, MKLVisITA, MKLVisITAConfig

    torch.manual_seed(0)
    return Matcher(MKLVisITA(MKLVisITAConfig.tiny()))
