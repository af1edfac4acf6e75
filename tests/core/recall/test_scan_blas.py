"""The streaming BLAS scan (lancet_core.recall.scan.scan_store) vs float64 numpy oracles: Q = 1 and Q = 32, the three
store dtypes, GEMM blocks and Arrow batches that do not line up with shard boundaries, streaming top-k vs a full
argsort with planted ties, train-side normalisation through the streaming path, and its error cases."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lancet_core.recall import scan as scan_mod
from lancet_core.recall.scan import InfluenceQueryError, per_query_top_k


# These tests check the scan against float64 oracles to ~1e-12, so they run its float64 arithmetic; the default
# float32 one is checked against the same oracles, with its rounding bound, in test_scan_float32.py.
def scan_store(*args, **kw):
    return scan_mod.scan_store(*args, **{"precision": "float64", **kw})


def score_store(*args, **kw):
    return scan_mod.score_store(*args, **{"precision": "float64", **kw})


def query_influence(*args, **kw):
    return scan_mod.query_influence(*args, **{"precision": "float64", **kw})

try:
    from store_factory import make_store
except ImportError:  # tests/core imported as a package
    from tests.core.recall.store_factory import make_store

DTYPES = ["float32", "float16", "int8"]
# GEMM blocks of 64 / 128 rows and Arrow batches of 50 / 37 rows over shards of 333-334 rows: every kind of boundary
# (a block spanning two shards, a batch split over two blocks, a short last block) occurs.
LAYOUTS = [dict(batch_rows=64, read_rows=50), dict(batch_rows=128, read_rows=37), dict()]


def _rows_with_ties(rng, n, d, n_dupes=40):
    """Random rows with planted exact duplicates (=> exact score ties) at random positions (so across shards and
    blocks) and a few all-zero rows (score exactly 0)."""
    x = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.2, 5.0, size=(n, 1)).astype(np.float32)
    perm = rng.permutation(n)
    src, dst = perm[:n_dupes], perm[n_dupes : 2 * n_dupes]
    x[dst] = x[src]
    x[perm[2 * n_dupes : 2 * n_dupes + 3]] = 0.0
    return x, src, dst


def _shuffled_ids(rng, n):
    ids = [f"row-{i:05d}" for i in range(n)]
    rng.shuffle(ids)  # store order != id order, so the tie-break by example_id is really exercised
    return ids


def _oracle_scores(deq: np.ndarray, V: np.ndarray) -> np.ndarray:
    """[N, Q] float64 dot products of the dequantised stored rows with the unit-normalised queries, without BLAS:
    elementwise products and numpy's pairwise sum."""
    U = V / np.sqrt((V * V).sum(axis=1, keepdims=True))
    return np.stack([(deq * U[q][None, :]).sum(axis=1) for q in range(len(U))], axis=1)


def _oracle_top(scores: np.ndarray, ids: list[str], k: int) -> list[str]:
    """The first k example_ids of a full numpy argsort by (score desc, example_id asc)."""
    id_rank = np.empty(len(ids), np.int64)
    id_rank[np.argsort(np.array(ids), kind="stable")] = np.arange(len(ids))
    return [ids[i] for i in np.lexsort((id_rank, -scores))[:k]]


