"""A Prefect flow run left RUNNING by a killed lancet process is marked Crashed when the next lancet flow starts
(flows/runs.py); runs of live processes, of other hosts and without lancet's tag are left alone."""

from __future__ import annotations

import socket
import subprocess
import sys

from flows.runs import claim_flow_run, process_tag
from tasks.tracking import process_identity


def test_a_flow_run_left_running_by_a_killed_process_is_marked_crashed(prefect_harness):
    from prefect import flow, get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    @flow(name="reap-probe")
    def probe() -> tuple[str, list[str]]:
        return flow_run.get_id(), claim_flow_run()

    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ident = process_identity(child.pid)
    with get_client(sync_client=True) as c:
        def running(*tags):
            return str(c.create_flow_run(probe, tags=list(tags), state=Running()).id)

        dead = running(f"lancet.process:{host}/{ident}", "user-tag")
        alive = running(process_tag())
        elsewhere = running(f"lancet.process:another-host/{ident}")
        untagged = running()  # not lancet's: left alone
    child.kill()  # kill -9: the flow run it "ran" never reports a final state
    child.wait()
    me, reaped = probe()
    assert reaped == [dead]
    with get_client(sync_client=True) as c:
        runs = {r: c.read_flow_run(r) for r in (dead, alive, elsewhere, untagged, me)}
    states = {r: run.state.type.value for r, run in runs.items()}
    assert states == {dead: "CRASHED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING", me: "COMPLETED"}
    assert "ended without reporting a final state" in runs[dead].state.message
    assert "user-tag" in runs[dead].tags
    assert process_tag() in runs[me].tags  # the new run names its own process
