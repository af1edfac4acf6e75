"""Closed-form tests of the loss registry (lancet_core.correct.losses) and its model-side reductions (float64 oracles)."""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch
import transformers

from lancet_core.correct import losses as L

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_gpt2(seed: int = 0, vocab: int = 48):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).to(torch.float64).eval()


def _rand_logps(seed: int, b: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


def _pad(rows: list[list[int]], masks: list[list[int]], pad_id: int = 0):
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), t), dtype=torch.long)
    lm = torch.zeros((len(rows), t), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        lm[i, : len(m)] = torch.tensor(m)
    return ids, attn, lm


# --- pure closed forms ------------------------------------------------------------------------------------------------


def test_ibo_pairwise_term_at_reference_is_mean_weight_log2():
    pc, pr, _, _ = _rand_logps(0)
    w = torch.tensor([0.2, 1.5, 0.7, 3.0, 0.1, 1.0, 0.5], dtype=torch.float64)
    terms = L.ibo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=pc.clone(),
                       ref_rejected_logp=pr.clone(), weight=w, beta=0.37)
    assert terms.preference.item() == pytest.approx(w.mean().item() * math.log(2), rel=1e-14)
    # lambda_b with no retain rows leaves it unchanged; with a zero KL it is unchanged too
    assert terms.loss.item() == pytest.approx(w.mean().item() * math.log(2), rel=1e-14)
    t2 = L.ibo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=pc, ref_rejected_logp=pr,
                    weight=w, beta=0.37, retain_kl_per_row=torch.zeros(3, dtype=torch.float64), lambda_b=5.0)
    assert t2.loss.item() == pytest.approx(w.mean().item() * math.log(2), rel=1e-14)


def test_ibo_with_uniform_weights_and_no_retain_is_dpo_written_by_hand():
    pc, pr, rc, rr = _rand_logps(1)
    beta = 0.5
    terms = L.ibo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=rc, ref_rejected_logp=rr,
                       weight=torch.ones(7, dtype=torch.float64), beta=beta, lambda_b=0.0)
    # the DPO loss of Rafailov et al. 2023, eq. 7, as a python for-loop
    by_hand = 0.0
    for i in range(7):
        z = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        by_hand += -math.log(1.0 / (1.0 + math.exp(-z)))
    by_hand /= 7
    assert terms.loss.item() == pytest.approx(by_hand, rel=1e-13)
    dpo = L.dpo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=rc, ref_rejected_logp=rr,
                     beta=beta)
    assert dpo.loss.item() == pytest.approx(by_hand, rel=1e-13)


def test_ibo_retain_term_is_lambda_times_mean_row_kl():
    pc, pr, rc, rr = _rand_logps(2)
    kl = torch.tensor([0.1, 0.4, 0.0], dtype=torch.float64)
    t = L.ibo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=rc, ref_rejected_logp=rr,
                   beta=1.0, retain_kl_per_row=kl, lambda_b=2.0)
    assert (t.loss - t.preference).item() == pytest.approx(2.0 * (0.5 / 3), rel=1e-14)


def test_accumulation_loss_sums_to_full_batch_loss():
    pc, pr, rc, rr = _rand_logps(3, b=8)
    w = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    kl = torch.linspace(0.0, 0.7, 6, dtype=torch.float64)
    full = L.ibo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=rc, ref_rejected_logp=rr,
                      weight=w, beta=0.3, retain_kl_per_row=kl, lambda_b=0.8).loss
    parts = 0.0
    for a, b, (ka, kb) in [(0, 3, (0, 1)), (3, 5, (1, 4)), (5, 8, (4, 6))]:  # uneven micro-batches
        t = L.ibo_loss(policy_chosen_logp=pc[a:b], policy_rejected_logp=pr[a:b], ref_chosen_logp=rc[a:b],
                       ref_rejected_logp=rr[a:b], weight=w[a:b], beta=0.3, retain_kl_per_row=kl[ka:kb], lambda_b=0.8)
        parts = parts + t.accumulation_loss(8, 6)
    assert parts.item() == pytest.approx(full.item(), rel=1e-14)


