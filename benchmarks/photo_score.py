"""The photo checkpoint's scoring path against its floor: Matcher.score on 1 image x 5 captions, the two backbones
alone on the same input, and where the rest of the time goes.

    python benchmarks/photo_score.py [--checkpoint assets/mklvisita-photo] [--repeats 30] [--threads 1]
        [--image assets/examples/cat.jpg] [--explain] [--overlap-ab] [--timeline] [--schedule-ab] [--min-face-ab PX]
        [--options-ab JSON]
        [--out FILE.json]
    python benchmarks/photo_score.py --image /usr/share/tuxpaint/stamps/town/roadsigns/give_way_sign.png  # has text
    python benchmarks/photo_score.py --save-scores FILE.json [--compare-scores REFERENCE.json]  # no timing

Decisions:

- The Matcher is loaded once and warmed up (3 calls) before timing; each timed call scores one photo (``--image``,
  default the cat example) against five captions, image decoding and preprocessing included (what the demo's Match
  tab pays; an image with printed words also pays for reading them).
- The floor: the two backbones alone on the same input, the image network (EfficientNet-Lite0 with its ImageNet
  head, timm's own forward) on the preprocessed image and the text encoder (MiniLM) on the five tokenised captions.
  Score and floor are timed call by call in turn, so both see the same machine load; ``ratio`` = median score /
  median floor.
- The floor on two cores, like for like with a score whose overlap puts work on a second core (the floor above uses
  one): the better of the two backbones with two intra-op threads one after the other, and the two backbones at once
  on two threads (the text encoder on a second one), timed in the same rounds (:class:`TwoCoreFloor`):
  ``floor_two_cores_median_ms``, which variant won (``floor_two_cores_how``, both in
  ``floor_two_cores_variants_median_ms``) and ``ratio_two_cores`` = median score / that floor. ``ratio`` keeps
  its meaning; both are reported (also per overlap setting under ``overlap_ab``).
- Shares: in as many score calls again, after the ones timed for the ratio (the timers' wrapping costs a few ms per
  call; their calls' median is ``score_with_part_timers_median_ms``), each part below is wrapped by a timer (found by
  its class and method at run time; a part the installed code does not have is listed under ``parts_not_found``):
  preprocessing (decode, letterbox, tokenise), the two backbones inside the model, colour naming, face detection, text
  detection and text recognition (RapidOCR's two networks, with their own pre- and post-processing), the rest of scene
  text (and its caption side), the concept bridge's image side (the classes at every cell) and caption side (the class
  prompts and the WordNet expansion), the fusion's caption-independent image side (``fusion (image side)``, once per
  image) and its passes over the pairs (``fusion (pairs)``: the layers, the affinity bias and the relation reader; the
  ITM head and S's weight in the match logit fall under ``other``), the kernels (embeddings and similarity); ``other``
  is what no timer covers. Medians per call, ms.
- Overlap (``$MKLVISITA_OVERLAP``, :mod:`mklvisita.sources.overlap`): with it on, the captions' encoder runs on a
  worker thread beside the image backbone, and the detectors and the image sources' work after the backbone are
  shared between the calling thread and the worker (the module says how). A part's time counts
  wherever it ran (``score_parts_median_ms``); the worker's share of it is also listed apart
  (``worker_parts_median_ms``), ``other`` subtracts only what ran on the calling thread, and ``waiting for the
  worker`` is the calling thread's wait for the worker's results (a job the worker had not started by then runs on
  the calling thread instead: its parts count there). The run records the setting.
  ``--overlap-ab`` also scores with the overlap off and on in turn, call by call, each call followed by the floor, so
  both see the same load (``overlap_ab``: each setting's medians and ratio). It also gives CPU times (the process's,
  and the calling thread's alone) and ``calling_thread_cpu_ratio`` = the calling thread's CPU per score over the
  floor's: what the ratio would be with a core free for the worker, on a machine whose other jobs leave none.
  ``two_thread_speedup_before_after`` says how much a second thread could gain at the time (:func:`two_thread_speedup`).
- ``--schedule-ab``: ``Matcher.score`` (the pair passes through the fusion on the calling thread while the worker
  runs the detectors, S added after) against the schedule it replaced (:func:`score_fusion_after_sources`: every
  image source collected first, then the passes in two halves, the second on the worker), alternated call by call
  with the overlap on, each round followed by the floor (``schedule_ab``: medians, ratios, and the same ITM
  asserted, to 1e-6: one pass against two halves rounds differently). On a 2-core VM whose CPUs drift in speed
  from minute to minute, only such an alternation compares two schedules. (Before this schedule the option
  compared the captions on the worker with the captions after the image backbone:
  ``photo_score_captions_on_worker*.json``, commit 33eefc6 and earlier.)
- ``--options-ab JSON``: the same alternation, ``Matcher.score`` of the checkpoint as configured against the same
  checkpoint with these source settings (``kernels.options``, e.g. the cost settings the photo checkpoint serves with
  turned back: ``'{"colour": {"stride": 1}, "scene_text": {"detector_side": 256}, "person": {"scale_step": 1.2}}'``)
  (``options_ab``: medians, ratios, and the largest ITM difference between the two; the scores may differ).
- ``--min-face-ab PX``: the same alternation, ``Matcher.score`` with the face detector's smallest face as shipped
  (``mklvisita.sources.person.MIN_FACE``) against ``PX`` pixels (``min_face_ab``); the photo must show the same faces
  at both (the scores are asserted equal).
- ``--timeline``: the schedule of the median timed score call, each part's start and end (ms from the call's start)
  and the thread it ran on (``caller`` or ``worker``), outermost calls only (``timeline_median_call``), to see where
  either thread waits.
- ``--explain`` also times ``Matcher.explain`` (kernel maps of the first caption) with the checkpoint's
  ``kernels.map_shifts`` and with one pass, alternating call by call, and its parts (the word maps included); with a
  fusion branch also Grad-CAM and the checkpoint's default method (``fusion.explain_method``, what the demo shows) at
  the checkpoint's ``map_shifts``, alternating call by call.
- ``--save-scores`` writes the scores (S and every kernel's contribution) of the example photos and a fixed set of
  Tux Paint stamps (where installed) against their captions; ``--compare-scores`` reports the largest absolute
  difference from a reference file written the same way (a speed-up must leave the scores where they were).

Prints JSON (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = [
    "a tabby cat lying on a rug",
    "a cup of coffee on a saucer",
    "a rocket lifting off from a launch pad",
    "an astronaut in an orange suit",
    "a white cup on a wooden table",
]
STAMPS = Path("/usr/share/tuxpaint/stamps")
STAMP_FILES = [  # a few of each kind: animals, fruit, tools, faces, vehicles, and road signs with printed words
    "animals/mammals/elephant.png",
    "animals/birds/penguin.png",
    "food/fruit/apple_red.png",
    "household/tools/hammer.png",
    "household/tools/measuring_tape.png",
    "symbols/faces/happy.png",
    "vehicles/auto/sedan.png",
    "town/roadsigns/give_way_sign.png",
    "town/roadsigns/stop.png",
    "town/roadsigns/school_sign.png",
]
STAMP_CAPTIONS = ["an elephant", "a penguin", "a red apple", "a hammer", "a measuring tape", "a happy face", "a car"]
STAMP_CAPTIONS += ["a give way sign", "a stop sign", "a school sign"]

# (part, "module:Class.method") timed inside score; several entries may share a part (their times add up).
PARTS = [
    ("preprocessing", "mklvisita.inputs:Processor.images"),
    ("preprocessing", "mklvisita.inputs:Processor.captions"),
    ("image backbone", "@vision"),
    ("text backbone", "@text"),
    ("colour naming", "mklvisita.sources.colour:ColourNames.cells"),
    ("face detection", "mklvisita.sources.person:FaceDetector.detect"),
    ("text detection", "rapidocr_onnxruntime.ch_ppocr_det.text_detect:TextDetector.__call__"),
    ("text recognition", "rapidocr_onnxruntime.ch_ppocr_rec.text_recognize:TextRecognizer.__call__"),
    ("scene text (all)", "mklvisita.sources.scene_text:SceneTextReader.read_images"),
    ("scene text (all)", "mklvisita.sources.scene_text:SceneTextReader.features"),
    ("concept bridge (image)", "mklvisita.sources.concept:ConceptBridge.encode_image"),
    ("concept bridge (image)", "mklvisita.sources.concept:ConceptBridge.image_features"),
    ("concept bridge (captions)", "mklvisita.sources.concept:ConceptBridge.encode_text"),
    ("concept bridge (captions)", "mklvisita.sources.concept:ConceptBridge.text_features"),
    ("scene text (captions)", "mklvisita.sources.scene_text:SceneTextSource.encode_text"),
    ("fusion (image side)", "mklvisita.fusion:HierarchicalFusion.prepare_image"),
    ("fusion (pairs)", "mklvisita.fusion:HierarchicalFusion.forward"),
    ("kernels", "@kernels.embed_image"),
    ("kernels", "@kernels.embed_text"),
    ("kernels", "@kernels.forward"),
    ("the maps", "@kernels.word_patch_maps"),
    ("waiting for the worker", "mklvisita.sources.overlap:Prefetch.result"),
]


# --------------------------------------------------------------------------------------------- part timers
def _resolve(spec: str, matcher: Any) -> tuple[type, str] | None:
    """(class, method name) of a PARTS entry, or None where the installed code has no such thing."""
    if spec.startswith("@"):  # a part of the loaded model, found by attribute (its class is timm's, HF's, ours)
        name, _, method = spec[1:].partition(".")
        owner = {
            "vision": lambda: matcher.model.vision.model,
            "text": lambda: matcher.model.text.model,
            "kernels": lambda: matcher.model.kernels,
        }[name]
        try:
            obj = owner()
        except AttributeError:
            return None
        method = method or ("forward_intermediates" if name == "vision" else "forward")
        cls = type(obj)
        return (cls, method) if hasattr(cls, method) else None
    module, _, attr = spec.partition(":")
    cls_name, _, method = attr.partition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError):
        return None
    return (cls, method) if method in vars(cls) else None


class PartTimers:
    """Wraps the PARTS' methods with timers while active; ``calls`` holds each call's ms per part, and ``worker`` the
    share of it spent off the calling thread (the overlap worker)."""

    def __init__(self, matcher: Any) -> None:
        self.found: list[tuple[str, type, str]] = []
        self.missing: list[str] = []
        for part, spec in PARTS:
            where = _resolve(spec, matcher)
            if where is None:
                self.missing.append(spec)
            else:
                self.found.append((part, *where))
        self.parts = list(dict.fromkeys(part for part, _, _ in self.found))
        self._current: dict[str, float] = defaultdict(float)
        self._worker: dict[str, float] = defaultdict(float)
        self._depth: dict[tuple[str, int], int] = defaultdict(int)
        self.calls: list[dict[str, float]] = []
        self.worker: list[dict[str, float]] = []
        self._t0 = 0.0
        self._events: list[tuple[str, str, float, float]] = []
        self.events: list[list[tuple[str, str, float, float]]] = []  # per call: (thread, part, start ms, end ms)

    def _wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = (part, threading.get_ident())
            self._depth[key] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[key] -= 1
                if not self._depth[key]:  # the outermost call of this part (in this thread) counts
                    end = time.perf_counter()
                    ms = (end - t) * 1000
                    self._current[part] += ms
                    caller = threading.current_thread() is threading.main_thread()
                    if not caller:
                        self._worker[part] += ms
                    start_ms, end_ms = (t - self._t0) * 1000, (end - self._t0) * 1000
                    self._events.append(("caller" if caller else "worker", part, start_ms, end_ms))

        return timed

    @contextmanager
    def active(self):
        originals = []
        for part, cls, method in self.found:
            fn = vars(cls)[method]
            originals.append((cls, method, fn))
            setattr(cls, method, self._wrap(part, fn))
        try:
            yield self
        finally:
            for cls, method, fn in reversed(originals):
                setattr(cls, method, fn)

    @contextmanager
    def call(self):
        self._current, self._worker, self._events = defaultdict(float), defaultdict(float), []
        self._t0 = time.perf_counter()
        yield
        self.calls.append(dict(self._current))
        self.worker.append(dict(self._worker))
        self.events.append(sorted(self._events, key=lambda e: e[2]))

    def timeline(self, total: list[float]) -> list[dict[str, Any]]:
        """The median call's parts in order of start: thread, part, start and end (ms from the call's start)."""
        median = sorted(range(len(total)), key=total.__getitem__)[len(total) // 2]
        return [
            {"thread": th, "part": part, "start_ms": round(a, 1), "end_ms": round(b, 1)}
            for th, part, a, b in self.events[median]
        ]

    @staticmethod
    def _rest(c: dict[str, float]) -> dict[str, float]:
        if "scene text (all)" in c:
            c["scene text (rest)"] = (
                c.pop("scene text (all)") - c.get("text detection", 0) - c.get("text recognition", 0)
            )
        return c

    def medians(self, total: list[float]) -> dict[str, float]:
        """Median ms per part over the calls; 'scene text (rest)' and 'other' derived (see the module's decisions)."""
        rows = []
        for c, w, t in zip(self.calls, self.worker, total):
            c = self._rest({p: c.get(p, 0.0) for p in self.parts})
            w = self._rest({p: w.get(p, 0.0) for p in self.parts})
            c["other"] = t - sum(v - w.get(k, 0.0) for k, v in c.items())  # what the calling thread spent elsewhere
            rows.append(c)
        return {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}

    def worker_medians(self) -> dict[str, float]:
        """Median ms per part spent on the overlap worker (parts it never ran left out)."""
        ran = [p for p in self.parts if any(w.get(p) for w in self.worker)]
        rows = [self._rest({p: w.get(p, 0.0) for p in ran}) for w in self.worker]
        return {k: round(statistics.median(r[k] for r in rows), 2) for k in (rows[0] if rows else {})}


# --------------------------------------------------------------------------------------------- timing
def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


def _floor(matcher: Any, image: Path) -> Callable[[], tuple[float, float]]:
    """A function timing the two backbones alone on the image and CAPTIONS: (image ms, text ms)."""
    from mklvisita.inputs import load_image

    pv, _ = matcher.processor.images([load_image(image)])
    enc = matcher.processor.captions(CAPTIONS)
    vision, text = matcher.model.vision.model, matcher.model.text.model

    def floor() -> tuple[float, float]:
        with torch.inference_mode():
            t = time.perf_counter()
            vision(pv)
            t_img = time.perf_counter() - t
            t = time.perf_counter()
            text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            return t_img * 1000, (time.perf_counter() - t) * 1000

    return floor


class TwoCoreFloor:
    """The floor on two cores, like for like with a score whose overlap uses a second core: the two backbones with
    two intra-op threads, one after the other (``two_threads``), and the two backbones at once, the text encoder on
    a second thread with one intra-op thread each (``concurrent``). Each call times both; the better median is the
    floor (``--threads`` is the caller's count; the second core is what the overlap's worker adds)."""

    VARIANTS = ("two_threads", "concurrent")

    def __init__(self, matcher: Any, image: Path, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from mklvisita.inputs import load_image

        self.pv, _ = matcher.processor.images([load_image(image)])
        self.enc = matcher.processor.captions(CAPTIONS)
        self.vision, self.text = matcher.model.vision.model, matcher.model.text.model
        self.threads = threads
        self.pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        self.times: dict[str, list[float]] = {v: [] for v in self.VARIANTS}

    def _text(self) -> None:
        with torch.inference_mode():
            self.text(input_ids=self.enc["input_ids"], attention_mask=self.enc["attention_mask"])

    def __call__(self) -> None:
        """Time each variant once (the image network on the calling thread). Two intra-op threads last, and a pause
        after them: OpenMP's idle threads spin a while after a parallel region, which would take the second core
        from whatever runs next."""
        t = time.perf_counter()
        job = self.pool.submit(self._text)
        with torch.inference_mode():
            self.vision(self.pv)
        job.result()
        self.times["concurrent"].append((time.perf_counter() - t) * 1000)
        torch.set_num_threads(2 * self.threads)
        try:
            t = time.perf_counter()
            with torch.inference_mode():
                self.vision(self.pv)
            self._text()
            self.times["two_threads"].append((time.perf_counter() - t) * 1000)
        finally:
            torch.set_num_threads(self.threads)
        time.sleep(0.05)

    def reset(self) -> None:
        self.times = {v: [] for v in self.VARIANTS}

    def summary(self, score_median: float) -> dict[str, Any]:
        medians = {v: _median(xs) for v, xs in self.times.items()}
        best = min(medians, key=medians.get)
        return {
            "floor_two_cores_median_ms": medians[best],
            "floor_two_cores_how": best,
            "floor_two_cores_variants_median_ms": medians,
            "ratio_two_cores": round(score_median / statistics.median(self.times[best]), 3),
        }


def time_score(matcher: Any, image: Path, repeats: int, threads: int = 1, timeline: bool = False) -> dict[str, Any]:
    floor = _floor(matcher, image)
    two_cores = TwoCoreFloor(matcher, image, threads)
    for _ in range(3):
        matcher.score([image], CAPTIONS)
        floor()
        two_cores()
    two_cores.reset()
    scores, images, texts = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        matcher.score([image], CAPTIONS)
        scores.append((time.perf_counter() - t) * 1000)
        a, b = floor()
        images.append(a)
        texts.append(b)
        two_cores()
    # The shares from calls of their own: the timers' wrapping costs a few ms per call, which the ratio must not see.
    timers = PartTimers(matcher)
    timed: list[float] = []
    with timers.active():
        for _ in range(repeats):
            with timers.call():
                t = time.perf_counter()
                matcher.score([image], CAPTIONS)
                timed.append((time.perf_counter() - t) * 1000)
    q = statistics.quantiles(scores, n=10)
    floors = [a + b for a, b in zip(images, texts)]
    return {
        "score_1x5_median_ms": _median(scores),
        "score_1x5_p10_ms": round(q[0], 1),
        "score_1x5_p90_ms": round(q[-1], 1),
        "floor_median_ms": _median(floors),
        "floor_image_backbone_ms": _median(images),
        "floor_text_backbone_ms": _median(texts),
        "ratio": round(statistics.median(scores) / statistics.median(floors), 3),
        **two_cores.summary(statistics.median(scores)),
        "score_with_part_timers_median_ms": _median(timed),
        "score_parts_median_ms": timers.medians(timed),
        "worker_parts_median_ms": timers.worker_medians(),
        "parts_not_found": timers.missing,
        **({"timeline_median_call": timers.timeline(timed)} if timeline else {}),
    }


def two_thread_speedup(n: int = 4) -> float:
    """How many cores' worth this process gets for two threads now: the time of 2n sorts (numpy, which releases the
    GIL) on one thread over the time of n sorts on each of two threads. 1.0: no free second core (other jobs hold it),
    so no overlap can pay; 2.0: two free cores."""
    data = np.random.default_rng(0).random(1_000_000)

    def sorts(k: int) -> None:
        for _ in range(k):
            np.sort(data)

    t = time.perf_counter()
    sorts(2 * n)
    one = time.perf_counter() - t
    t = time.perf_counter()
    worker = threading.Thread(target=sorts, args=(n,))
    worker.start()
    sorts(n)
    worker.join()
    return round(one / (time.perf_counter() - t), 2)


def time_overlap_ab(matcher: Any, image: Path, repeats: int, threads: int = 1) -> dict[str, Any]:
    """Score with the overlap off and on in turn, call by call, each call followed by the floor (same load for both);
    after each round the floor on two cores (:class:`TwoCoreFloor`), the like-for-like floor of the overlap on."""
    from mklvisita.sources.overlap import OVERLAP_ENV

    floor, before = _floor(matcher, image), os.environ.get(OVERLAP_ENV)
    two_cores = TwoCoreFloor(matcher, image, threads)
    speedup_before = two_thread_speedup()
    runs: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in ("off", "on")}
    try:
        for i in range(3 + repeats):
            for mode, r in runs.items():
                os.environ[OVERLAP_ENV] = mode
                t, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
                matcher.score([image], CAPTIONS)
                ms = (time.perf_counter() - t) * 1000
                own, cpu = (time.thread_time() - own) * 1000, (time.process_time() - cpu) * 1000
                if i >= 3:  # three warm-up rounds
                    r["score"].append(ms)
                    r["cpu"].append(cpu)
                    r["caller_cpu"].append(own)
                    t = time.thread_time()
                    r["floor"].append(sum(floor()))
                    r["floor_cpu"].append((time.thread_time() - t) * 1000)
            two_cores()
            if i < 3:
                two_cores.reset()
    finally:
        if before is None:
            del os.environ[OVERLAP_ENV]
        else:
            os.environ[OVERLAP_ENV] = before
    out: dict[str, Any] = {
        mode: {
            "score_1x5_median_ms": _median(r["score"]),
            "floor_median_ms": _median(r["floor"]),
            "ratio": round(statistics.median(r["score"]) / statistics.median(r["floor"]), 3),
            "score_cpu_median_ms": _median(r["cpu"]),
            "score_calling_thread_cpu_median_ms": _median(r["caller_cpu"]),
            "floor_cpu_median_ms": _median(r["floor_cpu"]),
            "calling_thread_cpu_ratio": round(
                statistics.median(r["caller_cpu"]) / statistics.median(r["floor_cpu"]), 3
            ),
        }
        for mode, r in runs.items()
    }
    for mode, r in runs.items():
        out[mode] |= two_cores.summary(statistics.median(r["score"]))
    out["score_off_over_on"] = round(out["off"]["score_1x5_median_ms"] / out["on"]["score_1x5_median_ms"], 3)
    out["two_thread_speedup_before_after"] = [speedup_before, two_thread_speedup()]
    return {"overlap_ab": out}


def score_fusion_after_sources(matcher: Any, image: Path, captions: list[str]) -> np.ndarray:
    """ITM of one image against ``captions`` by the schedule ``Matcher.score`` replaced (``--schedule-ab``): the
    captions on the worker beside the image backbone as now, but every image source collected before the pair passes
    (the caller taking back the last queued detector and running the sources' work, the fusion's image side queued on
    the worker), then the passes in two halves, the second on the worker (fusion checkpoints only)."""
    from mklvisita.features import ImageFeatures
    from mklvisita.kernels import KernelEmbeddings
    from mklvisita.retrieval import ImageBank, encode_captions
    from mklvisita.sources.overlap import one_decision, start_torch
    from mklvisita.threads import inference_threads

    model = matcher.model
    with inference_threads(matcher.threads), one_decision(), torch.inference_mode():
        pv, _ = matcher.processor.images([image])
        texts = start_torch(encode_captions, model, matcher.processor, captions)
        started, img = model._backbone(pv, False)
        fusion_job = start_torch(model.prepare_fusion_image, img)
        img = start_torch(model._source_features, pv, img, started).collect()
        feats = ImageFeatures.cat([img.keep(model.fusion.image_levels)])
        bank = ImageBank(KernelEmbeddings.cat([model.embed_image(img)]), feats)
        texts = texts.collect()
        n = len(captions)
        ii, tt = torch.zeros(n, dtype=torch.long), torch.arange(n)
        s = model.similarity(bank.embeddings, texts.embeddings).similarity[ii, tt]
        prepared = fusion_job.collect()

        def probs(lo: int, hi: int) -> torch.Tensor:
            txt, emb_t = texts.features.select(tt[lo:hi]), texts.embeddings.select(tt[lo:hi])
            out = model.match(bank.features, txt, bank.embeddings, emb_t, ii[lo:hi], False, prepared, s[lo:hi])
            return out.prob.float()

        half = (n + 1) // 2
        second = start_torch(probs, half, n)
        first = probs(0, half)
        return torch.cat([first, second.collect()]).numpy()


def _alternate(
    matcher: Any, image: Path, calls: dict[str, Callable[[], Any]], repeats: int, atol: float | None = 0.0
) -> dict[str, Any]:
    """Time ``calls`` in turn, call by call with the overlap on, three warm-up rounds, each round followed by the
    floor: each call's median, its ratio to the floor's, and the first call's time over the second's. The calls'
    outputs are asserted equal within ``atol``; None: not asserted (they may differ), their largest absolute
    difference reported."""
    from mklvisita.sources.overlap import OVERLAP_ENV

    floor, before = _floor(matcher, image), os.environ.get(OVERLAP_ENV)
    runs: dict[str, list[float]] = {name: [] for name in calls} | {"floor": []}
    os.environ[OVERLAP_ENV] = "on"
    try:
        itm = [np.asarray(call()) for call in calls.values()]
        for other in itm[1:]:
            if atol is not None:
                np.testing.assert_allclose(itm[0], other, rtol=0, atol=atol)  # the same numbers
        for i in range(3 + repeats):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                if i >= 3:
                    runs[name].append((time.perf_counter() - t) * 1000)
            if i >= 3:
                runs["floor"].append(sum(floor()))
    finally:
        if before is None:
            del os.environ[OVERLAP_ENV]
        else:
            os.environ[OVERLAP_ENV] = before
    med = {name: statistics.median(xs) for name, xs in runs.items()}
    out: dict[str, Any] = {f"{name}_median_ms": round(v, 1) for name, v in med.items()}
    out |= {f"{name}_ratio": round(med[name] / med["floor"], 3) for name in calls}
    first, second = list(calls)[:2]
    out[f"{first}_over_{second}"] = round(med[first] / med[second], 3)
    if atol is None:
        out["largest_output_difference"] = float(max(np.abs(itm[0] - other).max() for other in itm[1:]))
    return out


def time_schedule_ab(matcher: Any, image: Path, repeats: int) -> dict[str, Any]:
    """``Matcher.score`` against :func:`score_fusion_after_sources`, call by call, overlap on (module docstring)."""
    if not matcher.model.has_itm:
        return {"schedule_ab": "needs a fusion checkpoint"}
    calls = {
        "fusion_beside_detectors": lambda: matcher.score([image], CAPTIONS).itm[0],
        "fusion_after_sources": lambda: score_fusion_after_sources(matcher, image, CAPTIONS),
    }
    # one pass over the five pairs against halves of three and two: the same ITM to float rounding
    return {"schedule_ab": _alternate(matcher, image, calls, repeats, atol=1e-6)}


def time_min_face_ab(matcher: Any, image: Path, repeats: int, other: int) -> dict[str, Any]:
    """``Matcher.score`` with the face detector's smallest face as shipped against ``other`` px, call by call, overlap
    on (module docstring); the photo must show the same faces at both sizes (its scores are asserted equal)."""
    from mklvisita.sources import person

    shipped = person.MIN_FACE

    def score_at(size: int) -> Callable[[], Any]:
        def call() -> Any:
            person.MIN_FACE = size
            try:
                r = matcher.score([image], CAPTIONS)
            finally:
                person.MIN_FACE = shipped
            return r.itm[0] if matcher.model.has_itm else r.similarity[0]

        return call

    calls = {f"min_face_{shipped}": score_at(shipped), f"min_face_{other}": score_at(other)}
    return {"min_face_ab": _alternate(matcher, image, calls, repeats)}


def time_options_ab(matcher: Any, checkpoint: str, image: Path, repeats: int, options: dict[str, Any]) -> dict:
    """``Matcher.score`` of the checkpoint as configured against the same checkpoint served with ``options`` merged
    into its ``kernels.options``, call by call, overlap on (module docstring)."""
    from mklvisita import Matcher, MKLVisITA

    other = Matcher(MKLVisITA.from_pretrained(checkpoint, source_options=options), threads=matcher.threads)

    def itm_of(m: Any) -> Callable[[], Any]:
        field = "itm" if m.model.has_itm else "similarity"
        return lambda: getattr(m.score([image], CAPTIONS), field)[0]

    calls = {"as_configured": itm_of(matcher), "with_options": itm_of(other)}
    out = _alternate(matcher, image, calls, repeats, atol=None)
    return {"options_ab": {"options": options} | out}


def time_explain(matcher: Any, image: Path, repeats: int) -> dict[str, Any]:
    shifts = matcher.model.config.kernels.map_shifts
    runs: dict[int, list[float]] = {shifts: [], 1: []}
    timers = PartTimers(matcher)
    try:
        with timers.active():
            for i in range(2 + 2 * repeats):
                for n in (shifts, 1):
                    matcher.model.config.kernels.map_shifts = n
                    timed = i >= 2 and n == shifts  # two warm-up rounds; parts of the checkpoint's own setting
                    with timers.call() if timed else _nothing():
                        t = time.perf_counter()
                        matcher.explain(image, CAPTIONS[0], method="kernel")
                        if i >= 2:
                            runs[n].append((time.perf_counter() - t) * 1000)
    finally:
        matcher.model.config.kernels.map_shifts = shifts
    out: dict[str, Any] = {f"explain_map_shifts_{n}_median_ms": _median(v) for n, v in runs.items()}
    out["explain_parts_median_ms"] = timers.medians(runs[shifts])
    if matcher.model.has_itm:  # the fusion's maps, at map_shifts as shipped: Grad-CAM and the checkpoint's default
        default = matcher.model.config.fusion.explain_method  # what the demo shows (Matcher.explain's method=None)
        methods = {"gradcam": [], default: []}
        for i in range(2 + repeats):
            for method, times in methods.items():
                t = time.perf_counter()
                matcher.explain(image, CAPTIONS[0], method=method)
                if i >= 2:
                    times.append((time.perf_counter() - t) * 1000)
        out["explain_gradcam_median_ms"] = _median(methods["gradcam"])
        out["explain_default_method"] = default
        out["explain_default_median_ms"] = _median(methods[default])
    return out


@contextmanager
def _nothing():
    yield


# --------------------------------------------------------------------------------------------- scores
def score_set() -> list[tuple[str, Path, list[str]]]:
    """(name, image, captions): the example photos with their captions, and the STAMP_FILES that are installed
    against STAMP_CAPTIONS."""
    examples = ROOT / "assets" / "examples"
    spec = json.loads((examples / "examples.json").read_text())["examples"]
    out = [(ex["image"], examples / ex["image"], list(ex["captions"])) for ex in spec]
    out += [(f"tuxpaint/{s}", STAMPS / s, STAMP_CAPTIONS) for s in STAMP_FILES if (STAMPS / s).is_file()]
    return out


def save_scores(matcher: Any) -> dict[str, Any]:
    out = {}
    for name, image, captions in score_set():
        r = matcher.score([image], captions)
        out[name] = {
            "captions": captions,
            "kernel_names": list(r.kernel_names),
            "similarity": np.asarray(r.similarity, dtype=np.float64)[0].tolist(),
            "kernel_contributions": np.asarray(r.kernel_contributions, dtype=np.float64)[0].tolist(),
        }
    return out


def compare_scores(scores: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Largest |difference| in S and in any kernel's contribution, over the images both files hold."""
    diffs, per_image = [], {}
    for name, ref in reference.items():
        if name not in scores:
            continue
        now = scores[name]
        if now["kernel_names"] != ref["kernel_names"] or now["captions"] != ref["captions"]:
            raise SystemExit(f"{name}: kernels or captions differ from the reference; compare like with like")
        d = max(
            float(np.abs(np.subtract(now["similarity"], ref["similarity"])).max()),
            float(np.abs(np.subtract(now["kernel_contributions"], ref["kernel_contributions"])).max()),
        )
        per_image[name] = d
        diffs.append(d)
    return {"images_compared": len(diffs), "max_abs_diff": max(diffs) if diffs else None, "per_image": per_image}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "mklvisita-photo"))
    parser.add_argument("--repeats", type=int, default=30)
    # One thread by default: on a shared 2-core machine torch's default of 2 threads oversubscribes the cores (the
    # same call measured ~10x slower at 2 threads while other jobs ran); pass --threads 2 on an idle machine.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--explain", action="store_true", help="also time explain with and without map_shifts")
    parser.add_argument("--image", default=str(ROOT / "assets" / "examples" / "cat.jpg"), help="the photo scored")
    parser.add_argument("--save-scores", help="write the example and stamp scores here (no timing)")
    parser.add_argument("--compare-scores", help="with --save-scores: the largest difference from this reference")
    parser.add_argument("--overlap-ab", action="store_true", help="also time score with the overlap off and on in turn")
    parser.add_argument("--timeline", action="store_true", help="also give the median score call's schedule")
    parser.add_argument("--schedule-ab", action="store_true", help="also time score against its previous schedule")
    parser.add_argument("--min-face-ab", type=int, metavar="PX", help="also time score against this smallest face")
    parser.add_argument("--options-ab", metavar="JSON", help="also time score against these source settings")
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mklvisita import Matcher

    t0 = time.perf_counter()
    matcher = Matcher.from_pretrained(args.checkpoint)
    load_s = time.perf_counter() - t0
    if args.save_scores:
        scores = save_scores(matcher)
        Path(args.save_scores).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_scores).write_text(json.dumps(scores, indent=1) + "\n")
        if args.compare_scores:
            result = compare_scores(scores, json.loads(Path(args.compare_scores).read_text()))
            print(json.dumps(result, indent=2))
        return 0
    image = Path(args.image)
    from mklvisita.sources.overlap import OVERLAP_ENV, overlap_enabled

    result = {"checkpoint": Path(args.checkpoint).name, "image": image.name, "threads": args.threads}
    result["overlap"] = {"enabled": overlap_enabled(), OVERLAP_ENV: os.environ.get(OVERLAP_ENV, "")}
    env = [f"{OVERLAP_ENV}={os.environ[OVERLAP_ENV]}"] if os.environ.get(OVERLAP_ENV) else []
    args_given = sys.argv[1:] if argv is None else argv
    result["command"] = " ".join([*env, "python benchmarks/photo_score.py", shlex.join(args_given)]).strip()
    result |= time_score(matcher, image, args.repeats, args.threads, args.timeline)
    result["load_s"] = round(load_s, 2)
    if args.overlap_ab:
        result |= time_overlap_ab(matcher, image, args.repeats, args.threads)
    if args.schedule_ab:
        result |= time_schedule_ab(matcher, image, 2 * args.repeats)
    if args.min_face_ab:
        result |= time_min_face_ab(matcher, image, 2 * args.repeats, args.min_face_ab)
    if args.options_ab:
        result |= time_options_ab(matcher, args.checkpoint, image, 2 * args.repeats, json.loads(args.options_ab))
    if args.explain:
        result |= time_explain(matcher, image, args.repeats)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
