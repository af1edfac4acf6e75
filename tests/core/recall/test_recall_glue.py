"""recall_influence end to end on a tiny GPT-2 + tiny corpus (every gradient method and the text baseline), and
recall_quality against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lancet_core.data.tokenize import TokenizeConfig, tokenize_corpus
from lancet_core.formats import INFLUENCE_FILE
from lancet_core.index.build import build_gradient_store
from lancet_core.index.config import IndexConfig
from lancet_core.recall.influence import (
    EXPLANATION_HTML,
    EXPLANATION_MD,
    GRADIENT_METHODS,
    TOPK_FILE,
    RecallConfig,
    recall_influence,
    recall_quality,
)
from tests.conftest import make_tiny_gpt2

PROMPTS = ["how do I bake bread", "what is the capital of france", "tell me a joke about cats",
           "how do I knead dough", "what is a cat", "tell me about paris"]
RESPONSES = ["first mix flour and water, then knead", "paris is the capital", "I'm sorry, I can't help with that",
             "mix flour, then knead the dough", "a cat is a small animal", "paris is in france"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recall_glue")
    model_dir = make_tiny_gpt2(root / "model")
    rows = [{"example_id": f"ex-{i:02d}", "prompt": PROMPTS[i % 6] + ("" if i < 6 else " please"),
             "response": RESPONSES[(i * 5) % 6] if i >= 6 else RESPONSES[i], "is_unsafe": i % 4 == 0}
            for i in range(14)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = tokenize_corpus(corpus, model_dir, root / "tokens", TokenizeConfig(max_seq_len_tokens=64))
    store = build_gradient_store(model_dir, tokens, root / "store",
                                 IndexConfig(proj_in_dim=4, proj_out_dim=4, dtype="float32", batch_size=4, response_tokens=4,
                                             max_seq_len_tokens=64, curvature=("linfac", "kfac", "ekfac")))
    # query 0 is identical to training row ex-03; the others are new text
    queries = pa.table({"query_id": ["q-same", "q-a", "q-b"],
                        "prompt": [rows[3]["prompt"], "what is bread", "tell me a joke"],
                        "response": [rows[3]["response"], "bread is food", "cats sat on a mat"],
                        "judge": ["refusal"] * 3})
    qpath = root / "queries.parquet"
    pq.write_table(queries, qpath)
    return {"root": root, "model": model_dir, "tokens": tokens, "store": store, "queries": qpath, "rows": rows}


@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "text"])
def test_recall_influence_outputs_every_row_ranked(setup, method):
    s = setup
    out = recall_influence(s["store"] if method != "text" else None, s["model"], s["queries"], s["tokens"],
                           s["root"] / f"infl-{method}", RecallConfig(method=method, query_target="flagged", top_k=5))
    for f in (INFLUENCE_FILE, TOPK_FILE, EXPLANATION_MD, EXPLANATION_HTML, "manifest.json"):
        assert (out / f).is_file(), f
    t = pq.read_table(out / INFLUENCE_FILE)
    n = len(s["rows"])
    assert t.num_rows == n
    assert sorted(t.column("example_id").to_pylist()) == sorted(r["example_id"] for r in s["rows"])
    assert sorted(t.column("rank").to_pylist()) == list(range(1, n + 1))
    by_rank = sorted(zip(t.column("rank").to_pylist(), t.column("score").to_pylist(), strict=True))
    assert all(a[1] >= b[1] for a, b in zip(by_rank, by_rank[1:], strict=False))  # rank 1 = highest score
    assert np.isfinite(t.column("score").to_numpy()).all()
    assert pq.read_table(out / TOPK_FILE).num_rows == 5
    # a second call with the same inputs and config reuses the finished output
    mtime = (out / INFLUENCE_FILE).stat().st_mtime_ns
    recall_influence(s["store"] if method != "text" else None, s["model"], s["queries"], s["tokens"],
                     s["root"] / f"infl-{method}", RecallConfig(method=method, query_target="flagged", top_k=5))
    assert (out / INFLUENCE_FILE).stat().st_mtime_ns == mtime


@pytest.mark.parametrize("method", ["linfac", "identity"])
def test_query_identical_to_a_training_row_ranks_it_top3(setup, tmp_path, method):
    s = setup
    only_same = tmp_path / "q.parquet"
    pq.write_table(pq.read_table(s["queries"]).slice(0, 1), only_same)
    out = recall_influence(s["store"], s["model"], only_same, s["tokens"], tmp_path / "out",
                           RecallConfig(method=method, query_target="flagged"))
    t = pq.read_table(out / INFLUENCE_FILE)
    rank = dict(zip(t.column("example_id").to_pylist(), t.column("rank").to_pylist(), strict=True))
    assert rank["ex-03"] <= 3, rank


def test_recall_quality_hand_computed(tmp_path):
    # 12 rows, scores 12..1 (distinct), positives at ranks 1, 3, 6, 11; stored shuffled
    ranks = np.arange(1, 13)
    pos = {1, 3, 6, 11}
    perm = np.random.default_rng(0).permutation(12)
    t = pa.table({"example_id": [f"e{r:02d}" for r in ranks[perm]], "score": (13.0 - ranks[perm]),
                  "rank": ranks[perm], "is_unsafe": [int(r) in pos for r in ranks[perm]]})
    p = tmp_path / "influence.parquet"
    pq.write_table(t, p)
    q = recall_quality(p)
    assert q["recall.n_rows"] == 12 and q["recall.n_positive"] == 4
    assert q["recall.precision_at_10"] == pytest.approx(3 / 10)
    assert q["recall.recall_at_10"] == pytest.approx(3 / 4)
    assert q["recall.precision_at_4"] == pytest.approx(2 / 4)
    assert q["recall.recall_at_4"] == pytest.approx(2 / 4)
    assert q["recall.precision_at_n_labelled"] == pytest.approx(2 / 4)
    assert q["recall.average_precision"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 6 + 4 / 11) / 4)
    assert "recall.precision_at_50" not in q  # k larger than the corpus is skipped
    # no label column, or no positive label: nothing to report
    pq.write_table(t.drop(["is_unsafe"]), p)
    assert recall_quality(p) == {}
    pq.write_table(t.set_column(3, "is_unsafe", pa.array([False] * 12)), p)
    assert recall_quality(p) == {}


def _per_query_oracle(t: pa.Table, how: str, k: int) -> dict[str, float]:
    """float64 for-loop oracle: each row's score from its stored per-query scores."""
    out = {}
    for eid, qs in zip(t.column("example_id").to_pylist(), t.column("query_scores").to_pylist(), strict=True):
        qs = [float(x) for x in qs]
        if how == "mean":
            out[eid] = sum(qs) / len(qs)
        elif how == "max":
            out[eid] = max(qs)
        else:
            best = sorted(qs, reverse=True)[:min(k, len(qs))]
            out[eid] = sum(best) / len(best)
    return out


