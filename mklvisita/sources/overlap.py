"""Running work beside the encoders on a second thread: a score's captions and the sources' detectors (face detection,
OCR) beside the image backbone, and the image features that read the backbone's output shared between the two threads.

Decisions:

- What overlaps: before the image backbone runs, the model asks every source for the part of its image features that
  needs only the model inputs (:meth:`~mklvisita.sources.base.FeatureSource.prefetch_image`) and hands what was
  started back to that source's ``encode_image``, which waits for it where it needs the result. The person source
  (OpenCV's Haar cascade) and the scene-text source (RapidOCR's ONNX networks) do this: both libraries release the
  GIL, so the detectors run on a second core while the calling thread runs the image network. The model names no
  source; a source without the hook runs as before.
- After the backbone, :meth:`~mklvisita.model.MKLVisITA.start_encode_image` starts every source's ``encode_image``
  (the concept bridge's classes at every cell, colour naming, the detections turned into cells) as one job on the same
  worker (:func:`start_torch`). Only calls without gradients on a CPU go there (training, explanations and GPU work
  run it in the caller, as ``encode_image`` always does). When the caller gets to that job first, with the worker
  still busy, it takes the job back (:meth:`Prefetch.collect`) and with it the last detector the worker has not
  started (:meth:`Prefetch.claim`: the one the worker would reach last), leaving the others to the worker, instead of
  waiting for each in turn.
- ``Matcher.score`` (one batch of images) balances the two threads as follows. The captions' encoder (tokenizer,
  MiniLM, the sources' caption side) starts first, on the worker, beside the caller's image backbone (the two
  backbones at once, as ``benchmarks/photo_score.py``'s two-core floor runs them); the detectors queue behind it. The
  caller, back from the backbone, computes the sources that start no detector (the concept bridge's classes at every
  cell, colour naming) and, with a fusion branch, the fusion's caption-independent image side
  (``MKLVisITA.start_match_image``; ``HierarchicalFusion.prepare_image``: level projections, the shared stream
  pooled, its keys and values), collects the captions and runs the pairs' passes through the fusion
  (``MKLVisITA.fuse_pairs``): they read the concept maps (the affinity bias), not the detectors' sources, so they run
  while the worker runs the text detector. Only then does it collect the other sources (taking back the face
  detector if the worker has not started it), and S, which reads every source, is added to the match logit last
  (``MKLVisITA.finish_match``; the same arithmetic as ``match``). The passes run as one: the schedule this replaced
  collected every source first and then ran them in two halves, the second on the worker, which cost a second pass's
  fixed work (~4 ms of CPU for five pairs) for a core the detectors now use; alternated call by call with it, a photo
  score took 0.93-0.95x the time in nine runs (``benchmarks/photo_score.py --schedule-ab``:
  ``docs/results/benchmarks/photo_score_served_quiet_run*.json``). With the overlap off the same functions run in the
  same order, so the scores do not depend on it (one pass rounds differently from two halves: ITM within 1e-6 of
  the previous schedule's). The caption batch stays whole: splitting MiniLM's pass between the threads costs 6-10 ms
  of CPU per extra batch (each pass reads the 42 MB of weights again: 1, 2 and 5 captions took 10, 14 and 22 ms on the
  2-core machine), more than it would move. The caption side's largest product (the concept bridge's 20k WordNet
  synsets) hands half its rows to the worker when it runs on the caller, and takes them back when the worker has not
  started them (:meth:`Prefetch.collect`); on the worker both halves run there.
- Thread counts: a job that runs torch code (the detectors' jobs make their uint8 images from the model inputs, the
  later job the image features) is started by :func:`start_torch`: it runs with the caller's intra-op count, set in
  the worker thread before it runs (:mod:`mklvisita.threads`: one per call unless told otherwise), and under the
  caller's autograd mode (``inference_mode`` or ``no_grad``), so it computes what the caller would have. The worker
  adds one thread: inside a Matcher call (or ``inference_threads``) OpenCV's pool follows the call's count (one by
  default), and the OCR engine is built with one intra-op and one inter-op thread
  (:mod:`mklvisita.sources.scene_text`). Where no core is free (other jobs hold them), the worker only takes turns
  with the caller (a 1 x 5 photo score 7% slower on a 2-core machine whose other jobs held the second core:
  ``docs/results/benchmarks/photo_score_overlap_ab.json``); turn it off there. ``benchmarks/photo_score.py
  --overlap-ab`` measures both settings and how much a second thread can gain at the time.
- One worker thread per process (a ``ThreadPoolExecutor`` with one worker, started on first use and again in a forked
  child), shared by every model and every calling thread. Jobs run in the order they were started; a caller waits
  only for its own jobs; a job takes only its detector's lock and waits for nothing but jobs its caller started
  before it (already done when it runs, the worker being one thread in order), so concurrent calls cannot deadlock.
  Work started from the worker thread itself runs there at once.
- Taking work back: when the caller needs a job's result and the worker has not started it yet (busy with another
  call's jobs, or slowed by other jobs on the machine), the caller runs it itself (:meth:`Prefetch.collect`), so the
  overlap never leaves the caller idle while its own work waits in the queue.
- Switch: ``$MKLVISITA_OVERLAP`` = ``auto`` (the default), ``on`` (or 1) or ``off`` (or 0), read at each start, and
  once per call inside :func:`one_decision` (``Matcher.score``: its own threads, woken as it goes, must not turn the
  overlap off half-way; measured, the tokenizer's thread pool did, leaving a detector before the backbone).
  ``auto`` overlaps when a core is free at that moment: the process may use 2 or more CPUs and, on Linux, the number
  of runnable threads on the machine (``/proc/loadavg``'s fourth field, an instant count, not an average) leaves one
  besides the caller (the worker itself is not counted from the moment a job is started on it until its jobs have run
  or been taken back, woken or running: work queued behind it adds no thread; else the second start of a call, made
  while the worker wakes for the first, would find the core taken by it and run here). Measured on the 2-core machine,
  quiet, with the detectors alone on the worker: the overlap took a photo score from 96 to 79 ms
  (``docs/results/benchmarks/photo_score_overlap_ab_quiet_machine.json``); beside a torch co-tenant holding both
  cores it only takes turns with the caller and the call slows from 125 to 146 ms
  (``docs/results/benchmarks/cotenant_threads_quiet_machine_*.json``), so it should run only where a core is idle.
  Where ``/proc/loadavg`` cannot be read, ``auto`` goes by the CPU count alone. Off, the same functions run on the
  calling thread, in the same order, so the scores are the same either way (``tests/test_source_overlap.py``,
  ``tests/test_overlap_post_backbone.py``, ``tests/test_caption_overlap.py``).
- Errors: an exception raised in the worker is raised again, the same object, in the calling thread when the source
  waits for the result. Off, it is raised when the work is started.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

OVERLAP_ENV = "MKLVISITA_OVERLAP"
LOADAVG = "/proc/loadavg"  # Linux: its fourth field counts the runnable threads now
_ON, _OFF, _AUTO = ("1", "on", "true", "yes"), ("0", "off", "false", "no"), "auto"

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_local = threading.local()  # .worker: True on the worker thread
_busy = 0  # jobs on the worker not yet finished or taken back: while any, the worker's thread is this process's
# (running, or woken and about to run), so auto does not count it as another job's


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the platform has one)."""
    return _usable_cpus()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without CPU affinity (macOS, Windows)
        return os.cpu_count() or 1


