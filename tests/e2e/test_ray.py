"""End to end on a real Ray cluster: `ray start --head` on 127.0.0.1 plus a second node process (`ray start
--address`), the gradient store built through the index flow with prefect-ray's RayTaskRunner, one Prefect task per
shard. Checked: the store is byte-identical to the serial in-process build on as many torch threads as a Ray task
gets (1) (same manifest shard entries and digests,
same shard and Kronecker-factor files); a `kill -9` of a Ray worker process computing a shard loses only that shard
(the run fails naming it, the finished shards are in the manifest), and the re-run recomputes only the lost shard(s)
and gives the identical store. Every process started here is stopped by PID (and checked gone)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from lancet_core.index.build import build_gradient_store
from lancet_core.index.config import IndexConfig
from tests.core.index.test_gradient_store import make_model_dir, write_tokens

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
CFG = IndexConfig(proj_in_dim=4, proj_out_dim=3, dtype="float16", batch_size=4, response_tokens=4, rows_per_shard=10,
                  curvature=("kfac",))
N_ROWS = 60  # 6 shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _family(procs: list[subprocess.Popen]) -> set[int]:
    """PIDs of the processes started here and of everything in their sessions (Ray's daemons and workers)."""
    roots = {p.pid for p in procs}
    out = set(roots)
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in roots:
                out.add(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # `ray start --block` stops its node's processes on SIGTERM
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    deadline = time.time() + 20
    while (left := _family(procs) - {p.pid for p in procs}) and time.time() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not left, f"processes left running: {sorted(left)}"


def _files(store: Path) -> dict[str, bytes]:
    """Every data file of the store: shards, the PCA basis, per-shard factor sums and the built curvatures."""
    files = sorted(store.glob("shard-*.parquet")) + sorted(store.rglob("*.npz"))
    assert any(p.parent.name == "curvature" for p in files)  # the built curvature is among them
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in files}


def _shard_entries(store: Path) -> list[dict]:
    return json.loads((store / "manifest.json").read_text())["shards"]


@pytest.fixture
def ray_cluster(monkeypatch):
    """A head node and a second node, 1 CPU each, on this machine (Ray turns 127.0.0.1 into the machine's address; a
    short temp dir: Ray's socket paths are limited). The cluster uses token authentication, as Ray 2.60 clusters do
    by default: the fixture makes its own token in its temp dir and hands it to every process (the nodes, this
    driver, Ray's workers) through RAY_AUTH_TOKEN_PATH, never reading or writing ~/.ray (a fresh machine has none)."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="lray", dir="/tmp")
    token = Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    for k, v in auth.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)  # it would take precedence over the file
    env = {**os.environ, **auth, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = open(Path(tmp) / "head.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([str(RAY), "start", "--head", "--port", str(port), "--include-dashboard",
                                       "false", "--temp-dir", tmp, *common], env=env, stdout=log, stderr=log,
                                      start_new_session=True))
        import ray

        deadline = time.time() + 60
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING", log_to_driver=False)
                break
            except Exception:
                if time.time() > deadline or procs[0].poll() is not None:
                    raise
                time.sleep(1)
        log = open(Path(tmp) / "worker.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([str(RAY), "start", "--address", f"127.0.0.1:{port}", *common], env=env,
                                      stdout=log, stderr=log, start_new_session=True))
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline + 60 and procs[1].poll() is None, "the second Ray node did not join"
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "worker_node": procs[1], "procs": procs}
    finally:
        import ray

        ray.shutdown()
        _stop_all(procs)
        for log in logs:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_first_shard_worker(node: subprocess.Popen, killed: list, stop: threading.Event) -> None:
    """kill -9 the first Ray worker process on `node` seen running an index_shard task."""
    while not stop.is_set():
        for p in psutil.Process(node.pid).children(recursive=True):
            try:
                if p.cmdline() and p.cmdline()[0].startswith("ray::index_shard"):
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.02)


def test_ray_build_is_byte_identical_and_loses_only_a_killed_shard(ray_cluster, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.index import index_flow
    from tasks.index import ShardsLost

    model = make_model_dir(tmp_path / "model")
    tokens, *_ = write_tokens(tmp_path / "tokens.parquet", n=N_ROWS)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task (1 CPU): torch's float32 reductions depend on the thread count
    try:
        serial = build_gradient_store(model, tokens, tmp_path / "serial", CFG)
    finally:
        torch.set_num_threads(threads)
    store = tmp_path / "ray"
    addr = ray_cluster["address"]
    with prefect_test_harness(server_startup_timeout=90):
        killed: list[int] = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_first_shard_worker, args=(ray_cluster["worker_node"], killed, stop))
        killer.start()
        try:
            with pytest.raises(ShardsLost, match=r"1 of 6 shard\(s\) failed") as lost:
                index_flow(str(model), str(tokens), str(store), CFG, runner="ray", ray_address=addr)
        finally:
            stop.set()
            killer.join()
        assert killed, "no shard worker was seen running on the second node"
        assert "WorkerCrashedError" in str(lost.value) or "died" in str(lost.value)
        kept = _shard_entries(store)
        assert len(kept) == 5 and not json.loads((store / "manifest.json").read_text())["complete"]
        kept_mtimes = {e["file"]: (store / e["file"]).stat().st_mtime_ns for e in kept}

        t0 = time.time()
        index_flow(str(model), str(tokens), str(store), CFG, runner="ray", ray_address=addr)
        rerun_s = time.time() - t0
    # identical to the serial build, byte for byte: manifest shard entries (digests) and every shard / factor file
    assert _shard_entries(store) == _shard_entries(serial)
    assert _files(store) == _files(serial)
    assert json.loads((store / "manifest.json").read_text())["complete"]
    # only the lost shard was recomputed: the five recorded ones are the same files, untouched
    assert {f: (store / f).stat().st_mtime_ns for f in kept_mtimes} == kept_mtimes
    recomputed = {e["file"] for e in _shard_entries(store)} - set(kept_mtimes)
    assert len(recomputed) == 1
    print(f"ray e2e: killed worker pid {killed[0]}, recomputed {sorted(recomputed)} in {rerun_s:.1f} s")
