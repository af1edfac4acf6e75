"""Real servers for the e2e tests: a `prefect server` on a free port (the `servers` fixture in conftest.py), the
`prefect` CLI against it, a process worker, and stopping every process by PID (the worker needs SIGINT after SIGTERM).
Knows nothing about lancet's flows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, log) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGINT, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    log.close()


def prefect(env, *args, timeout=120) -> subprocess.CompletedProcess:
    """`prefect --no-prompt ARGS` from the repository root; asserts it succeeded."""
    p = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"prefect {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p


def start_worker(env, tmp: Path, procs: list, pool: str = "lancet-pool") -> subprocess.Popen:
    """A process worker on `pool`, registered in `procs` so the fixture stops it by PID."""
    log = open(tmp / "worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    procs.append((worker, log))
    return worker


def start_server(tmp: Path, procs: list) -> dict[str, str]:
    """A `prefect server` on a free port with its home, results and a sqlite MLflow under `tmp`; returns the env
    every process of the test uses. Registered in `procs`; waits for /api/health."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "results"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_PROFILES_PATH", None)
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    procs.append((server, log))
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return env
        except OSError as e:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prefect server did not start:\n{(tmp / 'server.log').read_text()}") from e
            time.sleep(1)
