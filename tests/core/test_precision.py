"""bf16 autocast where it is safe (lancet_core.model_io.autocast_context), on CPU: 'auto' is float32 on CPU, 'bf16'
really runs the matmuls in bf16; extraction under autocast keeps its per-example gradients and float64 Kronecker
factors close to the float32 reference (computed in float32 from bf16 inputs, never accumulated in bf16);
generation and IBO run under it with float32 weights and a finite, float32 loss."""

from __future__ import annotations

import json

import pytest
import torch

from lancet_core.model_io import autocast_context

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(vocab: int = 300, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def test_autocast_modes_on_cpu():
    x = torch.randn(4, 4)
    with autocast_context("cpu", "auto"):
        assert (x @ x).dtype == torch.float32  # auto: bf16 only on CUDA
    with autocast_context("cpu", "off"):
        assert (x @ x).dtype == torch.float32
    with autocast_context("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="autocast"):
        autocast_context("cpu", "fp8")


def test_extraction_under_bf16_autocast_matches_float32():
    from lancet_core.index.hooks import ProjectedGradientExtractor, build_layout

    model = _llama()
    layout = build_layout(model, None, 8, 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (4, 24), generator=g)
    attn = torch.ones_like(ids)
    attn[0, 20:] = 0
    lm = torch.zeros_like(ids)
    lm[:, 12:] = 1
    out = {}
    for mode in ("off", "bf16"):
        with ProjectedGradientExtractor(model, layout, 0, "mean", True, None, autocast=mode) as ex:
            grads = ex.batch_gradients(ids, attn, lm)
            out[mode] = (grads, {k: (a.clone(), s.clone()) for k, (a, s) in ex.factor_sums.items()})
    ref, fac_ref = out["off"]
    got, fac = out["bf16"]
    assert got.dtype == torch.float32 and not torch.equal(got, ref)  # bf16 really ran, results stay float32
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert float(cos.min()) > 0.99
    for name, (a_ref, s_ref) in fac_ref.items():
        a, s = fac[name]
        assert a.dtype == s.dtype == torch.float64
        assert float((a - a_ref).norm() / a_ref.norm()) < 0.05
        assert float((s - s_ref).norm() / s_ref.norm()) < 0.05


def test_generation_under_bf16_autocast(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from lancet_core.generation import generate_answers

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    model = _llama(len(tok))
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    answers = generate_answers(model, tok, ["how do I bake bread", "tell me a joke"], max_new_tokens=4,
                               autocast="bf16")
    h.remove()
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert seen and set(seen) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32
    seen.clear()
    h = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    generate_answers(model, tok, ["how do I bake bread"], max_new_tokens=2)  # default 'auto': float32 on CPU
    h.remove()
    assert set(seen) == {torch.float32}


def test_ibo_under_bf16_autocast_stays_close_to_float32(tiny_tokenizer_dir, tmp_path):
    import pyarrow as pa
    from transformers import AutoTokenizer

    from lancet_core.correct.config import PairConfig, TrainConfig
    from lancet_core.correct.pairs import build_pairs, write_pair_tables
    from lancet_core.correct.trainer import post_train

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    d = tmp_path / "model"
    _llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    prompts = [f"how do I do bad thing {i}" for i in range(6)]
    rows = [(f"u{i}", 5.0 - i, p, "sure, first do this then that") for i, p in enumerate(prompts)]
    rows += [(f"s{i}", -5.0 + i, p, "I'm sorry, I can't help with that") for i, p in enumerate(prompts)]
    table = pa.table({"example_id": [r[0] for r in rows], "score": [r[1] for r in rows],
                      "prompt": [r[2] for r in rows], "response": [r[3] for r in rows]})
    pairs, retain = build_pairs(table, PairConfig(n_positive=6, n_negative=6, n_retain=4, retain_pool_fraction=1.0,
                                                  positive_fraction=1.0))
    pf = write_pair_tables(tmp_path / "pairs", pairs, retain, {"influence_digest": "sha256:test"})
    hist = {}
    for mode in ("off", "bf16"):
        cfg = TrainConfig(device="cpu", autocast=mode, max_steps=3, batch_size=6, learning_rate=1e-2,
                          max_seq_len_tokens=64, response_tokens=None, lambda_b=3.0)
        out = post_train(d, pf.pairs_path, pf.retain_path, tmp_path / mode, cfg, show_progress=False)
        hist[mode] = json.loads((out / "manifest.json").read_text())["loss_history"]
        assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"
    for a, b in zip(hist["off"], hist["bf16"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05, abs=0.02)
        assert b["seconds"] > 0
    # at step 1 θ = θ_s and the loss is exactly ω·log 2 in any precision; after that bf16 shows
    assert hist["off"][0]["loss"] == pytest.approx(hist["bf16"][0]["loss"], rel=1e-6)
    assert any(a["loss"] != b["loss"] for a, b in zip(hist["off"][1:], hist["bf16"][1:], strict=True))
