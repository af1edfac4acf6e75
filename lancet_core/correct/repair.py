"""Corpus repair: the training corpus with every row's influence, and a copy without the rows that drive the bad
outputs, so that the next fine-tune does not learn them again.

From influence.parquet (score > 0 = training on the row raises the likelihood of the flagged outputs) and the corpus
file, `repair_corpus` writes to `out_dir` (atomically, with manifest.json):
  * scored.parquet   every corpus row (its original columns) + example_id, influence_score, influence_rank and
                     lancet_flag (True = removed by the cut);
  * repaired.parquet the corpus rows without the flagged ones, original columns only (load it like any corpus);
  * report.json      the cut, rows removed (per category when the corpus has a `category` column), the predicted
                     change of the flagged outputs' log-likelihood, and the top removed rows.

Cuts (RepairConfig.cut), none of which reads a label column:
  * `top_k`: the k highest-scoring rows with score > 0;
  * `threshold`: every row with score > threshold;
  * `mass` (default, 0.8): the smallest set of top rows holding `mass` of the total positive influence — to first
    order the smallest removal that gives that share of the largest predicted drop of the flagged outputs'
    log-likelihood (removing row i changes the mean flagged log-likelihood by ≈ −score_i / N). Every cut is capped
    at `max_fraction` of the corpus. 0.8 is the mass whose retrain came within 5 points of retraining without the
    planted rows on both demos measured (seeds 0 and 1); 0.7 did on seed 0 only, 0.5 on neither
    (benchmarks/repair_retrain.py, docs/design.md §7).

Knows about the influence file, corpus files and pyarrow; knows nothing about models, gradients or MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from lancet_core.data.corpus import corpus_digest, load_corpus, read_records
from lancet_core.errors import CorpusError
from lancet_core.manifest import (
    atomic_write_parquet,
    atomic_write_text,
    check_manifest,
    file_digest,
    library_versions,
    write_manifest,
)

SCORED_FILE, REPAIRED_FILE, REPORT_FILE = "scored.parquet", "repaired.parquet", "report.json"


class RepairConfig(BaseModel):
    """Which rows the repaired corpus leaves out. Dumped into the repair manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cut: Literal["mass", "top_k", "threshold"] = Field(
        "mass", description="mass: the smallest top set holding `mass` of the positive influence; top_k: the k "
        "highest-scoring rows; threshold: every row scoring above `threshold` (only rows with score > 0 are cut)")
    mass: float = Field(0.8, gt=0.0, le=1.0, description="share of the total positive influence to remove (cut=mass); "
                        "0.8 measured on two demos (benchmarks/repair_retrain.py, docs/design.md §7)")
    top_k: int = Field(64, ge=1, description="rows to remove (cut=top_k)")
    threshold: float = Field(0.0, ge=0.0, description="remove rows scoring above this (cut=threshold)")
    max_fraction: float = Field(0.2, gt=0.0, le=1.0, description="never remove more than this share of the corpus")


@dataclass(frozen=True)
class RepairFiles:
    out_dir: Path
    scored: Path
    repaired: Path
    report: Path


def cut_rows(scores: np.ndarray, example_ids: list[str], cfg: RepairConfig) -> np.ndarray:
    """Indices (into `scores`) of the rows the cut removes, highest score first (ties by example_id)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], example_ids[i]))
    positive = [i for i in order if scores[i] > 0]
    cap = int(np.floor(cfg.max_fraction * len(scores)))
    if cfg.cut == "top_k":
        chosen = positive[: cfg.top_k]
    elif cfg.cut == "threshold":
        chosen = [i for i in positive if scores[i] > cfg.threshold]
    else:
        mass = np.cumsum([scores[i] for i in positive])
        k = int(np.searchsorted(mass, cfg.mass * mass[-1] * (1 - 1e-12)) + 1) if positive else 0
        chosen = positive[:k]
    return np.array(chosen[:cap], dtype=np.int64)


def repair_corpus(influence_path: str | Path, corpus_path: str | Path, out_dir: str | Path,
                  cfg: RepairConfig) -> RepairFiles:
    """Write scored.parquet, repaired.parquet and report.json for `corpus_path` (see the module docstring)."""
    influence_path, corpus_path, out = Path(influence_path), Path(corpus_path), Path(out_dir)
    expected = {"kind": "repaired_corpus", "influence_digest": file_digest(influence_path),
                "corpus_digest": corpus_digest(corpus_path),
                "config": cfg.model_dump(mode="json")}
    files = RepairFiles(out, out / SCORED_FILE, out / REPAIRED_FILE, out / REPORT_FILE)
    if check_manifest(out, expected) is not None and all(p.is_file() for p in (files.scored, files.repaired)):
        return files
    influence = pq.read_table(influence_path, columns=["example_id", "score", "rank"])
    score_of = dict(zip(influence.column("example_id").to_pylist(), influence.column("score").to_pylist(), strict=True))
    rank_of = dict(zip(influence.column("example_id").to_pylist(), influence.column("rank").to_pylist(), strict=True))
    rows = load_corpus(corpus_path)
    records = read_records(corpus_path)
    ids = [r.example_id for r in rows]
    missing = [e for e in ids if e not in score_of]
    if missing:
        raise CorpusError(f"{corpus_path}: {len(missing)} rows have no influence score (e.g. {missing[0]!r}); "
                          f"{influence_path} was computed from another corpus")
    scores = np.array([score_of[e] for e in ids], dtype=np.float64)
    removed = cut_rows(scores, ids, cfg)
    flag = np.zeros(len(ids), dtype=bool)
    flag[removed] = True

    scored = pa.Table.from_pylist(records)
    if "example_id" not in scored.column_names:
        scored = scored.append_column("example_id", pa.array(ids, pa.string()))
    scored = (scored.append_column("influence_score", pa.array(scores, pa.float64()))
              .append_column("influence_rank", pa.array([rank_of[e] for e in ids], pa.int64()))
              .append_column("lancet_flag", pa.array(flag)))
    kept = pa.Table.from_pylist([r for r, f in zip(records, flag, strict=True) if not f])
    positive_mass = float(scores[scores > 0].sum())
    removed_mass = float(scores[removed].sum()) if len(removed) else 0.0
    by_category: dict[str, int] = {}
    if records and "category" in records[0]:
        for i in removed:
            c = str(records[i].get("category"))
            by_category[c] = by_category.get(c, 0) + 1
    report = {
        "cut": cfg.model_dump(mode="json"),
        "rows": len(ids),
        "rows_removed": int(len(removed)),
        "rows_kept": int(len(ids) - len(removed)),
        "removed_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "removed_share_of_positive_influence": removed_mass / positive_mass if positive_mass > 0 else 0.0,
        "predicted_change_of_flagged_loglik": -removed_mass / len(ids),
        "examples": [{"example_id": ids[i], "influence_score": float(scores[i]), "prompt": rows[i].prompt[:300],
                      "response": rows[i].response[:300]} for i in removed[:5]],
    }
    atomic_write_parquet(scored, files.scored)
    atomic_write_parquet(kept, files.repaired)
    atomic_write_text(files.report, json.dumps(report, indent=2, ensure_ascii=False))
    write_manifest(out, {**expected, "rows_removed": int(len(removed)), "repaired_digest": file_digest(files.repaired),
                         "versions": library_versions()})
    return files
