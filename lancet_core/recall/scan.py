"""Score EVERY training row of a gradient store against preconditioned query vectors, with DuckDB over Parquet.

Input: a gradient-store directory (format in `lancet_core.formats`: `shard-NNNNN.parquet` with `example_id`, `grad`
fixed_size_list<float16|float32|int8>[D], `grad_norm`, `grad_scale`; `manifest.json` with `dim`, `dtype`, `shards`)
and query vectors V [Q, D] that are ALREADY preconditioned (`(F + λI)⁻¹ g_q`, docs/design.md §5). Output: one influence
score per training row, ranked, written to `influence.parquet`, plus top-k.

Sign convention (stated once, here): `influence_score = v_qᵀ g_i`; score > 0 means training on row i RAISES the
likelihood of the undesirable output q (with v_q the preconditioned gradient of log π(y_q|x_q)).

Several queries: each query vector is scaled to unit norm, so every query weighs the same, and the folded score is
the mean over queries of the per-query scores. Because that is linear, the Q vectors fold into ONE vector
`v = mean_q(v_q / ‖v_q‖)` and the store is scanned once for one dot product per row. `per_query=True` computes the Q
normalised dot products in the same single scan (Q `array_inner_product` expressions over one decoded vector) and
returns per-query top-k; its folded `score` is then the mean of those Q columns, computed in float64 with numpy.

Train-side normalisation (`train_norm`), against high-norm outliers dominating every ranking:
  - `none`: the raw score.
  - `cosine`: score / grad_norm (the norm of the UNquantised train vector, as stored). Rows with grad_norm = 0 score 0.
  - `relative` (relative influence, Barshan et al. 2020): score / sqrt(self_influence_i), with self_influence_i =
    g_iᵀ (F + λI)⁻¹ g_i. This module does not know the curvature, so the self-influence must be provided: either a
    `self_influence` float column in the store's shards, or a Parquet file (`example_id`, `self_influence`) passed
    as `self_influence_path`. Without either it is a clear error, never a silent fallback. Rows with
    self_influence = 0 score 0; a negative self-influence is an error.

How the scan runs: all values (the query vector(s), the list of shard files, k) are DuckDB parameters, never
formatted into SQL. The only text built into SQL is the dimension D (an `int` checked against the manifest and the
Parquet schema) and generated column aliases `q0..q{Q-1}`. DuckDB decodes the Parquet column itself, with its own
threads, casting `grad::DOUBLE[D]` (float64 accumulation, so scores match a float64 oracle to ~1e-12 and rankings are
not at the mercy of float32 summation order); only `example_id` and the scores come back (Arrow). The vectors are
never materialised in Python. Ties are broken by `example_id` ascending (byte order of UTF-8, i.e. code points).

Knows about the store's file format, DuckDB and Arrow. Knows nothing about models, gradients' computation,
curvature or judges.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lancet_core.errors import LancetError
from lancet_core.formats import INFLUENCE_FILE, TOKEN_COLUMNS
from lancet_core.manifest import MANIFEST_NAME, atomic_write_parquet

TrainNorm = Literal["none", "cosine", "relative"]
_TRAIN_NORMS = ("none", "cosine", "relative")
_DTYPES = {"float16": pa.float16(), "float32": pa.float32(), "int8": pa.int8()}
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.parquet$")
# Columns of tokens.parquet/corpus that are NOT copied into influence.parquet (model inputs, not for reading).
_NOT_CARRIED = frozenset(TOKEN_COLUMNS) - {"example_id", "prompt", "response"}
_SCORES_VIEW = "lancet_scores"  # name under which an Arrow table of scores is registered in DuckDB


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
        if not pa.types.is_fixed_size_list(gt):
            raise InfluenceQueryError(f"{f}: column 'grad' must be fixed_size_list, got {gt}")
        if gt.list_size != dim:
            raise InfluenceQueryError(f"{f}: 'grad' has {gt.list_size} dims, manifest.json says dim={dim}")
        if gt.value_type != _DTYPES[dtype]:
            raise InfluenceQueryError(f"{f}: 'grad' values are {gt.value_type}, manifest.json says dtype={dtype}")
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


def _check_train_norm(train_norm: str) -> None:
    if train_norm not in _TRAIN_NORMS:
        raise InfluenceQueryError(f"train_norm must be one of {_TRAIN_NORMS}, got {train_norm!r}")


def score_store(
    store_dir: str | Path,
    V: np.ndarray,
    *,
    train_norm: TrainNorm = "none",
    per_query: bool = False,
    self_influence_path: str | Path | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """One scan of the store. Returns an Arrow table: example_id, score (float64, folded over queries) and, when
    per_query, `query_scores` list<double> (one per query, in V's row order). Rows are in store order (unranked)."""
    _check_train_norm(train_norm)
    info = open_store(store_dir)
    U = normalized_queries(V, info.dim)
    D = int(info.dim)  # the only value formatted into SQL: an int validated by open_store
    params: list = []
    vectors = [U.mean(axis=0)] if not per_query else list(U)
    scale = " * g.grad_scale" if info.dtype == "int8" else ""  # int8: value = int8 × grad_scale, per row
    exprs = []
    for j, vec in enumerate(vectors):
        exprs.append(f"array_inner_product(g.grad::DOUBLE[{D}], ?::DOUBLE[{D}]){scale} AS q{j}")
        params.append(vec.tolist())
    if train_norm == "none":
        denom, join = None, ""
    elif train_norm == "cosine":
        denom, join = "g.grad_norm", ""
    else:
        if self_influence_path is not None:
            sp = Path(self_influence_path)
            if not sp.is_file():
                raise InfluenceQueryError(f"{sp}: self-influence file does not exist")
            names = pq.read_schema(sp).names
            if "example_id" not in names or "self_influence" not in names:
                raise InfluenceQueryError(f"{sp}: needs columns example_id and self_influence (has {names})")
            denom = "sqrt(si.self_influence)"
            join = "LEFT JOIN read_parquet(?) si ON si.example_id = g.example_id"
        elif info.has_self_influence:
            denom, join = "sqrt(g.self_influence)", ""
        else:
            raise InfluenceQueryError(
                "train_norm='relative' needs each row's self-influence g_iᵀ(F+λI)⁻¹g_i: the store's shards have no "
                "'self_influence' column and no self_influence_path was given"
            )
    extra = f", {denom} AS denom" if denom is not None else ""
    if not join:
        # a plain projection keeps DuckDB's insertion order: rows come back in store order
        sql = f"SELECT g.example_id AS example_id, {', '.join(exprs)}{extra} FROM read_parquet(?) g"
        params.append(list(info.files))
    else:
        # a join does not keep order: restore store order (manifest shard order, then row within the shard)
        sql = (
            f"SELECT g.example_id AS example_id, {', '.join(exprs)}{extra} "
            f"FROM read_parquet(?, filename='_lancet_file', file_row_number=true) g {join} "
            f"ORDER BY list_position(?, g._lancet_file), g.file_row_number"
        )
        params += [list(info.files), str(Path(self_influence_path).resolve()), list(info.files)]
    own = con is None
    con = duckdb.connect() if own else con
    try:
        res = con.sql(sql, params=params).to_arrow_table()
    finally:
        if own:
            con.close()
    if res.num_rows != info.n_rows:
        raise InfluenceQueryError(f"{info.directory}: scanned {res.num_rows} rows, the shards declare {info.n_rows}")
    ids = res.column("example_id")
    if ids.null_count:
        raise InfluenceQueryError(f"{info.directory}: {ids.null_count} row(s) have a null example_id")
    Q = len(vectors)
    cols = np.stack([res.column(f"q{j}").to_numpy(zero_copy_only=False) for j in range(Q)], axis=1).astype(np.float64)
    if denom is not None:
        den = res.column("denom").to_numpy(zero_copy_only=False).astype(np.float64)
        if np.isnan(den).any():
            i = int(np.flatnonzero(np.isnan(den))[0])
            what = "self-influence is missing or negative" if train_norm == "relative" else "grad_norm is missing"
            raise InfluenceQueryError(f"{info.directory}: row example_id={ids[i].as_py()!r}: {what}")
        with np.errstate(divide="ignore", invalid="ignore"):
            cols = np.where(den[:, None] > 0, cols / np.where(den > 0, den, 1.0)[:, None], 0.0)
    if not np.isfinite(cols).all():
        i = int(np.flatnonzero(~np.isfinite(cols).all(axis=1))[0])
        raise InfluenceQueryError(
            f"{info.directory}: row example_id={ids[i].as_py()!r} has a non-finite score (NaN/inf gradient?)"
        )
    out = {"example_id": ids, "score": pa.array(cols.mean(axis=1) if per_query else cols[:, 0], pa.float64())}
    if per_query:
        out["query_scores"] = pa.FixedSizeListArray.from_arrays(pa.array(cols.ravel(), pa.float64()), Q)
    return pa.table(out)


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
                f"SELECT example_id, count(*) c FROM {_SCORES_VIEW} GROUP BY example_id HAVING c > 1 LIMIT 1"
            ).fetchall()
            if dup:
                raise InfluenceQueryError(f"example_id {dup[0][0]!r} appears {dup[0][1]} times in the scores")
            ranked = (
                f"SELECT s.*, row_number() OVER (ORDER BY s.score DESC, s.example_id ASC) AS rank FROM {_SCORES_VIEW} s"
            )
            if corpus_path is None:
                sql = f"SELECT * FROM ({ranked}) ORDER BY rank"
                params: list = []
            else:
                cp = Path(corpus_path)
                if not cp.is_file():
                    raise InfluenceQueryError(f"{cp}: corpus/tokens file does not exist")
                carried = _corpus_columns(cp)
                sel = "".join(f", c.{_quote(c)}" for c in carried)
                sql = (
                    f"SELECT r.*{sel}, c.example_id IS NULL AS _missing FROM ({ranked}) r "
                    f"LEFT JOIN read_parquet(?) c ON c.example_id = r.example_id ORDER BY r.rank"
                )
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
    """query_id -> top-k rows by that query's normalised score (ties by example_id ascending)."""
    _check_k(k, scores.num_rows)
    if "query_scores" not in scores.column_names:
        raise InfluenceQueryError("scores have no per-query columns: score with per_query=True")
    Q = scores.schema.field("query_scores").type.list_size
    if len(query_ids) != Q:
        raise InfluenceQueryError(f"{len(query_ids)} query ids for {Q} queries")
    per_q = scores.column("query_scores").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, Q)
    out = {}
    con = duckdb.connect()
    try:
        for j, qid in enumerate(query_ids):
            t = pa.table({"example_id": scores.column("example_id"), "score": pa.array(per_q[:, j], pa.float64())})
            con.register(_SCORES_VIEW, t)
            try:
                r = con.sql(
                    f"SELECT example_id, score, row_number() OVER (ORDER BY score DESC, example_id ASC) AS rank "
                    f"FROM {_SCORES_VIEW} ORDER BY rank LIMIT ?",
                    params=[int(k)],
                ).to_arrow_table()
            finally:
                con.unregister(_SCORES_VIEW)
            out[str(qid)] = r.set_column(2, "rank", r.column("rank").cast(pa.int64()))
    finally:
        con.close()
    return out


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
    scores = score_store(
        store_dir, V, train_norm=train_norm, per_query=per_query, self_influence_path=self_influence_path
    )
    ranked = rank_scores(scores, corpus_path)
    path = None
    if out_path is not None:
        p = Path(out_path)
        path = write_influence(ranked, p / INFLUENCE_FILE if p.is_dir() else p, query_ids if per_query else None)
    pq_top = per_query_top_k(scores, query_ids, top_k) if per_query else {}
    top = ranked.slice(0, top_k)
    if "query_scores" in top.column_names:
        top = top.drop_columns(["query_scores"])
    return InfluenceResult(path=path, top_k=top, per_query_top_k=pq_top, n_rows=info.n_rows)
