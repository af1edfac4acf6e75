"""The gradient store: projected per-example gradients of every training row, as sharded Parquet (docs/design.md §4).

Layout of `store_dir`:
    shard-NNNNN.parquet   example_id string, grad fixed_size_list<float16|float32|int8>[D], grad_norm float32
                          (norm of the unquantised vector), grad_scale float32 (int8 only; value = int8 × scale).
                          Rows in tokens.parquet order, `rows_per_shard` rows per shard (the last may be shorter).
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
from lancet_core.index.projection import ModuleLayout
from lancet_core.manifest import file_digest, read_manifest

FORMAT_VERSION = 1
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


class StoreIncomplete(LancetError):
    """A gradient store directory is missing shards (an interrupted build): re-run build_gradient_store."""

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
    cols["grad"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), d)
    cols["grad_norm"] = pa.array(norms, pa.float32())
    if scale is not None:
        cols["grad_scale"] = pa.array(scale, pa.float32())
    return pa.table(cols)


def _decode_grads(table: pa.Table, dim: int, dtype=np.float32) -> np.ndarray:
    col = table["grad"].combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    out = flat.reshape(-1, dim).astype(dtype)
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
        """Per-module (A_sum, S_sum) over all non-padding tokens, and the token count (None entries → absent)."""
        total: dict[str, list[np.ndarray]] = {}
        tokens = 0
        for s in self.manifest["shards"]:
            if not s.get("factors_file"):
                raise LancetError(
                    f"{self.root}: built without per-token Kronecker factors; rebuild with 'kfac' or 'ekfac' in "
                    "IndexConfig.curvature"
                )
            with np.load(self.root / s["factors_file"]) as z:
                tokens += int(z["tokens"])
                for ml in self.layout:
                    a, b = z[f"A:{ml.name}"], z[f"S:{ml.name}"]
                    if ml.name in total:
                        total[ml.name][0] += a
                        total[ml.name][1] += b
                    else:
                        total[ml.name] = [a.copy(), b.copy()]
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
