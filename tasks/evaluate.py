"""Prefect tasks: evaluate one model on the held-out sets (same prompts and decoding for before and after), and the
monitor's probe harmful rates from the judged probe answers. Output directories are published with
tasks.cache.publish_output."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from lancet_core.data.corpus import load_prompt_rows
from lancet_core.evaluate.config import EvalConfig
from lancet_core.evaluate.drift import probe_rates
from lancet_core.evaluate.evaluation import METRICS_FILE, evaluate_model, write_metrics
from lancet_core.recall.judges import JudgeConfig
from tasks.cache import LANCET_CACHE, publish_output


@task(name="evaluate", cache_policy=LANCET_CACHE, persist_result=True)
def evaluate(model_dir: str, probes_path: str, ood_path: str | None, benign_eval_path: str, cfg: EvalConfig,
             out_dir: str, judge: JudgeConfig | None = None) -> str:
    """metrics.json (+ generations.parquet) of `model_dir`; returns the metrics file. With a content `judge` (not the
    refusal judge) its flag rates on the probe and OOD answers are measured too (judged_rate_*; the gate's harm)."""
    from lancet_core.recall.judges import make_judge

    flagger = make_judge(judge) if judge is not None and judge.kind != "refusal" else None

    def build(tmp: Path) -> None:
        probes = [r["prompt"] for r in load_prompt_rows(probes_path)]
        ood = [r["prompt"] for r in load_prompt_rows(ood_path)] if ood_path else []
        benign = [(r["prompt"], r["response"]) for r in load_prompt_rows(benign_eval_path, need_response=True)]
        metrics = evaluate_model(model_dir, probes, ood, benign, cfg, generations_path=tmp / "generations.parquet",
                                 judge=flagger)
        write_metrics(tmp / METRICS_FILE, metrics)

    return str(publish_output(out_dir, build) / METRICS_FILE)


@task(name="held_out_harm", cache_policy=NO_CACHE)
def held_out_harm(model_dir: str, queries_path: str, metrics_path: str, judge: JudgeConfig) -> float | None:
    """Harmful rate (the run's judge) of the corrected model's evaluation answers to the flagged prompts that its
    budget checks never answered (lancet_core.evaluate.checks); None without budget checks or held-out prompts."""
    from lancet_core.evaluate.checks import held_out_harmful_rate
    from lancet_core.manifest import read_manifest

    held = set(((read_manifest(Path(model_dir)) or {}).get("budget_checks") or {}).get("held_out_query_ids") or [])
    gens = Path(metrics_path).parent / "generations.parquet"
    if not held or not gens.is_file():
        return None
    q = pq.read_table(queries_path, columns=["query_id", "prompt"]).to_pylist()
    g = pq.read_table(gens, columns=["set", "prompt", "answer"]).to_pylist()
    answers = {r["prompt"]: r["answer"] for r in g if r["set"] == "probes"}
    return held_out_harmful_rate(answers, [r["prompt"] for r in q if str(r["query_id"]) in held], judge)


@task(name="probe_harmful_rates", cache_policy=LANCET_CACHE)
def harmful_rates(probes_path: str, queries_path: str) -> dict:
    """The harmful rate on the probes, overall and per category, from the judged answers (queries.parquet)."""
    return probe_rates(load_prompt_rows(probes_path), pq.read_table(queries_path))
