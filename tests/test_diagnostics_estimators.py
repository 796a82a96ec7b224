"""Live estimators against exactly solvable targets (THEORY §5), including the predicted biases,
and each check failing where it must."""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

from langevin_lora.diagnostics import (
    HessianVectorProduct,
    WindowCenter,
    gauge_gap,
    gauge_matrix,
    gauge_target,
    geweke_z,
    gradient_square,
    hutchinson_laplacian,
    mean_force_chi2,
    minibatch_noise_trace,
    noise_ratio,
    power_iteration,
    split_rhat,
    stationarity_report,
    virial_temperature,
)
from diag_helpers import Quadratic, make_sgd, ou_center_bias, rank1_loss, zscore

Z = 4.5
CHAINS = 512
LR = 0.02
WINDOW = 500

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _run_quadratic(q: Quadratic, *, lr: float, steps: int, chains: int = CHAINS, extra_noise: float = 0.0,
                   theta0: torch.Tensor | None = None, hvp_every: int = 0, seed: int = 0, center_mode="previous"):
    """Vectorised SGLD on the quadratic; records per step and per chain: beta*virial (windowed
    centre), beta*|grad U|^2, rho-hat, force, Laplacian (every ``hvp_every``)."""
    theta = torch.nn.Parameter(q.stationary_draw(chains, lr, seed, extra_noise) if theta0 is None else theta0.clone())
    opt = make_sgd([theta], lr, q.beta, q.lam, seed + 1)
    noise_gen = torch.Generator().manual_seed(seed + 2)
    probe_gen = torch.Generator().manual_seed(seed + 3)
    center = WindowCenter(WINDOW, center_mode)
    out = {"virial": [], "gsq": [], "rho": [], "force": [], "lap": [], "U": []}
    for t in range(steps):
        with torch.no_grad():
            g = q.grad(theta)
            if extra_noise > 0:
                sd = math.sqrt(2 * extra_noise)
                g1 = g + sd * torch.randn(g.shape, generator=noise_gen, dtype=g.dtype)
                g2 = g + sd * torch.randn(g.shape, generator=noise_gen, dtype=g.dtype)
                out["rho"].append(noise_ratio([[g1], [g2]], lr=lr, beta=q.beta, batch_dims=1))
                out["gsq"].append(q.beta * gradient_square([theta], [[g1], [g2]], weight_decay=q.lam, batch_dims=1))
                g = (g1 + g2) / 2
            else:
                out["gsq"].append(q.beta * gradient_square([theta], [[g]], weight_decay=q.lam, batch_dims=1))
            c = center([theta])
            out["virial"].append(virial_temperature([theta], [g], c, weight_decay=q.lam, beta=q.beta, batch_dims=1))
            out["force"].append(g + q.lam * theta)
            out["U"].append(((theta @ q.X.T - q.y) ** 2).sum(-1) / (2 * q.n) + q.lam / 2 * (theta ** 2).sum(-1))
        if hvp_every and t % hvp_every == 0:
            hvp = HessianVectorProduct(lambda: q.loss(theta), [theta], batch_dims=1)
            out["lap"].append(hutchinson_laplacian(hvp, [theta], weight_decay=q.lam, generator=probe_gen, batch_dims=1))
        theta.grad = g
        opt.step()
    return {k: torch.stack(v).numpy() for k, v in out.items() if v}


def _virial_prediction(q: Quadratic, lr: float, extra_noise: float = 0.0, windows: int | None = None) -> float:
    """Exact beta*virial/d of ULA averaged over windows 1..windows (expanding centre) or any
    window >= 1 (previous-window centre, ``windows=None``)."""
    k = torch.linalg.eigvalsh(q.K).numpy()
    a = 1 - lr * k
    rho = lr * q.beta * extra_noise / 2
    if windows is None:
        bias = ou_center_bias(a, WINDOW)
    else:
        s = lambda L: (1 - a ** L) / (1 - a)  # noqa: E731
        bias = -np.mean([a * s(WINDOW) * s(j * WINDOW) / (j * WINDOW ** 2) for j in range(1, windows + 1)], axis=0)
    return float(np.mean((1 + rho) / (1 - lr * k / 2) * (1 + bias)))


@pytest.fixture(scope="module")
def quad():
    return Quadratic.make()


@pytest.fixture(scope="module")
def stationary_run(quad):
    return _run_quadratic(quad, lr=LR, steps=6 * WINDOW, hvp_every=10)


