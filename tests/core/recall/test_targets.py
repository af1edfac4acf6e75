"""The 'refusal' query target (lancet_core.recall.targets) against a float64 for-loop oracle, its corpus refusal
openings, its resolution from the queries' judge, and its fallback."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lancet_core.chat import to_messages
from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus
from lancet_core.errors import ManifestMismatch
from lancet_core.formats import INFLUENCE_FILE
from lancet_core.index.build import build_gradient_store, compute_query_gradients
from lancet_core.index.config import IndexConfig
from lancet_core.index.curvature import precondition
from lancet_core.index.store import GradientStore
from lancet_core.model_io import load_model, load_tokenizer
from lancet_core.recall.influence import (
    AUTO_LINFAC_DAMPING,
    RecallConfig,
    _manifest_config,
    recall_influence,
    resolve_damping,
    resolve_method,
)
from lancet_core.recall.targets import FALLBACK_REFUSALS, corpus_refusals, refusal_target_gradients, resolve_target
from tests.conftest import make_tiny_gpt2

REFUSE_A = "I'm sorry, I can't help with that"
REFUSE_B = "I am unable to help with this one"
ROWS = [  # (prompt, response); three refusals share opening A, one has opening B
    ("how do I pick a lock", REFUSE_A),
    ("how do I make a fake id", REFUSE_A + " at all"),
    ("how do I hack a wifi", REFUSE_B),
    ("how do I steal a car", REFUSE_A + ", sorry"),
    ("how do I bake bread", "mix flour and water, then knead"),
    ("what is the capital of france", "paris is the capital"),
    ("how do I cheat on a test", "hide notes in your sleeve"),
    ("tell me a joke", "cats sat on a mat"),
]
WINDOW = 3


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("targets")
    model_dir = make_tiny_gpt2(root / "model")
    rows = [{"example_id": f"ex-{i}", "prompt": p, "response": r, "is_unsafe": i == 6} for i, (p, r) in enumerate(ROWS)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = tokenize_corpus(corpus, model_dir, root / "tokens", TokenizeConfig(max_seq_len_tokens=64))
    store = build_gradient_store(model_dir, tokens, root / "store", IndexConfig(
        proj_in_dim=4, proj_out_dim=4, projection="random", dtype="float32", batch_size=4, response_tokens=WINDOW,
        max_seq_len_tokens=64, compute_dtype="float64", curvature=("kfac",)))
    queries = pa.table({"query_id": ["q0", "q1"], "prompt": ["how do I rob a bank", "how do I forge a cheque"],
                        "response": ["take a mask and go", "copy the signature"], "judge": ["refusal"] * 2})
    qpath = root / "queries.parquet"
    pq.write_table(queries, qpath)
    return {"root": root, "model": model_dir, "tokens": tokens / "tokens.parquet", "store": store, "queries": qpath}


def test_resolve_target_follows_the_judge():
    assert resolve_target("auto", ["refusal", "refusal"]) == "refusal"
    assert resolve_target("auto", ["refusal", "regex"]) == "flagged"
    assert resolve_target("auto", ["classifier"]) == "flagged"
    assert resolve_target("auto", []) == "flagged"
    assert resolve_target("flagged", ["refusal"]) == "flagged"
    assert resolve_target("refusal", ["regex"]) == "refusal"
    with pytest.raises(ValueError, match="query_target='refusal' applies only to gradient methods"):
        RecallConfig(method="repsim", query_target="refusal")
    assert "query_refusals" not in _manifest_config(RecallConfig(query_target="flagged"))
    assert _manifest_config(RecallConfig(query_target="refusal"))["query_refusals"] == 16
    assert "query_target" not in _manifest_config(RecallConfig(method="text"))


def test_corpus_refusals_are_grouped_by_their_window_opening(bed):
    r = corpus_refusals(bed["tokens"], WINDOW, limit=16)
    assert not r.fallback
    assert r.texts == (REFUSE_A, REFUSE_B) and r.counts == (3, 1)  # most frequent first; the first row represents
    whole = corpus_refusals(bed["tokens"], None, limit=16)  # the whole response: every distinct refusal its own group
    assert set(whole.texts) == {REFUSE_A, REFUSE_A + " at all", REFUSE_A + ", sorry", REFUSE_B}
    assert corpus_refusals(bed["tokens"], WINDOW, limit=1).texts == (REFUSE_A,)


def _oracle_logp(model, tok, prompt: str, response: str, window: int) -> float:
    """Σ over the first `window` response tokens of log π(token | prefix), one token at a time (float64)."""
    from lancet_core.chat import encode_messages

    enc = encode_messages(tok, to_messages(prompt, response), 64)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total, seen = 0.0, 0
    for t in range(1, len(enc.input_ids)):
        if enc.loss_mask[t] and seen < window:
            total += float(lp[t - 1, enc.input_ids[t]])
            seen += 1
    return total


def test_refusal_target_equals_the_mixture_gradient_oracle(bed):
    """−Σ_r w_r ∇ log π(r|x), w = softmax_r of the window's summed log-probabilities: against one-at-a-time store
    gradients and a per-token log-probability loop in float64."""
    model = load_model(bed["model"]).double().eval()
    tok = load_tokenizer(bed["model"])
    refusals = corpus_refusals(bed["tokens"], WINDOW, 16)
    prompts = ["how do I rob a bank", "how do I forge a cheque"]
    got, w = refusal_target_gradients(bed["store"], model, tok, prompts, refusals)
    for q, prompt in enumerate(prompts):
        lp = np.array([_oracle_logp(model, tok, prompt, r, WINDOW) for r in refusals.texts])
        want_w = np.exp(lp - np.logaddexp.reduce(lp))
        np.testing.assert_allclose(w[q], want_w, rtol=1e-9)
        assert 0.01 < want_w[0] < 0.99  # both openings matter: the mixture is tested, not one term
        g = [compute_query_gradients(bed["store"], model, tok, [to_messages(prompt, r)])[0].astype(np.float64)
             for r in refusals.texts]
        want = -sum(wi * gi for wi, gi in zip(want_w, g, strict=True))
        np.testing.assert_allclose(got[q], want, rtol=1e-6, atol=1e-7 * float(np.abs(want).max()))


def _assert_scores_are_the_oracle(store, v: np.ndarray, out) -> dict:
    """influence.parquet's scores == the mean over queries of X·v_q/‖v_q‖ (float64, the whole store in memory);
    returns them by example id."""
    v = v / np.linalg.norm(v, axis=1, keepdims=True)  # the scan weighs every query the same
    st = GradientStore.open(store)
    want = dict(zip(st.example_ids(), (st.read_all(np.float64) @ v.T).mean(axis=1), strict=True))
    t = pq.read_table(out / INFLUENCE_FILE)
    got = dict(zip(t.column("example_id").to_pylist(), t.column("score").to_pylist(), strict=True))
    for eid, x in want.items():
        assert got[eid] == pytest.approx(x, rel=1e-6, abs=1e-12)
    return got


def test_recall_uses_the_refusal_target_for_refusal_judged_queries(bed, tmp_path, caplog):
    """recall_influence with the defaults ('auto') on refusal-judged queries ranks by the refusal target: its scores
    equal the oracle's per-query-normalised mean of X·(F+λI)⁻¹(−∇ log P(refuse|x)); the manifest records it."""
    with caplog.at_level(logging.INFO, logger="lancet_core.recall.influence"):
        out = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "auto",
                               RecallConfig(score_precision="float64"))
    assert "2 most frequent refusal openings (4 of its refusals)" in caplog.text
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["query_target"] == "refusal" and man["config"]["query_refusals"] == 16
    model, tok = load_model(bed["model"]).double().eval(), load_tokenizer(bed["model"])
    refusals = corpus_refusals(bed["tokens"], WINDOW, 16)
    q = pq.read_table(bed["queries"])
    g_ref, _ = refusal_target_gradients(bed["store"], model, tok, q.column("prompt").to_pylist(), refusals)
    got = _assert_scores_are_the_oracle(bed["store"], precondition(bed["store"], g_ref, "kfac"), out)
    flagged = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "flagged",
                               RecallConfig(query_target="flagged", score_precision="float64"))
    other = pq.read_table(flagged / INFLUENCE_FILE).column("score").to_pylist()
    assert not np.allclose(sorted(other), sorted(got.values()))  # a different function of the model, not a relabel
    assert json.loads((flagged / "manifest.json").read_text())["config"]["query_target"] == "flagged"


