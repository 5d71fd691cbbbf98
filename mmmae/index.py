"""A nearest-neighbour index over extracted rows (``PREFIX.npy`` + ``PREFIX.ids.txt``), with faiss.

``build_index(prefix, source)`` writes ``PREFIX.faiss`` and ``PREFIX.index.json`` beside the rows;
``load_index(path)`` reads them back (``path``: the prefix, the json, or a folder holding one index);
``search(index, queries, k)`` returns inner-product scores and row numbers, best first.

Which index, by the number of rows N (``IVF_MIN_ROWS``, the documented threshold):

- N < 10,000: ``IndexFlatIP``, exact inner product (brute force over 10k rows is a few ms a query);
- N >= 10,000: ``IndexIVFFlat`` with ``nlist = round(sqrt(N))`` inverted lists (100 at the
  threshold, so each k-means centroid trains on ~100 points, above faiss's 39-per-centroid floor),
  inner-product metric, searching ``nprobe = round(sqrt(nlist))`` lists by default. Approximate;
  ``nprobe = nlist`` makes it exhaustive.

Scores are inner products of the rows as saved: extract with ``--normalize`` for cosine similarity.
Memory is checked before anything is built or read: an index needs about rows * dim * 4 bytes
(float32), and more than the memory available is refused with the figures.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IVF_MIN_ROWS", "INDEX_FORMAT", "available_memory", "build_index", "check_memory", "choose_index",
           "index_paths", "load_index", "resolve_index", "search"]

IVF_MIN_ROWS = 10_000
INDEX_FORMAT = "mmmae-index/1"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the nearest-neighbour index needs faiss: pip install faiss-cpu") from e
    return faiss


def index_paths(prefix: str | Path) -> dict[str, Path]:
    """The files of the index at ``prefix``: rows, ids, the faiss index and its json."""
    p = Path(prefix)
    return {k: p.with_name(p.name + s) for k, s in
            (("features", ".npy"), ("ids", ".ids.txt"), ("index", ".faiss"), ("meta", ".index.json"))}


def available_memory() -> int:
    """Bytes of memory available now (psutil, else the kernel's free page count)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(rows: int, dim: int, *, what: str, available: int | None = None) -> None:
    """Refuse an index of ``rows`` x ``dim`` float32 (rows * dim * 4 bytes) larger than the memory available."""
    need = rows * dim * 4
    have = available_memory() if available is None else available
    if need > have:
        raise MemoryError(f"{what}: {rows} rows x {dim} dims need about {need / 2**30:.2f} GiB (rows * dim * 4 bytes) "
                          f"but only {have / 2**30:.2f} GiB of memory is available; index fewer rows (split the "
                          f"input) or use a machine with more memory")


def choose_index(rows: int, ivf_min_rows: int = IVF_MIN_ROWS) -> dict[str, Any]:
    """``{"kind": "flat"}`` below ``ivf_min_rows`` rows, else ``{"kind": "ivf", "nlist", "nprobe"}``."""
    if rows < ivf_min_rows:
        return {"kind": "flat"}
    nlist = max(1, round(math.sqrt(rows)))
    return {"kind": "ivf", "nlist": nlist, "nprobe": max(1, round(math.sqrt(nlist)))}


def build_index(prefix: str | Path, source: dict[str, Any], *, ivf_min_rows: int = IVF_MIN_ROWS,
                available: int | None = None) -> dict[str, Any]:
    """Index the rows at ``prefix`` (``PREFIX.npy``, ``PREFIX.ids.txt``); write ``PREFIX.faiss`` and
    ``PREFIX.index.json`` (the choice, the sizes, the file names and ``source``: how the rows were
    made, e.g. config, checkpoint, modality); returns the json's content."""
    faiss = _faiss()
    paths = index_paths(prefix)
    for key in ("features", "ids"):
        if not paths[key].is_file():
            raise FileNotFoundError(f"no {key} file {paths[key]} to index (write it with tools/extract.py)")
    rows = np.load(paths["features"], mmap_mode="r")
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"{paths['features']}: expected (N, D) rows with N >= 1, got shape {rows.shape}")
    n, dim = rows.shape
    num_ids = len(paths["ids"].read_text(encoding="utf-8").splitlines())
    if num_ids != n:
        raise ValueError(f"{paths['ids']} has {num_ids} ids for the {n} rows of {paths['features']}")
    check_memory(n, dim, what=f"indexing {paths['features']}", available=available)
    x = np.ascontiguousarray(rows, dtype=np.float32)
    choice = choose_index(n, ivf_min_rows)
    if choice["kind"] == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, choice["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = choice["nprobe"]
    index.add(x)
    faiss.write_index(index, str(paths["index"]))
    meta = {"format": INDEX_FORMAT, **choice, "metric": "inner_product", "rows": int(n), "dim": int(dim),
            "ivf_min_rows": int(ivf_min_rows), "features": paths["features"].name, "ids": paths["ids"].name,
            "index": paths["index"].name, "source": source}
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def resolve_index(path: str | Path) -> Path:
    """The ``.index.json`` for a prefix, the json itself, or a folder holding exactly one index."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.index.json"))
        if not found:
            what = "is empty" if not any(p.iterdir()) else "holds no *.index.json"
            raise FileNotFoundError(f"no index in {p}: the folder {what} (build one with tools/extract.py --index)")
        if len(found) > 1:
            raise ValueError(f"{p} holds {len(found)} indexes ({', '.join(f.name for f in found)}); "
                             f"give one as --index PREFIX")
        return found[0]
    meta = p if p.name.endswith(".index.json") else index_paths(p)["meta"]
    if not meta.is_file():
        raise FileNotFoundError(f"no index at {path}: {meta} does not exist (build it with tools/extract.py --index)")
    return meta


def load_index(path: str | Path, *, available: int | None = None) -> tuple[Any, dict[str, Any], list[str]]:
    """-> (faiss index, its json, the row ids), after checking the index fits in memory."""
    faiss = _faiss()
    meta_path = resolve_index(path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{meta_path} is not an mmmae index (format {meta.get('format')!r}, "
                         f"expected {INDEX_FORMAT!r})")
    check_memory(int(meta["rows"]), int(meta["dim"]), what=f"loading {meta_path}", available=available)
    index_file, ids_file = meta_path.parent / meta["index"], meta_path.parent / meta["ids"]
    for f in (index_file, ids_file):
        if not f.is_file():
            raise FileNotFoundError(f"{meta_path} names {f}, which does not exist")
    index = faiss.read_index(str(index_file))
    ids = ids_file.read_text(encoding="utf-8").splitlines()
    if len(ids) != index.ntotal:
        raise ValueError(f"{ids_file} has {len(ids)} ids for the {index.ntotal} rows of {index_file}")
    return index, meta, ids


def search(index: Any, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """queries (Q, D) -> (scores (Q, k'), rows (Q, k')), best first, k' = min(k, N); rows an IVF
    search did not reach are -1. ``nprobe`` overrides an IVF index's lists searched."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"queries must be (Q, {index.d}) to match the index, got shape {q.shape}")
    if nprobe is not None:
        if not hasattr(index, "nprobe"):
            raise ValueError("nprobe applies to an IVF index; this one is exact (flat)")
        if not 1 <= nprobe <= index.nlist:
            raise ValueError(f"nprobe must be in 1..{index.nlist} (the index's lists), got {nprobe}")
        index.nprobe = nprobe
    return index.search(q, min(k, index.ntotal))
