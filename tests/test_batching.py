"""demo.batching: concurrent Match requests scored in one model call give the numbers one-by-one calls give; a bad
request in a batch gets its own error and the others their results; the toggle restores one-at-a-time serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from demo import batching
from mklvisita import Matcher
from mklvisita.inputs import InvalidCaptionError, load_image

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
REQUESTS = [  # (image, captions), different caption counts and lengths (the batch pads captions to the longest)
    ("cat.jpg", ["a cat", "a dog", "a cup of coffee"]),
    ("coffee.jpg", ["a cup of coffee on a saucer", "a rocket"]),
    ("rocket.jpg", ["a rocket taking off from a launch pad at night", "an astronaut", "a cat", "a red star"]),
    ("shapes_004.png", ["a large purple cross and a yellow star", "a small red circle"]),
]
FIELDS = ("itm", "similarity", "kernel_contributions", "score")


@pytest.fixture(scope="module", params=["shapes", "photo"])
def matcher(request) -> Matcher:  # shapes has the ITM head, photo the fixed sources (colour, faces, scene text)
    return Matcher.default(request.param)


def _concurrently(batcher: batching.Batcher, matcher: Matcher, requests: list) -> list:
    """Every request from its own thread, all released at once; each thread's result or exception."""
    out: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def work(i: int) -> None:
        image, captions = requests[i]
        barrier.wait()
        try:
            out[i] = batcher.score(matcher, image, captions)
        except Exception as e:  # judged by the test
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    return out


def _loaded(requests: list) -> list:
    return [(load_image(EXAMPLES / name), captions) for name, captions in requests]


def test_one_batch_gives_the_one_by_one_numbers(matcher):
    requests = _loaded(REQUESTS * 2)
    # max_wait long enough that all eight threads join the first batch, whatever the machine's load
    batcher = batching.Batcher(max_batch=len(requests), max_wait=30.0)
    results = _concurrently(batcher, matcher, requests)
    assert batcher.batch_sizes == {len(requests): 1}  # one model call served them all
    for (image, captions), got in zip(requests, results):
        alone = matcher.score([image], captions)
        assert not isinstance(got, Exception), got
        assert got.kernel_names == alone.kernel_names
        for name in FIELDS:
            a, b = getattr(got, name), getattr(alone, name)
            assert (
                a.shape
                == b.shape
                == ((1, len(captions), len(alone.kernel_names)) if name[0] == "k" else (1, len(captions)))
            )
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, equal_nan=True, err_msg=name)
        assert np.argsort(-got.score[0], kind="stable").tolist() == np.argsort(-alone.score[0], kind="stable").tolist()


def test_a_lone_request_is_matcher_score_itself(matcher):
    image, captions = _loaded(REQUESTS[:1])[0]
    batcher = batching.Batcher(max_wait=0.0)
    got, alone = batcher.score(matcher, image, captions), matcher.score([image], captions)
    assert batcher.batch_sizes == {1: 1}
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(alone, name), err_msg=name)


def test_a_bad_request_gets_its_own_error_and_the_others_their_results(matcher):
    requests = _loaded(REQUESTS[:3])
    requests.insert(1, (requests[0][0], ["a cat", "\u200b\u200b"]))  # nothing the tokenizer can read
    batcher = batching.Batcher(max_batch=len(requests), max_wait=30.0)
    results = _concurrently(batcher, matcher, requests)
    assert isinstance(results[1], InvalidCaptionError) and "caption 2" in str(results[1])
    for i in (0, 2, 3):
        image, captions = requests[i]
        assert not isinstance(results[i], Exception), results[i]
        np.testing.assert_allclose(results[i].similarity, matcher.score([image], captions).similarity, atol=1e-5)


