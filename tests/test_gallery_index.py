"""Saved gallery indexes (mklvisita.gallery): build, resume, shard across processes, open memory-mapped, search."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mklvisita import Matcher, gallery, processes
from mklvisita.__main__ import main as cli
from mklvisita.retrieval import encode_images, global_vectors

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 40


@pytest.fixture(scope="module")
def matcher():
    return Matcher.default("shapes")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 shapes scenes as PNG files in two sub-folders, and one file that is not an image."""
    from mklvisita.data import ShapesScenes

    root = tmp_path_factory.mktemp("gallery")
    scenes = ShapesScenes(split="test", size=N_IMAGES, seed=0)
    for i in range(N_IMAGES):
        sub = root / ("a" if i < N_IMAGES // 2 else "b")
        sub.mkdir(exist_ok=True)
        scenes[i]["image"].save(sub / f"scene_{i:03d}.png")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def one_process(matcher, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "one"
    meta = gallery.build_index(matcher, folder, out, chunk_size=8, checkpoint_name="shapes", progress=False)
    return out, meta


def test_index_holds_every_readable_image_once_with_the_library_vectors(matcher, folder, one_process):
    out, meta = one_process
    assert meta["count"] == N_IMAGES and meta["skipped"] == 1
    assert (out / gallery.SKIPPED).read_text().splitlines() == [os.path.join("a", "broken.png")]
    assert not (out / gallery.PARTS).exists()  # the parts are merged and removed
    index = gallery.GalleryIndex.open(out)
    assert isinstance(index.embeddings, np.memmap)  # opened memory-mapped, not read
    expected_files = sorted(str(p.relative_to(folder)) for p in folder.rglob("scene_*.png"))
    assert index.files == expected_files
    assert index.meta["faiss"]["type"] == "flat" and index.index.ntotal == N_IMAGES
    assert index.meta["checkpoint"]["sha256"] == gallery.checkpoint_identity(matcher.model)
    # the stored vectors are the first stage's own (global_vectors of each image), in file order
    bank = encode_images(matcher.model, matcher.processor, [index.file(i) for i in range(5)], keep_features=False)
    direct = global_vectors(matcher.model, bank.embeddings).numpy()
    np.testing.assert_allclose(index.embeddings[:5], direct, atol=1e-5)


def test_search_equals_the_in_memory_cascade_over_the_same_images(matcher, one_process):
    """With every image a candidate, the saved index's search is the library's search over the gallery in memory."""
    out, _ = one_process
    index = gallery.GalleryIndex.open(out)
    files = [index.file(i) for i in range(len(index))]
    text = "a red circle above a blue square"
    saved = matcher.search(out, text, top_k=5, candidates=len(index))
    memory = matcher.search_images(matcher.index_images(files), text, top_k=5)
    assert saved.indices == memory.indices
    np.testing.assert_allclose(saved.scores, memory.scores, atol=1e-4)
    np.testing.assert_allclose(saved.itm, memory.itm, atol=1e-4)
    assert saved.files == [str(files[i]) for i in memory.indices]
    assert saved.pairs["first_stage"] == len(index)


def test_first_stage_candidates_are_the_exact_inner_product_top(matcher, one_process):
    out, _ = one_process
    index = gallery.GalleryIndex.open(out)
    q = np.random.default_rng(0).standard_normal((3, index.meta["dim"])).astype(np.float32)
    scores, rows = index.first_stage(q, 7)
    exact = np.asarray(index.embeddings) @ q.T  # (N, 3)
    for j in range(3):
        assert set(rows[j].tolist()) == set(np.argsort(-exact[:, j])[:7].tolist())
        np.testing.assert_allclose(scores[j], np.sort(exact[:, j])[::-1][:7], atol=1e-5)


def test_an_index_of_another_checkpoint_is_refused(matcher, one_process):
    out, _ = one_process
    other = copy.deepcopy(matcher.model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(gallery.IndexMismatchError, match="built by shapes .*not by the loaded checkpoint"):
        Matcher(other).search(out, "a red circle")


def test_resume_after_an_interruption_encodes_only_the_missing_chunks(
    matcher, folder, one_process, tmp_path, monkeypatch
):
    out = tmp_path / "resumed"
    real = gallery._encode_chunk
    calls = []

    def failing(m, root, files, batch_size):
        calls.append(files[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted while encoding the third chunk
        return real(m, root, files, batch_size)

    monkeypatch.setattr(gallery, "_encode_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        gallery.build_index(matcher, folder, out, chunk_size=8, checkpoint_name="shapes", progress=False)
    assert len(list((out / gallery.PARTS).glob("chunk-*.npz"))) == 2
    with pytest.raises(ValueError, match="unfinished index"):
        gallery.GalleryIndex.open(out)
    calls.clear()
    monkeypatch.setattr(gallery, "_encode_chunk", real)
    counted = []
    monkeypatch.setattr(gallery, "_encode_chunk", lambda *a: counted.append(1) or real(*a))
    gallery.build_index(matcher, folder, out, chunk_size=8, checkpoint_name="shapes", progress=False)
    assert len(counted) == 4  # 41 files in 8-image chunks: 6 chunks, 2 done before the interruption
    _assert_same_index(out, one_process[0])


def test_a_different_build_in_the_same_folder_is_refused(matcher, folder, tmp_path, monkeypatch):
    out = tmp_path / "partial"
    monkeypatch.setattr(gallery, "_encode_chunk", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        gallery.build_index(matcher, folder, out, chunk_size=8, progress=False)
    with pytest.raises(ValueError, match="chunk_size differ"):
        gallery.build_index(matcher, folder, out, chunk_size=16, progress=False)


def test_two_ranks_in_turn_write_the_one_process_index(matcher, folder, one_process, tmp_path, monkeypatch):
    """Sharding by RANK / WORLD_SIZE (as accelerate launch sets them): rank 1 writes its chunks and leaves, rank 0
    writes its own, finds every chunk and merges."""
    out = tmp_path / "two"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert gallery.build_index(matcher, folder, out, chunk_size=8, progress=False) is None
    assert sorted(p.name for p in (out / gallery.PARTS).glob("chunk-*")) == [f"chunk-{j:06d}.npz" for j in (1, 3, 5)]
    monkeypatch.setenv("RANK", "0")
    meta = gallery.build_index(matcher, folder, out, chunk_size=8, checkpoint_name="shapes", progress=False)
    assert meta["count"] == N_IMAGES
    _assert_same_index(out, one_process[0])


def _assert_same_index(a: Path, b: Path, atol: float = 0.0) -> None:
    ia, ib = gallery.GalleryIndex.open(a), gallery.GalleryIndex.open(b)
    assert ia.files == ib.files
    np.testing.assert_allclose(ia.embeddings, ib.embeddings, atol=atol, rtol=0)
    assert ia.meta["faiss"] == ib.meta["faiss"] and ia.identity == ib.identity
    q = np.asarray(ib.embeddings[:4]) + 0.01
    np.testing.assert_array_equal(ia.first_stage(q, 10)[1], ib.first_stage(q, 10)[1])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate (a training dependency)")
def test_accelerate_launch_two_cpu_processes_equals_one_process(matcher, folder, one_process, tmp_path):
    """``accelerate launch --num_processes 2 --cpu -m mklvisita index`` writes the one-process index. Without MPI
    accelerate starts one process for --cpu; the index command reads N from its launcher and starts the two itself
    (torchrun's launcher), each encoding its own chunks."""
    out = tmp_path / "launched"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    launch = "--num_processes 2 --cpu --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "mklvisita", "index", str(folder)]
    cmd += ["--checkpoint", "shapes", "--out", str(out), "--chunk-size", "8"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (
        "starting 2" in r.stderr
        and "[process 1/2] 24/24 images" in r.stderr
        and "[process 2/2] 17/17 images" in r.stderr
    )  # both took part
    assert f"indexed {N_IMAGES} images (1 unreadable" in r.stdout
    # each process encodes its own chunks; the same images in the same batches give the same vectors
    _assert_same_index(out, one_process[0], atol=1e-6)
    text = "a green triangle"
    assert Matcher.default("shapes").search(out, text).files == matcher.search(one_process[0], text).files


def test_ivf_with_every_cell_probed_finds_the_exact_top(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 13)).astype(np.float32)  # 13 dims: padded to 16 for FAISS's SIMD kernels
    x = centres[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 13)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    params = gallery.write_faiss(x, tmp_path / "ivf.faiss", "ivf", nlist=16)
    assert params["type"] == "ivf" and params["nlist"] == 16 and params["padded_dim"] == 16
    index = gallery.read_faiss(tmp_path / "ivf.faiss", {**params, "nprobe": 16})
    q = x[:5] + 0.05
    _, rows = gallery.first_stage(index, x, {**params, "nprobe": 16}, q, 10)
    exact = np.argsort(-(x @ q.T), axis=0)[:10].T
    for j in range(5):
        assert set(rows[j].tolist()) == set(exact[j].tolist())
    assert gallery.ivf_nlist(1_000_000) == 1024 and gallery.ivf_nlist(1000) == 25


def test_cli_index_and_search(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["index", str(folder), "--checkpoint", "shapes", "--out", str(out), "--quiet"]) == 0
    assert f"indexed {N_IMAGES} images (1 unreadable" in capsys.readouterr().out
    assert cli(["search", str(out), "a blue square", "--k", "3", "--json"]) == 0  # the recorded checkpoint: shapes
    result = json.loads(capsys.readouterr().out)
    assert len(result["results"]) == 3 and all(Path(h["file"]).is_file() for h in result["results"])
    scores = [h["score"] for h in result["results"]]
    assert scores == sorted(scores, reverse=True)
    # moved images: --root points at their new place
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert cli(["search", str(out), "a blue square", "--k", "3", "--json", "--root", str(moved)]) == 0
    assert all(h["file"].startswith(str(moved)) for h in json.loads(capsys.readouterr().out)["results"])


def test_cli_errors_are_plain(folder, tmp_path, capsys):
    assert cli(["search", str(tmp_path / "nothing"), "a cat"]) == 2
    assert "is not an index folder" in capsys.readouterr().err
    assert cli(["index", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--checkpoint", "shapes"]) == 2
    err = capsys.readouterr().err
    assert "neither a folder of images nor a file list" in err and str(tmp_path) not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["index", str(empty), "--out", str(tmp_path / "o"), "--checkpoint", "shapes"]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_a_file_list_names_images_relative_to_itself(matcher, folder, tmp_path):
    listing = folder / "list.txt"
    listing.write_text("# two scenes\nb/scene_039.png\n\na/scene_000.png\n")
    files, root = gallery.list_images(listing)
    assert files == ["b/scene_039.png", "a/scene_000.png"] and root == folder.resolve()
    listing.unlink()


def test_demo_searches_an_allow_listed_saved_index(matcher, one_process, monkeypatch):
    from demo.saved_index import INDEXES_ENV, allowed_indexes, search_saved_index

    out, _ = one_process
    monkeypatch.setenv(INDEXES_ENV, f"{out}, ,{out}")
    indexes = allowed_indexes()
    assert list(indexes) == ["one", "one (2)"]
    hits, timings = search_saved_index(matcher, "one", "a red circle", 3, indexes=indexes)
    assert len(hits) == 3 and all(
        img.size[0] <= 512 and label.startswith(f"#{i}") for i, (img, label) in enumerate(hits, 1)
    )
    assert "first_stage" in timings
    with pytest.raises(ValueError, match="Choose a saved index"):
        search_saved_index(matcher, str(out), "a red circle", indexes=indexes)  # a path is not a choice
    other = copy.deepcopy(matcher.model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="not by the loaded checkpoint") as e:
        search_saved_index(Matcher(other), "one", "a red circle", indexes=indexes)
    assert str(out.parent) not in str(e.value)


@pytest.mark.slow
def test_app_search_tab_searches_a_saved_index_through_the_api(matcher, one_process, monkeypatch):
    """The Search tab's saved-index endpoint, driven through gradio_client on a launched app."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    import app
    from demo.saved_index import INDEXES_ENV
    from tests.app_fixtures import free_port

    out, _ = one_process
    monkeypatch.setenv(INDEXES_ENV, str(out))
    demo = app.create_demo(matcher, default="shapes", loader=lambda spec: matcher)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        images, timings = Client(url, verbose=False).predict("one", "a red circle", 3, api_name="/search_index")
        assert len(images) == 3 and images[0]["caption"].startswith("#1 score")
        assert timings["first_stage"] >= 0
    finally:
        demo.close()


def test_the_cpu_process_count_is_read_from_the_accelerate_launcher(monkeypatch):
    for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    launcher = ["python", "/venv/bin/accelerate", "launch", "--num_processes", "3", "--cpu", "-m", "mklvisita"]
    assert processes.requested_cpu_processes(launcher) == 3
    module_form = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=2", "-m", "mklvisita"]
    assert processes.requested_cpu_processes(module_form) == 2
    assert processes.requested_cpu_processes(["python", "-m", "mklvisita", "index"]) == 1  # not under accelerate
    monkeypatch.setenv("RANK", "0")  # a process that accelerate (torchrun) started among several
    assert processes.requested_cpu_processes(launcher) == 1
