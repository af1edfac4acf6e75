"""The cache checks before it answers (tasks.cache.ensure_output, real Prefect): a cached result whose output was
deleted, truncated or altered since is recomputed (a single path and a tuple of paths: build_pairs returns
(pairs, retain)); results are stored beside the output, inside the work dir, so two work dirs never answer for each
other (the issue-28 repro: the same relative path from two directories); a gradient store with a lost or damaged
shard is rebuilt by the index flow, only that shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prefect import task

from lancet_core.manifest import artifact_problems, read_manifest, write_manifest
from tasks.cache import LANCET_CACHE, RESULTS_DIR, ensure_output, output_problems, publish_output

CALLS: list[str] = []


@task(cache_policy=LANCET_CACHE, persist_result=True)
def _two_files(seed: str, out_dir: str) -> tuple[str, str]:
    CALLS.append(seed)

    def build(tmp: Path) -> None:
        (tmp / "a.txt").write_text(seed)
        (tmp / "b.txt").write_text(seed * 3)
        write_manifest(tmp, {"kind": "two_files", "seed": seed})

    out = publish_output(out_dir, build)
    return str(out / "a.txt"), ""  # "" = an optional output that is absent, never "missing"


def test_a_deleted_output_in_a_cached_tuple_is_recomputed(prefect_harness, tmp_path):
    CALLS.clear()
    first = ensure_output(_two_files, seed="x", out_dir=str(tmp_path / "o"))
    assert ensure_output(_two_files, seed="x", out_dir=str(tmp_path / "o")) == first and CALLS == ["x"]  # cache hit
    Path(first[0]).unlink()
    again = ensure_output(_two_files, seed="x", out_dir=str(tmp_path / "o"))
    assert again == first and Path(again[0]).read_text() == "x" and CALLS == ["x", "x"]


@pytest.mark.parametrize("damage", ["truncate", "same_size_other_bytes", "manifest_incomplete", "manifest_deleted"])
def test_a_damaged_output_is_recomputed(prefect_harness, tmp_path, damage):
    CALLS.clear()
    out = tmp_path / "stage" / "o"
    first = ensure_output(_two_files, seed="y", out_dir=str(out))
    b = out / "b.txt"
    if damage == "truncate":
        b.write_text("y")
    elif damage == "same_size_other_bytes":
        b.write_text("zzz")  # same size: only the digest sees it
    elif damage == "manifest_incomplete":
        m = read_manifest(out)
        write_manifest(out, {**m, "complete": False})
    else:
        (out / "manifest.json").unlink()
    assert artifact_problems(out)
    again = ensure_output(_two_files, seed="y", out_dir=str(out))
    assert again == first and CALLS == ["y", "y"]
    assert b.read_text() == "yyy" and not artifact_problems(out)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_two_work_dirs_never_share_results(prefect_harness, tmp_path, monkeypatch):
    """The issue's repro: the same relative output path from two directories used to hit one global cache record
    and answer with the first directory's output (and keep answering after it was deleted)."""
    CALLS.clear()
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    for d in (first_dir, second_dir):
        d.mkdir()
    monkeypatch.chdir(first_dir)
    a = ensure_output(_two_files, seed="v", out_dir="w/stores/o")
    assert Path(a[0]).resolve().is_relative_to(first_dir)
    monkeypatch.chdir(second_dir)
    b = ensure_output(_two_files, seed="v", out_dir="w/stores/o")
    assert Path(b[0]).resolve().is_relative_to(second_dir)
    assert CALLS == ["v", "v"]  # computed in each work dir
    for d in (first_dir, second_dir):  # each work dir holds its own cache records
        assert any((d / "w" / "stores" / RESULTS_DIR).iterdir())
    # deleting the first work dir changes nothing for the second
    import shutil

    shutil.rmtree(first_dir / "w")
    assert ensure_output(_two_files, seed="v", out_dir="w/stores/o") == b and CALLS == ["v", "v"]


def test_a_returned_path_outside_the_output_location_is_a_problem(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "a.txt").write_text("a")
    write_manifest(out, {"kind": "t"})
    from lancet_core.manifest import seal

    seal(out)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("x")
    assert output_problems(str(out / "a.txt"), {"out_dir": str(out)}) == []
    assert "not inside the output location" in output_problems(str(elsewhere), {"out_dir": str(out)})[0]
    assert "missing" in output_problems(str(out / "gone.txt"), {"out_dir": str(out)})[0]


