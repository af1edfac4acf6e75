"""Budget-driven post-training: train until the flagged behaviour is gone or the utility budget is spent.

A fixed step count and learning rate chosen on small beds stop short elsewhere: on a held-out real case IBO's defaults
cut probe harm by 18 % while using almost none of the allowed utility loss (docs/measurements.md). So the trainer asks
a `BudgetController` after every step whether to go on. Every `check_every` steps (chosen so that checks cost about
`check_cost_share` of the training time) the controller measures the model on a held-out *check set* — greedy answers
to a split of the flagged prompts (harmful rate, by the run's judge) and to benign prompts (over-refusal), and the
benign reference answers' NLL — through a `measure(model, tokenizer)` callable it is given, and then:

* keeps a snapshot of the trainable weights when the harmful rate is the lowest yet and the budget holds
  (NLL within `max_nll_increase_rel` of the start, over-refusal within `max_over_refusal_increase` points);
* stops when the harmful rate reached `target_harmful_rate` within the budget ("gone");
* doubles the learning rate (up to `max_lr_scale`) when the harmful rate did not improve since the last check, the best
  so far is still above half the start's and less than half the budget is used — the starting learning rate is a
  guess, not the answer (it stays put once the behaviour is mostly gone: more steps then overfit the pairs, and the
  demo's harm rises again after its best check);
* stops after `patience` checks in a row without a new best ("no progress");
* when the budget is exceeded, restores the best snapshot, halves the learning rate and restarts the optimiser; after
  `max_backoffs` such returns it stops ("budget spent");
* stops at `max_steps_factor` × the planned steps ("step cap").
The trainer saves the best snapshot, never the last step. `curve` records every check (the harm/utility curve logged
to MLflow); `plot_curve` draws it.

Knows about torch tensors and the budget's numbers; knows nothing about judges, generation, files or MLflow (the
measure is injected: lancet_core.evaluate.checks builds it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class BudgetConfig(BaseModel):
    """How budget-driven training checks and adapts (the budget itself, NLL and over-refusal, is the gate's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        True, description="train until the flagged behaviour is gone on held-out flagged prompts or the utility budget "
        "(gate.max_nll_increase_rel, gate.max_over_refusal_increase) is spent, keeping the best checkpoint inside it; "
        "false = the fixed schedule (epochs / max_steps)")
    check_every: int | Literal["auto"] = Field(
        "auto", description="optimizer steps between checks; 'auto' = as many as keep the checks near "
        "check_cost_share of the training time (from the first check's and the first step's times), between 2 and half "
        "the planned steps")
    check_cost_share: float = Field(
        0.15, gt=0.0, le=1.0, description="target share of the time spent on the periodic checks; the start check "
        "comes on top (with 0.2 the checks took 21-25 % of the training time in all on the demo and the backdoor bed; "
        "docs/measurements.md, 'Budget-driven IBO')")
    check_share: float = Field(
        0.5, gt=0.0, le=1.0, description="share of the flagged prompts the checks answer (chosen by a hash of the "
        "query id); the rest are never seen by a check, so the after-evaluation on them is held out")
    check_benign_rows: int = Field(32, ge=1, description="benign evaluation rows the checks use (over-refusal, NLL)")
    target_harmful_rate: float = Field(0.0, ge=0.0, le=1.0, description="stop when the check set's rate is this low")
    max_steps_factor: float = Field(4.0, ge=1.0, description="at most this × the planned steps (epochs / max_steps)")
    max_lr_scale: float = Field(8.0, ge=1.0, description="the learning rate grows at most to this × its start")
    max_backoffs: int = Field(2, ge=0, description="returns to the best checkpoint after overspending, then stop")
    patience: int = Field(3, ge=1, description="stop after this many checks in a row without a new best")


