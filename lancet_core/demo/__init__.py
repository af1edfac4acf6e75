"""The built-in demo (docs/design.md §9): a generated chat corpus with planted unsafe rows, held-out probe sets, an
in-process BPE tokenizer and a tiny GPT-2 / Llama trained on it — an "impure" model that really misbehaves, offline,
on CPU, in about a minute.

Entry point: `lancet_core.demo.build.build_demo(out_dir, DemoConfig())` or `python -m lancet_core.demo.build --out DIR`.
Knows nothing about Prefect or MLflow.
"""

from lancet_core.demo.config import DemoConfig, SFTConfig

__all__ = ["DemoConfig", "SFTConfig"]