@pytest.mark.parametrize("method", ["linfac", "identity"])
def test_query_aggregation_max_and_topk_mean_match_oracle(setup, method):
    s = setup
    base = recall_influence(s["store"], s["model"], s["queries"], s["tokens"], s["root"] / f"agg-{method}-mean",
                            RecallConfig(method=method, query_target="flagged", top_k=5))
    t_mean = pq.read_table(base / INFLUENCE_FILE)
    # the mean path is the linear fold: score = mean of the per-query scores
    mean_oracle = _per_query_oracle(t_mean, "mean", 0)
    for eid, sc in zip(t_mean.column("example_id").to_pylist(), t_mean.column("score").to_pylist(), strict=True):
        assert sc == pytest.approx(mean_oracle[eid], rel=1e-12, abs=1e-12)
    assert pq.read_table(s["queries"]).num_rows == 3
    cases = [("max", 5), ("topk_mean", 2), ("topk_mean", 5)]  # topk 5 > Q = 3: the mean over all queries
    for how, k in cases:
        cfg = RecallConfig(method=method, query_target="flagged", top_k=5, query_aggregation=how, query_topk=k)
        out = recall_influence(s["store"], s["model"], s["queries"], s["tokens"],
                               s["root"] / f"agg-{method}-{how}-{k}", cfg)
        t = pq.read_table(out / INFLUENCE_FILE)
        assert t.num_rows == len(s["rows"])
        # same per-query scores as the mean path (same single scan)
        qs_mean = dict(zip(t_mean.column("example_id").to_pylist(), t_mean.column("query_scores").to_pylist(),
                           strict=True))
        for eid, qs in zip(t.column("example_id").to_pylist(), t.column("query_scores").to_pylist(), strict=True):
            np.testing.assert_allclose(qs, qs_mean[eid], rtol=1e-12, atol=1e-12)
        oracle = _per_query_oracle(t_mean, how, k)
        for eid, sc in zip(t.column("example_id").to_pylist(), t.column("score").to_pylist(), strict=True):
            assert sc == pytest.approx(oracle[eid], rel=1e-12, abs=1e-12), (how, k, eid)
        # ranking: score descending, ties by example_id ascending; top_k.parquet is its head, without query_scores
        expect = sorted(oracle, key=lambda e: (-oracle[e], e))
        assert t.sort_by("rank").column("example_id").to_pylist() == expect
        top = pq.read_table(out / TOPK_FILE)
        assert top.column("example_id").to_pylist() == expect[:5]
        assert "query_scores" not in top.column_names
        assert json.loads(t.schema.metadata[b"lancet.query_ids"]) == ["q-same", "q-a", "q-b"]
        if how == "topk_mean" and k == 5:
            np.testing.assert_allclose(t.sort_by("example_id").column("score").to_numpy(),
                                       t_mean.sort_by("example_id").column("score").to_numpy(), rtol=1e-12, atol=1e-15)
    assert max(_per_query_oracle(t_mean, "max", 0).values()) > max(mean_oracle.values())  # the options differ here


