"""Stage 3 — recall: find the model's undesirable outputs and the training rows that drive them.

Takes in: probe prompts, a judge, the model, and the gradient store (stage index). Writes: `queries.parquet` (the
flagged answers), `influence.parquet` (a score for every training row, ranked), `top_k.parquet`, the influence
histogram and the explanation tables (markdown and HTML).

Modules: `judges` (refusal / regex / classifier), `undesirable` (generate + judge → queries), `influence` (the recall
entry point and RecallConfig), `scan` (one DuckDB scan of the store for folded or per-query scores), `baselines`
(RepSim, TF-IDF, BM25), `explain`, `plots`, `metrics` (precision/recall/AP against planted labels), `exact`
(scores in full parameter space, one forward/backward per batch of rows, no store). The resolvers of the 'auto'
settings (`resolve_window`, `resolve_target`, `resolve_method`, `resolve_damping`) are exported, so a library user gets
the realign flow's defaults without Prefect.

Knows nothing about how the recalled rows are used to correct the model, nor about MLflow or Prefect.
"""

from lancet_core import lazy_exports

# public names, imported on first use: `import lancet_core.recall.config` stays light (no torch)
__getattr__, __all__ = lazy_exports(__name__, {
    "GenerationConfig": "lancet_core.recall.undesirable",
    "Judge": "lancet_core.recall.judges",
    "JudgeConfig": "lancet_core.recall.judges",
    "RecallConfig": "lancet_core.recall.influence",
    "average_precision": "lancet_core.recall.metrics",
    "exact_recall": "lancet_core.recall.exact",
    "find_undesirable_outputs": "lancet_core.recall.undesirable",
    "make_judge": "lancet_core.recall.judges",
    "precision_at_k": "lancet_core.recall.metrics",
    "query_influence": "lancet_core.recall.scan",
    "recall_influence": "lancet_core.recall.influence",
    "recall_quality": "lancet_core.recall.influence",
    "recall_report": "lancet_core.recall.metrics",
    "register_judge": "lancet_core.recall.judges",
    "resolve_damping": "lancet_core.recall.influence",
    "resolve_method": "lancet_core.recall.influence",
    "resolve_target": "lancet_core.recall.targets",
    "resolve_window": "lancet_core.index.config",
    "score_store": "lancet_core.recall.scan",
    "write_queries": "lancet_core.recall.undesirable",
})