@dataclass(frozen=True)
class BudgetLimits:
    """The utility budget: the largest relative benign-NLL rise and over-refusal rise allowed (the gate's numbers)."""

    max_nll_increase_rel: float = 0.05
    max_over_refusal_increase: float = 0.05

    def used(self, nll_rel: float, over_refusal_delta: float) -> float:
        """Share of the budget used: the larger of the two ratios (1.0 = at the limit)."""
        parts = [max(0.0, nll_rel) / self.max_nll_increase_rel if self.max_nll_increase_rel > 0 else
                 (math.inf if nll_rel > 0 else 0.0),
                 max(0.0, over_refusal_delta) / self.max_over_refusal_increase if self.max_over_refusal_increase > 0
                 else (math.inf if over_refusal_delta > 0 else 0.0)]
        return max(parts)


Measure = Callable[[Any, Any], dict]  # (model, tokenizer) -> {"harmful_rate", "over_refusal", "nll"}


@dataclass(frozen=True)
class BudgetChecks:
    """What the trainer needs to train on a budget: the measure, the limits, the config, and the identity of the check
    set (digests of its prompts and rows, the judge, decoding), which keys the trained model's manifest."""

    measure: Measure
    limits: BudgetLimits
    cfg: BudgetConfig
    identity: dict


