"""What a drift check costs next to a re-alignment, on the demo; prints ONE JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/monitor_cost.py --demo DIR --work /tmp/monitor_cost

Both flows run in this process against Prefect's ephemeral API (started by a warm-up flow before any timing, so
neither pays for it), each in its own fresh work directory holding a copy of the built demo (so neither reuses the
other's cached answers), with one tracking store (a sqlite MLflow created by the realign run, as a deployment has one
already): first the `realign` flow with its defaults (the demo's impure model: tokenize, gradient store, probe
answers, influence, repair, IBO, before/after evaluation, MLflow logging and registration), then the `monitor` flow on
the same model (probe answers judged, one MLflow step; no deployment is started), `--cold` times in fresh work
directories (nothing cached), then once warm (answers cached). Goal: a cold monitor run <= 10 % of a cold realign run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
               "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "TOKENIZERS_PARALLELISM": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a built default demo directory (copied, never written)")
    p.add_argument("--work", default="/tmp/lancet-monitor-cost", help="scratch directory (emptied first)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--cold", type=int, default=3, help="cold monitor runs (each in a fresh work directory)")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    # a private Prefect result store: no cached task result of an earlier run (pointing at deleted files) is reused
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(work / "prefect-results")
    import torch
    from prefect import flow

    from flows.monitor import monitor
    from flows.paths import artifact_dir
    from flows.realign import realign
    from lancet_core.demo.config import DemoConfig

    torch.set_num_threads(args.threads)
    demo = Path(args.demo).resolve()
    cfg = DemoConfig(**json.loads((demo / "manifest.json").read_text())["config"])
    dirs = {}
    for name in ("realign", *(f"monitor{i}" for i in range(args.cold))):
        dirs[name] = work / name
        shutil.copytree(demo, artifact_dir(dirs[name], "demo", cfg.model_dump()))

    @flow(name="warm-up")
    def warm_up() -> int:
        return 1

    warm_up()  # starts the ephemeral API server: paid by neither measurement
    t0 = time.perf_counter()
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    r = realign(work_dir=str(dirs["realign"]), tracking_uri=tracking, demo=cfg)
    realign_s = time.perf_counter() - t0
    colds = []
    for i in range(args.cold):
        t0 = time.perf_counter()
        cold = monitor(work_dir=str(dirs[f"monitor{i}"]), tracking_uri=tracking, use_champion=False,
                       realign_deployment=None, demo=cfg)
        colds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    warm = monitor(work_dir=str(dirs["monitor0"]), tracking_uri=tracking, use_champion=False, realign_deployment=None,
                   demo=cfg)
    monitor_warm_s = time.perf_counter() - t0
    monitor_cold_s = sorted(colds)[len(colds) // 2]  # the median
    out = {"demo": str(demo), "realign_s": round(realign_s, 1), "realign_status": r["status"],
           "realign_harmful_before_after": [r["metrics_before"]["harmful_rate_probes"],
                                            (r.get("metrics_after") or {}).get("harmful_rate_probes")],
           "monitor_cold_s": round(monitor_cold_s, 2), "monitor_cold_runs_s": [round(c, 2) for c in colds],
           "monitor_warm_s": round(monitor_warm_s, 2),
           "monitor_harmful_rate": cold["harmful_rate"], "monitor_by_category": cold["by_category"],
           "monitor_drifted": cold["drifted"], "monitor_last_steps": [cold["step"], warm["step"]],
           "monitor_cold_over_realign": round(monitor_cold_s / realign_s, 4),
           "goal_monitor_le_10pct_of_realign": monitor_cold_s <= 0.10 * realign_s}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
