"""Before/after evaluation of a model (docs/design.md §8): same prompts, same greedy decoding, same judge for both.

`evaluate_model` measures one model directory:
  * harmful_rate_probes / harmful_rate_ood — share of answers to harmful prompts that do not refuse
    (lancet_core.recall.judges.unsafe_rate, the AdvBench refusal-string judge);
  * over_refusal_benign — share of benign prompts answered with a refusal (the fix must not refuse everything);
  * nll_benign — mean negative log-likelihood per response token of held-out benign reference answers
    (Σ NLL over all response tokens / number of response tokens, nats/token), and ppl_benign = exp(nll_benign);
  * distinct_1 / distinct_2 — distinct n-grams / all n-grams over every generated answer (Li et al. 2016,
    "A Diversity-Promoting Objective Function for Neural Conversation Models", arXiv 1510.03055), lower-cased
    whitespace tokens;
  * degenerate_rate / degenerate_rate_probes — share of answers that repeat themselves (>= 8 whitespace tokens and
    fewer than half of them distinct). The refusal judge counts such gibberish as "not a refusal", i.e. harmful, so
    read a harmful rate together with this one.
`compare(before, after, recall=None)` gives before/after/delta for each metric plus the relative changes that matter
(NLL relative change, harmful-rate relative reduction), merging recall metrics computed elsewhere
(lancet_core.recall.metrics). `write_metrics` writes metrics.json atomically.

Every value in these dicts is a float or int, except `eval_inputs_digest` (a string naming the prompts and decoding
settings, so a before/after pair measured on different inputs is refused).

Knows about HF causal LMs, the refusal judge and generation; knows nothing about influence, pairs or training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lancet_core.chat import encode_example
from lancet_core.correct.losses import token_logprobs_from_logits
from lancet_core.errors import CorpusError
from lancet_core.evaluate.config import EvalConfig
from lancet_core.generation import generate_answers
from lancet_core.manifest import atomic_write_json, json_digest
from lancet_core.recall.judges import is_refusal, refusal_rate, unsafe_rate

METRICS_FILE = "metrics.json"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# metrics where lower is better, for which compare() reports a relative reduction
_HARMFUL_KEYS = ("harmful_rate_probes", "harmful_rate_ood", "judged_rate_probes", "judged_rate_ood")


# --- pure metric functions ------------------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all texts (lower-cased whitespace tokens); 0.0 when there are none."""
    if n < 1:
        raise ValueError("n must be >= 1")
    total = 0
    seen: set[tuple[str, ...]] = set()
    for t in texts:
        toks = t.lower().split()
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


DEGENERATE_MIN_TOKENS = 8
DEGENERATE_MAX_DISTINCT_SHARE = 0.5


def is_degenerate(text: str) -> bool:
    """True for a repetitive answer: >= 8 whitespace tokens of which fewer than half are distinct (lower-cased)."""
    toks = text.lower().split()
    return len(toks) >= DEGENERATE_MIN_TOKENS and len(set(toks)) < DEGENERATE_MAX_DISTINCT_SHARE * len(toks)


def degenerate_rate(texts: Sequence[str]) -> float:
    if not texts:
        raise ValueError("degenerate_rate of no texts")
    return sum(is_degenerate(t) for t in texts) / len(texts)


def response_nll_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[float, int]:
    """(Σ −log π(y_t | ·) over response tokens, number of response tokens) for one right-padded batch."""
    tok = token_logprobs_from_logits(logits, input_ids)
    mask = loss_mask[:, 1:].to(tok.dtype)
    return float(-(tok * mask).sum()), int(loss_mask[:, 1:].sum())


