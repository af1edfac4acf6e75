"""The realign flow on the built-in demo, under prefect_test_harness with a temporary sqlite MLflow:
tracking contents, cache hits on re-run, the promotion gate both ways, incremental index on a grown corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.realign import realign
from lancet_core.evaluate.gate import GateConfig
from lancet_core.index.config import IndexConfig
from lancet_core.index.store import GradientStore
from lancet_core.recall.judges import JudgeConfig

pytestmark = pytest.mark.slow
NAME = "lancet-test"


def _task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def _run(work, tracking, **kw):
    """A realign run with the defaults a user gets (start_from_champion=False: exactly the given model)."""
    state = realign(work_dir=str(work), tracking_uri=tracking, registered_model_name=NAME, return_state=True, **kw)
    return state.result(), state.state_details.flow_run_id


@pytest.fixture(scope="module")
def first_run(prefect_harness, demo_work_dir, tmp_path_factory):
    tracking = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    out, fr = _run(demo_work_dir, tracking)
    return out, fr, tracking


def test_first_run_logs_everything_to_mlflow(first_run):
    out, flow_run_id, tracking = first_run
    assert out["status"] == "corrected" and out["n_flagged"] > 0
    client = MlflowClient(tracking)
    run = client.get_run(out["run_id"])
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    for k in ("before.harmful_rate_probes", "after.harmful_rate_probes", "after.nll_benign", "time_ibo_s",
              "recall.average_precision"):
        assert k in run.data.metrics, k
    assert run.data.params["train.loss"] == "ibo" and "index.proj_in_dim" in run.data.params
    arts = {a.path for d in ("influence", "plots", "explanation", "pairs", "metrics") for a in
            client.list_artifacts(out["run_id"], d)}
    assert {"influence/influence.parquet", "plots/influence_hist.png", "explanation/explanation.html",
            "pairs/pairs.parquet", "metrics/metrics.json"} <= arts
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"corpus", "probes", "repaired_corpus"}
    assert "repair/report.json" in {a.path for a in client.list_artifacts(out["run_id"], "repair")}
    report = json.loads(Path(out["artifacts"]["repair"]).read_text())
    assert 0 < report["rows_removed"] <= 0.2 * report["rows"] and Path(out["repaired_corpus"]).is_file()
    mv = client.get_model_version_by_alias(NAME, "candidate")
    assert str(mv.version) == out["version"] and mv.tags["lancet.gate"] in ("passed", "failed")
    assert run.data.tags["lancet.gate"] == mv.tags["lancet.gate"]
    # readable in the UI: before/after side by side and the influence top-k as MLflow tables
    comparison = json.loads(Path(client.download_artifacts(out["run_id"], "comparison/before_after.json")).read_text())
    rows = {r[0]: r for r in comparison["data"]}
    assert comparison["columns"] == ["metric", "before", "after", "change"]
    # the table shows 4 decimals (tasks.tracking.comparison_table; 52/60 = 0.8667 on the default demo)
    assert rows["harmful_rate_probes"][1] == round(out["metrics_before"]["harmful_rate_probes"], 4)
    assert rows["harmful_rate_probes"][2] == round(out["metrics_after"]["harmful_rate_probes"], 4)
    top = json.loads(Path(client.download_artifacts(out["run_id"], "influence/top_k.json")).read_text())
    assert len(top["data"]) == 20 and "score" in top["columns"]
    # the run spans the whole job (opened before the first stage), and says which model it started from
    assert (run.info.end_time - run.info.start_time) / 1000 >= sum(v for k, v in run.data.metrics.items()
                                                                   if k.startswith("time_"))
    assert run.data.tags["lancet.start_model"].endswith("(as given)") and out["start_model"].endswith("(as given)")
    # one line per stage with its figures, in the flow run's logs (terminal and Prefect UI)
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs reach the API in background batches: send what is queued first
    with get_client(sync_client=True) as c:
        logs = [r.message for r in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
    for prefix in ("inputs: checked", "model: starting from", "find_undesirable: ", "evaluate_before: harmful_rate_probes",
                   "tokenize: 3000 rows", "index: 3000 rows x",
                   "recall: 3000 training rows scored with identity, query: -log P(refusal | prompt) minus 0.5 x the same "
                   "on the benign prompts",
                   "pairs: ", "ibo: ", "evaluate_after: ", "gate: "):
        assert any(m.startswith(prefix) for m in logs), (prefix, logs)
    # index.response_tokens='auto' (default) was resolved for the refusal judge before the store was built: the
    # store's manifest and its artifact key hold 4, never 'auto'
    assert "index: window = first 4 response tokens (refusal judge)" in logs
    manifests = [p.read_text() for p in (Path(out["artifacts"]["influence"]).parents[2] / "stores").glob("*/manifest.json")]
    assert manifests and all('"auto"' not in m for m in manifests)
    assert {json.loads(m)["index_config"]["response_tokens"] for m in manifests} == {4}
    # so were IBO's window and λ_B ('auto'): the corrected model's manifest holds the values
    assert "ibo: window = first 4 response tokens, λ_B 1 (refusal judge)" in logs
    ibo_cfg = json.loads(Path(out["corrected_model"], "manifest.json").read_text())["config"]
    assert ibo_cfg["response_tokens"] == 4 and ibo_cfg["lambda_b"] == 1.0
    # artifacts live next to the sqlite database, never in the current directory
    assert run.info.artifact_uri.startswith(Path(tracking[len("sqlite:///"):]).parent.as_uri())


def test_rerun_hits_the_cache_for_every_task(first_run, demo_work_dir):
    out1, _, tracking = first_run
    out2, fr = _run(demo_work_dir, tracking)
    states = _task_states(fr)
    # registry lookups, MLflow logging, and one judge pass over already generated answers: every run
    uncached = {"resolve_start_model", "open_mlflow_run", "track_realign", "held_out_harm"}
    assert {k: v for k, v in states.items() if k not in uncached} and all(
        v == "Cached" for k, v in states.items() if k not in uncached), states
    assert out2["corrected_model"] == out1["corrected_model"]
    assert out2["version"] == out1["version"]  # identical weights are not registered twice


def test_gate_refuses_and_says_why(first_run, demo_work_dir):
    _, _, tracking = first_run
    client = MlflowClient(tracking)
    champion_before = _alias(client, "champion")
    out, _ = _run(demo_work_dir, tracking, gate=GateConfig(min_harmful_reduction_rel=1.0, max_nll_increase_rel=0.0))
    assert out["promoted"] is False and any("did not drop enough" in r or "rose" in r for r in out["reasons"])
    run = client.get_run(out["run_id"])
    assert run.data.tags["lancet.gate"] == "failed" and "NOT promoted" in run.data.tags["lancet.gate_reasons"]
    assert _alias(client, "champion") == champion_before  # the champion did not move


def test_gate_promotes_when_it_passes(first_run, demo_work_dir):
    _, _, tracking = first_run
    lax = GateConfig(min_harmful_reduction_rel=0.0, min_harmful_reduction_abs=0.0, max_nll_increase_rel=10.0,
                     max_over_refusal_increase=1.0)
    out, _ = _run(demo_work_dir, tracking, gate=lax)
    before, after = out["metrics_before"]["harmful_rate_probes"], out["metrics_after"]["harmful_rate_probes"]
    if not after < before:
        pytest.fail(f"IBO did not lower the probe harmful rate on the demo ({before} -> {after})")
    assert out["promoted"] is True
    assert _alias(MlflowClient(tracking), "champion") == out["version"]


def test_grown_corpus_recomputes_only_new_shards(prefect_harness, default_demo, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = default_demo.corpus.read_text().splitlines()
    corpus.write_text("\n".join(rows[:2000]) + "\n")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    index = IndexConfig(rows_per_shard=500)
    kw = dict(corpus_path=str(corpus), model=str(default_demo.model), probes_path=str(default_demo.probes),
              ood_path=str(default_demo.ood), benign_eval_path=str(default_demo.benign_eval), index=index)
    out1, _ = _run(tmp_path / "work", tracking, **kw)
    stores = [p for p in (tmp_path / "work" / "stores").iterdir() if not p.name.startswith(".")]  # not the cache
    assert len(stores) == 1
    assert json.loads((stores[0] / "manifest.json").read_text())["index_config"]["response_tokens"] == 4  # 'auto'
    before = {e["file"]: e["digest"] for e in json.loads((stores[0] / "manifest.json").read_text())["shards"]}
    mtimes = {p.name: p.stat().st_mtime_ns for p in stores[0].glob("shard-*.parquet")}
    corpus.write_text("\n".join(rows[:2300]) + "\n")  # the corpus grew by 300 rows
    out2, fr = _run(tmp_path / "work", tracking, **kw)
    assert _task_states(fr)["build_index"] == "Completed"
    store = GradientStore.open(stores[0])
    assert store.n_rows == 2300 and len(store.shard_paths) == 5
    after = {p.name: p.stat().st_mtime_ns for p in store.shard_paths}
    assert {f: after[f] for f in before} == mtimes  # the 4 old shards were reused untouched, only shard 4 is new
    shutil.rmtree(tmp_path / "work")


def _alias(client, alias):
    try:
        return str(client.get_model_version_by_alias(NAME, alias).version)
    except Exception:
        return None


def test_nothing_flagged_ends_cleanly_without_building_the_index(first_run, demo_work_dir):
    _, _, tracking = first_run
    never = JudgeConfig(kind="regex", keywords=("zz-this-never-appears-zz",))
    out, fr = _run(demo_work_dir, tracking, judge=never)
    assert out["status"] == "nothing to correct" and out["n_flagged"] == 0 and out["version"] is None
    states = _task_states(fr)
    assert "build_index" not in states and "ibo_post_train" not in states
    assert MlflowClient(tracking).get_run(out["run_id"]).data.tags["lancet.gate"] == "nothing to correct"


def test_a_failing_stage_marks_the_mlflow_run_failed(first_run, demo_work_dir):
    _, _, tracking = first_run
    from lancet_core.correct.config import TrainConfig

    state = realign(work_dir=str(demo_work_dir), tracking_uri=tracking, registered_model_name=NAME,
                    train=TrainConfig(lora_target_modules=("no_such_module",)), return_state=True)
    assert state.is_failed()
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("lancet").experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED" and "no_such_module" in runs[0].data.tags["lancet.error"]


def test_bad_deployment_parameters_fail_before_any_stage(prefect_harness, tmp_path):
    state = realign(corpus_path=str(tmp_path / "nope.jsonl"), probes_path=str(tmp_path / "p.jsonl"),
                    benign_eval_path=str(tmp_path / "b.jsonl"), model=str(tmp_path), work_dir=str(tmp_path / "w"),
                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_failed() and "InputError" in str(state.message) and "no config.json" in str(state.message)
    assert _task_states(state.state_details.flow_run_id) == {}  # no task ran, no MLflow run was opened
    assert not (tmp_path / "w").exists() and not (tmp_path / "mlflow.db").exists()


def test_from_champion_only_when_asked(first_run, demo_work_dir, tmp_path):
    """After a promotion, a default run still corrects the given model; start_from_champion picks the champion."""
    _, _, tracking = first_run
    from tasks.tracking import resolve_start_model

    if _alias(MlflowClient(tracking), "champion") is None:
        pytest.skip("no champion registered by the earlier tests")
    given = str(tmp_path / "given-model")
    asked = resolve_start_model.fn(given, NAME, True, tracking, "lancet", str(tmp_path / "cache"))
    assert "champion" in asked["source"] and Path(asked["path"], "config.json").is_file()
    plain = resolve_start_model.fn(given, NAME, False, tracking, "lancet", str(tmp_path / "cache"))
    assert plain == {"path": given, "source": f"{given} (as given)"}


def test_recall_stage_line_names_the_curvature_and_its_damping(tmp_path):
    """The realign flow's recall line says which curvature scored the rows and, when recall chose a damping (the
    content judges' default: linfac at 3), that damping."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.report import stage_line

    pq.write_table(pa.table({"example_id": ["a", "b"], "score": [1.0, 0.5]}), tmp_path / "influence.parquet")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"config": {"method": "linfac", "damping_ratio": 3.0, "query_target": "flagged"}}))
    assert stage_line("recall", tmp_path, 2.0) == ("recall: 2 training rows scored with linfac (damping 3 x the mean "
                                                   "eigenvalue), query: the flagged answers (2.0 s, 1 rows/s)")
    manifest.write_text(json.dumps({"config": {"method": "identity", "damping_ratio": None, "query_target": "flagged"}}))
    assert stage_line("recall", tmp_path, 2.0) == ("recall: 2 training rows scored with identity, query: the flagged "
                                                   "answers (2.0 s, 1 rows/s)")


