"""Recall quality on several beds at once (evidence for choosing recall defaults); prints ONE JSON object.

    .venv/bin/python benchmarks/recall_beds.py --work /tmp/beds/work                      # demo:0..4 + shared:0
    .venv/bin/python benchmarks/recall_beds.py --beds demo:0,shared:0 --reuse demo:0=/tmp/demo0 --work /tmp/b

A bed is `demo:N` (the original demo, DemoConfig(seed=N, shared_vocabulary=False)) or `shared:N` (the
shared-vocabulary demo, DemoConfig(seed=N, shared_vocabulary=True), the default demo since the recall-defaults issue:
harmless `security` / `money` rows reuse the hacking / fraud compliant answers' words). Per bed:
1. the demo is built in-process with lancet_core.demo.build_demo under WORK/<bed>/demo (a build there with the same
   config is reused; so is a directory given with --reuse BED=DIR, read only);
2. benchmarks/recall_quality.py's main() runs on it (imported, same code path and defaults), with two more settings
   than it lists itself: ekfac and identity on the whole-response store; its JSON is kept as
   WORK/<bed>/recall_quality.json and reused on a rerun (delete it to measure again).

Reported per bed and as the mean over beds, for every setting: precision@|planted| and average precision. Settings
(--settings; recall_quality.METHODS): `default` (IndexConfig() + RecallConfig(): the refusal query target here, with
its benign contrast, method 'auto' = identity), `kfac_nocontrast` / `identity_nocontrast` (the same target without the
contrast: the previous default and the plain dot product), `kfac_contrast`, `default_flagged` / `identity_flagged`
(the default store and kfac / the plain dot product with the original flagged-answer query), kfac / ekfac / linfac /
identity on
the pre-PCA store (random 16×16, first 4 response tokens) and on its whole-response twin (`*_whole_response`), the
PCA stores (`*_pcaK_w4`, `*_pcaK_whole`, `*_truefisher`), RepSim, TF-IDF and BM25. `margin_over_best_baseline` is each setting's
mean minus the best baseline's mean (baselines: repsim, text_tfidf, text_bm25). `goal` checks, per setting: mean
precision@planted >= 0.9 and >= 0.05 above each of BM25, TF-IDF, RepSim and the plain dot product (identity on the
same store with the same query target and no contrast, and `identity_flagged`). Settings measured before the
contrast existed are cached under their old meaning: re-measure (delete the bed's recall_quality.json) or name the
explicit `*_nocontrast` / `*_contrast` settings. Progress goes to stderr; only the final JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import recall_quality as rq  # noqa: E402

from lancet_core.demo.config import DemoConfig  # noqa: E402

DEFAULT_BEDS = "demo:0,demo:1,demo:2,demo:3,demo:4,shared:0"
EXTRA_METHODS: dict[str, dict] = {
    "ekfac_whole_response": {"method": "ekfac", "store": "whole_response"},
    "identity_whole_response": {"method": "identity", "store": "whole_response"},
}
SETTINGS: tuple[str, ...] = (
    "default", "kfac_nocontrast", "identity_nocontrast", "default_flagged", "identity_flagged",
    "kfac", "ekfac", "linfac", "identity",
    "kfac_whole_response", "ekfac_whole_response", "linfac_whole_response", "identity_whole_response",
    "repsim", "text_tfidf", "text_bm25",
)  # fmt: skip
BASELINES: tuple[str, ...] = ("repsim", "text_tfidf", "text_bm25")
GOAL_P, GOAL_MARGIN = 0.9, 0.05


def log(msg: str) -> None:
    print(f"[recall_beds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_bed(bed: str) -> DemoConfig:
    kind, _, seed = bed.partition(":")
    if kind not in ("demo", "shared") or not seed.lstrip("-").isdigit():
        raise SystemExit(f"bad bed {bed!r}: expected demo:N or shared:N")
    return DemoConfig(seed=int(seed), shared_vocabulary=kind == "shared")  # explicit: the default changed


def _bed_dirname(bed: str) -> str:
    return bed.replace(":", "")


def run_bed(bed: str, work: Path, reuse: dict[str, str], threads: int, settings: tuple[str, ...] = SETTINGS) -> dict:
    """Build (or reuse) the bed's demo, run recall_quality on it; its report, cached as WORK/<bed>/recall_quality.json
    (a rerun measures only the settings the cached report lacks, and merges them in)."""
    from lancet_core.demo.build import build_demo

    bed_work = work / _bed_dirname(bed)
    cached = bed_work / "recall_quality.json"
    old = json.loads(cached.read_text()) if cached.exists() else None
    if old is not None:
        if old.get("default_index") != _default_index():  # 'default' was measured with other defaults: stale
            old["methods"].pop("default", None)
        missing = tuple(s for s in settings if s not in old["methods"])
        if not missing:
            log(f"{bed}: reusing {cached}")
            return old
        log(f"{bed}: {cached} lacks {list(missing)}; measuring them")
        settings = missing
    bed_work.mkdir(parents=True, exist_ok=True)
    cfg = parse_bed(bed)
    t = time.perf_counter()
    if bed in reuse:
        demo = Path(reuse[bed])
        log(f"{bed}: reusing demo {demo}")
    else:
        log(f"{bed}: building demo under {bed_work / 'demo'}")
    # build_demo on an existing directory checks that its manifest's config is this bed's (refuses otherwise).
    demo = Path(build_demo(Path(reuse.get(bed, bed_work / "demo")), cfg).root)
    demo_seconds = time.perf_counter() - t
    log(f"{bed}: demo ready in {demo_seconds:.0f} s; recall_quality ...")
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # recall_quality prints its JSON; ours is the only stdout
        report = rq.main(["--demo", str(demo), "--work", str(bed_work / "rq"), "--threads", str(threads),
                          "--methods", *settings])  # fmt: skip
    report["bed"] = bed
    report["default_index"] = _default_index()
    report["seconds"]["demo_build_or_reuse"] = round(demo_seconds, 2)
    report["seconds"]["recall_quality_total"] = round(time.perf_counter() - t, 2)
    manifest = json.loads((demo / "manifest.json").read_text())
    report["demo_figures"] = manifest.get("figures")
    if old is not None:  # merge: the old report's methods and timings, plus the new ones
        old["methods"].update(report["methods"])
        old.setdefault("seconds", {}).update({f"rerun_{k}": v for k, v in report["seconds"].items()})
        old["settings"].setdefault("stores", {}).update(report["settings"].get("stores", {}))
        old["default_index"] = report["default_index"]
        report = old
    cached.write_text(json.dumps(report, indent=1))
    log(f"{bed}: done in {time.perf_counter() - t:.0f} s")
    return report


def bed_scores(report: dict, settings: tuple[str, ...] = SETTINGS) -> dict[str, dict[str, float]]:
    k = report["n_planted"]
    return {
        name: {"p_at_planted": m[f"precision_at_{k}"], "ap": m["average_precision"]}
        for name, m in report["methods"].items()
        if name in settings
    }


def _default_index() -> dict:
    """What the `default` setting means today (IndexConfig() and RecallConfig()); a cached `default` measured with
    other defaults is measured again."""
    from lancet_core.recall.influence import RecallConfig

    # the index settings the flow uses with the demo's (refusal) judge: 'auto' resolved, as recall_quality measures
    return {"index": rq.index_config().model_dump(mode="json"), "recall": RecallConfig().model_dump(mode="json")}


def _plain(setting: str) -> str:
    """The plain gradient dot product on the same store as `setting` (its identity twin)."""
    for m in ("kfac_", "ekfac_", "linfac_"):
        if setting.startswith(m):
            rest = setting.removeprefix(m).removesuffix("_truefisher")
            return f"identity_{rest}"
    return "identity"


def summarise(reports: dict[str, dict], settings: tuple[str, ...] = SETTINGS) -> dict:
    per_bed = {bed: bed_scores(r, settings) for bed, r in reports.items()}
    names = [s for s in settings if all(s in scores for scores in per_bed.values())]
    mean = {
        s: {m: round(statistics.fmean(per_bed[b][s][m] for b in per_bed), 4) for m in ("p_at_planted", "ap")}
        | {"min_p_at_planted": round(min(per_bed[b][s]["p_at_planted"] for b in per_bed), 4)}
        for s in names
    }
    base = [b for b in BASELINES if b in mean]
    best = {m: max(base, key=lambda b, m=m: mean[b][m]) for m in ("p_at_planted", "ap")} if base else {}
    margin = {
        s: {m: round(mean[s][m] - mean[best[m]][m], 4) for m in ("p_at_planted", "ap")}
        | {f"best_baseline_{m}": best[m] for m in ("p_at_planted", "ap")}
        for s in names
        if best
    }
    goal = {}
    for s in names:
        if s in BASELINES or s.startswith("identity"):
            continue
        # the default's plain twin: the dot product on its store and target without the benign contrast
        plain = _plain(s) if s != "default" else "identity_nocontrast"
        # the plain gradient dot product both with the setting's own query target and on the flagged answers
        against = [b for b in dict.fromkeys((*BASELINES, plain, "identity_flagged")) if b in mean and b != s]
        margins = {b: round(mean[s]["p_at_planted"] - mean[b]["p_at_planted"], 4) for b in against}
        goal[s] = {
            "mean_p_at_planted": mean[s]["p_at_planted"],
            "margin_p_at_planted_over": margins,
            "met": mean[s]["p_at_planted"] >= GOAL_P and all(v >= GOAL_MARGIN for v in margins.values()),
        }
    winner = {m: max(names, key=lambda s, m=m: mean[s][m]) for m in ("p_at_planted", "ap")} if names else {}
    return {"per_bed": per_bed, "mean": mean, "margin_over_best_baseline": margin, "goal": goal, "winner": winner}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beds", default=DEFAULT_BEDS, help=f"comma-separated demo:N / shared:N (default {DEFAULT_BEDS})")
    ap.add_argument("--work", default="/tmp/lancet-recall-beds", help="work directory, one sub-directory per bed")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (shared 2-core box: 1-2)")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="comma-separated settings (default: the defaults, the pre-PCA store's methods, baselines); "
                    "more: " + ",".join(sorted(set(rq.METHODS) | set(EXTRA_METHODS) - set(SETTINGS))))
    ap.add_argument("--reuse", default="", help="comma-separated BED=DIR: use this built demo for BED (read only)")
    args = ap.parse_args(argv)
    beds = [b.strip() for b in args.beds.split(",") if b.strip()]
    for b in beds:
        parse_bed(b)
    reuse = dict(x.split("=", 1) for x in args.reuse.split(",") if x.strip())
    unknown = set(reuse) - set(beds)
    if unknown:
        raise SystemExit(f"--reuse names beds that are not in --beds: {sorted(unknown)}")
    rq.METHODS.update(EXTRA_METHODS)
    work = Path(args.work)
    t0 = time.perf_counter()
    settings = tuple(x for x in args.settings.split(",") if x)
    bad = [x for x in settings if x not in rq.METHODS]
    if bad:
        raise SystemExit(f"--settings: unknown {bad}")
    reports = {b: run_bed(b, work, reuse, args.threads, settings) for b in beds}
    out = {
        "benchmark": "recall_beds",
        "beds": beds,
        "settings": list(settings),
        "baselines": list(BASELINES),
        "metrics": {"p_at_planted": "precision@|planted|", "ap": "average precision"},
        "goal_rule": f"mean p_at_planted >= {GOAL_P} and >= {GOAL_MARGIN} above bm25, tfidf, repsim and identity",
        "bed_info": {
            b: {
                "n_rows": r["n_rows"],
                "n_planted": r["n_planted"],
                "n_queries": r["n_queries"],
                "demo_figures": r.get("demo_figures"),
                "seconds": r.get("seconds"),
            }
            for b, r in reports.items()
        },  # fmt: skip
        **summarise(reports, settings),
        "recall_default": next(iter(reports.values()))["settings"]["recall_default"] if reports else None,
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": args.threads},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
