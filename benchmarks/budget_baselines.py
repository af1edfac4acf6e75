"""IBO and the baselines (GA, NPO, DPO on the same pairs) at the same utility budget; prints ONE JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget_baselines.py --work-dir /tmp/readme-run          # the demo
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget_baselines.py --work-dir /tmp/bd/seed0/run/w \\
        --config /tmp/bd/seed0/judge.yaml --inputs /tmp/bd/seed0                                          # backdoor bed

Each loss runs `lancet realign` with every default except `train.loss` (budget-driven training included: the gate's
+5 % NLL / +5 points over-refusal, the same check prompts, the same pairs), in the same work dir, so the recall and
pairs stages come from the cache and only post-training and evaluation run again. `--inputs DIR` takes model/,
corpus.jsonl, probes.jsonl, ood.jsonl, benign_eval.jsonl from DIR (default: the built-in demo). Per loss: the curve
(step, harmful rate on the check prompts, budget used), the kept step and why training stopped, the evaluation after
(probe / OOD harmful, over-refusal, NLL), the harmful rate on the flagged prompts no check saw, and the gate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

LOSSES = ("ibo", "npo", "ga", "dpo")


def run_one(loss: str, args) -> dict:
    base = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    cfg = {**base, "train": {**(base.get("train") or {}), "loss": loss}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    cmd = [str(Path(sys.executable).with_name("lancet")), "realign", "--config", f.name, "--work-dir", args.work_dir,
           "--tracking-uri", f"sqlite:///{Path(args.work_dir).resolve()}/baselines-mlflow.db", "--json"]
    if args.inputs:
        d = Path(args.inputs)
        cmd += ["--model", str(d / "model"), "--corpus", str(d / "corpus.jsonl"), "--probes", str(d / "probes.jsonl"),
                "--ood", str(d / "ood.jsonl"), "--benign-eval", str(d / "benign_eval.jsonl")]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - t0
    os.unlink(f.name)
    if p.returncode != 0:
        return {"loss": loss, "error": p.stderr.strip().splitlines()[-1:], "seconds": round(seconds, 1)}
    out = json.loads(p.stdout)
    man = json.loads((Path(out["corrected_model"]) / "manifest.json").read_text())
    b = man.get("budget") or {}
    mb, ma = out["metrics_before"], out.get("metrics_after") or {}
    keys = ("harmful_rate_probes", "harmful_rate_ood", "judged_rate_probes", "judged_rate_ood", "over_refusal_benign",
            "nll_benign")
    return {"loss": loss, "steps": man["steps"], "kept_step": b.get("best_step"), "stop": b.get("stop_reason"),
            "curve": [[r["step"], round(r["harmful_rate"], 3), round(r["budget_used"], 2)] for r in b.get("curve", [])],
            "check_share_of_time": b.get("check_share_of_time"),
            "before": {k: mb.get(k) for k in keys}, "after": {k: ma.get(k) for k in keys},
            "heldout_flagged_harmful_rate": out.get("heldout_flagged_harmful_rate"),
            "promoted": out.get("promoted"), "train_seconds": man.get("seconds"), "realign_seconds": round(seconds, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--config", default=None, help="a realign config file the runs start from (e.g. a judge)")
    ap.add_argument("--inputs", default=None, help="a directory with model/ and the four data files")
    ap.add_argument("--losses", default=",".join(LOSSES))
    args = ap.parse_args(argv)
    from lancet_core.manifest import cpu_name

    rows = []
    for loss in args.losses.split(","):
        rows.append(run_one(loss, args))
        print(f"[budget_baselines] {loss}: {json.dumps({k: rows[-1].get(k) for k in ('after', 'kept_step', 'stop')})}",
              file=sys.stderr, flush=True)
    res = {"benchmark": "budget_baselines", "work_dir": args.work_dir, "inputs": args.inputs or "demo",
           "runs": rows, "cpu": cpu_name(), "platform": platform.platform(),
           "threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