def test_npo_closed_forms_and_gradient_equals_ga_at_reference():
    _, pr, _, _ = _rand_logps(4)
    beta = 0.25
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 0.25, 1.25], dtype=torch.float64)
    x = pr.clone().requires_grad_(True)
    npo = L.npo_loss(policy_rejected_logp=x, ref_rejected_logp=pr.clone(), weight=w, beta=beta)
    assert npo.loss.item() == pytest.approx(w.mean().item() * 2 / beta * math.log(2), rel=1e-14)
    (g_npo,) = torch.autograd.grad(npo.loss, x)
    y = pr.clone().requires_grad_(True)
    ga = L.ga_loss(policy_rejected_logp=y, weight=w)
    assert ga.loss.item() == pytest.approx((w * pr).mean().item(), rel=1e-14)
    (g_ga,) = torch.autograd.grad(ga.loss, y)
    assert torch.allclose(g_ga, w / 7, rtol=0, atol=1e-15)
    assert torch.allclose(g_npo, g_ga, rtol=0, atol=1e-15)  # NPO's gradient at θ = ref equals GA's
    # NPO by hand away from the reference; bounded below by 0 and increasing in log π_θ
    ref = pr - 3.0
    by_hand = np.mean([w[i].item() * 2 / beta * math.log1p(math.exp(beta * 3.0)) for i in range(7)])
    assert L.npo_loss(policy_rejected_logp=pr, ref_rejected_logp=ref, weight=w, beta=beta).loss.item() == \
        pytest.approx(by_hand, rel=1e-13)
    far_below = L.npo_loss(policy_rejected_logp=pr - 1e3, ref_rejected_logp=pr, beta=beta).loss.item()
    assert 0.0 <= far_below < 1e-30


def test_registry_and_errors():
    assert set(L.LOSSES) == {"ibo", "ga", "npo", "dpo"}
    for spec in L.LOSSES.values():
        assert "arXiv" in spec.fn.__doc__ and "arXiv" in spec.citation
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        L.get_loss("nope")
    pc, pr, rc, rr = _rand_logps(5)
    with pytest.raises(ValueError, match="needs ref_chosen_logp"):
        L.ibo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr, ref_chosen_logp=None, ref_rejected_logp=rr,
                   beta=1.0)
    with pytest.raises(ValueError, match="share one shape"):
        L.dpo_loss(policy_chosen_logp=pc, policy_rejected_logp=pr[:3], ref_chosen_logp=rc, ref_rejected_logp=rr,
                   beta=1.0)


def test_token_kl_matches_numpy_for_loop_oracle():
    g = torch.Generator().manual_seed(7)
    pl = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    rl = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    got = L.token_kl_per_row_from_logits(pl, rl, mask)
    P, R = pl.numpy(), rl.numpy()
    for b in range(3):
        kls = []
        for t in range(1, 5):
            if mask[b, t]:
                q = np.exp(R[b, t - 1]) / np.exp(R[b, t - 1]).sum()
                p = np.exp(P[b, t - 1]) / np.exp(P[b, t - 1]).sum()
                kls.append(float(sum(q[v] * (math.log(q[v]) - math.log(p[v])) for v in range(11))))
        assert got[b].item() == pytest.approx(np.mean(kls), rel=1e-12)
    with pytest.raises(ValueError, match="no response tokens"):
        L.token_kl_per_row_from_logits(pl, rl, torch.tensor([[0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))


# --- through a tiny real model -------------------------------------------------------------------------------------------

ROWS = [[1, 2, 3, 4, 10, 11, 12], [5, 6, 7, 20, 21, 22, 23, 24], [8, 9, 30, 31]]
MASKS = [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1]]


def test_sequence_logprobs_match_unpadded_for_loop_oracle():
    model = _tiny_gpt2()
    ids, attn, lm = _pad(ROWS, MASKS)
    got = L.sequence_logprobs(model, ids, attn, lm)
    for i, (r, m) in enumerate(zip(ROWS, MASKS, strict=True)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r])).logits[0]
        lp = torch.log_softmax(logits, -1)
        oracle = sum(lp[t - 1, r[t]].item() for t in range(1, len(r)) if m[t])
        assert got[i].item() == pytest.approx(oracle, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))  # held for all of seeds 0..19 when checked; not a lucky init
