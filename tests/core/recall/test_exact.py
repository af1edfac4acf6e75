"""The exact scoring pass (lancet_core.recall.exact) against float64 oracles.

- scores = explicit per-example full gradients (a for-loop of single-example backward passes) · V, for GPT-2 Conv1D
  and Llama Linear, padded batches, a response window and the whole response, Q queries at once;
- full-dimensional kfac (Kronecker and factored damping) and ekfac equal an explicit inverse of the Kronecker-product
  Fisher applied to vec(G); the factors equal a slow per-example accumulation;
- the query gradients equal the oracle's; a `rows` subset scores like the same rows of a full pass (rerank with
  M = N is the exact pass), from a tokens Parquet, with the written file's fold = scan.fold_queries'.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lancet_core.index.hooks import weight_grad_out_in
from lancet_core.recall.exact import (
    fit_curvature,
    fold_scores,
    full_layout,
    precondition_queries,
    query_gradients,
    score_corpus,
    score_rows,
    write_scores,
)
from tests.core.index.test_grad_hooks import first_response_tokens, oracle_loglik, random_rows, tiny_gpt2
from tests.core.index.test_grad_hooks import tiny_llama as _tiny_llama
from tests.core.recall.test_influence_fidelity import B as FIDELITY


def tiny_llama(seed: int = 0):
    """The hooks tests' tiny Llama, computing truly in float64 once .double()'d: stock HF Llama runs RMSNorm, the
    eager softmax and the rotary angles in float32 (the fidelity bench's float64_model patches them), which would
    limit any float64 comparison to ~1e-8."""
    model, _ = FIDELITY.float64_model(_tiny_llama(seed), "model.layers.0.mlp.down_proj")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def oracle_full_gradients(model, layout, rows_ids, rows_mask, reduction="mean"):
    """{module: [N, d_out, d_in]} per-example ∇_W log π(y|x) by single-example backward() (the masks already
    windowed)."""
    mods = dict(model.named_modules())
    out = {ml.name: [] for ml in layout}
    for ids, mask in zip(rows_ids, rows_mask, strict=True):
        model.zero_grad()
        oracle_loglik(model, ids, mask, reduction).backward()
        for ml in layout:
            out[ml.name].append(weight_grad_out_in(mods[ml.name]).detach().double().numpy().copy())
    model.zero_grad()
    return {k: np.stack(v) for k, v in out.items()}


def random_queries(layout, q, seed=0):
    g = np.random.default_rng(seed)
    return {ml.name: g.standard_normal((q, ml.d_out, ml.d_in)) for ml in layout}


def dot(grads, queries):
    """[N, Q] Σ_m ⟨G_i,m, V_q,m⟩, explicitly flattened."""
    return sum(grads[k].reshape(len(grads[k]), -1) @ queries[k].reshape(len(queries[k]), -1).T for k in grads)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
@pytest.mark.parametrize("window", [None, 3], ids=["whole-response", "first-3"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_scores_equal_per_example_gradients_dot_v(make, window, reduction):
    model = make().double()
    layout = full_layout(model)
    rows_ids, rows_mask = random_rows(7, seed=5)
    assert len({len(r) for r in rows_ids}) > 1  # rows of different lengths: padded batches
    V = random_queries(layout, 3)
    got = score_rows(model, V, rows_ids, rows_mask, reduction=reduction, response_tokens=window, batch_size=3)
    assert all(p.requires_grad for p in model.parameters())  # restored
    want = dot(oracle_full_gradients(model, layout, rows_ids, [first_response_tokens(m, window) for m in rows_mask],
                                     reduction), V)
    assert got.shape == (7, 3) and got.dtype == np.float64
    assert rel(got, want) <= 1e-10, rel(got, want)
    # the batch size (padding widths) does not change the scores beyond rounding
    one = score_rows(model, V, rows_ids, rows_mask, reduction=reduction, response_tokens=window, batch_size=1)
    assert rel(one, want) <= 1e-10


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_query_gradients_equal_the_oracle(make):
    model = make().double()
    layout = full_layout(model)
    rows_ids, rows_mask = random_rows(4, seed=9)
    got = query_gradients(model, rows_ids, rows_mask, response_tokens=2, batch_size=3)
    want = oracle_full_gradients(model, layout, rows_ids, [first_response_tokens(m, 2) for m in rows_mask])
    for ml in layout:
        assert got[ml.name].shape == (4, ml.d_out, ml.d_in)
        assert rel(got[ml.name], want[ml.name]) <= 1e-10


def _slow_factors(model, layout, rows_ids, rows_mask):
    """Σ_t a aᵀ, Σ_t δ δᵀ over non-padding tokens, per module, by single-example passes (mean reduction)."""
    mods = dict(model.named_modules())
    out = {ml.name: [np.zeros((ml.d_in, ml.d_in)), np.zeros((ml.d_out, ml.d_out))] for ml in layout}
    tokens = 0
    for r, m in zip(rows_ids, rows_mask, strict=True):
        acts, outs, hs = {}, {}, []
        for ml in layout:
            def fwd(mod, args, o, name=ml.name, acts=acts, outs=outs):
                acts[name] = args[0].detach()[0]
                o.retain_grad()
                outs[name] = o
            hs.append(mods[ml.name].register_forward_hook(fwd))
        model.zero_grad()
        oracle_loglik(model, r, m, "mean").backward()
        for h in hs:
            h.remove()
        for ml in layout:
            a, d = acts[ml.name].numpy(), outs[ml.name].grad[0].numpy()
            out[ml.name][0] += a.T @ a
            out[ml.name][1] += d.T @ d
        tokens += len(r)
    model.zero_grad()
    return out, tokens


def _kron_reference(G, A, S, tokens, n, ratio, damping):
    """V from an explicit (d_out·d_in)² Fisher and np.linalg.inv, row-major vec (index o·d_in + i)."""
    a, s = A / tokens, S / tokens * (tokens / n)
    if damping == "kronecker":
        F = np.kron(s, a)
        lam = ratio * np.trace(F) / F.shape[0]
        M = F + lam * np.eye(F.shape[0])
    else:
        la, ls = ratio * np.trace(a) / a.shape[0], ratio * np.trace(s) / s.shape[0]
        M = np.kron(s + ls * np.eye(len(s)), a + la * np.eye(len(a)))
    return (np.linalg.inv(M) @ G.reshape(len(G), -1).T).T.reshape(G.shape)


@pytest.mark.parametrize("damping", ["kronecker", "factored"])
def test_full_kfac_equals_an_explicit_kronecker_inverse(damping):
    model = tiny_gpt2().double()
    layout = [ml for ml in full_layout(model) if ml.name.endswith(("h.1.attn.c_proj", "h.0.mlp.c_fc"))]
    rows_ids, rows_mask = random_rows(6, seed=2)
    cur = fit_curvature(model, rows_ids, rows_mask, "kfac", damping_ratio=0.1, damping=damping, layout=layout,
                        batch_size=4)
    slow, tokens = _slow_factors(model, layout, rows_ids, rows_mask)
    assert cur.tokens == tokens and cur.rows == 6
    G = random_queries(layout, 2, seed=4)
    V = precondition_queries(G, cur)
    for ml in layout:
        A, S = slow[ml.name]
        want = _kron_reference(G[ml.name], A, S, tokens, 6, 0.1, damping)
        assert rel(V[ml.name], want) <= 1e-9, (ml.name, rel(V[ml.name], want))


def test_full_ekfac_equals_an_explicit_inverse_in_its_eigenbasis():
    model = tiny_llama().double()
    layout = [ml for ml in full_layout(model) if ml.name.endswith(("layers.1.mlp.down_proj", "layers.0.self_attn.k_proj"))]
    rows_ids, rows_mask = random_rows(6, seed=3)
    cur = fit_curvature(model, rows_ids, rows_mask, "ekfac", damping_ratio=0.1, layout=layout, batch_size=4)
    grads = oracle_full_gradients(model, layout, rows_ids, rows_mask)
    slow, tokens = _slow_factors(model, layout, rows_ids, rows_mask)
    G = random_queries(layout, 2, seed=6)
    V = precondition_queries(G, cur)
    for ml in layout:
        qa, qs = cur.blocks[ml.name]["QA"], cur.blocks[ml.name]["QS"]
        A, S = slow[ml.name]
        # the eigenbases diagonalise the factors
        for q, f in ((qa, A), (qs, S)):
            np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-12)
            off = q.T @ f @ q
            assert np.abs(off - np.diag(np.diag(off))).max() <= 1e-9 * np.abs(f).max()
        grid = np.mean([(qs.T @ g @ qa) ** 2 for g in grads[ml.name]], axis=0)
        lam = 0.1 * grid.mean()
        K = np.kron(qs, qa)  # vec_r(Q_S X Q_Aᵀ) = (Q_S ⊗ Q_A) vec_r(X)
        F = K @ np.diag(grid.reshape(-1)) @ K.T
        M = np.linalg.inv(F + lam * np.eye(len(F)))
        want = (M @ G[ml.name].reshape(2, -1).T).T.reshape(G[ml.name].shape)
        assert rel(V[ml.name], want) <= 1e-9, (ml.name, rel(V[ml.name], want))


def test_identity_is_the_query_itself_and_bad_kinds_are_refused():
    model = tiny_gpt2().double()
    rows_ids, rows_mask = random_rows(3)
    G = random_queries(full_layout(model), 1)
    cur = fit_curvature(model, rows_ids, rows_mask, "identity")
    assert all(np.array_equal(precondition_queries(G, cur)[k], G[k]) for k in G)
    with pytest.raises(ValueError, match="kind"):
        fit_curvature(model, rows_ids, rows_mask, "linfac")
    with pytest.raises(ValueError, match="ekfac"):
        fit_curvature(model, rows_ids, rows_mask, "ekfac", damping="factored")


def _write_tokens(path, rows_ids, rows_mask):
    pq.write_table(pa.table({
        "example_id": [f"ex{i:03d}" for i in range(len(rows_ids))],
        "input_ids": pa.array(rows_ids, pa.list_(pa.int32())),
        "loss_mask": pa.array(rows_mask, pa.list_(pa.int8())),
    }), path)
    return path


def test_a_rows_subset_scores_like_the_full_pass(tmp_path):
    """Rerank over M candidates = the same rows of the exact pass; M = N (any order) is the exact pass."""
    model = tiny_llama().double()
    layout = full_layout(model)
    rows_ids, rows_mask = random_rows(11, seed=4)
    tokens = _write_tokens(tmp_path / "tokens.parquet", rows_ids, rows_mask)
    V = random_queries(layout, 2, seed=1)
    seen = []
    full = score_corpus(model, V, tokens, response_tokens=4, batch_size=3, chunk_rows=5,
                        progress=lambda d, t: seen.append((d, t)))
    assert seen == [(5, 11), (10, 11), (11, 11)]
    want = dot(oracle_full_gradients(model, layout, rows_ids, [first_response_tokens(m, 4) for m in rows_mask]), V)
    assert rel(full, want) <= 1e-10
    sub = [9, 2, 5, 0]
    part = score_corpus(model, V, tokens, rows=sub, response_tokens=4, batch_size=3)
    np.testing.assert_allclose(part, full[sub], rtol=1e-12, atol=1e-12 * np.abs(full).max())
    perm = np.random.default_rng(0).permutation(11)
    every = score_corpus(model, V, tokens, rows=perm, response_tokens=4, batch_size=3, chunk_rows=5)
    np.testing.assert_allclose(every, full[perm], rtol=1e-12, atol=1e-12 * np.abs(full).max())
    again = score_corpus(model, V, tokens, response_tokens=4, batch_size=3, chunk_rows=5)
    assert np.array_equal(again, full)  # deterministic
    with pytest.raises(ValueError, match="rows must be positions"):
        score_corpus(model, V, tokens, rows=[11])

    out = write_scores(tmp_path / "exact.parquet", tokens, part, V, rows=sub)
    t = pq.read_table(out)
    assert t.column("row_id").to_pylist() == sub
    assert t.column("example_id").to_pylist() == [f"ex{i:03d}" for i in sub]
    from lancet_core.recall.scan import fold_queries, normalized_queries

    flat = np.concatenate([V[ml.name].reshape(2, -1) for ml in layout], axis=1)
    g = np.concatenate([oracle_full_gradients(model, layout, [rows_ids[i] for i in sub],
                                              [first_response_tokens(rows_mask[i], 4) for i in sub])[ml.name]
                        .reshape(len(sub), -1) for ml in layout], axis=1)
    np.testing.assert_allclose(t.column("score").to_numpy(), g @ fold_queries(flat, flat.shape[1]), rtol=1e-10)
    per_q = np.array(t.column("query_scores").to_pylist())
    np.testing.assert_allclose(per_q, g @ normalized_queries(flat, flat.shape[1]).T, rtol=1e-10)
    folded, _ = fold_scores(part, V)
    np.testing.assert_array_equal(t.column("score").to_numpy(), folded)


def test_query_matrices_must_match_the_modules():
    model = tiny_gpt2().double()
    layout = full_layout(model)
    rows_ids, rows_mask = random_rows(2)
    V = random_queries(layout, 1)
    with pytest.raises(ValueError, match="do not match the target modules"):
        score_rows(model, {k: v for k, v in list(V.items())[1:]}, rows_ids, rows_mask)
    bad = dict(V)
    bad[layout[0].name] = V[layout[0].name][:, :, :-1]
    with pytest.raises(ValueError, match="expected"):
        score_rows(model, bad, rows_ids, rows_mask)


# ------------------------------------------------------------------ against the store path, on the targets' chat bed
from tests.core.recall.test_targets import WINDOW, bed  # noqa: E402, F401  (the module-scoped chat bed fixture)


def test_full_rank_kfac_exact_pass_equals_the_unprojected_store_path(bed, tmp_path):  # noqa: F811
    """At full rank the exact pass with kfac is the store's kfac influence: same factors, same damping, same fold
    (the store holds float32 values, hence the tolerance)."""
    from lancet_core.chat import to_messages
    from lancet_core.index.build import build_gradient_store, compute_query_gradients
    from lancet_core.index.config import IndexConfig
    from lancet_core.index.curvature import precondition
    from lancet_core.index.store import GradientStore
    from lancet_core.model_io import load_model, load_tokenizer
    from lancet_core.recall.exact import flagged_query_gradients

    store = build_gradient_store(bed["model"], bed["tokens"], tmp_path / "store", IndexConfig(
        proj_in_dim=None, proj_out_dim=None, projection="random", dtype="float32", batch_size=3,
        response_tokens=WINDOW, max_seq_len_tokens=64, compute_dtype="float64", curvature=("kfac",)))
    q = pq.read_table(bed["queries"])
    prompts, responses = q.column("prompt").to_pylist(), q.column("response").to_pylist()
    g = compute_query_gradients(store, bed["model"], messages_list=[
        to_messages(p, r) for p, r in zip(prompts, responses, strict=True)])
    st = GradientStore.open(store)
    want = st.read_all(np.float64) @ precondition(store, g, kind="kfac").T  # [N, Q]

    model = load_model(bed["model"]).double()
    tok = load_tokenizer(bed["model"])
    G = flagged_query_gradients(model, tok, prompts, responses, max_len=64, response_tokens=WINDOW)
    flat = np.concatenate([G[ml.name].reshape(len(prompts), -1) for ml in st.layout], axis=1)
    np.testing.assert_allclose(flat, g, rtol=1e-6, atol=1e-6 * np.abs(g).max())  # the store's query gradients
    t = pq.read_table(bed["tokens"], columns=["input_ids", "loss_mask"])
    cur = fit_curvature(model, t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist(), "kfac",
                        damping_ratio=0.1, response_tokens=WINDOW, batch_size=3)
    got = score_corpus(model, precondition_queries(G, cur), bed["tokens"], response_tokens=WINDOW, batch_size=3)
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_refusal_target_in_full_dimension_projects_to_the_store_target(bed):  # noqa: F811
    """The full-dimensional refusal target, projected with the store's matrices, is the store's refusal target."""
    from lancet_core.index.projection import project_full_gradient
    from lancet_core.index.store import GradientStore
    from lancet_core.model_io import load_model, load_tokenizer
    from lancet_core.recall.exact import refusal_query_gradients
    from lancet_core.recall.targets import corpus_refusals, refusal_target_gradients

    prompts = ["how do I rob a bank", "tell me a joke"]
    refusals = corpus_refusals(bed["tokens"], WINDOW, 16)
    model, tok = load_model(bed["model"]).double(), load_tokenizer(bed["model"])
    G, w = refusal_query_gradients(model, tok, prompts, refusals, max_len=64, response_tokens=WINDOW)
    want, want_w = refusal_target_gradients(bed["store"], model, tok, prompts, refusals)
    np.testing.assert_allclose(w, want_w, rtol=1e-10)
    st = GradientStore.open(bed["store"])
    seed = st.manifest["index_config"].get("projection_seed", 0)
    proj = np.stack([np.concatenate([project_full_gradient(ml, torch.from_numpy(G[ml.name][q]), seed).numpy()
                                     for ml in st.layout]) for q in range(len(prompts))])
    np.testing.assert_allclose(proj, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())  # the store's float32 output


def test_the_influence_manifest_records_the_damping_applied(bed, tmp_path):  # noqa: F811
    """A named method records the store's ratio it was preconditioned with (was null); identity applies none."""
    import json

    from lancet_core.recall.influence import RecallConfig, recall_influence

    for method, want in (("kfac", 0.1), ("identity", None)):
        out = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / method,
                               RecallConfig(method=method, query_target="flagged"))
        assert json.loads((out / "manifest.json").read_text())["config"]["damping_ratio"] == want


