"""Post-training losses as pure functions in a registry (name -> LossSpec), plus the two model-side reductions they use.

Every loss takes per-sequence log-likelihoods (policy and frozen reference) and per-example weights, and returns
`LossTerms`: per-example preference/forgetting terms and, optionally, per-row retain KL terms, so the caller can
reduce them exactly over a gradient-accumulated batch (`LossTerms.accumulation_loss`). Closed forms are tested in
tests/core/test_losses.py.

Reductions, made explicit once here:
  * sequence log-likelihood log π(y|x) = SUM over the response tokens (loss_mask == 1) of log π(y_t | x, y_<t);
  * retain KL of one row z = MEAN over z's response tokens of KL(π_ref(·|z,t) ‖ π_θ(·|z,t)) (full-vocabulary KL);
    the retain term is then the mean over retain rows (E_{z∈retain}), which keeps gradient accumulation exact.

Sign conventions: "chosen" = the sequence to make more likely (IBO: w ∈ R⁻, the counteracting row), "rejected" = the
one to make less likely (IBO: l ∈ R⁺, the misbehaviour-promoting row). Weights ω are per pair/example; they are never
derived here.

Knows about torch tensors and, for the model-side helpers, a HF causal LM's forward; knows nothing about files,
influence scores, label columns, pairing or optimisation.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossTerms:
    """The pieces of a loss on one (micro-)batch.

    per_example: [B] weighted per-pair (or per-sequence) terms; their mean is E_pairs[...].
    retain_kl_per_row: [R] per-row token-mean KL(π_ref ‖ π_θ) on retain rows, or None when the term is off.
    lambda_b: weight of the retain (Bregman proximal) term.
    """

    per_example: Tensor
    retain_kl_per_row: Tensor | None
    lambda_b: float

    @property
    def preference(self) -> Tensor:
        return self.per_example.mean()

    @property
    def retain_kl(self) -> Tensor:
        if self.retain_kl_per_row is None or self.retain_kl_per_row.numel() == 0:
            return self.per_example.new_zeros(())
        return self.retain_kl_per_row.mean()

    @property
    def loss(self) -> Tensor:
        """E_examples[per_example] + λ_B · E_retain[KL]: the loss on this batch alone."""
        if self.lambda_b == 0.0 or self.retain_kl_per_row is None:
            return self.preference
        return self.preference + self.lambda_b * self.retain_kl

    def accumulation_loss(self, n_examples_in_step: int, n_retain_in_step: int) -> Tensor:
        """This micro-batch's share of the loss of a whole optimizer step (sums divided by the step's counts).

        Summing this over the micro-batches of a step gives exactly `loss` on the step's full batch, whatever the
        micro-batch split (the retain term is a mean over rows, each row's KL already a mean over its own tokens).
        """
        out = self.per_example.sum() / n_examples_in_step
        if self.lambda_b != 0.0 and self.retain_kl_per_row is not None and self.retain_kl_per_row.numel():
            out = out + retain_accumulation_loss(self.retain_kl_per_row, self.lambda_b, n_retain_in_step)
        return out


def retain_accumulation_loss(retain_kl_per_row: Tensor, lambda_b: float, n_retain_in_step: int) -> Tensor:
    """A micro-batch's share of the retain term λ_B · E_retain[KL] of a whole step (its rows' KL summed, divided by
    the step's retain rows); the trainer backpropagates it apart from the pair term."""
    return lambda_b * retain_kl_per_row.sum() / n_retain_in_step


def _check_same_shape(**tensors: Tensor | None) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"loss inputs must share one shape [B]; got {shapes}")
    for k, s in shapes.items():
        if len(s) != 1:
            raise ValueError(f"loss input {k} must be 1-D [B] (one value per sequence); got shape {s}")


def _weights(weight: Tensor | None, like: Tensor) -> Tensor:
    if weight is None:
        return torch.ones_like(like)
    return weight.to(like.dtype)


def _required(name: str, loss: str, t: Tensor | None) -> Tensor:
    if t is None:
        raise ValueError(f"loss {loss!r} needs {name}")
    return t


