"""PCA projection bases (lancet_core.index.basis) and the true-Fisher factor, against slow float64 references.

- the basis is orthonormal and spans the top eigenvectors of explicitly built factors A = Σ a aᵀ, S = Σ δ δᵀ
  (a for-loop of single-example backward passes, not the hooks);
- at full rank the PCA-projected influence equals the unprojected influence (float64, identity and kfac), through the
  real store build, query gradients and preconditioner;
- the basis is part of the store's identity: an altered basis.npz or another projection kind is refused;
- fisher='true' accumulates S from labels drawn by `sample_labels`, equal to a per-example float64 loop with the same
  labels, and differs from the empirical S.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lancet_core.chat import to_messages
from lancet_core.errors import ManifestMismatch
from lancet_core.index.basis import (
    BASIS_FILE,
    full_factors,
    load_basis,
    pca_basis,
    sample_indices,
    save_basis,
    top_eigenvectors,
)
from lancet_core.index.build import build_gradient_store, compute_query_gradients
from lancet_core.index.config import IndexConfig
from lancet_core.index.curvature import precondition
from lancet_core.index.hooks import ProjectedGradientExtractor, build_layout, right_pad, sample_labels
from lancet_core.index.store import GradientStore
from tests.core.index.test_grad_hooks import random_rows, tiny_llama
from tests.core.index.test_gradient_store import make_model_dir, write_tokens


def _slow_factors(model, layout, ids, masks, labels=None):
    """Σ_t a_t a_tᵀ and Σ_t δ_t δ_tᵀ per module by single-example backward passes in float64 (mean reduction, whole
    response). `labels` (per row) replaces the scored tokens (true Fisher) when given."""
    mods = dict(model.named_modules())
    out = {ml.name: [np.zeros((ml.d_in, ml.d_in)), np.zeros((ml.d_out, ml.d_out))] for ml in layout}
    for j, (r, m) in enumerate(zip(ids, masks, strict=True)):
        acts, outs, hs = {}, {}, []
        for ml in layout:

            def fwd(mod, args, o, name=ml.name, acts=acts, outs=outs):
                acts[name] = args[0].detach()[0]
                o.retain_grad()
                outs[name] = o

            hs.append(mods[ml.name].register_forward_hook(fwd))
        x = torch.tensor(r)[None]
        logits = model(input_ids=x).logits[0]
        y = torch.tensor(r if labels is None else labels[j])
        lp = torch.log_softmax(logits[:-1], -1)[torch.arange(len(r) - 1), y[1:]]
        mm = torch.tensor(m[1:], dtype=lp.dtype)
        ((lp * mm).sum() / mm.sum()).backward()
        for h in hs:
            h.remove()
        for ml in layout:
            a, d = acts[ml.name].numpy(), outs[ml.name].grad[0].numpy()
            out[ml.name][0] += a.T @ a
            out[ml.name][1] += d.T @ d
        model.zero_grad()
    return out


def test_pca_basis_is_orthonormal_and_spans_the_top_eigenvectors_of_the_exact_factors():
    model = tiny_llama().double()
    ids, masks = random_rows(7)
    layout = build_layout(model, None, 5, 40, cap_at_dims=True)  # out side capped at d_out (16 or 24)
    basis = pca_basis(model, layout, ids, masks, batch_size=3, reduction="mean", response_tokens=None)
    slow = _slow_factors(model, layout, ids, masks)
    fast, tokens = full_factors(model, layout, ids, masks, batch_size=3, reduction="mean", response_tokens=None)
    assert tokens == sum(len(r) for r in ids)
    for ml in layout:
        p_in, p_out = basis[ml.name]
        assert p_in.shape == (ml.d_in, 5) and p_out.shape == (ml.d_out, min(40, ml.d_out)) == (ml.d_out, ml.k_out)
        for p in (p_in, p_out):
            np.testing.assert_allclose(p.T @ p, np.eye(p.shape[1]), atol=1e-12)
        a, s = slow[ml.name]
        np.testing.assert_allclose(fast[ml.name][0], a, rtol=1e-9, atol=1e-12 * np.abs(a).max())
        np.testing.assert_allclose(fast[ml.name][1], s, rtol=1e-9, atol=1e-9 * np.abs(s).max())
        # P_in spans the top-5 eigenspace of A: the captured energy equals the sum of the 5 largest eigenvalues
        w = np.sort(np.linalg.eigvalsh(a))[::-1]
        np.testing.assert_allclose(np.trace(p_in.T @ a @ p_in), w[:5].sum(), rtol=1e-9)
        np.testing.assert_allclose(p_out @ p_out.T, np.eye(ml.d_out), atol=1e-12)  # full rank: orthogonal


def test_top_eigenvectors_signs_are_fixed_and_sample_is_spread():
    g = np.random.default_rng(0).normal(size=(9, 6))
    q = top_eigenvectors(g.T @ g, 3)
    q2 = top_eigenvectors(g.T @ g * 2.0, 3)
    np.testing.assert_allclose(q, q2, atol=1e-12)
    assert (q[np.abs(q).argmax(0), range(3)] > 0).all()
    assert list(sample_indices(10, 4)) == [0, 3, 6, 9] and list(sample_indices(3, 8)) == [0, 1, 2]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("pca")
    model_dir = make_model_dir(d / "model")
    tokens, ids, masks = write_tokens(d / "tokens.parquet", n=13)
    return d, model_dir, tokens


BIG = 10_000  # capped at each module's size: full rank


def _cfg(**kw) -> IndexConfig:
    base = dict(dtype="float32", compute_dtype="float64", batch_size=4, rows_per_shard=5, curvature=("kfac",),
                response_tokens=None)  # fmt: skip
    return IndexConfig(**(base | kw))


@pytest.mark.parametrize("method", ["identity", "kfac"])
def test_full_rank_pca_influence_equals_unprojected_influence(bed, tmp_path, method):
    d, model_dir, tokens = bed
    full = build_gradient_store(model_dir, tokens, tmp_path / "full", _cfg(proj_in_dim=None, proj_out_dim=None))
    pca = build_gradient_store(
        model_dir, tokens, tmp_path / "pca", _cfg(projection="pca", proj_in_dim=BIG, proj_out_dim=BIG)
    )
    sf, sp = GradientStore.open(full), GradientStore.open(pca)
    assert sf.dim == sp.dim and [ml.k_in for ml in sp.layout] == [ml.d_in for ml in sp.layout]
    convs = [to_messages("the cat sat", "on a mat"), to_messages("dog ran", "to the park sun")]
    gf = compute_query_gradients(sf, model_dir, None, convs)
    gp = compute_query_gradients(sp, model_dir, None, convs)
    inf_full = sf.read_all().astype(np.float64) @ precondition(full, gf, method).T
    inf_pca = sp.read_all().astype(np.float64) @ precondition(pca, gp, method).T
    scale = np.abs(inf_full).max()
    assert scale > 0
    # float32 storage and query vectors are the only rounding: 1e-5 of the largest score
    np.testing.assert_allclose(inf_pca, inf_full, atol=1e-5 * scale)
    # and the projected vectors really are rotated (not the identity map)
    assert np.abs(sp.read_all() - sf.read_all()).max() > 1e-3 * np.abs(sf.read_all()).max()


def test_basis_is_part_of_the_store_identity(bed, tmp_path):
    d, model_dir, tokens = bed
    cfg = _cfg(projection="pca", proj_in_dim=3, proj_out_dim=2, curvature=())
    root = build_gradient_store(model_dir, tokens, tmp_path / "s", cfg)
    m = GradientStore.open(root).manifest
    assert m["projection"]["kind"] == "pca" and m["projection"]["basis_digest"].startswith("sha256:")
    before = GradientStore.open(root).read_all()
    # a rerun reuses the store (same basis, nothing recomputed)
    assert build_gradient_store(model_dir, tokens, root, cfg) == root
    np.testing.assert_array_equal(GradientStore.open(root).read_all(), before)
    with pytest.raises(ManifestMismatch, match="projection"):
        build_gradient_store(model_dir, tokens, root, cfg.model_copy(update={"projection": "random"}))
    # an altered basis is refused, at query time and at build time
    basis = load_basis(root / BASIS_FILE)
    name = next(iter(basis))
    p_in, p_out = basis[name]
    basis[name] = (p_in[:, ::-1].copy(), p_out)
    save_basis(root / BASIS_FILE, basis)
    with pytest.raises(ManifestMismatch, match="projection basis differs"):
        compute_query_gradients(root, model_dir, None, [to_messages("the cat", "sat on a mat")])
    with pytest.raises(ManifestMismatch, match="projection"):
        build_gradient_store(model_dir, tokens, root, cfg)


def test_true_fisher_factor_equals_a_per_example_loop_with_the_same_sampled_labels():
    model = tiny_llama(seed=3).double()
    ids, masks = random_rows(5, seed=4)
    layout = build_layout(model, None, None, None)
    with ProjectedGradientExtractor(model, layout, 0, "mean", True, None, fisher="true") as ex:
        emp_grads = []
        labels = [None] * len(ids)
        for b in range(0, len(ids), 2):
            sel = list(range(b, min(len(ids), b + 2)))
            x, attn, lm = right_pad([ids[i] for i in sel], [masks[i] for i in sel], 0)
            emp_grads.append(ex.batch_gradients(x, attn, lm))
            with torch.no_grad():
                lab = sample_labels(model(input_ids=x, attention_mask=attn).logits, x, attn)
            for k, i in enumerate(sel):
                labels[i] = lab[k, : len(ids[i])].tolist()
        fast = {k: (a.numpy(), s.numpy()) for k, (a, s) in ex.factor_sums.items()}
    assert any(lab != r for lab, r in zip(labels, ids, strict=True))  # the labels were really resampled
    slow_true = _slow_factors(model, layout, ids, masks, labels)
    slow_emp = _slow_factors(model, layout, ids, masks)
    for ml in layout:
        a, s = fast[ml.name]
        np.testing.assert_allclose(a, slow_emp[ml.name][0], rtol=1e-9, atol=1e-12 * np.abs(a).max())
        np.testing.assert_allclose(s, slow_true[ml.name][1], rtol=1e-8, atol=1e-10 * np.abs(s).max())
        assert np.abs(s - slow_emp[ml.name][1]).max() > 1e-3 * np.abs(s).max()
    # the per-example gradients stay the empirical ones
    with ProjectedGradientExtractor(model, layout, 0, "mean", False, None) as ex:
        x, attn, lm = right_pad(ids[:2], masks[:2], 0)
        np.testing.assert_allclose(emp_grads[0].numpy(), ex.batch_gradients(x, attn, lm).numpy(), rtol=1e-12)


def test_store_identity_of_random_stores_is_unchanged_by_the_new_settings():
    """Stores built before PCA / true Fisher existed (random projections, empirical factors) keep their identity."""
    old = IndexConfig(projection="random", fisher="empirical", response_tokens=4).store_identity()
    assert "projection" not in old and "projection_sample_rows" not in old and "fisher" not in old
    assert old["projection_seed"] == 0
    pca = IndexConfig(projection="pca", fisher="true", response_tokens=4).store_identity()
    assert pca["projection"] == "pca" and pca["fisher"] == "true" and "projection_seed" not in pca
    assert "fisher" not in IndexConfig(fisher="true", curvature=("linfac",), response_tokens=None).store_identity()  # no factors collected


def test_a_saved_basis_has_the_same_bytes_whatever_the_module_order(tmp_path):
    """A fresh basis comes in the model's module order, a reloaded one in sorted order: both save to the same bytes
    (a re-plan after a crash rewrites basis.npz byte-identically)."""
    g = np.random.default_rng(0)
    basis = {name: (g.standard_normal((6, 2)), None if name.endswith("b") else g.standard_normal((4, 2)))
             for name in ("layers.1.mlp", "layers.0.attn.b", "layers.0.attn.a")}
    save_basis(tmp_path / "fresh.npz", basis)
    save_basis(tmp_path / "reloaded.npz", load_basis(tmp_path / "fresh.npz"))
    assert (tmp_path / "fresh.npz").read_bytes() == (tmp_path / "reloaded.npz").read_bytes()