@dataclass
class BudgetController:
    checks: BudgetChecks
    planned_steps: int
    curve: list[dict] = field(default_factory=list)
    lr_scale: float = 1.0
    every: int | None = None
    backoffs: int = 0
    since_best: int = 0
    best_step: int = 0
    stop_reason: str | None = None
    reset_optimizer: bool = False
    check_seconds: float = 0.0
    _start: dict | None = None
    _best: tuple[float, float] | None = None
    _snapshot: list | None = None

    @property
    def cfg(self) -> BudgetConfig:
        return self.checks.cfg

    @property
    def max_steps(self) -> int:
        return max(1, math.ceil(self.planned_steps * self.cfg.max_steps_factor))

    def _measure(self, model, tokenizer) -> dict:
        t0 = time.perf_counter()
        m = self.checks.measure(model, tokenizer)
        dt = time.perf_counter() - t0
        self.check_seconds += dt
        return {**m, "seconds": round(dt, 3)}

    def _record(self, step: int, m: dict, action: str) -> dict:
        s = self._start or m
        nll_rel = (m["nll"] - s["nll"]) / s["nll"] if s["nll"] else 0.0
        orr = m["over_refusal"] - s["over_refusal"]
        row = {"step": step, "harmful_rate": m["harmful_rate"], "over_refusal": m["over_refusal"], "nll": m["nll"],
               "nll_rel_change": nll_rel, "over_refusal_delta": orr,
               "budget_used": self.checks.limits.used(nll_rel, orr), "lr_scale": self.lr_scale,
               "seconds": m["seconds"], "action": action}
        self.curve.append(row)
        return row

    def start(self, model, tokenizer, params: Sequence) -> None:
        """The step-0 check: the start model's values, against which the budget is measured; the first snapshot."""
        m = self._measure(model, tokenizer)
        self._start = m
        self._snapshot = [p.detach().clone() for p in params]
        self._best = (m["harmful_rate"], m["nll"])
        row = self._record(0, m, "start")
        if row["harmful_rate"] <= self.cfg.target_harmful_rate:
            self.stop_reason = "nothing flagged on the check prompts at the start"

    def set_interval(self, step_seconds: float) -> int:
        """check_every, fixed after the first step: the configured value, or (auto) the number of steps whose time is
        check_cost_share⁻¹ × the start check's, within [2, max(2, planned/2)]."""
        if self.cfg.check_every != "auto":
            self.every = int(self.cfg.check_every)
        else:
            t_check = self.curve[0]["seconds"] if self.curve else 0.0
            want = math.ceil(t_check / (self.cfg.check_cost_share * max(step_seconds, 1e-6)))
            self.every = int(min(max(2, want), max(2, self.planned_steps // 2)))
        return self.every

    def due(self, step: int) -> bool:
        return self.every is not None and (step % self.every == 0 or step == self.max_steps)

    def check(self, step: int, model, tokenizer, params: Sequence) -> bool:
        """Measure at `step` and act; True = go on training. Restoring the best snapshot copies it into `params` and
        sets reset_optimizer (the trainer then starts a fresh optimiser)."""
        m = self._measure(model, tokenizer)
        s = self._start
        nll_rel = (m["nll"] - s["nll"]) / s["nll"] if s["nll"] else 0.0
        used = self.checks.limits.used(nll_rel, m["over_refusal"] - s["over_refusal"])
        within = used <= 1.0 + 1e-12
        prev = self.curve[-1]
        if within and (m["harmful_rate"], m["nll"]) < self._best:
            improved = m["harmful_rate"] < self._best[0]
            self._best, self.best_step = (m["harmful_rate"], m["nll"]), step
            self._snapshot = [p.detach().clone() for p in params]
            action = "best"
        else:
            improved, action = False, "kept"
        self.since_best = 0 if action == "best" else self.since_best + 1
        go = True
        if not within:
            self.backoffs += 1
            for p, b in zip(params, self._snapshot, strict=True):
                p.data.copy_(b)
            self.lr_scale /= 2
            self.reset_optimizer = True
            action = f"over budget: back to step {self.best_step}, lr ×{self.lr_scale:g}"
            if self.backoffs > self.cfg.max_backoffs:
                go, self.stop_reason = False, f"budget spent ({self.backoffs} returns to the best checkpoint)"
        elif m["harmful_rate"] <= self.cfg.target_harmful_rate:
            go, self.stop_reason = False, "flagged behaviour gone on the check prompts"
        elif self.since_best >= self.cfg.patience:
            go, self.stop_reason = False, f"no progress in {self.since_best} checks"
        elif not improved and m["harmful_rate"] >= prev["harmful_rate"] and used < 0.5 \
                and self._best[0] > 0.5 * s["harmful_rate"] and self.lr_scale < self.cfg.max_lr_scale:
            self.lr_scale = min(self.lr_scale * 2, self.cfg.max_lr_scale)
            action += f", stalled: lr ×{self.lr_scale:g}"
        if go and step >= self.max_steps:
            go, self.stop_reason = False, f"step cap ({self.max_steps} = {self.cfg.max_steps_factor:g} × planned)"
        self._record(step, m, action)
        return go

    def restore_best(self, params: Sequence) -> None:
        """Copy the best snapshot (lowest check-set harm within the budget) into `params`."""
        for p, b in zip(params, self._snapshot, strict=True):
            p.data.copy_(b)

    def summary(self, train_seconds: float) -> dict:
        """What the manifest and the run record: the curve, the best step, why it stopped, the checks' time share."""
        best = next((r for r in self.curve if r["step"] == self.best_step), None)
        return {"curve": self.curve, "best_step": self.best_step, "best": best, "stop_reason": self.stop_reason,
                "check_every": self.every, "check_seconds": round(self.check_seconds, 3),
                "check_share_of_time": round(self.check_seconds / train_seconds, 4) if train_seconds > 0 else None,
                "limits": vars(self.checks.limits), "config": self.cfg.model_dump(mode="json")}


def plot_curve(budget: dict, path: str | Path) -> Path:
    """A PNG of the harm/utility curve (harmful rate on the check prompts; budget used) over optimizer steps, the kept
    checkpoint marked. `budget` is BudgetController.summary's dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = budget["curve"]
    steps = [r["step"] for r in curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(steps, [r["harmful_rate"] for r in curve], "o-", color="tab:red", label="harmful rate (check prompts)")
    ax.plot(steps, [min(r["budget_used"], 2.0) for r in curve], "s--", color="tab:blue",
            label="utility budget used (1 = limit)")
    ax.axhline(1.0, color="tab:blue", lw=0.8, alpha=0.5)
    ax.axvline(budget["best_step"], color="k", lw=0.8, ls=":", label=f"kept: step {budget['best_step']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.05, max(1.1, min(2.0, max(r["budget_used"] for r in curve)) + 0.1))
    ax.set_title(f"IBO on a budget — {budget.get('stop_reason') or 'finished'}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
