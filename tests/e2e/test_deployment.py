"""End to end with real servers: a `prefect server`, a process worker, the deployment from deployments/prefect.yaml,
`prefect deployment run`, then MLflow's API shows the run's metrics, artifacts and the registered model with its alias.
Every process started here is stopped by PID (the worker needs SIGINT after SIGTERM)."""

from __future__ import annotations

import subprocess

import pytest
from mlflow import MlflowClient

from tests.e2e.servers import BIN, ROOT, prefect, start_worker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NAME = "lancet-e2e"


def test_deployment_run_completes_and_is_tracked(servers, demo_work_dir):
    env, tmp, procs = servers
    prefect(env, "work-pool", "create", "lancet-pool", "--type", "process")
    prefect(env, "deploy", "--prefect-file", "deployments/prefect.yaml", "--all", timeout=300)
    for scheduled in ("realign/weekly", "monitor/daily"):  # only the run this test starts may reach the worker
        prefect(env, "deployment", "schedule", "clear", scheduled, "-y")
    worker = start_worker(env, tmp, procs)
    run = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deployment", "run", "realign/demo", "--watch", "--watch-timeout", "1200",
         "--param", f"work_dir={demo_work_dir}", "--param", f"registered_model_name={NAME}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1300)
    assert run.returncode == 0 and "Completed" in run.stdout, (
        f"{run.stdout}\n{run.stderr}\n--- worker log ---\n{(tmp / 'worker.log').read_text()[-6000:]}")
    assert worker.poll() is None  # the worker is still serving

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("lancet")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.tags["prefect.flow_run_id"] != "local"
    assert r.data.tags["lancet.start_model"].endswith("(as given)")  # realign/demo corrects the model it was given
    for k in ("before.harmful_rate_probes", "after.harmful_rate_probes", "after.nll_benign", "time_recall_s"):
        assert k in r.data.metrics, k
    assert r.data.metrics["after.harmful_rate_probes"] < r.data.metrics["before.harmful_rate_probes"]
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"influence", "plots", "explanation", "pairs", "metrics"} <= top
    mv = client.get_model_version_by_alias(NAME, "candidate")
    assert mv.run_id == r.info.run_id
    assert r.data.tags["lancet.gate"] in ("passed", "failed")
    if r.data.tags["lancet.gate"] == "passed":
        assert client.get_model_version_by_alias(NAME, "champion").version == mv.version
