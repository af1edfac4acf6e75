"""lancet_core: the pure library behind lancet, one sub-package per pipeline stage.

    data/      corpus → tokens.parquet
    index/     tokens + model → gradient store (projected per-example gradients) + curvature
    recall/    probes + judge → flagged outputs → influence of every training row (one scan of the store)
    correct/   influence ranking → preference pairs → IBO post-training → corrected model
    evaluate/  before/after metrics on the same prompts, and the promotion gate
    demo/      the built-in scenario: generated corpus, tiny impure model, held-out probes

Shared plumbing, used by every stage: `errors`, `manifest` (atomic writes, digests, provenance), `formats` (file names
and column contracts), `model_io` (load and digest models, pick the device), `gguf` (a GGUF file → an HF model
directory, offline), `chat` (conversation → tokens with a loss mask), `generation` (batched greedy answers), `threads`
(one thread policy for torch and BLAS). A stage imports only the plumbing and earlier stages
(tests/core/test_architecture.py checks it).

Knows about torch, transformers, datasets, pyarrow and duckdb. Knows nothing about Prefect or MLflow: orchestration
lives in `tasks/` and `flows/`, tracking in `tasks/tracking.py`.
"""

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]):
    """(__getattr__, __all__) for a stage package that re-exports `name -> module` on first attribute access, so
    importing one light module of a stage (its config) does not import the stage's heavy ones (torch, duckdb)."""
    import importlib

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__, sorted(exports)
