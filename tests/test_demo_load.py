"""Load and faults against the demo as users launch it (``python app.py`` in its own process, GRADIO_TEMP_DIR set):
a few gradio_client clients at once, good requests mixed with bad ones, twice over.

Asserts: every good request is answered (with the numbers a lone request gets), every bad one is refused with a
plain message (no gradio "upstream app has raised an exception", no server path, no traceback, not even in the
server log), the app still serves afterwards, and the temp folder is bounded: uploads and outputs are stored by
content, so repeating the same requests adds no file (distinct inputs are removed by gradio's cache deletion after
``app.CACHE_SECONDS``, tested with a short interval in test_app_cache.py). The full 16 x 50 run and 1,000 distinct
requests are ``python -m benchmarks.demo_load`` (docs/benchmarks.md); its ``--quick`` mode is checked here too.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from benchmarks import demo_load
from mklvisita.inputs import MAX_CAPTIONS, MAX_IMAGES

pytestmark = pytest.mark.slow

CLIENTS = 3
GENERIC = "upstream app has raised an exception"


@pytest.fixture(scope="module")
def app_process(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-load")
    temp, log = work / "gradio", work / "app.log"
    temp.mkdir()
    proc, url = demo_load.start_app(temp, log)
    try:
        demo_load.wait_ready(proc, url, log, timeout=600)
        yield proc, url, temp, log
    finally:
        demo_load.stop_app(proc)


def _requests(scratch: Path) -> list[tuple[str, str, tuple, str | None]]:
    """(kind, endpoint, arguments, expected message pattern for a bad one)."""
    from gradio_client import handle_file

    examples = demo_load.EXAMPLES
    cat = handle_file(str(examples / "cat.jpg"))
    notes = scratch / "notes.png"
    notes.write_text("these are notes, not a picture")
    good = [
        ("good", "/match", (handle_file(str(examples / image)), captions), None)
        for image, captions in demo_load.REQUESTS
    ]
    good.append(("good", "/explain", (cat, "a tabby cat", "default", "kernel", "per_map"), None))
    bad = [
        ("bad", "/match", (cat, "  \n "), "caption"),
        ("bad", "/match", (handle_file(str(notes)), "a cat"), r"notes\.png"),
        ("bad", "/match", (cat, "\n".join(f"c{i}" for i in range(MAX_CAPTIONS + 1))), f"limit is {MAX_CAPTIONS}"),
        ("bad", "/match", (cat, "a cat " * 100), "characters long"),
        ("bad", "/match", (cat, 5), "text"),
        ("bad", "/explain", (cat, "a cat", "abc", "kernel", "per_map"), "whole number"),
        ("bad", "/matrix", ([cat] * (MAX_IMAGES + 1), "a cat", "similarity"), f"limit is {MAX_IMAGES}"),
    ]
    return good + bad


def _round(url: str, requests: list) -> list[tuple[tuple, object]]:
    """Every client sends every request (each client from a different start); (request, result or exception)."""
    out, lock = [], threading.Lock()

    def work(k: int) -> None:
        client = demo_load._client(url)
        for i in range(len(requests)):
            req = requests[(k * 3 + i) % len(requests)]
            try:
                result = client.predict(*req[2], api_name=req[1])
            except Exception as e:  # judged below
                result = e
            with lock:
                out.append((req, result))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(CLIENTS)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def _ranking(info: dict) -> list[tuple[str, float]]:
    """(caption, score) in rank order from /match's JSON output."""
    return [(row["caption"], round(row["score"], 5)) for row in info["ranking"]]


def test_clients_with_bad_inputs_mixed_in(app_process, tmp_path):
    from gradio_client.exceptions import AppError

    proc, url, temp, log = app_process
    requests = _requests(tmp_path)
    client = demo_load._client(url)
    good_matches = [req for req in requests if req[:2] == ("good", "/match")]
    alone = {req[2][1]: _ranking(client.predict(*req[2], api_name="/match")[2]) for req in good_matches}

    files = []
    for _ in range(2):
        results = _round(url, requests)
        assert len(results) == CLIENTS * len(requests)
        for (kind, endpoint, args, pattern), result in results:
            if kind == "good":
                assert not isinstance(result, Exception), f"{endpoint} failed: {result!r}"
                if endpoint == "/match":
                    assert _ranking(result[2]) == alone[args[1]]  # the same numbers under load
                continue
            assert isinstance(result, AppError), f"{endpoint} {args[1:]!r}: expected a refusal, got {result!r}"
            message = str(result)
            assert re.search(pattern, message), message
            assert GENERIC not in message and "Traceback" not in message
            assert str(temp) not in message and str(tmp_path) not in message and "/tmp/" not in message
        files.append(demo_load.folder_stats(temp)[0])
    assert files[0] > 0 and files[1] == files[0], f"temp folder grew from {files[0]} to {files[1]} files"

    assert proc.poll() is None, "the app died"
    image, captions = demo_load.REQUESTS[0]
    assert _ranking(demo_load.match_once(client, demo_load.EXAMPLES / image, captions)) == alone[captions]
    server_log = log.read_text(errors="replace")
    assert "Traceback" not in server_log, server_log[-3000:]


