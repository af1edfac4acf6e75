"""End to end with real servers: a `prefect server`, a process worker, the deployment from deployments/prefect.yaml,
`prefect deployment run`, then MLflow's API shows the run's metrics, artifacts and the registered model with its alias.
Every process started here is stopped by PID (the worker needs SIGINT after SIGTERM)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NAME = "lancet-e2e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, log) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGINT, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    log.close()


def _prefect(env, *args, timeout=120) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"prefect {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture
def servers(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_PROFILES_PATH", None)
    procs = []
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    procs.append((server, server_log))
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError as e:
                if server.poll() is not None or time.time() > deadline:
                    log = (tmp_path / "server.log").read_text()
                    raise RuntimeError(f"prefect server did not start:\n{log}") from e
                time.sleep(1)
        yield env, tmp_path, procs
    finally:
        for p, log in reversed(procs):
            _stop(p, log)


def test_deployment_run_completes_and_is_tracked(servers, demo_work_dir):
    env, tmp, procs = servers
    _prefect(env, "work-pool", "create", "lancet-pool", "--type", "process")
    _prefect(env, "deploy", "--prefect-file", "deployments/prefect.yaml", "--all", timeout=300)
    worker_log = open(tmp / "worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "lancet-pool"], cwd=ROOT, env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT)
    procs.append((worker, worker_log))
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
