"""The monitor's pure part: harmful rates from the probes and the flagged answers, and the threshold decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from lancet_core.evaluate.drift import (
    MonitorConfig,
    RealignAttempt,
    attempt_outcome,
    decide_drift,
    decide_realign,
    probe_rates,
    realign_inputs_key,
)

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
    with pytest.raises(ValueError):
        MonitorConfig(cooldown_hours=-1)


# ------------------------------------------------------------------------------------------------ hysteresis
T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
WEEK = MonitorConfig(threshold=0.25)  # default cool-down: 168 h


def _attempt(outcome, key="k1", started=T0, ended=T0 + timedelta(hours=2), **kw):
    return RealignAttempt(flow_run_id=kw.pop("flow_run_id", "fr-1"), inputs_key=key, started_at=started,
                          outcome=outcome, ended_at=ended, mlflow_run_id=kw.pop("mlflow_run_id", "ml-1"))


def test_a_refused_realign_holds_the_next_one_back_until_the_cool_down_ends():
    refused = _attempt("refused")
    d = decide_realign([refused], "k1", T0 + timedelta(days=1), WEEK, model="lancet-demo v3")
    assert d.hold and d.attempt == refused and d.until == T0 + timedelta(hours=2, days=7)
    assert d.reason == ("realign of lancet-demo v3 refused by the gate at 2026-03-02 08:00 UTC (run ml-1, flow run "
                        "fr-1): not retrying until the inputs change or 2026-03-09 08:00 UTC")
    assert not decide_realign([refused], "k1", T0 + timedelta(hours=2, days=7), WEEK).hold  # the cool-down is over


def test_other_inputs_no_hysteresis_or_no_attempt_start_one():
    refused = _attempt("refused")
    assert not decide_realign([refused], "k2", T0 + timedelta(days=1), WEEK).hold  # probes/corpus/threshold changed
    assert not decide_realign([refused], "k1", T0 + timedelta(days=1), WEEK.model_copy(update={"cooldown_hours": 0})).hold
    assert not decide_realign([], "k1", T0, WEEK).hold


@pytest.mark.parametrize(("outcome", "hold"), [("pending", True), ("running", True), ("refused", True),
                                               ("nothing to correct", True), ("promoted", False), ("failed", False),
                                               ("unknown", False)])
def test_which_outcomes_hold(outcome, hold):
    d = decide_realign([_attempt(outcome, ended=None)], "k1", T0 + timedelta(hours=1), WEEK, model="m")
    assert d.hold is hold
    if hold:
        assert d.reason.startswith("realign of m ") and "not retrying until the inputs change or" in d.reason


def test_the_latest_attempt_with_the_key_decides():
    old_refused = _attempt("refused", started=T0, ended=T0 + timedelta(hours=1))
    new_failed = _attempt("failed", started=T0 + timedelta(days=1), ended=T0 + timedelta(days=1, hours=1),
                          flow_run_id="fr-2")
    assert not decide_realign([old_refused, new_failed], "k1", T0 + timedelta(days=2), WEEK).hold  # errors retry
    other_key = _attempt("promoted", key="k2", started=T0 + timedelta(days=1))
    assert decide_realign([old_refused, other_key], "k1", T0 + timedelta(days=2), WEEK).hold


def test_a_pending_attempt_cools_down_from_its_start():
    d = decide_realign([_attempt("pending", ended=None)], "k1", T0 + timedelta(hours=1), WEEK)
    assert d.until == T0 + timedelta(days=7) and "not yet running" in d.reason


@pytest.mark.parametrize(("state", "status", "gate", "outcome"), [
    ("SCHEDULED", None, None, "pending"), ("PENDING", None, None, "pending"), ("RUNNING", None, None, "running"),
    ("RUNNING", "RUNNING", None, "running"), ("CRASHED", "RUNNING", None, "failed"), ("FAILED", "FAILED", None, "failed"),
    ("CANCELLED", None, None, "failed"), ("COMPLETED", "FINISHED", "failed", "refused"),
    ("COMPLETED", "FINISHED", "passed", "promoted"), ("COMPLETED", "FINISHED", "nothing to correct", "nothing to correct"),
    ("COMPLETED", None, None, "unknown"), (None, "FINISHED", "failed", "refused"), (None, "RUNNING", None, "running"),
    (None, None, None, "unknown"), ("COMPLETED", "KILLED", None, "failed"),
])
def test_attempt_outcome_from_prefect_and_mlflow(state, status, gate, outcome):
    assert attempt_outcome(state, status, gate) == outcome


def test_the_inputs_key_changes_with_the_inputs_but_not_the_cool_down_or_work_dir():
    base = dict(model_key="lancet-demo/3", probes_digest="sha256:p", corpus_digest="sha256:c", cfg=WEEK,
                deployment="realign/demo", parameters={"work_dir": "/a", "judge": {"kind": "refusal"}})
    k = realign_inputs_key(**base)
    assert k.startswith("sha256:") and k == realign_inputs_key(**base)
    assert k == realign_inputs_key(**{**base, "cfg": WEEK.model_copy(update={"cooldown_hours": 1}),
                                      "parameters": {"work_dir": "/b", "judge": {"kind": "refusal"}}})
    for change in ({"model_key": "lancet-demo/4"}, {"probes_digest": "sha256:q"}, {"corpus_digest": "sha256:d"},
                   {"cfg": MonitorConfig(threshold=0.3)}, {"cfg": WEEK.model_copy(update={"category_threshold": 0.5})},
                   {"deployment": "realign/weekly"}, {"parameters": {"judge": {"kind": "regex"}}}):
        assert realign_inputs_key(**{**base, **change}) != k, change
