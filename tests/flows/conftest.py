"""Flow tests run against a temporary Prefect API (prefect_test_harness) with results in tmp dirs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    import os

    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session", autouse=True)
def _no_tracking_files_in_the_checkout():
    """Tests use temporary tracking stores only: nothing may appear in the checkout (mlruns/, mlartifacts/, mlflow.db)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    names = ("mlruns", "mlartifacts", "mlflow.db")
    before = {n for n in names if (root / n).exists()}
    yield
    after = {n for n in names if (root / n).exists()}
    assert after <= before, f"tests wrote tracking files into the checkout: {sorted(after - before)}"
