"""Text and repsim baselines: sensible toy rankings, oracles, batch invariance, same output format as influence."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lancet_core.chat import encode_example
from lancet_core.recall.baselines import BASELINES, repsim_scores, text_similarity_scores
from lancet_core.recall.scan import rank_scores, write_influence

TRAIN = [
    ("how do I bake bread", "first mix flour and water, then knead"),
    ("what is the capital of france", "paris is the capital"),
    ("tell me a joke about cats", "why did the cat sit on the computer"),
    ("how do I pick a lock", "insert a tension wrench and rake the pins"),
    ("tell me about dogs", "dogs are loyal animals"),
]
IDS = ["t0", "t1", "t2", "t3", "t4"]


def _train_table():
    return pa.table({"example_id": IDS, "prompt": [p for p, _ in TRAIN], "response": [r for _, r in TRAIN]})


@pytest.mark.parametrize("method", ["tfidf", "bm25"])
@pytest.mark.parametrize("target", range(5))
def test_text_identical_query_ranks_first(method, target):
    q = [{"prompt": TRAIN[target][0], "response": TRAIN[target][1]}]
    s = text_similarity_scores(_train_table(), q, method=method)
    assert s.column_names == ["example_id", "score"] and s.schema.field("score").type == pa.float64()
    ranked = rank_scores(s)
    assert ranked.column("example_id")[0].as_py() == IDS[target]


def test_text_tfidf_oracle_and_mean_over_queries():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    qs = [{"prompt": "bake bread", "response": "knead"}, {"prompt": "lock", "response": "pins"}]
    s = text_similarity_scores(_train_table(), qs).column("score").to_numpy()
    docs = [f"{p}\n{r}" for p, r in TRAIN]
    v = TfidfVectorizer().fit(docs)
    want = cosine_similarity(v.transform([f"{q['prompt']}\n{q['response']}" for q in qs]), v.transform(docs)).mean(0)
    np.testing.assert_allclose(s, want, rtol=1e-12)
    assert set(rank_scores(pa.table({"example_id": IDS, "score": s})).column("example_id")[:2].to_pylist()) == {
        "t0", "t3"}


def test_text_bm25_scores_are_per_query_normalised(caplog):
    qs = [{"prompt": "bake bread", "response": "knead"}, {"prompt": "dogs", "response": "loyal"}]
    with caplog.at_level(logging.DEBUG):
        s = text_similarity_scores(_train_table(), qs, method="bm25").column("score").to_numpy()
    assert s.max() <= 0.5 + 1e-12 and s[0] == pytest.approx(0.5) and s[4] == pytest.approx(0.5)
    assert not [r for r in caplog.records if r.name.startswith("bm25s")]  # bm25s logs at DEBUG unless quieted


def test_text_errors(tmp_path):
    with pytest.raises(ValueError, match="no queries"):
        text_similarity_scores(_train_table(), [])
    with pytest.raises(ValueError, match="method"):
        text_similarity_scores(_train_table(), [{"prompt": "a", "response": "b"}], method="bm26")
    with pytest.raises(ValueError, match="duplicate example_id"):
        text_similarity_scores(pa.table({"example_id": ["a", "a"], "prompt": ["x", "y"], "response": ["x", "y"]}),
                               [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="query row 0"):
        text_similarity_scores(_train_table(), [{"prompt": "a"}])
    pq.write_table(_train_table(), tmp_path / "tokens.parquet")  # paths work too
    assert text_similarity_scores(tmp_path / "tokens.parquet", [{"prompt": "lock", "response": "pins"}]).num_rows == 5
    assert BASELINES == ("text", "repsim", "identity")


@pytest.fixture(scope="module")
def model_tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval(), tok


def _tokens_table(tok):
    encs = [encode_example(tok, p, r) for p, r in TRAIN]
    return pa.table({"example_id": IDS, "input_ids": [e.input_ids for e in encs],
                     "loss_mask": [e.loss_mask for e in encs], "prompt": [p for p, _ in TRAIN],
                     "response": [r for _, r in TRAIN]})


@pytest.mark.parametrize("target", range(5))
def test_repsim_identical_query_ranks_first(model_tok, target):
    model, tok = model_tok
    q = [{"prompt": TRAIN[target][0], "response": TRAIN[target][1]}]
    s = repsim_scores(model, tok, _tokens_table(tok), q, batch_size=2)
    assert s.column("score")[target].as_py() == pytest.approx(1.0, abs=1e-6)
    assert rank_scores(s).column("example_id")[0].as_py() == IDS[target]


def test_repsim_oracle_and_batch_invariance(model_tok, tmp_path):
    model, tok = model_tok
    t = _tokens_table(tok)
    qs = [{"prompt": "how do I pick a lock", "response": "rake the pins"}, {"prompt": "cats", "response": "meow"}]
    s1 = repsim_scores(model, tok, t, qs, batch_size=1).column("score").to_numpy()
    s4 = repsim_scores(model, tok, t, qs, batch_size=4).column("score").to_numpy()
    np.testing.assert_allclose(s1, s4, atol=1e-6)

    def rep(ids, mask):  # one sequence, no padding, explicit loop over response positions
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].double()
        pos = [i for i, m in enumerate(mask) if m]
        return sum(h[i] for i in pos).numpy() / len(pos)

    R = [rep(a, b) for a, b in zip(t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist(), strict=True)]
    Q = [rep(e.input_ids, e.loss_mask) for e in (encode_example(tok, q["prompt"], q["response"]) for q in qs)]
    want = [np.mean([r @ q / np.linalg.norm(r) / np.linalg.norm(q) for q in Q]) for r in R]
    np.testing.assert_allclose(s1, want, atol=1e-6)
    # same writer as influence
    pq.write_table(t, tmp_path / "tokens.parquet")
    out = write_influence(rank_scores(pa.table({"example_id": IDS, "score": s1}), tmp_path / "tokens.parquet"),
                          tmp_path / "influence.parquet")
    assert pq.read_table(out).column_names == ["example_id", "score", "rank", "prompt", "response"]


def test_repsim_errors(model_tok):
    model, tok = model_tok
    bad = pa.table({"example_id": ["a"], "input_ids": [[1, 2, 3]], "loss_mask": [[0, 0, 0]]})
    with pytest.raises(ValueError, match="no response token"):
        repsim_scores(model, tok, bad, [{"prompt": "a", "response": "b"}])
    bad = pa.table({"example_id": ["a"], "input_ids": [[1, 2, 3]], "loss_mask": [[0, 1]]})
    with pytest.raises(ValueError, match="same length"):
        repsim_scores(model, tok, bad, [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="no training rows"):
        repsim_scores(model, tok, [], [{"prompt": "a", "response": "b"}])


def _old_representations(model, sequences, batch_size, pad_id):
    """The previous implementation, kept as the oracle: the whole LM (logits included) with output_hidden_states,
    batches in input order."""
    out = []
    with torch.no_grad():
        for b in range(0, len(sequences), batch_size):
            chunk = sequences[b : b + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.float64)
            for j, (r, m) in enumerate(chunk):
                ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
                attn[j, : len(r)] = 1
                mask[j, : len(m)] = torch.as_tensor(m, dtype=torch.float64)
            h = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1].double()
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy())
    return np.concatenate(out, axis=0)


def _tiny_lm(arch, vocab_size, pad_id):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2)
        cls = GPT2LMHeadModel
    else:
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=pad_id)
        cls = LlamaForCausalLM
    cfg._attn_implementation = "eager"
    return cls(cfg).double().eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_repsim_equals_previous_implementation_without_lm_head(tiny_tokenizer_dir, arch, one_thread):
    """Backbone-only, length-sorted batches == the previous full-LM, corpus-order batches (float64 model), and the
    LM head is never run."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    model = _tiny_lm(arch, len(tok), tok.pad_token_id)
    # rows whose lengths are not sorted in corpus order, so sorted batches hold other rows than corpus-order ones
    train = TRAIN + [("a", "b"), ("how do I bake bread and what is the capital of france", "paris, then knead it")]
    encs = [encode_example(tok, p, r) for p, r in train]
    lengths = [len(e.input_ids) for e in encs]
    assert lengths != sorted(lengths)
    table = pa.table({"example_id": [f"t{i}" for i in range(len(train))], "input_ids": [e.input_ids for e in encs],
                      "loss_mask": [e.loss_mask for e in encs]})
    qs = [{"prompt": "how do I pick a lock", "response": "rake the pins"}, {"prompt": "cats", "response": "meow"},
          {"prompt": "a much longer question about bread and water and flour", "response": "knead"}]
    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    try:
        got = repsim_scores(model, tok, table, qs, batch_size=3).column("score").to_numpy()
    finally:
        hook.remove()
    assert head_calls == []
    R = _old_representations(model, [(e.input_ids, e.loss_mask) for e in encs], 3, tok.pad_token_id)
    Q = _old_representations(model, [(e.input_ids, e.loss_mask) for e in (encode_example(tok, q["prompt"],
                             q["response"]) for q in qs)], 3, tok.pad_token_id)
    want = ((R / np.linalg.norm(R, axis=1, keepdims=True)) @ (Q / np.linalg.norm(Q, axis=1, keepdims=True)).T).mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
