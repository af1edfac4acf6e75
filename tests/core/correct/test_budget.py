"""Budget-driven post-training (lancet_core.correct.budget, trainer integration, lancet_core.evaluate.checks).

The controller's rules are checked on scripted check results; the trainer's use of them against an oracle: the model a
budget run keeps at step k is the model a fixed run of k steps saves (same seed), and the step-0 check of a real
measure reports the start model.
"""

from __future__ import annotations

import json

import pytest
import torch

from lancet_core.correct.budget import BudgetChecks, BudgetConfig, BudgetController, BudgetLimits, plot_curve
from lancet_core.correct.config import TrainConfig
from lancet_core.correct.trainer import post_train
from tests.core.correct.test_trainer import BASE, model_dirs, pair_files  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _scripted(results: list[dict]):
    """A measure that returns the given check results in order (harmful_rate, over_refusal, nll) and counts calls."""
    it = iter(results)
    calls = []

    def measure(model, tokenizer):
        calls.append(1)
        return dict(next(it))

    return measure, calls


def _m(h, nll=1.0, orr=0.0):
    return {"harmful_rate": h, "nll": nll, "over_refusal": orr}


def _controller(results, planned=8, **cfg):
    measure, calls = _scripted(results)
    cfg = BudgetConfig(**{"check_every": 2, **cfg})
    return BudgetController(BudgetChecks(measure, BudgetLimits(0.05, 0.05), cfg, {}), planned_steps=planned), calls


def test_stops_when_the_behaviour_is_gone_and_keeps_that_step():
    c, _ = _controller([_m(1.0), _m(0.5, 1.01), _m(0.0, 1.02)])
    p = [torch.zeros(3)]
    c.start(None, None, p)
    c.set_interval(1.0)
    assert c.every == 2 and c.due(2) and not c.due(3)
    p[0] += 1
    assert c.check(2, None, None, p)
    p[0] += 1
    assert not c.check(4, None, None, p)
    assert c.best_step == 4 and "gone" in c.stop_reason
    assert [r["action"] for r in c.curve] == ["start", "best", "best"]
    assert c.curve[2]["nll_rel_change"] == pytest.approx(0.02) and c.curve[2]["budget_used"] == pytest.approx(0.4)


def test_over_budget_returns_to_the_best_checkpoint_halves_the_lr_then_stops():
    c, _ = _controller([_m(1.0), _m(0.5), _m(0.2, 1.2), _m(0.1, 1.0, 0.2), _m(0.1, 1.3)], max_backoffs=2)
    p = [torch.zeros(2)]
    c.start(None, None, p)
    c.set_interval(1.0)
    p[0] += 1  # step 2: harm 0.5 within budget -> best
    assert c.check(2, None, None, p) and c.best_step == 2
    p[0] += 5  # step 4: NLL +20 % -> back to step 2's weights, lr halved, fresh optimiser
    assert c.check(4, None, None, p)
    assert torch.equal(p[0], torch.ones(2)) and c.lr_scale == 0.5 and c.reset_optimizer
    c.reset_optimizer = False
    p[0] += 5  # step 6: over-refusal +20 pts -> second return
    assert c.check(6, None, None, p) and c.lr_scale == 0.25
    p[0] += 5  # step 8: third overspend > max_backoffs -> stop, best still step 2
    assert not c.check(8, None, None, p)
    assert "budget spent" in c.stop_reason and c.best_step == 2 and torch.equal(p[0], torch.ones(2))
    assert c.curve[1]["harmful_rate"] == 0.5 and all(r["budget_used"] > 1 for r in c.curve[2:])


def test_a_stall_with_budget_left_doubles_the_lr_and_the_step_cap_stops():
    c, _ = _controller([_m(1.0), _m(1.0), _m(1.0), _m(0.9)], planned=2, max_steps_factor=3.0, max_lr_scale=4.0)
    p = [torch.zeros(1)]
    c.start(None, None, p)
    c.set_interval(1.0)
    assert c.max_steps == 6
    assert c.check(2, None, None, p) and c.lr_scale == 2.0  # no progress, budget unused: a larger step
    assert c.check(4, None, None, p) and c.lr_scale == 4.0
    assert not c.check(6, None, None, p) and "step cap" in c.stop_reason and c.lr_scale == 4.0
    assert c.best_step == 6


