"""Stage 2 — index: projected per-example gradients of every training row, and the curvature to precondition them.

Takes in: `tokens.parquet` (stage data) and a model directory. Writes: the gradient store — sharded Parquet of
projected gradients g_i = ∇θ log π(y_i|x_i), Kronecker-factor sums, the built curvatures (kfac by default) and a
manifest that is the store's identity (model, tokenizer, IndexConfig, projection layout).

Modules: `hooks` (LoGra-style forward/backward hooks that never form a full per-example gradient), `projection` (the
per-module projection matrices), `store` (the on-disk format, read side), `build` (writes a store; query gradients
computed exactly as the store's), `curvature` (F and v_q = (F + λI)⁻¹ g_q), `config` (IndexConfig).
Dependencies inside: build → curvature → store; build → hooks → projection.

Knows nothing about where queries come from, how scores are ranked or used, or orchestration.
"""

from lancet_core import lazy_exports

# public names, imported on first use: `import lancet_core.index.config` stays light (no torch)
__getattr__, __all__ = lazy_exports(__name__, {
    "GradientStore": "lancet_core.index.store",
    "IndexConfig": "lancet_core.index.config",
    "StoreIncomplete": "lancet_core.index.store",
    "build_curvature": "lancet_core.index.curvature",
    "build_gradient_store": "lancet_core.index.build",
    "compute_query_gradients": "lancet_core.index.build",
    "precondition": "lancet_core.index.curvature",
    "resolve_window": "lancet_core.index.config",
})
