"""A saved gallery index: images embedded once, searched later memory-mapped, built by one process or many.

Layout of an index folder (``python -m mklvisita index FOLDER|FILELIST --out INDEX``)::

    meta.json        format, version, the checkpoint's identity, the FAISS choice and its parameters, counts
    embeddings.npy   float32 (N, D): each image's first-stage vector (``retrieval.global_vectors``), unit-free
    index.faiss      a FAISS inner-product index over those rows
    files.txt        the N image files, one per line, relative to ``meta["root"]`` (absolute where outside it)
    skipped.txt      files that could not be read (not indexed), one per line

Decisions:

- The first stage is the library's own: the pooled kernels linearised into one vector per item
  (``retrieval.global_vectors``: sqrt(beta_m) * u_m concatenated, so u . v = sum_m beta_m cos_m), searched by inner
  product. Below :data:`FLAT_MAX` rows the index is exact (``IndexFlatIP``); from there on it is IVF with 8-bit
  scalar-quantised codes (``IVF{nlist},SQ8``, nlist ~ sqrt(N) rounded to a power of two), searched with the
  ``nprobe`` recorded in meta.json, and its top ``refine * n`` are re-scored exactly from ``embeddings.npy`` (a few
  hundred rows read from the memory map), so the quantisation costs little recall. HNSW was not chosen: its build
  searches the graph for every row inserted (efConstruction candidates per layer), IVF assigns each row to its
  nearest of nlist centroids once, and a million rows already take minutes to assign on a shared two-core machine;
  IVF met the targets. ``benchmarks/index_scale.py`` measures the choice (recall@100 against exact search, query
  median, open time).
- The re-ranking stage re-encodes the first stage's candidates from their files rather than caching their tokens:
  the photo checkpoint's second-stage features are ~200 KB per image in float32 (49 cells x 1,000 concept
  classes, scene-text lines, colour cells; 100 GB for half a million photos), the shapes checkpoint's 64 KB plus its
  fusion tokens. Re-encoding ``candidates`` images (default :data:`DEFAULT_CANDIDATES`) costs a fixed time per query
  whatever the gallery's size, and the index stays ~7 KB per image for the photo checkpoint (a 1,396-d float32
  vector and its 8-bit codes). The full model then ranks them by the checkpoint's own rule (``retrieval.retrieve``:
  S on every candidate, ITM on the top ``ranking.k``).
- Identity: sha256 over the model's state dict (names, dtypes, shapes, bytes) and its config as loaded (every field,
  defaults included, so a library version that reads the same checkpoint into another config refuses the index
  rather than mixing vectors computed two ways): the weights actually loaded, whatever folder, Hub id or pip
  package they came from (the photo checkpoint's backbones come from pip packages, so a hash of its
  model.safetensors alone would miss them). An index whose identity differs from the searching checkpoint's is
  refused (:class:`IndexMismatchError`).
- Building is resumable and shardable. Images are cut into chunks of ``chunk_size`` in file order; chunk j is
  encoded by process ``j % world_size`` and written atomically (temp file + rename) to ``parts/``; a rerun skips
  chunks already written. Chunks hold the same images in the same batches whatever the number of processes, so
  one process and N processes write the same vectors. The process of rank 0 waits for every chunk (file-based: no
  process group is needed; a process that fails leaves a marker that stops the wait), then merges them in order,
  builds the FAISS index and writes ``meta.json`` last: a folder without it is an unfinished build. Rank and world
  size come from ``torch.distributed`` when it is initialised, else from ``RANK`` / ``WORLD_SIZE`` as ``accelerate
  launch`` (torchrun) sets them; the library never imports accelerate. ``accelerate launch --cpu --num_processes
  N`` starts one process without MPI; the index command then starts the N itself (:mod:`mklvisita.processes`,
  as the trainer does); ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs and
  ``torchrun --nproc_per_node N`` start them directly.
- Unreadable files (not an image, too large, missing) are skipped and counted; their names go to ``skipped.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inputs import InvalidImageError, check_caption, check_whole_number, load_image
from .ranking import itm_from_final, resolve_ranking, uses_itm
from .retrieval import encode_captions, encode_images, global_vectors, retrieve
from .threads import inference_threads

FORMAT = "mklvisita-gallery-index"
VERSION = 1
FLAT_MAX = 50_000  # fewer rows: an exact flat index; more: IVF (see the module doc)
DEFAULT_CHUNK = 256  # images per part file (the unit of resumption and of sharding)
DEFAULT_CANDIDATES = 32  # first-stage candidates re-encoded and re-ranked by the full model per query
IVF_NPROBE = 16  # cells visited per query: a million synthetic rows in 1,024 cells give recall@100 0.98 at 4, 1.0 at 16
# (6.5 ms median, benchmarks/index_scale.py); 16 leaves a margin for real galleries, whose clusters are less separated
KMEANS_ITERATIONS = 10  # IVF training (FAISS's default 25 costs 2.5x the build time; see benchmarks/index_scale.py)
IVF_REFINE = 2  # the IVF index returns refine * n rows, re-scored exactly from embeddings.npy
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
META, EMBEDDINGS, FAISS_FILE, FILES, SKIPPED, PARTS = (
    "meta.json",
    "embeddings.npy",
    "index.faiss",
    "files.txt",
    "skipped.txt",
    "parts",
)


class IndexMismatchError(ValueError):
    """A saved index was built by another checkpoint (or another version of the format)."""


# ------------------------------------------------------------------------------------------------ identity
_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_identity(model: torch.nn.Module) -> str:
    """sha256 hex of the model's state dict and config: equal for the same weights however they were loaded."""
    if model in _identities:
        return _identities[model]
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _identities[model] = h.hexdigest()
    return _identities[model]


