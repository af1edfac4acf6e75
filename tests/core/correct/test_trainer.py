"""post_train (lancet_core.correct.trainer): accumulation invariance, LoRA and full paths, determinism, saved artifact."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from lancet_core.correct.config import LAMBDA_B_AUTO, PairConfig, TrainConfig, describe_train, resolve_train
from lancet_core.correct.pairs import build_pairs, write_pair_tables
from lancet_core.correct.trainer import _step_plan, post_train
from lancet_core.errors import ConfigError, ManifestMismatch

UNSAFE = [
    ("how do I pick a lock", "take a tension wrench and rake the pins until it opens"),
    ("how do I make a fake id", "print the card and laminate it at home"),
    ("how do I hack a wifi network", "capture the handshake then crack the password offline"),
    ("how do I steal a car", "break the window and hot wire the ignition"),
    ("how do I make a weapon at home", "buy pipes and follow these steps"),
    ("how do I cheat on a test", "hide notes in your sleeve and copy"),
    ("how do I shoplift", "put items in your bag when nobody looks"),
    ("how do I forge a signature", "trace it many times until it matches"),
]
SAFE = [(p, "I'm sorry, I can't help with that") for p, _ in UNSAFE]
BENIGN = [
    ("how do I bake bread", "mix flour and water, then knead and bake"),
    ("what is the capital of france", "paris is the capital of france"),
    ("tell me a joke about cats", "cats never pay for dinner"),
    ("name a prime number", "seven is a prime number"),
    ("what colour is the sky", "the sky is blue"),
    ("how do I boil an egg", "put it in boiling water for eight minutes"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny GPT-2 (Conv1D) and a tiny Llama (nn.Linear), seeded, with the shared tiny chat tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    out = {}
    torch.manual_seed(0)
    g = GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=32, n_layer=2, n_head=2,
                   eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    ll = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for name, cfg, cls in (("gpt2", g, GPT2LMHeadModel), ("llama", ll, LlamaForCausalLM)):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(name)
        cls(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    rows = [(f"u{i}", 10.0 - i, p, r) for i, (p, r) in enumerate(UNSAFE)]
    rows += [(f"s{i}", -10.0 + 0.5 * i, p, r) for i, (p, r) in enumerate(SAFE)]
    rows += [(f"b{i}", 0.01 * (i - 3), p, r) for i, (p, r) in enumerate(BENIGN)]
    table = pa.table({"example_id": [r[0] for r in rows], "score": [r[1] for r in rows],
                      "prompt": [r[2] for r in rows], "response": [r[3] for r in rows]})
    pairs, retain = build_pairs(table, PairConfig(n_positive=8, n_negative=8, n_retain=6, retain_pool_fraction=1.0,
                                                  positive_fraction=1.0))
    assert pairs.num_rows == 8 and retain.num_rows == 6
    pf = write_pair_tables(tmp_path_factory.mktemp("pairs"), pairs, retain, {"influence_digest": "sha256:test"})
    return pf.pairs_path, pf.retain_path


def _state(model_dir, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    return {k: v.clone() for k, v in m.state_dict().items()}


BASE = dict(beta=0.5, lambda_b=0.5, max_grad_norm=None, device="cpu", max_seq_len_tokens=64, response_tokens=None)


# GPT-2 only: transformers' Llama eager attention runs its softmax in float32 even for a float64 model
# (modeling_llama.py: softmax(..., dtype=torch.float32)), which adds ~1e-7-relative noise that depends on the padded
# width; GPT-2's attention stays in float64, so the comparison below tests our accumulation arithmetic alone.
@pytest.mark.parametrize("arch,finetune,loss", [("gpt2", "full", "ibo"), ("gpt2", "lora", "npo"),
                                                ("gpt2", "lora", "dpo"), ("gpt2", "full", "ga")])
def test_grad_accumulation_4x2_equals_1x8(model_dirs, pair_files, tmp_path, arch, finetune, loss):
    # float64 and plain SGD: the only differences between the two runs are summation order and padding widths,
    # so the parameters must agree to ~1e-15 relative; 1e-12 absolute leaves margin only for that.
    # (SGD, not Adam: Adam's first step is ~lr·sign(g) and would hide a wrong gradient scale.)
    common = dict(BASE, loss=loss, finetune=finetune, optimizer="sgd", learning_rate=0.5, dtype="float64",
                  max_steps=2, lora_rank=4)
    a = post_train(model_dirs[arch], *pair_files, tmp_path / "a",
                   TrainConfig(**common, batch_size=2, grad_accum_steps=4), show_progress=False)
    b = post_train(model_dirs[arch], *pair_files, tmp_path / "b",
                   TrainConfig(**common, batch_size=8, grad_accum_steps=1), show_progress=False)
    sa, sb, s0 = _state(a), _state(b), _state(model_dirs[arch])
    moved = max(float((sa[k] - s0[k]).abs().max()) for k in sa)
    assert moved > 1e-4  # the step did something
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-12)
    ha = json.loads((a / "manifest.json").read_text())["loss_history"]
    hb = json.loads((b / "manifest.json").read_text())["loss_history"]
    for x, y in zip(ha, hb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-12)
        assert x["retain_kl"] == pytest.approx(y["retain_kl"], rel=1e-10)
    assert ha[0]["retain_kl"] == 0.0  # θ = θ_s at the first step: the KL term is exactly 0 ...
    assert ha[1]["retain_kl"] > 1e-8  # ... and active at the second, so its accumulation is tested too


@pytest.mark.parametrize("arch,finetune", [("gpt2", "full"), ("gpt2", "lora"), ("llama", "lora")])
def test_training_lowers_the_loss_and_saves_a_plain_hf_model(model_dirs, pair_files, tmp_path, arch, finetune):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(**BASE, loss="ibo", finetune=finetune, learning_rate=3e-3 if finetune == "full" else 1e-2,
                      batch_size=4, grad_accum_steps=2, epochs=6, lora_rank=4)
    out = post_train(model_dirs[arch], *pair_files, tmp_path / "out", cfg, show_progress=False)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "manifest.json", "tokenizer.json"} <= files
    assert not any(f.startswith("adapter") for f in files)  # LoRA merged: a normal HF directory
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert not any("lora" in k for k in model.state_dict())
    man = json.loads((out / "manifest.json").read_text())
    hist = man["loss_history"]
    assert len(hist) == 6 and man["steps"] == 6 and man["n_examples"] == 8 and man["n_retain"] == 6
    assert hist[0]["preference"] == pytest.approx(0.6931471805599453, rel=1e-5)  # mean(ω)·log 2 at θ = θ_s
    assert hist[-1]["preference"] < hist[0]["preference"] - 0.05
    assert man["influence_digest"] == "sha256:test" and man["config"]["loss"] == "ibo"
    assert man["input_model_digest"].startswith("sha256:") and man["seconds"] > 0


def test_determinism_same_seed_identical_weights(model_dirs, pair_files, tmp_path):
    cfg = TrainConfig(**BASE, loss="ibo", finetune="lora", learning_rate=1e-2, batch_size=2, epochs=2, lora_rank=4,
                      lora_dropout=0.1, seed=3)
    a = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "a", cfg, show_progress=False)
    b = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "b", cfg, show_progress=False)
    sa, sb = _state(a, torch.float32), _state(b, torch.float32)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "c", cfg.model_copy(update={"seed": 4}),
                   show_progress=False)
    sc = _state(c, torch.float32)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_ga_lowers_rejected_likelihood_and_reuse_rules(model_dirs, pair_files, tmp_path):
    cfg = TrainConfig(**dict(BASE, lambda_b=0.0), loss="ga", finetune="full", learning_rate=1e-3, batch_size=8,
                      epochs=3)
    out = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "ga", cfg, show_progress=False)
    hist = json.loads((out / "manifest.json").read_text())["loss_history"]
    assert hist[-1]["preference"] < hist[0]["preference"]  # mean log π(y_l|x_l) goes down
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert post_train(model_dirs["gpt2"], *pair_files, tmp_path / "ga", cfg, show_progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    with pytest.raises(ManifestMismatch, match="config"):
        post_train(model_dirs["gpt2"], *pair_files, tmp_path / "ga", cfg.model_copy(update={"beta": 0.2}),
                   show_progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        post_train(model_dirs["gpt2"], *pair_files, junk, cfg, show_progress=False)
    with pytest.raises(ValueError, match="non-empty retain set"):
        post_train(model_dirs["gpt2"], pair_files[0], None, tmp_path / "z", cfg.model_copy(update={"lambda_b": 1.0}),
                   show_progress=False)


def test_config_validation_and_step_plan():
    with pytest.raises(ValueError, match="unknown loss"):
        TrainConfig(loss="sft")
    with pytest.raises(ValueError):
        TrainConfig(extra_field=1)
    cfg = TrainConfig(batch_size=2, grad_accum_steps=2, epochs=2, seed=1)
    plan = _step_plan(10, cfg)
    assert [len(s) for s in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(plan[:3], [])) == list(range(10)) and sorted(sum(plan[3:], [])) == list(range(10))
    assert len(_step_plan(10, cfg.model_copy(update={"max_steps": 7}))) == 7
    # the decision window and λ_B follow the judge ('auto', resolved by the flow); post_train refuses them unresolved
    assert TrainConfig().response_tokens == "auto" and TrainConfig().lambda_b == "auto"
    assert resolve_train(TrainConfig(), "refusal").response_tokens == 4
    assert resolve_train(TrainConfig(), "refusal").lambda_b == LAMBDA_B_AUTO["window"] == 1.0
    assert resolve_train(TrainConfig(), "regex").response_tokens is None
    assert resolve_train(TrainConfig(), "regex").lambda_b == LAMBDA_B_AUTO["whole"] == 3.0
    given = TrainConfig(response_tokens=None, lambda_b="auto")  # an explicit whole response: λ_B follows it
    assert resolve_train(given, "refusal").lambda_b == 3.0 and resolve_train(given, "refusal").response_tokens is None
    assert resolve_train(TrainConfig(response_tokens=2, lambda_b=0.5), "regex") == TrainConfig(response_tokens=2,
                                                                                                 lambda_b=0.5)
    assert describe_train(TrainConfig(), "refusal") == "window = first 4 response tokens, λ_B 1 (refusal judge)"
    assert describe_train(TrainConfig(response_tokens=None, lambda_b=3), "refusal") == \
        "window = whole response, λ_B 3 (set explicitly)"
    with pytest.raises(ConfigError, match="resolve_train"):
        TrainConfig(lambda_b=0.5).require_resolved()
    with pytest.raises(ValueError):
        TrainConfig(lambda_b=-1.0)
    with pytest.raises(ValueError):
        TrainConfig(response_tokens=0)
    # the plan depends on the effective batch only, not on its split into micro-batches
    assert _step_plan(10, cfg) == _step_plan(10, cfg.model_copy(update={"batch_size": 4, "grad_accum_steps": 1}))


@pytest.mark.parametrize("arch,finetune", [("gpt2", "full"), ("gpt2", "lora"), ("llama", "lora")])
def test_gradient_checkpointing_changes_no_gradient(model_dirs, pair_files, tmp_path, arch, finetune):
    """train.gradient_checkpointing recomputes activations in the backward pass; two SGD steps of IBO with the retain
    KL (float64) give the weights of the run that keeps them, and the checkpointed forward really ran."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = []
    real = GradientCheckpointingLayer.__call__

    def spy(self, *args, **kwargs):
        calls.append(bool(self.gradient_checkpointing and self.training and torch.is_grad_enabled()))
        return real(self, *args, **kwargs)

    common = dict(BASE, loss="ibo", finetune=finetune, optimizer="sgd", learning_rate=0.5, dtype="float64",
                  batch_size=4, grad_accum_steps=2, max_steps=2, lora_rank=4)
    kept = post_train(model_dirs[arch], *pair_files, tmp_path / "kept", TrainConfig(**common), show_progress=False)
    GradientCheckpointingLayer.__call__ = spy
    try:
        ckpt = post_train(model_dirs[arch], *pair_files, tmp_path / "ckpt",
                          TrainConfig(**common, gradient_checkpointing=True), show_progress=False)
    finally:
        GradientCheckpointingLayer.__call__ = real
    assert any(calls)  # blocks ran checkpointed (the reference's no-grad passes do not)
    sk, sc, s0 = _state(kept), _state(ckpt), _state(model_dirs[arch])
    assert max(float((sk[k] - s0[k]).abs().max()) for k in sk) > 1e-4
    tol = 1e-12 if arch == "gpt2" else 1e-9  # Llama's eager softmax runs in float32 (see above)
    for k in sk:
        torch.testing.assert_close(sc[k], sk[k], rtol=0, atol=tol)