def test_virial_temperature_matches_exact_ula_law(quad, stationary_run):
    per_chain = stationary_run["virial"][WINDOW:].mean(0)  # the first window is centred on theta_0
    expected = _virial_prediction(quad, LR)
    assert expected > 1.04  # the step-size bias is real here, and predicted
    assert abs(zscore(per_chain, expected)) <= Z
    # ... and the ideal value 1 is rejected: the test sees the bias, it does not hide it.
    assert abs(zscore(per_chain, 1.0)) > Z


def test_virial_with_expanding_centre_matches_exact_ula_law(quad):
    run = _run_quadratic(quad, lr=LR, steps=4 * WINDOW, chains=256, seed=11, center_mode="expanding")
    per_chain = run["virial"][WINDOW:].mean(0)
    assert abs(zscore(per_chain, _virial_prediction(quad, LR, windows=3))) <= Z


def test_configurational_temperature_matches_exact_ula_law(quad, stationary_run):
    K = quad.K
    exact = float(torch.trace(K @ torch.linalg.inv(torch.eye(3, dtype=torch.float64) - LR * K / 2)) / torch.trace(K))
    per_chain = stationary_run["gsq"].mean(0) / stationary_run["lap"].mean(0)
    assert exact > 1.05
    assert abs(zscore(per_chain, exact)) <= Z
    # K is diagonal here, so every Rademacher probe returns tr K exactly.
    np.testing.assert_allclose(stationary_run["lap"], float(torch.trace(K)), rtol=1e-12)


def test_mean_force_chi2_stationary_and_drifting(quad, stationary_run):
    f = stationary_run["force"]  # (steps, chains, d)
    m = f.shape[0] // WINDOW
    blocks = torch.from_numpy(f[: m * WINDOW].reshape(m, WINDOW, *f.shape[1:]).mean(1))
    chi2, expected = mean_force_chi2(blocks)
    assert expected == pytest.approx((m - 1) / (m - 3))
    assert abs(zscore(chi2.numpy(), expected)) <= Z
    # A chain relaxing from a far start: the mean force is far from 0.
    far = quad.mean + torch.tensor([30.0, -30.0, 30.0], dtype=torch.float64)
    run = _run_quadratic(quad, lr=0.002, steps=8 * 100, chains=8, theta0=far.expand(8, 3))
    fb = torch.from_numpy(run["force"].reshape(8, 100, 8, 3).mean(1))
    chi2_far, expected_far = mean_force_chi2(fb)
    assert (chi2_far.numpy() > 5 * expected_far).all()


def test_minibatch_noise_ratio_and_inflated_virial(quad):
    rho_target = 0.42
    s = 2 * rho_target / (LR * quad.beta)
    run = _run_quadratic(quad, lr=LR, steps=4 * WINDOW, extra_noise=s, seed=7)
    assert abs(zscore(run["rho"].mean(0), rho_target)) <= Z
    virial = run["virial"][WINDOW:].mean(0)
    expected = _virial_prediction(quad, LR, extra_noise=s)
    assert abs(zscore(virial, expected)) <= Z  # 1 + rho inflation, predicted
    # The report fails the virial check and names minibatch noise as the reason.
    rep = stationarity_report({"virial_temperature": run["virial"][WINDOW:].mean(1)},
                              noise_ratio=float(run["rho"].mean()))
    check = rep.by_name("virial_temperature")
    assert check.status == "fail"
    assert "minibatch noise ratio 0.42 > 0.1" in check.reason
    assert "raise the batch size" in check.remedy
    assert rep.by_name("noise_ratio").status == "fail"


def test_noise_trace_two_halves_formula():
    g = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(5, generator=g), torch.randn(5, generator=g)
    assert float(minibatch_noise_trace([[g1], [g2]])) == pytest.approx(float((g1 - g2).square().sum() / 4))
    G = torch.rand(5, generator=g)
    assert float(minibatch_noise_trace([[g1], [g2]], precond=[G])) == pytest.approx(float((G * (g1 - g2) ** 2).sum() / 4))
    with pytest.raises(ValueError, match="micro_grads"):
        minibatch_noise_trace([[g1]])


