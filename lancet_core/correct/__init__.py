"""Stage 4 — correct: influence-ranked preference pairs and post-training (IBO by default; GA, NPO, DPO selectable).

Takes in: `influence.parquet` (stage recall) and the model. Writes: `pairs.parquet` / `retain.parquet` and the
corrected model directory (LoRA merged, plain HF format).

Modules: `pairs` (R⁺ / R⁻ from the ranking, weights from the influence gap), `losses` (the loss registry: ibo, ga,
npo, dpo), `trainer` (one seeded trainer for every loss), `config` (PairConfig, TrainConfig).

Knows nothing about how influence was computed, about judges, MLflow or Prefect.
"""

from lancet_core.correct.config import IBOConfig, PairConfig, TrainConfig
from lancet_core.correct.losses import LOSSES, get_loss
from lancet_core.correct.pairs import build_pairs, read_pairs, read_retain, write_pair_files
from lancet_core.correct.trainer import post_train

__all__ = [
    "IBOConfig",
    "LOSSES",
    "PairConfig",
    "TrainConfig",
    "build_pairs",
    "get_loss",
    "post_train",
    "read_pairs",
    "read_retain",
    "write_pair_files",
]
