"""Write small random gradient stores in the format of lancet_core.formats (for tests; not the real store builder).

`make_store` returns the dequantised float64 matrix the store holds (what an oracle must score against), so tests
compare DuckDB results with numpy on exactly the stored values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lancet_core.index.store import write_shard as write_store_shard

_NP = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}


def grad_column(q: np.ndarray, dtype: str) -> pa.Array:
    """The store's `grad` column: one fixed_size_binary value of the row's raw little-endian values."""
    raw = np.ascontiguousarray(q, _NP[dtype])
    n, d = raw.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(d * raw.itemsize), n, [None, pa.py_buffer(raw.tobytes())])


def quantize(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored values, grad_scale, dequantised float64) for float32 rows x."""
    if dtype == "int8":
        scale = np.abs(x).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(x / scale[:, None]), -127, 127).astype(np.int8)
        return q, scale, q.astype(np.float64) * scale.astype(np.float64)[:, None]
    q = x.astype(dtype)
    return q, np.ones(len(x), np.float32), q.astype(np.float64)


def write_shard(
    path: Path, ids: list[str], x: np.ndarray, dtype: str, extra: dict | None = None, *, plain: bool = True
) -> np.ndarray:
    """plain: grad as the store builder writes it (uncompressed PLAIN pages, read without decoding); else pyarrow's
    defaults (snappy, dictionary, statistics), which the scan reads through pyarrow."""
    q, scale, deq = quantize(x.astype(np.float32), dtype)
    cols = {
        "example_id": pa.array(ids, pa.string()),
        "grad": grad_column(q, dtype),
        "grad_norm": pa.array(np.linalg.norm(x.astype(np.float64), axis=1).astype(np.float32)),
    }
    if dtype == "int8":
        cols["grad_scale"] = pa.array(scale, pa.float32())
    for k, v in (extra or {}).items():
        cols[k] = v
    if plain:
        write_store_shard(pa.table(cols), path)
    else:
        pq.write_table(pa.table(cols), path)
    return deq


def make_store(
    directory: Path,
    x: np.ndarray,
    ids: list[str] | None = None,
    *,
    dtype: str = "float32",
    n_shards: int = 3,
    extra_columns: dict[str, np.ndarray] | None = None,
    manifest_extra: dict | None = None,
    plain: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Write rows x [N, D] as a store in `directory`; returns (example_ids in store order, dequantised float64 [N, D])."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n, d = x.shape
    ids = ids if ids is not None else [f"ex-{i:05d}" for i in range(n)]
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    shards, deqs = [], []
    for s in range(n_shards):
        a, b = bounds[s], bounds[s + 1]
        name = f"shard-{s:05d}.parquet"
        extra = {k: pa.array(v[a:b]) for k, v in (extra_columns or {}).items()}
        deqs.append(write_shard(directory / name, ids[a:b], x[a:b], dtype, extra, plain=plain))
        shards.append({"file": name, "rows": int(b - a), "digest": "sha256:test"})
    manifest = {"format_version": 2, "dim": d, "dtype": dtype, "shards": shards, "model_digest": "sha256:test"}
    manifest.update(manifest_extra or {})
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return ids, np.concatenate(deqs, axis=0)


def oracle_rank(scores: np.ndarray, ids: list[str]) -> list[str]:
    """example_ids by score descending, ties by example_id ascending (slow, obvious)."""
    return [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))]
