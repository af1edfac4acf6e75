"""Flow: build (or finish) a gradient store, one Prefect task per shard, on this machine or on a Ray cluster.

Only composition: `tasks.index.build_index` does the work (plan, shards mapped over the chosen task runner,
finalise), called through `tasks.cache.ensure_output` like every cached stage: a cached answer whose store is gone or
damaged is rebuilt (only the lost shards), and the flow never returns a store path that does not hold a complete
store. Used by `lancet index`; the realign flow calls the same task as its index stage.
"""

from __future__ import annotations

from prefect import flow

from flows.runs import claim_flow_run
from lancet_core.index.config import IndexConfig
from tasks.cache import ensure_output
from tasks.index import build_index


@flow(name="index", log_prints=True)
def index_flow(model_dir: str, tokens_path: str, out_store_dir: str, cfg: IndexConfig = IndexConfig(),
               runner: str = "local", ray_address: str | None = None) -> str:
    claim_flow_run()  # this run names its process; runs a killed lancet left RUNNING are marked Crashed
    return ensure_output(build_index, model_dir=model_dir, tokens_path=tokens_path, out_store_dir=out_store_dir,
                         cfg=cfg, runner=runner, ray_address=ray_address)
