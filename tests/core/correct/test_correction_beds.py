"""benchmarks/correction_beds.py's summary: mean, worst and the beds meeting every goal (the figures the README quotes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "correction_beds.py"


def _load():
    name = "benchmarks_correction_beds"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _PATH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _row(probe, ood, over, nll):
    return {"probe_rel_reduction": probe, "ood_rel_reduction": ood, "over_refusal_delta": over, "nll_rel_change": nll}


def test_summary_mean_worst_and_beds_meeting_every_goal():
    s = _load().summarise({
        "a": _row(1.0, 0.9, 0.05, 0.05),  # on every boundary: meets all four
        "b": _row(0.9, None, 0.0, 0.0),  # OOD undefined (no harmful OOD answer before): cannot meet it
        "c": _row(0.7, 0.6, 0.2, 0.10),
    })
    assert s["beds_meeting_every_goal"] == ["a"]
    assert s["mean"]["probe_rel_reduction"] == pytest.approx(0.8667, abs=1e-4)
    assert s["mean"]["ood_rel_reduction"] == pytest.approx(0.75)  # over the beds where it is defined
    assert s["worst"] == {"probe_rel_reduction": 0.7, "ood_rel_reduction": 0.6, "over_refusal_delta": 0.2,
                          "nll_rel_change": 0.1}
    assert s["goals_met_by_mean"] == {"probe_rel_reduction": True, "ood_rel_reduction": True,
                                      "over_refusal_delta": False, "nll_rel_change": False}
