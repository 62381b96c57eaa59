"""Inference threads: how many CPU threads one Matcher call (score, explain, index, search) may use.

Decisions:

- Default: ONE intra-op thread per call (:data:`DEFAULT_THREADS`). torch's own default is one thread per core, which
  is fastest only on a machine nothing else uses; as soon as another process (a Space's neighbour, a training run)
  or a second request of the same app wants the cores, its threads wait on each other and a call's latency
  multiplies (``benchmarks/cotenant.py`` measures both policies, idle and beside a torch co-tenant, in one run). The
  demo runs one model call at a time, so one thread per call also leaves a core for the web server and figures.
- Override: ``$MKLVISITA_THREADS=N`` for every call, ``Matcher(..., threads=N)`` (or ``matcher.threads = N``) for
  one Matcher's calls, or ``with inference_threads(N):`` around any code (every call inside it runs with N). ``N``
  is a whole number >= 1, or ``"auto"`` (also 0) for torch's own default (one per core: best for a single user on
  an otherwise idle machine).
- torch's intra-op count belongs to the calling thread (OpenMP keeps it per thread; threads started later inherit
  the last count set): a call sets it in its own thread when it starts and restores it when it ends, so calls in
  other threads (the app's worker threads) are not changed under them. A call made inside another in the same
  thread runs with the count already in force. OpenMP-free builds share one count per process: there the last
  restore wins. OpenCV's pool (the face detector) follows the same count when OpenCV is loaded; the OCR engine is
  built with one thread (``mklvisita.scene_text``).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

THREADS_ENV = "MKLVISITA_THREADS"
DEFAULT_THREADS = 1
AUTO = "auto"

_local = threading.local()  # per thread: depth of nested calls and the counts before the outermost

F = TypeVar("F", bound=Callable[..., Any])


def parse_threads(value: int | str | None, what: str = THREADS_ENV) -> int | None:
    """A thread setting -> a count >= 1, or None for torch's own default ("auto" or 0). Raises ValueError."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (AUTO, "0"):
            return None
        if not text.isdigit():
            raise ValueError(f"{what} must be a whole number of threads (1, 2, ...) or 'auto', got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number of threads (1, 2, ...) or 'auto', got {value!r}")
    return value or None


def default_threads() -> int | None:
    """The count a call uses when nothing else says: ``$MKLVISITA_THREADS``, else :data:`DEFAULT_THREADS`."""
    env = os.environ.get(THREADS_ENV, "").strip()
    return parse_threads(env) if env else DEFAULT_THREADS


def _cv2_threads(n: int | None = None) -> int | None:
    """OpenCV's thread count (set it when ``n`` is given), only where OpenCV is already loaded."""
    cv2 = sys.modules.get("cv2")
    if cv2 is None or not hasattr(cv2, "setNumThreads"):
        return None
    if n is not None:
        cv2.setNumThreads(n)
    return cv2.getNumThreads()


@contextmanager
def inference_threads(threads: int | str | None = None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None: :func:`default_threads`; "auto": torch's default).

    Yields the count in force. A block nested in another (in the same thread) keeps the outer block's count; the
    count before the outermost block is restored when it ends, also after an exception (module docstring).
    """
    want = parse_threads(threads, "threads") if threads is not None else default_threads()
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.saved = (torch.get_num_threads(), _cv2_threads())
        if want is not None and want != _local.saved[0]:
            torch.set_num_threads(want)
        if want is not None and _local.saved[1] is not None and want != _local.saved[1]:
            _cv2_threads(want)
    _local.depth = depth + 1
    try:
        yield torch.get_num_threads()
    finally:
        _local.depth = depth
        if depth == 0:
            torch_before, cv2_before = _local.saved
            if torch.get_num_threads() != torch_before:
                torch.set_num_threads(torch_before)
            if cv2_before is not None and _cv2_threads() != cv2_before:
                _cv2_threads(cv2_before)


def uses_inference_threads(method: F) -> F:
    """Decorate a Matcher method: it runs under :func:`inference_threads` with the Matcher's ``threads``."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with inference_threads(getattr(self, "threads", None)):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
