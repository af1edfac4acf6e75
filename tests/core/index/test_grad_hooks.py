"""Oracle: hooked batched projected gradients == projection of single-example backward() passes, in float64."""

from __future__ import annotations

import pytest
import torch

from lancet_core.index.hooks import (
    ProjectedGradientExtractor,
    build_layout,
    response_window,
    right_pad,
    select_target_modules,
    weight_grad_out_in,
)
from lancet_core.index.projection import project_full_gradient

VOCAB = 61


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = _exact_eager_attention()
    return norms_in_input_dtype(LlamaForCausalLM(cfg).eval())


# transformers' Llama computes its RMSNorm and its eager attention softmax in float32 whatever the input's dtype (for
# half-precision training), so a `.double()` Llama is not float64 all the way: float64 differences of one ulp between
# a batched and a one-row pass (different GEMM shapes: MKL's kernels on AMD EPYC / AVX2 give them, on the Intel
# AVX-512 box they did not) come out as float32 ulps, ~1e-7 relative, and a float64 oracle comparison at 1e-9 fails
# on one machine and passes on another. The two functions below are the same formulas in the input's dtype:
# identical for float32, exact for float64.
def _exact_eager_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import repeat_kv

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    AttentionInterface.register("eager_in_input_dtype", attention)
    AttentionMaskInterface.register("eager_in_input_dtype", eager_mask)  # the causal + padding mask eager gets
    return "eager_in_input_dtype"


def norms_in_input_dtype(model):
    """Every RMSNorm of `model` computes in its input's dtype (see above)."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            def forward(h, m=m):
                return m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))

            m.forward = forward
    return model


def random_rows(n: int, seed: int = 1, min_len: int = 5, max_len: int = 14):
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        p = int(torch.randint(1, L - 1, (1,), generator=g))  # prompt length; at least one response token
        ids.append(torch.randint(1, VOCAB, (L,), generator=g).tolist())
        masks.append([0] * p + [1] * (L - p))
    return ids, masks


def oracle_loglik(model, ids, mask, reduction):
    """Independent, unbatched log π(y|x) of one example."""
    x = torch.tensor(ids)[None]
    logits = model(input_ids=x).logits[0]
    lp = torch.log_softmax(logits[:-1], dim=-1)
    sel = lp[torch.arange(len(ids) - 1), x[0, 1:]]
    m = torch.tensor(mask[1:], dtype=lp.dtype)
    ll = (sel * m).sum()
    return ll / m.sum() if reduction == "mean" else ll


def oracle_gradients(model, layout, seed, reduction, rows_ids, rows_mask):
    mods = dict(model.named_modules())
    out = []
    for ids, mask in zip(rows_ids, rows_mask, strict=True):
        model.zero_grad()
        oracle_loglik(model, ids, mask, reduction).backward()
        out.append(torch.cat([project_full_gradient(ml, weight_grad_out_in(mods[ml.name]), seed) for ml in layout]))
    return torch.stack(out)


def first_response_tokens(mask: list[int], k: int | None) -> list[int]:
    """Plain-Python window: keep the first k ones of a loss mask (the oracle of response_window)."""
    if k is None:
        return list(mask)
    out, seen = [], 0
    for v in mask:
        seen += v
        out.append(1 if v and seen <= k else 0)
    return out


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k", [(4, 3), (None, None)], ids=["projected", "fullrank"])
@pytest.mark.parametrize("window", [None, 2], ids=["all-response", "first-2"])
def test_hooked_equals_single_example_backward_float64(make, reduction, k, window):
    model = make().double()
    layout = build_layout(model, None, *k)
    rows_ids, rows_mask = random_rows(5)
    with ProjectedGradientExtractor(model, layout, seed=7, reduction=reduction, response_tokens=window) as ex:
        ids, attn, lm = right_pad(rows_ids, rows_mask, pad_id=0)
        assert attn.sum(1).unique().numel() > 1  # variable lengths: right padding is in play
        got = ex.batch_gradients(ids, attn, lm)
    assert all(p.requires_grad for p in model.parameters())  # requires_grad restored
    want = oracle_gradients(model, layout, 7, reduction, rows_ids, [first_response_tokens(m, window) for m in rows_mask])
    assert got.dtype == torch.float64 and got.shape == want.shape
    rel = (got - want).norm(dim=1) / want.norm(dim=1)
    assert float(rel.max()) <= 1e-6, rel


def test_default_selection_excludes_head_and_embeddings():
    names = [n for n, _ in select_target_modules(tiny_gpt2())]
    assert names == [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    lnames = [n for n, _ in select_target_modules(tiny_llama())]
    assert len(lnames) == 14 and not any("lm_head" in n or "embed" in n for n in lnames)
    assert [n for n, _ in select_target_modules(tiny_gpt2(), ["*.mlp.c_fc"])] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.mlp.c_fc",
    ]
    with pytest.raises(ValueError, match="no target modules"):
        select_target_modules(tiny_gpt2(), ["nothing*"])


def test_conv1d_orientation_and_layout_offsets():
    layout = build_layout(tiny_gpt2(), None, 4, 3)
    c_fc = next(ml for ml in layout if ml.name.endswith("h.0.mlp.c_fc"))
    assert (c_fc.d_in, c_fc.d_out, c_fc.size) == (16, 64, 12)
    assert [ml.offset for ml in layout] == [12 * i for i in range(len(layout))]


def test_prompt_only_change_of_padding_token_is_irrelevant():
    """The pad id must not matter (padded positions carry nothing)."""
    model = tiny_llama().double()
    layout = build_layout(model, None, 4, 4)
    rows_ids, rows_mask = random_rows(4, seed=3)
    with ProjectedGradientExtractor(model, layout, seed=0) as ex:
        a = ex.batch_gradients(*right_pad(rows_ids, rows_mask, pad_id=0))
        b = ex.batch_gradients(*right_pad(rows_ids, rows_mask, pad_id=VOCAB - 1))
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_no_response_tokens_is_an_error():
    model = tiny_gpt2()
    layout = build_layout(model, None, 2, 2)
    with ProjectedGradientExtractor(model, layout, seed=0) as ex, pytest.raises(ValueError, match="no response tokens"):
        ex.batch_gradients(*right_pad([[1, 2, 3]], [[0, 0, 0]], 0))


def test_response_window_keeps_the_first_k_response_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    assert response_window(mask, None) is mask
    assert response_window(mask, 2).tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]]
    assert response_window(mask, 1).tolist() == [first_response_tokens(m, 1) for m in mask.tolist()]
    with pytest.raises(ValueError, match="response_tokens"):
        response_window(mask, 0)


def test_a_window_changes_the_gradient_only_when_the_response_is_longer():
    model = tiny_llama().double()
    layout = build_layout(model, None, 4, 4)
    ids, mask = [[5, 6, 7, 8, 9, 10]], [[0, 0, 1, 1, 1, 1]]
    grads = {}
    for w in (None, 2, 4, 9):
        with ProjectedGradientExtractor(model, layout, seed=0, response_tokens=w) as ex:
            grads[w] = ex.batch_gradients(*right_pad(ids, mask, 0))
    assert torch.equal(grads[None], grads[4]) and torch.equal(grads[None], grads[9])
    assert not torch.allclose(grads[None], grads[2])