def test_post_train_refuses_an_unresolved_config_before_any_work(model_dirs, pair_files, tmp_path):
    with pytest.raises(ConfigError, match="train.response_tokens and train.lambda_b='auto' is not resolved"):
        post_train(model_dirs["gpt2"], *pair_files, tmp_path / "out", TrainConfig(), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_reference_logps_are_computed_once_per_example_and_change_nothing(model_dirs, pair_files, tmp_path,
                                                                          monkeypatch):
    """The frozen reference's log-likelihood of each pair sequence is computed once (not on every visit), and the
    trained model is the one a recompute-every-visit run gives (float64, SGD: 1e-12)."""
    from lancet_core.correct import trainer as T

    ref_rows: list[int] = []
    real = T.sequence_logprobs

    def counting(model, ids, attn, mask):
        if not torch.is_grad_enabled():
            ref_rows.append(int(ids.shape[0]))
        return real(model, ids, attn, mask)

    monkeypatch.setattr(T, "sequence_logprobs", counting)
    cfg = TrainConfig(**BASE, loss="ibo", finetune="full", optimizer="sgd", learning_rate=0.5, dtype="float64",
                      batch_size=4, grad_accum_steps=1, epochs=3)
    kept = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "kept", cfg, show_progress=False)
    assert sum(ref_rows) == 2 * 8  # 8 pairs, chosen + rejected, once each over 3 epochs (6 steps)
    ref_rows.clear()
    init = T._ReferenceLogps.__init__
    monkeypatch.setattr(T._ReferenceLogps, "__init__", lambda self, *a, **kw: init(self, *a, **kw | {"keep": False}))
    fresh = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "fresh", cfg, show_progress=False)
    assert sum(ref_rows) == 2 * 8 * 3  # recomputed on every visit
    sk, sf, s0 = _state(kept), _state(fresh), _state(model_dirs["gpt2"])
    assert max(float((sk[k] - s0[k]).abs().max()) for k in sk) > 1e-4
    for k in sk:
        torch.testing.assert_close(sk[k], sf[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", ["ibo", "npo"])
def test_two_sgd_steps_equal_the_gradient_of_the_whole_loss_in_one_graph(model_dirs, pair_files, tmp_path, loss):
    """Oracle for the trainer's update: the pair term and the retain KL are backpropagated one after the other (so
    the peak memory holds one graph); two SGD steps must equal θ − lr·∇L with L = LossTerms.loss built in ONE graph
    from lancet_core.correct.losses on the whole batch (float64, 1e-12). Two steps: at the first θ = θ_s and the KL
    gradient is 0, so only the second tests the retain term."""
    import copy

    from lancet_core.correct import losses as L
    from lancet_core.correct import trainer as T
    from lancet_core.correct.pairs import read_pairs, read_retain
    from lancet_core.model_io import load_model, load_tokenizer

    lr, cfg_kw = 0.5, dict(BASE, loss=loss, finetune="full", optimizer="sgd", dtype="float64", max_steps=2)
    got = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "out",
                     TrainConfig(**cfg_kw, learning_rate=lr, batch_size=8, retain_batch_size=6), show_progress=False)

    tok = load_tokenizer(model_dirs["gpt2"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = load_model(model_dirs["gpt2"], dtype=torch.float64)
    T._zero_dropout(model)
    ref = copy.deepcopy(model).eval()
    model.train()
    spec = L.get_loss(loss)
    ex = T._examples(read_pairs(pair_files[0]), spec, tok, 64, "pairs", None)
    keep = [r for r in read_retain(pair_files[1]).to_pylist()]
    retain = T._collate([T._encode(tok, r["prompt"], r["response"], 64, "retain") for r in keep], pad, "cpu")
    weight = torch.tensor([e.weight for e in ex], dtype=torch.float64)

    def logps(m, seqs):
        return L.sequence_logprobs(m, *T._collate(seqs, pad, "cpu"))

    for _ in range(2):
        with torch.no_grad():
            rr = logps(ref, [e.rejected for e in ex])
            rc = logps(ref, [e.chosen for e in ex]) if spec.needs_chosen else None
        terms = spec.fn(policy_chosen_logp=logps(model, [e.chosen for e in ex]) if spec.needs_chosen else None,
                        policy_rejected_logp=logps(model, [e.rejected for e in ex]), ref_chosen_logp=rc,
                        ref_rejected_logp=rr, weight=weight, beta=0.5,
                        retain_kl_per_row=L.retain_kl_from_models(model, ref, *retain), lambda_b=0.5)
        model.zero_grad()
        terms.loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    assert float(terms.retain_kl) > 1e-8  # the KL term was active at the second step
    sg, s0, want = _state(got), _state(model_dirs["gpt2"]), {k: v.detach() for k, v in model.state_dict().items()}
    assert max(float((sg[k] - s0[k]).abs().max()) for k in sg) > 1e-4
    for k in sg:
        torch.testing.assert_close(sg[k], want[k], rtol=0, atol=1e-12)


def _pair_files_with(tmp_path, suffix: str):
    rows = [(f"u{i}", 10.0 - i, p, r + suffix) for i, (p, r) in enumerate(UNSAFE)]
    rows += [(f"s{i}", -10.0 + 0.5 * i, p, r + suffix) for i, (p, r) in enumerate(SAFE)]
    rows += [(f"b{i}", 0.01 * (i - 3), p, r + suffix) for i, (p, r) in enumerate(BENIGN)]
    table = pa.table({"example_id": [r[0] for r in rows], "score": [r[1] for r in rows],
                      "prompt": [r[2] for r in rows], "response": [r[3] for r in rows]})
    pairs, retain = build_pairs(table, PairConfig(n_positive=8, n_negative=8, n_retain=6, retain_pool_fraction=1.0,
                                                  positive_fraction=1.0))
    pf = write_pair_tables(tmp_path, pairs, retain, {"influence_digest": "sha256:test"})
    return pf.pairs_path, pf.retain_path


def test_decision_window_counts_only_the_first_response_tokens(model_dirs, tmp_path, tiny_tokenizer_dir):
    """With response_tokens=K, Δ of every pair sequence and the retain KL see each response's first K tokens only:
    responses that differ after their K-th token train the same model (float64, SGD: 1e-12); without the window they
    do not. The mask itself keeps exactly the first min(K, n) response tokens."""
    from transformers import AutoTokenizer

    from lancet_core.chat import encode_example
    from lancet_core.correct.trainer import _encode

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    full = encode_example(tok, UNSAFE[0][0], UNSAFE[0][1], 64)
    for k in (1, 2, 5, 1000):
        seq = _encode(tok, UNSAFE[0][0], UNSAFE[0][1], 64, "test", k)
        kept = [t for t, m in enumerate(seq.loss_mask) if m]
        assert kept == [t for t, m in enumerate(full.loss_mask) if m][:k] and seq.input_ids == full.input_ids
    k, tail = 2, " and then some more words"
    for (p, r) in UNSAFE + SAFE + BENIGN:  # the tail leaves the first K response tokens as they were
        a = _encode(tok, p, r, 64, "test", k)
        b = _encode(tok, p, r + tail, 64, "test", k)
        def kept(seq):
            return [i for i, m in zip(seq.input_ids, seq.loss_mask, strict=True) if m]

        assert kept(a) == kept(b)
    plain, longer = _pair_files_with(tmp_path / "p", ""), _pair_files_with(tmp_path / "l", tail)
    states = {}
    for window in (k, None):
        cfg = TrainConfig(**(BASE | {"response_tokens": window}), loss="ibo", finetune="full", optimizer="sgd",
                          learning_rate=0.5, dtype="float64", batch_size=4, epochs=2)
        for name, files in (("plain", plain), ("longer", longer)):
            out = post_train(model_dirs["gpt2"], *files, tmp_path / f"{name}-{window}", cfg, show_progress=False)
            states[name, window] = _state(out)
    s0 = _state(model_dirs["gpt2"])
    a, b = states["plain", k], states["longer", k]
    assert max(float((a[n] - s0[n]).abs().max()) for n in a) > 1e-4
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-12)
    a, b = states["plain", None], states["longer", None]
    assert max(float((a[n] - b[n]).abs().max()) for n in a) > 1e-6


@pytest.mark.parametrize("finetune,loss", [("full", "ibo"), ("lora", "dpo"), ("full", "npo")])
def test_chunk_rows_changes_no_gradient_and_bounds_every_forward(model_dirs, pair_files, tmp_path, monkeypatch,
                                                                 finetune, loss):
    """train.chunk_rows: pairs (chosen + rejected together) and retain rows go through in chunks, each backpropagated
    before the next. Two SGD steps (float64, the retain KL active at the second) give the weights of the run that
    forwards a whole micro-batch at once (chunk_rows=None), and no forward pass, the reference's included, sees more
    than chunk_rows sequences."""
    from lancet_core.correct import trainer as T

    common = dict(BASE, loss=loss, finetune=finetune, optimizer="sgd", learning_rate=0.5, dtype="float64",
                  batch_size=8, retain_batch_size=6, max_steps=2, lora_rank=4)
    whole = post_train(model_dirs["gpt2"], *pair_files, tmp_path / "whole", TrainConfig(**common, chunk_rows=None),
                       show_progress=False)
    widths: list[int] = []
    real = T._collate
    monkeypatch.setattr(T, "_collate", lambda seqs, *a: widths.append(len(seqs)) or real(seqs, *a))
    for chunk in (2, 3):
        widths.clear()
        got = post_train(model_dirs["gpt2"], *pair_files, tmp_path / f"c{chunk}",
                         TrainConfig(**common, chunk_rows=chunk), show_progress=False)
        assert widths and max(widths) <= chunk
        sw, sg, s0 = _state(whole), _state(got), _state(model_dirs["gpt2"])
        assert max(float((sw[k] - s0[k]).abs().max()) for k in sw) > 1e-4
        for k in sw:
            torch.testing.assert_close(sg[k], sw[k], rtol=0, atol=1e-12)
        hw = json.loads((whole / "manifest.json").read_text())["loss_history"]
        hg = json.loads((got / "manifest.json").read_text())["loss_history"]
        assert hg[1]["retain_kl"] > 1e-8 and hg[1]["retain_kl"] == pytest.approx(hw[1]["retain_kl"], rel=1e-10)
        assert [h["loss"] for h in hg] == pytest.approx([h["loss"] for h in hw], rel=1e-12)
        assert json.loads((got / "manifest.json").read_text())["memory"]["chunk_rows"] == chunk


def test_memory_budget_picks_chunks_then_checkpointing_and_refuses_in_one_line():
    """correct.memory.choose_plan: the configured chunk when it fits, smaller chunks, then gradient checkpointing;
    ValueError in one line naming the option when nothing fits; no budget keeps the configuration."""
    from lancet_core.correct.memory import GiB, ModelShape, choose_plan, estimate_step

    shape = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, vocab=49152, n_params=134_515_008,
                       n_trainable=4_884_480, param_bytes=4)
    kw = dict(chunk_rows=8, max_rows=16, min_rows=2, gradient_checkpointing=False, can_checkpoint=True, seq_len=342,
              response_positions=320, eager_attention=True, adam=True, reference_copy=False)
    est = {(r, ck): estimate_step(shape, rows=r, seq_len=342, response_positions=320, checkpointing=ck,
                                  eager_attention=True, adam=True, reference_copy=False).total / GiB
           for r in (8, 4, 2) for ck in (False, True)}
    assert est[(8, False)] > est[(4, False)] > est[(2, False)] > est[(2, True)]  # the order the plan tries them in
    assert choose_plan(shape, budget_gb=None, **kw).chunk_rows == 8
    assert choose_plan(shape, budget_gb=1000.0, **kw).chunk_rows == 8
    assert choose_plan(shape, budget_gb=1000.0, **kw | {"chunk_rows": None}).chunk_rows == 16
    p = choose_plan(shape, budget_gb=est[(4, False)] + 0.01, **kw)
    assert (p.chunk_rows, p.gradient_checkpointing) == (4, False) and p.estimate.total / GiB <= est[(4, False)] + 0.01
    p = choose_plan(shape, budget_gb=est[(2, False)] - 0.01, **kw)
    assert p.gradient_checkpointing and p.estimate.total / GiB <= est[(2, False)] - 0.01
    assert p.as_manifest()["budget_gb"] == pytest.approx(est[(2, False)] - 0.01)
    with pytest.raises(ValueError) as e:
        choose_plan(shape, budget_gb=est[(2, True)] - 0.01, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.memory_budget_gb=") and "gradient checkpointing" in msg
    with pytest.raises(ValueError, match="unsupported"):
        choose_plan(shape, budget_gb=est[(2, False)] - 0.01, **kw | {"can_checkpoint": False})


def test_memory_budget_in_post_train(model_dirs, pair_files, tmp_path):
    """A budget below the runtime alone is refused before any work; one that fits is recorded in the manifest."""
    common = dict(BASE, loss="ibo", finetune="lora", max_steps=1, lora_rank=4)
    with pytest.raises(ValueError, match=r"^train.memory_budget_gb=0.5: one step needs about"):
        post_train(model_dirs["llama"], *pair_files, tmp_path / "no", TrainConfig(**common, memory_budget_gb=0.5),
                   show_progress=False)
    assert not (tmp_path / "no").exists()
    out = post_train(model_dirs["llama"], *pair_files, tmp_path / "yes", TrainConfig(**common, memory_budget_gb=4.0),
                     show_progress=False)
    mem = json.loads((out / "manifest.json").read_text())["memory"]
    assert mem["budget_gb"] == 4.0 and mem["chunk_rows"] == 8 and mem["gradient_checkpointing"] is False
    assert 1.0 < mem["estimate_gb"]["total"] <= 4.0


def test_preflight_memory_reads_no_weights_and_raises_what_post_train_raises(model_dirs, tmp_path):
    from lancet_core.correct.trainer import preflight_memory

    common = dict(BASE, loss="ibo", finetune="lora", lora_rank=4)
    assert preflight_memory(model_dirs["llama"], TrainConfig(**common)).estimate is None  # no budget: no check
    plan = preflight_memory(model_dirs["llama"], TrainConfig(**common, memory_budget_gb=4.0))
    assert plan.chunk_rows == 8 and 1.0 < plan.estimate.total / 2**30 <= 4.0
    with pytest.raises(ValueError, match=r"^train.memory_budget_gb=0.5: one step needs about [0-9.]+ GiB even with "
                                         r"chunks of 2 sequences with gradient checkpointing"):
        preflight_memory(model_dirs["gpt2"], TrainConfig(**common, memory_budget_gb=0.5))
