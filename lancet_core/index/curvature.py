"""Curvature F for influence, built beside a gradient store, and query-side preconditioning v_q = (F + λI)⁻¹ g_q.

Kinds (docs/design.md §5). `kfac` is what IndexConfig.curvature builds with the store and the default argument of
every function here, not the default recall method: RecallConfig's method 'auto' resolves to `identity` for the
contrasted refusal target, `kfac` for the refusal target without benign prompts and `linfac` damped at 3 for the
flagged target (lancet_core.recall.influence.resolve_method, resolve_damping):
- `kfac`: per-token Kronecker factors in the projected space, A = E_tok[ã ãᵀ], S = E_tok[δ̃ δ̃ᵀ] (collected
  during the store build, so the store must be built with 'kfac' or 'ekfac' in IndexConfig.curvature),
  F_b ≈ T̄ · (S ⊗ A) with T̄ the mean number of non-padding tokens per example (the order matches the stored block
  vec(P_outᵀ G P_in), index o·k_in + i). Stored as the eigenbases Q_A, Q_S and the eigenvalue grid; applied as two
  rotations per module.
- `ekfac`: the kfac eigenbasis Q_S ⊗ Q_A with eigenvalues replaced by (1/N) Σ_i (Q_Sᵀ G̃_i Q_A)² from the stored
  per-example gradients (George et al. 2018).
- `linfac`: F_b = (1/N) G_bᵀ G_b, G_b the N × D_b matrix of the WHOLE-SEQUENCE projected per-example gradients of
  block b (one pass over the store). blocks="module" (one block per target module) or "single" (one D × D block).
  Two exact representations, chosen per block:
    primal (D_b ≤ N): the eigendecomposition of the D_b × D_b matrix F_b, `Q:<b>`, `w:<b>`;
    dual (D_b > N, F_b has rank ≤ N): never forms F_b. With K = G_b G_bᵀ = U diag(s) Uᵀ (the N × N Gram matrix) and
    B = Uᵀ G_b, the Woodbury identity gives
        (F_b + λI)⁻¹ = (1/λ) (I − G_bᵀ (NλI + G_b G_bᵀ)⁻¹ G_b) = (1/λ) (I − Bᵀ diag(1/(Nλ + s)) B),
    stored as `B:<b>` [N, D_b] and `s:<b>` [N]: N·D_b numbers instead of D_b², an N³ instead of a D_b³
    eigendecomposition (D_b = 8192, N = 3000, one thread: 93 s and 537 MB primal, 9 s and 197 MB dual;
    benchmarks/curvature_build.py). The subtraction costs about log10(λ_max/λ) digits of float64: relative error
    ≲ ε·λ_max/λ ≤ ε·D_b/damping_ratio (2e-11 at D_b = 8192, ratio 0.1).
- `identity`: F = 0, λ = 1: plain gradient dot product (TracIn-like baseline).
Each block is damped with λ_b = damping_ratio × (mean eigenvalue of the block) (for the dual form
trace(F_b)/D_b = ‖G_b‖²_F/(N·D_b), no eigendecomposition needed). Stored in
`store_dir/curvature/<kind>_<blocks>_damp<ratio>.npz` (atomic), listed under "curvature" in the store's manifest.
Influence: I(i, q) = v_qᵀ g_i, positive = training on i raises log π(q's output).

Knows about a gradient store's vectors and manifest; knows nothing about models, queries' text or ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from lancet_core.errors import LancetError
from lancet_core.index.store import GradientStore
from lancet_core.manifest import (
    atomic_write_bytes,
    atomic_write_parquet,
    file_digest,
    npz_bytes,
    read_manifest,
    write_manifest,
)

Kind = Literal["linfac", "kfac", "ekfac", "identity"]
Blocks = Literal["module", "single"]
KINDS = ("linfac", "kfac", "ekfac", "identity")


def curvature_file(kind: str, blocks: str, damping_ratio: float) -> str:
    return f"curvature/{kind}_{blocks}_damp{damping_ratio:g}.npz"


def _blocks(store, blocks: str) -> list[tuple[str, int, int]]:
    if blocks == "single":
        return [("all", 0, store.dim)]
    if blocks != "module":
        raise ValueError(f"blocks must be 'module' or 'single', got {blocks!r}")
    return [(ml.name, ml.offset, ml.offset + ml.size) for ml in store.layout]


def _damping(eigs: np.ndarray, ratio: float) -> float:
    return _damping_from_mean(float(np.mean(eigs)) if eigs.size else 0.0, ratio)


def _damping_from_mean(mean: float, ratio: float) -> float:
    return ratio * mean if mean > 0 else 1.0


def _linfac_primal(gram_sum: np.ndarray, n: int, ratio: float) -> dict[str, np.ndarray]:
    """Primal linfac block from Σ_i g_i g_iᵀ [D_b, D_b]: F = Q diag(w) Qᵀ."""
    w, q = np.linalg.eigh(gram_sum / n)
    w = np.clip(w, 0.0, None)
    return {"Q": q, "w": w, "lambda": np.array(_damping(w, ratio))}


def _linfac_dual(g: np.ndarray, ratio: float) -> dict[str, np.ndarray]:
    """Dual linfac block from the gradients themselves, g [N, D_b] float64 (meant for D_b > N).

    K = g gᵀ = U diag(s) Uᵀ, B = Uᵀ g; (F + λI)⁻¹ = (1/λ)(I − Bᵀ diag(1/(Nλ + s)) B) (Woodbury), F = gᵀ g / N.
    """
    n, d = g.shape
    s, u = np.linalg.eigh(g @ g.T)
    lam = _damping_from_mean(float(np.vdot(g, g)) / max(n * d, 1), ratio)  # trace(F) / D_b
    return {"B": u.T @ g, "s": np.clip(s, 0.0, None), "lambda": np.array(lam)}


def _linfac_solve(block: Mapping[str, np.ndarray], v: np.ndarray) -> np.ndarray:
    """(F + λI)⁻¹ v for the rows of v [Q, D_b], with a block from `_linfac_primal` or `_linfac_dual`."""
    lam = float(block["lambda"])
    if "B" in block:
        b, s = block["B"], block["s"]
        return (v - ((v @ b.T) / (len(s) * lam + s)) @ b) / lam
    q, w = block["Q"], block["w"]
    return ((v @ q) / (w + lam)) @ q.T


def _default_ratio(manifest: dict, damping_ratio: float | None) -> float:
    if damping_ratio is not None:
        return float(damping_ratio)
    return float((manifest.get("build_settings") or {}).get("damping_ratio", 0.1))


def build_curvature(
    store_dir: str | Path, kind: Kind = "kfac", *, blocks: Blocks = "module", damping_ratio: float | None = None
) -> Path:
    """Build one curvature from a finished store; returns the .npz path (reused when already built)."""
    if kind not in KINDS:
        raise ValueError(f"curvature kind must be one of {KINDS}, got {kind!r}")
    store = GradientStore.open(store_dir)
    ratio = _default_ratio(store.manifest, damping_ratio)
    if kind in ("kfac", "ekfac") and blocks != "module":
        raise ValueError(f"{kind} is per module; blocks='single' applies to linfac only")
    rel = curvature_file(kind, blocks, ratio)
    path = store.root / rel
    entry = (store.manifest.get("curvature") or {}).get(rel)
    if entry and path.is_file() and file_digest(path) == entry["digest"]:
        return path
    bl = _blocks(store, blocks)
    arrays: dict[str, np.ndarray] = {"kind": np.array(kind), "damping_ratio": np.array(ratio)}
    n = store.n_rows
    if kind == "linfac":
        # primal: accumulate Σ g gᵀ [D_b, D_b]; dual (D_b > N): keep the rows themselves [N, D_b], fewer numbers
        sums = {name: np.zeros((hi - lo, hi - lo)) for name, lo, hi in bl if hi - lo <= n}
        rows = {name: np.empty((n, hi - lo)) for name, lo, hi in bl if hi - lo > n}
        at = 0
        for _, g in store.iter_batches(dtype=np.float64):
            if at + len(g) > n:
                raise LancetError(f"{store.root}: the shards hold more rows than the {n} the manifest lists")
            for name, lo, hi in bl:
                if name in sums:
                    sums[name] += g[:, lo:hi].T @ g[:, lo:hi]
                else:
                    rows[name][at : at + len(g)] = g[:, lo:hi]
            at += len(g)
        if at != n:
            raise LancetError(f"{store.root}: the manifest lists {n} rows but the shards hold {at}")
        for name, _, _ in bl:
            block = _linfac_primal(sums.pop(name), n, ratio) if name in sums else _linfac_dual(rows.pop(name), ratio)
            arrays.update({f"{k}:{name}": v for k, v in block.items()})
    elif kind in ("kfac", "ekfac"):
        factors, tokens = store.read_kronecker_factors()
        tbar = tokens / n
        ekfac_sums = {}
        for ml in store.layout:
            a, s = factors[ml.name]
            wa, qa = np.linalg.eigh(a / tokens)
            ws, qs = np.linalg.eigh(s / tokens)
            arrays[f"QA:{ml.name}"], arrays[f"QS:{ml.name}"] = qa, qs
            arrays[f"w:{ml.name}"] = tbar * np.outer(np.clip(ws, 0, None), np.clip(wa, 0, None))  # [k_out, k_in]
            ekfac_sums[ml.name] = np.zeros((ml.eff_out, ml.eff_in))
        if kind == "ekfac":
            for _, g in store.iter_batches(dtype=np.float64):
                for ml in store.layout:
                    G = g[:, ml.offset : ml.offset + ml.size].reshape(-1, ml.eff_out, ml.eff_in)
                    rot = arrays[f"QS:{ml.name}"].T @ G @ arrays[f"QA:{ml.name}"]  # Q_Sᵀ G_i Q_A, [n, k_out, k_in]
                    ekfac_sums[ml.name] += (rot**2).sum(0)
            for ml in store.layout:
                arrays[f"w:{ml.name}"] = ekfac_sums[ml.name] / n
        for ml in store.layout:
            arrays[f"lambda:{ml.name}"] = np.array(_damping(arrays[f"w:{ml.name}"], ratio))
    atomic_write_bytes(path, npz_bytes(arrays))
    m = read_manifest(store.root)
    m.setdefault("curvature", {})[rel] = {
        "kind": kind,
        "blocks": blocks,
        "damping_ratio": ratio,
        "n_rows": n,
        "digest": file_digest(path),
    }
    write_manifest(store.root, m)
    return path


def preconditioner(
    store_dir: str | Path,
    kind: Kind = "kfac",
    *,
    blocks: Blocks = "module",
    damping_ratio: float | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """Load a curvature once (building linfac on demand) and return g [n, D] ↦ (F + λI)⁻¹ g, [n, D] float64."""
    store = GradientStore.open(store_dir)
    arrays: dict[str, np.ndarray] = {}
    if kind != "identity":
        rel = curvature_file(kind, blocks, _default_ratio(store.manifest, damping_ratio))
        path = store.root / rel
        if not path.is_file():
            if kind in ("kfac", "ekfac") and not all(s.get("factors_file") for s in store.manifest["shards"]):
                raise LancetError(
                    f"{store.root}: no {kind} curvature; rebuild the store with '{kind}' in IndexConfig.curvature"
                )
            path = build_curvature(store.root, kind, blocks=blocks, damping_ratio=damping_ratio)
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    linfac_blocks: dict[str, dict[str, np.ndarray]] = {}
    if kind == "linfac":  # per block: {"Q", "w", "lambda"} (primal) or {"B", "s", "lambda"} (dual)
        for name, _, _ in _blocks(store, blocks):
            keys = ("B", "s", "lambda") if f"B:{name}" in arrays else ("Q", "w", "lambda")
            linfac_blocks[name] = {k: arrays[f"{k}:{name}"] for k in keys}

    def apply(grads: np.ndarray) -> np.ndarray:
        g = np.asarray(grads, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != store.dim:
            raise ValueError(f"gradients must be [Q, {store.dim}] for store {store.root}, got {list(g.shape)}")
        if kind == "identity":
            return g.copy()
        out = np.empty_like(g)
        if kind == "linfac":
            for name, lo, hi in _blocks(store, blocks):
                out[:, lo:hi] = _linfac_solve(linfac_blocks[name], g[:, lo:hi])
            return out
        for ml in store.layout:
            qa, qs = arrays[f"QA:{ml.name}"], arrays[f"QS:{ml.name}"]
            w, lam = arrays[f"w:{ml.name}"], float(arrays[f"lambda:{ml.name}"])
            G = g[:, ml.offset : ml.offset + ml.size].reshape(-1, ml.eff_out, ml.eff_in)
            rot = qs.T @ G @ qa  # Q_Sᵀ G Q_A
            rot /= w + lam
            back = qs @ rot @ qa.T  # Q_S (·) Q_Aᵀ
            out[:, ml.offset : ml.offset + ml.size] = back.reshape(len(g), -1)
        return out

    return apply


def precondition(
    store_dir: str | Path,
    query_grads: np.ndarray,
    kind: Kind = "kfac",
    *,
    blocks: Blocks = "module",
    damping_ratio: float | None = None,
) -> np.ndarray:
    """v_q = (F + λI)⁻¹ g_q for every query row [Q, D] → [Q, D] float64. Builds linfac on demand."""
    return preconditioner(store_dir, kind, blocks=blocks, damping_ratio=damping_ratio)(query_grads)


def write_self_influence(
    store_dir: str | Path,
    out_path: str | Path,
    kind: Kind = "kfac",
    *,
    blocks: Blocks = "module",
    damping_ratio: float | None = None,
) -> Path:
    """Write out_path (Parquet: example_id, self_influence = g_iᵀ (F + λI)⁻¹ g_i) for every row of the store, in one
    pass over it; the denominator of relative influence (Barshan et al. 2020, train_norm='relative')."""
    import pyarrow as pa

    store = GradientStore.open(store_dir)
    apply = preconditioner(store.root, kind, blocks=blocks, damping_ratio=damping_ratio)  # loaded once, not per shard
    ids: list[str] = []
    values: list[np.ndarray] = []
    for batch_ids, g in store.iter_batches(dtype=np.float64):
        v = apply(g)
        ids.extend(batch_ids)
        values.append(np.einsum("nd,nd->n", v, g))
    si = np.concatenate(values) if values else np.zeros(0)
    table = pa.table({"example_id": pa.array(ids, pa.string()), "self_influence": pa.array(si, pa.float64())})
    return atomic_write_parquet(table, out_path)
