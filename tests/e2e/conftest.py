"""e2e fixtures: `servers` starts a real Prefect server (tests/e2e/servers.py) and stops every process the test
registered in its list, by PID, in reverse order."""

from __future__ import annotations

import pytest

from tests.e2e.servers import start_server, stop


@pytest.fixture
def servers(tmp_path):
    """(env, tmp_path, procs): append (Popen, log file) to procs for anything else started; all stopped by PID."""
    procs: list = []
    try:
        env = start_server(tmp_path, procs)
        yield env, tmp_path, procs
    finally:
        for p, log in reversed(procs):
            stop(p, log)
