"""The scan's default float32 arithmetic (RecallConfig.score_precision) against float64 oracles, with the rounding
bound of a float32 dot product instead of a loose tolerance: for unit-normalised queries u rounded to float32 and
stored values x (exact in float32), |fl32(x·u) − x·u| ≤ γ · Σ_i |x_i u_i|, γ = (D + 2)·2⁻²⁴ / (1 − (D + 2)·2⁻²⁴)
(D products and sums, the rounding of u, the final cast; Higham, Accuracy and Stability, §3.1). Ties stay ties, and
top-k is the oracle's top-k of the scan's own scores, through both ways a shard is read."""

from __future__ import annotations

import numpy as np
import pytest

from lancet_core.recall.scan import scan_store

try:
    from store_factory import make_store
    from test_scan_blas import LAYOUTS, _oracle_top, _rows_with_ties, _shuffled_ids
except ImportError:  # tests/core imported as a package
    from tests.core.recall.store_factory import make_store
    from tests.core.recall.test_scan_blas import LAYOUTS, _oracle_top, _rows_with_ties, _shuffled_ids


def _bound(deq: np.ndarray, U: np.ndarray) -> np.ndarray:
    """[N, Q] float32 rounding bound of each score."""
    d = deq.shape[1]
    u = (d + 2) * 2.0**-24
    return u / (1 - u) * (np.abs(deq) @ np.abs(U).T)


@pytest.mark.parametrize("plain", [True, False], ids=["plain-pages", "pyarrow"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["b64-r50", "b128-r37", "default"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_float32_scan_within_its_rounding_bound(tmp_path, dtype, layout, plain):
    rng = np.random.default_rng(5)
    n, d, Q, k = 900, 257, 32, 20
    x, src, dst = _rows_with_ties(rng, n, d)
    ids, deq = make_store(tmp_path / "s", x, _shuffled_ids(rng, n), dtype=dtype, n_shards=3, plain=plain)
    V = rng.standard_normal((Q, d)) * rng.uniform(0.01, 100, size=(Q, 1))
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    S = deq @ U.T  # float64 oracle ([N, D] @ [D, Q] on values exact in float64)
    res = scan_store(tmp_path / "s", V, per_query=True, top_k=k, **layout)  # precision: the float32 default
    exact = scan_store(tmp_path / "s", V, per_query=True, top_k=k, precision="float64", **layout)
    err = np.abs(res.query_scores - S)
    bound = _bound(deq, U)
    assert (err <= bound).all(), float((err / np.maximum(bound, 1e-300)).max())
    assert err.max() > 0  # really float32 arithmetic, not float64 under another name
    np.testing.assert_allclose(exact.query_scores, S, rtol=1e-12, atol=1e-12)
    assert (np.abs(res.score - S.mean(axis=1)) <= bound.mean(axis=1) + 1e-15).all()
    # identical rows: bit-identical scores wherever they sit; top-k = the oracle's order of the scan's own scores
    assert np.array_equal(res.query_scores[dst], res.query_scores[src])
    assert res.top_k.column("example_id").to_pylist() == _oracle_top(res.score, ids, k)
    for q in range(Q):
        assert res.per_query_top_k[q].column("example_id").to_pylist() == _oracle_top(res.query_scores[:, q], ids, k)


def test_float32_and_float64_rank_alike(tmp_path):
    """On scores with no near-ties the two precisions give the same ranking."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 128)).astype(np.float32)
    make_store(tmp_path / "s", x, dtype="float16", n_shards=4)
    V = rng.standard_normal((4, 128))
    a = scan_store(tmp_path / "s", V, top_k=50)
    b = scan_store(tmp_path / "s", V, top_k=50, precision="float64")
    assert a.top_k.column("example_id").equals(b.top_k.column("example_id"))


def test_precision_is_checked(tmp_path):
    from lancet_core.recall.scan import InfluenceQueryError

    make_store(tmp_path / "s", np.ones((10, 4), np.float32))
    with pytest.raises(InfluenceQueryError, match="precision must be one of"):
        scan_store(tmp_path / "s", np.ones(4), precision="float16")
