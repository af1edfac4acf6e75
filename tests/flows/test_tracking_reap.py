"""A run left RUNNING by a killed lancet process is marked KILLED the next time lancet opens a run on that store."""

from __future__ import annotations

import socket
import subprocess
import sys

from mlflow.tracking import MlflowClient

from tasks.tracking import configure, open_realign_run, process_identity


def test_a_run_left_running_by_a_killed_process_is_marked_killed(tmp_path):
    uri, host = f"sqlite:///{tmp_path}/mlflow.db", socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ident = process_identity(child.pid)
    assert ident and ident.split(":")[1] == str(child.pid) and process_identity(child.pid) == ident
    configure(uri, "exp")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp").experiment_id
    dead = client.create_run(exp, tags={"lancet.host": host, "lancet.process": ident}).info.run_id
    alive = client.create_run(exp, tags={"lancet.host": host, "lancet.process": process_identity()}).info.run_id
    elsewhere = client.create_run(exp, tags={"lancet.host": "another-host", "lancet.process": ident}).info.run_id
    untagged = client.create_run(exp).info.run_id  # not lancet's (or from before this existed): left alone
    child.kill()  # kill -9: the run it "owned" is never closed
    child.wait()
    assert process_identity(child.pid) != ident
    new = open_realign_run.fn(flow_run_id=None, params={"a": 1}, tracking_uri=uri, experiment="exp")
    status = {r: client.get_run(r).info.status for r in (dead, alive, elsewhere, untagged, new)}
    assert status == {dead: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING", new: "RUNNING"}
    assert "ended without closing the run" in client.get_run(dead).data.tags["lancet.error"]
    assert client.get_run(new).data.tags["lancet.process"] == process_identity()