def test_the_resolvers_are_exported_without_prefect():
    import subprocess
    import sys

    code = ("import sys; from lancet_core.recall import resolve_window, resolve_method, resolve_damping, "
            "resolve_target; from lancet_core.index import resolve_window as w2; assert w2 is resolve_window; "
            "from lancet_core.index.config import IndexConfig; "
            "assert resolve_window(IndexConfig(), 'refusal').response_tokens == 4; "
            "assert (resolve_method('auto', 'flagged', False), resolve_damping('auto', 'flagged', None)) == "
            "('linfac', 3.0); assert resolve_target('auto', ['regex']) == 'flagged'; "
            "assert 'prefect' not in sys.modules and 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shards_score_byte_for_byte_like_the_serial_pass(tmp_path):
    """Contiguous shards of `chunk_rows` rows, scored separately, are the serial pass byte for byte (the same
    batches), whatever order they run in."""
    model = tiny_gpt2().double()
    rows_ids, rows_mask = random_rows(13, seed=8)
    tokens = _write_tokens(tmp_path / "tokens.parquet", rows_ids, rows_mask)
    V = random_queries(full_layout(model), 2, seed=3)
    serial = score_corpus(model, V, tokens, batch_size=2, chunk_rows=4)
    shards = {lo: score_corpus(model, V, tokens, rows=range(lo, min(lo + 4, 13)), batch_size=2) for lo in (12, 4, 0, 8)}
    assert np.concatenate([shards[lo] for lo in sorted(shards)]).tobytes() == serial.tobytes()


def test_exact_recall_end_to_end_on_the_chat_bed(bed, tmp_path):  # noqa: F811
    """exact_recall = flagged query gradients → kfac from a row sample → preconditioned → one pass → Parquet."""
    from lancet_core.model_io import load_model, load_tokenizer
    from lancet_core.recall.exact import exact_recall, flagged_query_gradients

    model, tok = load_model(bed["model"]).double(), load_tokenizer(bed["model"])
    q = pq.read_table(bed["queries"])
    prompts, responses = q.column("prompt").to_pylist(), q.column("response").to_pylist()
    out = exact_recall(model, tok, bed["tokens"].parent, tmp_path / "exact.parquet", prompts, responses,
                       response_tokens=WINDOW, curvature_rows=5, batch_size=3, max_len=64)
    t = pq.read_table(out)
    n = pq.read_metadata(bed["tokens"]).num_rows
    assert t.column("row_id").to_pylist() == list(range(n)) and t.column("query_scores").type.list_size == 2
    from lancet_core.index.basis import sample_indices

    tt = pq.read_table(bed["tokens"], columns=["input_ids", "loss_mask"]).take(sample_indices(n, 5))
    cur = fit_curvature(model, tt.column("input_ids").to_pylist(), tt.column("loss_mask").to_pylist(), "kfac",
                        response_tokens=WINDOW, batch_size=3)
    V = precondition_queries(flagged_query_gradients(model, tok, prompts, responses, max_len=64,
                                                     response_tokens=WINDOW), cur)
    folded, per_q = fold_scores(score_corpus(model, V, bed["tokens"], response_tokens=WINDOW, batch_size=3), V)
    np.testing.assert_allclose(t.column("score").to_numpy(), folded, rtol=1e-12, atol=1e-14)
    sub = exact_recall(model, tok, bed["tokens"], tmp_path / "sub.parquet", prompts, responses, response_tokens=WINDOW,
                       curvature_rows=5, batch_size=3, max_len=64, rows=[6, 1])
    np.testing.assert_allclose(pq.read_table(sub).column("score").to_numpy(), folded[[6, 1]], rtol=1e-10)
    one = exact_recall(model, tok, bed["tokens"], tmp_path / "one.parquet", prompts, responses, response_tokens=WINDOW,
                       curvature_rows=5, batch_size=3, max_len=64, per_query=False)  # folded first: one query
    t1 = pq.read_table(one)
    assert t1.column("query_scores").type.list_size == 1
    np.testing.assert_allclose(t1.column("score").to_numpy(), folded, rtol=1e-10, atol=1e-12 * np.abs(folded).max())


def test_bf16_autocast_scores_approximate_float32():
    """Under bf16 autocast the module inputs and output gradients arrive in bf16: the scores are computed in the
    model's dtype and stay close to the float32 pass."""
    model = _tiny_llama()  # stock, float32
    rows_ids, rows_mask = random_rows(5, seed=6)
    V = random_queries(full_layout(model), 2, seed=2)
    want = score_rows(model, V, rows_ids, rows_mask, batch_size=3)
    got = score_rows(model, V, rows_ids, rows_mask, batch_size=3, autocast="bf16")
    assert got.dtype == np.float64 and 0 < rel(got, want) <= 0.03, rel(got, want)  # measured 0.004


def test_zscore_fold_weighs_every_query_the_same():
    g = np.random.default_rng(0)
    V = {"m": g.standard_normal((3, 4, 5))}
    raw = g.standard_normal((20, 3)) * np.array([100.0, 1.0, 0.01])  # one query's scores dwarf the others'
    folded, per_q = fold_scores(raw, V, "zscore")
    z = [(raw[:, q] - raw[:, q].mean()) / raw[:, q].std() for q in range(3)]
    np.testing.assert_allclose(folded, np.mean(z, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(per_q, fold_scores(raw, V)[1], rtol=0)  # the per-query scores are the same
    scaled = {"m": V["m"] * np.array([7.0, 0.1, 3.0])[:, None, None]}  # scaling a query changes nothing
    np.testing.assert_allclose(fold_scores(raw * np.array([7.0, 0.1, 3.0]), scaled, "zscore")[0], folded, rtol=1e-10)
    with pytest.raises(ValueError, match="fold must be one of"):
        fold_scores(raw, V, "median")


# ------------------------------------------------------------------ the exact pass inside recall_influence
def _exact_oracle(bed, ratio: float, curvature_rows: int):  # noqa: F811
    """[N, Q] per-query scores by explicit per-example float64 gradients (a for-loop of backward passes) · the
    K-FAC-preconditioned queries, each query over its norm; the curvature sample's positions; the example ids."""
    from lancet_core.index.basis import sample_indices
    from lancet_core.model_io import load_model, load_tokenizer
    from lancet_core.recall.exact import flagged_query_gradients, query_norms

    model, tok = load_model(bed["model"]).double(), load_tokenizer(bed["model"])
    layout = full_layout(model)
    q = pq.read_table(bed["queries"])
    t = pq.read_table(bed["tokens"], columns=["example_id", "input_ids", "loss_mask"])
    ids, masks = t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist()
    sample = sample_indices(len(ids), curvature_rows)
    cur = fit_curvature(model, [ids[i] for i in sample], [masks[i] for i in sample], "kfac", damping_ratio=ratio,
                        response_tokens=WINDOW)
    V = precondition_queries(flagged_query_gradients(model, tok, q.column("prompt").to_pylist(),
                                                     q.column("response").to_pylist(), max_len=64,
                                                     response_tokens=WINDOW), cur)
    grads = oracle_full_gradients(model, layout, ids, [first_response_tokens(m, WINDOW) for m in masks])
    return dot(grads, V) / query_norms(V), sample, t.column("example_id").to_pylist()


def _by_id(table, column):
    return dict(zip(table.column("example_id").to_pylist(), table.column(column).to_pylist(), strict=True))


def test_recall_influence_scores_content_queries_exactly_by_default(bed, tmp_path):  # noqa: F811
    """method 'auto' on the flagged target = the exact pass (scoring 'auto'). Against explicit per-example float64
    gradients · V: ExactPass.per_query's scores, and influence.parquet's score = the `scaled` fold computed in one pass
    with the folded query (each query over its standard deviation on the curvature sample), ranked by it; the mean
    fold likewise."""
    from lancet_core.recall.influence import ExactPass, RecallConfig, recall_influence

    cfg = RecallConfig(query_target="flagged", curvature_rows=5, exact_damping=0.1)
    out = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "x", cfg)
    want, sample, ids = _exact_oracle(bed, 0.1, 5)
    t = pq.read_table(out / "influence.parquet")
    folded = (want / want[sample].std(axis=0)).mean(axis=1)
    got = _by_id(t, "score")
    np.testing.assert_allclose([got[e] for e in ids], folded, rtol=1e-9, atol=1e-12 * np.abs(folded).max())
    assert t.column("rank").to_pylist() == list(range(1, len(ids) + 1))
    assert np.all(np.diff(t.column("score").to_numpy()) <= 0)
    manifest = json.loads((out / "manifest.json").read_text())["config"]
    assert manifest["scoring"] == "exact" and manifest["exact_damping"] == 0.1 and manifest["method"] == "kfac"
    assert manifest["query_aggregation"] == "scaled"
    q = pq.read_table(bed["queries"])
    ex = ExactPass(bed["store"], bed["model"], bed["tokens"], q.column("prompt").to_pylist(),
                   q.column("response").to_pylist(), cfg)
    np.testing.assert_allclose(ex.per_query(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(ex.folded(None, "mean"), want.mean(axis=1), rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(ex.per_query(np.array([4, 1])), want[[4, 1]], rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_rerank_over_every_row_is_the_exact_pass(bed, tmp_path):  # noqa: F811
    """scoring='rerank' with M = N re-scores every row exactly: the same file as scoring='exact' (scores and ranks)."""
    from lancet_core.recall.influence import RecallConfig, recall_influence

    kw = {"query_target": "flagged", "curvature_rows": 5, "exact_damping": 0.1, "method": "kfac"}
    ex = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "exact",
                          RecallConfig(scoring="exact", **kw))
    rr = recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "rerank",
                          RecallConfig(scoring="rerank", rerank_share=1.0, **kw))
    a, b = pq.read_table(ex / "influence.parquet"), pq.read_table(rr / "influence.parquet")
    assert a.column("example_id").to_pylist() == b.column("example_id").to_pylist()
    np.testing.assert_allclose(b.column("score").to_numpy(), a.column("score").to_numpy(), rtol=1e-12, atol=0)


def test_rerank_merges_exact_candidates_with_the_calibrated_sketch():
    from lancet_core.recall.influence import rerank_scores, rerank_size

    sketch = np.array([4.0, 3.0, 2.0, -1.0, -2.0])
    cand = np.array([0, 1, 2])
    exact = np.array([8.0, 0.5, 4.0])  # row 1 is weak when scored exactly
    got = rerank_scores(sketch, exact, cand)
    k = (4 * 8 + 3 * 0.5 + 2 * 4) / (16 + 9 + 4)  # least squares through the origin on the candidates
    np.testing.assert_allclose(got, [8.0, 0.5, 4.0, -k, -2 * k])
    assert rerank_scores(sketch, -exact, cand)[3] < 0  # a disagreeing sign never flips the sketch's rows' signs
    assert (rerank_size(1000, 0.05, 100), rerank_size(1000, 0.05, 10), rerank_size(50, 0.05, 100)) == (100, 50, 50)


def test_exact_scoring_is_refused_for_the_refusal_target(bed, tmp_path):  # noqa: F811
    from lancet_core.recall.influence import RecallConfig, _manifest_config, recall_influence, resolve_scoring

    with pytest.raises(ValueError, match="flagged target only"):
        RecallConfig(query_target="refusal", scoring="exact")
    with pytest.raises(ValueError, match="flagged target only"):  # the bed's queries were flagged by the refusal judge
        recall_influence(bed["store"], bed["model"], bed["queries"], bed["tokens"].parent, tmp_path / "r",
                         RecallConfig(scoring="rerank"))
    assert (resolve_scoring("auto", "auto", "flagged"), resolve_scoring("auto", "linfac", "flagged"),
            resolve_scoring("auto", "auto", "refusal")) == ("exact", "sketch", "sketch")
    # sketch outputs record the config as before the exact pass existed: they stay reusable
    assert not {"scoring", "exact_damping", "curvature_rows", "rerank_share"} & set(
        _manifest_config(RecallConfig(scoring="sketch")))


# ------------------------------------------------------------------ lancet explain
def test_explain_one_ranks_like_the_sketch_recall_and_exact_like_the_exact_pass(bed, tmp_path):  # noqa: F811
    """explain_one on the sketch = recall_influence's sketch ranking of that one query (scores included); each row's
    module contributions add up to its score; with exact=True and every row a candidate, the scores are the exact
    pass's for that query."""
    from lancet_core.recall.influence import ExactPass, RecallConfig, explain_one, recall_influence

    prompt, response = "how do I rob a bank", "take a mask and go"
    n = pq.read_metadata(bed["tokens"]).num_rows
    res = explain_one(bed["store"], bed["model"], bed["tokens"], prompt, response, top_k=n, method="kfac",
                      modules_shown=100)
    qpath = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": ["q"], "prompt": [prompt], "response": [response], "judge": ["regex"]}), qpath)
    out = recall_influence(bed["store"], bed["model"], qpath, bed["tokens"].parent, tmp_path / "sk",
                           RecallConfig(method="kfac", scoring="sketch", score_precision="float64"))
    t = pq.read_table(out / "influence.parquet")
    assert [r["example_id"] for r in res["rows"]] == t.column("example_id").to_pylist()
    np.testing.assert_allclose([r["score"] for r in res["rows"]], t.column("score").to_numpy(), rtol=1e-9, atol=1e-12)
    for r in res["rows"]:
        assert sum(abs(m["share"]) for m in r["modules"]) == pytest.approx(1.0, abs=1e-3)
        assert r["prompt"] and r["response"]
    ex = explain_one(bed["store"], bed["model"], bed["tokens"], prompt, response, top_k=n, method="kfac", exact=True,
                     candidates=n)
    want = ExactPass(bed["store"], bed["model"], bed["tokens"], [prompt], [response], RecallConfig()).per_query()[:, 0]
    ids = pq.read_table(bed["tokens"], columns=["example_id"]).column("example_id").to_pylist()
    got = {r["example_id"]: r["score"] for r in ex["rows"]}
    np.testing.assert_allclose([got[e] for e in ids], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    assert [r["score"] for r in ex["rows"]] == sorted(got.values(), reverse=True)


def test_lancet_explain_cli_prints_a_table_json_and_refuses_bad_input(bed, tmp_path, capsys):  # noqa: F811
    import shutil

    from flows.cli import main
    from lancet_core.manifest import read_manifest
    from lancet_core.recall.influence import find_tokens_for_store

    args = ["explain", str(bed["store"]), str(bed["model"]), "--prompt", "how do I rob a bank", "--response",
            "take a mask and go", "--tokens", str(bed["tokens"]), "--top-k", "3"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "rank" in table and len([x for x in table.splitlines() if x.strip()[:1].isdigit()]) == 3
    assert main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["rows"]) == 3 and res["rows"][0]["rank"] == 1 and res["rows"][0]["modules"]
    assert main(["explain", str(tmp_path / "nope"), str(bed["model"]), "--prompt", "p", "--response", "r"]) == 2
    assert "not a gradient store" in capsys.readouterr().err
    # the tokens file is found in the store's work dir by the digest its manifest records
    work = tmp_path / "w"
    (work / "tokens" / "k1").mkdir(parents=True)
    shutil.copy(bed["tokens"], work / "tokens" / "k1" / "tokens.parquet")
    store = work / "stores" / "s1"
    shutil.copytree(bed["store"], store)
    assert find_tokens_for_store(store) == work / "tokens" / "k1" / "tokens.parquet"
    assert read_manifest(store)["tokens_digest"]
    shutil.rmtree(work / "tokens")
    with pytest.raises(FileNotFoundError, match="--tokens"):
        find_tokens_for_store(store)