def _others_running() -> int | None:
    """Runnable threads on the machine now, the caller and this process's worker (while it runs a job) left out
    (``/proc/loadavg``); None where it cannot be read."""
    try:
        with open(LOADAVG, encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1 - min(_busy, 1))


def overlap_enabled() -> bool:
    """Whether sources run their prefetched work beside the caller (``$MKLVISITA_OVERLAP``, module docstring)."""
    value = os.environ.get(OVERLAP_ENV, "").strip().lower() or _AUTO
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value == _AUTO:
        cpus = _usable_cpus()
        others = _others_running()
        return cpus >= 2 and (others is None or others <= cpus - 2)
    raise ValueError(f"{OVERLAP_ENV} must be 'auto', 'on' or 'off' (or 1 / 0), got {value!r}")


@contextmanager
def one_decision() -> Iterator[bool]:
    """Within it, every :func:`start` on this thread follows the setting read once, on entering (``auto``: whether a
    core is free then; yields it): a call's own threads, which it wakes as it goes (the worker, the tokenizer's pool),
    must not turn the overlap off half-way through it, leaving one detector here and the other there. Nested: the
    outermost decides."""
    decided = getattr(_local, "decided", None)
    if decided is not None:
        yield decided
        return
    _local.decided = overlap_enabled()
    try:
        yield _local.decided
    finally:
        _local.decided = None


