"""Stage 5 — evaluate: the same prompts and greedy decoding on the model before and after, and the promotion gate.

Takes in: a model directory and the probe / OOD / benign evaluation files. Writes: `metrics.json` (harmful rates,
over-refusal, benign NLL, diversity) and a gate decision comparing before with after.

Modules: `evaluation` (metrics of one model, before/after comparison), `gate` (promote or not), `config` (EvalConfig).

Knows nothing about influence, pairs or how the model was corrected; nothing about MLflow or Prefect.
"""

from lancet_core import lazy_exports

# public names, imported on first use: `import lancet_core.evaluate.config` stays light (no torch)
__getattr__, __all__ = lazy_exports(__name__, {
    "EvalConfig": "lancet_core.evaluate.config",
    "GateConfig": "lancet_core.evaluate.gate",
    "GateDecision": "lancet_core.evaluate.gate",
    "compare": "lancet_core.evaluate.evaluation",
    "decide": "lancet_core.evaluate.gate",
    "evaluate_model": "lancet_core.evaluate.evaluation",
    "write_metrics": "lancet_core.evaluate.evaluation",
})
