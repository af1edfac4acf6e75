"""Seeded projections: determinism, scale, and inner products preserved on average (JL), for vectors and modules."""

from __future__ import annotations

import math

import numpy as np
import torch

from lancet_core.index.projection import ModuleLayout, project_full_gradient, projection_matrix


def test_seeded_and_independent_per_module_and_side():
    a = projection_matrix(0, "h.0.mlp", "in", 32, 8)
    assert a.shape == (32, 8) and a.dtype == torch.float32
    assert torch.equal(a, projection_matrix(0, "h.0.mlp", "in", 32, 8))
    for other in (
        projection_matrix(1, "h.0.mlp", "in", 32, 8),
        projection_matrix(0, "h.1.mlp", "in", 32, 8),
        projection_matrix(0, "h.0.mlp", "out", 32, 8),
    ):
        assert not torch.allclose(a, other)
    assert projection_matrix(0, "x", "in", 32, None) is None
    # float64 draw, cast: the float32 matrix is the rounded float64 one
    assert torch.equal(
        projection_matrix(0, "m", "out", 5, 3, torch.float64).float(), projection_matrix(0, "m", "out", 5, 3)
    )


def test_scale_gives_identity_in_expectation():
    # E[P Pᵀ] = I with entries N(0, 1/k): the diagonal of P Pᵀ averages to 1 (each is chi²_k / k: sd sqrt(2/k))
    d, k = 400, 64
    p = projection_matrix(3, "m", "in", d, k, torch.float64)
    diag = (p @ p.T).diagonal()
    assert abs(float(diag.mean()) - 1) <= 5 * math.sqrt(2 / k) / math.sqrt(d)


def test_vector_inner_products_preserved_on_average():
    """<Pᵀx, Pᵀy> is unbiased for <x, y> with variance (|x|²|y|² + <x,y>²)/k; check the mean of T trials at 5 sigma."""
    g = np.random.default_rng(0)
    d, k, trials = 128, 16, 400
    x = g.normal(size=d)
    y = 0.6 * x + g.normal(size=d)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    est = np.array(
        [
            float(
                (projection_matrix(0, f"trial{t}", "in", d, k, torch.float64).T @ xt)
                @ (projection_matrix(0, f"trial{t}", "in", d, k, torch.float64).T @ yt)
            )
            for t in range(trials)
        ]
    )
    true = float(x @ y)
    sd = math.sqrt((x @ x * (y @ y) + true**2) / k)
    assert abs(est.mean() - true) <= 5 * sd / math.sqrt(trials)
    assert abs(est.std() - sd) <= 0.2 * sd  # the spread is the JL one, not larger


def test_module_projection_preserves_gradient_inner_products_on_average():
    """vec(P_outᵀ G P_in): E[<proj G1, proj G2>] = <G1, G2> (P_in, P_out independent, E[P Pᵀ] = I)."""
    g = np.random.default_rng(1)
    d_out, d_in, trials = 48, 32, 300
    G1 = torch.from_numpy(g.normal(size=(d_out, d_in)))
    G2 = 0.5 * G1 + torch.from_numpy(g.normal(size=(d_out, d_in)))
    est = []
    for t in range(trials):
        ml = ModuleLayout(f"layer{t}", d_in, d_out, 8, 8, 0)
        est.append(float(project_full_gradient(ml, G1, seed=t) @ project_full_gradient(ml, G2, seed=t)))
    est = np.array(est)
    true = float((G1 * G2).sum())
    assert abs(est.mean() - true) <= 5 * est.std(ddof=1) / math.sqrt(trials)


def test_full_rank_sides_are_identity():
    G = torch.randn(6, 4, dtype=torch.float64)
    assert torch.equal(project_full_gradient(ModuleLayout("m", 4, 6, None, None, 0), G, 0), G.reshape(-1))
    one = project_full_gradient(ModuleLayout("m", 4, 6, 2, None, 0), G, 0)
    assert one.shape == (12,)
    assert torch.allclose(one, (G @ projection_matrix(0, "m", "in", 4, 2, torch.float64)).reshape(-1))
