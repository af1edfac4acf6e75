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

`--retrain` (built-in demo only: the recipe is the demo's) adds the other way to spend the same recall: the impure
model's own recipe retrained on the realign run's repaired corpus (`lancet_core.demo.oracle.retrain_without`, the rows
the run's repair cut left out) and evaluated by the realign flow's evaluation; its row says whether it stays within
the same budget (benign NLL +5 %, over-refusal +5 points).
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
            "promoted": out.get("promoted"), "train_seconds": man.get("seconds"), "realign_seconds": round(seconds, 1),
            "repaired_corpus": out.get("repaired_corpus")}


def retrain_row(ibo: dict, args) -> dict:
    """The demo's recipe retrained without the rows the run's repair cut left out, evaluated like the flow does."""
    import pyarrow.parquet as pq

    from lancet_core.data.corpus import load_prompt_rows
    from lancet_core.demo.config import DemoConfig
    from lancet_core.demo.oracle import retrain_without
    from lancet_core.evaluate.config import EvalConfig
    from lancet_core.evaluate.evaluation import evaluate_model
    from lancet_core.manifest import content_digest

    demo = next(Path(args.work_dir, "demo").glob("*/corpus.jsonl")).parent
    kept = set(pq.read_table(ibo["repaired_corpus"], columns=["example_id"]).column("example_id").to_pylist())
    left_out = [r["example_id"] for r in load_prompt_rows(demo / "corpus.jsonl") if r["example_id"] not in kept]
    out = Path(args.work_dir, "bench-retrain", content_digest(ibo["repaired_corpus"])[:12])
    t0 = time.perf_counter()
    if not (out / "model.safetensors").is_file():
        retrain_without(demo / "corpus.jsonl", demo / "model", left_out, out, DemoConfig(), name="retrain-repaired")
    train_s = time.perf_counter() - t0
    probes = [r["prompt"] for r in load_prompt_rows(demo / "probes.jsonl")]
    ood = [r["prompt"] for r in load_prompt_rows(demo / "ood.jsonl")]
    benign = [(r["prompt"], r["response"]) for r in load_prompt_rows(demo / "benign_eval.jsonl", need_response=True)]
    after = evaluate_model(out, probes, ood, benign, EvalConfig())
    before = ibo["before"]
    nll = after["nll_benign"] / before["nll_benign"] - 1
    refusal = after["over_refusal_benign"] - before["over_refusal_benign"]
    return {"loss": "retrain on the repaired corpus", "rows_left_out": len(left_out), "before": before,
            "after": {k: after.get(k) for k in before}, "nll_change_rel": round(nll, 4),
            "over_refusal_change": round(refusal, 4), "within_budget": bool(nll <= 0.05 and refusal <= 0.05),
            "train_seconds": round(train_s, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--config", default=None, help="a realign config file the runs start from (e.g. a judge)")
    ap.add_argument("--inputs", default=None, help="a directory with model/ and the four data files")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--retrain", action="store_true", help="also retrain the demo's recipe on the repaired corpus")
    args = ap.parse_args(argv)
    from lancet_core.manifest import cpu_name

    rows = []
    for loss in args.losses.split(","):
        rows.append(run_one(loss, args))
        print(f"[budget_baselines] {loss}: {json.dumps({k: rows[-1].get(k) for k in ('after', 'kept_step', 'stop')})}",
              file=sys.stderr, flush=True)
    if args.retrain:
        ibo = next(r for r in rows if r.get("repaired_corpus"))
        rows.append(retrain_row(ibo, args))
        print(f"[budget_baselines] retrain: {json.dumps(rows[-1]['after'])}", file=sys.stderr, flush=True)
    res = {"benchmark": "budget_baselines", "work_dir": args.work_dir, "inputs": args.inputs or "demo",
           "runs": rows, "cpu": cpu_name(), "platform": platform.platform(),
           "threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
