"""langevin_lora.core.curvature: the probes a sampler can use to set its step (issue 13) — power iteration
with a preconditioner and per-tensor weight decay against exact eigenvalues, its early stop and
cost counts, Hutchinson with per-tensor decay, the RNG replay of a dropout forward pass, and the
probes' state surviving a state dict."""
from __future__ import annotations

import pytest
import torch

from langevin_lora.core.curvature import (
    HessianVectorProduct,
    RngSnapshot,
    hutchinson_laplacian,
    power_iteration,
    top_eigenvalue,
)
from langevin_lora.diagnostics import CurvatureProbes


def _two_tensor_quadratic(seed=0):
    """L(a, b) = 1/2 [a; b]^T H [a; b] with a (2, 3) and b (4,): a dense 10 x 10 Hessian."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(10, 10, generator=g, dtype=torch.float64)
    H = M @ M.T / 10 + 0.1 * torch.eye(10, dtype=torch.float64)
    a = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))

    def loss():
        x = torch.cat([a.reshape(-1), b])
        return 0.5 * x @ H @ x

    return H, [a, b], loss


def test_power_iteration_with_preconditioner_and_per_tensor_decay_is_exact():
    H, params, loss = _two_tensor_quadratic()
    g = torch.Generator().manual_seed(1)
    G = [torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 for shape in ((2, 3), (4,))]
    lam, lr = [0.3, 0.05], 0.01
    d = torch.cat([torch.full((6,), lam[0]), torch.full((4,), lam[1])]).double()
    s = torch.cat([G[0].reshape(-1), G[1]]).sqrt()
    exact = float(torch.linalg.eigvalsh(s[:, None] * (H + torch.diag(d)) * s[None, :]).max())
    res = top_eigenvalue(loss, params, scale=G, weight_decay=lam, num_iters=300, method="double_backward",
                         generator=torch.Generator().manual_seed(0))
    assert float(res.eigenvalue) == pytest.approx(exact, rel=1e-8)
    assert res.products == 300 and res.loss_evaluations == 1 and res.method == "double_backward"
    # The step-size number eta * lambda_max directly: scale eta * G.
    eta_eig, _ = power_iteration(HessianVectorProduct(loss, params), params, weight_decay=lam,
                                 scale=[lr * G[0], lr * G[1]], num_iters=300, init=res.vector)
    assert float(eta_eig) == pytest.approx(lr * exact, rel=1e-8)


def test_power_iteration_stops_early_and_counts_gradient_evaluations():
    H, params, loss = _two_tensor_quadratic(seed=2)
    exact = float(torch.linalg.eigvalsh(H).max())
    res = top_eigenvalue(loss, params, num_iters=500, rtol=1e-10, method="finite_difference",
                         generator=torch.Generator().manual_seed(0))
    assert res.products < 500 and res.loss_evaluations == 2 * res.products  # two gradients per product
    assert float(res.eigenvalue) == pytest.approx(exact, rel=1e-6)
    # Warm start from the converged vector: one product is enough.
    again = top_eigenvalue(loss, params, num_iters=1, init=res.vector)
    assert float(again.eigenvalue) == pytest.approx(exact, rel=1e-6)
    with pytest.raises(ValueError, match="scale"):
        power_iteration(HessianVectorProduct(loss, params), params, scale=[1.0])
    with pytest.raises(ValueError, match="weight_decay"):
        power_iteration(HessianVectorProduct(loss, params), params, weight_decay=[0.1])


def test_hutchinson_with_per_tensor_decay_on_a_diagonal_hessian():
    h = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    a = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    hvp = HessianVectorProduct(lambda: 0.5 * (h * torch.cat([a, b]) ** 2).sum(), [a, b])
    lap = hutchinson_laplacian(hvp, [a, b], weight_decay=[0.5, 2.0], num_probes=3)
    assert float(lap) == pytest.approx(10.0 + 2 * 0.5 + 2 * 2.0)  # exact: Rademacher z^T D z = tr D


def test_rng_snapshot_replays_dropout_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    x = torch.randn(16, 5)
    snap = RngSnapshot(devices=[])
    real = net(x).sum()  # the training step's forward, right after the snapshot
    state_before = torch.get_rng_state()
    with snap.replaying() as deterministic:
        replay = deterministic(lambda: net(x).sum())
        assert torch.equal(replay(), real) and torch.equal(replay(), real)
        torch.rand(100)  # whatever happens inside
    assert torch.equal(torch.get_rng_state(), state_before)
    assert not torch.equal(net(x).sum(), real)  # a fresh forward draws new masks


def test_curvature_probes_state_dict_continues_the_same_probes():
    H, params, loss = _two_tensor_quadratic(seed=3)
    kwargs = dict(weight_decay=[0.1, 0.1], scale=[0.01, 0.01], laplacian=True, power=True)
    a = CurvatureProbes(hutchinson_probes=2, power_iters=3, seed=7)
    a.measure(loss, params, **kwargs)
    b = CurvatureProbes(hutchinson_probes=2, power_iters=3, seed=0)
    b.load_state_dict(a.state_dict())
    assert a.measure(loss, params, **kwargs) == b.measure(loss, params, **kwargs)
    with pytest.raises(ValueError, match="hvp_method"):
        CurvatureProbes(hvp_method="exact")