# ------------------------------------------------------------------------------------------------ file lists
def list_images(source: str | os.PathLike) -> tuple[list[str], Path]:
    """The images a FOLDER (recursively, sorted by path) or a FILELIST (one path per line) names, and their root.

    Returns (paths relative to the root, or absolute where outside it; root)."""
    src = Path(source)
    if src.is_dir():
        root = src.resolve()
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    found.append(os.path.relpath(os.path.join(dirpath, f), root))
        if not found:
            raise ValueError(f"{src.name} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return found, root
    if src.is_file():
        root = src.resolve().parent
        try:
            lines = src.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{src.name} is not a text file list: give a folder or a UTF-8 file, one path a line"
            ) from e
        paths = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not paths:
            raise ValueError(f"{src.name} lists no files: give one image path per line")
        out = []
        for p in paths:
            full = (root / p).resolve()
            rel = os.path.relpath(full, root)
            out.append(str(full) if rel.startswith("..") else rel)
        return out, root
    raise ValueError(f"{src.name or source} is neither a folder of images nor a file list. Check the path.")


# ------------------------------------------------------------------------------------------------ processes
def process_rank() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised, else RANK / WORLD_SIZE (accelerate launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as e:
        raise ValueError("RANK and WORLD_SIZE must be whole numbers when set") from e
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


class _Progress:
    """One status line on stderr (rewritten in place on a terminal, a line every few seconds otherwise)."""

    def __init__(self, total: int, prefix: str, done: int = 0):
        self.total, self.prefix, self.done, self.skipped = total, prefix, done, 0
        self.start, self.last, self.tty = time.perf_counter(), 0.0, sys.stderr.isatty()
        self.first = done

    def update(self, n: int, skipped: int = 0, final: bool = False) -> None:
        self.done, self.skipped = self.done + n, self.skipped + skipped
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        line = f"{self.prefix}{self.done}/{self.total} images, {self.skipped} unreadable, {rate:.1f} images/s"
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr)
        sys.stderr.flush()


# ------------------------------------------------------------------------------------------------ building
def _read(root: Path, rel: str) -> Any:
    try:
        return load_image(root / rel)
    except (InvalidImageError, OSError, ValueError):
        return None


