"""Proof that corpus repair works: retrain the demo's recipe on the repaired corpus; prints ONE JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repair_retrain.py --demo DIR --work /tmp/repair_work
    ... --cuts mass:0.8,mass:0.7,mass:0.5     # the cuts to measure (the first is the default)

Steps (each cached under --work by its own manifest, so a re-run only redoes what changed):
  1. recall exactly as the realign flow does (benchmarks/correction.py `recall_stage`: tokenize -> gradient store ->
     refusal-judged probe answers -> kfac influence of every training row);
  2. for every cut: `lancet_core.correct.repair.repair_corpus` (which never reads a label) -> the flagged rows ->
     `lancet_core.demo.oracle.retrain_without` (the impure model's exact recipe: same DemoConfig, seed, SFT schedule
     and tokenizer) on the corpus minus those rows;
  3. the oracle: the same recipe without the rows the demo planted as unsafe (`is_unsafe`, read only here);
  4. the IBO correction of the impure model (PairConfig(), TrainConfig(): the realign flow's defaults);
  5. `evaluate_model(EvalConfig())` on the demo's probes / OOD / benign_eval for every model and the impure one.

The labels are read only to report each cut's precision/recall against the planted rows and to build the oracle.
Goal: the default cut's retrain within 5 points (probe harmful rate) of the oracle. Torch runs on 1 thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.correction import _key, evaluate, recall_stage, row  # noqa: E402
from lancet_core.correct.config import PairConfig, TrainConfig, resolve_train  # noqa: E402
from lancet_core.correct.repair import RepairConfig, repair_corpus  # noqa: E402
from lancet_core.demo.config import DemoConfig  # noqa: E402
from lancet_core.evaluate.config import EvalConfig  # noqa: E402
from lancet_core.manifest import read_manifest  # noqa: E402

GOAL_POINTS = 0.05


def parse_cut(spec: str, n_queries: int) -> RepairConfig:
    """'mass:0.5' | 'top_k:64' | 'top_k:n_queries' (k = the number of flagged probe answers) | 'threshold:0'."""
    kind, _, value = spec.partition(":")
    if kind == "mass":
        return RepairConfig(cut="mass", mass=float(value or 0.5))
    if kind == "top_k":
        return RepairConfig(cut="top_k", top_k=n_queries if value == "n_queries" else int(value or 64))
    if kind == "threshold":
        return RepairConfig(cut="threshold", threshold=float(value or 0.0))
    raise SystemExit(f"--cuts: unknown cut {spec!r} (mass:F, top_k:K|n_queries, threshold:F)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a built demo directory (read only)")
    p.add_argument("--work", default=".lancet/bench-repair", help="cache of every intermediate artifact")
    p.add_argument("--cuts", default="mass:0.8,mass:0.5,mass:0.6,mass:0.65,mass:0.7,threshold:0,top_k:n_queries,"
                   "top_k:64",
                   help="comma list of cuts to retrain on; the first is reported as the default")
    p.add_argument("--no-ibo", action="store_true", help="skip the IBO correction")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--partial", default=None, help="also write the JSON here after every model (long runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    demo, work = Path(args.demo).resolve(), Path(args.work).resolve()
    demo_cfg = DemoConfig(**json.loads((demo / "manifest.json").read_text())["config"])
    eval_cfg = EvalConfig()
    from lancet_core.correct.pairs import write_pair_files
    from lancet_core.correct.trainer import post_train
    from lancet_core.demo.oracle import ids_from_label, retrain_without

    rec = recall_stage(demo, work)
    before = evaluate(demo / "model", demo, eval_cfg, work / "eval")
    inf = pq.read_table(rec["influence"], columns=["example_id", "is_unsafe"])
    unsafe = {e for e, u in zip(inf.column("example_id").to_pylist(), inf.column("is_unsafe").to_pylist(),
                                strict=True) if u}
    out: dict = {"demo": str(demo), "n_rows": inf.num_rows, "n_unsafe": len(unsafe), "n_queries": rec["n_queries"],
                 "recall": rec["quality"], "recall_seconds": rec["seconds"],
                 "impure": row(before, before, None), "cuts": {}, "models": {}}

    def emit():
        if args.partial:
            Path(args.partial).write_text(json.dumps(out, indent=1))

    def retrain(name: str, ids: list[str], extra: dict) -> dict:
        mdir = work / "retrain" / f"{name}-{_key(sorted(ids))}"
        t0 = time.perf_counter()
        retrain_without(demo / "corpus.jsonl", demo / "model", ids, mdir, demo_cfg, name=name)
        secs = read_manifest(mdir).get("seconds", time.perf_counter() - t0)
        r = row(before, evaluate(mdir, demo, eval_cfg, work / "eval"), secs, {"n_excluded": len(ids), **extra})
        out["models"][name] = r
        emit()
        return r

    oracle_ids = ids_from_label(demo / "corpus.jsonl")
    retrain("oracle_without_unsafe", oracle_ids, {})
    specs = [s for s in args.cuts.split(",") if s]
    for i, spec in enumerate(specs):
        cfg = parse_cut(spec, rec["n_queries"])
        files = repair_corpus(rec["influence"], demo / "corpus.jsonl", work / "repair" / _key(cfg.model_dump()), cfg)
        scored = pq.read_table(files.scored, columns=["example_id", "lancet_flag"])
        flagged = [e for e, f in zip(scored.column("example_id").to_pylist(), scored.column("lancet_flag").to_pylist(),
                                     strict=True) if f]
        hit = len(set(flagged) & unsafe)
        report = json.loads(files.report.read_text())
        name = f"repaired_{spec.replace(':', '_')}"
        out["cuts"][name] = {"config": cfg.model_dump(mode="json"), "default": i == 0, "rows_removed": len(flagged),
                             "precision_vs_unsafe": round(hit / len(flagged), 4) if flagged else None,
                             "recall_of_unsafe": round(hit / len(unsafe), 4),
                             "removed_share_of_positive_influence":
                                 round(report["removed_share_of_positive_influence"], 4)}
        r = retrain(name, flagged, {"cut": spec})
        r["minus_oracle_points"] = {k: round(r[k] - out["models"]["oracle_without_unsafe"][k], 4)
                                    for k in ("harmful_probe", "harmful_ood", "over_refusal")}
        emit()
    if not args.no_ibo:
        pcfg, tcfg = PairConfig(), resolve_train(TrainConfig(), "refusal")  # the demo's judge, as the flow does
        pf = write_pair_files(rec["influence"], work / "pairs" / _key(pcfg.model_dump()), pcfg)
        mdir = work / "ibo" / _key([pcfg.model_dump(), tcfg.model_dump()])
        post_train(demo / "model", pf.pairs_path, pf.retain_path, mdir, tcfg, show_progress=False)
        man = read_manifest(mdir)
        out["models"]["ibo_corrected"] = row(before, evaluate(mdir, demo, eval_cfg, work / "eval"), man["seconds"],
                                             {"steps": man["steps"]})
    default = f"repaired_{specs[0].replace(':', '_')}" if specs else None
    if default:
        d = out["models"][default]["harmful_probe"] - out["models"]["oracle_without_unsafe"]["harmful_probe"]
        out["goal"] = {"default_cut": specs[0], "repaired_minus_oracle_probe_points": round(d, 4),
                       "within_5_points": abs(d) <= GOAL_POINTS + 1e-9}
    out["total_seconds"] = round(time.perf_counter() - t_all, 1)
    emit()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