def _mark_worker() -> None:
    _local.worker = True


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="mklvisita-overlap", initializer=_mark_worker)
        return _pool


def _after_fork_in_child() -> None:  # the parent's worker thread does not exist in a forked child
    global _pool, _lock, _busy
    _pool, _lock, _busy = None, threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _count(jobs: int) -> None:
    """Jobs started on the worker (+1) or finished or taken back (-1): :data:`_busy`."""
    global _busy
    with _lock:
        _busy += jobs


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """A job on the worker thread, counted in :data:`_busy` from its start (:func:`start`) until it ran."""
    try:
        return fn(*args)
    finally:
        _count(-1)


class Prefetch:
    """Work started on the worker (or done already); :meth:`collect` (or :meth:`result`) returns (or raises) its
    outcome."""

    __slots__ = ("_future", "_work", "_counted")

    def __init__(self, future: Future, work: tuple[Callable[..., Any], tuple] | None = None):
        self._future = future
        self._work = work  # (fn, args): what :meth:`collect` runs here when the worker has not started it
        self._counted = work is not None  # counted in _busy until it runs there or is dropped from the queue

    def _drop(self) -> bool:
        """Take the work off the worker's queue if it has not started: True when it is off (now or before)."""
        if not self._future.cancel():
            return False
        if self._counted:
            self._counted = False
            _count(-1)
        return True

    def result(self, timeout: float | None = None) -> Any:
        """The work's return value (its exception raised here), waiting for the worker; ``timeout`` seconds at most,
        else TimeoutError."""
        return self._future.result(timeout)

    def collect(self) -> Any:
        """The work's return value (its exception raised here); run here and now when the worker has not started it
        (busy with earlier jobs, or slowed by other jobs on the machine), so a caller never waits for work it can do
        itself. The same function either way, so the same outcome."""
        self.claim()
        return self.result()

    def claim(self) -> bool:
        """Run the work here and now when the worker has not started it (True; its outcome kept for :meth:`collect`),
        else leave it where it is, running or done (False). Never waits."""
        if self._work is None or not self._drop():
            return False
        fn, args = self._work
        self._work, self._future = None, Future()
        try:
            self._future.set_result(fn(*args))
        except BaseException as e:
            self._future.set_exception(e)
        return True

    def running(self) -> bool:
        """Whether the worker runs the work now (False before it starts, once it is done, and for work done here)."""
        return self._future.running()

    def cancel(self) -> bool:
        """Drop the work if it has not started (the call it was for failed): True when it was dropped; no effect
        (False) once it runs or ran."""
        return self._drop()


def start(fn: Callable[..., Any], *args: Any) -> Prefetch:
    """``fn(*args)`` on the worker thread when overlap is on (module docstring), else now on this thread.

    ``fn`` must not run torch code (:func:`start_torch` runs that) nor wait for work started after it.
    """
    decided = getattr(_local, "decided", None)
    if (overlap_enabled() if decided is None else decided) and not getattr(_local, "worker", False):
        pool = _executor()
        _count(1)  # before the worker wakes: the next start of this call must not take it for another job
        try:
            return Prefetch(pool.submit(_run, fn, *args), (fn, args))
        except RuntimeError:  # the interpreter is shutting down and starts no threads: run it here
            _count(-1)
    return done(fn(*args))


def start_torch(fn: Callable[..., Any], *args: Any, graph: bool = True) -> Prefetch:
    """``fn(*args)``, torch code, as :func:`start` runs it: on the worker thread when overlap is on, with this thread's
    intra-op count and autograd mode (``inference_mode`` or ``no_grad``).

    ``graph``: whether autograd may need ``fn``'s outputs; then, while gradients are recorded, it runs here and now
    (a graph stays in the thread that will run backward). False (a detector's boxes): it runs without gradients
    wherever it runs. ``fn`` must not wait for work started after it.
    """
    if graph and torch.is_grad_enabled():
        return done(fn(*args))
    threads, inference = torch.get_num_threads(), torch.is_inference_mode_enabled()

    def run() -> Any:
        if torch.get_num_threads() != threads:  # the worker thread's own count (OpenMP keeps one per thread)
            torch.set_num_threads(threads)
        with torch.inference_mode() if inference else torch.no_grad():
            return fn(*args)

    return start(run)


def done(value: Any) -> Prefetch:
    """Work already done: a :class:`Prefetch` whose result is ``value``."""
    finished: Future = Future()
    finished.set_result(value)
    return Prefetch(finished)
