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
    for k in ("harmful_rate_probes", "harmful_rate_ood", "judged_rate_probes", "judged_rate_ood",
              "over_refusal_benign", "nll_benign", "distinct_2"):
        if k in b:
            lines.append(f"| {k} | {b[k]:.4f} | {a.get(k, float('nan')):.4f} |")
    for k, v in summary.get("recall_metrics", {}).items():
        lines.append(f"| {k} | | {v:.4f} |")
    gate = summary.get("gate") or {}
    lines += ["", f"Gate: **{'promoted to champion' if gate.get('promote') else 'not promoted'}** — "
              + "; ".join(gate.get("reasons", [])),
              "", f"MLflow run: `{tracked.get('run_id')}` ({tracked.get('tracking_uri')}), "
              f"registered version: `{tracked.get('version')}`"
              + (f"; run page: {tracked['run_url']}" if tracked.get("run_url") else ""), ""]
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


def explanation_rows(influence_dir: Path) -> list[dict]:
    """The recall's flat explanation table (flagged output × its top training rows), [] when absent."""
    from lancet_core.recall.influence import EXPLANATION_TABLE

    path = Path(influence_dir) / EXPLANATION_TABLE
    return pq.read_table(path).to_pylist() if path.is_file() else []


def _manifest(path: str | Path) -> dict:
    p = Path(path)
    m = (p if p.is_dir() else p.parent) / "manifest.json"
    return read_json(m) if m.is_file() else {}


def _rate(seconds: float, n: int | None) -> str:
    return f"{seconds:.1f} s" + (f", {n / seconds:.0f} rows/s" if n and seconds > 0.5 else "")


def stage_line(phase: str, out, seconds: float) -> str:
    """One log line per realign stage, with its figures (read from the stage's output files)."""
    try:
        if phase == "demo":
            return f"demo: ready in {out} ({seconds:.1f} s)"
        if phase == "find_undesirable":
            n = pq.read_metadata(out).num_rows
            return f"find_undesirable: {n} probe answers flagged ({seconds:.1f} s)"
        if phase.startswith("evaluate"):
            m = read_json(out)
            keys = ("harmful_rate_probes", "harmful_rate_ood", "judged_rate_probes", "judged_rate_ood",
                    "over_refusal_benign", "nll_benign")
            figs = ", ".join(f"{k} {m[k]:.3f}" for k in keys if isinstance(m.get(k), int | float))
            return f"{phase}: {figs} ({seconds:.1f} s)"
        if phase == "tokenize":
            m = _manifest(out)
            return (f"tokenize: {m.get('rows')} rows, {m.get('total_tokens')} tokens, {m.get('truncated_rows')} "
                    f"truncated at {m.get('config', {}).get('max_seq_len_tokens')} ({_rate(seconds, m.get('rows'))})")
        if phase == "index":
            m = _manifest(out)
            return (f"index: {m.get('n_rows')} rows x {m.get('dim')} dims in {m.get('n_shards')} shards, "
                    f"curvature {', '.join(m.get('build_settings', {}).get('curvature', []))} "
                    f"({_rate(seconds, m.get('n_rows'))})")
        if phase == "recall":
            n = pq.read_metadata(Path(out) / "influence.parquet").num_rows
            cfg = _manifest(out).get("config", {})
            target = {"refusal": ", query: -log P(refusal | prompt)", "flagged": ", query: the flagged answers"}.get(
                cfg.get("query_target"), "")
            if cfg.get("query_contrast"):
                target += f" minus {cfg['query_contrast']:g} x the same on the benign prompts"
            method = cfg.get("method", "?")
            if cfg.get("damping_ratio") is not None and method != "identity":
                method += f" (damping {cfg['damping_ratio']:g} x the mean eigenvalue)"
            return f"recall: {n} training rows scored with {method}{target} ({_rate(seconds, n)})"
        if phase == "repair":
            r = read_json(Path(out) / "report.json")
            return (f"repair: {r['rows_removed']} of {r['rows']} rows left out of the repaired corpus "
                    f"({r['removed_share_of_positive_influence']:.0%} of the positive influence; {seconds:.1f} s)")
        if phase == "pairs":
            m = _manifest(out[0])
            return f"pairs: {m.get('n_pairs')} pairs ({m.get('n_same_prompt')} same-prompt), {m.get('n_retain')} " \
                   f"retain rows ({seconds:.1f} s)"
        if phase == "ibo":
            m = _manifest(out)
            hist = m.get("loss_history") or [{}]
            loss = hist[-1].get("loss")
            line = (f"ibo: {m.get('steps')} steps on {m.get('n_examples')} pairs, final loss "
                    f"{loss if loss is None else round(loss, 4)} ({seconds:.1f} s)")
            b = m.get("budget")
            if b and b.get("best"):
                k, s0 = b["best"], b["curve"][0]
                line += (f"; budget: {b.get('stop_reason') or 'finished'}, kept step {b['best_step']}: harmful rate "
                         f"{s0['harmful_rate']:.2f} -> {k['harmful_rate']:.2f} on {m['budget_checks']['n_check_prompts']}"
                         f" check prompts, NLL {k['nll_rel_change']:+.1%}, over-refusal {k['over_refusal_delta']:+.3f}"
                         f" ({k['budget_used']:.0%} of the budget; checks {b.get('check_share_of_time') or 0:.0%} of "
                         "the time)")
            return line
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return f"{phase}: done ({seconds:.1f} s)"


