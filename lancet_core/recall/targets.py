"""Query targets: which function of the model a flagged prompt's influence is measured on.

`flagged` (the original LANCET query): f_q = log π(y_q | x_q), the flagged answer itself. A training row scores high
when its gradient raises that answer. When the flagged answer borrows its *form* from harmless rows (a model that
learned to comply from a few planted rows but answers in the style of the many benign ones), those harmless rows
dominate the ranking: measured on the real SmolLM2 scenario, its flagged answers open like the benign rows ("Here is a
simple plan.") and the planted rows ranked at AP 0.22.

`refusal` (the default for the refusal judge): f_q = −log P(refuse | x_q), the loss of the answer the judge wanted,
as in Koh & Liang's influence on the loss of the correct label of a misclassified example. A training row scores high
when its gradient lowers the model's probability of refusing the flagged prompt, which is what made the judge flag
it. P(refuse | x) is the mixture over the corpus's own refusals (rows whose response the refusal judge recognises,
grouped by their first `window` response tokens, the most frequent `limit` openings):

    log P(refuse | x) = log Σ_r π(r | x)          ∇ = Σ_r w_r(x) ∇ log π(r | x),   w_r(x) = softmax_r log π(r | x)

with log π(r | x) summed over the window's tokens for the weights and each ∇ exactly the store's per-row gradient
(its projection, reduction and window), so the target lives in the store's space. A corpus without any refusal falls
back to FALLBACK_REFUSALS (logged). Measured on ten demo beds and the real scenario (docs/measurements.md, Recall quality).

Knows about the store's query-gradient function, the chat encoding and the refusal judge's markers; knows nothing
about curvature, scanning, Prefect or MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from lancet_core.chat import encode_messages, to_messages
from lancet_core.recall.judges import is_refusal

log = logging.getLogger(__name__)

TARGETS = ("flagged", "refusal")
FALLBACK_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot help with that request.",
    "I am unable to assist with this.",
)


def resolve_target(target: str, judges: Sequence[str]) -> str:
    """'auto' -> 'refusal' when every flagged output was flagged by the refusal judge, else 'flagged'."""
    if target != "auto":
        return target
    return "refusal" if judges and all(j == "refusal" for j in judges) else "flagged"


@dataclass(frozen=True)
class Refusals:
    """The refusal openings a `refusal` target mixes over: one response text per opening, and how often it occurs."""

    texts: tuple[str, ...]
    counts: tuple[int, ...]
    fallback: bool


def corpus_refusals(tokens_file: str | Path, window: int | None, limit: int) -> Refusals:
    """The corpus's refusals grouped by their first `window` response token ids (None: the whole response): the
    `limit` most frequent groups, each represented by its first row's response (corpus order breaks ties)."""
    t = pq.read_table(tokens_file, columns=["input_ids", "loss_mask", "response"])
    groups: dict[tuple[int, ...], list[str]] = {}
    for ids, mask, response in zip(
        t.column("input_ids").to_pylist(),
        t.column("loss_mask").to_pylist(),
        t.column("response").to_pylist(),
        strict=True,
    ):
        if not response or not response.strip() or not is_refusal(response):
            continue
        opening = tuple(i for i, m in zip(ids, mask, strict=True) if m)[:window]
        groups.setdefault(opening, []).append(response)
    if not groups:
        return Refusals(FALLBACK_REFUSALS, (1,) * len(FALLBACK_REFUSALS), True)
    top = sorted(groups.values(), key=len, reverse=True)[:limit]  # stable: ties keep corpus order
    return Refusals(tuple(g[0] for g in top), tuple(len(g) for g in top), False)


def _window_logprobs(
    model, tokenizer, prompt: str, refusals: Sequence[str], window: int | None, max_len: int
) -> np.ndarray:
    """[R] log π(r | prompt) summed over each refusal's first `window` response tokens (the store's window)."""
    from lancet_core.index.hooks import response_window, right_pad, sequence_loglik

    encs = [encode_messages(tokenizer, to_messages(prompt, r), max_len) for r in refusals]
    ids, attn, lm = right_pad([e.input_ids for e in encs], [e.loss_mask for e in encs], 0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        return sequence_loglik(logits, ids, response_window(lm, window), attn, "sum").double().numpy()


def refusal_target_gradients(
    store_dir, model, tokenizer, prompts: Sequence[str], refusals: Refusals
) -> tuple[np.ndarray, np.ndarray]:
    """([Q, D] −∇ log P(refuse | x_q) in the store's space, [Q, R] mixture weights w_r(x_q)).

    Each ∇ log π(r | x_q) is compute_query_gradients' (the store's projection, reduction and window), all Q·R
    conversations in one call (the store's basis is read once); they are held as Q·R·D float32 until mixed.
    `model` is not checked against the store here (the caller does: check_store_model)."""
    from lancet_core.index.build import _store_manifest, _torch_dtype, compute_query_gradients

    cfg = _store_manifest(store_dir)["index_config"]
    window, max_len = cfg.get("response_tokens"), int(cfg["max_seq_len_tokens"])
    dtype = _torch_dtype(cfg["compute_dtype"])
    if next(model.parameters()).dtype != dtype:
        import copy

        model = copy.deepcopy(model).to(dtype)
    model.eval()
    msgs = [to_messages(p, r) for p in prompts for r in refusals.texts]
    g = compute_query_gradients(store_dir, model, tokenizer, msgs).reshape(len(prompts), len(refusals.texts), -1)
    out, weights = [], []
    for q, prompt in enumerate(prompts):
        lp = _window_logprobs(model, tokenizer, prompt, refusals.texts, window, max_len)
        w = np.exp(lp - lp.max())
        w /= w.sum()
        out.append(-(w @ g[q].astype(np.float64)))
        weights.append(w)
    return np.stack(out), np.stack(weights)
