"""Prefect task: build (or reuse) the built-in demo scenario."""

from __future__ import annotations

from prefect import task

from lancet_core.demo.build import build_demo
from lancet_core.demo.config import DemoConfig
from tasks.cache import LANCET_CACHE


@task(name="build_demo", cache_policy=LANCET_CACHE, persist_result=True)
def ensure_demo(out_dir: str, cfg: DemoConfig) -> str:
    """The demo directory (corpus.jsonl, probes/ood/benign_eval.jsonl, model/), built when absent."""
    return str(build_demo(out_dir, cfg).root)