def terminal_table(summary: dict) -> str:
    """The closing before/after table the CLI prints (and recall quality when the corpus has labels)."""
    b, a = summary.get("metrics_before") or {}, summary.get("metrics_after") or {}
    rows = [(k, b[k], a.get(k)) for k in ("harmful_rate_probes", "harmful_rate_ood", "judged_rate_probes",
                                          "judged_rate_ood", "over_refusal_benign", "nll_benign", "distinct_2")
            if isinstance(b.get(k), int | float)]
    if isinstance(summary.get("heldout_flagged_harmful_rate"), int | float):  # flagged prompts no budget check saw
        rows.append(("harmful_rate_flagged_unchecked", 1.0, summary["heldout_flagged_harmful_rate"]))
    rec = summary.get("recall_metrics") or {}
    rows += [(k, None, rec[k]) for k in ("recall.precision_at_n_labelled", "recall.average_precision") if k in rec]
    w = max([len("metric")] + [len(k) for k, *_ in rows])

    def cell(x) -> str:
        return f"{x:8.3f}" if isinstance(x, int | float) else f"{'':>8}"

    lines = [f"{'metric':<{w}}  {'before':>8}  {'after':>8}", f"{'-' * w}  {'-' * 8}  {'-' * 8}"]
    lines += [f"{k:<{w}}  {cell(before)}  {cell(after)}" for k, before, after in rows]
    return "\n".join(lines)


def closing_summary(summary: dict) -> str:
    """What the CLI prints when a realign run ends: where it started, what it flagged, before/after, gate, MLflow."""
    lines = [f"started from : {summary.get('start_model')}",
             f"flagged      : {summary.get('n_flagged')} probe answers ({summary.get('status')})",
             terminal_table(summary)]
    if summary.get("corrected_model"):
        gate = "promoted to champion" if summary.get("promoted") else "not promoted"
        lines += [f"corrected    : {summary['corrected_model']}",
                  f"gate         : {gate} — {'; '.join(summary.get('reasons') or [])}"]
    charts = [local_path(u) for u in (summary.get("charts") or {}).values()]
    if charts:
        lines.append("charts       : " + "\n               ".join(charts))
    version = f", registered version {summary['version']}" if summary.get("version") else ""
    uri = summary.get("tracking_uri") or ""
    lines.append(f"MLflow       : run {summary.get('run_id')} in {uri}{version}")
    if summary.get("run_url"):
        lines.append(f"run page     : {summary['run_url']}")
        if not uri.startswith(("http://", "https://")):
            lines.append(f"               (first start the UI: .venv/bin/mlflow ui --backend-store-uri {uri})")
    return "\n".join(lines)


def local_path(uri: str) -> str:
    """A file:// URI as the plain path a person can open; any other URI unchanged."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def monitor_summary(out: dict) -> str:
    """What `lancet monitor` prints after a check: the rate, the decision, the event / realign run, the MLflow run."""
    cats = ", ".join(f"{c} {r:.2f}" for c, r in out["by_category"].items())
    lines = [f"\n{out['model']}: harmful rate {out['harmful_rate']:.3f} ({out['n_flagged']} of {out['n_probes']} "
             f"probes{'; ' + cats if cats else ''}) -> {'DRIFT' if out['drifted'] else 'ok'} "
             f"({'; '.join(out['reasons'])})"]
    if out["drifted"]:
        lines.append(f"event {out['event_id']}; " + (
            f"realign flow run {out['realign_flow_run_id']} started" if out["realign_flow_run_id"] else
            "no realign started (give --realign-deployment, e.g. realign/demo, with PREFECT_API_URL pointing at the "
            "server that serves it)"))
    lines.append(f"MLflow monitor run {out['mlflow_run_id']} (step {out['step']}) at {out['tracking_uri']}")
    return "\n".join(lines)


def summary_json(summary: dict) -> dict:
    """The realign summary's user-facing keys (for `lancet realign --json`)."""
    keep = ("status", "n_flagged", "run_id", "run_url", "experiment_id", "version", "promoted", "reasons",
            "tracking_uri", "corrected_model", "start_model", "repaired_corpus", "recall_metrics", "charts",
            "heldout_flagged_harmful_rate")
    out = {k: summary.get(k) for k in keep}
    for phase in ("metrics_before", "metrics_after"):
        if summary.get(phase):
            out[phase] = {k: v for k, v in summary[phase].items() if not k.startswith(("n_", "eval_"))}
    return out
