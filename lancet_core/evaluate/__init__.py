"""Stage 5 — evaluate: the same prompts and greedy decoding on the model before and after, and the promotion gate.

Takes in: a model directory and the probe / OOD / benign evaluation files. Writes: `metrics.json` (harmful rates,
over-refusal, benign NLL, diversity) and a gate decision comparing before with after.

Modules: `evaluation` (metrics of one model, before/after comparison), `gate` (promote or not), `config` (EvalConfig).

Knows nothing about influence, pairs or how the model was corrected; nothing about MLflow or Prefect.
"""

from lancet_core.evaluate.config import EvalConfig
from lancet_core.evaluate.evaluation import compare, evaluate_model, write_metrics
from lancet_core.evaluate.gate import GateConfig, GateDecision, decide

__all__ = ["EvalConfig", "GateConfig", "GateDecision", "compare", "decide", "evaluate_model", "write_metrics"]