def test_ibo_gradient_step_lowers_rejected_and_raises_chosen(seed):
    model = _tiny_gpt2(seed=seed)
    ref = copy.deepcopy(model)
    w_ids, w_attn, w_lm = _pad([ROWS[0]], [MASKS[0]])  # chosen (w ∈ R⁻) on its own prompt
    l_ids, l_attn, l_lm = _pad([ROWS[1]], [MASKS[1]])  # rejected (l ∈ R⁺) on its own prompt

    def logps(m):
        with torch.no_grad():
            return L.sequence_logprobs(m, w_ids, w_attn, w_lm).item(), L.sequence_logprobs(m, l_ids, l_attn, l_lm).item()

    before_w, before_l = logps(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with torch.no_grad():
        rc, rr = L.sequence_logprobs(ref, w_ids, w_attn, w_lm), L.sequence_logprobs(ref, l_ids, l_attn, l_lm)
    terms = L.ibo_loss(policy_chosen_logp=L.sequence_logprobs(model, w_ids, w_attn, w_lm),
                       policy_rejected_logp=L.sequence_logprobs(model, l_ids, l_attn, l_lm),
                       ref_chosen_logp=rc, ref_rejected_logp=rr, weight=torch.ones(1, dtype=torch.float64), beta=1.0)
    assert terms.loss.item() == pytest.approx(math.log(2), rel=1e-12)
    terms.loss.backward()
    opt.step()
    after_w, after_l = logps(model)
    assert after_w > before_w
    assert after_l < before_l


def test_retain_kl_is_zero_with_zero_gradient_at_reference():
    model = _tiny_gpt2(seed=4)
    ref = copy.deepcopy(model)
    ids, attn, lm = _pad(ROWS, MASKS)
    kl = L.retain_kl_from_models(model, ref, ids, attn, lm)
    assert torch.all(kl.abs() < 1e-15)
    kl.mean().backward()
    gnorm = math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters() if p.grad is not None))
    assert gnorm < 1e-12
    # and away from the reference the KL is positive and its gradient pulls back
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl2 = L.retain_kl_from_models(model, ref, ids, attn, lm)
    assert torch.all(kl2 > 1e-6)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not take `logits_to_keep` (custom code): the full logits are sliced instead."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("path", ["positions", "last_positions", "full_logits"])