def _empty_tmp_files(temp: Path) -> list[Path]:
    """Empty ``tmpXXXXXXXX`` files at the top of the temp folder: what gradio 6.31's ``gr.File(type="filepath")``
    preprocessing leaves per file it receives (``NamedTemporaryFile(delete=False)``, never written, never tracked, so
    ``delete_cache`` never removes it). The demo's file events skip that preprocessing (``demo.ui.RAW_INPUTS``)."""
    return [p for p in temp.iterdir() if p.is_file() and p.name.startswith("tmp") and p.stat().st_size == 0]


def test_file_inputs_leave_no_untracked_files(app_process):
    """Multi-file uploads to /matrix and /search add no untracked file to the temp folder (gr.File would add one per
    image)."""
    from gradio_client import handle_file

    _, url, temp, _ = app_process
    client = demo_load._client(url)
    before = len(_empty_tmp_files(temp))
    images = [handle_file(str(demo_load.EXAMPLES / name)) for name in ("cat.jpg", "rocket.jpg")]
    client.predict(images, "a cat\na rocket", "similarity", api_name="/matrix")
    assert len(_empty_tmp_files(temp)) == before, "gr.File preprocessing left an empty temp file per upload (/matrix)"
    found = client.predict("a rocket", None, images, "", 2, api_name="/search")[0]
    assert len(found) == 2
    assert len(_empty_tmp_files(temp)) == before, "gr.File preprocessing left an empty temp file per upload (/search)"


def test_demo_load_quick_has_the_documented_columns(app_process, tmp_path):
    proc, url, temp, _ = app_process
    out = demo_load.main(
        ["--quick", "--out", str(tmp_path), "--url", url, "--pid", str(proc.pid), "--temp-dir", str(temp)]
    )
    assert json.loads((tmp_path / "demo_load.json").read_text())["rows"] == out["rows"]
    concurrent, sequential = out["rows"]
    assert concurrent["requests"] == concurrent["answered"] == 2 * 3 and concurrent["failed"] == 0
    assert {"p50_ms", "p95_ms", "throughput_rps", "rss_after_mb"} <= set(concurrent)
    assert concurrent["p95_ms"] >= concurrent["p50_ms"] > 0 and concurrent["throughput_rps"] > 0
    assert sequential["requests"] == 6 and sequential["first"] == 3 and sequential["failed"] == 0
    assert sequential["rss_mb"] > 0 and sequential["rss_first_mb"] > 0 and sequential["temp_files"] > 0
    assert {"rss_growth", "temp_files_first", "temp_mb_first", "temp_mb"} <= set(sequential)
    assert out["still_serving"] and out["rss_at_rest_mb"] > 0


def test_demo_load_compare_quick_measures_batching_off_then_on(tmp_path):
    """``--compare``: two fresh apps, batching off then on, each answering every request (no time is asserted)."""
    out = demo_load.main(["--compare", "--quick", "--inputs", "distinct", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "demo_load_compare_distinct.json").read_text())["rows"] == out["rows"]
    off, on = out["rows"]
    assert (off["batching"], on["batching"]) == ("off", "on") and off["inputs"] == on["inputs"] == "distinct"
    for row in (off, on):
        assert row["requests"] == row["answered"] == 2 * 3 and row["failed"] == 0 and row["throughput_rps"] > 0
    assert out["throughput_on_over_off"] == on["throughput_rps"] / off["throughput_rps"]
    assert out["command"] == "python -m benchmarks.demo_load --compare --quick --inputs distinct --out " + str(tmp_path)


def test_demo_load_compare_quick_before_a_commit_and_on_search(tmp_path):
    """``--before REF``: a first app from a git worktree of that commit, then off and on; ``--endpoint search``
    sends text queries. Every request answered, the worktree removed afterwards (no time is asserted)."""
    import subprocess

    args = ["--compare", "--quick", "--endpoint", "search", "--before", "HEAD", "--name", "s", "--out", str(tmp_path)]
    out = demo_load.main(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=demo_load.ROOT, capture_output=True, text=True)
    before, off, on = out["rows"]
    assert before["batching"] == f"before (commit {commit.stdout.strip()})"
    assert (off["batching"], on["batching"]) == ("off", "on")
    for row in (before, off, on):
        assert row["phase"] == "concurrent /search" and row["answered"] == row["requests"] == 6 and row["failed"] == 0
    assert out["throughput_on_over_before"] == on["throughput_rps"] / before["throughput_rps"]
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == out["rows"]
    assert all(len(row["load_avg_1min"]) == 2 and row["app_cpu_ms_per_request"] > 0 for row in out["rows"])
    assert out["code"].startswith("commit ")
    trees = subprocess.run(["git", "worktree", "list"], cwd=demo_load.ROOT, capture_output=True, text=True).stdout
    assert "demo-load-" not in trees


def test_demo_load_before_needs_a_commit_and_compare(tmp_path):
    with pytest.raises(ValueError, match="not a commit"):
        demo_load.main(["--compare", "--quick", "--before", "no-such-ref-anywhere", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        demo_load.main(["--quick", "--before", "HEAD", "--out", str(tmp_path)])