def test_once_mostly_gone_no_lr_growth_and_patience_stops_a_rising_harm():
    """The demo's shape: harm falls to its best, then rises as the pairs overfit; the lr stays, and after `patience`
    checks without a new best training stops with the best step kept."""
    c, _ = _controller([_m(1.0), _m(0.2), _m(0.3), _m(0.4), _m(0.5)], planned=40, patience=3)
    p = [torch.zeros(1)]
    c.start(None, None, p)
    c.set_interval(1.0)
    assert c.check(2, None, None, p) and c.check(4, None, None, p) and c.check(6, None, None, p)
    assert not c.check(8, None, None, p)
    assert c.stop_reason == "no progress in 3 checks" and c.best_step == 2 and c.lr_scale == 1.0


def test_auto_interval_keeps_checks_near_their_cost_share():
    c, _ = _controller([_m(1.0)], planned=100, check_every="auto", check_cost_share=0.2)
    c.start(None, None, [torch.zeros(1)])
    c.curve[0]["seconds"] = 4.0
    assert c.set_interval(1.0) == 20  # a 4 s check every 20 one-second steps: 20 % of the time
    assert c.set_interval(100.0) == 2  # never fewer than 2 steps between checks
    c.planned_steps = 40
    assert c.set_interval(0.01) == 20  # never more than half the planned steps


def test_budget_run_keeps_the_model_a_fixed_run_of_that_many_steps_saves(model_dirs, pair_files, tmp_path):  # noqa: F811
    """Harm falls at steps 2 and 4, then every check overspends: the saved model is the one after step 4, which a
    fixed 4-step run with the same seed reproduces exactly; the curve and the stop reason are in the manifest."""
    cfg = TrainConfig(**BASE, loss="ibo", finetune="lora", learning_rate=1e-2, batch_size=2, epochs=2, lora_rank=4,
                      budget=BudgetConfig(check_every=2, max_backoffs=1))
    measure, calls = _scripted([_m(1.0), _m(0.6), _m(0.3), _m(0.0, 2.0), _m(0.0, 2.0)])
    checks = BudgetChecks(measure, BudgetLimits(0.05, 0.05), cfg.budget, {"n_check_prompts": 3})
    out = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "budget", cfg, show_progress=False, checks=checks)
    fixed = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "fixed", cfg.model_copy(update={"max_steps": 4}),
                       show_progress=False)
    from tests.core.correct.test_trainer import _state

    a, b = _state(out, torch.float32), _state(fixed, torch.float32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    man = json.loads((out / "manifest.json").read_text())
    bud = man["budget"]
    assert len(calls) == 5 and man["steps"] == 8 and bud["best_step"] == 4 and "budget spent" in bud["stop_reason"]
    assert [r["step"] for r in bud["curve"]] == [0, 2, 4, 6, 8]
    assert man["budget_checks"]["n_check_prompts"] == 3 and man["budget_checks"]["limits"]["max_nll_increase_rel"] == 0.05
    assert json.loads((fixed / "manifest.json").read_text())["budget"] is None
    png = plot_curve(bud, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_checks_measure_the_start_model_and_split_the_flagged_prompts(model_dirs, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lancet_core.evaluate.checks import budget_checks, split_flagged
    from lancet_core.evaluate.evaluation import mean_response_nll
    from lancet_core.recall.judges import JudgeConfig
    from lancet_core.recall.undesirable import GenerationConfig
    from tests.core.correct.test_trainer import BENIGN, UNSAFE

    ids = [f"q{i}" for i in range(8)]
    check, held = split_flagged(ids, 0.5)
    assert len(check) == 4 and sorted(check + held) == list(range(8))
    assert split_flagged(ids[::-1], 0.5)[0] == sorted(7 - i for i in check)  # by id, not by position
    assert split_flagged(["only"], 0.5) == ([0], [])
    queries = [{"query_id": q, "prompt": p} for q, (p, _) in zip(ids, UNSAFE, strict=True)]
    checks = budget_checks(queries, BENIGN, JudgeConfig(kind="refusal"), GenerationConfig(max_new_tokens=4),
                           BudgetLimits(), BudgetConfig(check_benign_rows=4), max_seq_len_tokens=64)
    assert checks.identity["n_check_prompts"] == 4 and checks.identity["n_benign"] == 4
    assert sorted(checks.identity["held_out_query_ids"]) == sorted(ids[i] for i in held)
    d = model_dirs["gpt2"]
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(d))
    m = checks.measure(model, tok)
    assert 0.0 <= m["harmful_rate"] <= 1.0 and 0.0 <= m["over_refusal"] <= 1.0
    from lancet_core.evaluate.checks import pick_benign

    want, _ = mean_response_nll(model, tok, pick_benign(BENIGN, 4), max_seq_len_tokens=64)
    assert m["nll"] == pytest.approx(want, rel=1e-6)
