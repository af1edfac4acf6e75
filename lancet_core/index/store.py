"""The gradient store: projected per-example gradients of every training row, as sharded Parquet (docs/design.md §4).

Layout of `store_dir`:
    shard-NNNNN.parquet   example_id string, grad fixed_size_binary[D × itemsize] (the row's D float16|float32|int8
                          values, little-endian, back to back: np.frombuffer views a batch as [n, D] without
                          decoding), grad_norm float32 (norm of the unquantised vector), grad_scale float32 (int8
                          only; value = int8 × scale). The element type and D are the manifest's `dtype` and `dim`
                          (also in the grad field's metadata). Rows in tokens.parquet order, `rows_per_shard` rows
                          per shard (the last may be shorter). `grad` is written non-nullable, uncompressed, PLAIN,
                          without statistics (`write_shard`): its pages are then the rows' raw bytes, which the query
                          engine reads without decoding (lancet_core.recall.pages); the other columns are snappy.
                          (Snappy made fp16 gradients 0.005 % LARGER; min/max statistics of grad were 2 rows' worth
                          of bytes per page, useless to any reader.) Format 1 stored grad as fixed_size_list<dtype>[D],
                          whose Parquet decoding was the query engine's bottleneck (8-10x slower); it is refused.
    curvature/            factors/shard-NNNNN.npz (per-token Kronecker factor sums, when kfac/ekfac are configured)
                          and the built curvatures (see lancet_core.index.curvature).
    manifest.json         model / tokenizer / tokens digests, the IndexConfig, per-module projection layout, the list
                          of finished shards (rows, first/last example_id, file digest), curvature entries.

This module reads a finished store and defines its on-disk encoding; `lancet_core.index.build` writes it. The vectors
are g = ∇θ log π(y|x) (see lancet_core.index.hooks).

Knows about Parquet and numpy; knows nothing about models, queries' provenance, influence scoring or orchestration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lancet_core.errors import LancetError
from lancet_core.formats import GRADIENT_STORE_FORMAT
from lancet_core.index.projection import ModuleLayout
from lancet_core.manifest import file_digest, npz_bytes, read_manifest  # noqa: F401 (npz_bytes: build's import)

FORMAT_VERSION = GRADIENT_STORE_FORMAT
_NP_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}
GRADIENT_SIGN = "grad = d/dtheta log pi(y|x) (log-likelihood, not loss); influence I(i,q) = v_q . g_i, v_q = (F+lambda I)^-1 g_q; > 0 = training on i raises log pi(q)"
# Manifest keys that must agree for a store to be resumed or reused.
IDENTITY_KEYS = (
    "format_version",
    "model_digest",
    "tokenizer_digest",
    "index_config",
    "modules",
    "dim",
    "projection",
)
FACTORS_DIR = "curvature/factors"
_REBUILD = "rebuild the store with this lancet (lancet index, or delete the directory and re-run realign)"


class StoreIncomplete(LancetError):
    """A gradient store directory is missing shards (an interrupted build): re-run build_gradient_store."""


class StoreFormatError(LancetError):
    """A gradient store written in another on-disk format version: rebuild it with this lancet."""


def grad_type(dim: int, dtype: str) -> pa.DataType:
    """The Arrow type of the `grad` column: one fixed-size binary value of D raw little-endian values per row."""
    return pa.binary(int(dim) * _NP_DTYPES[dtype].itemsize)


def grad_view(col: pa.Array, dim: int, dtype: str) -> np.ndarray:
    """[n, D] numpy view (no copy) of a fixed_size_binary `grad` array's values (nulls not checked here)."""
    dt = _NP_DTYPES[dtype]
    n = len(col)
    buf = col.buffers()[1]
    return np.frombuffer(buf, dtype=dt, count=n * dim, offset=col.offset * dim * dt.itemsize).reshape(n, dim)

def write_shard(table: pa.Table, path: str | Path) -> Path:
    """Write one shard table (from `_encode_shard` or any table with a `grad` column) atomically, as the store's
    layout wants it (see the module docstring)."""
    from lancet_core.manifest import atomic_write_parquet

    others = [c for c in table.column_names if c != "grad"]
    return atomic_write_parquet(
        table,
        path,
        use_dictionary=False,
        compression={c: ("none" if c == "grad" else "snappy") for c in table.column_names},
        write_statistics=others,
    )


# encoding of vectors -----------------------------------------------------------------------------------------------
def _encode_shard(example_ids: Sequence[str], grads: np.ndarray, dtype: str) -> pa.Table:
    grads = np.asarray(grads, dtype=np.float64)
    n, d = grads.shape
    norms = np.linalg.norm(grads, axis=1).astype(np.float32)
    cols = {"example_id": pa.array(list(example_ids), pa.string())}
    scale = None
    if dtype == "float32":
        flat = grads.astype(np.float32)
    elif dtype == "float16":
        flat = grads.astype(np.float16)
        if not np.isfinite(flat).all():
            raise OverflowError("a gradient exceeds the float16 range; use dtype='float32' or 'int8'")
    else:
        absmax = np.abs(grads).max(axis=1)
        scale = (absmax / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
        flat = np.clip(np.rint(grads / safe[:, None]), -127, 127).astype(np.int8)
    raw = np.ascontiguousarray(flat, dtype=_NP_DTYPES[dtype])
    cols["grad"] = pa.FixedSizeBinaryArray.from_buffers(grad_type(d, dtype), n, [None, pa.py_buffer(raw.tobytes())])
    cols["grad_norm"] = pa.array(norms, pa.float32())
    if scale is not None:
        cols["grad_scale"] = pa.array(scale, pa.float32())
    fields = [pa.field(k, v.type, nullable=k != "grad") for k, v in cols.items()]
    fields[1] = fields[1].with_metadata({"lancet.dtype": dtype, "lancet.dim": str(d)})
    return pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))