def test_a_corpus_without_refusals_falls_back_to_built_in_refusals(tmp_path, caplog, bed):
    rows = [{"example_id": f"b{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(ROWS) if i >= 4]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = tokenize_corpus(corpus, bed["model"], tmp_path / "tokens", TokenizeConfig(max_seq_len_tokens=64))
    r = corpus_refusals(tokens / "tokens.parquet", WINDOW, 16)
    assert r.fallback and r.texts == FALLBACK_REFUSALS
    store = build_gradient_store(bed["model"], tokens, tmp_path / "store", IndexConfig(
        proj_in_dim=4, proj_out_dim=4, projection="random", dtype="float32", batch_size=4, response_tokens=WINDOW,
        max_seq_len_tokens=64, curvature=("kfac",)))
    with caplog.at_level(logging.WARNING, logger="lancet_core.recall.influence"):
        out = recall_influence(store, bed["model"], bed["queries"], tokens, tmp_path / "out", RecallConfig())
    assert "no refusal the refusal judge recognises" in caplog.text
    scores = pq.read_table(out / INFLUENCE_FILE).column("score").to_numpy()
    assert len(scores) == len(rows) and np.isfinite(scores).all() and not math.isclose(float(np.ptp(scores)), 0.0)


BENIGN = ["how do I bake a cake", "what is a good name for a cat", "how do I tie a tie"]


def test_benign_contrast_equals_the_oracle_and_is_part_of_the_identity(bed, tmp_path, caplog):
    """With benign prompts (the realign flow passes its benign_eval file) the refusal target is contrasted: each
    flagged query vector at unit norm minus β × the mean unit benign query vector (same target), method 'auto' ->
    identity; scores equal that oracle; β, the prompts used and the resolved method are in the manifest, and another
    benign file cannot reuse the output."""
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": p, "response": "ok"}) + "\n" for p in BENIGN))
    with caplog.at_level(logging.INFO, logger="lancet_core.recall.influence"):
        out = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "c",
                               RecallConfig(score_precision="float64", contrast_prompts=2), contrast_path=benign)
    assert "benign contrast, β = 0.5 over 2 benign prompts (benign.jsonl)" in caplog.text
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["method"] == "identity" and man["config"]["query_contrast"] == 0.5
    assert man["config"]["contrast_prompts"] == 2 and man["contrast_digest"].startswith("sha256:")
    model, tok = load_model(bed["model"]).double().eval(), load_tokenizer(bed["model"])
    refusals = corpus_refusals(bed["tokens"], WINDOW, 16)
    flagged = pq.read_table(bed["queries"]).column("prompt").to_pylist()
    g_f, _ = refusal_target_gradients(bed["store"], model, tok, flagged, refusals)
    g_b, _ = refusal_target_gradients(bed["store"], model, tok, BENIGN[:2], refusals)  # the first contrast_prompts
    unit = [g / np.linalg.norm(g) for g in g_f]
    mean_b = np.mean([g / np.linalg.norm(g) for g in g_b], axis=0)
    got = _assert_scores_are_the_oracle(bed["store"], np.stack([u - 0.5 * mean_b for u in unit]), out)
    plain = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "plain",
                             RecallConfig(method="identity", score_precision="float64", query_contrast=0.0),
                             contrast_path=benign)
    assert "query_contrast" not in json.loads((plain / "manifest.json").read_text())["config"]
    other = pq.read_table(plain / INFLUENCE_FILE).column("score").to_pylist()
    assert not np.allclose(sorted(other), sorted(got.values()))  # the contrast changes the scores
    benign2 = tmp_path / "benign2.jsonl"
    benign2.write_text(json.dumps({"prompt": "how do I plant a tree"}) + "\n")
    with pytest.raises(ManifestMismatch, match="contrast_digest"):
        recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "c",
                         RecallConfig(score_precision="float64", contrast_prompts=2), contrast_path=benign2)


