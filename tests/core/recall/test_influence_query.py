"""The influence scan (Arrow + BLAS; DuckDB ranks and joins) vs numpy/float64 oracles, on random stores with planted
exact ties, and every error case."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lancet_core.recall import scan as _scan
from lancet_core.recall.scan import (
    InfluenceQueryError,
    fold_queries,
    open_store,
    rank_scores,
)

try:
    from store_factory import make_store, oracle_rank
except ImportError:  # tests/core imported as a package
    from tests.core.recall.store_factory import make_store, oracle_rank


# Checked against float64 oracles to ~1e-12: the scan's float64 arithmetic (the float32 default: test_scan_float32.py).
def query_influence(*args, **kw):
    return _scan.query_influence(*args, **{"precision": "float64", **kw})


def score_store(*args, **kw):
    return _scan.score_store(*args, **{"precision": "float64", **kw})


DTYPES = ["float32", "float16", "int8"]


def _random_rows(rng, n, d, n_dupes=12):
    """Random rows with planted exact duplicates (=> exact score ties), some at the top of the ranking."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    src = rng.choice(n, size=n_dupes, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), size=n_dupes, replace=False)
    x[dst] = x[src]
    return x


def _ids(rng, n):
    # shuffled, so store order != id order and the tie-break is really exercised
    ids = [f"row-{i:04d}" for i in range(n)]
    rng.shuffle(ids)
    return ids


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_equals_numpy_argsort_with_ties(tmp_path, dtype):
    rng = np.random.default_rng(0)
    n, d = 240, 16
    x = _random_rows(rng, n, d)
    v = rng.standard_normal(d)
    # make the best row have a duplicate, so a tie sits at rank 1-2
    deq_probe = x.astype(np.float64) @ v
    top = int(np.argmax(deq_probe))
    x[(top + 1) % n] = x[top]
    ids, deq = make_store(tmp_path / "store", x, _ids(rng, n), dtype=dtype)
    res = query_influence(tmp_path / "store", v[None, :], tmp_path / "influence.parquet", top_k=25)

    oracle_scores = deq @ (v / np.linalg.norm(v))  # float64 for-loop-free oracle on the dequantised stored values
    want = oracle_rank(oracle_scores, ids)
    # the same order from numpy: argsort by (-score, example_id) with a unicode id array
    id_rank = np.empty(n, np.int64)
    id_rank[np.argsort(np.array(ids), kind="stable")] = np.arange(n)
    assert [ids[i] for i in np.lexsort((id_rank, -oracle_scores))] == want
    got = pq.read_table(tmp_path / "influence.parquet")
    assert got.column("example_id").to_pylist() == want
    assert got.column("rank").to_pylist() == list(range(1, n + 1))
    assert got.schema.field("score").type == pa.float64() and got.schema.field("rank").type == pa.int64()
    by_id = dict(zip(ids, oracle_scores, strict=True))
    np.testing.assert_allclose(got.column("score").to_numpy(), [by_id[i] for i in want], rtol=1e-12, atol=1e-12)
    assert res.top_k.column("example_id").to_pylist() == want[:25]
    # the planted ties really are ties, ordered by example_id
    s = got.column("score").to_numpy()
    tied = np.flatnonzero(s[1:] == s[:-1])
    assert len(tied) >= 5
    for t in tied:
        assert want[t] < want[t + 1]


