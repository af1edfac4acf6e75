"""The CLI's temporary Prefect server, which never outlives the CLI.

Without PREFECT_API_URL, Prefect runs a flow against a temporary API server: a uvicorn child process it stops at
exit (atexit). A `kill -9` of the CLI skips atexit, and the server kept running, holding its port and database, for
ever. `start_temporary_server()` starts that same server (Prefect's singleton `SubprocessASGIServer()`, which its
clients then use) before a command's flow runs, and first a small watchdog process that notes the CLI's children
running Prefect's server app (so a kill during the server's start-up is covered too): when the CLI is gone — the
watchdog is re-parented — it stops those still running (SIGTERM, then SIGKILL after 5 s) and exits; after a normal
exit there is nothing left to stop. Called after a command's input checks, so a refused input still fails in seconds.

Knows about Prefect's temporary server and Linux processes; nothing about lancet's flows.
"""

from __future__ import annotations

import os
import subprocess
import sys

# the watchdog: argv = the CLI's pid. It notes the CLI's children that run Prefect's server app, and once the CLI is
# gone (the watchdog is re-parented: robust to a zombie CLI and to PID reuse) stops them and exits.
_WATCHDOG = r"""
import os, signal, sys, time
cli, APP = int(sys.argv[1]), b"prefect.server.api.server:create_app"

def servers(parent=None):
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        # APP as a whole argument (uvicorn's factory), never inside one (this script's own -c text)
        if fields[0] not in (b"Z", b"X") and APP in cmd.split(b"\0") and (parent is None or int(fields[1]) == parent):
            out.add(int(d))
    return out

seen = set()
while os.getppid() == cli:
    seen |= servers(cli)
    time.sleep(0.25)
left = seen & servers()
for pid in left:
    os.kill(pid, signal.SIGTERM)
for _ in range(50):
    if not seen & servers():
        break
    time.sleep(0.1)
for pid in seen & servers():
    os.kill(pid, signal.SIGKILL)
"""


def start_temporary_server() -> int | None:
    """Start Prefect's temporary API server now, guarded by a watchdog; returns the server's pid, or None when
    PREFECT_API_URL names a server (nothing to start) or the platform has no /proc (no guard: Prefect starts its
    server itself, as before)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not os.path.isdir("/proc/self"):
        return None
    from prefect.server.api.server import SubprocessASGIServer

    # the watchdog first: a kill while the server starts up (seconds to a minute on a busy machine) is covered too
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = SubprocessASGIServer()  # the singleton Prefect's own clients ask for: they will use this one
    server.start()
    return server.server_process.pid
