"""Prefect task: model dir + tokens -> gradient store directory (projected per-example gradients + curvature)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from tqdm import tqdm

from lancet_core.index.build import build_gradient_store
from lancet_core.index.config import IndexConfig
from tasks.cache import LANCET_CACHE


@task(name="build_index", cache_policy=LANCET_CACHE, persist_result=True)
def build_index(model_dir: str, tokens_path: str, out_store_dir: str, cfg: IndexConfig) -> str:
    """Build (or finish) the gradient store in `out_store_dir` (an output location: `out_` keeps it out of the cache
    key), with a progress bar over rows; returns its path."""
    with tqdm(desc="index: gradient store", unit="rows", leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return str(build_gradient_store(Path(model_dir), Path(tokens_path), Path(out_store_dir), cfg, progress=progress))