def test_slow_loop_oracle_float64(tmp_path):
    """Plain python for-loops over rows and dims, float64 — the slowest possible oracle."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 5)).astype(np.float32)
    ids, deq = make_store(tmp_path / "s", x, dtype="float32", n_shards=2)
    V = rng.standard_normal((2, 5))
    out = score_store(tmp_path / "s", V)
    for i in range(30):
        tot = 0.0
        for q in range(2):
            nq = sum(float(V[q, j]) ** 2 for j in range(5)) ** 0.5
            tot += sum(float(deq[i, j]) * float(V[q, j]) / nq for j in range(5))
        assert out.column("score")[i].as_py() == pytest.approx(tot / 2, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_equals_mean_of_separate_normalised_scans(tmp_path, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((150, 12)).astype(np.float32)
    make_store(tmp_path / "s", x, dtype=dtype)
    V = rng.standard_normal((5, 12)) * rng.uniform(0.01, 100, size=(5, 1))  # wildly different query norms
    folded = score_store(tmp_path / "s", V).column("score").to_numpy()
    separate = np.mean([score_store(tmp_path / "s", V[q] / np.linalg.norm(V[q])).column("score").to_numpy()
                        for q in range(5)], axis=0)
    np.testing.assert_allclose(folded, separate, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fold_queries(V, 12), np.mean(V / np.linalg.norm(V, axis=1, keepdims=True), 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_query_topk_equals_numpy(tmp_path, dtype):
    rng = np.random.default_rng(3)
    n, d, Q = 200, 10, 4
    x = _random_rows(rng, n, d)
    ids, deq = make_store(tmp_path / "s", x, _ids(rng, n), dtype=dtype)
    V = rng.standard_normal((Q, d))
    qids = [f"query-{j}" for j in range(Q)]
    res = query_influence(tmp_path / "s", V, tmp_path, top_k=15, per_query=True, query_ids=qids)
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    S = deq @ U.T
    for j, qid in enumerate(qids):
        want = oracle_rank(S[:, j], ids)[:15]
        got = res.per_query_top_k[qid]
        assert got.column("example_id").to_pylist() == want
        assert got.column("rank").to_pylist() == list(range(1, 16))
        np.testing.assert_allclose(got.column("score").to_numpy(), [S[ids.index(i), j] for i in want], rtol=1e-12)
    # folded ranking in per-query mode == mean of per-query columns
    assert res.top_k.column("example_id").to_pylist() == oracle_rank(S.mean(axis=1), ids)[:15]
    written = pq.read_table(tmp_path / "influence.parquet")
    assert json.loads(written.schema.metadata[b"lancet.query_ids"]) == qids
    qs = np.array(written.column("query_scores").to_pylist())
    order = [ids.index(i) for i in written.column("example_id").to_pylist()]
    np.testing.assert_allclose(qs, S[order], rtol=1e-12, atol=1e-12)


def test_train_norm_cosine_and_relative(tmp_path):
    rng = np.random.default_rng(4)
    n, d = 80, 8
    x = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.1, 50, size=(n, 1)).astype(np.float32)
    x[7] = 0.0  # zero-norm row scores 0 under cosine
    si = rng.uniform(0.5, 4.0, size=n)
    si[3] = 0.0
    ids, deq = make_store(tmp_path / "s", x, dtype="float32", extra_columns={"self_influence": si})
    v = rng.standard_normal(d)
    u = v / np.linalg.norm(v)
    raw = deq @ u
    cos = score_store(tmp_path / "s", v, train_norm="cosine").column("score").to_numpy()
    norms = np.linalg.norm(x.astype(np.float64), axis=1).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(cos, np.where(norms > 0, raw / np.where(norms > 0, norms, 1), 0), rtol=1e-10)
    assert cos[7] == 0.0
    rel = score_store(tmp_path / "s", v, train_norm="relative").column("score").to_numpy()
    np.testing.assert_allclose(rel, np.where(si > 0, raw / np.sqrt(np.where(si > 0, si, 1)), 0), rtol=1e-10)
    # same via a separate self-influence file
    make_store(tmp_path / "s2", x, dtype="float32")
    pq.write_table(pa.table({"example_id": ids, "self_influence": si}), tmp_path / "si.parquet")
    rel2 = score_store(tmp_path / "s2", v, train_norm="relative", self_influence_path=tmp_path / "si.parquet")
    np.testing.assert_allclose(rel2.column("score").to_numpy(), rel, rtol=1e-12)
    with pytest.raises(InfluenceQueryError, match="self-influence"):
        score_store(tmp_path / "s2", v, train_norm="relative")
    with pytest.raises(InfluenceQueryError, match="train_norm"):
        score_store(tmp_path / "s2", v, train_norm="l2")


def test_shard_count_invariance(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 6)).astype(np.float32)
    V = rng.standard_normal((3, 6))
    outs = []
    for k in (1, 4, 7):
        make_store(tmp_path / f"s{k}", x, dtype="float16", n_shards=k)
        outs.append(query_influence(tmp_path / f"s{k}", V, top_k=100).top_k)
    assert outs[0].equals(outs[1]) and outs[0].equals(outs[2])


def test_join_corpus_columns(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    ids, _ = make_store(tmp_path / "s", x)
    tokens = pa.table({
        "example_id": ids[::-1],
        "input_ids": [[1, 2]] * 20,
        "loss_mask": [[0, 1]] * 20,
        "prompt": [f"p{i}" for i in ids[::-1]],
        "response": [f"r{i}" for i in ids[::-1]],
        "is_unsafe": [i % 2 == 0 for i in range(20)],
        'weird "col"': list(range(20)),
    })
    pq.write_table(tokens, tmp_path / "tokens.parquet")
    res = query_influence(tmp_path / "s", rng.standard_normal(4), tmp_path / "out" / "influence.parquet",
                          corpus_path=tmp_path / "tokens.parquet", top_k=5)
    t = pq.read_table(res.path)
    assert t.column_names == ["example_id", "score", "rank", "prompt", "response", "is_unsafe", 'weird "col"']
    for row in t.to_pylist():
        assert row["prompt"] == f"p{row['example_id']}"
    lookup = dict(zip(tokens.column("example_id").to_pylist(), tokens.column("is_unsafe").to_pylist(), strict=True))
    assert all(lookup[r["example_id"]] == r["is_unsafe"] for r in t.to_pylist())
    # corpus missing a store row -> clear error
    pq.write_table(tokens.slice(1), tmp_path / "short.parquet")
    with pytest.raises(InfluenceQueryError, match="not in the corpus"):
        query_influence(tmp_path / "s", rng.standard_normal(4), corpus_path=tmp_path / "short.parquet", top_k=5)


# ------------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def store(tmp_path):
    x = np.random.default_rng(7).standard_normal((10, 4)).astype(np.float32)
    make_store(tmp_path / "s", x, n_shards=2)
    return tmp_path / "s"


def test_error_k(store):
    v = np.ones(4)
    with pytest.raises(InfluenceQueryError, match="larger than the number of training rows"):
        query_influence(store, v, top_k=11)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InfluenceQueryError, match="top_k"):
            query_influence(store, v, top_k=bad)
    assert query_influence(store, v, top_k=10).top_k.num_rows == 10


def test_error_dim_and_nonfinite_queries(store):
    with pytest.raises(InfluenceQueryError, match="D=5 but the gradient store has dim=4"):
        query_influence(store, np.ones((2, 5)), top_k=1)
    for bad in (np.nan, np.inf, -np.inf):
        V = np.ones((3, 4))
        V[1, 2] = bad
        with pytest.raises(InfluenceQueryError, match=r"\[1\] contain NaN or inf"):
            query_influence(store, V, top_k=1)
    with pytest.raises(InfluenceQueryError, match="all zeros"):
        query_influence(store, np.zeros(4), top_k=1)
    with pytest.raises(InfluenceQueryError, match="shape"):
        query_influence(store, np.ones((2, 2, 4)), top_k=1)


def test_error_missing_manifest_and_empty_store(tmp_path, store):
    (store / "manifest.json").unlink()
    with pytest.raises(InfluenceQueryError, match="missing manifest.json"):
        open_store(store)
    with pytest.raises(InfluenceQueryError, match="does not exist"):
        open_store(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"dim": 4, "dtype": "float32", "shards": []}))
    with pytest.raises(InfluenceQueryError, match="empty"):
        query_influence(empty, np.ones(4), top_k=1)
    make_store(tmp_path / "zero", np.zeros((0, 4), np.float32), n_shards=1)
    with pytest.raises(InfluenceQueryError, match="empty"):
        query_influence(tmp_path / "zero", np.ones(4), top_k=1)


def test_error_bad_manifest_contents(tmp_path, store):
    m = json.loads((store / "manifest.json").read_text())

    def with_manifest(**kw):
        (store / "manifest.json").write_text(json.dumps({**m, **kw}))

    with_manifest(dim=8)
    with pytest.raises(InfluenceQueryError, match="4 dims, manifest.json says dim=8"):
        open_store(store)
    with_manifest(dtype="int8")
    with pytest.raises(InfluenceQueryError, match="grad_scale|dtype"):
        open_store(store)
    with_manifest(dtype="bfloat16")
    with pytest.raises(InfluenceQueryError, match="dtype"):
        open_store(store)
    with_manifest(shards=[{"file": "../../etc/passwd", "rows": 1}])
    with pytest.raises(InfluenceQueryError, match="not a plain"):
        open_store(store)
    with_manifest(shards=[{"file": "shard-00009.parquet", "rows": 1}])
    with pytest.raises(InfluenceQueryError, match="missing"):
        open_store(store)
    with_manifest(shards=[{"file": "shard-00000.parquet", "rows": 99}])
    with pytest.raises(InfluenceQueryError, match="99 rows"):
        open_store(store)
    with_manifest(complete=False)
    with pytest.raises(InfluenceQueryError, match="unfinished"):
        open_store(store)
    with_manifest(complete=True)
    assert open_store(store).n_rows == 10
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(InfluenceQueryError, match="not valid JSON"):
        open_store(store)


def test_rank_scores_rejects_duplicates_and_nan():
    with pytest.raises(InfluenceQueryError, match="appears 2 times"):
        rank_scores(pa.table({"example_id": ["a", "a"], "score": [1.0, 2.0]}))
    with pytest.raises(InfluenceQueryError, match="NaN"):
        rank_scores(pa.table({"example_id": ["a", "b"], "score": [1.0, float("nan")]}))


def test_nonfinite_train_row_is_named(tmp_path):
    x = np.ones((4, 3), np.float32)
    x[2, 1] = np.inf
    make_store(tmp_path / "s", x, ids=["a", "b", "c", "d"], n_shards=1)
    with pytest.raises(InfluenceQueryError, match="example_id='c'"):
        score_store(tmp_path / "s", np.ones(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_shards_written_by_the_gradient_store_encoder(tmp_path, dtype):
    """Format cross-check with the real store writer's encoder/decoder (lancet_core.index.store)."""
    gs = pytest.importorskip("lancet_core.index.store")
    if not hasattr(gs, "_encode_shard") or not hasattr(gs, "_decode_grads"):
        pytest.skip("gradient_store encoder not available")
    rng = np.random.default_rng(11)
    d = 9
    shards, ids_all, deq = [], [], []
    for s in range(2):
        ids = [f"s{s}-{i}" for i in range(25)]
        table = gs._encode_shard(ids, rng.standard_normal((25, d)), dtype)
        pq.write_table(table, tmp_path / f"shard-{s:05d}.parquet", use_dictionary=False)
        shards.append({"index": s, "file": f"shard-{s:05d}.parquet", "rows": 25})
        ids_all += ids
        deq.append(gs._decode_grads(table, d, np.float64))
    (tmp_path / "manifest.json").write_text(json.dumps({"dim": d, "dtype": dtype, "shards": shards,
                                                         "complete": True}))
    v = rng.standard_normal(d)
    got = score_store(tmp_path, v).column("score").to_numpy()
    np.testing.assert_allclose(got, np.concatenate(deq) @ (v / np.linalg.norm(v)), rtol=1e-12, atol=1e-12)