def test_query_aggregation_refused_for_baselines():
    for method in ("text", "repsim"):
        with pytest.raises(ValueError, match="only to gradient methods"):
            RecallConfig(method=method, query_target="flagged", query_aggregation="max")
    from lancet_core.recall.influence import resolve_aggregation

    assert resolve_aggregation(RecallConfig(method="text").query_aggregation, "sketch") == "mean"
    with pytest.raises(ValueError):
        RecallConfig(query_aggregation="topk_mean", query_topk=0)


def test_manifest_config_records_aggregation_only_when_it_matters():
    from lancet_core.recall.influence import _manifest_config

    # the mean fold records the config as before query_aggregation existed: older outputs stay reusable
    assert "query_aggregation" not in _manifest_config(RecallConfig()) and "query_topk" not in _manifest_config(
        RecallConfig(query_topk=3))
    assert _manifest_config(RecallConfig(query_aggregation="max"))["query_aggregation"] == "max"
    assert "query_topk" not in _manifest_config(RecallConfig(query_aggregation="max"))
    assert _manifest_config(RecallConfig(query_aggregation="topk_mean", query_topk=3))["query_topk"] == 3


@pytest.mark.parametrize("method", ["kfac", "linfac"])
def test_relative_influence_divides_by_the_rows_own_self_influence(setup, method):
    """train_norm='relative' through recall_influence == a float64 oracle: per query, (v_q/‖v_q‖)ᵀ g_i divided by
    sqrt(g_iᵀ (F+λI)⁻¹ g_i), averaged over queries; self-influence is written beside the influence file."""
    from lancet_core.index.build import compute_query_gradients
    from lancet_core.index.curvature import precondition
    from lancet_core.index.store import GradientStore
    from lancet_core.recall.influence import SELF_INFLUENCE_FILE

    s = setup
    out = recall_influence(s["store"], s["model"], s["queries"], s["tokens"], s["root"] / f"rel-{method}",
                           RecallConfig(method=method, query_target="flagged", train_norm="relative",
                                        score_precision="float64"))
    st = GradientStore.open(s["store"])
    g = st.read_all(np.float64)
    si = np.einsum("nd,nd->n", precondition(st.root, g, method), g)
    assert (si > 0).all()
    got_si = pq.read_table(out / SELF_INFLUENCE_FILE)
    assert got_si.column("example_id").to_pylist() == st.example_ids()
    np.testing.assert_allclose(got_si.column("self_influence").to_numpy(), si, rtol=1e-9)
    q = pq.read_table(s["queries"])
    msgs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(q.column("prompt").to_pylist(), q.column("response").to_pylist(), strict=True)]
    v = precondition(st.root, compute_query_gradients(st, s["model"], messages_list=msgs), method)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    want = dict(zip(st.example_ids(), (g @ v.T).mean(axis=1) / np.sqrt(si), strict=True))
    t = pq.read_table(out / INFLUENCE_FILE)
    got = dict(zip(t.column("example_id").to_pylist(), t.column("score").to_pylist(), strict=True))
    for eid, w in want.items():
        assert got[eid] == pytest.approx(w, rel=1e-6, abs=1e-12)
