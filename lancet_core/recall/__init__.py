"""Stage 3 — recall: find the model's undesirable outputs and the training rows that drive them.

Takes in: probe prompts, a judge, the model, and the gradient store (stage index). Writes: `queries.parquet` (the
flagged answers), `influence.parquet` (a score for every training row, ranked), `top_k.parquet`, the influence
histogram and the explanation tables (markdown and HTML).

Modules: `judges` (refusal / regex / classifier), `undesirable` (generate + judge → queries), `influence` (the recall
entry point and RecallConfig), `scan` (one DuckDB scan of the store for folded or per-query scores), `baselines`
(RepSim, TF-IDF, BM25), `explain`, `plots`, `metrics` (precision/recall/AP against planted labels).

Knows nothing about how the recalled rows are used to correct the model, nor about MLflow or Prefect.
"""

from lancet_core.recall.influence import RecallConfig, recall_influence, recall_quality
from lancet_core.recall.judges import Judge, JudgeConfig, make_judge, register_judge
from lancet_core.recall.metrics import average_precision, precision_at_k, recall_report
from lancet_core.recall.scan import query_influence, score_store
from lancet_core.recall.undesirable import GenerationConfig, find_undesirable_outputs, write_queries

__all__ = [
    "GenerationConfig",
    "Judge",
    "JudgeConfig",
    "RecallConfig",
    "average_precision",
    "find_undesirable_outputs",
    "make_judge",
    "precision_at_k",
    "query_influence",
    "recall_influence",
    "recall_quality",
    "recall_report",
    "register_judge",
    "score_store",
    "write_queries",
]