def test_captions_a_batch_has_seen_are_not_encoded_again(matcher, monkeypatch):
    """demo.batching keeps encoded captions per checkpoint (least recently used out); a batch that reuses them gives
    the one-by-one numbers all the same."""
    cache = batching.CaptionCache(capacity=4)
    monkeypatch.setattr(batching, "CAPTIONS", cache)
    requests = _loaded(REQUESTS[:2])  # 3 + 2 captions, all different
    batching.score_blocks(matcher, requests)
    assert cache.encoded == 5  # the first kept caption ("a cat") is out again: 4 kept
    swapped = [(requests[0][0], requests[1][1]), (requests[1][0], requests[0][1] + ["a cat"])]
    results = batching.score_blocks(matcher, swapped)
    assert cache.encoded == 6  # only "a cat" again (once, though the batch has it twice)
    for (image, captions), got in zip(swapped, results):
        alone = matcher.score([image], captions)
        for name in FIELDS:
            np.testing.assert_allclose(getattr(got, name), getattr(alone, name), atol=1e-5, equal_nan=True)


def test_batches_hold_the_model_lock_and_wait_for_it(monkeypatch):
    """While another model call (an explanation, say) holds the lock, Match requests queue and then go in one call."""
    lock = threading.Lock()
    batcher = batching.Batcher(max_batch=4, max_wait=0.0, lock=lock)
    calls: list[list[int]] = []

    def blocks(matcher, requests):  # no model: each request's caption count, with the lock held
        assert lock.locked()
        calls.append([len(c) for _, c in requests])
        return [len(c) for _, c in requests]

    monkeypatch.setattr(batching, "score_blocks", blocks)
    stub = object()  # one checkpoint for all four
    results: dict[int, int] = {}
    with lock:  # the model is busy: all four requests arrive meanwhile
        threads = [
            threading.Thread(target=lambda i=i: results.update({i: batcher.score(stub, None, ["x"] * (i + 1))}))
            for i in range(4)
        ]
        [t.start() for t in threads]
        while len(batcher._queue) < 4:  # until every request waits in the queue
            time.sleep(0.01)
    [t.join(30) for t in threads]
    assert batcher.batch_sizes == {4: 1} and sorted(calls[0]) == [1, 2, 3, 4]
    assert results == {i: i + 1 for i in range(4)}  # each request got its own answer


def test_the_toggle(monkeypatch):
    monkeypatch.delenv(batching.BATCHING_ENV, raising=False)
    assert batching.enabled() and batching.event_concurrency()["concurrency_limit"] == batching.MAX_BATCH
    monkeypatch.setenv(batching.BATCHING_ENV, "off")
    assert not batching.enabled()
    assert batching.event_concurrency() == {"concurrency_id": "model", "concurrency_limit": 1}


def test_a_repeated_match_draws_its_figure_once(monkeypatch):
    """demo.match keeps the figure beside its cached numbers (batching on); with batching off it draws every time."""
    from demo import match as match_tab
    from demo.registry import ResultCache

    matcher = Matcher.default("photo")
    drawn = []
    draw = match_tab.contributions_figure
    monkeypatch.setattr(match_tab, "contributions_figure", lambda *a: drawn.append(1) or draw(*a))
    image, captions = EXAMPLES / "cat.jpg", "a cat\na dog"
    monkeypatch.delenv(batching.BATCHING_ENV, raising=False)
    cache = ResultCache()
    first, second = (match_tab.match(matcher, image, captions, cache) for _ in range(2))
    assert len(drawn) == 1 and first.figure is not second.figure  # each caller its own copy
    assert np.array_equal(np.asarray(first.figure), np.asarray(second.figure))
    monkeypatch.setenv(batching.BATCHING_ENV, "off")
    match_tab.match(matcher, image, captions, cache)
    assert len(drawn) == 2


# ---------------------------------------------------------------------------------------------- search batching
QUERIES = [  # (text, top_k): different lengths (the batch pads them to the longest) and depths
    ("a cat", 3),
    ("a cup of coffee on a saucer", 4),
    ("a rocket taking off from a launch pad at night", 2),
    ("a large purple cross and a yellow star", 4),
    ("an astronaut", 1),
]


def _searched(batcher: batching.Batcher, matcher: Matcher, index, queries: list) -> list:
    """Every query from its own thread, all released at once; each thread's result or exception."""
    out: list = [None] * len(queries)
    barrier = threading.Barrier(len(queries))

    def work(i: int) -> None:
        text, top_k = queries[i]
        barrier.wait()
        try:
            out[i] = batcher.search_images(matcher, index, text, top_k)
        except Exception as e:  # judged by the test
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(queries))]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    return out