def ibo_loss(
    *,
    policy_chosen_logp: Tensor | None,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor | None,
    ref_rejected_logp: Tensor | None,
    weight: Tensor | None = None,
    beta: float,
    retain_kl_per_row: Tensor | None = None,
    lambda_b: float = 0.0,
) -> LossTerms:
    """Influence-driven Bregman optimisation (LANCET, Wang et al., AAAI 2025, arXiv 2412.16451; docs/design.md §7).

    With Δ_θ(z) = log π_θ(y|x) − log π_θs(y|x) (θ_s = frozen reference, sequence sums over response tokens), pairs
    (w ∈ R⁻ = chosen, l ∈ R⁺ = rejected) and influence weights ω:

        L = E_pairs[ −ω · log σ(β · (Δ_θ(w) − Δ_θ(l))) ] + λ_B · E_{z∈retain}[ KL(π_θs(·|z) ‖ π_θ(·|z)) ]

    The second term is the Bregman divergence of the cross-entropy in output space: the proximal term of the
    proximal Bregman response function that influence functions approximate.
    """
    pc = _required("policy_chosen_logp", "ibo", policy_chosen_logp)
    rc = _required("ref_chosen_logp", "ibo", ref_chosen_logp)
    rr = _required("ref_rejected_logp", "ibo", ref_rejected_logp)
    pr = policy_rejected_logp
    _check_same_shape(pc=pc, pr=pr, rc=rc, rr=rr, weight=weight)
    delta_w = pc - rc
    delta_l = pr - rr
    per = -_weights(weight, pc) * F.logsigmoid(beta * (delta_w - delta_l))
    return LossTerms(per, retain_kl_per_row, float(lambda_b))


def dpo_loss(
    *,
    policy_chosen_logp: Tensor | None,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor | None,
    ref_rejected_logp: Tensor | None,
    weight: Tensor | None = None,
    beta: float,
    retain_kl_per_row: Tensor | None = None,
    lambda_b: float = 0.0,
) -> LossTerms:
    """Direct Preference Optimisation (Rafailov et al., NeurIPS 2023, arXiv 2305.18290) on dataset chosen/rejected pairs.

        L = E_pairs[ −log σ(β · ((log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x)))) ]

    The human-preference baseline. `weight` is honoured when given (pairs_from_preference_columns writes 1.0), and the
    optional retain KL term is the same as IBO's.
    """
    pc = _required("policy_chosen_logp", "dpo", policy_chosen_logp)
    rc = _required("ref_chosen_logp", "dpo", ref_chosen_logp)
    rr = _required("ref_rejected_logp", "dpo", ref_rejected_logp)
    pr = policy_rejected_logp
    _check_same_shape(pc=pc, pr=pr, rc=rc, rr=rr, weight=weight)
    logits = (pc - pr) - (rc - rr)
    per = -_weights(weight, pc) * F.logsigmoid(beta * logits)
    return LossTerms(per, retain_kl_per_row, float(lambda_b))


def ga_loss(
    *,
    policy_chosen_logp: Tensor | None = None,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor | None = None,
    ref_rejected_logp: Tensor | None = None,
    weight: Tensor | None = None,
    beta: float = 1.0,
    retain_kl_per_row: Tensor | None = None,
    lambda_b: float = 0.0,
) -> LossTerms:
    """Gradient ascent on the forget set R⁺ (Jang et al. 2022, arXiv 2210.01504; Yao et al. 2023, "Large Language Model
    Unlearning", arXiv 2310.10683): minimise E[ω · log π_θ(y_l|x_l)], i.e. ascend the NLL of the rejected rows.

    Unbounded below by design (that is GA's known failure mode); `beta` and the reference are unused.
    """
    pr = policy_rejected_logp
    _check_same_shape(pr=pr, weight=weight)
    per = _weights(weight, pr) * pr
    return LossTerms(per, retain_kl_per_row, float(lambda_b))


