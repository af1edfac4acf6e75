"""Prefect tasks of the correction phase: influence -> repaired corpus, training pairs -> post-trained model (each
output directory published once: tasks.cache.publish_output, the trainer through manifest.publishing_dir)."""

from __future__ import annotations

from prefect import task

from lancet_core.correct.budget import BudgetLimits
from lancet_core.correct.config import PairConfig, TrainConfig
from lancet_core.correct.pairs import PAIRS_FILE, RETAIN_FILE, write_pair_files
from lancet_core.correct.repair import RepairConfig, repair_corpus
from lancet_core.correct.trainer import post_train
from lancet_core.recall.judges import JudgeConfig
from lancet_core.recall.undesirable import GenerationConfig
from tasks.cache import LANCET_CACHE, one_build, publish_output


@task(name="build_pairs", cache_policy=LANCET_CACHE, persist_result=True)
def build_pairs(influence_path: str, cfg: PairConfig, out_dir: str) -> tuple[str, str]:
    """pairs.parquet (chosen = counteracting row, rejected = misbehaviour-promoting row) and retain.parquet ("" when n_retain=0)."""
    out = publish_output(out_dir, lambda tmp: write_pair_files(influence_path, tmp, cfg))
    return str(out / PAIRS_FILE), str(out / RETAIN_FILE) if (out / RETAIN_FILE).is_file() else ""


@task(name="ibo_post_train", cache_policy=LANCET_CACHE, persist_result=True)
def correct(model_dir: str, pairs_path: str, retain_path: str, cfg: TrainConfig, out_dir: str,
            queries_path: str | None = None, benign_eval_path: str | None = None, judge: JudgeConfig | None = None,
            generation: GenerationConfig | None = None, limits: dict | None = None) -> str:
    """The corrected model directory (a normal HF directory + manifest.json). IBO's steps show a progress bar on
    stderr (tqdm), as the index's shards do. With the flagged queries, the benign evaluation file, the judge and the
    utility limits (the gate's), training is budget-driven (cfg.budget; lancet_core.evaluate.checks)."""
    checks = None
    if cfg.budget.enabled and queries_path and benign_eval_path and judge is not None:
        import pyarrow.parquet as pq

        from lancet_core.data.corpus import load_prompt_rows
        from lancet_core.evaluate.checks import budget_checks

        benign = [(r["prompt"], r["response"]) for r in load_prompt_rows(benign_eval_path, need_response=True)]
        checks = budget_checks(pq.read_table(queries_path, columns=["query_id", "prompt"]).to_pylist(), benign, judge,
                               generation or GenerationConfig(), BudgetLimits(**(limits or {})), cfg.budget,
                               cfg.max_seq_len_tokens)
    with one_build(out_dir):  # identical concurrent runs train once; post_train reuses what the first published
        return str(post_train(model_dir, pairs_path, retain_path or None, out_dir, cfg, show_progress=True,
                              checks=checks))


@task(name="repair_corpus", cache_policy=LANCET_CACHE, persist_result=True)
def repair(influence_path: str, corpus_path: str, cfg: RepairConfig, out_dir: str) -> str:
    """scored.parquet (every row's influence and lancet_flag), repaired.parquet (without the flagged rows) and
    report.json; returns the repair directory."""
    return str(publish_output(out_dir, lambda tmp: repair_corpus(influence_path, corpus_path, tmp, cfg)))
