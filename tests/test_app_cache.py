"""The demo's temp folder stays bounded: gradio's delete_cache removes old uploads and outputs, and the app removes
the folders that leaves empty (demo.temp_folder)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from demo.temp_folder import prune_empty_folders
from tests.app_fixtures import SHAPES, app_checkpoint, free_port, matcher  # noqa: F401

DEADLINE_S = 60  # a loaded machine may run the deletion late; the test waits up to this long, polling


def _files(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


def _empty_folders(folder: Path) -> list[Path]:
    return [d for d in folder.rglob("*") if d.is_dir() and not any(d.iterdir())]


def _wait_for(condition, deadline_s: float = DEADLINE_S) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def test_prune_removes_only_old_empty_folders(tmp_path: Path) -> None:
    old_empty, new_empty, full = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (old_empty, new_empty, full):
        d.mkdir()
    (full / "upload.png").write_bytes(b"x")
    past = time.time() - 100
    os.utime(old_empty, (past, past))
    os.utime(full, (past, past))
    assert prune_empty_folders(tmp_path, age=10) == 1
    assert not old_empty.exists() and new_empty.is_dir() and (full / "upload.png").is_file() and tmp_path.is_dir()
    assert prune_empty_folders(tmp_path / "missing", age=10) == 0


@pytest.mark.slow
def test_temp_folder_stays_bounded(matcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    import app

    demo = app.create_demo(matcher, cache_seconds=1)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **app.launch_kwargs()
    )
    try:
        client = Client(url, verbose=False)
        kept = _files(tmp_path)  # the examples' copies, which gradio keeps for good
        counts = []
        for i in range(12):
            client.predict(handle_file(str(SHAPES[i % len(SHAPES)])), f"a red circle {i}", api_name="/match")
            counts.append(_files(tmp_path))
        folders = sum(1 for d in tmp_path.rglob("*") if d.is_dir())
        # Polled with a deadline instead of a fixed sleep: every file and every folder goes once the deletion ran.
        emptied = _wait_for(lambda: _files(tmp_path) <= kept and not _empty_folders(tmp_path))
        after, empty = _files(tmp_path), _empty_folders(tmp_path)
    finally:
        demo.close()
    assert max(counts) > kept and folders > 0, "the requests left no files: the test measured nothing"
    assert max(counts[6:]) <= 2 * max(counts[:6]) + 4, counts
    assert emptied, f"{after} files and {len(empty)} empty folders left after {DEADLINE_S} s"
