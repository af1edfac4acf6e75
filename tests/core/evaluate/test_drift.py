"""The monitor's pure part: harmful rates from the probes and the flagged answers, and the threshold decision."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lancet_core.evaluate.drift import MonitorConfig, decide_drift, probe_rates

PROBES = [{"prompt": f"p{i}", "category": c} for i, c in enumerate(["hacking"] * 4 + ["fraud"] * 6)]


def _queries(categories: list[str]) -> pa.Table:
    n = len(categories)
    return pa.table({"query_id": [f"q{i}" for i in range(n)], "prompt": ["p"] * n, "response": ["r"] * n,
                     "judge": ["refusal"] * n, "category": pa.array(categories, pa.string())})


def test_rates_overall_and_per_category():
    r = probe_rates(PROBES, _queries(["hacking", "hacking", "hacking", "fraud"]))
    assert r["n_probes"] == 10 and r["n_flagged"] == 4
    assert r["harmful_rate"] == pytest.approx(0.4)
    assert r["by_category"] == {"fraud": pytest.approx(1 / 6), "hacking": pytest.approx(0.75)}


def test_nothing_flagged_is_rate_zero_in_every_category():
    r = probe_rates(PROBES, _queries([]))
    assert r["harmful_rate"] == 0.0 and r["by_category"] == {"fraud": 0.0, "hacking": 0.0}


def test_probes_without_categories_report_none():
    r = probe_rates([{"prompt": "a"}, {"prompt": "b"}], _queries(["x"]).drop(["category"]))
    assert r["harmful_rate"] == 0.5 and r["by_category"] == {}


def test_queries_from_another_probe_set_are_refused():
    with pytest.raises(ValueError, match="another probe set"):
        probe_rates(PROBES[:2], _queries(["hacking"] * 3))
    with pytest.raises(ValueError, match="no probe has"):
        probe_rates(PROBES, _queries(["weapons"]))
    with pytest.raises(ValueError, match="empty probe set"):
        probe_rates([], _queries([]))


@pytest.mark.parametrize(("rate", "drifted"), [(0.0, False), (0.09, False), (0.1, False), (0.1001, True), (0.8, True)])
def test_threshold_is_crossed_only_above_it(rate, drifted):
    d = decide_drift({"harmful_rate": rate, "by_category": {}}, MonitorConfig(threshold=0.1))
    assert d.drifted is drifted
    assert d.reasons and (">" in d.reasons[0]) is drifted


def test_a_category_above_its_threshold_is_drift_even_when_the_overall_rate_is_not():
    rates = {"harmful_rate": 0.05, "by_category": {"fraud": 0.0, "hacking": 0.25}}
    assert not decide_drift(rates, MonitorConfig(threshold=0.1)).drifted
    d = decide_drift(rates, MonitorConfig(threshold=0.1, category_threshold=0.2))
    assert d.drifted and d.reasons == ["hacking harmful rate 0.250 > category threshold 0.200"]


def test_config_is_validated():
    with pytest.raises(ValueError):
        MonitorConfig(threshold=1.0)
    with pytest.raises(ValueError):
        MonitorConfig(threshold=0.1, extra=1)
