"""Recurring re-alignment on a growing corpus: only new or changed rows' shards are computed; overlapping builds of
one store are serialised and end identical to a single build."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lancet_core.index import build as gs  # the builder calls _encode_shard once per computed shard
from lancet_core.index.build import build_gradient_store
from lancet_core.index.store import GradientStore
from tests.core.index.test_gradient_store import CFG, make_model_dir, write_tokens


def _count_computed(monkeypatch):
    computed = []
    real = gs._encode_shard

    def spy(eids, grads, dtype):
        computed.append(eids[0])
        return real(eids, grads, dtype)

    monkeypatch.setattr(gs, "_encode_shard", spy)
    return computed


def test_appended_rows_compute_only_new_shards(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "model")
    tokens, _, _ = write_tokens(tmp_path / "t9.parquet", n=9)  # 3 full shards of 3 rows
    store = tmp_path / "store"
    build_gradient_store(model, tokens, store, CFG)
    before = GradientStore.open(store).read_all()
    mtimes = {p.name: p.stat().st_mtime_ns for p in GradientStore.open(store).shard_paths}

    grown, _, _ = write_tokens(tmp_path / "t11.parquet", n=11)  # same first 9 rows (same seed) + 2 new rows
    assert pq.read_table(grown).slice(0, 9).equals(pq.read_table(tokens))
    computed = _count_computed(monkeypatch)
    build_gradient_store(model, grown, store, CFG)
    assert computed == ["ex009"]  # only the new shard was computed
    s = GradientStore.open(store)
    assert s.n_rows == 11 and s.example_ids()[-2:] == ["ex009", "ex010"]
    np.testing.assert_array_equal(s.read_all()[:9], before)
    assert {p.name: p.stat().st_mtime_ns for p in s.shard_paths[:3]} == mtimes

    # the result equals a fresh build of the grown corpus
    fresh = build_gradient_store(model, grown, tmp_path / "fresh", CFG)
    np.testing.assert_allclose(GradientStore.open(fresh).read_all(), s.read_all(), rtol=1e-5, atol=1e-7)


def test_changed_row_recomputes_only_its_shard(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "model")
    tokens, _, _ = write_tokens(tmp_path / "t.parquet", n=9)
    store = tmp_path / "store"
    build_gradient_store(model, tokens, store, CFG)
    t = pq.read_table(tokens).to_pylist()
    t[4]["input_ids"] = t[4]["input_ids"][:-1] + [7]
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(tokens)), tokens)
    computed = _count_computed(monkeypatch)
    build_gradient_store(model, tokens, store, CFG)
    assert computed == ["ex003"]  # the shard holding row 4 (rows 3..5)


def test_overlapping_builds_are_serialised(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "model")
    tokens, _, _ = write_tokens(tmp_path / "t.parquet", n=9)
    store = tmp_path / "store"
    computed = _count_computed(monkeypatch)
    errors = []

    def run():
        try:
            build_gradient_store(model, tokens, store, CFG)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sorted(computed) == ["ex000", "ex003", "ex006"]  # each shard computed once: the second run reused them
    single = build_gradient_store(model, tokens, tmp_path / "single", CFG)
    np.testing.assert_array_equal(GradientStore.open(store).read_all(), GradientStore.open(single).read_all())
