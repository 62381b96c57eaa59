"""The demo under load: latency and throughput under concurrent gradio_client clients, then RSS and the temp folder
after many sequential requests with distinct images.

    python -m benchmarks.demo_load [--quick] [--clients 16] [--requests 50] [--sequential 1000] [--first 100]
        [--inputs examples|distinct] [--url URL --pid PID --temp-dir DIR]
    python -m benchmarks.demo_load --compare [--inputs examples|distinct] [--clients 16] [--requests 50]
        [--before GIT_REF] [--endpoint match|search]

Decisions:

- The app is launched as users launch it, ``python app.py --port <free port>``, in its own process with
  ``GRADIO_TEMP_DIR`` set to a fresh folder, so the figures do not depend on how ``app.py`` is organised inside and
  the temp folder holds only this run's files. ``--url/--pid/--temp-dir`` measure an app that is already running
  instead (the load-and-fault test shares its app this way).
- Phase 1, concurrency: ``--clients`` threads, each with its own ``gradio_client.Client``, send ``--requests``
  ``/match`` requests each (the example photos and shapes, their captions); p50/p95 of each request's latency as the
  client sees it (queueing included: the app runs one model call at a time) and throughput = requests / wall time.
  ``--inputs examples`` (the default) sends the four example requests over and over, so after the first of each the
  demo's result cache answers and what is measured is everything but the model; ``--inputs distinct`` sends every
  request a photo never sent before (an example photo with one pixel changed, JPEG, made before the clock starts),
  so each request costs a model call, as a crowd of visitors with their own photos would.
- ``--compare``: before and after batching in one run. The concurrent phase runs twice, each against a fresh app:
  first with ``MKLVISITA_BATCHING=off`` (Match one request at a time in the shared model slot, every figure drawn
  again), then with batching on; each app gets one warm-up request per
  example first. The sequential phase is skipped; rows say ``batching`` off/on and the JSON gives the ratios.
- ``--compare`` rows also give the app process's CPU time per answered request (user + system, all its threads,
  over the concurrent phase): unlike latency and throughput it hardly depends on what else the machine runs; and
  the machine's 1-minute load average at the phase's start and end (what else ran).
- ``--before GIT_REF`` adds a first row to ``--compare``: the demo as it was at that commit (a ``git worktree`` of it
  in the run's temp folder, its own ``app.py``, library and checkpoints, on this environment's packages), served as
  it served then, with the same clients and inputs; the JSON adds the ratios of batching on to it. Off/on measure
  batching in today's code; before/on measure everything between that commit and today (batching, the cheaper
  Match figure, whatever else changed in the library).
- ``--endpoint search`` (with ``--compare``) sends text queries instead of Match requests: ``/search`` over the
  example gallery, each client's queries drawn in turn from the example captions (with ``--inputs distinct``, each
  one a caption never sent before: a number appended), top 3. The search cache keeps the gallery's index, so a
  request costs its query's encoding and ranking.
- Phase 2, memory: ``--sequential`` requests one after another, each with an image never seen before (random
  noise with a coloured square, 320 x 240 PNG, seeded by the request number), alternating ``/match`` and
  ``/explain``, so every input-keyed cache sees only misses. The app process's RSS (psutil) after ``--first``
  requests and after all of them, and the temp folder's file count and size at both marks. Bounded = RSS growth
  within 10-15% (the demo's memory bound) and a temp folder that stops growing once gradio's cache deletion runs (every
  ``app.CACHE_SECONDS``; a run shorter than that sees the folder grow by the uploads and outputs of the run).
- ``--quick``: 2 clients x 3 requests, 6 sequential (mark after 3): a test checks the output's shape, not a time.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, parser, report, setup

EXAMPLES = ROOT / "assets" / "examples"
REQUESTS = [  # (image, captions): the examples a visitor clicks first
    ("cat.jpg", "a cat\na dog\na cup of coffee"),
    ("coffee.jpg", "a cup of coffee\na rocket\na cat"),
    ("rocket.jpg", "a rocket taking off\nan astronaut\na cat"),
    ("shapes_004.png", "a large purple cross and a yellow star\na small red circle"),
]


# ------------------------------------------------------------------------------------------ the app process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(
    temp_dir: Path,
    log: Path,
    port: int | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> tuple[Any, str]:
    """``python app.py --port P`` in ``cwd`` (the repository by default) with GRADIO_TEMP_DIR = temp_dir (and
    ``env``), output to ``log``; (Popen, url)."""
    port = port or free_port()
    env = {
        **os.environ,
        **(env or {}),
        "GRADIO_TEMP_DIR": str(temp_dir),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), *args], cwd=cwd, env=env, stdout=out, stderr=out
        )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: Any, url: str, log: Path, timeout: float = 600.0) -> None:
    """Poll until the app answers (it loads its checkpoint first); raise with the log's tail if it exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the app exited with {proc.returncode} before serving:\n{tail}")
        try:
            if httpx.get(f"{url}/config", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the app did not answer within {timeout:.0f} s")


def stop_app(proc: Any) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def folder_stats(folder: Path) -> tuple[int, int]:
    """(files, bytes) under a folder, recursively."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(root, name))
                files += 1
            except OSError:  # deleted meanwhile by gradio's cache deletion
                pass
    return files, size


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# ------------------------------------------------------------------------------------------ the phases
def _client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def match_once(client: Any, image: Path | str, captions: str) -> dict:
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), captions, api_name="/match")[2]


def search_once(client: Any, query: str) -> Any:
    """A text query over the example gallery (no uploads), top 3; the hits' labels."""
    return client.predict(query, None, None, "", 3, api_name="/search")[0]


def search_queries(n: int, distinct: bool) -> list[str]:
    """``n`` text queries: the example captions in turn, each made new by its number when ``distinct``."""
    captions = [c for _, cs in REQUESTS for c in cs.split("\n")]
    return [captions[i % len(captions)] + (f" {i}" if distinct else "") for i in range(n)]


def distinct_photos(n: int, folder: Path) -> list[Path]:
    """``n`` JPEGs, each an example photo of :data:`REQUESTS` (in turn) with one pixel set from its number: the same
    work for the model as the example, a different digest for the demo's result cache."""
    from PIL import Image

    originals = [np.asarray(Image.open(EXAMPLES / image).convert("RGB")) for image, _ in REQUESTS]
    paths = []
    for i in range(n):
        a = originals[i % len(originals)].copy()
        a[0, 0] = (i % 256, (i // 256) % 256, 255)
        path = folder / f"distinct_{i:05d}.jpg"
        Image.fromarray(a).save(path, quality=95)
        paths.append(path)
    return paths


def concurrent_phase(
    url: str, clients: int, requests: int, photos: list[Path] | None = None, queries: list[str] | None = None
) -> dict[str, Any]:
    """``clients`` threads x ``requests`` /match calls; latencies (s) of the answered ones and the failures.

    ``photos``: one image per request (client k's i-th request sends ``photos[k * requests + i]`` with the captions
    of its example), instead of the example images themselves. ``queries``: /search text queries instead of /match
    (client k's i-th request sends ``queries[k * requests + i]``)."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def work(k: int) -> None:
        client = _client(url)
        barrier.wait()
        for i in range(requests):
            n = k * requests + i
            image, captions = REQUESTS[n % len(REQUESTS)] if photos else REQUESTS[(k + i) % len(REQUESTS)]
            path = photos[n] if photos else EXAMPLES / image
            t = time.perf_counter()
            try:
                if queries is not None:
                    search_once(client, queries[n])
                else:
                    match_once(client, path, captions)
                with lock:
                    latencies.append(time.perf_counter() - t)
            except Exception as e:  # counted, reported
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": clients * requests,
        "answered": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "throughput_rps": len(latencies) / wall,
        "wall_s": wall,
    }


def distinct_image(i: int, path: Path) -> Path:
    """A 320 x 240 PNG no request has sent before: seeded noise with a coloured square."""
    from PIL import Image

    rng = np.random.default_rng(i)
    a = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    y, x = rng.integers(0, 160), rng.integers(0, 240)
    a[y : y + 80, x : x + 80] = rng.integers(0, 256, 3, dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def sequential_phase(url: str, pid: int | None, temp_dir: Path | None, n: int, first: int) -> dict[str, Any]:
    """``n`` requests with distinct images, /match and /explain alternating; RSS and temp folder at two marks."""
    from gradio_client import handle_file

    client = _client(url)
    marks: dict[int, dict[str, float]] = {}
    failures: list[str] = []
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(n):
            path = distinct_image(i, Path(scratch) / f"distinct_{i:05d}.png")
            t = time.perf_counter()
            try:
                if i % 2 == 0:
                    match_once(client, path, "a coloured square\na photo of a cat\nnoise")
                else:
                    client.predict(
                        handle_file(str(path)), "a coloured square", "default", "kernel", "per_map", api_name="/explain"
                    )
                latencies.append(time.perf_counter() - t)
            except Exception as e:  # counted, reported
                failures.append(f"{type(e).__name__}: {e}")
            path.unlink()
            if i + 1 in (first, n):
                files, size = folder_stats(temp_dir) if temp_dir else (0, 0)
                marks[i + 1] = {
                    "rss_mb": rss_mb(pid) if pid else float("nan"),
                    "temp_files": files,
                    "temp_mb": size / 2**20,
                }
    a, b = marks[first], marks[n]
    return {
        "requests": n,
        "failed": len(failures),
        "failures": failures[:5],
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "first": first,
        "rss_first_mb": a["rss_mb"],
        "rss_mb": b["rss_mb"],
        "rss_growth": b["rss_mb"] / a["rss_mb"] if a["rss_mb"] else float("nan"),
        "temp_files_first": a["temp_files"],
        "temp_files": b["temp_files"],
        "temp_mb_first": a["temp_mb"],
        "temp_mb": b["temp_mb"],
    }


# ------------------------------------------------------------------------------------------ main
def _photos_for(args: Any, folder: Path) -> list[Path] | None:
    return distinct_photos(args.clients * args.requests, folder) if args.inputs == "distinct" else None


def worktree(ref: str, folder: Path) -> tuple[Path, str]:
    """A detached ``git worktree`` of ``ref`` at ``folder``; (its root, the commit's short id)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if commit.returncode != 0:
        raise ValueError(f"--before {ref!r} is not a commit of this repository: {commit.stderr.strip()}")
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=ROOT, check=True, capture_output=True)
    return folder, commit.stdout.strip()


def code_state() -> str:
    """The commit the apps run, and the files of the app's code (``app.py``, ``demo/``, ``mklvisita/``) that differ
    from it in the working tree."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "app.py", "demo", "mklvisita"], cwd=ROOT, capture_output=True, text=True
    )
    files = [line[3:] for line in changed.stdout.splitlines() if line.strip()]
    state = f"commit {head.stdout.strip() or 'unknown'}"
    return state + (f" with uncommitted changes to {', '.join(files)}" if files else " (app code as committed)")


def remove_worktree(folder: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, capture_output=True)


def compare(args: Any) -> dict:
    """The concurrent phase with batching off, then on, each against a fresh app (see the module's decisions); with
    ``--before``, first against the demo at that commit."""
    rows = []
    code = code_state()  # when the apps start
    search = args.endpoint == "search"
    with tempfile.TemporaryDirectory(prefix="demo-load-") as work:
        photos = None if search else _photos_for(args, Path(work))
        queries = search_queries(args.clients * args.requests, args.inputs == "distinct") if search else None
        modes: list[tuple[str, Path, str | None]] = [("off", ROOT, None), ("on", ROOT, None)]
        tree = None
        if args.before:
            tree, commit = worktree(args.before, Path(work) / "before")
            modes.insert(0, (f"before (commit {commit})", tree, commit))
        try:
            for mode, root, commit in modes:
                rows.append(_compare_one(args, Path(work), mode, root, commit, photos, queries))
        finally:
            if tree is not None:
                remove_worktree(tree)
    by_mode = {row["batching"] if row["batching"] in ("off", "on") else "before": row for row in rows}
    off, on = by_mode["off"], by_mode["on"]
    extra: dict[str, Any] = {
        "p50_on_over_off": on["p50_ms"] / off["p50_ms"],
        "throughput_on_over_off": on["throughput_rps"] / off["throughput_rps"],
    }
    if "before" in by_mode:
        before = by_mode["before"]
        extra["p50_on_over_before"] = on["p50_ms"] / before["p50_ms"]
        extra["throughput_on_over_before"] = on["throughput_rps"] / before["throughput_rps"]
        extra["before"] = args.before
    extra["code"] = code
    extra["settings"] = {k: getattr(args, k) for k in ("clients", "requests", "inputs", "endpoint")}
    extra["command"] = " ".join(["python -m benchmarks.demo_load", *args.argv])
    print(json.dumps(extra))
    name = args.name or f"demo_load_compare_{args.inputs}" + ("_search" if search else "")
    return report(name, args, rows, extra)


def _compare_one(
    args: Any, work: Path, mode: str, root: Path, commit: str | None, photos: list[Path] | None, queries: list | None
) -> dict[str, Any]:
    """One row of :func:`compare`: a fresh app (``root``'s app.py; batching ``mode`` when it is off/on), warmed up,
    then the concurrent phase."""
    tag = "before" if commit else mode
    temp_dir, log = work / f"gradio-{tag}", work / f"app-{tag}.log"
    temp_dir.mkdir()
    env = {"MKLVISITA_BATCHING": mode} if commit is None else {"PYTHONPATH": str(root)}
    proc, url = start_app(temp_dir, log, env=env, cwd=root)
    try:
        t = time.perf_counter()
        wait_ready(proc, url, log)
        started = time.perf_counter() - t
        client = _client(url)
        for image, captions in REQUESTS:  # warm-up: lazily loaded parts, and the examples' cache entries
            match_once(client, EXAMPLES / image, captions)
        if queries is not None:
            search_once(client, "a photo")  # the example gallery's index
        cpu0, load0 = cpu_s(proc.pid), os.getloadavg()[0]
        conc = concurrent_phase(url, args.clients, args.requests, photos, queries)
        conc["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # at the start and the end
        conc["app_cpu_ms_per_request"] = 1000 * (cpu_s(proc.pid) - cpu0) / max(1, conc["answered"])
        conc["rss_after_mb"] = rss_mb(proc.pid)
    finally:
        stop_app(proc)
    failures = conc.pop("failures")
    endpoint = "/search" if queries is not None else "/match"
    row = {"phase": f"concurrent {endpoint}", "batching": mode, "inputs": args.inputs, **conc}
    row["app_started_s"] = started
    if failures:
        row["first_failures"] = failures
    return row


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50, help="requests per client in the concurrent phase")
    p.add_argument("--sequential", type=int, default=1000, help="requests with distinct images, one at a time")
    p.add_argument("--first", type=int, default=100, help="the early RSS mark of the sequential phase")
    p.add_argument(
        "--inputs",
        choices=("examples", "distinct"),
        default="examples",
        help="concurrent phase: the example requests over and over, or a photo never sent before per request",
    )
    p.add_argument("--compare", action="store_true", help="concurrent phase with batching off, then on (fresh apps)")
    p.add_argument(
        "--before",
        default=None,
        metavar="GIT_REF",
        help="with --compare: first the demo as it was at this commit (a git worktree; see the decisions)",
    )
    p.add_argument(
        "--endpoint",
        choices=("match", "search"),
        default="match",
        help="with --compare: /match requests (default) or /search text queries over the example gallery",
    )
    p.add_argument("--name", default=None, help="with --compare: the JSON's name (default demo_load_compare_INPUTS)")
    p.add_argument("--url", default=None, help="measure an app already running here instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="with --url: the app's process id (for its RSS)")
    p.add_argument("--temp-dir", default=None, help="with --url: its GRADIO_TEMP_DIR")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    setup(args)
    if args.quick:
        args.clients, args.requests, args.sequential, args.first = 2, 3, 6, 3
    if args.compare:
        if args.url:
            p.error("--compare starts its own apps (batching off, then on); leave out --url")
        return compare(args)
    if args.before or args.endpoint != "match" or args.name:
        p.error("--before, --endpoint and --name go with --compare")
    first = min(args.first, args.sequential)

    proc, work = None, None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
        temp_dir = Path(args.temp_dir) if args.temp_dir else None
    else:
        work = tempfile.TemporaryDirectory(prefix="demo-load-")
        temp_dir, log = Path(work.name) / "gradio", Path(work.name) / "app.log"
        temp_dir.mkdir()
        proc, url = start_app(temp_dir, log)
        pid = proc.pid
    try:
        if proc is not None:
            t = time.perf_counter()
            wait_ready(proc, url, log)
            start_s = time.perf_counter() - t
        rest = {"rss_at_rest_mb": rss_mb(pid) if pid else float("nan")}
        with tempfile.TemporaryDirectory(prefix="demo-load-photos-") as folder:
            conc = concurrent_phase(url, args.clients, args.requests, _photos_for(args, Path(folder)))
        conc["rss_after_mb"] = rss_mb(pid) if pid else float("nan")
        seq = sequential_phase(url, pid, temp_dir, args.sequential, first)
        alive = proc is None or proc.poll() is None
    finally:
        if proc is not None:
            stop_app(proc)
        if work is not None:
            work.cleanup()
    rows = [
        {"phase": "concurrent /match", "inputs": args.inputs, **{k: v for k, v in conc.items() if k != "failures"}},
        {"phase": "sequential, distinct images", **{k: v for k, v in seq.items() if k != "failures"}},
    ]
    extra = {
        **rest,
        "app_started_s": start_s if proc is not None else None,
        "still_serving": alive,
        "failures": conc["failures"] + seq["failures"],
        "settings": {k: getattr(args, k) for k in ("clients", "requests", "sequential")} | {"first": first},
    }
    return report("demo_load", args, rows, extra)


if __name__ == "__main__":
    main()
    sys.exit(0)
