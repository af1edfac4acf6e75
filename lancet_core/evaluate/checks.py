"""The check set of budget-driven training (lancet_core.correct.budget): what a check measures, and on which rows.

`budget_checks(queries, benign_rows, judge_cfg, gen_cfg, limits, cfg)` splits the flagged prompts by a hash of their
query id — `cfg.check_share` of them go to the checks, the rest stay unseen (`held_out_prompts`), so the
after-evaluation on them is a held-out figure — and draws `cfg.check_benign_rows` benign rows (seeded by their content).
Its measure answers the check prompts and the benign prompts greedily, in one batch list, and returns the check
prompts' harmful rate by the run's judge, the benign prompts' refusal rate and the benign reference answers' mean
NLL per response token.

Knows about judges, generation and the NLL metric; knows nothing about training, files or orchestration.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from lancet_core.correct.budget import BudgetChecks, BudgetConfig, BudgetLimits
from lancet_core.manifest import json_digest
from lancet_core.recall.judges import JudgeConfig, make_judge, refusal_rate
from lancet_core.recall.undesirable import GenerationConfig


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split_flagged(query_ids: Sequence[str], share: float) -> tuple[list[int], list[int]]:
    """(check indices, held-out indices) of the flagged prompts: the first ⌈share · n⌉ by sha256 of the query id (at
    least one), the rest held out. Deterministic and independent of the rows' order."""
    order = sorted(range(len(query_ids)), key=lambda i: _key(str(query_ids[i])))
    k = min(len(order), max(1, math.ceil(share * len(order)))) if order else 0
    return sorted(order[:k]), sorted(order[k:])


def pick_benign(rows: Sequence[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """n benign (prompt, response) rows, chosen by a hash of their text (all of them when there are fewer)."""
    order = sorted(range(len(rows)), key=lambda i: _key(rows[i][0] + "\x00" + rows[i][1]))
    return [rows[i] for i in sorted(order[:n])]


def budget_checks(queries: Sequence[dict], benign_rows: Sequence[tuple[str, str]], judge_cfg: JudgeConfig,
                  gen_cfg: GenerationConfig, limits: BudgetLimits, cfg: BudgetConfig,
                  max_seq_len_tokens: int = 512) -> BudgetChecks:
    """The BudgetChecks for one run: `queries` are the flagged probe answers' rows (query_id, prompt), `benign_rows`
    the benign evaluation (prompt, reference response) rows."""
    from lancet_core.evaluate.evaluation import mean_response_nll
    from lancet_core.generation import generate_answers

    if not queries:
        raise ValueError("budget checks need at least one flagged prompt")
    if not benign_rows:
        raise ValueError("budget checks need benign evaluation rows")
    check_idx, held_idx = split_flagged([q["query_id"] for q in queries], cfg.check_share)
    check_prompts = [queries[i]["prompt"] for i in check_idx]
    benign = pick_benign(list(benign_rows), cfg.check_benign_rows)
    judge = make_judge(judge_cfg)
    gen = {k: v for k, v in gen_cfg.model_dump().items()}

    def measure(model, tokenizer) -> dict:
        prompts = check_prompts + [p for p, _ in benign]
        answers = generate_answers(model, tokenizer, prompts, **gen, desc="budget check")
        flags = judge.flags(check_prompts, answers[: len(check_prompts)])
        nll, _ = mean_response_nll(model, tokenizer, benign, max_seq_len_tokens=max_seq_len_tokens)
        return {"harmful_rate": sum(flags) / len(flags), "over_refusal": refusal_rate(answers[len(check_prompts):]),
                "nll": nll}

    identity = {"check_prompts_digest": json_digest(check_prompts), "benign_digest": json_digest(benign),
                "judge": judge_cfg.model_dump(mode="json"), "generation": gen_cfg.model_dump(mode="json"),
                "n_check_prompts": len(check_prompts), "n_benign": len(benign),
                "held_out_query_ids": [str(queries[i]["query_id"]) for i in held_idx]}
    return BudgetChecks(measure=measure, limits=limits, cfg=cfg, identity=identity)


def held_out_harmful_rate(answers: dict[str, str], held_out_prompts: Sequence[str], judge_cfg: JudgeConfig) -> float | None:
    """The run's judge's harmful rate on the flagged prompts no budget check answered, from an evaluation's answers
    (prompt -> answer); None when there are none. Every one of them was flagged before the correction, so 1.0 is the
    "before"."""
    prompts = [p for p in held_out_prompts if p in answers]
    if not prompts:
        return None
    flags = make_judge(judge_cfg).flags(prompts, [answers[p] for p in prompts])
    return sum(flags) / len(flags)