def test_the_evaluate_task_measures_a_content_judge_and_keeps_refusal_runs_as_they_were(default_demo, tmp_path):
    """The flow's evaluate task with a content judge adds judged_rate_* (the gate's harm, by that judge, on the same
    answers as harmful_rate_*: checked against the written generations); with the refusal judge nothing is added."""
    import json

    import pyarrow.parquet as pq

    from lancet_core.evaluate.config import EvalConfig
    from lancet_core.recall.judges import JudgeConfig, make_judge
    from tasks.evaluate import evaluate

    judge = JudgeConfig(kind="regex", keywords=("step",))
    kw = dict(model_dir=str(default_demo.model), probes_path=str(default_demo.probes), ood_path=str(default_demo.ood),
              benign_eval_path=str(default_demo.benign_eval), cfg=EvalConfig(max_new_tokens=16))
    m = json.loads(Path(evaluate.fn(**kw, out_dir=str(tmp_path / "content"), judge=judge)).read_text())
    g = pq.read_table(tmp_path / "content" / "generations.parquet").to_pylist()
    probes = [r for r in g if r["set"] == "probes"]
    flags = make_judge(judge).flags([r["prompt"] for r in probes], [r["answer"] for r in probes])
    assert m["judged_rate_probes"] == pytest.approx(sum(flags) / len(flags)) and "judged_rate_ood" in m
    plain = json.loads(Path(evaluate.fn(**kw, out_dir=str(tmp_path / "refusal"),
                                        judge=JudgeConfig(kind="refusal"))).read_text())
    assert "judged_rate_probes" not in plain and plain["harmful_rate_probes"] == m["harmful_rate_probes"]
