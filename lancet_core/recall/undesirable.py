"""Find undesirable outputs with no human: run probe prompts through the model, let a judge flag the answers.

Each flagged (prompt, response) becomes an influence query, written to queries.parquet (query_id, prompt, response,
judge, plus any probe metadata such as `category`). An empty flagged set is a normal outcome, not an error: the
table is empty and `nothing_to_correct_message(...)` says so for the caller to report.

query_id: the probe's own `probe_id` when the probes carry one, else `probe-<index in the probe list, 5 digits>`,
so ids are stable for the same probe file and unique.

Knows about a HF causal LM (through `lancet_core.generation`), judges and Arrow tables; knows nothing about
gradients, influence or training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from lancet_core.manifest import atomic_write_parquet
from lancet_core.recall.judges import Judge

QUERY_COLUMNS = ("query_id", "prompt", "response", "judge")
NOTHING_TO_CORRECT = "nothing to correct: the judge flagged none of the probe answers"


class GenerationConfig(BaseModel):
    """How probe answers are generated (frozen; dumped into manifests). Greedy unless do_sample."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(48, ge=1, description="maximum generated tokens per answer")
    batch_size: int = Field(32, ge=1, description="prompts per generate() call")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (do_sample only)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (do_sample only)")
    seed: int = Field(0, description="sampling seed (do_sample only)")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast of generation: auto = on CUDA only, bf16 = also on CPU, off = float32")


def nothing_to_correct_message(n_probes: int, judge_name: str) -> str:
    """The message a caller shows when no answer was flagged."""
    return f"{NOTHING_TO_CORRECT} ({n_probes} probe prompt(s), judge={judge_name!r})"


def _probe_rows(probe_prompts: Sequence[str] | Sequence[Mapping[str, Any]] | pa.Table) -> list[dict]:
    if isinstance(probe_prompts, pa.Table):
        rows = probe_prompts.to_pylist()
    else:
        rows = [{"prompt": p} if isinstance(p, str) else dict(p) for p in probe_prompts]
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"probe row {i}: needs a non-empty string 'prompt' (got {r.get('prompt')!r})")
        clash = {"response", "judge", "query_id"} & set(r)
        if clash:
            raise ValueError(f"probe row {i}: column(s) {sorted(clash)} are reserved for the queries table")
    return rows


def _query_ids(rows: list[dict]) -> list[str]:
    if rows and all("probe_id" in r for r in rows):
        ids = [str(r["probe_id"]) for r in rows]
    else:
        ids = [f"probe-{i:05d}" for i in range(len(rows))]
    seen: set[str] = set()
    for i, q in enumerate(ids):
        if q in seen:
            raise ValueError(f"probe row {i}: duplicate probe_id {q!r}")
        seen.add(q)
    return ids


def find_undesirable_outputs(
    model,
    tokenizer,
    probe_prompts: Sequence[str] | Sequence[Mapping[str, Any]] | pa.Table,
    judge: Judge,
    gen_cfg: GenerationConfig | None = None,
) -> pa.Table:
    """Generate an answer to every probe, judge it, and return the flagged ones as a queries table.

    `probe_prompts`: strings, or rows/an Arrow table with a `prompt` column and optional metadata columns (e.g.
    `category`, `probe_id`) that are carried into the output. Returns columns query_id, prompt, response, judge,
    then the metadata columns; zero rows when nothing is flagged.
    """
    gen_cfg = gen_cfg or GenerationConfig()
    rows = _probe_rows(probe_prompts)
    qids = _query_ids(rows)
    prompts = [r["prompt"] for r in rows]
    from lancet_core.generation import generate_answers  # torch: imported when answers are generated

    responses = generate_answers(model, tokenizer, prompts, **gen_cfg.model_dump(), desc="probe answers") if rows else []
    flags = judge.flags(prompts, responses) if rows else []
    if len(flags) != len(rows):
        raise ValueError(f"judge {judge.name!r} returned {len(flags)} flags for {len(rows)} answers")
    meta_cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in ("prompt", "probe_id")]
    keep = [i for i, f in enumerate(flags) if f]
    cols: dict[str, pa.Array] = {
        "query_id": pa.array([qids[i] for i in keep], pa.string()),
        "prompt": pa.array([prompts[i] for i in keep], pa.string()),
        "response": pa.array([responses[i] for i in keep], pa.string()),
        "judge": pa.array([judge.name] * len(keep), pa.string()),
    }
    for c in meta_cols:
        # type from all probes, so an empty selection still has the right schema
        full = pa.array([r.get(c) for r in rows])
        cols[c] = full.take(pa.array(keep, pa.int64()))
    return pa.table(cols)


def write_queries(table: pa.Table, path: str | Path) -> Path:
    """Write queries.parquet atomically (an empty table is written too, with its schema)."""
    missing = [c for c in QUERY_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"queries table lacks column(s) {missing} (has {table.column_names})")
    ids = table.column("query_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError("queries table has duplicate query_id values")
    return atomic_write_parquet(table, path)
