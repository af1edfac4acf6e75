"""The build's three pure steps (plan_build -> compute_shard per shard, anywhere, any order -> finalize_build) give
the store `build_gradient_store` gives, byte for byte; the factor reduction is exact; bad states are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lancet_core.errors import CorpusError
from lancet_core.index.build import build_gradient_store, compute_shard, finalize_build, plan_build, record_shards
from lancet_core.index.config import IndexConfig
from lancet_core.index.store import GradientStore, StoreFormatError, StoreIncomplete, reduce_factor_sums
from tests.core.index.test_gradient_store import make_model_dir, write_tokens

CFG = IndexConfig(proj_in_dim=4, proj_out_dim=3, dtype="float16", batch_size=4, response_tokens=4, rows_per_shard=3,
                  curvature=("kfac",))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    model_dir = make_model_dir(d / "model")
    tokens, *_ = write_tokens(d / "tokens.parquet", n=11)
    serial = build_gradient_store(model_dir, tokens, d / "serial", CFG)
    return model_dir, tokens, serial


def _bytes(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != ".lock" and not p.name.endswith(".json")
            and not p.relative_to(store).as_posix().startswith("curvature/kfac")}


def test_shards_in_any_order_give_the_serial_store_byte_for_byte(setup, tmp_path):
    model_dir, tokens, serial = setup
    root = tmp_path / "s"
    plan = plan_build(model_dir, tokens, root, CFG)
    assert [j.index for j in plan.todo] == [0, 1, 2, 3] and not plan.done
    assert json.loads((root / "manifest.json").read_text())["shards"] == []  # planned, nothing finished yet
    entries = [compute_shard(plan, job) for job in reversed(plan.todo)]  # any order; the manifest is untouched
    assert json.loads((root / "manifest.json").read_text())["shards"] == []
    finalize_build(plan, entries)
    m, ms = (json.loads((p / "manifest.json").read_text()) for p in (root, serial))
    assert m["shards"] == ms["shards"] and m["complete"]
    assert _bytes(root) == _bytes(serial)
    # the curvature built from the reduced factors is the same numbers
    a, b = (np.load(next((p / "curvature").glob("kfac*.npz"))) for p in (root, serial))
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_factor_reduction_is_exact_float64_in_shard_order(setup):
    _, _, serial = setup
    st = GradientStore.open(serial)
    files = [serial / s["factors_file"] for s in st.manifest["shards"]]
    names = [ml.name for ml in st.layout]
    got, tokens = reduce_factor_sums(files, names)
    # the slow reference: a Python sum of float64 arrays, shard by shard
    want = {n: [0.0, 0.0] for n in names}
    total = 0
    for f in files:
        with np.load(f) as z:
            total += int(z["tokens"])
            for n in names:
                want[n][0] = want[n][0] + z[f"A:{n}"].astype(np.float64)
                want[n][1] = want[n][1] + z[f"S:{n}"].astype(np.float64)
    assert tokens == total
    for n in names:
        assert got[n][0].dtype == np.float64
        np.testing.assert_array_equal(got[n][0], want[n][0])
        np.testing.assert_array_equal(got[n][1], want[n][1])


def test_a_lost_shard_is_refused_at_finalise_and_the_replan_keeps_the_others(setup, tmp_path):
    model_dir, tokens, _ = setup
    root = tmp_path / "s"
    plan = plan_build(model_dir, tokens, root, CFG)
    entries = [compute_shard(plan, j) for j in plan.todo if j.index != 2]  # shard 2's worker "died"
    record_shards(plan, entries)
    with pytest.raises(StoreIncomplete, match=r"shard\(s\) \[2\] not computed"):
        finalize_build(plan, entries)
    again = plan_build(model_dir, tokens, root, CFG)
    assert [j.index for j in again.todo] == [2] and [e["index"] for e in again.done] == [0, 1, 3]


def test_shards_finished_but_never_recorded_are_kept_by_the_replan(setup, tmp_path):
    """A coordinator killed after shards finished but before it recorded them (kill -9 between a shard's result and
    record_shards): the re-plan finds their entries in .shard-records/, checks their files and keeps them (not
    rewritten); a record of another identity is ignored; the records folder goes when the store is complete, and the
    store is byte-identical to a serial build."""
    import shutil

    from lancet_core.index.build import RECORDS_DIR

    model_dir, tokens, _ = setup
    root = tmp_path / "s"
    plan = plan_build(model_dir, tokens, root, CFG)
    finished = [compute_shard(plan, j) for j in plan.todo if j.index in (0, 2)]  # never recorded
    mtimes = {e["file"]: (root / e["file"]).stat().st_mtime_ns for e in finished}
    stale = root / RECORDS_DIR / "shard-00001.parquet.json"  # a record of another identity: ignored
    stale.write_text(json.dumps({"plan": "another store", "entry": {**finished[0], "index": 1}}))
    again = plan_build(model_dir, tokens, root, CFG)
    assert [e["index"] for e in again.done] == [0, 2] and [j.index for j in again.todo] == [1, 3]
    entries = [*again.done, *(compute_shard(again, j) for j in again.todo)]
    assert {f: (root / f).stat().st_mtime_ns for f in mtimes} == mtimes
    finalize_build(again, entries)
    assert not (root / RECORDS_DIR).exists()
    serial = tmp_path / "serial"
    build_gradient_store(model_dir, tokens, serial, CFG)
    shutil.rmtree(serial / RECORDS_DIR, ignore_errors=True)
    assert _bytes(root) == _bytes(serial)


def test_changed_rows_after_planning_are_refused(setup, tmp_path):
    model_dir, tokens, _ = setup
    t = pq.read_table(tokens)
    mine = tmp_path / "tokens.parquet"
    pq.write_table(t, mine)
    plan = plan_build(model_dir, mine, tmp_path / "s", CFG)
    ids = t["input_ids"].to_pylist()
    ids[4][1] = (ids[4][1] % 60) + 1  # a token of shard 1 changes between planning and computing
    pq.write_table(t.set_column(1, "input_ids", pa.array(ids, pa.list_(pa.int32()))), mine)
    with pytest.raises(CorpusError, match="rows 3..5 changed since the build was planned"):
        compute_shard(plan, plan.todo[1])


def test_format_1_store_is_refused(setup, tmp_path):
    _, _, serial = setup
    import shutil

    old = tmp_path / "old"
    shutil.copytree(serial, old)
    m = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    with pytest.raises(StoreFormatError, match="format_version 1; this lancet reads version 2.*rebuild"):
        GradientStore.open(old)
