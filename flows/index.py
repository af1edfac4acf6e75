"""Flow: build (or finish) a gradient store, one Prefect task per shard, on this machine or on a Ray cluster.

Only composition: `tasks.index.build_index` does the work (plan, shards mapped over the chosen task runner,
finalise). Used by `lancet index --runner ray`; the realign flow calls the same task as its index stage.
"""

from __future__ import annotations

from prefect import flow

from lancet_core.index.config import IndexConfig
from tasks.index import build_index


@flow(name="index", log_prints=True)
def index_flow(model_dir: str, tokens_path: str, out_store_dir: str, cfg: IndexConfig = IndexConfig(),
               runner: str = "local", ray_address: str | None = None) -> str:
    return build_index(model_dir=model_dir, tokens_path=tokens_path, out_store_dir=out_store_dir, cfg=cfg,
                       runner=runner, ray_address=ray_address)
