"""Stage 4 — correct: influence-ranked preference pairs and post-training (IBO by default; GA, NPO, DPO selectable).

Takes in: `influence.parquet` (stage recall), the corpus and the model. Writes: the repaired corpus
(`scored.parquet`, `repaired.parquet`, `report.json`), `pairs.parquet` / `retain.parquet` and the corrected model
directory (LoRA merged, plain HF format).

Modules: `pairs` (R⁺ / R⁻ from the ranking, weights from the influence gap), `repair` (the corpus without the top
rows, so the next fine-tune does not relearn them), `losses` (the loss registry: ibo, ga,
npo, dpo), `trainer` (one seeded trainer for every loss), `config` (PairConfig, TrainConfig).

Knows nothing about how influence was computed, about judges, MLflow or Prefect.
"""

from lancet_core import lazy_exports

# public names, imported on first use: `import lancet_core.correct.config` stays light (no torch)
__getattr__, __all__ = lazy_exports(__name__, {
    "IBOConfig": "lancet_core.correct.config",
    "LOSSES": "lancet_core.correct.losses",
    "PairConfig": "lancet_core.correct.config",
    "RepairConfig": "lancet_core.correct.repair",
    "TrainConfig": "lancet_core.correct.config",
    "build_pairs": "lancet_core.correct.pairs",
    "get_loss": "lancet_core.correct.losses",
    "post_train": "lancet_core.correct.trainer",
    "read_pairs": "lancet_core.correct.pairs",
    "read_retain": "lancet_core.correct.pairs",
    "repair_corpus": "lancet_core.correct.repair",
    "write_pair_files": "lancet_core.correct.pairs",
})