def npo_loss(
    *,
    policy_chosen_logp: Tensor | None = None,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor | None = None,
    ref_rejected_logp: Tensor | None,
    weight: Tensor | None = None,
    beta: float,
    retain_kl_per_row: Tensor | None = None,
    lambda_b: float = 0.0,
) -> LossTerms:
    """Negative Preference Optimisation (Zhang et al. 2024, arXiv 2404.05868) on the forget set R⁺:

        L = (2/β) · E[ ω · log(1 + (π_θ(y|x) / π_ref(y|x))^β) ] = (2/β) · E[ ω · softplus(β · (log π_θ − log π_ref)) ]

    Equals (2/β)·log 2 at θ = ref, and its gradient there equals GA's; bounded below by 0.
    """
    rr = _required("ref_rejected_logp", "npo", ref_rejected_logp)
    pr = policy_rejected_logp
    _check_same_shape(pr=pr, rr=rr, weight=weight)
    per = _weights(weight, pr) * (2.0 / beta) * F.softplus(beta * (pr - rr))
    return LossTerms(per, retain_kl_per_row, float(lambda_b))


LossFn = Callable[..., LossTerms]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function plus what the trainer must compute for it."""

    name: str
    fn: LossFn
    needs_chosen: bool  # pairs with a chosen sequence (ibo, dpo); else only the rejected rows (ga, npo)
    needs_reference: bool  # reference log-likelihoods of the sequences
    citation: str


LOSSES: dict[str, LossSpec] = {
    "ibo": LossSpec("ibo", ibo_loss, True, True, "LANCET, Wang et al., AAAI 2025, arXiv 2412.16451"),
    "dpo": LossSpec("dpo", dpo_loss, True, True, "Rafailov et al., NeurIPS 2023, arXiv 2305.18290"),
    "ga": LossSpec("ga", ga_loss, False, False, "Jang et al. 2022 arXiv 2210.01504; Yao et al. 2023 arXiv 2310.10683"),
    "npo": LossSpec("npo", npo_loss, False, True, "Zhang et al. 2024, arXiv 2404.05868"),
}


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Model-side reductions: (model, batch) -> per-sequence log-likelihoods and per-row retain KL.
# A batch is right-padded: input_ids [B,T] long, attention_mask [B,T], loss_mask [B,T] (1 on response tokens).
# ---------------------------------------------------------------------------------------------------------------------


def _upcast(t: Tensor) -> Tensor:
    """Half-precision logits are upcast to fp32 before log_softmax; fp32/fp64 are kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts_logits_to_keep(model) -> bool:
    """Whether the HF model under `model` (a PEFT wrapper or anything with `get_base_model`) takes `logits_to_keep`."""
    forward = getattr(_base(model), "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


_KEEPS_POSITIONS: dict[type, bool] = {}


def _keeps_positions(model) -> bool:
    """Whether the model slices its hidden states with transformers' `slice_logits_to_keep`, which takes a boolean
    [B, T] mask and runs the LM head on exactly those positions (transformers ≥ 5; Llama, GPT-2, Qwen, … do)."""
    cls = type(_base(model))
    if cls not in _KEEPS_POSITIONS:
        module = sys.modules.get(cls.__module__)
        _KEEPS_POSITIONS[cls] = _accepts_logits_to_keep(model) and hasattr(module, "slice_logits_to_keep")
    return _KEEPS_POSITIONS[cls]


def response_logits(model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The logits of exactly the positions that predict response tokens: (logits [N,V], targets [N], row [N]).

    Position t-1 predicts token t, so a response token t (loss_mask[b, t] == 1, t ≥ 1) needs position t-1. The LM head
    runs only on those positions when the model takes a boolean `logits_to_keep` mask (a decision window of 4 tokens
    then costs 4 positions per row, not the rest of the sequence); otherwise from the batch's first such position on
    (an integer `logits_to_keep`), or on every position, and prompt and padding positions are dropped before any
    full-vocabulary log_softmax: the same values as slicing the full logits, for a fraction of the work.
    """
    predicted = loss_mask[:, 1:].bool()
    targets, rows = input_ids[:, 1:][predicted], predicted.nonzero()[:, 0]
    if _keeps_positions(model):
        keep = torch.zeros_like(loss_mask, dtype=torch.bool)
        keep[:, :-1] = predicted
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] == targets.shape[0]:
            return logits, targets, rows
        _KEEPS_POSITIONS[type(_base(model))] = False  # it did not honour the mask: the integer form from now on
    cols = predicted.any(0).nonzero()
    start = int(cols[0]) if len(cols) else predicted.shape[1]  # first position whose logits are needed
    keep = input_ids.shape[1] - start
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    logits = logits[:, logits.shape[1] - keep :]  # a model that ignores logits_to_keep returns every position
    return logits[:, :-1][predicted[:, start:]], targets, rows


def _row_sum(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def token_logprobs_from_logits(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[B,T-1]: log π(x_t | x_<t) for t = 1..T-1 (position t-1's logits predict token t)."""
    logp = torch.log_softmax(_upcast(logits[:, :-1]), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sequence_logprobs_from_logits(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """[B]: Σ over response tokens (loss_mask == 1) of log π(y_t | x, y_<t)."""
    tok = token_logprobs_from_logits(logits, input_ids)
    mask = loss_mask[:, 1:].to(tok.dtype)
    return (tok * mask).sum(-1)


# Position chunks of the full-vocabulary math: a chunk's float32 temporaries hold at most this many elements
# (2^24 = 64 MiB: 341 positions of a 49 152-token vocabulary, 130 of a 128 256 one)
VOCAB_CHUNK_ELEMENTS = 1 << 24


def vocab_chunk_positions(vocab_size: int) -> int:
    """Positions per chunk of the full-vocabulary log_softmax / KL (VOCAB_CHUNK_ELEMENTS // vocab, at least 1)."""
    return max(1, VOCAB_CHUNK_ELEMENTS // max(1, vocab_size))


def _position_chunks(n: int, vocab_size: int):
    step = vocab_chunk_positions(vocab_size)
    return ((s, min(n, s + step)) for s in range(0, n, step))


class _TokenLogprobs(torch.autograd.Function):
    """[N]: log softmax(logits)[n, targets[n]], computed a chunk of positions at a time (vocab_chunk_positions).

    Autograd's log_softmax + gather keeps a full-vocabulary float32 copy of the logits for the backward pass (and
    makes it at once for every position); this keeps only the logits themselves and forms at most one chunk's
    softmax at a time, in the forward and in the backward pass. The same arithmetic as autograd's (the backward is
    log_softmax's: g·onehot − softmax·g), so the values and gradients are those of the unchunked expression."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        out = torch.empty(logits.shape[0], dtype=_upcast(logits[:0]).dtype, device=logits.device)
        for a, b in _position_chunks(logits.shape[0], logits.shape[-1]):
            logp = torch.log_softmax(_upcast(logits[a:b]), dim=-1)
            out[a:b] = logp.gather(-1, targets[a:b].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for a, b in _position_chunks(logits.shape[0], logits.shape[-1]):
            g = grad_out[a:b].unsqueeze(-1)
            d = torch.softmax(_upcast(logits[a:b]), dim=-1).mul_(-g)  # −g·softmax (sum of the one-hot grad is g)
            d.scatter_add_(-1, targets[a:b].unsqueeze(-1), g)
            grad[a:b] = d
        return grad, None


class _TokenKL(torch.autograd.Function):
    """[N]: KL(q ‖ softmax(logits)) per position from the reference's log-probabilities `logq` (no gradient), a chunk
    of positions at a time; keeps only the logits and `logq` for the backward pass (autograd's expression keeps four
    full-vocabulary copies: log_softmax, exp(logq), logq − logp and their product's inputs). The backward is the
    one autograd forms for the unchunked expression: g·(softmax(z)·Σq − q)."""

    @staticmethod
    def forward(ctx, logits: Tensor, logq: Tensor) -> Tensor:
        out = torch.empty(logits.shape[0], dtype=logq.dtype, device=logits.device)
        for a, b in _position_chunks(logits.shape[0], logits.shape[-1]):
            logp = torch.log_softmax(_upcast(logits[a:b]), dim=-1)
            out[a:b] = _token_kl(logp, logq[a:b])
        ctx.save_for_backward(logits, logq)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, logq = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for a, b in _position_chunks(logits.shape[0], logits.shape[-1]):
            g = grad_out[a:b].unsqueeze(-1)
            q = logq[a:b].exp()
            gq = q.mul_(g)  # d(Σ q·(logq − logp))/d logp = −g·q
            d = torch.softmax(_upcast(logits[a:b]), dim=-1).mul_(gq.sum(-1, keepdim=True)).sub_(gq)
            grad[a:b] = d
        return grad, None


def response_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """[N]: log softmax(logits)[targets] per position, in position chunks (see _TokenLogprobs)."""
    return _TokenLogprobs.apply(logits, targets)


def log_softmax_chunked_(logits: Tensor) -> Tensor:
    """log_softmax over the last axis, without gradient, a chunk of positions at a time and in place when the logits
    are float32/float64 already (half precision is upcast first, once): the reference's log-probs without a second
    full-vocabulary copy."""
    out = _upcast(logits)
    for a, b in _position_chunks(out.shape[0], out.shape[-1]):
        out[a:b] = torch.log_softmax(out[a:b], dim=-1)
    return out


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    """[B]: sequence log-likelihood of the response, summed over response tokens (the IBO/DPO/NPO/GA input).

    Equals `sequence_logprobs_from_logits` on the full logits; only the response positions' logits are formed, and
    their log_softmax a chunk of positions at a time (response_logprobs)."""
    logits, targets, rows = response_logits(model, input_ids, attention_mask, loss_mask)
    if not torch.is_grad_enabled() or not logits.requires_grad:
        with torch.no_grad():
            tok = log_softmax_chunked_(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    else:
        tok = response_logprobs(logits, targets)
    return _row_sum(tok, rows, input_ids.shape[0])


def _response_counts(loss_mask: Tensor) -> Tensor:
    n = loss_mask[:, 1:].sum(-1)
    if bool((n == 0).any()):
        raise ValueError("a retain row has no response tokens (all masked or truncated away); cannot average its KL")
    return n


def _token_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(q ‖ p) over the last (vocabulary) axis, from log-probabilities."""
    return (logq.exp() * (logq - logp)).sum(-1)


def token_kl_per_row_from_logits(policy_logits: Tensor, ref_logits: Tensor, loss_mask: Tensor) -> Tensor:
    """[B]: per row, the MEAN over its response tokens of KL(π_ref(·|prefix) ‖ π_θ(·|prefix)), full vocabulary.

    A row without response tokens raises (its mean is undefined)."""
    mask = loss_mask[:, 1:]
    n = _response_counts(loss_mask)
    logp = torch.log_softmax(_upcast(policy_logits[:, :-1]), dim=-1)
    logq = torch.log_softmax(_upcast(ref_logits[:, :-1]), dim=-1)
    kl_tok = _token_kl(logp, logq)  # [B, T-1]
    return (kl_tok * mask.to(kl_tok.dtype)).sum(-1) / n.to(kl_tok.dtype)


def retain_kl_from_models(
    policy_model, ref_model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor
) -> Tensor:
    """[B]: token-mean KL(π_ref ‖ π_θ) on each retain row; the reference forward runs without gradients.

    `ref_model` is anything called like a HF model (a frozen copy, or a wrapper that runs the PEFT model with its
    adapter disabled; `get_base_model` tells whether it takes `logits_to_keep`). Equals
    `token_kl_per_row_from_logits` on the full logits; only the response positions' logits are formed.
    """
    n = _response_counts(loss_mask)
    with torch.no_grad():
        ref_logits, _, _ = response_logits(ref_model, input_ids, attention_mask, loss_mask)
        logq = log_softmax_chunked_(ref_logits)  # in place: the reference's logits are not kept beside it
        del ref_logits
    pol_logits, _, rows = response_logits(policy_model, input_ids, attention_mask, loss_mask)
    kl_tok = _TokenKL.apply(pol_logits, logq)  # [N], a chunk of positions at a time
    return _row_sum(kl_tok, rows, input_ids.shape[0]) / n.to(kl_tok.dtype)


LOG2 = math.log(2.0)