@pytest.fixture(scope="module")
def gallery(matcher):
    names = ["cat.jpg", "coffee.jpg", "rocket.jpg", "shapes_004.png"]
    return matcher.index_images([load_image(EXAMPLES / n) for n in names])


def test_concurrent_searches_are_one_model_call_with_the_one_by_one_rankings(matcher, gallery):
    batcher = batching.Batcher(max_batch=len(QUERIES), max_wait=30.0)
    results = _searched(batcher, matcher, gallery, QUERIES)
    assert batcher.batch_sizes == {len(QUERIES): 1}  # one model call served them all
    for (text, top_k), got in zip(QUERIES, results):
        alone = matcher.search_images(gallery, text, top_k=top_k)
        assert not isinstance(got, Exception), got
        assert got.indices == alone.indices and len(got.indices) == top_k
        for name in ("scores", "itm", "similarity"):
            np.testing.assert_allclose(getattr(got, name), getattr(alone, name), rtol=0, atol=1e-5, err_msg=name)
        assert got.pairs == alone.pairs and set(got.timings) == set(alone.timings)


def test_a_bad_query_gets_its_own_error_and_the_others_their_results(matcher, gallery):
    queries = [QUERIES[0], ("\u200b\u200b", 3), QUERIES[1], ("a cat", 0)]  # nothing to read; top_k below 1
    batcher = batching.Batcher(max_batch=len(queries), max_wait=30.0)
    results = _searched(batcher, matcher, gallery, queries)
    assert isinstance(results[1], InvalidCaptionError) and isinstance(results[3], ValueError)
    assert "top_k" in str(results[3])
    for i in (0, 2):
        text, top_k = queries[i]
        assert not isinstance(results[i], Exception), results[i]
        assert results[i].indices == matcher.search_images(gallery, text, top_k=top_k).indices


def test_match_and_search_requests_and_two_indexes_never_share_a_call(monkeypatch):
    """A batch holds one kind of request: Match requests of one checkpoint, or text queries over one index."""
    lock = threading.Lock()
    batcher = batching.Batcher(max_batch=8, max_wait=0.0, lock=lock)
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(batching, "score_blocks", lambda m, reqs: calls.append(("score", len(reqs))) or reqs)
    monkeypatch.setattr(
        batching,
        "search_images_many",
        lambda m, index, queries: calls.append((f"search {index}", len(queries))) or queries,
    )

    class Alone:  # a batch of one is the Matcher's own call
        def score(self, images, captions):
            return calls.append(("score", 1)) or captions

        def search_images(self, index, text, top_k):
            return calls.append((f"search {index}", 1)) or text

    matcher = Alone()
    one, two = batching.ImageIndex(None, 1), batching.ImageIndex(None, 2)
    jobs = [
        lambda: batcher.score(matcher, None, ["x"]),
        lambda: batcher.search_images(matcher, one, "q", 1),
        lambda: batcher.score(matcher, None, ["y"]),
        lambda: batcher.search_images(matcher, two, "q", 1),
        lambda: batcher.search_images(matcher, one, "r", 1),
    ]
    with lock:  # the model is busy: every request arrives meanwhile
        threads = [threading.Thread(target=job) for job in jobs]
        [t.start() for t in threads]
        while len(batcher._queue) < len(jobs):
            time.sleep(0.01)
    [t.join(30) for t in threads]
    assert sorted(calls) == sorted([("score", 2), (f"search {one}", 2), (f"search {two}", 1)])


def test_search_with_batching_off_is_matcher_search_itself(matcher, gallery, monkeypatch):
    monkeypatch.setenv(batching.BATCHING_ENV, "off")
    got = batching.search_images(matcher, gallery, "a cat", 2)
    alone = matcher.search_images(gallery, "a cat", top_k=2)
    assert got.indices == alone.indices and got.scores == alone.scores