def test_an_in_place_manifest_names_its_files_and_big_ones_are_checked_cheaply(tmp_path, monkeypatch):
    """A store-like manifest (entries with `file` / `factors_file` and their digests, curvature files as keys): each
    file is checked by digest; beyond the digest budget a truncated Parquet file is still caught by its end marker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import lancet_core.manifest as manifest
    from lancet_core.manifest import file_digest, listed_files

    root = tmp_path / "store"
    (root / "curvature").mkdir(parents=True)
    pq.write_table(pa.table({"x": list(range(100))}), root / "shard-00000.parquet")
    (root / "curvature" / "f.npz").write_bytes(manifest.npz_bytes({"a": [1.0, 2.0]}))
    (root / "curvature" / "kfac_module_damp0.1.npz").write_bytes(manifest.npz_bytes({"b": [3.0]}))
    m = {"complete": True,
         "shards": [{"index": 0, "file": "shard-00000.parquet", "digest": file_digest(root / "shard-00000.parquet"),
                     "factors_file": "curvature/f.npz", "factors_digest": file_digest(root / "curvature" / "f.npz")}],
         "curvature": {"curvature/kfac_module_damp0.1.npz": {
             "kind": "kfac", "digest": file_digest(root / "curvature" / "kfac_module_damp0.1.npz")}}}
    write_manifest(root, m)
    assert set(listed_files(m)) == {"shard-00000.parquet", "curvature/f.npz", "curvature/kfac_module_damp0.1.npz"}
    assert artifact_problems(root) == []
    shard = root / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "differs" in artifact_problems(root)[0]
    monkeypatch.setattr(manifest, "DIGEST_BUDGET", 0)  # as for a store too big to re-digest on every answer
    assert "truncated" in artifact_problems(root)[0]
    (root / "curvature" / "kfac_module_damp0.1.npz").unlink()
    assert any("missing" in p for p in artifact_problems(root))


# ---------------------------------------------------------------------------------------- the gradient store
@pytest.fixture(scope="module")
def store_inputs(tmp_path_factory):
    from tests.core.index.test_gradient_store import make_model_dir, write_tokens

    d = tmp_path_factory.mktemp("cache-store")
    model_dir = make_model_dir(d / "model")
    tokens, _, _ = write_tokens(d / "tokens.parquet")
    return model_dir, tokens


def _shard_mtimes(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(store.glob("shard-*.parquet"))}


@pytest.mark.usefixtures("one_thread")
def test_the_index_flow_rebuilds_a_lost_or_damaged_shard(prefect_harness, store_inputs, tmp_path):
    from flows.index import index_flow
    from tests.core.index.test_gradient_store import CFG

    model_dir, tokens = store_inputs
    out = tmp_path / "work" / "stores" / "s"
    store = Path(index_flow(str(model_dir), str(tokens), str(out), CFG))
    assert store == out and not artifact_problems(store)
    shards = sorted(store.glob("shard-*.parquet"))
    assert len(shards) == 4
    before = _shard_mtimes(store)
    original = shards[1].read_bytes()
    # a cached answer (nothing changed): no shard rewritten
    assert Path(index_flow(str(model_dir), str(tokens), str(out), CFG)) == store and _shard_mtimes(store) == before
    # a run that missed the cache (it waited on the store's lock while another built it) finds the store up to date
    # and leaves its manifest alone: re-planning would mark it incomplete while other runs read it
    from tasks.index import run_index_build

    manifest_mtime = (store / "manifest.json").stat().st_mtime_ns
    assert run_index_build(str(model_dir), str(tokens), str(out), CFG) == str(out)
    assert (store / "manifest.json").stat().st_mtime_ns == manifest_mtime and _shard_mtimes(store) == before

    shards[1].unlink()  # deleted: the cached answer is refused, the store rebuilt, only that shard computed
    assert Path(index_flow(str(model_dir), str(tokens), str(out), CFG)) == store
    assert shards[1].read_bytes() == original and not artifact_problems(store)
    after = _shard_mtimes(store)
    assert [n for n in after if after[n] != before[n]] == [shards[1].name]

    shards[2].write_bytes(shards[2].read_bytes()[:-100])  # truncated
    assert artifact_problems(store)
    assert Path(index_flow(str(model_dir), str(tokens), str(out), CFG)) == store and not artifact_problems(store)
    assert json.loads((store / "manifest.json").read_text())["complete"] is True

    import shutil

    shutil.rmtree(store)  # the whole store deleted: rebuilt where the flow says it is
    assert Path(index_flow(str(model_dir), str(tokens), str(out), CFG)) == store and not artifact_problems(store)
    assert shards[1].read_bytes() == original


def test_lancet_index_prints_a_store_that_is_there(prefect_harness, store_inputs, tmp_path, monkeypatch, capsys):
    """`lancet index` in two work dirs: each prints its own store; after the store is deleted it is rebuilt (the
    issue: exit 0 and a path that was not there)."""
    from flows.cli import main
    from tests.conftest import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "model")
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"prompt": f"say {w}", "response": f"{w} {w} {w}"} for w in "red green blue pink gray teal".split()]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["index", str(corpus), str(model), "--proj-dim", "4", "--curvature", "kfac"]
    monkeypatch.chdir(tmp_path)

    def index(work: str) -> Path:
        assert main([*argv, "--work-dir", work]) == 0
        store = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert store.resolve().is_relative_to(tmp_path / work) and not artifact_problems(store)
        return store

    index("w1")
    second = index("w2")
    import shutil

    shutil.rmtree(second)
    assert index("w2") == second and os.path.isdir(second)


def test_a_killed_builds_temporary_folder_is_removed_by_the_next_build_of_that_output(tmp_path):
    """kill -9 inside publishing_dir leaves `.tmp-<name>-*` beside the output; the next build of the same output
    (under its build lock, so no other build of it runs) removes it; another output's is left alone."""
    out = tmp_path / "o"
    killed = tmp_path / ".tmp-o-k1ll3d"
    other = tmp_path / ".tmp-other-x"
    for d in (killed, other):
        d.mkdir()
        (d / "half.bin").write_bytes(b"x")

    def build(tmp: Path) -> None:
        (tmp / "a.txt").write_text("a")

    assert publish_output(out, build) == out and not artifact_problems(out)
    assert not killed.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.build.lock", ".o.lock", ".tmp-other-x", "o"]

