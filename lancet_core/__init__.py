"""lancet_core: the pure library behind lancet.

Knows about torch, transformers, datasets, pyarrow and duckdb. Knows nothing about Prefect or MLflow: orchestration
lives in `tasks/` and `flows/`, tracking in `flows/tracking.py`.
"""

__version__ = "0.1.0"
