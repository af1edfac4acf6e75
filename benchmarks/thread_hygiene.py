"""Thread hygiene: `lancet index` on the demo, idle and beside a one-core CPU hog; prints ONE JSON object.

    .venv/bin/python benchmarks/thread_hygiene.py                          # the policy's default threads
    .venv/bin/python benchmarks/thread_hygiene.py --threads 1 2            # compare explicit settings
    .venv/bin/python benchmarks/thread_hygiene.py --demo .lancet/demo      # an existing demo (else built first)

For each thread setting (`default`: no --threads, lancet_core/threads.py decides), two runs of
`lancet -v index <demo corpus> <demo model>`, each in a fresh work dir and a fresh PREFECT_HOME (nothing cached):
"idle" (nothing of ours beside it), then "busy" beside a hog (a subprocess spinning `while ...: pass` on one core,
bounded in time and killed at the end). The child's environment has no OMP_NUM_THREADS / LANCET_THREADS, so the
policy's default is what runs. Stage times come from the run's own log lines (their timestamps):

  startup        process start -> the CLI's first line after its imports and input checks
  prefect_server -> the temporary Prefect server is up (the first flow run begins)
  tokenize       the tokenize flow
  basis          the index flow's plan: model load and the PCA projection basis (torch passes + numpy eigh)
  shards         the per-example gradients of every shard (torch)
  finalize       factor reduction and curvature, to the end of the index flow
  total          the whole process, wall clock

Reported per setting: each stage's seconds idle and busy and the ratio busy / idle (goal: every stage <= 2), plus the
machine (CPU from lscpu, CPUs available) and the load average before each run: on a shared machine the "idle" run
is only as idle as the neighbours let it be, so read the ratios with the load beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANCET = str(Path(sys.executable).parent / "lancet")
STAGES = ("startup", "prefect_server", "tokenize", "basis", "shards", "finalize", "total")
_TS = re.compile(r"^.*?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown"


def _events(stderr: str) -> list[tuple[float, str, str]]:
    """(epoch seconds, logger, message) of every timestamped log line (progress bars may share a line: the regex
    takes the timestamp wherever the line's log record starts)."""
    out = []
    for raw in stderr.replace("\r", "\n").splitlines():
        m = _TS.match(raw)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((t, m.group(3), m.group(4)))
    return out


def stage_times(stderr: str, t_start: float, t_end: float) -> dict[str, float]:
    ev = _events(stderr)

    def first(pred, after: float = 0.0) -> float:
        return next(t for t, name, msg in ev if t >= after and pred(name, msg))

    def last(pred) -> float:
        return [t for t, name, msg in ev if pred(name, msg)][-1]

    t_cli = first(lambda n, m: n == "lancet" and m.startswith("index: window"))
    t_tok = first(lambda n, m: "Beginning flow run" in m and "'tokenize'" in m)
    t_tok_end = first(lambda n, m: n == "prefect.flow_runs" and m.startswith("Finished"), t_tok)
    t_idx = first(lambda n, m: "Beginning flow run" in m and "'index'" in m)
    t_plan = first(lambda n, m: n == "lancet_core.index.build" and "shards to compute" in m)
    t_shards = last(lambda n, m: n == "lancet_core.index.build" and m.startswith("shard "))
    t_idx_end = first(lambda n, m: n == "prefect.flow_runs" and m.startswith("Finished"), t_shards)
    times = {"startup": t_cli - t_start, "prefect_server": t_tok - t_cli, "tokenize": t_tok_end - t_tok,
             "basis": t_plan - t_idx, "shards": t_shards - t_plan, "finalize": t_idx_end - t_shards,
             "total": t_end - t_start}
    return {k: round(v, 2) for k, v in times.items()}


def run_index(demo: Path, threads: int | None, scratch: Path) -> dict:
    work, home = Path(tempfile.mkdtemp(dir=scratch)), Path(tempfile.mkdtemp(dir=scratch))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LANCET_THREADS", "MKL_NUM_THREADS",
                                                             "OPENBLAS_NUM_THREADS")}
    env["PREFECT_HOME"] = str(home)  # a fresh Prefect home: no result cached by an earlier run answers for this one
    argv = [LANCET, "-v", "index", str(demo / "corpus.jsonl"), str(demo / "model"), "--work-dir", str(work)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    load = os.getloadavg()[0]
    t0 = time.time()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=scratch)
    t1 = time.time()
    if p.returncode != 0:
        raise RuntimeError(f"lancet index failed ({p.returncode}):\n{p.stderr[-3000:]}")
    policy = next((m for _, n, m in _events(p.stderr) if m.startswith("threads: ")), None)
    return {"stages_s": stage_times(p.stderr, t0, t1), "load_before": round(load, 2), "policy": policy,
            "load_after": round(os.getloadavg()[0], 2)}


def start_hog(seconds: float) -> subprocess.Popen:
    """One core kept busy: a Python loop spinning until `seconds` have passed (or it is killed)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=None, help="a built demo directory (default: build one in a temp dir)")
    ap.add_argument("--threads", nargs="+", default=["default"],
                    help="settings to compare: 'default' (the policy) and/or integers (default: default)")
    ap.add_argument("--hog-seconds", type=float, default=900, help="upper bound of the hog's life (killed earlier)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lancet-threads-"))
    try:
        demo = args.demo
        if demo is None:
            demo = scratch / "demo"
            subprocess.run([LANCET, "demo", "--out", str(demo)], check=True, capture_output=True, cwd=scratch)
        out = {"benchmark": "thread_hygiene", "cpu": cpu_name(), "cpu_count": os.cpu_count(),
               "cpus_available": len(os.sched_getaffinity(0)), "demo": str(demo),
               "command": "lancet -v index <demo>/corpus.jsonl <demo>/model --work-dir <fresh> [--threads N]",
               "goal": "every stage busy/idle <= 2", "settings": {}}
        for setting in args.threads:
            threads = None if setting == "default" else int(setting)
            idle = run_index(demo, threads, scratch)
            hog = start_hog(args.hog_seconds)
            try:
                time.sleep(1.0)  # the hog is spinning before lancet starts
                busy = run_index(demo, threads, scratch)
            finally:
                hog.kill()
                hog.wait()
            ratio = {k: round(busy["stages_s"][k] / max(idle["stages_s"][k], 0.05), 2) for k in STAGES}
            out["settings"][setting] = {"policy": idle["policy"], "idle": idle, "busy": busy, "busy_over_idle": ratio,
                                        "worst_stage": max(ratio, key=ratio.get),
                                        "goal_met": all(v <= 2.0 for v in ratio.values())}
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
