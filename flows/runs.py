"""Prefect's record of lancet's flow runs: each run names the process that runs it, and a run whose process was
killed is marked Crashed the next time a lancet flow starts against that Prefect API.

A `kill -9` (or the OOM killer, or a power cut) ends a flow's process before Prefect's engine can report a final
state, and the flow run stays RUNNING in the API for ever: in the UI, to the monitor's hysteresis, to a user's
automations. `claim_flow_run()` is the first thing every lancet flow does: it tags its own flow run
`lancet.process:<host>/<process identity>` and marks Crashed every RUNNING flow run carrying such a tag for this host
whose process no longer exists (the identity includes the boot id and the process start time, so a reused pid never
looks alive). Runs of other hosts, of live processes and without the tag (not lancet's) are left alone. The same rule
as MLflow's (`tasks.tracking.reap_abandoned_runs`), for the Prefect side.

Also the monitor's reads of the Prefect API (a deployment's parameters, a flow run's state).

Knows about the Prefect API and Linux process identities; nothing about what a flow computes.
"""

from __future__ import annotations

import logging
import socket
from uuid import UUID

from prefect import get_client
from prefect.runtime import flow_run

from tasks.tracking import gone_pid, process_identity

log = logging.getLogger(__name__)
TAG = "lancet.process:"


def process_tag() -> str | None:
    """`lancet.process:<host>/<identity>` of this process, or None where /proc is not there."""
    ident = process_identity()
    return f"{TAG}{socket.gethostname()}/{ident}" if ident else None


def _gone(tag: str, host: str) -> int | None:
    """The pid named by a process tag of this host whose process is gone, else None."""
    owner, _, ident = tag[len(TAG):].partition("/")
    return gone_pid(ident) if owner == host else None


def claim_flow_run() -> list[str]:
    """Tag the current flow run with this process, then mark Crashed the RUNNING flow runs of lancet processes on
    this host that are gone. Returns the ids marked. Outside a flow run (or without /proc) only reaps / does nothing."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    tag, host, me = process_tag(), socket.gethostname(), flow_run.get_id()
    if tag is None:
        return []
    reaped = []
    with get_client(sync_client=True) as c:
        if me:
            run = c.read_flow_run(UUID(me))
            c.update_flow_run(UUID(me), tags=sorted({*(run.tags or []), tag}))
        running = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))), limit=200)
        for r in running:
            pids = [pid for t in r.tags or [] if t.startswith(TAG) and (pid := _gone(t, host)) is not None]
            if not pids or str(r.id) == me:
                continue
            c.set_flow_run_state(r.id, Crashed(message=f"the lancet process that ran it (pid {pids[0]} on {host}) "
                                               "ended without reporting a final state (killed?); marked Crashed by "
                                               "the next lancet run"), force=True)
            reaped.append(str(r.id))
    if reaped:
        log.warning("prefect: %d flow run(s) left RUNNING by a killed lancet process marked Crashed: %s", len(reaped),
                    ", ".join(reaped))
    return reaped


def deployment_parameters(name: str) -> dict:
    """A deployment's own parameters."""
    with get_client(sync_client=True) as c:
        return dict(c.read_deployment_by_name(name).parameters or {})


def flow_run_state_type(flow_run_id: str) -> str | None:
    """A flow run's state type ('COMPLETED', 'RUNNING', ...), or None when it has no state or was deleted."""
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as c:
            state = c.read_flow_run(UUID(flow_run_id)).state
    except ObjectNotFound:
        return None
    return state.type.value if state else None