def _decode_grads(table: pa.Table, dim: int, dtype=np.float32) -> np.ndarray:
    col = table["grad"].combine_chunks()
    gt = col.type
    if not pa.types.is_fixed_size_binary(gt) or gt.byte_width % dim:
        raise StoreFormatError(f"column 'grad' is {gt}, not fixed_size_binary of {dim} values: {_REBUILD}")
    stored = {1: "int8", 2: "float16", 4: "float32"}[gt.byte_width // dim]
    if stored == "int8" and "grad_scale" not in table.column_names:
        raise StoreFormatError("an int8 'grad' column without 'grad_scale'")
    out = grad_view(col, dim, stored).astype(dtype)
    if "grad_scale" in table.column_names:
        out *= table["grad_scale"].to_numpy(zero_copy_only=False).astype(dtype)[:, None]
    return out


# the store -------------------------------------------------------------------------------------------------------
class GradientStore:
    """A finished gradient store, read-only."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, store_dir: str | Path) -> GradientStore:
        root = Path(store_dir)
        m = read_manifest(root)
        if m is None or m.get("artifact") != "gradient_store":
            raise FileNotFoundError(f"{root}: not a gradient store (no gradient-store manifest.json)")
        if m.get("format_version") != FORMAT_VERSION:
            raise StoreFormatError(
                f"{root}: gradient store format_version {m.get('format_version')!r}; this lancet reads version "
                f"{FORMAT_VERSION}: {_REBUILD}"
            )
        if not m.get("complete"):
            raise StoreIncomplete(
                f"{root}: {len(m['shards'])} of {m['n_shards']} shards finished; re-run build_gradient_store to finish it"
            )
        return cls(root, m)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def layout(self) -> list[ModuleLayout]:
        return [ModuleLayout.from_json(d) for d in self.manifest["modules"]]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / s["file"] for s in self.manifest["shards"]]

    def iter_batches(self, batch_rows: int | None = None, dtype=np.float32) -> Iterator[tuple[list[str], np.ndarray]]:
        """(example_ids, grads [n, D] dequantised) in store order; one shard per batch unless batch_rows is given."""
        for p in self.shard_paths:
            f = pq.ParquetFile(p)
            if batch_rows is None:
                t = f.read()
                yield t["example_id"].to_pylist(), _decode_grads(t, self.dim, dtype)
                continue
            for rb in f.iter_batches(batch_size=batch_rows):
                t = pa.Table.from_batches([rb])
                yield t["example_id"].to_pylist(), _decode_grads(t, self.dim, dtype)

    def read_all(self, dtype=np.float32) -> np.ndarray:
        """All vectors [N, D] (dequantised); for tests and small stores."""
        parts = [g for _, g in self.iter_batches(dtype=dtype)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype)

    def example_ids(self) -> list[str]:
        out: list[str] = []
        for p in self.shard_paths:
            out += pq.read_table(p, columns=["example_id"])["example_id"].to_pylist()
        return out

    def read_kronecker_factors(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
        """Per-module (A_sum, S_sum) over all non-padding tokens, and the token count: the exact reduction of the
        shards' factor sums (`reduce_factor_sums`), whichever process computed each shard."""
        for s in self.manifest["shards"]:
            if not s.get("factors_file"):
                raise LancetError(
                    f"{self.root}: built without per-token Kronecker factors; rebuild with 'kfac' or 'ekfac' in "
                    "IndexConfig.curvature"
                )
        return reduce_factor_sums(
            [self.root / s["factors_file"] for s in sorted(self.manifest["shards"], key=lambda e: e["index"])],
            [ml.name for ml in self.layout],
        )


def reduce_factor_sums(files: Sequence[Path], modules: Sequence[str]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Sum per-shard Kronecker factor sums (npz: tokens, A:<module>, S:<module>) in float64, in the given (shard)
    order: the same files give bit-identical sums, whatever process or machine computed each shard."""
    total: dict[str, list[np.ndarray]] = {}
    tokens = 0
    for f in files:
        with np.load(f) as z:
            tokens += int(z["tokens"])
            for name in modules:
                a, b = z[f"A:{name}"].astype(np.float64), z[f"S:{name}"].astype(np.float64)
                if name in total:
                    total[name][0] += a
                    total[name][1] += b
                else:
                    total[name] = [a, b]
    return {k: (v[0], v[1]) for k, v in total.items()}, tokens


def rows_digest(part: pa.Table) -> str:
    """Digest of the token rows a shard is computed from (ids, input_ids, loss_mask): equal digest, equal vectors."""
    h = hashlib.sha256()
    for col in ("example_id", "input_ids", "loss_mask"):
        arr = part.column(col).combine_chunks()
        h.update(col.encode())
        for buf in (arr.flatten() if col != "example_id" else arr).buffers():
            if buf is not None:
                h.update(buf)
        if col != "example_id":
            h.update(np.diff(arr.offsets.to_numpy()).tobytes())
    return "sha256:" + h.hexdigest()


def _shard_ok(root: Path, entry: Mapping, expected_rows_digest: str | None = None) -> bool:
    if expected_rows_digest is not None and entry.get("rows_digest") != expected_rows_digest:
        return False
    files = [(entry["file"], entry["digest"])]
    if entry.get("factors_file"):
        files.append((entry["factors_file"], entry["factors_digest"]))
    return all((root / f).is_file() and file_digest(root / f) == d for f, d in files)