def test_response_only_logits_equal_the_full_logits_path_values_and_gradients(path, monkeypatch):
    """sequence_logprobs / retain_kl_from_models form only the response positions' logits; values and gradients must
    equal the full-logits formulas (sequence_logprobs_from_logits, token_kl_per_row_from_logits) in float64, whichever
    way the model is asked: a boolean position mask (transformers' slice_logits_to_keep), the last positions (an
    integer logits_to_keep), or a model that returns every position. The second row is a decision window (its last
    response tokens are masked), the case where the mask saves most."""
    rows = [[1, 2, 3, 4, 5, 6, 10, 11, 12], [5, 6, 7, 20, 21, 22, 23, 24], [8, 9, 3, 4, 30, 31]]
    masks = [[0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    ids, attn, lm = _pad(rows, masks)
    model, ref = _tiny_gpt2(seed=1), _tiny_gpt2(seed=2)
    wrap = path == "full_logits"
    m, r = (_NoLogitsToKeep(model), _NoLogitsToKeep(ref)) if wrap else (model, ref)
    assert L._accepts_logits_to_keep(m) is not wrap
    # GPT-2 slices its hidden states with slice_logits_to_keep from transformers 5.2x on; 5.17 (seen on a GPU machine)
    # takes only the integer form, and lancet falls back to it there
    takes_mask = hasattr(sys.modules[type(model).__module__], "slice_logits_to_keep")
    if path == "positions" and not takes_mask:
        pytest.skip(f"transformers {transformers.__version__}: GPT-2 takes no position mask")
    assert L._keeps_positions(m) is (takes_mask and not wrap)
    if path == "last_positions":
        monkeypatch.setattr(L, "_keeps_positions", lambda model: False)
    heads = []  # rows the LM head saw per call: the mask path runs it on the response positions only
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: heads.append(args[0].reshape(-1, 16).shape[0]))
    L.sequence_logprobs(m, ids, attn, lm)
    hook.remove()
    assert heads == [{"positions": int(lm[:, 1:].sum()), "last_positions": 3 * 7, "full_logits": 3 * 9}[path]]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    got = L.sequence_logprobs(m, ids, attn, lm)
    want = L.sequence_logprobs_from_logits(L._logits(model, ids, attn), ids, lm)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads((got * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()),
                               grads((want * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()),
                               rtol=1e-10, atol=1e-12)
    got_kl = L.retain_kl_from_models(m, r, ids, attn, lm)
    with torch.no_grad():
        ref_logits = L._logits(ref, ids, attn)
    want_kl = L.token_kl_per_row_from_logits(L._logits(model, ids, attn), ref_logits, lm)
    torch.testing.assert_close(got_kl, want_kl, rtol=1e-12, atol=1e-14)
    assert bool((got_kl > 1e-3).all())  # two different models: a real KL, not zeros on both sides
    torch.testing.assert_close(grads(got_kl.sum()), grads(want_kl.sum()), rtol=1e-10, atol=1e-12)


class _IgnoresTheMask(torch.nn.Module):
    """Takes `logits_to_keep` but returns every position (a custom model that only claims to slice)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_a_model_that_ignores_the_position_mask_falls_back_to_the_exact_path(monkeypatch):
    rows, masks = [[1, 2, 3, 4, 5, 6, 10, 11, 12], [5, 6, 7, 20, 21, 22]], [[0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    ids, attn, lm = _pad(rows, masks)
    model = _tiny_gpt2(seed=3)
    m = _IgnoresTheMask(model)
    monkeypatch.setitem(L._KEEPS_POSITIONS, _IgnoresTheMask, True)  # as if its module sliced with the helper
    got = L.sequence_logprobs(m, ids, attn, lm)
    torch.testing.assert_close(got, L.sequence_logprobs_from_logits(L._logits(model, ids, attn), ids, lm),
                               rtol=1e-12, atol=1e-12)
    assert L._KEEPS_POSITIONS[_IgnoresTheMask] is False  # found out on the first call, never asked again


@pytest.mark.parametrize("chunk_elements", [1, 100, 48 * 5, 1 << 24])
def test_position_chunked_log_softmax_and_kl_equal_the_unchunked_expressions(chunk_elements, monkeypatch):
    """The full-vocabulary math of sequence_logprobs and retain_kl_from_models runs a chunk of positions at a time
    (losses.VOCAB_CHUNK_ELEMENTS; one position, two, five, all of them here): the values and the gradients must be
    those of the unchunked autograd expressions (log_softmax + gather; Σ q·(log q − log p)) in float64, and the
    reference's no-grad log-likelihoods too."""
    monkeypatch.setattr(L, "VOCAB_CHUNK_ELEMENTS", chunk_elements)
    rows = [[1, 2, 3, 4, 5, 6, 10, 11, 12, 13], [5, 6, 7, 20, 21, 22, 23, 24], [8, 9, 3, 4, 30, 31, 40]]
    masks = [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]]
    ids, attn, lm = _pad(rows, masks)
    model, ref = _tiny_gpt2(seed=4), _tiny_gpt2(seed=5)
    n_pos = int(lm[:, 1:].sum())
    assert L.vocab_chunk_positions(48) == max(1, chunk_elements // 48) and n_pos == 14

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    coef = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    got = L.sequence_logprobs(model, ids, attn, lm)
    want = L.sequence_logprobs_from_logits(L._logits(model, ids, attn), ids, lm)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grads((got * coef).sum()), grads((want * coef).sum()), rtol=1e-11, atol=1e-13)
    with torch.no_grad():  # the reference's path: in place, no autograd function
        torch.testing.assert_close(L.sequence_logprobs(model, ids, attn, lm), want.detach(), rtol=1e-13, atol=1e-13)

    got_kl = L.retain_kl_from_models(model, ref, ids, attn, lm)
    with torch.no_grad():
        ref_logits = L._logits(ref, ids, attn)
    want_kl = L.token_kl_per_row_from_logits(L._logits(model, ids, attn), ref_logits, lm)
    torch.testing.assert_close(got_kl, want_kl, rtol=1e-13, atol=1e-14)
    assert bool((got_kl > 1e-3).all())
    torch.testing.assert_close(grads((got_kl * coef).sum()), grads((want_kl * coef).sum()), rtol=1e-11, atol=1e-13)
    # the functions themselves, on random float64 logits, against torch.autograd.gradcheck
    z = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    logq = torch.log_softmax(torch.randn(7, 11, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: L._TokenLogprobs.apply(x, t), (z,))
    assert torch.autograd.gradcheck(lambda x: L._TokenKL.apply(x, logq), (z,))
