"""Concurrent Match requests served by one model call: their images and captions are stacked and scored together.

No Gradio here: the tabs take the events' concurrency from :func:`event_concurrency`, the handlers call
:func:`score` instead of ``Matcher.score`` and hold :func:`exclusive` around their other model calls.

Decisions:

- One model call at a time, as before: every model call of the demo (a batch of Match requests, an explanation, a
  score matrix, a search) holds :data:`MODEL_LOCK`. What a request does besides (decoding its upload, drawing its
  figure, gradio's own work) runs in its own thread, beside the model call of others; that is why Match events get
  a concurrency limit of :data:`MAX_BATCH` instead of the shared "model" slot's 1.
- A batch forms while the model is busy, and, once it is free, for at most :data:`MAX_WAIT_S` (5 ms) after the
  batch's first request: a lone request on an idle demo waits 5 ms at most. :data:`MAX_BATCH` (16, the queue's
  size) requests per call at most; the requests of one checkpoint only (another checkpoint's wait for the next).
- A batch encodes its images in one call and its captions in one call, then scores each request's image against its
  own captions only (per-request blocks: k requests of n captions cost k x n pairs, not k x kn). A batch of one is
  ``Matcher.score`` itself. Larger batches give the one-by-one numbers up to float32 rounding of the larger matrix
  products (about 2e-7 measured on the examples; the demo shows 6 decimals), and the same rankings.
- A failing batch (say, one request's caption has nothing the tokenizer can read) is run again one request at a
  time, so each request gets its own result or its own error.
- ``MKLVISITA_BATCHING=off`` (read when the page is built) serves Match one request at a time in the shared
  "model" slot and draws every Match figure again (``demo.match`` otherwise keeps the figures of its cached
  results), as the demo served before; ``benchmarks/demo_load.py --compare`` measures both.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mklvisita import Matcher
from mklvisita.matcher import ScoreResult
from mklvisita.ranking import final_score, resolve_ranking
from mklvisita.retrieval import encode_captions, encode_images, match_pairs
from mklvisita.threads import inference_threads

MAX_BATCH = 16  # requests per model call at most (the demo's queue holds 16)
MAX_WAIT_S = 0.005  # how long an idle model waits for a batch to fill after its first request
BATCHING_ENV = "MKLVISITA_BATCHING"  # "off" (or 0, false, no): one request at a time, as before
MODEL_LOCK = threading.Lock()  # one model call at a time, across checkpoints


def enabled() -> bool:
    """Whether Match requests are batched (``$MKLVISITA_BATCHING`` not off)."""
    return os.environ.get(BATCHING_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def event_concurrency() -> dict[str, Any]:
    """Gradio event settings for the Match event: many at once when batching (they meet in the batcher), else the
    shared one-at-a-time "model" slot."""
    if enabled():
        return {"concurrency_id": "batched", "concurrency_limit": MAX_BATCH}
    return {"concurrency_id": "model", "concurrency_limit": 1}


@contextmanager
def exclusive() -> Iterator[None]:
    """Hold the model for a call that is not batched (explain, matrix, search)."""
    with MODEL_LOCK:
        yield


def score_blocks(matcher: Matcher, requests: Sequence[tuple[Any, Sequence[str]]]) -> list[ScoreResult]:
    """Score several (image, captions) requests in one pass: images encoded together, captions encoded together,
    each image scored against its own captions only; with the Matcher's CPU threads (``mklvisita.threads``), as
    ``Matcher.score`` runs.

    Returns:
        One ScoreResult per request, shaped (1, n_captions) like ``matcher.score([image], captions)``.
    """
    with inference_threads(getattr(matcher, "threads", None)):
        return _score_blocks(matcher, requests)


def _score_blocks(matcher: Matcher, requests: Sequence[tuple[Any, Sequence[str]]]) -> list[ScoreResult]:
    model, processor = matcher.model, matcher.processor
    captions = [c for _, cs in requests for c in cs]
    images = encode_images(model, processor, [image for image, _ in requests])
    texts = encode_captions(model, processor, captions)
    ranking = resolve_ranking(matcher)  # the checkpoint's rule (mklvisita.ranking, its one owner)
    out, start = [], 0
    for k, (_, cs) in enumerate(requests):
        end = start + len(cs)
        with torch.inference_mode():
            own = texts.embeddings.select(slice(start, end))  # this request's captions only
            sim = model.similarity(images.embeddings.select(slice(k, k + 1)), own)
            contrib = sim.contributions.float().cpu().numpy()  # (1, n, n_kernels)
            similarity = sim.similarity.float().cpu().numpy()  # (1, n)
        if model.has_itm:
            ii, tt = torch.full((end - start,), k), torch.arange(start, end)
            itm = match_pairs(model, images, texts, ii, tt).view(1, -1).numpy()
            final = final_score(ranking, itm, similarity)
        else:
            itm = np.full_like(similarity, np.nan)
            final = final_score(ranking, None, similarity)
        out.append(ScoreResult(itm, similarity, contrib, model.kernel_names, final))
        start = end
    return out


@dataclass
class _Job:
    matcher: Matcher
    image: Image.Image | Any
    captions: list[str]
    arrived: float = field(default_factory=time.monotonic)
    done: bool = False
    result: ScoreResult | None = None
    error: BaseException | None = None


class Batcher:
    """Collects concurrent score requests and runs them as one model call (see the module's decisions).

    Args:
        max_batch: requests per model call at most.
        max_wait: seconds an idle model waits for more requests after a batch's first one.
        lock: the lock every model call holds (:data:`MODEL_LOCK`).
    """

    def __init__(self, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT_S, lock: Any = MODEL_LOCK) -> None:
        self.max_batch = max(1, int(max_batch))
        self.max_wait = float(max_wait)
        self.lock = lock
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._leading = False  # a thread is collecting or running a batch
        self.batch_sizes: Counter[int] = Counter()  # model calls by batch size (for tests and the log)

    def score(self, matcher: Matcher, image: Any, captions: Sequence[str]) -> ScoreResult:
        """``matcher.score([image], captions)``, computed in one model call with the requests that arrive with it."""
        job = _Job(matcher, image, list(captions))
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        while True:
            with self._cond:
                while self._leading and not job.done:
                    self._cond.wait()
                if job.done:
                    break
                self._leading = True  # this thread runs the next batch (its own job may or may not be in it)
            try:
                self._lead()
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _lead(self) -> None:
        with self.lock:  # waiting for the model is time in which a batch fills
            with self._cond:
                deadline = self._queue[0].arrived + self.max_wait
                while len(self._queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                first = self._queue[0].matcher
                batch = [j for j in self._queue if j.matcher is first][: self.max_batch]
                self._queue = [j for j in self._queue if not any(j is b for b in batch)]
            self.batch_sizes[len(batch)] += 1
            try:
                self._run(batch)
            except BaseException as e:  # a fault outside any one request: every request of the batch sees it
                for job in batch:
                    if not job.done:
                        job.error, job.done = e, True
                raise

    def _run(self, batch: list[_Job]) -> None:
        if len(batch) > 1:
            try:
                results = score_blocks(batch[0].matcher, [(j.image, j.captions) for j in batch])
            except Exception:  # one request's bad input: each one alone, each with its own answer
                pass
            else:
                for job, result in zip(batch, results):
                    job.result, job.done = result, True
                return
        for job in batch:
            try:
                job.result = job.matcher.score([job.image], job.captions)
            except Exception as e:
                job.error = e
            job.done = True


BATCHER = Batcher()  # the demo's: every Match request of the process goes through it


def score(matcher: Matcher, image: Any, captions: Sequence[str]) -> ScoreResult:
    """The Match handler's model call: batched with concurrent requests (or alone, holding the model, when batching
    is off)."""
    if not enabled():
        with exclusive():
            return matcher.score([image], captions)
    return BATCHER.score(matcher, image, captions)
