"""The launched demo driven through gradio_client and plain HTTP: named endpoints, errors, the file route."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from demo.match import match
from tests.app_fixtures import (  # noqa: F401
    CAT,
    ROOT,
    SHAPES,
    app_checkpoint,
    matcher,
    photo_matcher,
    server,
    server_matcher,
    shapes_matcher,
)


@pytest.fixture(scope="module")
def client(server) -> Client:  # noqa: F811
    _, url = server
    return Client(url, verbose=False, download_files=False)


def test_match_endpoint_returns_the_handler_result(client: Client, server_matcher) -> None:  # noqa: F811
    captions = "a purple cross\na yellow star\na red circle"
    table, _plot, result, _selector = client.predict(handle_file(str(SHAPES[0])), captions, api_name="/match")
    expected = match(server_matcher, str(SHAPES[0]), captions).result
    assert [row["caption"] for row in result["ranking"]] == [row["caption"] for row in expected["ranking"]]
    for got, want in zip(result["ranking"], expected["ranking"]):
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert [row[1] for row in table["data"]] == [row["caption"] for row in expected["ranking"]]


def test_explain_matrix_and_search_endpoints(client: Client) -> None:
    heat, words, _word, kernels, info = client.predict(
        handle_file(str(CAT)), "a tabby cat", "default", "kernel", "per_map", api_name="/explain"
    )
    assert heat and info["tokens"] == ["a", "tabby", "cat"] and [w["caption"] for w in words] == info["tokens"]
    maps = ["concept_local/cosine", "colour/share", "scene_text/match", "person/share"]  # the photo's word-map kernels
    assert [k["caption"] for k in kernels] == maps
    _plot, best, scores = client.predict(
        [handle_file(str(p)) for p in SHAPES[:2]], "a purple cross\na yellow star", "similarity", api_name="/matrix"
    )
    assert len(scores["similarity"]) == 2 and len(scores["similarity"][0]) == 2
    assert len(best["data"]) == 4
    images, captions, timings = client.predict("a yellow star", None, None, "", 2, api_name="/search")
    assert len(images) == 2 and all(image["caption"].startswith(f"#{i} score") for i, image in enumerate(images, 1))
    assert captions["data"] in ([], [["", "", "", "", ""]], [[]])  # no query image: no caption results
    assert any(key.startswith("text→image") for key in timings)


def test_search_over_an_uploaded_gallery(client: Client) -> None:
    images, captions, timings = client.predict(
        "a yellow star",
        handle_file(str(SHAPES[0])),
        [handle_file(str(p)) for p in SHAPES[:3]],
        "a yellow star\na purple cross\na red circle",
        2,
        api_name="/search",
    )
    assert len(images) == 2 and any(p.name in images[0]["caption"] for p in SHAPES[:3])
    assert [row[0] for row in captions["data"]] == [1, 2]
    assert {row[1] for row in captions["data"]} <= {"a yellow star", "a purple cross", "a red circle"}
    assert any(key.startswith("image→text") for key in timings)


def test_bad_input_is_a_clear_error_and_the_app_keeps_serving(client: Client, tmp_path: Path) -> None:
    with pytest.raises(AppError, match="at least one caption"):
        client.predict(handle_file(str(CAT)), "\n  \n", api_name="/match")
    with pytest.raises(AppError, match="17 captions given; the limit is 16"):
        client.predict(handle_file(str(CAT)), "\n".join(f"c{i}" for i in range(17)), api_name="/match")
    with pytest.raises(AppError, match="characters long"):
        client.predict(handle_file(str(CAT)), "a cat " * 2000, api_name="/match")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    with pytest.raises(AppError, match="image") as info:
        client.predict(handle_file(str(fake)), "a cat", api_name="/match")
    assert "fake.png" in str(info.value) and "/tmp" not in str(info.value) and "gradio" not in str(info.value)
    with pytest.raises(AppError, match="limit is 8"):
        client.predict([handle_file(str(CAT))] * 9, "a cat", "score", api_name="/matrix")
    result = client.predict(handle_file(str(CAT)), "a cat", api_name="/match")[2]  # still serving
    assert result["ranking"][0]["caption"] == "a cat"


def test_file_route_serves_only_the_apps_assets(server) -> None:  # noqa: F811
    _, url = server
    with httpx.Client(base_url=url, timeout=10) as http:
        allowed = http.get(f"/gradio_api/file={CAT}")
        assert allowed.status_code == 200 and allowed.content == CAT.read_bytes()
        examples = ROOT / "assets" / "examples"
        for outside in (
            "/etc/passwd",
            str(ROOT / "app.py"),
            str(ROOT / "pyproject.toml"),
            "../../../etc/passwd",
            str(examples / "make_examples.py"),  # the examples folder serves its images only
            str(examples / "examples.json"),
            str(examples / "LICENSE.md"),
            str(examples),
        ):
            response = http.get(f"/gradio_api/file={outside}")
            assert response.status_code in (403, 404), (outside, response.status_code)
            assert b"root:" not in response.content and b"import gradio" not in response.content


def test_direct_posts_cannot_skip_the_bounded_queue(server) -> None:  # noqa: F811
    _, url = server
    body = {"data": [None, "a cat"], "fn_index": None}
    response = httpx.post(f"{url}/gradio_api/run/match", json=body, timeout=10)
    assert response.status_code == 404 and "join the queue" in response.text


def _queue_call(url: str, api_name: str, data: list, session: str) -> dict:
    """One raw queue call, as the browser makes it; returns the final SSE message."""
    config = httpx.get(f"{url}/config", timeout=10).json()
    (fn_id,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == api_name]
    body = {"data": data, "fn_index": fn_id, "session_hash": session, "event_data": None, "trigger_id": None}
    assert httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=10).status_code == 200
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=60) as events:
        for line in events.iter_lines():
            if '"process_completed"' in line:
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the queue closed without completing the call")


def test_a_handler_only_reads_files_that_were_uploaded(server) -> None:  # noqa: F811
    _, url = server
    with httpx.Client(base_url=url, timeout=10) as http:
        (uploaded,) = http.post("/gradio_api/upload", files={"files": ("cat.jpg", CAT.read_bytes())}).json()

    def file(path: str) -> dict:
        return {"path": path, "meta": {"_type": "gradio.FileData"}}

    ok = _queue_call(url, "match", [None, file(uploaded), "a cat"], "raw-upload")
    assert ok["success"], ok
    for outside in ("/etc/passwd", str(CAT)):  # a server path that was never uploaded, even an allowed asset
        refused = _queue_call(url, "match", [None, file(outside), "a cat"], f"raw-{len(outside)}")
        assert not refused["success"] and "root:" not in json.dumps(refused)


def test_uploads_over_the_size_limit_are_refused(server) -> None:  # noqa: F811
    _, url = server
    big = b"\0" * (11 * 1024 * 1024)  # MAX_FILE_SIZE is 10 MB
    with httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert response.status_code == 413


def test_launched_with_the_safe_defaults(server) -> None:  # noqa: F811
    demo, url = server
    assert demo.ssr_mode is False
    assert demo.max_file_size == 10 * 1024 * 1024
    config = httpx.get(f"{url}/config", timeout=10).json()
    checkpoint_choices = [
        c["props"]["choices"] for c in config["components"] if c["props"].get("label") == "Checkpoint (allow-list)"
    ]
    assert [value for _, value in checkpoint_choices[0]] == ["photo", "shapes", "test-owner/extra-checkpoint"]


def test_no_server_path_but_gradios_temp_folder_reaches_visitors(client: Client, server) -> None:  # noqa: F811
    """/config and API responses name files only inside gradio's temp folder: gradio addresses every file it serves
    by its absolute path there (FileData.path, /gradio_api/file=<path>), which cannot be changed without patching
    gradio. Nothing under the repository or a checkpoint folder is named."""
    from gradio.utils import get_upload_folder

    _, url = server
    config = httpx.get(f"{url}/config", timeout=10).text
    result = client.predict(handle_file(str(CAT)), "a tabby cat lying on a rug", api_name="/match")
    for text in (config, json.dumps(result, default=str)):
        assert str(ROOT) not in text
        temp = get_upload_folder()
        paths = [p for p in re.findall(r'"(/[^"]+)"', text) if not p.startswith(("/gradio_api", "/config"))]
        assert all(p.startswith(temp) for p in paths), [p for p in paths if not p.startswith(temp)]


def test_readme_client_snippet_runs_against_the_app(server, monkeypatch, capsys) -> None:  # noqa: F811
    import re

    _, url = server
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(from gradio_client.*?)```", text, re.S).group(1)
    code = code.replace('Client("http://127.0.0.1:7860/")', f"Client({url!r}, verbose=False)")
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["info"]["tokens"] == ["a", "tabby", "cat"]
    assert capsys.readouterr().out.count("score") == 2


def test_user_errors_log_one_line_and_faults_their_traceback(
    client: Client,
    server_matcher,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="mklvisita.demo"):
        with pytest.raises(AppError, match="at least one caption"):
            client.predict(handle_file(str(CAT)), "  \n ", api_name="/match")
    lines = [r for r in caplog.records if r.name == "mklvisita.demo"]
    assert len(lines) == 1 and lines[0].exc_info is None and "at least one caption" in lines[0].getMessage()
    assert "Traceback" not in capfd.readouterr().err  # a user error is no fault: no traceback in the server log

    def broken(*args, **kwargs):
        raise RuntimeError("a real fault")

    monkeypatch.setattr(server_matcher, "score", broken)
    with pytest.raises(AppError):
        client.predict(handle_file(str(CAT)), "a fault is not cached", api_name="/match")
    err = capfd.readouterr().err
    assert "Traceback" in err and "RuntimeError: a real fault" in err  # a real fault keeps its traceback
