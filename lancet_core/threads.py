"""One thread policy for the whole process: torch's intra-op pool and the BLAS that numpy and scipy use.

Why: both pools size themselves to every core by default. On a shared machine (the normal state of a server) a core
that something else keeps busy makes each parallel region wait for its slowest thread, which the scheduler only runs
part of the time, and OpenBLAS threads spinning after a numpy call steal cycles from torch's threads: measured on the
demo (2 cores, load 2-8, issue 28), `lancet index` took 184 s with the defaults vs 38 s with one thread, its PCA basis
step (numpy eigh between torch passes) 147 s vs 5 s.

The policy (docs/measurements.md "Thread hygiene" has the figures behind the default):
- torch intra-op threads = N, where N is, first found: the `threads` argument (`--threads N` on the CLI), the
  environment variable `LANCET_THREADS`, `OMP_NUM_THREADS` (the user's own setting is respected), else
  `default_threads()`: the CPUs this process may run on (`sched_getaffinity`, capped by `os.cpu_count()`) less one
  left for everything else (the Prefect server, the OS, the neighbours), at least 1. Beside one busy core a run then
  slows down by ≤ 2× instead of 5-30×; on an idle box it costs at most one core's share.
- BLAS (OpenBLAS / BLIS, as loaded by numpy and scipy): 1 thread, always. Its work here is small dense algebra
  between torch passes (eigendecompositions of d × d factors, the PCA basis), where one thread is as fast and never
  oversubscribes. One BLAS thread also makes its results independent of the machine's core count.
- `OMP_NUM_THREADS=N` and `OPENBLAS_NUM_THREADS=1` are exported, so libraries loaded later and child processes
  (Ray workers, subprocesses) start with the same policy.

`apply_thread_policy()` is called once at process start by the CLI (before torch or numpy is imported) and at the
start of every flow (deployments run flows without the CLI); calling it again with the same setting is cheap.
Byte identity of a gradient store's shards holds for a fixed N (float32 reductions depend on it; docs/design.md §4),
so N is deterministic on a given machine: it never depends on the current load.

Pure: knows nothing about Prefect, MLflow or the stages; imports torch only when it is already imported.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

ENV_THREADS = "LANCET_THREADS"
BLAS_THREADS = 1


@dataclass(frozen=True)
class ThreadPolicy:
    torch_threads: int
    blas_threads: int
    source: str  # where torch_threads came from: "--threads", LANCET_THREADS, OMP_NUM_THREADS or "default"

    def describe(self) -> str:
        return (f"threads: torch {self.torch_threads} ({self.source}), BLAS {self.blas_threads}; "
                f"{available_cpus()} CPU(s) available")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's or taskset's limit), capped by the count."""
    count = os.cpu_count() or 1
    try:
        return max(1, min(count, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return count


def default_threads() -> int:
    """torch's default intra-op threads: every available CPU but one (left for everything else), at least 1."""
    return max(1, available_cpus() - 1)


def _positive(text: str | None) -> int | None:
    try:
        n = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def resolve_threads(threads: int | None = None) -> tuple[int, str]:
    """(N, where it came from): the argument, else $LANCET_THREADS, else $OMP_NUM_THREADS, else the default."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads}")
        return threads, "--threads"
    for var in (ENV_THREADS, "OMP_NUM_THREADS"):
        n = _positive(os.environ.get(var))
        if n is not None:
            return n, var
    return default_threads(), "default"


def apply_thread_policy(threads: int | None = None) -> ThreadPolicy:
    """Set torch's intra-op threads to N (see the module docstring) and BLAS to 1, in this process and for what it
    starts. An explicit `threads` is also exported as $LANCET_THREADS, so a flow started by the CLI keeps it."""
    n, source = resolve_threads(threads)
    if threads is not None:
        os.environ[ENV_THREADS] = str(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # torch reads it when it starts; Ray workers and subprocesses inherit it
    for var in ("OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS"):  # read by those libraries when they load
        os.environ[var] = str(BLAS_THREADS)
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    if "numpy" in sys.modules or "scipy" in sys.modules:  # already loaded: their env variables were read before
        _limit_loaded_blas()
    return ThreadPolicy(n, BLAS_THREADS, source)


def _limit_loaded_blas() -> None:
    """Limit the BLAS libraries already loaded (numpy's and scipy's OpenBLAS) to one thread. MKL is left to torch,
    which drives it with its own thread count (torch's wheels link it statically; threadpoolctl does not see it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency (pyproject); without it the environment variables above still apply to new loads
        return
    # by user API: threadpoolctl 3.8 left both scipy-openblas libraries at 2 threads when given
    # limits={"openblas": 1, "blis": 1} (measured on numpy 2.4 + scipy's wheels; the policy test caught it)
    threadpool_limits(limits=BLAS_THREADS, user_api="blas")


def current_threads() -> dict:
    """What the pools are set to now (for benchmarks and logs): torch intra-op threads and each loaded BLAS."""
    out: dict = {"available_cpus": available_cpus()}
    if "torch" in sys.modules:
        import torch

        out["torch"] = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = {f"{i['internal_api']}:{os.path.basename(i['filepath'])}": i["num_threads"]
                       for i in threadpool_info() if i.get("user_api") == "blas"}
    except ImportError:
        pass
    return out