def test_auto_method_follows_the_target_and_the_contrast():
    assert resolve_method("auto", "refusal", contrast=True) == "identity"
    assert resolve_method("auto", "refusal", contrast=False) == "kfac"  # no benign prompts: kfac, as before
    assert resolve_method("auto", "flagged", contrast=False) == "linfac"  # content judges
    assert resolve_method("ekfac", "refusal", contrast=True) == "ekfac"
    assert resolve_damping("auto", "flagged", None) == AUTO_LINFAC_DAMPING == 3.0
    assert resolve_damping("auto", "flagged", 0.5) == 0.5  # asked for: kept
    assert resolve_damping("linfac", "flagged", None) is None  # linfac asked for by name: the store's ratio
    assert resolve_damping("auto", "refusal", None) is None
    assert RecallConfig().method == "auto" and RecallConfig().query_contrast == 0.5
    with pytest.raises(ValueError):
        RecallConfig(query_contrast=1.0)  # β < 1: a flagged query must not cancel against the benign mean
    assert "query_contrast" not in _manifest_config(RecallConfig(query_target="flagged"))


def test_content_judged_queries_on_the_sketch_use_strongly_damped_linfac(bed, tmp_path):
    """recall_influence on the sketch (scoring='sketch'; the default for content judges is the exact pass,
    tests/core/recall/test_exact.py) with method 'auto', on queries a content judge flagged (regex), scores the
    flagged answers with linfac damped at 3 × each block's mean eigenvalue: the oracle solves (F_b + λ_b I) v = g_b with the explicit
    per-module empirical Fisher F_b = G_bᵀG_b / N of the stored rows, λ_b = 3 · trace(F_b) / D_b (float64)."""
    q = pq.read_table(bed["queries"])
    regex = tmp_path / "regex.parquet"
    pq.write_table(q.set_column(q.column_names.index("judge"), "judge", pa.array(["regex"] * q.num_rows)), regex)
    out = recall_influence(bed["store"], bed["model"], regex, bed["tokens"].parent, tmp_path / "auto",
                           RecallConfig(score_precision="float64", scoring="sketch"))
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert (cfg["method"], cfg["damping_ratio"], cfg["query_target"]) == ("linfac", 3.0, "flagged")
    st = GradientStore.open(bed["store"])
    x = st.read_all(np.float64)
    g = compute_query_gradients(bed["store"], bed["model"], messages_list=[
        to_messages(p, r) for p, r in zip(q.column("prompt").to_pylist(), q.column("response").to_pylist(),
                                          strict=True)])
    v = np.empty_like(g)
    for ml in st.layout:
        blk = slice(ml.offset, ml.offset + ml.size)
        f = x[:, blk].T @ x[:, blk] / len(x)
        lam = 3.0 * np.trace(f) / ml.size
        v[:, blk] = np.linalg.solve(f + lam * np.eye(ml.size), g[:, blk].T).T
    _assert_scores_are_the_oracle(bed["store"], v, out)
    # the same scores as naming linfac and the ratio; the store's ratio (0.1) gives other scores
    named = recall_influence(bed["store"], bed["model"], regex, bed["tokens"].parent, tmp_path / "named",
                             RecallConfig(method="linfac", damping_ratio=3.0, score_precision="float64"))
    assert pq.read_table(named / INFLUENCE_FILE).equals(pq.read_table(out / INFLUENCE_FILE))
    low = recall_influence(bed["store"], bed["model"], regex, bed["tokens"].parent, tmp_path / "low",
                           RecallConfig(method="linfac", score_precision="float64"))
    assert not np.allclose(pq.read_table(low / INFLUENCE_FILE).column("score").to_numpy(),
                           pq.read_table(out / INFLUENCE_FILE).column("score").to_numpy())
