"""Data-dependent projection bases (LoGra's PCA, docs/design.md §5): per module, the top eigenvectors of its Kronecker
factors A = Σ_t a_t a_tᵀ (input activations, d_in × d_in) and S = Σ_t δ_t δ_tᵀ (output gradients of log π(y|x),
d_out × d_out), from one pass over a sample of the corpus.

P_in = the k_in leading eigenvectors of A (d_in × k_in, orthonormal columns), P_out likewise from S; the stored block
is then P_outᵀ G P_in, the gradient seen in the directions where the module's inputs and output gradients actually
vary, instead of a seeded Gaussian sketch (lancet_core.index.projection). At full rank (k = d) P is orthogonal and
every inner product, hence every influence, equals the unprojected one. Eigenvector signs are fixed (largest entry
positive) so a basis is reproducible. The basis is saved beside the store (`basis.npz`, float64) and its digest
(`basis_digest`, over the arrays, not the zip bytes) is part of the store's identity.

Knows about torch modules and token rows (through the hooks); knows nothing about stores' shards, curvature,
queries or orchestration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from lancet_core.errors import ManifestMismatch
from lancet_core.index.hooks import ProjectedGradientExtractor, right_pad
from lancet_core.index.projection import ModuleLayout
from lancet_core.manifest import atomic_write_bytes, npz_bytes

BASIS_FILE = "basis.npz"
Basis = dict[str, tuple[np.ndarray | None, np.ndarray | None]]


def sample_indices(n_rows: int, n_sample: int) -> np.ndarray:
    """Evenly spaced row indices (all rows when n_sample >= n_rows): a deterministic spread over the corpus."""
    if n_sample >= n_rows:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, n_sample).round().astype(np.int64))


def top_eigenvectors(m: np.ndarray, k: int) -> np.ndarray:
    """The k leading eigenvectors of a symmetric PSD matrix as columns [d, k] (descending eigenvalue), each with its
    largest-magnitude entry positive."""
    w, q = np.linalg.eigh((m + m.T) / 2)
    q = q[:, np.argsort(-w, kind="stable")[:k]]
    idx = np.argmax(np.abs(q), axis=0)
    q = q * np.sign(q[idx, np.arange(q.shape[1])])
    return np.ascontiguousarray(q)


def full_factors(
    model: nn.Module,
    layout: Sequence[ModuleLayout],
    rows_ids: Sequence[Sequence[int]],
    rows_mask: Sequence[Sequence[int]],
    *,
    batch_size: int,
    reduction: str,
    response_tokens: int | None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Unprojected Kronecker factor sums {module: (A [d_in, d_in], S [d_out, d_out])} (float64) and the token count,
    from one forward/backward pass per batch of the given rows (no per-example gradients are formed)."""
    full = [ModuleLayout(ml.name, ml.d_in, ml.d_out, None, None, 0) for ml in layout]
    order = np.argsort([len(r) for r in rows_ids], kind="stable")  # similar lengths batched: less padding
    with ProjectedGradientExtractor(
        model, full, 0, reduction, collect_kronecker_factors=True, response_tokens=response_tokens, per_example=False
    ) as ex:
        for b in range(0, len(order), batch_size):
            sel = order[b : b + batch_size]
            ids, attn, lm = right_pad([rows_ids[i] for i in sel], [rows_mask[i] for i in sel], 0)
            ex.batch_gradients(ids, attn, lm)
        return {k: (a.numpy(), s.numpy()) for k, (a, s) in ex.factor_sums.items()}, ex.factor_tokens


def pca_basis(
    model: nn.Module,
    layout: Sequence[ModuleLayout],
    rows_ids: Sequence[Sequence[int]],
    rows_mask: Sequence[Sequence[int]],
    *,
    batch_size: int,
    reduction: str,
    response_tokens: int | None,
) -> Basis:
    """{module: (P_in [d_in, k_in] | None, P_out [d_out, k_out] | None)} from the rows' factors (k = None: that side
    is not projected). k must not exceed d (build the layout with cap_at_dims=True)."""
    for ml in layout:
        if (ml.k_in is not None and ml.k_in > ml.d_in) or (ml.k_out is not None and ml.k_out > ml.d_out):
            raise ValueError(f"module {ml.name}: a PCA basis has at most d directions per side, layout asks more")
    factors, _ = full_factors(
        model, layout, rows_ids, rows_mask, batch_size=batch_size, reduction=reduction, response_tokens=response_tokens
    )
    out: Basis = {}
    for ml in layout:
        a, s = factors[ml.name]
        out[ml.name] = (
            None if ml.k_in is None else top_eigenvectors(a, ml.k_in),
            None if ml.k_out is None else top_eigenvectors(s, ml.k_out),
        )
    return out


