"""What the realign flow reports: a summary dict and the markdown shown as a Prefect artifact. Reads files only."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from lancet_core.recall.influence import EXPLANATION_HTML, EXPLANATION_MD, HISTOGRAM_PNG, recall_quality


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def run_summary(queries: str, before: str, after: str | None = None, influence_dir: Path | None = None,
                corrected: str | None = None, decision=None, pairs_path: str | None = None) -> dict:
    n_flagged = pq.read_metadata(queries).num_rows
    out = {"n_flagged": n_flagged, "metrics_before": read_json(before), "queries": queries, "recall_metrics": {},
           "artifacts": {"queries": queries, "metrics_before": before}}
    if after is None:
        return out
    influence = influence_dir / "influence.parquet"
    out.update(metrics_after=read_json(after), corrected_model=corrected, influence=str(influence),
               recall_metrics=recall_quality(influence), gate=decision.model_dump() if decision else None)
    out["artifacts"] = {
        "influence": str(influence),
        "plots": str(influence_dir / HISTOGRAM_PNG),
        "explanation": str(influence_dir / EXPLANATION_HTML),
        "explanation_md": str(influence_dir / EXPLANATION_MD),
        "queries": queries,
        "metrics_before": before,
        "metrics": after,
        "pairs": pairs_path or "",
    }
    return out


def report_markdown(summary: dict, tracked: dict) -> str:
    b, a = summary["metrics_before"], summary.get("metrics_after") or {}
    lines = ["# LANCET realign", "", f"Flagged outputs: **{summary['n_flagged']}**", "",
             "| metric | before | after |", "| --- | --- | --- |"]
    for k in ("harmful_rate_probes", "harmful_rate_ood", "over_refusal_benign", "nll_benign", "distinct_2"):
        if k in b:
            lines.append(f"| {k} | {b[k]:.4f} | {a.get(k, float('nan')):.4f} |")
    for k, v in summary.get("recall_metrics", {}).items():
        lines.append(f"| {k} | | {v:.4f} |")
    gate = summary.get("gate") or {}
    lines += ["", f"Gate: **{'promoted to champion' if gate.get('promote') else 'not promoted'}** — "
              + "; ".join(gate.get("reasons", [])),
              "", f"MLflow run: `{tracked.get('run_id')}` ({tracked.get('tracking_uri')}), "
              f"registered version: `{tracked.get('version')}`", ""]
    md = Path(summary["artifacts"].get("explanation_md", ""))
    if md.is_file():
        lines += ["## Top training rows behind each flagged output", "", md.read_text()[:20000]]
    return "\n".join(lines)


def top_k_rows(influence_dir: Path, k: int = 20) -> list[dict]:
    """The first k rows of the recall's top_k.parquet, texts clipped, for a Prefect table artifact."""
    from lancet_core.recall.influence import TOPK_FILE

    t = pq.read_table(Path(influence_dir) / TOPK_FILE, columns=["rank", "example_id", "score", "prompt", "response"])
    return [{**r, "score": round(r["score"], 6), "prompt": r["prompt"][:200], "response": r["response"][:200]}
            for r in t.slice(0, k).to_pylist()]
