"""Prefect tasks of the recall phase: flag undesirable outputs, then score every training row against them (each
output directory published with tasks.cache.publish_output)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from lancet_core.data.corpus import load_prompt_rows
from lancet_core.formats import QUERIES_FILE
from lancet_core.model_io import load_model, load_tokenizer
from lancet_core.recall.influence import RecallConfig, recall_influence
from lancet_core.recall.judges import JudgeConfig, make_judge
from lancet_core.recall.undesirable import GenerationConfig, find_undesirable_outputs, write_queries
from tasks.cache import LANCET_CACHE, publish_output


@task(name="find_undesirable_outputs", cache_policy=LANCET_CACHE, persist_result=True)
def find_undesirable(model_dir: str, probes_path: str, judge: JudgeConfig, generation: GenerationConfig,
                     out_dir: str) -> str:
    """Generate answers to the probes, judge them; returns queries.parquet (possibly empty: nothing to correct)."""
    def build(tmp: Path) -> None:
        table = find_undesirable_outputs(load_model(model_dir), load_tokenizer(model_dir),
                                         load_prompt_rows(probes_path), make_judge(judge), generation)
        write_queries(table, tmp / QUERIES_FILE)

    return str(publish_output(out_dir, build) / QUERIES_FILE)


@task(name="query_influence", cache_policy=LANCET_CACHE, persist_result=True)
def query_influence(store_dir: str, model_dir: str, queries_path: str, tokens_dir: str, cfg: RecallConfig,
                    out_dir: str, contrast_path: str | None = None) -> str:
    """influence.parquet (every training row, ranked), top-k and explanation; returns the influence directory.
    `contrast_path`: the benign prompts of the refusal target's contrast (RecallConfig.query_contrast)."""
    return str(publish_output(out_dir, lambda tmp: recall_influence(store_dir, model_dir, queries_path, tokens_dir,
                                                                     tmp, cfg, contrast_path)))