def _encode_chunk(matcher: Any, root: Path, files: Sequence[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of the readable images among ``files`` (n_ok, D) and the readable mask (n,)."""
    images = [_read(root, f) for f in files]
    ok = np.array([im is not None for im in images])
    good = [im for im in images if im is not None]
    dims = None
    vecs = []
    for i in range(0, len(good), batch_size):
        bank = encode_images(
            matcher.model, matcher.processor, good[i : i + batch_size], batch_size, keep_features=False
        )
        with torch.inference_mode():
            v = global_vectors(matcher.model, bank.embeddings)
        if v is None:
            raise ValueError("this checkpoint has no pooled kernel, so it has no first stage to index")
        vecs.append(v.cpu().numpy().astype(np.float32))
        dims = v.shape[1]
    if not vecs:
        return np.zeros((0, dims or 0), np.float32), ok
    return np.concatenate(vecs), ok


def _chunk_path(parts: Path, j: int) -> Path:
    return parts / f"chunk-{j:06d}.npz"


def build_index(
    matcher: Any,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 32,
    chunk_size: int = DEFAULT_CHUNK,
    kind: str = "auto",
    checkpoint_name: str = "",
    progress: bool = True,
    wait_timeout: float | None = None,
) -> dict[str, Any] | None:
    """Embed every image of ``source`` once and write an index folder at ``out`` (see the module doc).

    Under several processes each encodes its share of the chunks; rank 0 merges. Returns the index's metadata
    (rank 0), or None on the other ranks. A rerun after an interruption skips the chunks already written.

    Args:
        matcher: the :class:`mklvisita.Matcher` whose checkpoint embeds the images.
        source: a folder of images (searched recursively) or a text file listing image paths, one a line.
        out: the index folder to write.
        batch_size: images per model call.
        chunk_size: images per part file (the unit of resumption and of sharding; must match a resumed build's).
        kind: "auto" (flat below FLAT_MAX rows, IVF above), "flat" or "ivf".
        checkpoint_name: how the checkpoint was named (an embedded name, a folder, a Hub id), recorded in meta.json
            so ``search`` can load it when none is given.
        progress: print a progress line on stderr.
        wait_timeout: rank 0 gives up waiting for the other processes' chunks after this many seconds (None: never).
    """
    batch_size = check_whole_number(batch_size, "batch_size", 1, 4096)
    chunk_size = check_whole_number(chunk_size, "chunk_size", 1, 1_000_000)
    if kind not in ("auto", "flat", "ivf"):
        raise ValueError(f"index kind must be auto, flat or ivf; got {kind!r}")
    files, root = list_images(source)
    if any("\n" in f or "\r" in f for f in files):
        raise ValueError("a file name holds a line break; rename it (the file list is one path a line)")
    out = Path(out)
    if (out / META).is_file():
        raise ValueError(f"{out.name} already holds a finished index; remove it or choose another --out")
    rank, world = process_rank()
    identity = checkpoint_identity(matcher.model)
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    plan = {
        "identity": identity,
        "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "root": str(root),
        "chunk_size": chunk_size,
    }
    plan_file = parts / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old != plan:
            what = [k for k in plan if old.get(k) != plan[k]]
            raise ValueError(
                f"{out.name} holds an unfinished index of another build (its {', '.join(what)} differ); "
                "rerun with the same images, checkpoint and chunk size, or remove the folder"
            )
    else:
        _write_text(plan_file, json.dumps(plan, indent=1))

    started = time.time()
    (parts / f"failed-{rank}").unlink(missing_ok=True)  # this process's marker from an earlier, failed run
    n_chunks = (len(files) + chunk_size - 1) // chunk_size
    mine = [j for j in range(n_chunks) if j % world == rank]
    todo = [j for j in mine if not _chunk_path(parts, j).is_file()]
    done_images = sum(min(chunk_size, len(files) - j * chunk_size) for j in mine if j not in todo)
    total = sum(min(chunk_size, len(files) - j * chunk_size) for j in mine)
    bar = _Progress(total, f"[process {rank + 1}/{world}] " if world > 1 else "", done_images) if progress else None
    try:
        with inference_threads(getattr(matcher, "threads", None)):  # the library's thread policy (mklvisita.threads)
            _encode_chunks(matcher, root, files, todo, chunk_size, batch_size, parts, bar)
    except BaseException:
        (parts / f"failed-{rank}").write_text(str(time.time()))
        raise
    if bar:
        bar.update(0, final=True)
    if rank != 0:
        return None
    _wait_for_chunks(parts, n_chunks, world, started, wait_timeout)
    return _merge(out, files, root, n_chunks, kind, identity, checkpoint_name, matcher)


def _encode_chunks(
    matcher: Any,
    root: Path,
    files: list[str],
    todo: list[int],
    chunk_size: int,
    batch_size: int,
    parts: Path,
    bar: _Progress | None,
) -> None:
    for j in todo:
        chunk = files[j * chunk_size : (j + 1) * chunk_size]
        vecs, ok = _encode_chunk(matcher, root, chunk, batch_size)
        _atomic_write(_chunk_path(parts, j), lambda p, v=vecs, o=ok: _save_npz(p, vectors=v, ok=o))
        if bar:
            bar.update(len(chunk), int((~ok).sum()))


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _wait_for_chunks(parts: Path, n_chunks: int, world: int, started: float, timeout: float | None) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    t0 = time.time()
    while True:
        missing = [j for j in range(n_chunks) if not _chunk_path(parts, j).is_file()]
        if not missing:
            return
        for marker in parts.glob("failed-*"):
            if marker.stat().st_mtime >= started - 1:
                raise RuntimeError(f"indexing process {marker.name.split('-')[1]} failed; rerun the command to resume")
        if timeout is not None and time.time() - t0 > timeout:
            raise TimeoutError(f"{len(missing)} chunks were not written within {timeout:.0f} s; rerun to resume")
        time.sleep(0.2)


def _merge(
    out: Path,
    files: list[str],
    root: Path,
    n_chunks: int,
    kind: str,
    identity: str,
    checkpoint_name: str,
    matcher: Any,
) -> dict[str, Any]:
    parts = out / PARTS
    chunk_size = json.loads((parts / "plan.json").read_text())["chunk_size"]
    kept: list[str] = []
    skipped: list[str] = []
    dims = 0
    for j in range(n_chunks):
        with np.load(_chunk_path(parts, j)) as z:
            ok = z["ok"]
            dims = max(dims, z["vectors"].shape[1])
        chunk = files[j * chunk_size : (j + 1) * chunk_size]
        kept += [f for f, o in zip(chunk, ok) if o]
        skipped += [f for f, o in zip(chunk, ok) if not o]
    if not kept:
        raise ValueError("none of the images could be read; nothing to index")
    emb_tmp = out / f".{EMBEDDINGS}.tmp-{os.getpid()}"
    emb = np.lib.format.open_memmap(emb_tmp, mode="w+", dtype=np.float32, shape=(len(kept), dims))
    row = 0
    for j in range(n_chunks):
        with np.load(_chunk_path(parts, j)) as z:
            v = z["vectors"]
        if len(v):
            emb[row : row + len(v)] = v
        row += len(v)
    emb.flush()
    del emb
    os.replace(emb_tmp, out / EMBEDDINGS)
    emb = np.load(out / EMBEDDINGS, mmap_mode="r")
    params = write_faiss(emb, out / FAISS_FILE, kind)
    _write_text(out / FILES, "".join(f + "\n" for f in kept))
    _write_text(out / SKIPPED, "".join(f + "\n" for f in skipped))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": {
            "sha256": identity,
            "name": checkpoint_name,
            "kernels": list(matcher.model.kernel_names),
        },
        "count": len(kept),
        "skipped": len(skipped),
        "dim": dims,
        "root": str(root),
        "faiss": params,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_text(out / META, json.dumps(meta, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return meta


# ------------------------------------------------------------------------------------------------ FAISS
def _faiss():
    try:
        import faiss
    except ImportError as e:  # a declared dependency; this only fires in a broken environment
        raise ImportError("saved gallery indexes need faiss: pip install faiss-cpu") from e
    return faiss


def ivf_nlist(n: int) -> int:
    """IVF cells for n rows: ~sqrt(n) as a power of two (1,024 for a million), at most n / 39 (FAISS's training rule).

    FAISS's guide suggests 4-16 sqrt(n); sqrt(n) builds 4x faster (training and assigning a million 1,396-d rows cost
    nlist x n dot products on the CPU) and still meets the query target in ``benchmarks/index_scale.py``."""
    nlist = 2 ** int(np.round(np.log2(max(np.sqrt(n), 1))))
    return int(max(1, min(nlist, n // 39)))


def write_faiss(
    vectors: np.ndarray,
    path: str | os.PathLike,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int = IVF_NPROBE,
    refine: int = IVF_REFINE,
    batch: int = 65_536,
    seed: int = 0,
) -> dict[str, Any]:
    """Build and write an inner-product index over ``vectors`` (N, D) (a memory map is fine: read in batches).

    Returns its parameters for meta.json: ``type`` "flat" or "ivf" (+ ``nlist``, ``nprobe``, ``refine``, ``codes``)."""
    faiss = _faiss()
    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n < FLAT_MAX else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        params: dict[str, Any] = {"type": "flat", "metric": "inner_product"}
        pad = 0
    else:
        # FAISS's SIMD scalar-quantiser kernels need the dimension to be a multiple of 8 (1,396 -> 1,400 is 7x
        # faster per query, measured on a 100,000-row slice); zero columns leave every inner product unchanged.
        pad = (-d) % 8
        nlist = nlist or ivf_nlist(n)
        quantizer = faiss.IndexFlatIP(d + pad)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, d + pad, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        rng = np.random.default_rng(seed)
        n_train = min(n, 40 * nlist)
        sample = np.sort(rng.choice(n, n_train, replace=False))
        index.cp.seed, index.cp.niter = seed, KMEANS_ITERATIONS
        index.train(_padded(vectors[sample], pad))
        params = {
            "type": "ivf",
            "metric": "inner_product",
            "codes": "SQ8",
            "nlist": nlist,
            "nprobe": nprobe,
            "refine": refine,
            "train_rows": int(n_train),
            "kmeans_iterations": KMEANS_ITERATIONS,
            "padded_dim": d + pad,
        }
    for i in range(0, n, batch):
        index.add(_padded(vectors[i : i + batch], pad))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return params


def _padded(x: np.ndarray, pad: int) -> np.ndarray:
    """(n, d) -> contiguous float32 (n, d + pad), zeros on the right."""
    x = np.asarray(x, dtype=np.float32)
    if pad:
        x = np.concatenate([x, np.zeros((len(x), pad), np.float32)], 1)
    return np.ascontiguousarray(x)


def read_faiss(path: str | os.PathLike, params: dict[str, Any]) -> Any:
    """Open a written index memory-mapped where FAISS supports it (IVF lists, flat codes), in memory otherwise."""
    faiss = _faiss()
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    if params["type"] == "flat":
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError:
        index = faiss.read_index(str(path))
    if params["type"] == "ivf":
        index.nprobe = int(params["nprobe"])
    return index


def first_stage(
    index: Any, embeddings: np.ndarray, params: dict[str, Any], queries: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best rows per query by inner product: (scores, indices), each (Q, n); -1 pads a short result.

    IVF results are re-scored exactly from ``embeddings`` (``refine`` * n rows per query)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = min(n, len(embeddings))
    if params["type"] != "ivf":
        return index.search(queries, n)
    m = min(len(embeddings), n * int(params.get("refine", 1)))
    _, cand = index.search(_padded(queries, index.d - queries.shape[1]), m)
    scores = np.full((len(queries), n), -np.inf, np.float32)
    out = np.full((len(queries), n), -1, np.int64)
    for q in range(len(queries)):
        c = cand[q][cand[q] >= 0]
        order = np.argsort(c)  # read the memory map in file order
        c = c[order]
        s = np.asarray(embeddings[c], dtype=np.float32) @ queries[q]
        top = np.argsort(-s, kind="stable")[:n]
        scores[q, : len(top)], out[q, : len(top)] = s[top], c[top]
    return scores, out


# ------------------------------------------------------------------------------------------------ opening
@dataclass
class GalleryIndex:
    """An opened index folder: memory-mapped embeddings, the FAISS index, the file list and the metadata."""

    path: Path
    meta: dict[str, Any]
    embeddings: np.ndarray  # (N, D) float32 memory map
    index: Any  # faiss.Index
    files: list[str]  # as stored (relative to root, or absolute)
    root: Path

    def __len__(self) -> int:
        return len(self.files)

    @property
    def identity(self) -> str:
        return self.meta["checkpoint"]["sha256"]

    def file(self, i: int) -> Path:
        """The image file of row ``i``."""
        return self.root / self.files[i]

    @classmethod
    def open(cls, path: str | os.PathLike, root: str | os.PathLike | None = None) -> GalleryIndex:
        """Open an index folder memory-mapped. ``root`` overrides the folder the file list is relative to (the
        images were moved)."""
        path = Path(path)
        name = path.name or str(path)
        if not path.is_dir():
            raise ValueError(f"{name} is not an index folder; build one with `python -m mklvisita index`")
        if not (path / META).is_file():
            if (path / PARTS).is_dir():
                raise ValueError(f"{name} is an unfinished index; rerun the index command that started it to finish")
            raise ValueError(f"{name} holds no {META}; it is not a gallery index")
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{name}/{META} is not valid JSON ({e}); rebuild the index") from e
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise IndexMismatchError(
                f"{name} is not a version-{VERSION} {FORMAT} (found {meta.get('format')} {meta.get('version')}); "
                "rebuild it with this version's `python -m mklvisita index`"
            )
        for f in (EMBEDDINGS, FAISS_FILE, FILES):
            if not (path / f).is_file():
                raise ValueError(f"{name}/{f} is missing; rebuild the index")
        embeddings = np.load(path / EMBEDDINGS, mmap_mode="r")
        files = (path / FILES).read_text(encoding="utf-8").splitlines()
        if embeddings.shape != (meta["count"], meta["dim"]) or len(files) != meta["count"]:
            raise ValueError(f"{name} is inconsistent (embeddings, file list and {META} disagree); rebuild it")
        index = read_faiss(path / FAISS_FILE, meta["faiss"])
        if index.ntotal != meta["count"]:
            raise ValueError(f"{name}/{FAISS_FILE} holds {index.ntotal} rows, {META} says {meta['count']}; rebuild")
        return cls(path, meta, embeddings, index, files, Path(root) if root is not None else Path(meta["root"]))

    def check(self, matcher: Any) -> None:
        """Refuse a checkpoint other than the one that built the index."""
        mine = checkpoint_identity(matcher.model)
        if mine != self.identity:
            built = self.meta["checkpoint"].get("name") or "another checkpoint"
            built = Path(built).name if os.path.isabs(built) else built  # a folder by its name, never a server path
            raise IndexMismatchError(
                f"{self.path.name} was built by {built} (sha256 {self.identity[:12]}), not by the loaded checkpoint "
                f"(sha256 {mine[:12]}): other weights or another configuration (a library version that reads the "
                "checkpoint's config differently counts too). Search it with the checkpoint that built it, or rebuild "
                "it with "
                "`python -m mklvisita index ... --checkpoint <this checkpoint>`."
            )

    def first_stage(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best rows per query vector (Q, D) by inner product: (scores, indices)."""
        if queries.shape[-1] != self.meta["dim"]:
            raise IndexMismatchError(f"query vectors have {queries.shape[-1]} dims, the index {self.meta['dim']}")
        return first_stage(self.index, self.embeddings, self.meta["faiss"], queries, n)


# ------------------------------------------------------------------------------------------------ searching
@dataclass
class GallerySearchResult:
    files: list[str]  # image files, best first (root / stored path)
    indices: list[int]  # rows of the index
    scores: list[float]  # final score by the checkpoint's ranking rule
    itm: list[float]  # ITM probability (NaN without fusion)
    similarity: list[float]  # multi-kernel S
    first_stage: list[float]  # the first stage's inner product
    unreadable: int = 0  # candidates whose file could not be read at search time (left out)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    pairs: dict[str, int] = field(default_factory=dict)


def search_index(
    matcher: Any,
    index: GalleryIndex | str | os.PathLike,
    text: str,
    top_k: int = 5,
    candidates: int | None = None,
) -> GallerySearchResult:
    """Text -> the best images of a saved index: FAISS first stage, then the full model re-ranks the candidates.

    ``candidates``: first-stage rows re-encoded and re-ranked (default: the ranking's ``candidates`` or
    :data:`DEFAULT_CANDIDATES`, at least ``top_k``)."""
    if not isinstance(index, GalleryIndex):
        if not isinstance(index, (str, os.PathLike)):
            raise ValueError(f"search takes an index folder or a GalleryIndex, got {type(index).__name__}")
        index = GalleryIndex.open(index)
    index.check(matcher)
    top_k = check_whole_number(top_k, "top_k", 1, 1_000_000)
    ranking = matcher.config.ranking
    n = candidates if candidates is not None else (ranking.candidates or DEFAULT_CANDIDATES)
    n = min(max(check_whole_number(n, "candidates", 1, 100_000), top_k), len(index))
    model = matcher.model
    t0 = time.perf_counter()
    query = encode_captions(model, matcher.processor, [check_caption(text)])
    with torch.inference_mode():
        q = global_vectors(model, query.embeddings).cpu().numpy()
    t1 = time.perf_counter()
    s1, rows = index.first_stage(q, n)
    rows, s1 = rows[0][rows[0] >= 0], s1[0][rows[0] >= 0]
    t2 = time.perf_counter()
    images, kept = [], []
    for r in rows:
        im = _read(index.root, index.files[r])
        if im is not None:
            images.append(im)
            kept.append(int(r))
    timings = {"encode_query": t1 - t0, "first_stage": t2 - t1}
    if not images:
        return GallerySearchResult([], [], [], [], [], [], len(rows), timings, {"first_stage": len(rows)})
    bank = encode_images(model, matcher.processor, images, batch_size=32)
    t3 = time.perf_counter()
    timings["encode_candidates"] = t3 - t2
    k = max(ranking.k, top_k) if ranking.k > 0 else 0
    rule = resolve_ranking(ranking, k=k, candidates=0)  # every candidate gets S; ITM re-ranks the top k
    s = retrieve(model, bank, query, rule)
    timings.update(s.timings)
    final, sim = s.t2i[0], s.similarity[:, 0]
    order = np.argsort(-final, kind="stable")[:top_k]
    rescored = uses_itm(rule, model.has_itm)  # the top k lie in the re-scored set: ITM reads back from the score
    first = dict(zip(rows.tolist(), s1.tolist()))
    return GallerySearchResult(
        files=[str(index.file(kept[i])) for i in order],
        indices=[kept[i] for i in order],
        scores=[float(final[i]) for i in order],
        itm=[itm_from_final(rule, float(final[i]), float(sim[i])) if rescored else float("nan") for i in order],
        similarity=[float(sim[i]) for i in order],
        first_stage=[float(first[kept[i]]) for i in order],
        unreadable=len(rows) - len(kept),
        timings=timings,
        pairs={"first_stage": len(rows), **s.pairs},
    )