@pytest.mark.parametrize("plain", [True, False], ids=["plain-pages", "pyarrow"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["b64-r50", "b128-r37", "default"])
@pytest.mark.parametrize("Q", [1, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_blas_scan_equals_float64_oracle(tmp_path, dtype, Q, layout, plain):
    """Both ways a shard is read: its grad pages taken as they are in the file (the builder's layout) or decoded by
    pyarrow (any other Parquet writer's)."""
    rng = np.random.default_rng(100 + Q)
    n, d, k = 1000, 72, 25
    x, src, dst = _rows_with_ties(rng, n, d)
    ids, deq = make_store(tmp_path / "s", x, _shuffled_ids(rng, n), dtype=dtype, n_shards=3, plain=plain)
    V = rng.standard_normal((Q, d)) * rng.uniform(0.01, 100, size=(Q, 1))  # wildly different query norms
    S = _oracle_scores(deq, V)
    folded = S.mean(axis=1)

    res = scan_store(tmp_path / "s", V, per_query=True, top_k=k, **layout)
    assert res.n_rows == n and res.example_ids.to_pylist() == ids  # store order
    np.testing.assert_allclose(res.query_scores, S, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.score, folded, rtol=1e-12, atol=1e-12)
    # identical rows get bit-identical scores wherever they sit (shard, GEMM block, position in the block)
    assert np.array_equal(res.query_scores[dst], res.query_scores[src])
    assert np.array_equal(res.score[dst], res.score[src])
    # streaming top-k == full argsort top-k, folded and per query (the oracle ranks the scan's own scores, so a
    # tie is a tie on both sides; the scores themselves were checked against the oracle above)
    assert res.top_k.column("example_id").to_pylist() == _oracle_top(res.score, ids, k)
    assert res.top_k.column("rank").to_pylist() == list(range(1, k + 1))
    assert _oracle_top(res.score, ids, k) == _oracle_top(folded, ids, k)
    for q in range(Q):
        got = res.per_query_top_k[q]
        assert got.column("example_id").to_pylist() == _oracle_top(res.query_scores[:, q], ids, k)
        by_id = dict(zip(ids, S[:, q], strict=True))
        np.testing.assert_allclose(got.column("score").to_numpy(), [by_id[i] for i in got.column("example_id")
                                                                    .to_pylist()], rtol=1e-12, atol=1e-12)

    # the folded scan (one vector, per_query=False) == the mean of the per-query scores
    one = scan_store(tmp_path / "s", V, top_k=k, **layout)
    assert one.query_scores is None and one.per_query_top_k is None
    np.testing.assert_allclose(one.score, folded, rtol=1e-10, atol=1e-12)
    assert np.array_equal(one.score[dst], one.score[src])
    assert one.top_k.column("example_id").to_pylist() == _oracle_top(one.score, ids, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_size_does_not_change_results(tmp_path, dtype):
    rng = np.random.default_rng(7)
    x, _, _ = _rows_with_ties(rng, 700, 40, n_dupes=20)
    make_store(tmp_path / "s", x, _shuffled_ids(rng, 700), dtype=dtype, n_shards=4)
    V = rng.standard_normal((5, 40))
    outs = [scan_store(tmp_path / "s", V, per_query=True, top_k=30, **lay) for lay in LAYOUTS]
    for o in outs[1:]:
        np.testing.assert_allclose(o.query_scores, outs[0].query_scores, rtol=1e-12, atol=1e-12)
        assert o.top_k.column("example_id").equals(outs[0].top_k.column("example_id"))
        assert all(a.column("example_id").equals(b.column("example_id"))
                   for a, b in zip(o.per_query_top_k, outs[0].per_query_top_k, strict=True))


@pytest.mark.parametrize("readers", [0, 1, 2, 3, 16])
def test_reader_threads_keep_store_order(tmp_path, readers):
    """Shards decoded by several threads still come back in store order, bit for bit the same scores."""
    rng = np.random.default_rng(13)
    x, _, _ = _rows_with_ties(rng, 400, 12, n_dupes=10)
    ids, _ = make_store(tmp_path / "s", x, _shuffled_ids(rng, 400), dtype="float16", n_shards=9)
    V = rng.standard_normal((3, 12))
    ref = scan_store(tmp_path / "s", V, per_query=True, top_k=7, batch_rows=64, read_rows=11, readers=0)
    got = scan_store(tmp_path / "s", V, per_query=True, top_k=7, batch_rows=64, read_rows=11, readers=readers)
    assert got.example_ids.to_pylist() == ids
    assert np.array_equal(got.query_scores, ref.query_scores) and np.array_equal(got.score, ref.score)
    assert got.top_k.equals(ref.top_k)
    assert not _reader_threads()


def test_streaming_topk_matches_argsort_under_heavy_ties(tmp_path):
    """Scores with few distinct values (every row ties with dozens of others, across blocks and shards): the
    streaming selection must cut each tie group by example_id exactly as a full sort does, for every k."""
    rng = np.random.default_rng(8)
    n, d = 900, 8
    x = np.zeros((n, d), np.float32)
    x[:, 0] = rng.integers(-3, 4, size=n)  # 7 distinct scores for a query along the first axis
    x[:, 1] = rng.integers(0, 2, size=n)
    ids = _shuffled_ids(rng, n)
    make_store(tmp_path / "s", x, ids, dtype="float16", n_shards=3)
    V = np.zeros((2, d))
    V[0, 0] = 1.0
    V[1, :2] = [1.0, 1.0]
    for k in (1, 5, 64, 129, 500, n):
        res = scan_store(tmp_path / "s", V, per_query=True, top_k=k, keep_scores=False, batch_rows=64, read_rows=41)
        assert res.score is None and res.example_ids is None
        full = scan_store(tmp_path / "s", V, per_query=True)
        assert res.top_k.column("example_id").to_pylist() == _oracle_top(full.score, ids, k)
        for q in range(2):
            assert res.per_query_top_k[q].column("example_id").to_pylist() == _oracle_top(full.query_scores[:, q],
                                                                                          ids, k)
        # and the table-based selection used on a scores table (influence.py's aggregated path)
        pq_top = per_query_top_k(full.to_table(), ["a", "b"], k)
        assert pq_top["b"].column("example_id").to_pylist() == _oracle_top(full.query_scores[:, 1], ids, k)


def test_running_topk_random_chunks_vs_lexsort():
    rng = np.random.default_rng(9)
    for trial in range(20):
        n = int(rng.integers(1, 3000))
        k = int(rng.integers(1, n + 1))
        S = rng.integers(-20, 20, size=(n, 3)).astype(np.float64) / 4  # many ties
        S[:, 2] = rng.standard_normal(n)
        ids = [f"{rng.integers(0, 10**6):06d}-{i}" for i in range(n)]
        top = scan_mod._RunningTopK(k, 3)
        a = 0
        while a < n:
            b = min(n, a + int(rng.integers(1, 400)))
            top.push(S[a:b], pa.array(ids[a:b]))
            a = b
        for c in range(3):
            got = top.table(c, pa.string())
            assert got.column("example_id").to_pylist() == _oracle_top(S[:, c], ids, k), (trial, c)
            order = {i: j for j, i in enumerate(ids)}
            np.testing.assert_array_equal(got.column("score").to_numpy(),
                                          [S[order[i], c] for i in got.column("example_id").to_pylist()])


def test_running_topk_orders_ids_by_code_point():
    """Ties cut by example_id in code point order (= UTF-8 byte order, DuckDB's), trailing NULs and non-ASCII too."""
    ids = ["b", "a\x00", "a", "é", "z", "\U0001f600", "ab", ""]
    top = scan_mod._RunningTopK(len(ids), 1)
    top.push(np.zeros((len(ids), 1)), pa.array(ids))
    want = sorted(ids, key=lambda i: i.encode())
    assert top.table(0, pa.string()).column("example_id").to_pylist() == want
    import duckdb

    got = duckdb.sql("SELECT i FROM (SELECT unnest(?) AS i) ORDER BY i", params=[ids]).fetchall()
    assert [r[0] for r in got] == want


def test_query_influence_per_query_tables_are_the_streaming_topk(tmp_path):
    rng = np.random.default_rng(10)
    x, _, _ = _rows_with_ties(rng, 400, 16, n_dupes=30)
    ids, deq = make_store(tmp_path / "s", x, _shuffled_ids(rng, 400), dtype="int8", n_shards=5)
    V = rng.standard_normal((32, 16))
    qids = [f"query-{j}" for j in range(32)]
    res = query_influence(tmp_path / "s", V, tmp_path, top_k=20, per_query=True, query_ids=qids)
    S = _oracle_scores(deq, V)
    scores = score_store(tmp_path / "s", V, per_query=True)
    for j, qid in enumerate(qids):
        got = res.per_query_top_k[qid]
        assert got.schema == pa.schema([("example_id", pa.string()), ("score", pa.float64()), ("rank", pa.int64())])
        assert got.column("example_id").to_pylist() == _oracle_top(
            scores.column("query_scores").combine_chunks().flatten().to_numpy().reshape(-1, 32)[:, j], ids, 20)
        np.testing.assert_allclose(got.column("score").to_numpy(),
                                   [S[ids.index(i), j] for i in got.column("example_id").to_pylist()], rtol=1e-12)


def test_train_norm_through_the_stream(tmp_path):
    rng = np.random.default_rng(11)
    n, d = 500, 24
    x = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.1, 50, size=(n, 1)).astype(np.float32)
    x[77] = 0.0
    si = rng.uniform(0.5, 4.0, size=n)
    si[3] = 0.0
    ids, deq = make_store(tmp_path / "s", x, _shuffled_ids(rng, n), dtype="int8", n_shards=3,
                          extra_columns={"self_influence": si})
    V = rng.standard_normal((4, d))
    raw = _oracle_scores(deq, V)
    norms = np.linalg.norm(x.astype(np.float64), axis=1).astype(np.float32).astype(np.float64)
    lay = dict(batch_rows=64, read_rows=45)
    cos = scan_store(tmp_path / "s", V, train_norm="cosine", per_query=True, top_k=10, **lay)
    want = np.where(norms[:, None] > 0, raw / np.where(norms > 0, norms, 1)[:, None], 0)
    np.testing.assert_allclose(cos.query_scores, want, rtol=1e-10, atol=1e-12)
    assert (cos.query_scores[77] == 0).all()
    assert cos.top_k.column("example_id").to_pylist() == _oracle_top(cos.score, ids, 10)
    den = np.sqrt(si)
    want_rel = np.where(den[:, None] > 0, raw / np.where(den > 0, den, 1)[:, None], 0)
    rel = scan_store(tmp_path / "s", V, train_norm="relative", per_query=True, **lay)
    np.testing.assert_allclose(rel.query_scores, want_rel, rtol=1e-10, atol=1e-12)
    # the same through a separate self-influence file, joined by example_id (written in another row order)
    make_store(tmp_path / "s2", x, ids, dtype="int8", n_shards=4)
    order = rng.permutation(n)
    pq.write_table(pa.table({"example_id": [ids[i] for i in order], "self_influence": si[order]}), tmp_path / "si.pq")
    rel2 = scan_store(tmp_path / "s2", V, train_norm="relative", per_query=True, self_influence_path=tmp_path / "si.pq",
                      **lay)
    np.testing.assert_allclose(rel2.query_scores, rel.query_scores, rtol=1e-12, atol=0)
    # a missing row, a negative self-influence, a duplicated row: each a clear error
    keep = [i for i in order if i != 123]
    pq.write_table(pa.table({"example_id": [ids[i] for i in keep], "self_influence": si[keep]}), tmp_path / "m.pq")
    with pytest.raises(InfluenceQueryError, match=f"example_id='{ids[123]}'.*missing or negative"):
        scan_store(tmp_path / "s2", V, train_norm="relative", self_influence_path=tmp_path / "m.pq", **lay)
    neg = si.copy()
    neg[321] = -1.0
    pq.write_table(pa.table({"example_id": ids, "self_influence": neg}), tmp_path / "n.pq")
    with pytest.raises(InfluenceQueryError, match=f"example_id='{ids[321]}'.*missing or negative"):
        scan_store(tmp_path / "s2", V, train_norm="relative", self_influence_path=tmp_path / "n.pq", **lay)
    pq.write_table(pa.table({"example_id": ids + ids[:1], "self_influence": np.r_[si, si[:1]]}), tmp_path / "d.pq")
    with pytest.raises(InfluenceQueryError, match="duplicate example_id"):
        scan_store(tmp_path / "s2", V, train_norm="relative", self_influence_path=tmp_path / "d.pq", **lay)


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lancet-scan-reader"]


def test_errors_mid_stream_stop_the_reader(tmp_path):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[250, 3] = np.inf  # in the last shard, many batches after the reader thread started
    make_store(tmp_path / "s", x, [f"r{i}" for i in range(300)], n_shards=3)
    for readers in (1, 2, 3):
        with pytest.raises(InfluenceQueryError, match="example_id='r250'.*non-finite"):
            scan_store(tmp_path / "s", np.ones(8), batch_rows=64, read_rows=10, top_k=5, readers=readers)
        assert not _reader_threads()
    # a null vector: named (fixed_size_binary rows are whole; there is no null "inside" a vector any more)
    path = tmp_path / "s" / "shard-00001.parquet"
    t = pq.read_table(path)
    grad = t.column("grad").combine_chunks()
    row_mask = np.zeros(len(t), bool)
    row_mask[7] = True
    nulled = pa.FixedSizeBinaryArray.from_buffers(grad.type, len(grad), [pa.array(~row_mask).buffers()[1], grad.buffers()[1]])
    pq.write_table(t.set_column(t.column_names.index("grad"), "grad", nulled), path)
    with pytest.raises(InfluenceQueryError, match=f"example_id='{t.column('example_id')[7].as_py()}'.*grad is null"):
        scan_store(tmp_path / "s", np.ones(8), batch_rows=64, read_rows=10)
    assert not _reader_threads()


def test_format_1_store_is_refused(tmp_path):
    """A store written before the fixed_size_binary format (grad as a nested list, or manifest format_version 1) is
    refused with one line saying to rebuild it, before any scan."""
    make_store(tmp_path / "s", np.ones((10, 4), np.float32), n_shards=1)
    path = tmp_path / "s" / "shard-00000.parquet"
    t = pq.read_table(path)
    old = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(40, np.float32)), 4)
    pq.write_table(t.set_column(t.column_names.index("grad"), "grad", old), path)
    with pytest.raises(InfluenceQueryError, match="format 1.*rebuild the store"):
        scan_store(tmp_path / "s", np.ones(4))
    make_store(tmp_path / "v1", np.ones((10, 4), np.float32), manifest_extra={"format_version": 1})
    with pytest.raises(InfluenceQueryError, match="format_version 1; this lancet reads version 2.*rebuild"):
        scan_store(tmp_path / "v1", np.ones(4))


def test_scan_argument_errors(tmp_path):
    make_store(tmp_path / "s", np.ones((10, 4), np.float32))
    with pytest.raises(InfluenceQueryError, match="keep_scores=False needs a top_k"):
        scan_store(tmp_path / "s", np.ones(4), keep_scores=False)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(InfluenceQueryError, match="batch_rows"):
            scan_store(tmp_path / "s", np.ones(4), batch_rows=bad)
        with pytest.raises(InfluenceQueryError, match="read_rows"):
            scan_store(tmp_path / "s", np.ones(4), read_rows=bad)
    for bad in (-1, True, 1.5):
        with pytest.raises(InfluenceQueryError, match="readers"):
            scan_store(tmp_path / "s", np.ones(4), readers=bad)
    with pytest.raises(InfluenceQueryError, match="larger than the number of training rows"):
        scan_store(tmp_path / "s", np.ones(4), top_k=11)
    with pytest.raises(InfluenceQueryError, match="per-query scores contain NaN"):
        per_query_top_k(pa.table({"example_id": ["a"], "score": [0.0], "query_scores": pa.FixedSizeListArray
                                  .from_arrays(pa.array([np.nan]), 1)}), ["q"], 1)
