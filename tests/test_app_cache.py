"""The demo's temp folder stays bounded: gradio's delete_cache removes old uploads and outputs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from tests.app_fixtures import SHAPES, app_checkpoint, free_port, matcher  # noqa: F401


def _files(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


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
        counts = []
        for i in range(12):
            client.predict(handle_file(str(SHAPES[i % len(SHAPES)])), f"a red circle {i}", api_name="/match")
            counts.append(_files(tmp_path))
        time.sleep(3)
        after = _files(tmp_path)
    finally:
        demo.close()
    assert max(counts) > 0, "the requests left no files: the test measured nothing"
    assert after < max(counts) and max(counts[6:]) <= 2 * max(counts[:6]) + 4, counts
