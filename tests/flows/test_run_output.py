"""What a person sees from a realign run (issue 29): no bytecode in the flow's log, -v / -vv levels, `--json` alone on
stdout, the run page's URL and the charts in the closing summary, the charts themselves."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import _NOISY_LOGGERS, _OWN_LOGGERS, _configure_logging, main

ROOT = Path(__file__).resolve().parents[2]


def test_column_mapping_prints_nothing():
    """`--column response=reference` renames with `datasets`, whose fingerprinting pickled functions with dill, which
    runs dis.dis into a captured stdout; inside the flow (log_prints=True) Prefect's print hook sent every bytecode
    line to the run's log. The rename must call print() not once (a fresh interpreter: dill caches what it saw)."""
    code = (
        "import builtins, sys\n"
        "said = []\n"
        "builtins.print = lambda *a, **k: said.append(' '.join(map(str, a)))\n"  # what Prefect's log_prints does
        "from lancet_core.data.corpus import rename_columns\n"
        "rows = rename_columns([{'prompt': 'p', 'reference': 'r'}, {'prompt': 'q', 'reference': 's'}],"
        " {'response': 'reference'})\n"
        "sys.stdout.write(repr(rows) + '\\n' + '\\n'.join(said))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    rows, *printed = p.stdout.splitlines()
    assert rows == "[{'prompt': 'p', 'response': 'r'}, {'prompt': 'q', 'response': 's'}]"
    assert printed == [], printed[:10]


@pytest.fixture
def _logger_levels():
    names = [*_OWN_LOGGERS, *_NOISY_LOGGERS, "websockets"]
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.usefixtures("_logger_levels")
def test_verbose_levels():
    """Default: our INFO lines. -v: lancet's own DEBUG detail, third-party loggers still quiet. -vv: everything."""
    own = [logging.getLogger(n) for n in ("lancet", "lancet_core.recall.scan", "tasks.tracking", "flows.realign")]
    others = [logging.getLogger(n) for n in ("httpcore", "httpx", "websockets", "mlflow")]
    _configure_logging(0)
    assert all(lg.isEnabledFor(logging.INFO) and not lg.isEnabledFor(logging.DEBUG) for lg in own)
    assert not any(lg.isEnabledFor(logging.DEBUG) for lg in others)
    _configure_logging(1)
    assert all(lg.isEnabledFor(logging.DEBUG) for lg in own)
    assert not any(lg.isEnabledFor(logging.DEBUG) for lg in others)
    _configure_logging(2)
    assert all(lg.isEnabledFor(logging.DEBUG) for lg in own + others)
    _configure_logging(0)  # a later plain run is quiet again (in-process callers, tests)
    assert not any(lg.isEnabledFor(logging.DEBUG) for lg in own + others)


SUMMARY = {
    "status": "corrected", "n_flagged": 3, "run_id": "abc123", "experiment_id": "1",
    "run_url": "http://127.0.0.1:5000/#/experiments/1/runs/abc123", "tracking_uri": "sqlite:////w/mlflow.db",
    "version": "2", "promoted": True, "reasons": ["harmful rate down"], "start_model": "m (as given)",
    "corrected_model": "/w/models/x", "metrics_before": {"harmful_rate_probes": 0.867, "n_probes": 60},
    "metrics_after": {"harmful_rate_probes": 0.117, "n_probes": 60},
    "charts": {"influence": "file:///w/mlartifacts/1/abc123/artifacts/charts/influence.png",
               "before_after": "file:///w/mlartifacts/1/abc123/artifacts/charts/before_after.png"},
}


@pytest.mark.usefixtures("_logger_levels")
def test_realign_json_is_alone_on_stdout(monkeypatch, tmp_path, capsys):
    """`lancet realign --json | jq .`: stdout is the JSON and nothing else; the human summary goes to stderr and
    names the run's own page, the command that serves it, and the charts as files."""
    import flows.realign

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.realign, "realign", lambda **kw: dict(SUMMARY))
    assert main(["realign", "--json", "--work-dir", str(tmp_path / "w")]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)  # the whole of stdout parses
    assert got["run_url"] == SUMMARY["run_url"] and got["status"] == "corrected"
    assert got["metrics_after"] == {"harmful_rate_probes": 0.117} and got["charts"] == SUMMARY["charts"]
    assert "run page     : http://127.0.0.1:5000/#/experiments/1/runs/abc123" in err
    assert "mlflow ui --backend-store-uri sqlite:////w/mlflow.db" in err
    assert "/w/mlartifacts/1/abc123/artifacts/charts/influence.png" in err and "file://" not in err
    assert "harmful_rate_probes" in err

    assert main(["realign", "--work-dir", str(tmp_path / "w")]) == 0  # without --json: the summary on stdout
    out, _ = capsys.readouterr()
    assert "run page     : http://127.0.0.1:5000/#/experiments/1/runs/abc123" in out and "{" not in out


def test_run_page_url():
    from tasks.tracking import run_page_url

    assert run_page_url("sqlite:////w/mlflow.db", "3", "r1") == "http://127.0.0.1:5000/#/experiments/3/runs/r1"
    assert run_page_url("http://mlflow.internal:8080/", "3", "r1") == "http://mlflow.internal:8080/#/experiments/3/runs/r1"


def test_charts_are_drawn(tmp_path):
    import numpy as np

    from lancet_core.recall.plots import before_after_chart, influence_flagged_chart

    scores = np.random.default_rng(0).normal(size=500)
    png = influence_flagged_chart(scores, scores > 1.5, tmp_path / "i.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {"harmful_rate_probes": 0.867, "harmful_rate_ood": 0.25, "over_refusal_benign": 0.0, "nll_benign": 0.5}
    after = {**before, "harmful_rate_probes": 0.117, "nll_benign": 0.502}
    assert before_after_chart(before, after, tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="differ in shape"):
        influence_flagged_chart(scores, scores[:10] > 0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rate to draw"):
        before_after_chart({"nll_benign": 1.0}, {"nll_benign": 1.0}, tmp_path / "y.png")


def test_monitor_json_is_alone_on_stdout(monkeypatch, tmp_path, capsys):
    import flows.inputs
    import flows.monitor

    check = {"model": "m", "harmful_rate": 0.2, "n_flagged": 12, "n_probes": 60, "by_category": {"fraud": 0.4},
             "drifted": True, "reasons": ["0.200 > 0.1"], "event_id": "e1", "realign_flow_run_id": None,
             "mlflow_run_id": "r1", "step": 0, "tracking_uri": "sqlite:////w/mlflow.db"}
    monkeypatch.setattr(flows.inputs, "check_monitor_inputs", lambda *a, **k: None)
    monkeypatch.setattr(flows.monitor, "monitor", lambda **kw: dict(check))
    assert main(["monitor", "--json", "--work-dir", str(tmp_path / "w")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["harmful_rate"] == 0.2 and "DRIFT" in err and "DRIFT" not in out