def test_hvp_finite_difference_agrees_with_double_backward(quad):
    theta = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    v = [torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))]
    exact = v[0] @ quad.KL
    for method in ("double_backward", "finite_difference"):
        hv = HessianVectorProduct(lambda: quad.loss(theta), [theta], method=method, batch_dims=1)(v)
        torch.testing.assert_close(hv[0], exact, rtol=1e-7, atol=1e-9)
    # A non-quadratic loss: central differences are O(eps^2) accurate and leave theta untouched.
    a = torch.nn.Parameter(torch.tensor([[[0.7, -0.3]]], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([[[1.2]]], dtype=torch.float64))
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    a0, b0 = a.detach().clone(), b.detach().clone()
    vs = [torch.ones_like(a), torch.ones_like(b)]
    db = HessianVectorProduct(lambda: rank1_loss(a, b, w), [a, b], method="double_backward")(vs)
    fd = HessianVectorProduct(lambda: rank1_loss(a, b, w), [a, b], method="finite_difference", fd_eps=1e-5)(vs)
    for x, y in zip(db, fd):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)
    assert torch.equal(a, a0) and torch.equal(b, b0)


class _Once(torch.autograd.Function):
    """x -> x^2 with a backward that cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_hvp_falls_back_to_finite_differences_when_double_backward_raises(caplog):
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    loss = lambda: (_Once.apply(x) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()  # noqa: E731
    with pytest.raises(RuntimeError):
        HessianVectorProduct(loss, [x], method="double_backward")([torch.ones(3, dtype=torch.float64)])
    hvp = HessianVectorProduct(loss, [x], method="auto")
    with caplog.at_level(logging.DEBUG, logger="langevin_lora.core.curvature"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # issue 19: a debug line, not a warning on every CPU run
        hv = hvp([torch.ones(3, dtype=torch.float64)])
    assert "falling back to central finite differences" in caplog.text
    assert hvp.used_method == "finite_difference"
    torch.testing.assert_close(hv[0], torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64), rtol=1e-6, atol=1e-8)


def test_power_iteration_and_step_size_check(quad):
    theta = torch.nn.Parameter(torch.zeros(1, 3, dtype=torch.float64))
    hvp = HessianVectorProduct(lambda: quad.loss(theta), [theta], batch_dims=1)
    eig, _ = power_iteration(hvp, [theta], weight_decay=quad.lam, scale=[LR], num_iters=60,
                             generator=torch.Generator().manual_seed(0), batch_dims=1)
    exact = LR * float(torch.linalg.eigvalsh(quad.K).max())
    assert float(eig[0]) == pytest.approx(exact, rel=1e-6)
    assert float(eig[0]) > 0.1  # this step size is already above the 0.1 gate
    # eta * lambda_max = 1.5: stable (< 2) but heavily biased; the report fails it, and the
    # temperature is off by the predicted factor.
    lr = 1.5 / float(torch.linalg.eigvalsh(quad.K).max())
    run = _run_quadratic(quad, lr=lr, steps=3 * WINDOW, chains=128, seed=3)
    per_chain = run["virial"][WINDOW:].mean(0)
    assert abs(zscore(per_chain, _virial_prediction(quad, lr))) <= Z
    rep = stationarity_report({"virial_temperature": run["virial"][WINDOW:].mean(1)}, eta_lambda_max=1.5)
    assert rep.by_name("eta_lambda_max").status == "fail"
    assert rep.by_name("virial_temperature").status == "fail"
    assert "eta*lambda_max = 1.5 > 0.25" in rep.by_name("virial_temperature").reason   # STEP_ACCURACY_BOUND
    assert stationarity_report(eta_lambda_max=0.05).by_name("eta_lambda_max").status == "pass"
    assert stationarity_report(eta_lambda_max=0.5).by_name("eta_lambda_max").status == "warn"


def _run_rank1(*, steps: int, chains: int, lr: float, a0, b0, record_every: int = 1, seed: int = 0):
    """SGLD on U = |w - b a|^2 + lam/2 (|a|^2 + b^2), A (1x2), B (1x1); beta = 4, lam = 0.5."""
    beta, lam = 4.0, 0.5
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    a = torch.nn.Parameter(torch.as_tensor(a0, dtype=torch.float64).reshape(1, 1, 2).repeat(chains, 1, 1))
    b = torch.nn.Parameter(torch.as_tensor(b0, dtype=torch.float64).reshape(1, 1, 1).repeat(chains, 1, 1))
    opt = make_sgd([a, b], lr, beta, lam, seed)
    gaps = []
    for t in range(steps):
        opt.zero_grad()
        rank1_loss(a, b, w).backward()
        if t % record_every == 0:
            gaps.append(gauge_gap(a, b, beta=beta, weight_decay=lam))
        opt.step()
    return torch.stack(gaps).numpy()


def test_gauge_identity_rank1_lora():
    # E[beta lam (|a|^2 - b^2)] = in - out = 1, i.e. E[|a|^2 - b^2] = 1/(beta lam) = 0.5.
    assert gauge_target(2, 1, 4.0, 0.5) == pytest.approx(0.5)
    lr = 0.005
    gaps = _run_rank1(steps=5000, chains=1000, lr=lr, a0=[0.8, 0.4], b0=[0.9], record_every=5)
    per_chain = gaps[200:].mean(0)  # after 5 relaxation times (rate 2 lam = 1 per unit time)
    assert abs(zscore(per_chain, 0.0)) <= Z


def test_gauge_relaxes_at_rate_two_lambda():
    # From a far start the mean gap decays as exp(-2 lam t) whatever the data (lam = 0.5, t = lr * steps).
    lr = 0.002
    gaps = _run_rank1(steps=1001, chains=2000, lr=lr, a0=[3.0, 0.0], b0=[0.0], record_every=250)
    g0 = float(gaps[0].mean())
    assert g0 == pytest.approx(2 * 9.0 - 1.0)
    for i, row in enumerate(gaps[1:], start=1):
        t = i * 250 * lr
        # (1 - eta lam)^2 per step is the discrete rate; it differs from exp(-2 lam eta) by O(eta^2).
        expected = g0 * (1 - lr * 0.5) ** (2 * 250 * i)
        assert abs(zscore(row, expected)) <= Z, (t, row.mean(), expected)
        assert expected == pytest.approx(g0 * math.exp(-t), rel=2e-3)


def test_gauge_matrix_and_validation():
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    B = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    D = gauge_matrix(A, B, beta=2.0, weight_decay=0.5)
    torch.testing.assert_close(D, (A @ A.T - B.T @ B).double())
    assert float(gauge_gap(A, B, beta=2.0, weight_decay=0.5)) == pytest.approx(float(torch.trace(D)) / 2 - 1)
    with pytest.raises(ValueError, match="weight_decay"):
        gauge_target(3, 2, 1.0, 0.0)
    with pytest.raises(ValueError, match="rank mismatch"):
        gauge_matrix(A, B[:, :1], beta=1.0, weight_decay=1.0)
    with pytest.raises(ValueError, match="beta"):
        virial_temperature([A], [A], beta=0.0)
    with pytest.raises(ValueError, match="grads"):
        virial_temperature([A], [B])
    with pytest.raises(ValueError, match="method"):
        HessianVectorProduct(lambda: A.sum(), [A], method="exact")
    with pytest.raises(ValueError, match="window"):
        WindowCenter(0)
    with pytest.raises(ValueError, match="blocks"):
        mean_force_chi2(torch.zeros(3, 5))


def test_far_start_fails_geweke_rhat_and_report(quad):
    """A chain still relaxing from a far start fails Geweke, split-R-hat and the report's checks."""
    starts = quad.mean + torch.tensor([[8.0, 8.0, 8.0], [-8.0, 8.0, 0.0], [8.0, -8.0, 4.0], [0.0, 0.0, -8.0]],
                                      dtype=torch.float64)
    lr = 0.002  # slowest mode relaxes in 1/(lr * 1.1) ~ 450 steps
    run = _run_quadratic(quad, lr=lr, steps=1500, chains=4, theta0=starts, seed=5)
    U = run["U"]  # (steps, chains)
    assert all(abs(geweke_z(U[:, c])) > 3 for c in range(4))
    assert split_rhat(run["force"][:, :, 0].T) > 1.05
    rep = stationarity_report({"U": U[:, 0], "virial_temperature": run["virial"][:, 0]},
                              chains={"theta0": run["force"][:, :, 0].T})
    assert rep.by_name("geweke/U").status == "fail"
    assert rep.by_name("split_rhat/theta0").status == "fail"
    assert rep.verdict == "fail"
    # The same diagnostics pass on stationary chains.
    ok = _run_quadratic(quad, lr=LR, steps=2000, chains=4, seed=9)
    zs = [geweke_z(ok["U"][:, c]) for c in range(4)]
    assert max(abs(z) for z in zs) < 4.5
    assert split_rhat(ok["U"].T) < 1.05
