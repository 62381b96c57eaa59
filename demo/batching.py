"""Concurrent Match and Search requests served by one model call: their images and captions are stacked together.

No Gradio here: the tabs take the events' concurrency from :func:`event_concurrency`, the handlers call
:func:`score` instead of ``Matcher.score`` and :func:`search_images` instead of ``Matcher.search_images``, and hold
:func:`exclusive` around their other model calls.

Decisions:

- One model call at a time: every model call of the demo (a batch of Match requests, an explanation, a
  score matrix, a search) holds :data:`MODEL_LOCK`. What a request does besides (decoding its upload, drawing its
  figure, gradio's own work) runs in its own thread, beside the model call of others; that is why Match and Search
  events get a concurrency limit of :data:`MAX_BATCH` instead of the shared "model" slot's 1.
- A batch forms while the model is busy, and, once it is free, for at most :data:`MAX_WAIT_S` (5 ms) after the
  batch's first request: a lone request on an idle demo waits 5 ms at most. :data:`MAX_BATCH` (16, the queue's
  size) requests per call at most; the requests of one checkpoint only (another checkpoint's wait for the next).
- A batch encodes its captions in one call and its images :data:`IMAGE_CHUNK` (2) at a time, then scores each
  request's image against its own captions only (per-request blocks: k requests of n captions cost k x n pairs, not
  k x kn). Two at a time because on a CPU a larger backbone pass costs more per image: the photo checkpoint's image
  side took 64, 62, 67, 70 and 85 ms of CPU per image in passes of 1, 2, 4, 8 and 16 (one thread, 16 example photos,
  the shared 2-core machine), its activations outgrowing the caches. Each chunk's sources run on the overlap worker
  beside the next chunk's backbone (``mklvisita.sources.overlap``, where a core is free). A batch of one is
  ``Matcher.score`` itself. Larger batches give the one-by-one numbers up to float32 rounding of the larger matrix
  products (about 2e-7 measured on the examples; the demo shows 6 decimals), and the same rankings.
- Captions a batched Match call has encoded are kept per checkpoint (:class:`CaptionCache`, the last 1,024): a
  visitor who tries several photos with the same captions, or the examples' captions, has them encoded once. A
  caption costs about 3 ms of CPU in a batch (15 ms alone), an image about 60 ms: a request of one new photo and
  three known captions saves about a tenth of its CPU. A kept caption gives the numbers of the batch that first
  encoded it, equal to a fresh encoding up to the same float32 rounding.
- Text queries over the same image index (the Search tab's text -> image, one gallery) batch together: their
  captions are encoded in one call (:func:`search_images_many`), then each query is ranked alone by the cascade
  ``Matcher.search_images`` runs (its ranking depth and its reading of the top k), so a batched query gets the
  one-by-one ranking, and its scores up to float32 rounding of the padded caption batch. A batch holds one kind of
  request, of one checkpoint (and one index); others wait for the next.
- A failing batch (say, one request's caption has nothing the tokenizer can read) is run again one request at a
  time, so each request gets its own result or its own error.
- ``MKLVISITA_BATCHING=off`` (read when the page is built) serves Match and Search one request at a time in the
  shared "model" slot and draws every Match figure again (``demo.match`` otherwise keeps the figures of its cached
  results); ``benchmarks/demo_load.py --compare`` measures both.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mklvisita import Matcher
from mklvisita.features import ImageFeatures, TextFeatures
from mklvisita.inputs import check_caption, check_whole_number
from mklvisita.kernels import KernelEmbeddings
from mklvisita.matcher import ImageIndex, ScoreResult, SearchResult
from mklvisita.ranking import final_score, resolve_ranking
from mklvisita.retrieval import ImageBank, TextBank, encode_captions, match_pairs, retrieve
from mklvisita.threads import inference_threads

MAX_BATCH = 16  # requests per model call at most (the demo's queue holds 16)
MAX_WAIT_S = 0.005  # how long an idle model waits for a batch to fill after its first request
IMAGE_CHUNK = 2  # images per backbone pass inside a batch (CPU: larger passes cost more per image, see decisions)
CAPTION_CACHE_ENTRIES = 1024  # encoded captions kept per checkpoint for batched Match calls (a few kB each)
BATCHING_ENV = "MKLVISITA_BATCHING"  # "off" (or 0, false, no): one request at a time, as before
MODEL_LOCK = threading.Lock()  # one model call at a time, across checkpoints


def enabled() -> bool:
    """Whether Match requests are batched (``$MKLVISITA_BATCHING`` not off)."""
    return os.environ.get(BATCHING_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def event_concurrency() -> dict[str, Any]:
    """Gradio event settings for the Match and Search events: many at once when batching (they meet in the
    batcher), else the shared one-at-a-time "model" slot."""
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


class CaptionCache:
    """Each checkpoint's most recent captions, encoded (one row of a TextBank each), so that a caption a batch has
    seen is not encoded again (see the module's decisions). Thread-safe; dropped with its Matcher.

    Args:
        capacity: captions kept per checkpoint, least recently used first out.
    """

    def __init__(self, capacity: int = CAPTION_CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self._rows: weakref.WeakKeyDictionary[Matcher, OrderedDict[str, TextBank]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.encoded = 0  # captions encoded so far (for tests)

    def bank(self, matcher: Matcher, captions: Sequence[str]) -> TextBank:
        """The TextBank of ``captions`` (as ``encode_captions`` gives it, up to padding): the captions not kept are
        encoded in one call, the others taken from the cache."""
        with self._lock:
            rows = self._rows.setdefault(matcher, OrderedDict())
            have = {c: rows[c] for c in captions if c in rows}
            for c in have:
                rows.move_to_end(c)
        new = list(dict.fromkeys(c for c in captions if c not in have))
        if new:
            encoded = encode_captions(matcher.model, matcher.processor, new)
            for q, caption in enumerate(new):
                have[caption] = _row(encoded, q)
            with self._lock:
                self.encoded += len(new)
                for caption in new:
                    rows[caption] = have[caption]
                while len(rows) > self.capacity:
                    rows.popitem(last=False)
        parts = [have[c] for c in captions]
        features = None if parts[0].features is None else TextFeatures.cat([p.features for p in parts])
        return TextBank(KernelEmbeddings.cat([p.embeddings for p in parts]), features)


def _row(bank: TextBank, q: int) -> TextBank:
    """Row ``q`` of a bank, as a bank of one."""
    one = slice(q, q + 1)
    return TextBank(bank.embeddings.select(one), None if bank.features is None else bank.features.select(one))


CAPTIONS = CaptionCache()  # the demo's: the batched Match calls of every checkpoint


@torch.inference_mode()
def _start_images(matcher: Matcher, images: list) -> Callable[[], ImageBank]:
    """The images of a batch, :data:`IMAGE_CHUNK` at a time: each chunk's backbone runs now and its sources' image
    side on the overlap worker (``MKLVisITA.start_encode_image``), beside the next chunk's backbone and, for the last
    chunk, the captions' encoder; the returned function collects them into one bank (as
    ``mklvisita.retrieval.encode_images`` builds it)."""
    model = matcher.model
    jobs = []
    for i in range(0, len(images), IMAGE_CHUNK):
        pixels, _ = matcher.processor.images(list(images[i : i + IMAGE_CHUNK]))
        jobs.append(model.start_encode_image(pixels.to(matcher.device)))
    keep = model.fusion.image_levels if model.has_itm else None

    @torch.inference_mode()
    def finish() -> ImageBank:
        encoded = [job.collect() for job in jobs]  # each run here if the worker has not started it
        features = None if keep is None else ImageFeatures.cat([img.keep(keep) for img in encoded])
        return ImageBank(KernelEmbeddings.cat([model.embed_image(img) for img in encoded]), features)

    return finish


def _score_blocks(matcher: Matcher, requests: Sequence[tuple[Any, Sequence[str]]]) -> list[ScoreResult]:
    model = matcher.model
    captions = [c for _, cs in requests for c in cs]
    finish_images = _start_images(matcher, [image for image, _ in requests])
    texts = CAPTIONS.bank(matcher, captions)  # beside the last images' sources, as Matcher.score runs
    images = finish_images()
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


def search_images_many(matcher: Matcher, index: ImageIndex, queries: Sequence[tuple[str, int]]) -> list[SearchResult]:
    """``matcher.search_images(index, text, top_k)`` for several (text, top_k) queries over one image index: the
    texts encoded in one call, then each query ranked alone by the same cascade (see the module's decisions).

    Returns:
        One SearchResult per query, in order; ``timings["encode_query"]`` is the shared encoding's time over the
        number of queries.

    Raises:
        ValueError: a query that is not a caption, or a top_k that is not a whole number from 1.
    """
    if not isinstance(index, ImageIndex):
        raise ValueError(f"search_images_many searches an ImageIndex (from Matcher.index_images), got {type(index)}")
    texts = [check_caption(text) for text, _ in queries]
    top_ks = [check_whole_number(k, "top_k", 1, 1_000_000) for _, k in queries]
    model = matcher.model
    with inference_threads(getattr(matcher, "threads", None)):
        t0 = time.perf_counter()
        bank = encode_captions(model, matcher.processor, texts)
        t_enc = (time.perf_counter() - t0) / max(1, len(texts))
        out = []
        for q, top_k in enumerate(top_ks):
            query = _row(bank, q)
            # The Matcher's own ranking depth and top-k reading: a batched query is ranked as search_images ranks it.
            s = retrieve(model, index.bank, query, matcher._ranking(top_k))
            timings = {"encode_query": t_enc, **s.timings}
            out.append(matcher._top(s.t2i[0], s.similarity[:, 0], top_k, timings, s.pairs))
    return out


@dataclass
class _Job:
    matcher: Matcher
    image: Image.Image | Any  # a Match request's image; None for a search
    captions: list[str]  # a Match request's captions; a search's one query
    index: ImageIndex | None = None  # a search's image index (None: a Match request)
    top_k: int = 0
    arrived: float = field(default_factory=time.monotonic)
    done: bool = False
    result: ScoreResult | SearchResult | None = None
    error: BaseException | None = None

    def kind(self) -> tuple[int, ...]:
        """What may share a model call with this job: the same checkpoint, and for a search the same index."""
        return (id(self.matcher),) if self.index is None else (id(self.matcher), id(self.index))

    def alone(self) -> ScoreResult | SearchResult:
        """This request as the Matcher answers it alone."""
        if self.index is None:
            return self.matcher.score([self.image], self.captions)
        return self.matcher.search_images(self.index, self.captions[0], top_k=self.top_k)


class Batcher:
    """Collects concurrent Match (score) and Search (text -> images) requests and runs those that can share one as
    one model call (see the module's decisions).

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
        return self._submit(_Job(matcher, image, list(captions)))

    def search_images(self, matcher: Matcher, index: ImageIndex, text: str, top_k: int = 5) -> SearchResult:
        """``matcher.search_images(index, text, top_k)``, its query encoded with the queries over the same index
        that arrive with it."""
        return self._submit(_Job(matcher, None, [text], index=index, top_k=top_k))

    def _submit(self, job: _Job) -> Any:
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
                first = self._queue[0].kind()
                batch = [j for j in self._queue if j.kind() == first][: self.max_batch]
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
            matcher, index = batch[0].matcher, batch[0].index
            try:
                if index is None:
                    results: list = score_blocks(matcher, [(j.image, j.captions) for j in batch])
                else:
                    results = search_images_many(matcher, index, [(j.captions[0], j.top_k) for j in batch])
            except Exception:  # one request's bad input: each one alone, each with its own answer
                pass
            else:
                for job, result in zip(batch, results):
                    job.result, job.done = result, True
                return
        for job in batch:
            try:
                job.result = job.alone()
            except Exception as e:
                job.error = e
            job.done = True


BATCHER = Batcher()  # the demo's: every Match request and text search of the process goes through it


def score(matcher: Matcher, image: Any, captions: Sequence[str]) -> ScoreResult:
    """The Match handler's model call: batched with concurrent requests (or alone, holding the model, when batching
    is off)."""
    if not enabled():
        with exclusive():
            return matcher.score([image], captions)
    return BATCHER.score(matcher, image, captions)


def search_images(matcher: Matcher, index: ImageIndex, text: str, top_k: int = 5) -> SearchResult:
    """The Search handler's text -> image model call: batched with concurrent queries over the same index (or alone,
    holding the model, when batching is off)."""
    if not enabled():
        with exclusive():
            return matcher.search_images(index, text, top_k=top_k)
    return BATCHER.search_images(matcher, index, text, top_k)
