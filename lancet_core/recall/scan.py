"""Score EVERY training row of a gradient store against preconditioned query vectors: Parquet pages read as they are
(or streamed through Arrow), inner products in BLAS, DuckDB for the SQL around them (joins, ranking, corpus columns).

Input: a gradient-store directory (format in `lancet_core.formats`: `shard-NNNNN.parquet` with `example_id`, `grad`
fixed_size_binary[D × itemsize] = the row's raw float16|float32|int8 values, `grad_norm`, `grad_scale`;
`manifest.json` with `format_version`, `dim`, `dtype`, `shards`)
and query vectors V [Q, D] that are ALREADY preconditioned (`(F + λI)⁻¹ g_q`, docs/design.md §5). Output: one influence
score per training row, ranked, written to `influence.parquet`, plus top-k.

Sign convention (stated once, here): `influence_score = v_qᵀ g_i`; score > 0 means training on row i RAISES the
likelihood of the undesirable output q (with v_q the preconditioned gradient of log π(y_q|x_q)).

Several queries: each query vector is scaled to unit norm, so every query weighs the same, and the folded score is
the mean over queries of the per-query scores. Because that is linear, the Q vectors fold into ONE vector
`v = mean_q(v_q / ‖v_q‖)` and the store is scanned once for one dot product per row. `per_query=True` computes the Q
normalised dot products in the same single scan (one GEMM per block against all Q vectors) and returns per-query
top-k; its folded `score` is then the mean of those Q columns, in float64.

Train-side normalisation (`train_norm`), against high-norm outliers dominating every ranking:
  - `none`: the raw score.
  - `cosine`: score / grad_norm (the norm of the UNquantised train vector, as stored). Rows with grad_norm = 0 score 0.
  - `relative` (relative influence, Barshan et al. 2020): score / sqrt(self_influence_i), with self_influence_i =
    g_iᵀ (F + λI)⁻¹ g_i. This module does not know the curvature, so the self-influence must be provided: either a
    `self_influence` float column in the store's shards, or a Parquet file (`example_id`, `self_influence`) passed
    as `self_influence_path` (joined to the store by example_id in DuckDB, before the scan). Without either it is a
    clear error, never a silent fallback. Rows with self_influence = 0 score 0; a negative one is an error.

How the scan runs (`scan_store`): a reader thread (one by default) reads each shard in store order, having asked the
OS to read the next shards ahead (posix_fadvise): its `grad` values segment by segment (~8 MiB, one positioned read
each, straight into the segment's array) when the shard stores them as uncompressed PLAIN pages (the builder's
layout; lancet_core.recall.pages finds them between the page headers, nothing is decoded), else from pyarrow record
batches (any other Parquet writer's layout; the fixed-size-binary value buffer is viewed without a copy), plus the
small columns (example_id, grad_scale / denominator). It hands the segments over a few ahead.
The consumer casts the stored values (torch's vectorised cast; numpy's fp16 cast is ~4x slower) into a GEMM block of
B rows sized to stay in cache (~1 MiB) and multiplies each full block by all Qc query vectors in ONE BLAS GEMM
([B, D] @ [D, Qc]); with 8 or more query vectors the GEMM is the bottleneck, so the reader casts instead and the
consumer multiplies the segment's blocks where they are. Products of a stage of ~16k rows are then scaled (int8),
normalised, checked and selected at once. So no step holds more than a few segments of gradients; the per-row scores
[N] (and [N, Q] when per-query scores are asked) are kept.
Precision (`precision`, RecallConfig.score_precision): float32 by default. fp16/int8/fp32 values are exact in it, the
unit-normalised queries are rounded to it, and a score's error is bounded by (D+2)·2⁻²⁴·Σ|g_i v_i| (checked in
tests/core/recall/test_scan_float32.py): ~1000x below the fp16 storage's own rounding. `float64` matches a float64
oracle to ~1e-12 and costs ~2x (tests/core/recall/test_scan_blas.py checks that mode). Every block has the same GEMM
shape (the last one is zero-padded), so identical rows get bit-identical scores and ties stay ties, in both.
Top-k (folded and per query) is selected while streaming: until a column holds k rows each stage is cut at its own
k-th best, then rows below the running k-th score are skipped, the rest merged; ties are broken by `example_id`
ascending (byte order of UTF-8, i.e. code points), as DuckDB's `ORDER BY score DESC, example_id ASC` in
`rank_scores` does. DuckDB gets values only as parameters, never formatted into SQL.

Knows about the store's file format, Arrow, BLAS (through numpy), torch's cast and DuckDB. Knows nothing about models, gradients'
computation, curvature or judges.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc  # imported with the module, not lazily inside the first query
import pyarrow.parquet as pq
import torch  # only for its fast fp16/int8 -> float32 cast (vectorised; numpy's is ~4x slower here)

from lancet_core.errors import LancetError
from lancet_core.formats import GRADIENT_STORE_FORMAT, INFLUENCE_FILE, TOKEN_COLUMNS
from lancet_core.manifest import MANIFEST_NAME, atomic_write_parquet
from lancet_core.recall.pages import plain_column

TrainNorm = Literal["none", "cosine", "relative"]
_TRAIN_NORMS = ("none", "cosine", "relative")
Precision = Literal["float32", "float64"]
_PRECISIONS = {"float32": np.float32, "float64": np.float64}
_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.parquet$")
# Columns of tokens.parquet/corpus that are NOT copied into influence.parquet (model inputs, not for reading).
_NOT_CARRIED = frozenset(TOKEN_COLUMNS) - {"example_id", "prompt", "response"}
_SCORES_VIEW = "lancet_scores"  # name under which an Arrow table of scores is registered in DuckDB (the SQL says it)


class InfluenceQueryError(LancetError, ValueError):
    """The store, the query vectors or the request cannot be used as given."""


@dataclass(frozen=True)
class StoreInfo:
    """What the scan needs to know about a gradient store, read defensively from its manifest and shard schemas."""

    directory: Path
    dim: int
    dtype: str  # "float16" | "float32" | "int8"
    files: tuple[str, ...]  # absolute shard paths, in manifest order
    n_rows: int
    has_self_influence: bool


@dataclass(frozen=True)
class InfluenceResult:
    """`top_k`: ranked rows (same columns as influence.parquet); `per_query_top_k`: query_id -> ranked rows with
    columns example_id, score (that query's normalised score), rank — only when per_query=True."""

    path: Path | None
    top_k: pa.Table
    per_query_top_k: dict[str, pa.Table] = field(default_factory=dict)
    n_rows: int = 0


# --------------------------------------------------------------------------------------------------------- store


def open_store(store_dir: str | Path) -> StoreInfo:
    """Validate a gradient-store directory and return what a scan needs. Raises InfluenceQueryError naming the problem."""
    d = Path(store_dir)
    mf = d / MANIFEST_NAME
    if not d.is_dir():
        raise InfluenceQueryError(f"{d}: gradient store directory does not exist")
    if not mf.is_file():
        raise InfluenceQueryError(f"{mf}: missing manifest.json; the gradient store is unfinished or not a store")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise InfluenceQueryError(f"{mf}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise InfluenceQueryError(f"{mf}: expected a JSON object")
    if manifest.get("complete") is False:
        raise InfluenceQueryError(f"{mf}: the gradient store is unfinished (complete=false); finish building it first")
    dim = manifest.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise InfluenceQueryError(f"{mf}: 'dim' must be a positive integer, got {dim!r}")
    dtype = manifest.get("dtype")
    if dtype not in _DTYPES:
        raise InfluenceQueryError(f"{mf}: 'dtype' must be one of {sorted(_DTYPES)}, got {dtype!r}")
    version = manifest.get("format_version", GRADIENT_STORE_FORMAT)
    if version != GRADIENT_STORE_FORMAT:
        raise InfluenceQueryError(
            f"{mf}: gradient store format_version {version!r}; this lancet reads version {GRADIENT_STORE_FORMAT} "
            "(grad as fixed_size_binary): rebuild the store (lancet index, or delete it and re-run realign)"
        )

    shards = manifest.get("shards")
    if shards is None:
        names = sorted(p.name for p in d.glob("shard-*.parquet"))
        declared_rows = None
    else:
        if not isinstance(shards, list):
            raise InfluenceQueryError(f"{mf}: 'shards' must be a list")
        names, declared_rows = [], []
        for j, s in enumerate(shards):
            name = s.get("file") if isinstance(s, dict) else None
            if not isinstance(name, str):
                raise InfluenceQueryError(f"{mf}: shards[{j}] has no 'file' string")
            names.append(name)
            declared_rows.append(s.get("rows"))
    files = []
    for j, name in enumerate(names):
        # Shard names become DuckDB *parameters*, but they are also paths: refuse anything that could leave the store.
        if not _SHARD_NAME.match(name):
            raise InfluenceQueryError(f"{mf}: shards[{j}].file = {name!r} is not a plain 'shard-NNNNN.parquet' name")
        p = d / name
        if not p.is_file():
            raise InfluenceQueryError(f"{p}: listed in the manifest but missing")
        files.append(str(p.resolve()))
    if not files:
        raise InfluenceQueryError(f"{d}: gradient store is empty (no shards)")

    n_rows = 0
    has_si = True
    for j, f in enumerate(files):
        meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
        rows = meta.num_rows
        if declared_rows is not None and declared_rows[j] is not None and declared_rows[j] != rows:
            raise InfluenceQueryError(f"{f}: manifest says {declared_rows[j]} rows, the file has {rows}")
        for col in ("example_id", "grad", "grad_norm") + (("grad_scale",) if dtype == "int8" else ()):
            if col not in schema.names:
                raise InfluenceQueryError(f"{f}: missing column {col!r} (has {schema.names})")
        gt = schema.field("grad").type
        if pa.types.is_fixed_size_list(gt):
            raise InfluenceQueryError(
                f"{f}: column 'grad' is {gt} (gradient store format 1); this lancet reads format "
                f"{GRADIENT_STORE_FORMAT} (fixed_size_binary): rebuild the store"
            )
        if not pa.types.is_fixed_size_binary(gt):
            raise InfluenceQueryError(f"{f}: column 'grad' must be fixed_size_binary, got {gt}")
        if gt.byte_width != dim * _DTYPES[dtype].itemsize:
            raise InfluenceQueryError(
                f"{f}: 'grad' has {gt.byte_width / _DTYPES[dtype].itemsize:g} dims, manifest.json says dim={dim} "
                f"({gt.byte_width} bytes per row, {dim * _DTYPES[dtype].itemsize} expected for {dtype})"
            )
        has_si = has_si and "self_influence" in schema.names
        n_rows += rows
    if n_rows == 0:
        raise InfluenceQueryError(f"{d}: gradient store is empty (0 rows in {len(files)} shard(s))")
    return StoreInfo(d, dim, dtype, tuple(files), n_rows, has_si)


# ------------------------------------------------------------------------------------------------------- queries


def normalized_queries(V: np.ndarray, dim: int) -> np.ndarray:
    """Validate V ([Q, D] or [D]) and return float64 rows scaled to unit norm."""
    V = np.asarray(V)
    if V.ndim == 1:
        V = V[None, :]
    if V.ndim != 2 or V.shape[0] < 1:
        raise InfluenceQueryError(f"query vectors must have shape [Q, D] with Q >= 1, got {V.shape}")
    if not np.issubdtype(V.dtype, np.number):
        raise InfluenceQueryError(f"query vectors must be numeric, got dtype {V.dtype}")
    if V.shape[1] != dim:
        raise InfluenceQueryError(f"query vectors have D={V.shape[1]} but the gradient store has dim={dim}")
    V = V.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(V).all(axis=1))
    if bad.size:
        raise InfluenceQueryError(f"query vector(s) {bad.tolist()[:10]} contain NaN or inf")
    norms = np.linalg.norm(V, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise InfluenceQueryError(f"query vector(s) {zero.tolist()[:10]} are all zeros: cannot normalise")
    return V / norms[:, None]


def fold_queries(V: np.ndarray, dim: int) -> np.ndarray:
    """The one vector whose dot product equals the mean of the per-query unit-normalised scores: mean_q v_q/‖v_q‖."""
    return normalized_queries(V, dim).mean(axis=0)


# ---------------------------------------------------------------------------------------------------------- scan

# The GEMM block: B rows of float64 gradients, multiplied by all query vectors at once. B is a multiple of 64 and the
# SAME for every block of a scan (the last block is zero-padded), so every row goes through an identically shaped BLAS
# call: OpenBLAS picks kernels (and so the summation order) by shape and by a row's position modulo its unroll, and
# identical rows must get bit-identical scores for ties to be ties (measured: shapes that are not multiples of 64, or
# that change between calls, break exact ties by 1 ulp).
_GEMM_ROW_ALIGN = 64
# GEMM block ~ 2 MiB (this CPU's L2 per core): 512 float32 rows at D = 1024; never under 64 rows (14 MiB at D = 54k).
# Measured (200k x 1024 fp16, float32): 128 / 256 / 512 / 1024 rows within 5 % of each other.
_GEMM_BLOCK_BYTES = 2 << 20
_GEMM_MAX_ROWS = 4096
# one Arrow record batch holds ~ 2 MiB of stored gradient values (measured: larger batches are no faster, and each
# batch in flight costs RSS)
_READ_BATCH_BYTES = 2 << 20
# Parquet column chunks are read through a 2 MiB buffered stream (pre_buffer=False). pyarrow's default
# (pre_buffer=True) reads a whole row group's column chunk first: a whole shard, ~1 GB at D = 54k x 4096 rows;
# measured also slower (1.4-1.8 s vs 1.15 s for 200k x 1024 fp16).
_READ_BUFFER_BYTES = 2 << 20
_SEGMENT_BYTES = 8 << 20  # the reader threads hand over gradients in segments of about this size
_CAST_IN_READER_QUERIES = 8  # from this many query vectors on, the readers cast (see scan_store)
_PREFETCH_DEPTH = 4  # segments read ahead by each reader thread, at most
_PREFETCH_BYTES = 32 << 20  # ... and at most about this many bytes of them (but always one)
# Before reading a shard, a reader asks the OS to start reading the next shards from disk (posix_fadvise WILLNEED), so
# a store that is not in the page cache is read with the disk busy all the time. Measured on a dropped page cache
# (200k x 1024 fp16, 400 MB, one reader): see scan_store's `readers`.
_ADVISE_AHEAD_FILES = 4
# One reader thread by default, overlapping reading with the consumer's cast and GEMMs. Measured on 2 cores, plain
# pages: 200k x 1024 fp16 warm, Q = 1: 1.9x the in-RAM matvec with one reader, 2.7x with none, and a second reader
# only competes with the consumer for the cores (Q = 32: 4.2x vs 4.8x); 20k x 54k (2.2 GB) warm 0.51 s with one,
# 0.95 s with two, and from a dropped page cache 2.2 s vs 2.0 s (`cat` of the files: 2.4 s). More are allowed
# through `readers`, 0 reads in the consumer's thread.
_DEFAULT_READERS = 1
_STAGE_ROWS = 16_384  # rows per scoring stage (bookkeeping and top-k selection), a multiple of the GEMM block


def _aligned_empty(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a 4 KiB boundary. Every GEMM operand of a scan is one of these
    (or a whole-block slice of one, at a multiple of the block's bytes): MKL may take another code path, and round
    differently, for another alignment of the same shape, and identical rows must get bit-identical scores."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 4096, np.uint8)
    at = -raw.ctypes.data % 4096
    return raw[at : at + nbytes].view(dtype).reshape(shape)


def _advise_willneed(path: str) -> None:
    """Ask the OS to start reading a file into the page cache now, asynchronously (a no-op where unsupported)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the reader reports it when it gets there
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array, also of a read-only one (an Arrow buffer): it is only ever read."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(a)


def _check_train_norm(train_norm: str) -> None:
    if train_norm not in _TRAIN_NORMS:
        raise InfluenceQueryError(f"train_norm must be one of {_TRAIN_NORMS}, got {train_norm!r}")


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def _gemm_rows(dim: int, n_rows: int, batch_rows: int | None, itemsize: int = 8) -> int:
    if batch_rows is None:
        batch_rows = min(_GEMM_MAX_ROWS, max(1, _GEMM_BLOCK_BYTES // (itemsize * dim)))
    if not isinstance(batch_rows, (int, np.integer)) or isinstance(batch_rows, bool) or batch_rows < 1:
        raise InfluenceQueryError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    return _round_up(min(int(batch_rows), n_rows), _GEMM_ROW_ALIGN)


def _readers(readers: int | None) -> int:
    if readers is None:
        return max(1, min(_DEFAULT_READERS, os.cpu_count() or 1))
    if not isinstance(readers, (int, np.integer)) or isinstance(readers, bool) or readers < 0:
        raise InfluenceQueryError(f"readers must be an integer >= 0, got {readers!r}")
    return int(readers)


def _read_rows(info: StoreInfo, read_rows: int | None) -> int:
    if read_rows is None:
        return max(1, min(65_536, _READ_BATCH_BYTES // (_DTYPES[info.dtype].itemsize * info.dim)))
    if not isinstance(read_rows, (int, np.integer)) or isinstance(read_rows, bool) or read_rows < 1:
        raise InfluenceQueryError(f"read_rows must be an integer >= 1, got {read_rows!r}")
    return int(read_rows)


def _relative_denominator_source(info: StoreInfo, self_influence_path: str | Path | None) -> Path | None:
    """None = the shards' own `self_influence` column; a path = a separate (example_id, self_influence) file."""
    if self_influence_path is not None:
        sp = Path(self_influence_path)
        if not sp.is_file():
            raise InfluenceQueryError(f"{sp}: self-influence file does not exist")
        names = pq.read_schema(sp).names
        if "example_id" not in names or "self_influence" not in names:
            raise InfluenceQueryError(f"{sp}: needs columns example_id and self_influence (has {names})")
        return sp
    if info.has_self_influence:
        return None
    raise InfluenceQueryError(
        "train_norm='relative' needs each row's self-influence g_iᵀ(F+λI)⁻¹g_i: the store's shards have no "
        "'self_influence' column and no self_influence_path was given"
    )


def _joined_self_influence(
    info: StoreInfo, path: Path, con: duckdb.DuckDBPyConnection | None
) -> tuple[np.ndarray, pa.Array]:
    """self_influence of every store row, in store order, joined by example_id in DuckDB (reads only the store's
    example_id column). Missing rows are NaN. Returns (values [N] float64, store example_ids)."""
    sql = (
        "SELECT g.example_id AS example_id, si.self_influence::DOUBLE AS self_influence "
        "FROM read_parquet(?, filename='_lancet_file', file_row_number=true) g "
        "LEFT JOIN read_parquet(?) si ON si.example_id = g.example_id "
        "ORDER BY list_position(?, g._lancet_file), g.file_row_number"
    )
    own = con is None
    con = duckdb.connect() if own else con
    try:
        res = con.sql(sql, params=[list(info.files), str(path.resolve()), list(info.files)]).to_arrow_table()
    finally:
        if own:
            con.close()
    if res.num_rows != info.n_rows:
        raise InfluenceQueryError(
            f"{path}: joining it to the store gives {res.num_rows} rows for {info.n_rows} store rows: duplicate "
            "example_id values in the self-influence file"
        )
    return res.column("self_influence").to_numpy(zero_copy_only=False), res.column("example_id").combine_chunks()


def _read_in_order(files: Sequence[str], read_file, readers: int, depth: int):
    """Yield `read_file(f)`'s items for every file, in file order, decoded ahead by `readers` threads: thread r reads
    files r, r + readers, ... into its own queue of `depth` items, and the consumer takes file i from queue
    i % readers. Parquet decoding releases the GIL, so files decode in parallel and overlap the consumer's GEMMs.
    Errors in a reader are re-raised here; stopping early stops the readers. readers 0: plain iteration, no thread."""
    if readers <= 0:
        for f in files:
            yield from read_file(f)
        return
    readers = min(readers, len(files))
    queues = [queue.Queue(maxsize=max(1, depth)) for _ in range(readers)]
    stop = threading.Event()
    end_of_file = object()

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce(r: int) -> None:
        q = queues[r]
        try:
            for f in files[r::readers]:
                for item in read_file(f):
                    if not put(q, (None, item)):
                        return
                if not put(q, (None, end_of_file)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(q, (e, None))

    threads = [
        threading.Thread(target=produce, args=(r,), name="lancet-scan-reader", daemon=True) for r in range(readers)
    ]
    for t in threads:
        t.start()
    try:
        for i in range(len(files)):
            q = queues[i % readers]
            while True:
                err, item = q.get()
                if err is not None:
                    raise err
                if item is end_of_file:
                    break
                yield item
    finally:
        stop.set()
        for q in queues:
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        for t in threads:
            t.join()


class _RunningTopK:
    """Top-k of several score columns, streamed block by block, in the order `score DESC, example_id ASC` (DuckDB's
    and the numpy oracle's order; example_ids compare by code point = UTF-8 byte order).

    Per column: the kept (score, example_id) pairs (at most k once merged), a threshold (the k-th kept score, -inf
    until k rows were kept) and pending candidates. A block only looks at its rows scoring >= threshold (a row below
    can never enter: the kept set only improves), cuts them to the block's k best with np.partition (ties at the cut
    kept: a block's candidates are its rows >= max(threshold, the block's own k-th best)) and queues them; pending candidates are merged (sorted by score, then example_id) once they outnumber
    max(k, 1024), and at the end. Merging late keeps the threshold lower for a while, which costs candidates, never
    correctness."""

    _MERGE_AT = 1024

    def __init__(self, k: int, n_cols: int):
        self.k = int(k)
        self.scores = [np.empty(0, np.float64) for _ in range(n_cols)]
        self.ids: list[np.ndarray] = [np.empty(0, dtype=object) for _ in range(n_cols)]
        self.threshold = np.full(n_cols, -np.inf)
        self.pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_cols)]
        self.n_pending = np.zeros(n_cols, np.int64)

    def push(self, S: np.ndarray, ids: pa.Array, first: int = 0) -> None:
        """S [n, m]: finite scores of n rows (example_ids `ids`, an Arrow array of length n) for the m columns
        first .. first + m - 1."""
        n, m = S.shape
        threshold = self.threshold[first : first + m]
        if n > self.k and np.isinf(threshold).any():
            # until every column holds k rows: no row below a column's k-th best of this block can enter (ties at
            # the cut are kept); later blocks have few rows above the threshold, the partition would cost more
            threshold = np.maximum(threshold, np.partition(S, n - self.k, axis=0)[n - self.k])
        mask = S >= threshold[None, :]
        rows_any = np.flatnonzero(mask.any(axis=1))
        if rows_any.size == 0:
            return
        cand_ids = np.array(pc.take(ids, pa.array(rows_any)).to_pylist(), dtype=object)
        sub = mask[rows_any]
        for j in np.flatnonzero(sub.any(axis=0)):
            c = first + j
            sel = np.flatnonzero(sub[:, j])
            self.pending[c].append((S[rows_any[sel], j].astype(np.float64), cand_ids[sel]))
            self.n_pending[c] += sel.size
            if self.n_pending[c] >= (self.k if np.isinf(self.threshold[c]) else max(self.k, self._MERGE_AT)):
                self._merge(c)  # the first k rows at once: from then on the threshold filters the blocks

    def _merge(self, c: int) -> None:
        if not self.pending[c]:
            return
        all_s = np.concatenate([self.scores[c]] + [s for s, _ in self.pending[c]])
        all_ids = np.concatenate([self.ids[c]] + [i for _, i in self.pending[c]])
        order = np.argsort(-all_s, kind="stable")
        if (all_s[order[1:]] == all_s[order[:-1]]).any():  # equal scores: order them by example_id too
            # Python's str order is code point order, as DuckDB's; numpy's 'U' strings would drop trailing NULs
            order = sorted(range(len(all_s)), key=lambda i: (-all_s[i], all_ids[i]))
        order = np.asarray(order[: self.k], np.int64)
        self.scores[c], self.ids[c] = all_s[order], all_ids[order]
        self.pending[c], self.n_pending[c] = [], 0
        if len(order) == self.k:
            self.threshold[c] = self.scores[c][-1]

    def table(self, c: int, id_type: pa.DataType) -> pa.Table:
        self._merge(c)
        n = len(self.scores[c])
        return pa.table(
            {
                "example_id": pa.array(self.ids[c].tolist(), id_type),
                "score": pa.array(self.scores[c], pa.float64()),
                "rank": pa.array(np.arange(1, n + 1, dtype=np.int64)),
            }
        )


@dataclass(frozen=True)
class StoreScan:
    """What one streaming scan returns. `score` [N] is the folded score (the mean of the Q normalised per-query
    scores), `query_scores` [N, Q] the per-query scores (per_query=True only), both in store order with
    `example_ids`; all three are None when the scan kept only top-k (keep_scores=False). `top_k` (example_id, score,
    rank) and `per_query_top_k` (one such table per query, in V's row order) when a top_k was asked."""

    n_rows: int
    example_ids: pa.ChunkedArray | None
    score: np.ndarray | None
    query_scores: np.ndarray | None
    top_k: pa.Table | None
    per_query_top_k: list[pa.Table] | None

    def to_table(self) -> pa.Table:
        """score_store's table: example_id, score (float64) and, with per-query scores, query_scores list<double>."""
        if self.score is None:
            raise InfluenceQueryError("this scan kept only top-k (keep_scores=False): no per-row scores")
        out = {"example_id": self.example_ids, "score": pa.array(self.score, pa.float64())}
        if self.query_scores is not None:
            Q = self.query_scores.shape[1]
            out["query_scores"] = pa.FixedSizeListArray.from_arrays(
                pa.array(self.query_scores.reshape(-1), pa.float64()), Q
            )
        return pa.table(out)


class _Scanner:
    """The state of one streaming scan. Rows are cast into a small GEMM block (B rows, sized to stay in cache) and
    multiplied by the query vectors into a stage of R = a multiple of B rows of products; everything per row that is
    not arithmetic (example_ids, int8 scales, train-norm denominators, finiteness checks, the kept scores, the top-k
    selection) is done once per stage, so the per-block Python work is two calls (cast, GEMM)."""

    def __init__(
        self,
        info: StoreInfo,
        W: np.ndarray,
        *,
        per_query: bool,
        train_norm: str,
        with_den: bool,
        B: int,
        keep_scores: bool,
        top_k: int | None,
    ):
        self.info, self.W, self.B = info, W, B
        self.per_query, self.train_norm, self.with_den = per_query, train_norm, with_den
        N, D, Qc = info.n_rows, info.dim, W.shape[1]
        # gradients in the compute precision (W's dtype): fp16/int8 values are exact in float32 and float64
        self.block = _aligned_empty((B, D), W.dtype)
        self.block[:] = 0
        self.block_t = torch.from_numpy(self.block)  # the same memory, for torch's cast and GEMM
        self.W_t = torch.from_numpy(W)
        self.R = R = B * max(1, _STAGE_ROWS // B)
        self.prod = np.empty((R, Qc), W.dtype)  # the stage's products, R rows
        self.prod_t = torch.from_numpy(self.prod)
        self.scale = np.ones(R, np.float64)  # int8: grad_scale per row
        self.den = np.ones(R, np.float64)  # train-norm denominator per row (NaN = missing or invalid)
        self.stage_ids: list[pa.Array] = []  # example_ids of the stage's rows
        self.fill = self.staged = self.done = self.null_ids = 0  # rows in the block; block rows in the stage; rows done
        self.id_type: pa.DataType | None = None
        self.kept_ids: list[pa.Array] | None = [] if keep_scores else None
        self.score = np.empty(N, np.float64) if keep_scores else None
        self.query_scores = np.empty((N, Qc), np.float64) if keep_scores and per_query else None
        n_top = 1 + (Qc if per_query else 0)  # column 0: folded; then one per query
        self.top = _RunningTopK(top_k, n_top) if top_k is not None else None

    def error(self, ids: pa.Array, i: int, what: str) -> InfluenceQueryError:
        return InfluenceQueryError(f"{self.info.directory}: row example_id={ids[i].as_py()!r}: {what}")

    def add(
        self, ids: pa.Array, g: np.ndarray, scale: np.ndarray | None, den: np.ndarray | None, aligned: bool
    ) -> None:
        """Rows [n] in store order: example_ids, vectors g [n, D] (C-contiguous; stored fp16/fp32/int8 values, or
        already cast to the compute dtype), int8 scale, den. `aligned`: g is a pooled buffer (`_aligned_empty`), so
        its whole blocks may be multiplied where they are; any other array (an Arrow buffer) goes through the block,
        keeping every GEMM operand equally aligned."""
        self.id_type = ids.type
        self.null_ids += ids.null_count
        if self.kept_ids is not None:
            self.kept_ids.append(ids)
        n, i, B = len(g), 0, self.B
        direct = aligned and g.dtype == self.block.dtype
        gt = _tensor(g)
        while i < n:
            p = self.staged + self.fill  # the stage row the next row goes to
            end = i + min(self.R - p, n - i)  # rows [i, end) of this segment belong to the current stage
            self.stage_ids.append(ids if (i == 0 and end == n) else ids.slice(i, end - i))
            if scale is not None:
                self.scale[p : p + end - i] = scale[i:end]
            if den is not None:
                self.den[p : p + end - i] = den[i:end]
            while i < end:
                f = self.fill
                if f == 0 and end - i >= B and direct:  # a whole block of the segment: multiplied where it is
                    self._gemm(gt[i : i + B])
                    i += B
                    continue
                m = min(B - f, end - i)
                self.block_t[f : f + m].copy_(gt[i : i + m])  # cast (or copy) in place, into the block
                self.fill, i = f + m, i + m
                if self.fill == B:
                    self._gemm(self.block_t)
            if self.staged == self.R:
                self.flush()

    def _gemm(self, block: torch.Tensor) -> None:
        """ONE GEMM of a block of B rows against all queries: [B, D] @ [D, Qc], into the stage's products. torch's
        (MKL): 1.5x numpy's OpenBLAS at [512, 1024] @ [1024, 32] in float32 here (160 vs 106 GFLOP/s, one thread)."""
        at = self.staged
        torch.mm(block, self.W_t, out=self.prod_t[at : at + self.B])
        self.staged, self.fill = at + self.B, 0

    def flush(self) -> None:
        """Score the stage's rows: scales, denominators, checks, kept scores, top-k."""
        n = self.staged + self.fill
        if self.fill:  # the last block: the same GEMM shape as every other one, zero rows past the data
            self.block[self.fill :] = 0.0
            self._gemm(self.block_t)
        at = self.done
        if n == 0:
            return
        S = self.prod[:n]  # in the compute dtype; float64 once scales or denominators apply
        ids = self.stage_ids[0] if len(self.stage_ids) == 1 else pa.concat_arrays(self.stage_ids)
        if self.info.dtype == "int8":
            S = S * self.scale[:n, None]
        if self.with_den:
            d = self.den[:n]
            if np.isnan(d).any():
                what = (
                    "self-influence is missing or negative" if self.train_norm == "relative" else "grad_norm is missing"
                )
                raise self.error(ids, int(np.flatnonzero(np.isnan(d))[0]), what)
            with np.errstate(divide="ignore", invalid="ignore"):
                S = np.where(d[:, None] > 0, S / np.where(d > 0, d, 1.0)[:, None], 0.0)
        folded = S.mean(axis=1, dtype=np.float64) if self.per_query else S[:, 0].astype(np.float64)
        if not np.isfinite(folded).all():  # a NaN or inf in any query's score makes the row's mean non-finite
            raise self.error(ids, int(np.flatnonzero(~np.isfinite(folded))[0]), "has a non-finite score (NaN/inf gradient?)")
        if self.score is not None:
            self.score[at : at + n] = folded
        if self.query_scores is not None:
            self.query_scores[at : at + n] = S
        if self.top is not None:
            self.top.push(folded[:, None], ids)
            if self.per_query:
                self.top.push(S, ids, first=1)
        self.stage_ids = []
        self.fill = self.staged = 0
        self.done = at + n

    def finish(self) -> StoreScan:
        self.flush()
        info = self.info
        if self.done != info.n_rows:
            raise InfluenceQueryError(f"{info.directory}: scanned {self.done} rows, the shards declare {info.n_rows}")
        if self.null_ids:
            raise InfluenceQueryError(f"{info.directory}: {self.null_ids} row(s) have a null example_id")
        id_type = self.id_type if self.id_type is not None else pa.string()
        top_table = per_q = None
        if self.top is not None:
            top_table = self.top.table(0, id_type)
            if self.per_query:
                per_q = [self.top.table(1 + j, id_type) for j in range(self.W.shape[1])]
        return StoreScan(
            n_rows=info.n_rows,
            example_ids=pa.chunked_array(self.kept_ids, id_type) if self.kept_ids is not None else None,
            score=self.score,
            query_scores=self.query_scores,
            top_k=top_table,
            per_query_top_k=per_q,
        )


def scan_store(
    store_dir: str | Path,
    V: np.ndarray,
    *,
    train_norm: TrainNorm = "none",
    per_query: bool = False,
    self_influence_path: str | Path | None = None,
    top_k: int | None = None,
    keep_scores: bool = True,
    batch_rows: int | None = None,
    read_rows: int | None = None,
    readers: int | None = None,
    precision: Precision = "float32",
    con: duckdb.DuckDBPyConnection | None = None,
) -> StoreScan:
    """Stream every shard once and score each row against all query vectors with BLAS (see the module docstring).

    `top_k`: also keep the folded and (per_query) per-query top-k, selected while streaming. `keep_scores=False`:
    keep only that top-k, not the per-row scores. `batch_rows` (rounded up to a multiple of 64) and `read_rows` set
    the GEMM block and the Arrow record-batch sizes (defaults sized from D); `readers`: threads decoding shards ahead
    (default min(2, CPUs); 0 = decode in this thread). Results do not depend on any of the three. `precision`: the
    GEMM's (float32 by default; float64 matches a float64 oracle to ~1e-12, see the module docstring)."""
    _check_train_norm(train_norm)
    if precision not in _PRECISIONS:
        raise InfluenceQueryError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    cdt = np.dtype(_PRECISIONS[precision])
    info = open_store(store_dir)
    n_readers = _readers(readers)
    U = normalized_queries(V, info.dim)
    if top_k is not None:
        _check_k(top_k, info.n_rows)
    elif not keep_scores:
        raise InfluenceQueryError("keep_scores=False needs a top_k: the scan would return nothing")
    D = int(info.dim)
    W = np.ascontiguousarray((U if per_query else U.mean(axis=0, keepdims=True)).T, cdt)  # [D, Qc]

    si_file = _relative_denominator_source(info, self_influence_path) if train_norm == "relative" else None
    si_all = si_ids = None
    if si_file is not None:
        si_all, si_ids = _joined_self_influence(info, si_file, con)
    columns = ["example_id", "grad"] + (["grad_scale"] if info.dtype == "int8" else [])
    den_col = {"cosine": "grad_norm", "relative": "self_influence" if si_file is None else None}.get(train_norm)
    columns += [den_col] if den_col is not None else []
    rows_per_read = _read_rows(info, read_rows)
    sc = _Scanner(
        info,
        W,
        per_query=per_query,
        train_norm=train_norm,
        with_den=train_norm != "none",
        B=_gemm_rows(D, info.n_rows, batch_rows, cdt.itemsize),
        keep_scores=keep_scores,
        top_k=top_k,
    )

    dt = _DTYPES[info.dtype]
    side = [c for c in columns if c != "grad"]

    # With many query vectors the consumer's GEMM is the bottleneck: the reader threads then also cast the stored
    # values to the compute dtype (torch's vectorised cast). With few, the GEMM is cheap and the reader, which
    # copies the bytes out of the file, would become the bottleneck: the consumer casts, block by block
    # (measured at 200k x 1024 fp16: Q = 1 2.2x vs 3.0x the in-RAM matvec, Q = 32 5.2x vs 4.1x).
    cast_in_reader = W.shape[1] >= _CAST_IN_READER_QUERIES and n_readers > 0
    seg_dtype = cdt if cast_in_reader else dt  # what the consumer gets
    seg_rows = max(sc.B, _SEGMENT_BYTES // (D * seg_dtype.itemsize) // sc.B * sc.B)
    depth = max(1, min(_PREFETCH_DEPTH, _PREFETCH_BYTES // (seg_rows * D * seg_dtype.itemsize)))

    # Segment buffers are recycled: the consumer hands each back once it has multiplied it (fresh 2-8 MiB arrays
    # cost page faults and zeroing on every segment: measured 1.9x -> 2.8x the matvec at 200k x 1024).
    free: list[np.ndarray] = []  # list.append / pop are atomic: the reader takes, the consumer gives back

    def take() -> np.ndarray:
        try:
            return free.pop()
        except IndexError:
            return _aligned_empty((seg_rows, D), seg_dtype)

    def ready(part: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows not read into a pooled buffer, as the consumer wants them; the pooled buffer to give back or None).
        When the reader casts, the rows always land in a pooled (aligned) buffer, whatever their dtype."""
        if cast_in_reader:
            buf = take()
            out = buf[: len(part)]
            torch.from_numpy(out).copy_(_tensor(part))
            return out, buf
        return part, None

    def segments(ids: pa.Array, g: np.ndarray, rb: pa.RecordBatch):
        for a in range(0, len(g), seg_rows):
            part, buf = ready(g[a : a + seg_rows])
            if len(g) <= seg_rows:
                yield ids, part, rb, buf
            else:
                yield ids.slice(a, seg_rows), part, rb.slice(a, seg_rows), buf

    position = {f: j for j, f in enumerate(info.files)}

    def read_file(f: str):
        """Yield (example_ids, grad [n, D] in the compute dtype, record batch of the other columns) segments of one
        shard, in row order: from the shard's grad pages as they are in the file when it stores them plainly
        (lancet_core.recall.pages), else from pyarrow record batches."""
        j = position[f]  # the first shard advises the next few, every later one the one that many after it
        for nxt in info.files[j + 1 : j + 1 + _ADVISE_AHEAD_FILES] if j == 0 else info.files[j + _ADVISE_AHEAD_FILES :][:1]:
            _advise_willneed(nxt)
        try:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES)
            layout = plain_column(f, "grad", dt.itemsize, metadata=pf.metadata)
            if layout is not None:
                table = pf.read(columns=side)
                if table.num_rows != layout.num_rows:
                    raise InfluenceQueryError(f"{f}: the grad pages do not hold the file's {table.num_rows} rows")
                small = table.combine_chunks().to_batches()[0] if table.num_rows else None
                fd = os.open(f, os.O_RDONLY)
                raw = None  # the stored values, when the reader casts them: one buffer, reused at once
                try:
                    a = 0  # the shard's row
                    for page, (_, n) in enumerate(layout.pages):
                        for r in range(0, n, seg_rows):  # each segment read straight into a (recycled) array
                            m = min(seg_rows, n - r)
                            rb = small.slice(a, m)
                            if seg_dtype == dt:
                                buf = take()
                                yield rb.column("example_id"), layout.read(fd, page, r, buf[:m]), rb, buf
                            else:
                                raw = _aligned_empty((seg_rows, D), dt) if raw is None else raw
                                part, buf = ready(layout.read(fd, page, r, raw[:m]))
                                yield rb.column("example_id"), part, rb, buf
                            a += m
                finally:
                    os.close(fd)
                return
            for rb in pf.iter_batches(batch_size=rows_per_read, columns=columns):
                n = rb.num_rows
                ids, grad = rb.column("example_id"), rb.column("grad")
                if grad.null_count:
                    raise sc.error(
                        ids, int(np.flatnonzero(grad.is_null().to_numpy(zero_copy_only=False))[0]), "grad is null"
                    )
                # a view of the Arrow value buffer, no copy and no decoding
                g = np.frombuffer(grad.buffers()[1], dt, count=n * D, offset=grad.offset * D * dt.itemsize)
                yield from segments(ids, g.reshape(n, D), rb)
        except (pa.ArrowException, OSError) as e:
            raise InfluenceQueryError(f"{f}: cannot read the shard ({e})") from e

    at = 0  # store row of the segment's first row
    for ids, g, rb, buf in _read_in_order(info.files, read_file, n_readers, depth):
        n = len(g)
        if n == 0:
            continue
        scale = rb.column("grad_scale").to_numpy(zero_copy_only=False) if info.dtype == "int8" else None
        if den_col is not None:
            den = rb.column(den_col).to_numpy(zero_copy_only=False).astype(np.float64)
        elif si_all is not None:
            expected = si_ids.slice(at, n)
            if not ids.equals(expected if expected.type == ids.type else expected.cast(ids.type)):
                raise InfluenceQueryError(f"{info.directory}: the store changed while it was being scanned")
            den = si_all[at : at + n]
        else:
            den = None
        if den is not None and train_norm == "relative":
            with np.errstate(invalid="ignore"):
                den = np.sqrt(np.where(den < 0, np.nan, den))  # a negative self-influence is an error, like missing
        sc.add(ids, g, scale, den, aligned=buf is not None)  # done with g: its rows were cast or multiplied
        if buf is not None:
            free.append(buf)
        at += n
    return sc.finish()


def score_store(
    store_dir: str | Path,
    V: np.ndarray,
    *,
    train_norm: TrainNorm = "none",
    per_query: bool = False,
    self_influence_path: str | Path | None = None,
    precision: Precision = "float32",
    con: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """One scan of the store. Returns an Arrow table: example_id, score (float64, folded over queries) and, when
    per_query, `query_scores` list<double> (one per query, in V's row order). Rows are in store order (unranked)."""
    return scan_store(
        store_dir,
        V,
        train_norm=train_norm,
        per_query=per_query,
        self_influence_path=self_influence_path,
        precision=precision,
        con=con,
    ).to_table()


# -------------------------------------------------------------------------------------------------- rank & write


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InfluenceQueryError(f"top_k must be an integer >= 1, got {k!r}")
    if k > n:
        raise InfluenceQueryError(f"top_k={k} is larger than the number of training rows ({n})")


def _corpus_columns(corpus_path: Path) -> list[str]:
    names = pq.read_schema(corpus_path).names
    if "example_id" not in names:
        raise InfluenceQueryError(f"{corpus_path}: has no example_id column (has {names})")
    return [c for c in names if c != "example_id" and c not in _NOT_CARRIED]


def _quote(col: str) -> str:
    """Quote a column name that came from a Parquet schema (an identifier, cannot be a parameter)."""
    return '"' + col.replace('"', '""') + '"'


def rank_scores(
    scores: pa.Table, corpus_path: str | Path | None = None, *, con: duckdb.DuckDBPyConnection | None = None
) -> pa.Table:
    """Rank rows (1 = highest score, ties by example_id ascending) and join prompt/response and carried label columns
    from a tokens.parquet/corpus file. Works for any table with example_id + score (influence or a baseline)."""
    for col in ("example_id", "score"):
        if col not in scores.column_names:
            raise InfluenceQueryError(f"scores table has no {col!r} column (has {scores.column_names})")
    if scores.num_rows == 0:
        raise InfluenceQueryError("no scores to rank: the training set is empty")
    sc = scores.column("score").to_numpy(zero_copy_only=False)
    if not np.isfinite(sc.astype(np.float64)).all():
        raise InfluenceQueryError("scores contain NaN or inf")
    own = con is None
    con = duckdb.connect() if own else con
    try:
        con.register(_SCORES_VIEW, scores)
        try:
            dup = con.sql(
                "SELECT example_id, count(*) c FROM lancet_scores GROUP BY example_id HAVING c > 1 LIMIT 1"
            ).fetchall()
            if dup:
                raise InfluenceQueryError(f"example_id {dup[0][0]!r} appears {dup[0][1]} times in the scores")
            ranked = ("WITH ranked AS (SELECT s.*, row_number() OVER (ORDER BY s.score DESC, s.example_id ASC) AS rank "
                      "FROM lancet_scores s) ")
            if corpus_path is None:
                sql = ranked + "SELECT * FROM ranked ORDER BY rank"
                params: list = []
            else:
                cp = Path(corpus_path)
                if not cp.is_file():
                    raise InfluenceQueryError(f"{cp}: corpus/tokens file does not exist")
                carried = _corpus_columns(cp)
                sel = "".join(", c." + _quote(c) for c in carried)  # identifiers from the file's schema, quoted
                sql = (ranked + "SELECT r.*" + sel + ", c.example_id IS NULL AS _missing FROM ranked r "
                       "LEFT JOIN read_parquet(?) c ON c.example_id = r.example_id ORDER BY r.rank")
                params = [str(cp.resolve())]
            out = con.sql(sql, params=params).to_arrow_table()
        finally:
            con.unregister(_SCORES_VIEW)
    finally:
        if own:
            con.close()
    out = out.set_column(out.column_names.index("rank"), "rank", out.column("rank").cast(pa.int64()))
    if "_missing" in out.column_names:
        miss = out.column("_missing").to_numpy(zero_copy_only=False)
        if miss.any():
            i = int(np.flatnonzero(miss)[0])
            raise InfluenceQueryError(
                f"{corpus_path}: example_id {out.column('example_id')[i].as_py()!r} of the gradient store is not in "
                f"the corpus ({int(miss.sum())} missing): store and corpus do not match"
            )
        out = out.drop_columns(["_missing"])
        if out.num_rows != scores.num_rows:
            raise InfluenceQueryError(f"{corpus_path}: duplicate example_id values in the corpus")
    return out


def write_influence(ranked: pa.Table, path: str | Path, query_ids: Sequence[str] | None = None) -> Path:
    """Write a ranked table (from `rank_scores`) to influence.parquet atomically; query ids go in the metadata."""
    if query_ids is not None:
        meta = dict(ranked.schema.metadata or {})
        meta[b"lancet.query_ids"] = json.dumps(list(query_ids)).encode()
        ranked = ranked.replace_schema_metadata(meta)
    return atomic_write_parquet(ranked, path)


def per_query_top_k(scores: pa.Table, query_ids: Sequence[str], k: int) -> dict[str, pa.Table]:
    """query_id -> top-k rows by that query's normalised score (ties by example_id ascending): example_id, score,
    rank. Selected with the scan's streaming top-k over the [N, Q] scores, block by block."""
    _check_k(k, scores.num_rows)
    if "query_scores" not in scores.column_names:
        raise InfluenceQueryError("scores have no per-query columns: score with per_query=True")
    Q = scores.schema.field("query_scores").type.list_size
    if len(query_ids) != Q:
        raise InfluenceQueryError(f"{len(query_ids)} query ids for {Q} queries")
    per_q = scores.column("query_scores").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, Q)
    if not np.isfinite(per_q).all():
        raise InfluenceQueryError("per-query scores contain NaN or inf")
    ids = scores.column("example_id").combine_chunks()
    top = _RunningTopK(k, Q)
    step = 65_536
    for a in range(0, len(per_q), step):
        top.push(per_q[a : a + step], ids.slice(a, step))
    return {str(qid): top.table(j, ids.type) for j, qid in enumerate(query_ids)}


def query_influence(
    store_dir: str | Path,
    V: np.ndarray,
    out_path: str | Path | None = None,
    *,
    corpus_path: str | Path | None = None,
    top_k: int = 100,
    train_norm: TrainNorm = "none",
    per_query: bool = False,
    query_ids: Sequence[str] | None = None,
    self_influence_path: str | Path | None = None,
    precision: Precision = "float32",
) -> InfluenceResult:
    """Score every training row against the (preconditioned) query vectors V [Q, D], write influence.parquet
    (`out_path`: a file, or a directory that gets `influence.parquet`; None = do not write) and return top-k.

    Raises InfluenceQueryError for: missing manifest, empty store, D mismatch, non-finite or zero query vectors,
    top_k < 1 or > number of rows, corpus/store mismatch.
    """
    info = open_store(store_dir)
    _check_k(top_k, info.n_rows)
    Q = 1 if np.ndim(V) == 1 else np.shape(V)[0]
    if query_ids is None:
        query_ids = [f"q{j}" for j in range(Q)]
    if len(query_ids) != Q:
        raise InfluenceQueryError(f"{len(query_ids)} query ids for {Q} query vectors")
    scan = scan_store(
        store_dir,
        V,
        train_norm=train_norm,
        per_query=per_query,
        self_influence_path=self_influence_path,
        top_k=top_k if per_query else None,
        precision=precision,
    )
    scores = scan.to_table()
    ranked = rank_scores(scores, corpus_path)
    path = None
    if out_path is not None:
        p = Path(out_path)
        path = write_influence(ranked, p / INFLUENCE_FILE if p.is_dir() else p, query_ids if per_query else None)
    pq_top = dict(zip((str(q) for q in query_ids), scan.per_query_top_k, strict=True)) if per_query else {}
    top = ranked.slice(0, top_k)
    if "query_scores" in top.column_names:
        top = top.drop_columns(["query_scores"])
    return InfluenceResult(path=path, top_k=top, per_query_top_k=pq_top, n_rows=info.n_rows)