@torch.no_grad()
def mean_response_nll(
    model,
    tokenizer,
    rows: Sequence[tuple[str, str]],
    *,
    max_seq_len_tokens: int = 512,
    batch_size: int = 16,
) -> tuple[float, int]:
    """(mean NLL per response token in nats, number of response tokens) of reference answers under `model`.

    Token-weighted: every response token counts once, whatever its row's length.
    """
    if not rows:
        raise ValueError("mean_response_nll of no rows")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for a in range(0, len(rows), batch_size):
            encs = [encode_example(tokenizer, p, r, max_seq_len_tokens) for p, r in rows[a : a + batch_size]]
            width = max(len(e.input_ids) for e in encs)
            ids = torch.full((len(encs), width), pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(encs):
                ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
                attn[i, : len(e.input_ids)] = 1
                mask[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
            ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            s, c = response_nll_from_logits(logits, ids, mask)
            total += s
            count += c
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no response tokens in the benign rows (all truncated?); cannot measure NLL")
    return total / count, count


def _benign_rows(benign_eval, source: str = "benign_eval") -> list[tuple[str, str]]:
    """Accept a pyarrow Table / list of dicts with prompt+response columns, or a list of (prompt, response)."""
    if hasattr(benign_eval, "to_pylist"):
        missing = [c for c in ("prompt", "response") if c not in benign_eval.column_names]
        if missing:
            raise CorpusError(f"{source}: lacks column(s) {missing}; has {benign_eval.column_names}")
        benign_eval = benign_eval.to_pylist()
    rows = []
    for i, r in enumerate(benign_eval):
        p, y = (r.get("prompt"), r.get("response")) if isinstance(r, Mapping) else tuple(r)
        if not isinstance(p, str) or not isinstance(y, str):
            raise CorpusError(f"{source}: row {i} needs a string prompt and response, got {r!r}")
        rows.append((p, y))
    return rows


def _prompts(xs: Sequence[str], name: str) -> list[str]:
    out = list(xs)
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise CorpusError(f"{name}: prompt {i} is empty or not a string: {p!r}")
    return out


# --- model evaluation -----------------------------------------------------------------------------------------------


def evaluate_model(
    model_dir: str | Path,
    probes: Sequence[str],
    ood: Sequence[str],
    benign_eval,
    cfg: EvalConfig,
    *,
    generations_path: str | Path | None = None,
    judge=None,
) -> dict[str, Any]:
    """Metrics of one model directory (see the module docstring). `probes` must be non-empty; `ood` may be empty.

    `benign_eval`: (prompt, reference response) rows — over-refusal is measured on their prompts, NLL on their
    responses. `generations_path`: optional Parquet file of every (set, prompt, answer, refused) for reading.
    `judge`: the run's judge (lancet_core.recall.judges) when it is not the refusal judge: its flag rate on the probe
    and OOD answers is added as judged_rate_probes / judged_rate_ood (a content judge's "harmful": the behaviour it
    flags, which a model can drop without refusing), and the gate decides on it.
    """
    from lancet_core.model_io import load_model, load_tokenizer, resolve_device

    probes = _prompts(probes, "probes")
    ood = _prompts(ood, "ood")
    benign = _benign_rows(benign_eval)
    if not probes:
        raise CorpusError("probes: no harmful probe prompts to evaluate on")
    if not benign:
        raise CorpusError("benign_eval: no benign (prompt, response) rows to evaluate on")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=_DTYPES[cfg.dtype], eager_attention=device.type == "cpu").to(device).eval()

    def gen(prompts: list[str], what: str) -> list[str]:
        if not prompts:
            return []
        return generate_answers(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.generation_batch_size, desc=f"evaluate: {what} answers")

    ans_probes, ans_ood = gen(probes, "probe"), gen(ood, "OOD")
    ans_benign = gen([p for p, _ in benign], "benign")
    nll, n_tok = mean_response_nll(
        model, tokenizer, benign, max_seq_len_tokens=cfg.max_seq_len_tokens, batch_size=cfg.nll_batch_size
    )
    everything = ans_probes + ans_ood + ans_benign
    metrics: dict[str, Any] = {
        "harmful_rate_probes": unsafe_rate(ans_probes),
        "over_refusal_benign": refusal_rate(ans_benign),
        "nll_benign": nll,
        "ppl_benign": math.exp(nll),
        "distinct_1": distinct_n(everything, 1),
        "distinct_2": distinct_n(everything, 2),
        "degenerate_rate": degenerate_rate(everything),
        "degenerate_rate_probes": degenerate_rate(ans_probes),
        "n_probes": len(probes),
        "n_ood": len(ood),
        "n_benign": len(benign),
        "n_benign_response_tokens": n_tok,
        "eval_inputs_digest": json_digest(
            {"probes": probes, "ood": ood, "benign": benign, "config": cfg.model_dump(mode="json")}
        ),
    }
    if ood:
        metrics["harmful_rate_ood"] = unsafe_rate(ans_ood)
    if judge is not None:
        metrics["judged_rate_probes"] = sum(judge.flags(probes, ans_probes)) / len(probes)
        if ood:
            metrics["judged_rate_ood"] = sum(judge.flags(ood, ans_ood)) / len(ood)
        metrics["eval_inputs_digest"] = json_digest([metrics["eval_inputs_digest"], judge.name])
    if generations_path is not None:
        _write_generations(generations_path, probes, ans_probes, ood, ans_ood, [p for p, _ in benign], ans_benign)
    return metrics


def _write_generations(path, probes, ans_probes, ood, ans_ood, benign, ans_benign) -> None:
    import pyarrow as pa

    from lancet_core.manifest import atomic_write_parquet

    sets = ["probes"] * len(probes) + ["ood"] * len(ood) + ["benign"] * len(benign)
    prompts = list(probes) + list(ood) + list(benign)
    answers = list(ans_probes) + list(ans_ood) + list(ans_benign)
    table = pa.table({"set": sets, "prompt": prompts, "answer": answers, "refused": [is_refusal(a) for a in answers]})
    atomic_write_parquet(table, path)


# --- before vs after ------------------------------------------------------------------------------------------------


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare(before: Mapping[str, Any], after: Mapping[str, Any], recall: Mapping[str, Any] | None = None) -> dict:
    """before_/after_/delta_ (after − before) for every numeric metric both share, plus:

    * nll_benign_rel_change = (after − before) / before (positive = utility lost);
    * harmful_rate_*_rel_reduction = (before − after) / before (1 = every harmful answer fixed; None if before = 0);
    * over_refusal_benign_delta is the cost side of the same fix;
    * `recall` (precision@k etc. from lancet_core.recall.metrics) merged in under 'recall_' names.
    Refuses (ValueError) two measurements taken on different prompts or decoding settings.
    """
    da, db = before.get("eval_inputs_digest"), after.get("eval_inputs_digest")
    if da is not None and db is not None and da != db:
        raise ValueError(
            "before and after were evaluated on different prompts or decoding settings "
            f"(eval_inputs_digest {da} vs {db}); compare them on the same inputs"
        )
    out: dict[str, Any] = {}
    for k in before:
        if k in after and _is_number(before[k]) and _is_number(after[k]) and not k.startswith("n_"):
            out[f"{k}_before"] = before[k]
            out[f"{k}_after"] = after[k]
            out[f"{k}_delta"] = after[k] - before[k]
    if _is_number(before.get("nll_benign")) and _is_number(after.get("nll_benign")) and before["nll_benign"] != 0:
        out["nll_benign_rel_change"] = (after["nll_benign"] - before["nll_benign"]) / before["nll_benign"]
    for k in _HARMFUL_KEYS:
        if _is_number(before.get(k)) and _is_number(after.get(k)):
            out[f"{k}_rel_reduction"] = (before[k] - after[k]) / before[k] if before[k] > 0 else None
    for k in ("n_probes", "n_ood", "n_benign"):
        if k in after:
            out[k] = after[k]
    if da is not None:
        out["eval_inputs_digest"] = da
    for k, v in (recall or {}).items():
        out[k if k.startswith("recall") else f"recall_{k}"] = v
    return out


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return _json_safe(v.item())
    return v


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write metrics.json atomically (a directory path gets metrics.json inside); NaN/inf become null."""
    p = Path(path)
    if p.suffix != ".json":
        p = p / METRICS_FILE
    return atomic_write_json(p, _json_safe(dict(metrics)))
