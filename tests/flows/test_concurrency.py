"""Concurrent runs on one work dir and one tracking store (issue 28, item 1), in real separate processes:
- identical artifacts published at the same moment by several processes: every process succeeds and finds ONE
  complete copy (manifest.publishing_dir, the one publishing mechanism);
- two IBO trainings of the same model into the same folder, released to publish at the same moment: both succeed
  (the failure was `OSError: [Errno 39] Directory not empty` from the trainer's own atomic save);
- processes creating a brand-new sqlite MLflow store at once: all succeed (the failure was alembic's 'Online
  migration expected to match one row'; measured 4 of 4 trials failing with 3 processes and no lock, 0 of 4 with it).
"""

from __future__ import annotations

import multiprocessing as mp
from contextlib import contextmanager
from pathlib import Path

import pytest

from lancet_core.manifest import artifact_problems, read_manifest

N = 4


def _publish_same(out: str, barrier, q) -> None:
    """Build an identical artifact, wait until every process has built its own, then publish."""
    try:
        from lancet_core.manifest import publishing_dir, write_manifest

        with publishing_dir(out, {"kind": "same", "inputs": "sha256:0"}) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "data.bin").write_bytes(b"\x01" * 5000)
            (tmp / "note.txt").write_text("identical\n")
            write_manifest(tmp, {"kind": "same", "inputs": "sha256:0", "built_by": str(tmp)})
            barrier.wait(timeout=60)
        q.put(("ok", str(tmp)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("error", f"{type(e).__name__}: {e}"))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def _run_all(target, args_of, n: int, timeout: float = 240) -> list[tuple[str, str]]:
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(i), barrier, q)) for i in range(n)]
    for p in procs:
        p.start()
    got = [q.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return got


def test_identical_artifacts_published_at_once_leave_one_copy(tmp_path):
    out = tmp_path / "work" / "models" / "5ecd9b3ccd5a"
    got = _run_all(_publish_same, lambda i: (str(out),), N)
    assert [s for s, _ in got] == ["ok"] * N, got
    assert not artifact_problems(out)
    m = read_manifest(out)
    assert m["complete"] is True and set(m["contents"]) == {"note.txt", "sub/data.bin"}
    assert m["built_by"] in {t for _, t in got}  # one process's copy, whole
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == [out.name]
    assert _leftovers(out.parent) == []


def _train(model_dir: str, pairs: str, retain: str, out: str, barrier, q) -> None:
    """post_train into `out`, every process released to publish at the same moment (the barrier sits inside the
    trainer's publishing block, after the model is saved to its temporary directory)."""
    try:
        import torch

        import lancet_core.correct.trainer as trainer
        from lancet_core.correct.config import TrainConfig

        torch.set_num_threads(1)
        real = trainer.publishing_dir

        @contextmanager
        def released_together(*a, **k):
            with real(*a, **k) as tmp:
                yield tmp
                barrier.wait(timeout=180)

        trainer.publishing_dir = released_together
        cfg = TrainConfig(max_steps=2, batch_size=2, lambda_b=0.5, response_tokens=None, device="cpu",
                          max_seq_len_tokens=64, retain_batch_size=2)
        got = trainer.post_train(model_dir, pairs, retain, out, cfg, show_progress=False)
        q.put(("ok", str(got)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.slow
def test_two_trainings_of_one_model_publish_one_copy(tmp_path):
    """The issue's realign failure, at its cause: two runs training the same IBO model into the same content-addressed
    folder. ~30 s on a loaded 2-core box (two fresh interpreters importing torch and transformers)."""
    import pyarrow as pa

    from lancet_core.correct.config import PairConfig
    from lancet_core.correct.pairs import build_pairs, write_pair_tables
    from tests.conftest import make_tiny_gpt2
    from tests.core.correct.test_trainer import BENIGN, SAFE, UNSAFE

    model = make_tiny_gpt2(tmp_path / "model")
    rows = [(f"u{i}", 10.0 - i, p, r) for i, (p, r) in enumerate(UNSAFE)]
    rows += [(f"s{i}", -10.0 + 0.5 * i, p, r) for i, (p, r) in enumerate(SAFE)]
    rows += [(f"b{i}", 0.01 * (i - 3), p, r) for i, (p, r) in enumerate(BENIGN)]
    table = pa.table({"example_id": [r[0] for r in rows], "score": [r[1] for r in rows],
                      "prompt": [r[2] for r in rows], "response": [r[3] for r in rows]})
    pairs, retain = build_pairs(table, PairConfig(n_positive=4, n_negative=4, n_retain=4, retain_pool_fraction=1.0,
                                                  positive_fraction=1.0))
    pf = write_pair_tables(tmp_path / "pairs", pairs, retain, {"influence_digest": "sha256:test"})
    out = tmp_path / "work" / "models" / "5ecd9b3ccd5a"
    got = _run_all(_train, lambda i: (str(model), str(pf.pairs_path), str(pf.retain_path), str(out)), 2)
    assert [s for s, _ in got] == ["ok", "ok"], got
    assert {p for _, p in got} == {str(out)}
    assert not artifact_problems(out) and (out / "model.safetensors").is_file()
    assert _leftovers(out.parent) == []


def _open_store(uri: str, barrier, q) -> None:
    try:
        barrier.wait(timeout=120)
        from tasks.tracking import configure, start_run

        configure(uri, "lancet")
        q.put(("ok", start_run("lancet", None, {"a": 1}, {})))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("error", f"{type(e).__name__}: {str(e)[:300]}"))


@pytest.mark.slow
def test_processes_creating_a_fresh_sqlite_tracking_store_at_once_all_succeed(tmp_path):
    """~40 s on a loaded 2-core box: three fresh interpreters importing MLflow."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    got = _run_all(_open_store, lambda i: (uri,), 3)
    assert [s for s, _ in got] == ["ok"] * 3, got
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lancet")
    assert len(client.search_runs([exp.experiment_id])) == 3


def _register_then_download(uri: str, model_dir: str, cache_dir: str, barrier, q) -> None:
    try:
        import mlflow

        from tasks.tracking import configure, log_and_register_model, resolve_model

        configure(uri, "lancet")
        barrier.wait(timeout=120)
        with mlflow.start_run():
            version = log_and_register_model(model_dir, "concurrent")
        barrier.wait(timeout=120)
        q.put(("ok", (version, str(resolve_model(f"models:/concurrent/{version}", cache_dir)))))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("error", f"{type(e).__name__}: {str(e)[:300]}"))


@pytest.mark.slow
def test_identical_models_registered_and_downloaded_at_once_are_one_version_one_copy(tmp_path):
    """Two runs that corrected the model identically register it at the same moment: one version, both told so;
    then both resolve that version's `models:/` URI into one work dir at once: one complete copy."""
    from mlflow import MlflowClient

    from tests.conftest import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "model")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = tmp_path / "work" / "models"
    got = _run_all(_register_then_download, lambda i: (uri, str(model), str(cache)), 2)
    assert [s for s, _ in got] == ["ok", "ok"], got
    (v1, p1), (v2, p2) = (g for _, g in got)
    assert v1 == v2 and p1 == p2
    assert len(MlflowClient(tracking_uri=uri).search_model_versions("name = 'concurrent'")) == 1
    assert not artifact_problems(p1) and (Path(p1) / "config.json").is_file()
    assert _leftovers(cache) == []


def _log_same_dataset(uri: str, data: str, barrier, q) -> None:
    try:
        import mlflow

        from tasks.tracking import configure, log_dataset

        configure(uri, "lancet")
        with mlflow.start_run():
            barrier.wait(timeout=120)
            for i in range(5):  # five datasets, each logged by every process at the same moment
                log_dataset(data, f"corpus-{i}", f"sha256:{i:064d}", context="corpus")
        q.put(("ok", None))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("error", f"{type(e).__name__}: {str(e)[:300]}"))


@pytest.mark.slow
def test_runs_logging_the_same_dataset_at_once_all_succeed(tmp_path):
    """4 realigns at once on one store failed once in CI: MLflow looks a dataset up, then inserts it, and the second
    of two concurrent inserts hit the unique key. tasks.tracking.log_dataset retries; every run links every dataset."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    got = _run_all(_log_same_dataset, lambda i: (uri, str(data)), N)
    assert [s for s, _ in got] == ["ok"] * N, got
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("lancet").experiment_id])
    assert len(runs) == N and all(len(r.inputs.dataset_inputs) == 5 for r in runs)
