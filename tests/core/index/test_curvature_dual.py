"""linfac's dual (N × N Gram / Woodbury) solve == its primal (D_b × D_b eigendecomposition) solve == an explicit
np.linalg.inv of F + λI, in float64, on stores with fewer rows than dimensions (N < D_b).

The stores are written straight in the gradient-store format (no model), so the layout can mix a block with D_b ≤ N
(primal) and one with D_b > N (dual) in one store. Rows are float64 values exactly representable in float32, so the
stored vectors equal the ones used by the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

from lancet_core.index.curvature import (
    _linfac_dual,
    _linfac_primal,
    _linfac_solve,
    build_curvature,
    curvature_file,
    precondition,
    write_self_influence,
)
from lancet_core.index.projection import ModuleLayout
from lancet_core.index.store import FORMAT_VERSION, GradientStore, _encode_shard
from lancet_core.manifest import atomic_write_parquet, write_manifest

RATIO = 0.1


def write_store(root, x: np.ndarray, sizes: list[tuple[int, int]], rows_per_shard: int = 7):
    """A finished store of rows x [N, D] whose modules are k_out × k_in blocks (sizes), in the on-disk format."""
    layout, off = [], 0
    for j, (k_out, k_in) in enumerate(sizes):
        layout.append(ModuleLayout(f"m{j}", 2 * k_in, 2 * k_out, k_in, k_out, off))
        off += k_in * k_out
    assert off == x.shape[1]
    shards = []
    for s, a in enumerate(range(0, len(x), rows_per_shard)):
        b = min(len(x), a + rows_per_shard)
        f = f"shard-{s:05d}.parquet"
        atomic_write_parquet(_encode_shard([f"r{i:04d}" for i in range(a, b)], x[a:b], "float32"), root / f)
        shards.append({"file": f, "rows": b - a})
    write_manifest(
        root,
        {
            "artifact": "gradient_store",
            "format_version": FORMAT_VERSION,
            "complete": True,
            "dim": off,
            "n_rows": len(x),
            "n_shards": len(shards),
            "modules": [ml.to_json() for ml in layout],
            "shards": shards,
            "build_settings": {"damping_ratio": RATIO},
            "curvature": {},
        },
    )
    return root


def rows(n, d, seed=0):
    """Gradient-like rows: a few dominant directions plus noise, norms over a decade; exact in float32."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 3)) @ g.normal(size=(3, d)) * 5 + g.normal(size=(n, d))
    x *= g.uniform(0.3, 3.0, size=(n, 1))
    return x.astype(np.float32).astype(np.float64)


def inv_reference(g_block, v):
    """(F + λI)⁻¹ v with F = gᵀg/N and λ = RATIO · trace(F)/D_b, by an explicit inverse."""
    n, d = g_block.shape
    f = g_block.T @ g_block / n
    lam = RATIO * np.trace(f) / d
    return v @ np.linalg.inv(f + lam * np.eye(d)).T


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_dual_equals_primal_and_inverse_on_random_blocks():
    n, d = 20, 64
    g = rows(n, d)
    v = np.random.default_rng(1).normal(size=(5, d))
    dual, primal = _linfac_dual(g, RATIO), _linfac_primal(g.T @ g, n, RATIO)
    assert set(dual) == {"B", "s", "lambda"} and dual["B"].shape == (n, d) and dual["s"].shape == (n,)
    assert float(dual["lambda"]) == pytest.approx(float(primal["lambda"]), rel=1e-12)
    want = inv_reference(g, v)
    assert rel(_linfac_solve(dual, v), want) <= 1e-10
    assert rel(_linfac_solve(primal, v), want) <= 1e-10
    assert rel(_linfac_solve(dual, v), _linfac_solve(primal, v)) <= 1e-10
    # rank-deficient rows (duplicates, a zero row): the Gram matrix is singular, the solve is still exact
    g2 = np.concatenate([g[:10], g[:5], np.zeros((5, d))])
    assert rel(_linfac_solve(_linfac_dual(g2, RATIO), v), inv_reference(g2, v)) <= 1e-10


@pytest.mark.parametrize("blocks", ["module", "single"])
def test_store_linfac_dual_and_primal_blocks_match_inverse(tmp_path, blocks):
    """N = 30 rows; module m0 is 4 × 5 = 20 ≤ N (primal), m1 is 6 × 8 = 48 > N (dual); single is 68 > N (dual)."""
    n, sizes = 30, [(4, 5), (6, 8)]
    x = rows(n, 68)
    root = write_store(tmp_path / "store", x, sizes)
    st = GradientStore.open(root)
    np.testing.assert_array_equal(st.read_all(np.float64), x)
    q = np.random.default_rng(2).normal(size=(4, st.dim))
    got = precondition(root, q, "linfac", blocks=blocks)
    with np.load(root / curvature_file("linfac", blocks, RATIO)) as z:
        files = set(z.files)
    if blocks == "single":
        assert {"B:all", "s:all", "lambda:all"} <= files and "Q:all" not in files
        spans = [(0, 68)]
    else:
        assert {"Q:m0", "w:m0", "B:m1", "s:m1"} <= files and "B:m0" not in files and "Q:m1" not in files
        spans = [(0, 20), (20, 68)]
    for lo, hi in spans:
        want = inv_reference(x[:, lo:hi], q[:, lo:hi])
        primal = _linfac_solve(_linfac_primal(x[:, lo:hi].T @ x[:, lo:hi], n, RATIO), q[:, lo:hi])
        assert rel(got[:, lo:hi], want) <= 1e-10
        assert rel(got[:, lo:hi], primal) <= 1e-10
    # self-influence goes through the same solve
    si = write_self_influence(root, tmp_path / "si.parquet", "linfac", blocks=blocks)
    import pyarrow.parquet as pq

    want_si = sum(np.einsum("nd,nd->n", inv_reference(x[:, lo:hi], x[:, lo:hi]), x[:, lo:hi]) for lo, hi in spans)
    np.testing.assert_allclose(pq.read_table(si).column("self_influence").to_numpy(), want_si, rtol=1e-10)


def test_dual_file_is_smaller_than_primal(tmp_path):
    """N = 24 rows of D = 200: the dual block stores N·D + N numbers instead of D² + D."""
    x = rows(24, 200)
    root = write_store(tmp_path / "store", x, [(10, 20)])
    path = build_curvature(root, "linfac")
    with np.load(path) as z:
        assert z["B:m0"].shape == (24, 200) and "Q:m0" not in z.files
    assert path.stat().st_size < 200 * 200 * 8


def test_row_count_mismatch_is_refused(tmp_path):
    x = rows(10, 40)
    root = write_store(tmp_path / "store", x, [(5, 8)])
    import json

    m = json.loads((root / "manifest.json").read_text())
    m["n_rows"] = 12
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match="lists 12 rows but the shards hold 10"):
        build_curvature(root, "linfac")