def basis_digest(basis: Mapping[str, tuple[np.ndarray | None, np.ndarray | None]]) -> str:
    """sha256 over module names, sides, shapes and float64 bytes (independent of the file's zip container)."""
    h = hashlib.sha256(b"lancet-basis\0")
    for name in sorted(basis):
        for side, p in zip(("in", "out"), basis[name], strict=True):
            h.update(f"{name}\0{side}\0".encode())
            if p is None:
                h.update(b"none\0")
            else:
                a = np.ascontiguousarray(p, dtype=np.float64)
                h.update(f"{a.shape}\0".encode())
                h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def save_basis(path: str | Path, basis: Mapping[str, tuple[np.ndarray | None, np.ndarray | None]]) -> Path:
    """Write the basis as .npz, modules in sorted name order (as load_basis returns them), so the file's bytes depend
    only on the arrays: a re-plan that loads the stored basis and saves it again finds the same bytes there and leaves
    the file as it is."""
    arrays = {}
    for name in sorted(basis):
        p_in, p_out = basis[name]
        for side, p in (("in", p_in), ("out", p_out)):
            arrays[f"{side}:{name}"] = np.zeros((0, 0)) if p is None else np.asarray(p, dtype=np.float64)
    data, path = npz_bytes(arrays), Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    return atomic_write_bytes(path, data)


def load_basis(path: str | Path) -> Basis:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    names = sorted({k.split(":", 1)[1] for k in arrays})
    out: Basis = {}
    for name in names:
        sides = []
        for side in ("in", "out"):
            a = arrays[f"{side}:{name}"]
            sides.append(None if a.size == 0 else a)
        out[name] = (sides[0], sides[1])
    return out


def as_torch(basis: Basis) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    return {k: tuple(None if p is None else torch.from_numpy(p) for p in v) for k, v in basis.items()}


def projection_entry(basis: Basis | None, sample_rows: int | None = None) -> dict | None:
    """The manifest's `projection` entry (part of the store identity): None for seeded random matrices (their seed is
    in the index config; stores built before PCA existed have no entry), else the PCA basis file and its digest."""
    if basis is None:
        return None
    return {"kind": "pca", "file": BASIS_FILE, "basis_digest": basis_digest(basis), "sample_rows": sample_rows}


def store_basis(
    root: Path,
    existing: Mapping | None,
    model: nn.Module,
    layout: Sequence[ModuleLayout],
    tokens: pa.Table,
    *,
    kind: str,
    sample_rows: int,
    batch_size: int,
    reduction: str,
    response_tokens: int | None,
) -> Basis | None:
    """The basis a store build projects with: None for 'random'; for 'pca' the one the existing store was built with
    (its basis.npz; so a grown corpus keeps its basis and its finished shards), else computed from `sample_rows` rows
    spread over the token rows (`tokens`: input_ids, loss_mask). The caller compares `projection_entry` with the manifest, then saves it."""
    if kind == "random":
        return None
    if kind != "pca":
        raise ValueError(f"projection must be 'random' or 'pca', got {kind!r}")
    prev = (existing or {}).get("projection") or {}
    if prev.get("kind") == "pca" and (root / BASIS_FILE).is_file():
        return load_basis(root / BASIS_FILE)
    sample = tokens.take(sample_indices(tokens.num_rows, sample_rows))  # only the sampled rows become Python lists
    return pca_basis(
        model,
        layout,
        sample["input_ids"].to_pylist(),
        sample["loss_mask"].to_pylist(),
        batch_size=batch_size,
        reduction=reduction,
        response_tokens=response_tokens,
    )


def read_store_basis(root: Path, manifest: Mapping) -> Basis | None:
    """The basis of a finished store (None for random projections), checked against the manifest's digest."""
    entry = manifest.get("projection") or {"kind": "random"}
    if entry.get("kind") != "pca":
        return None
    path = Path(root) / entry["file"]
    if not path.is_file():
        raise ManifestMismatch(f"{path}: the store's PCA projection basis is missing; rebuild the store")
    basis = load_basis(path)
    if basis_digest(basis) != entry["basis_digest"]:
        raise ManifestMismatch(
            f"{path}: the projection basis differs from the one the store was built with "
            f"(digest {basis_digest(basis)} != {entry['basis_digest']}); rebuild the store"
        )
    return basis
