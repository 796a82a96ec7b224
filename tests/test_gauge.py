"""Balancing and exact gauge moves of LoRA factors (THEORY §4), tested on the solvable rank-1
targets of THEORY §5(ii) and on the packaged MiniLM LoRA."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pinned import adam_pre19  # LangevinAdam with its pre-issue-19 defaults

from langevin_lora import LangevinAdam, LangevinSGD, lora_modules
from langevin_lora.lora.balance import BalanceSchedule, balance_factors, balance_lora_
from langevin_lora.lora.gauge import (
    GaugeMoves,
    gauge_imbalance,
    gl_gauge_move_,
    gl_gauge_proposal,
    gl_log_acceptance,
    haar_orthogonal,
    orthogonal_gauge_move_,
)

LAM, BETA = 0.5, 4.0            # THEORY §5(ii)
Z_MAX = 4.5
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# ground truth of target (ii) and its matrix variant: U = |w - b a|^2 + (lam/2)(|a|^2 + b^2)
# ---------------------------------------------------------------------------------------------
def rank1_truth(w, lam=LAM, beta=BETA) -> dict[str, float]:
    """Exact moments by 1-d quadrature: given b, a is Gaussian with mean b w / c and variance
    1/(2 beta c) per coordinate, c = b^2 + lam/2; b has log-density
    -beta lam b^2/2 - (in/2) log c + beta |w|^2 b^2 / c. Reproduces THEORY §5(ii) for w = 1."""
    w = np.asarray(w, float)
    n, w2 = w.size, float(w @ w)
    b = np.linspace(-10, 10, 200001)
    c = b**2 + lam / 2
    logp = -beta * lam * b**2 / 2 - (n / 2) * np.log(c) + beta * w2 * b**2 / c
    p = np.exp(logp - logp.max())
    p /= np.trapezoid(p, b)

    def E(f):
        return float(np.trapezoid(p * f, b))
    s2, m = 1 / (2 * beta * c), b / c            # a | b ~ N(m w, s2 I)
    a2 = m**2 * w2 + n * s2
    mu1 = m * w[0]
    out = {"a2": E(a2), "b2": E(b**2), "W2": E(b**2 * a2), "a1^4": E(mu1**4 + 6 * mu1**2 * s2 + 3 * s2**2),
           "pos": 0.5}
    for i, wi in enumerate(w):
        out[f"W{i}"] = E(b * m * wi)
    out["D"] = out["a2"] - out["b2"]
    out["U"] = w2 - 2 * sum(wi * out[f"W{i}"] for i, wi in enumerate(w)) + out["W2"] + lam / 2 * (out["a2"] + out["b2"])
    return out


def exact_rank1_samples(w, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact draws of target (ii) / its variant: b by rejection from N(0, 1/(beta lam)) (the ratio
    ((lam/2)/c)^{in/2} exp(beta |w|^2 (b^2/c - 1)) is <= 1), then a | b Gaussian."""
    w = torch.as_tensor(w, dtype=F64)
    fan_in, w2 = w.numel(), float(w @ w)
    kept = []
    total = 0
    while total < n:
        b = torch.randn(8 * n, generator=gen, dtype=F64) / math.sqrt(BETA * LAM)
        c = b**2 + LAM / 2
        log_acc = BETA * w2 * (b**2 / c - 1) + (fan_in / 2) * torch.log((LAM / 2) / c)
        b = b[torch.rand(8 * n, generator=gen, dtype=F64).log() < log_acc]
        kept.append(b)
        total += b.numel()
    b = torch.cat(kept)[:n]
    c = b**2 + LAM / 2
    a = (b / c)[:, None] * w + torch.randn(n, fan_in, generator=gen, dtype=F64) / torch.sqrt(2 * BETA * c)[:, None]
    return a.reshape(n, 1, fan_in), b.reshape(n, 1, 1)


def observables(A, B, w) -> dict[str, torch.Tensor]:
    """Per-chain observables of the rank-1 targets (A: (C, 1, in), B: (C, 1, 1))."""
    W = (B @ A)[:, 0, :]
    a2, b2 = A.square().sum((-2, -1)), B.square().sum((-2, -1))
    out = {"a2": a2, "b2": b2, "W2": W.square().sum(-1), "a1^4": A[:, 0, 0] ** 4, "pos": (A[:, 0, 0] > 0).to(F64),
           "D": a2 - b2, "U": (w - W).square().sum(-1) + LAM / 2 * (a2 + b2), "a1": A[:, 0, 0]}
    for i in range(W.shape[-1]):
        out[f"W{i}"] = W[:, i]
    return out


def zscore(x: torch.Tensor, truth: float) -> float:
    return float((x.mean() - truth) / (x.std() / math.sqrt(x.numel())))


def run_chains(w, *, chains: int, eta: float, time_units: float, seed: int, moves: GaugeMoves | None = None,
               project: bool = False, record_every: int = 5) -> dict[str, torch.Tensor]:
    """Vectorised LangevinSGD chains of the rank-1 target (chains are the leading dim), started
    from exact samples; returns the per-chain time averages of :func:`observables`."""
    w = torch.as_tensor(w, dtype=F64)
    A0, B0 = exact_rank1_samples(w, chains, torch.Generator().manual_seed(seed))
    A, B = torch.nn.Parameter(A0), torch.nn.Parameter(B0)
    opt = LangevinSGD([A, B], lr=eta, beta=BETA, weight_decay=LAM, seed=seed + 1)
    wv = w.view(1, 1, -1)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for t in range(1, int(round(time_units / eta)) + 1):
        with torch.no_grad():
            R = wv - B @ A                      # L = |w - BA|^2 (its gradients, by hand)
            A.grad = -2 * B.mT @ R
            B.grad = -2 * R @ A.mT
        opt.step()
        with torch.no_grad():
            if moves is not None:
                moves([(A, B)], BETA, LAM)
            if project:
                A_bal, B_bal = balance_factors(A, B)
                A.copy_(A_bal)
                B.copy_(B_bal)
            if t % record_every == 0:
                for k, v in observables(A, B, w[None]).items():
                    sums[k] = sums.get(k, 0) + v
                n += 1
    return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------
# balancing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r,fan_in,fan_out", [(3, 7, 4), (4, 3, 6), (8, 2, 2), (1, 1, 1), (2, 5, 5)])
def test_balance_preserves_product_and_reaches_nuclear_norm(r, fan_in, fan_out):
    gen = torch.Generator().manual_seed(r * 100 + fan_in)
    A = torch.randn(6, r, fan_in, generator=gen, dtype=F64) * torch.rand(6, r, 1, generator=gen, dtype=F64) * 3
    B = torch.randn(6, fan_out, r, generator=gen, dtype=F64) * 0.2
    W = B @ A
    A2, B2 = balance_factors(A, B)
    assert A2.shape == A.shape and B2.shape == B.shape and A2.dtype == F64
    scale = W.abs().amax()
    assert (B2 @ A2 - W).abs().amax() <= 1e-13 * scale
    nuc = torch.linalg.matrix_norm(W, ord="nuc")
    norm2 = A2.square().sum((-2, -1)) + B2.square().sum((-2, -1))
    assert torch.allclose(norm2, 2 * nuc, rtol=1e-12, atol=0)
    assert torch.all(norm2 <= A.square().sum((-2, -1)) + B.square().sum((-2, -1)))  # U never increases
    assert gauge_imbalance(A2, B2).abs().amax() <= 1e-12 * scale   # balanced: D = 0
    A3, B3 = balance_factors(A2, B2)                                  # idempotent (up to the gauge
    assert (B3 @ A3 - W).abs().amax() <= 1e-13 * scale                # left by repeated singular values)
    assert torch.allclose(A3.square().sum((-2, -1)), A2.square().sum((-2, -1)), rtol=1e-12)


def test_balance_rank_deficient_and_zero_product():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(3, 9, generator=gen, dtype=F64)
    B = torch.randn(5, 1, generator=gen, dtype=F64) @ torch.randn(1, 3, generator=gen, dtype=F64)  # rank 1
    A2, B2 = balance_factors(A, B)
    assert (B2 @ A2 - B @ A).abs().amax() <= 1e-13 * (B @ A).abs().amax()
    assert torch.allclose(A2.square().sum() + B2.square().sum(), 2 * torch.linalg.matrix_norm(B @ A, ord="nuc"))
    assert torch.linalg.matrix_rank(A2) == 1                     # the null directions are zeroed
    # LoRA's initialisation B = 0: the minimum-norm factorisation of 0 is (0, 0)
    Az, Bz = balance_factors(A, torch.zeros(5, 3, dtype=F64))
    assert torch.count_nonzero(Az) == 0 and torch.count_nonzero(Bz) == 0


def test_balance_float32_keeps_dtype_and_product():
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(4, 8, 64, generator=gen)
    B = torch.randn(4, 32, 8, generator=gen) * 0.01
    A2, B2 = balance_factors(A, B)
    assert A2.dtype == torch.float32 and B2.dtype == torch.float32
    W = (B.double() @ A.double())
    assert (B2.double() @ A2.double() - W).abs().amax() <= 1e-5 * W.abs().amax()


def test_balance_factors_rejects_bad_shapes():
    with pytest.raises(ValueError, match="Invalid A/B"):
        balance_factors(torch.zeros(3, 4), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="Invalid A/B"):
        balance_factors(torch.zeros(2, 3, 4), torch.zeros(3, 5, 3))
    with pytest.raises(ValueError, match="Invalid A/B"):
        balance_factors(torch.zeros(4), torch.zeros(5, 1))


def _delta_weights(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer
    return {n: m.get_delta_weight("default").detach().clone() for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_balance_lora_minilm_preserves_function_and_transports_moments(minilm_lora_factory):
    model, tok = minilm_lora_factory(seed=0)
    model.eval()  # no dropout: outputs and gradients must be reproducible
    factors = lora_modules(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for f in factors:
            f.B.copy_(torch.randn(f.B.shape, generator=gen) * 0.05)
    batch = tok(["free prize, call now", "see you at lunch tomorrow"], return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0])
    before, out_before = _delta_weights(model), model(**batch).logits.detach()

    # one AdamW step (decoupled decay, so exp_avg = (1 - beta1) * loss gradient exactly)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-12, weight_decay=0.0)
    model(**batch, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    norms_before = [float(f.A.detach().square().sum() + f.B.detach().square().sum()) for f in factors]

    names = balance_lora_(model, optimizer=opt)
    assert len(names) == len(factors) == 12
    after, out_after = _delta_weights(model), model(**batch).logits.detach()
    for n, dw in before.items():
        assert (after[n] - dw).abs().amax() <= 1e-5 * dw.abs().amax(), n   # float32 round-off
    assert (out_after - out_before).abs().amax() <= 1e-4
    for f, nb in zip(factors, norms_before):
        assert f.A.dtype == torch.float32
        nuc = torch.linalg.matrix_norm(f.scaling * (f.B.double() @ f.A.double()), ord="nuc") / f.scaling
        assert float(f.A.square().sum() + f.B.square().sum()) == pytest.approx(2 * float(nuc), rel=1e-5)
        assert float(f.A.square().sum() + f.B.square().sum()) < nb
    # the transported first moment is the new gauge's gradient: (1 - beta1) * grad at the balanced point
    model(**batch, labels=labels).loss.backward()
    for f in factors[:4]:
        for p in (f.A, f.B):
            expected = 0.1 * p.grad
            assert (opt.state[p]["exp_avg"] - expected).abs().amax() <= 1e-4 * expected.abs().amax() + 1e-12
    opt.zero_grad()

    # "reset" clears the state; modules whose product is zero (B = 0 at init) are skipped
    balance_lora_(model, optimizer=opt, moments="reset")
    assert all(len(opt.state[f.A]) == 0 for f in factors)
    with torch.no_grad():
        factors[0].B.zero_()
    A0 = factors[0].A.detach().clone()
    assert factors[0].name not in balance_lora_(model)
    assert torch.equal(factors[0].A, A0)

    # exact gauge moves on the model's own factors keep every delta weight
    moves = GaugeMoves(gl_step=1.0, seed=3)
    ref = _delta_weights(model)
    stats = moves(factors, beta=1000.0, weight_decay=0.01)
    assert 0.0 <= stats["gauge/gl_acceptance"] <= 1.0 and stats["gauge/orthogonal_moves"] == 12
    for n, dw in _delta_weights(model).items():
        assert (dw - ref[n]).abs().amax() <= 1e-5 * ref[n].abs().amax() + 1e-30, n

    # refused once LangevinAdam has frozen its preconditioner
    sampler = adam_pre19([f.A for f in factors] + [f.B for f in factors], lr=1e-4, num_data=100, burn_in_steps=None)
    with pytest.warns(UserWarning, match="no burn-in step"):
        sampler.start_sampling()
    with pytest.raises(ValueError, match="frozen preconditioner"):
        balance_lora_(model, optimizer=sampler)
    with pytest.raises(ValueError, match="Invalid moments"):
        balance_lora_(model, moments="keep")


def test_balance_schedule_refuses_sampling_and_validates():
    sched = BalanceSchedule(every_n_steps=3)
    assert [s for s in range(1, 10) if sched.due(s)] == [3, 6, 9]
    with pytest.raises(ValueError, match="changes the law"):
        sched.check_phase(sampling=True)
    with pytest.raises(ValueError, match="E\\[W\\] = 0.363"):
        sched.step(torch.nn.Linear(2, 2), 3, sampling=True)
    sched.check_phase(sampling=False)
    assert not BalanceSchedule(at_sampling_start=False).start_sampling(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Invalid every_n_steps"):
        BalanceSchedule(every_n_steps=0)
    with pytest.raises(ValueError, match="Invalid at_sampling_start"):
        BalanceSchedule(at_sampling_start=1)
    with pytest.raises(ValueError, match="Invalid moments"):
        BalanceSchedule(moments="zero")


def test_projection_after_every_step_changes_the_law():
    """Why balancing is refused while sampling: projecting every step moves E[W] far from the
    Gibbs value 0.65452 (THEORY §4). The unprojected chains (same seeds, same eta) are checked in
    test_gauge_moves_keep_the_moments."""
    res = run_chains([1.0], chains=200, eta=0.005, time_units=15, seed=11, project=True)
    z = zscore(res["W0"], rank1_truth([1.0])["W0"])
    assert z < -Z_MAX * 4, z           # measured E[W] ~ 0.34 instead of 0.655
    assert res["D"].abs().amax() < 1e-10   # the chains live on the balanced set D = 0


# ---------------------------------------------------------------------------------------------
# exact gauge moves: the moves alone
# ---------------------------------------------------------------------------------------------
def test_haar_orthogonal_and_orthogonal_move():
    gen = torch.Generator().manual_seed(5)
    O = haar_orthogonal((20000,), 3, generator=gen)
    assert (O @ O.mT - torch.eye(3, dtype=F64)).abs().amax() < 1e-12
    tr = O.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert abs(zscore(tr, 0.0)) < Z_MAX            # Haar on O(3): E tr O = 0, E (tr O)^2 = 1
    assert abs(zscore(tr**2, 1.0)) < Z_MAX         # (the QR without sign fix fails both)
    assert abs(zscore((O.det() > 0).to(F64), 0.5)) < Z_MAX
    A = torch.randn(50, 3, 7, generator=gen, dtype=F64)
    B = torch.randn(50, 4, 3, generator=gen, dtype=F64)
    A1, B1 = A.clone(), B.clone()
    orthogonal_gauge_move_(A1, B1, gen)
    assert (B1 @ A1 - B @ A).abs().amax() < 1e-12
    assert torch.allclose(A1.square().sum((-2, -1)), A.square().sum((-2, -1)))
    assert torch.allclose(B1.square().sum((-2, -1)), B.square().sum((-2, -1)))
    s = haar_orthogonal((4000,), 1, generator=gen)
    assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(zscore((s > 0).to(F64).flatten(), 0.5)) < Z_MAX


def _gl_moves(A, B, gen, steps, eps, jacobian=True):
    """GL moves alone; ``jacobian=False`` drops the (in - out) eps tr M term (negative control)."""
    for _ in range(steps):
        if jacobian:
            gl_gauge_move_(A, B, beta=BETA, weight_decay=LAM, step_scale=eps, generator=gen)
        else:
            A_new, B_new, log_det = gl_gauge_proposal(A, B, eps, gen)
            log_a = gl_log_acceptance(A, B, A_new, B_new, torch.zeros_like(log_det), beta=BETA, weight_decay=LAM)
            acc = (torch.rand(log_a.shape, generator=gen, dtype=F64).log() < log_a)[:, None, None]
            A.copy_(torch.where(acc, A_new, A))
            B.copy_(torch.where(acc, B_new, B))


def test_gl_moves_alone_keep_exact_samples_exact():
    """Start from exact draws of the matrix variant (in = 2, out = 1); GL moves alone must keep
    the law: gauge-dependent moments stay at their quadrature values. Dropping the Jacobian term
    (in - out) eps tr M is detected."""
    w = [1.0, 0.5]
    truth = rank1_truth(w)
    gen = torch.Generator().manual_seed(21)
    A, B = exact_rank1_samples(w, 40000, gen)
    W0 = B @ A
    _gl_moves(A, B, gen, steps=8, eps=0.6)
    assert (B @ A - W0).abs().amax() < 1e-12         # W is untouched
    obs = observables(A, B, torch.tensor([w], dtype=F64))
    for k in ("a2", "b2", "D", "a1^4", "U"):
        assert abs(zscore(obs[k], truth[k])) < Z_MAX, (k, zscore(obs[k], truth[k]))
    A, B = exact_rank1_samples(w, 40000, gen)
    _gl_moves(A, B, gen, steps=8, eps=0.6, jacobian=False)
    assert abs(zscore(observables(A, B, torch.tensor([w], dtype=F64))["D"], truth["D"])) > Z_MAX


def test_gl_moves_alone_keep_the_gaussian_prior_rank2():
    """GL(2) moves (matrix exponential, non-commuting) on exact draws of the prior-only target
    exp(-(beta lam/2)(|A|^2 + |B|^2)) (L = 0 depends on BA trivially): E[D] = (in - out)/(beta lam) I."""
    r, fan_in, fan_out, n = 2, 5, 3, 20000
    gen = torch.Generator().manual_seed(22)
    sd = 1 / math.sqrt(BETA * LAM)
    for jacobian in (True, False):
        A = torch.randn(n, r, fan_in, generator=gen, dtype=F64) * sd
        B = torch.randn(n, fan_out, r, generator=gen, dtype=F64) * sd
        _gl_moves(A, B, gen, steps=6, eps=0.25, jacobian=jacobian)
        D = gauge_imbalance(A, B)
        z_diag = [zscore(D[:, i, i], (fan_in - fan_out) / (BETA * LAM)) for i in range(r)]
        z_off = zscore(D[:, 0, 1], 0.0)
        z_a = zscore(A.square().sum((-2, -1)), r * fan_in / (BETA * LAM))
        if jacobian:
            assert max(map(abs, z_diag + [z_off, z_a])) < Z_MAX, (z_diag, z_off, z_a)
        else:
            assert max(map(abs, z_diag)) > Z_MAX, z_diag


def test_gl_detailed_balance_on_a_gauge_orbit():
    """On the orbit t -> (e^t a0, e^-t b0) of the matrix variant the conditional density is
    p(t) ∝ exp(-(beta lam/2)(e^{2t}|a0|^2 + e^{-2t} b0^2) + (in - out) t). Start from exact draws
    of p, make one GL proposal with a large step and form the acceptance-weighted histogram
    alpha 1[t' in k] + (1 - alpha) 1[t in k]: stationarity demands it equals p's bin masses."""
    a0, b0 = torch.tensor([[0.9, -0.4]], dtype=F64), torch.tensor([[0.7]], dtype=F64)
    fan_in, fan_out, n = 2, 1, 40000
    grid = torch.linspace(-5, 5, 200001, dtype=F64)
    logp = -(BETA * LAM / 2) * (torch.exp(2 * grid) * a0.square().sum() + torch.exp(-2 * grid) * b0.square().sum()) \
        + (fan_in - fan_out) * grid
    p = torch.exp(logp - logp.max())
    cdf = torch.cumsum((p[1:] + p[:-1]) / 2, 0)
    cdf = torch.cat([cdf.new_zeros(1), cdf]) / cdf[-1]
    gen = torch.Generator().manual_seed(23)
    u = torch.rand(n, generator=gen, dtype=F64)
    idx = torch.searchsorted(cdf, u).clamp(1, grid.numel() - 1)
    t = grid[idx - 1] + (u - cdf[idx - 1]) / (cdf[idx] - cdf[idx - 1]) * (grid[idx] - grid[idx - 1])
    A = torch.exp(t)[:, None, None] * a0
    B = torch.exp(-t)[:, None, None] * b0
    A_new, B_new, log_det = gl_gauge_proposal(A, B, 0.8, gen)
    t_new = t + log_det                                   # r = 1: g = e^{eps M}, log det g = eps M
    assert torch.allclose(A_new, torch.exp(t_new)[:, None, None] * a0)
    edges = torch.quantile(t, torch.linspace(0, 1, 17, dtype=F64)[1:-1])
    cdf_at_edges = torch.from_numpy(np.interp(edges.numpy(), grid.numpy(), cdf.numpy()))
    mass = torch.diff(torch.cat([torch.zeros(1, dtype=F64), cdf_at_edges, torch.ones(1, dtype=F64)]))
    for log_det_used, ok in ((log_det, True), (torch.zeros_like(log_det), False)):
        alpha = gl_log_acceptance(A, B, A_new, B_new, log_det_used, beta=BETA, weight_decay=LAM).exp().clamp(max=1)
        k_old, k_new = torch.bucketize(t, edges), torch.bucketize(t_new, edges)
        weights = alpha[:, None] * torch.nn.functional.one_hot(k_new, 16) + \
            (1 - alpha)[:, None] * torch.nn.functional.one_hot(k_old, 16)
        z = [(weights[:, k].mean() - mass[k]) / (weights[:, k].std() / math.sqrt(n)) for k in range(16)]
        zmax = float(max(abs(zk) for zk in z))
        assert (zmax < Z_MAX) == ok, (ok, zmax)


def test_gl_move_validation():
    A, B = torch.zeros(1, 3), torch.zeros(4, 1)
    gen = torch.Generator()
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        gl_gauge_move_(A, B, beta=1.0, weight_decay=0.0, step_scale=0.1, generator=gen)
    with pytest.raises(ValueError, match="Invalid beta"):
        gl_gauge_move_(A, B, beta=math.inf, weight_decay=0.1, step_scale=0.1, generator=gen)
    with pytest.raises(ValueError, match="Invalid step_scale"):
        gl_gauge_move_(A, B, beta=1.0, weight_decay=0.1, step_scale=0.0, generator=gen)
    with pytest.raises(ValueError, match="Invalid every_n_steps"):
        GaugeMoves(every_n_steps=0)
    with pytest.raises(ValueError, match="Invalid gl_step"):
        GaugeMoves(gl_step=-1.0)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        GaugeMoves(gl_step=1.0)([(A, B)], beta=1.0, weight_decay=0.0)


def test_gauge_moves_schedule_and_exact_resume():
    gen = torch.Generator().manual_seed(9)
    A = torch.randn(10, 2, 5, generator=gen, dtype=F64)
    B = torch.randn(10, 3, 2, generator=gen, dtype=F64)
    moves = GaugeMoves(every_n_steps=2, gl_step=1.0, seed=4)
    assert moves([(A, B)], BETA, LAM) == {}                 # 1st call: not due
    stats = moves([(A, B)], BETA, LAM)
    assert set(stats) == {"gauge/orthogonal_moves", "gauge/gl_acceptance", "gauge/gl_acceptance_mean"}
    state = moves.state_dict()
    A1, B1 = A.clone(), B.clone()
    resumed = GaugeMoves(every_n_steps=2, gl_step=1.0, seed=999)
    resumed.load_state_dict(state)
    for _ in range(4):
        moves([(A, B)], BETA, LAM)
        resumed([(A1, B1)], BETA, LAM)
    assert torch.equal(A, A1) and torch.equal(B, B1) and moves.acceptance_rate == resumed.acceptance_rate


# ---------------------------------------------------------------------------------------------
# gauge moves interleaved with LangevinSGD
# ---------------------------------------------------------------------------------------------
ETA, T_UNITS, CHAINS, MOVE_EVERY = 0.005, 25.0, 400, 10


@pytest.fixture(scope="module")
def chain_runs():
    """Per-chain time averages for both targets: with moves at eta and eta/2 (moves at the same
    times, every 0.05 time units, so the O(eta) bias is linear in eta and Richardson removes it),
    and without moves at eta (same seeds, same number of gradient evaluations)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    for w in ([1.0], [1.0, 0.5]):
        key = len(w)
        runs[key] = {
            "moves": run_chains(w, chains=CHAINS, eta=ETA, time_units=T_UNITS, seed=31,
                                moves=GaugeMoves(every_n_steps=MOVE_EVERY, gl_step=1.5, seed=1)),
            "moves_half": run_chains(w, chains=CHAINS, eta=ETA / 2, time_units=T_UNITS, seed=32, record_every=10,
                                     moves=GaugeMoves(every_n_steps=2 * MOVE_EVERY, gl_step=1.5, seed=2)),
            "plain": run_chains(w, chains=CHAINS, eta=ETA, time_units=T_UNITS, seed=31),
        }
    torch.set_num_threads(n_threads)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("w", [[1.0], [1.0, 0.5]], ids=["scalar", "variant"])
def test_gauge_moves_keep_the_moments(chain_runs, w):
    """Langevin + orthogonal + GL moves: Richardson-extrapolated moments 2X(eta/2) - X(eta) match
    the quadrature ground truth (THEORY §5(ii); the variant's E[|a|^2 - b^2] = 1/(beta lam) = 0.5)."""
    truth = rank1_truth(w)
    run, half = chain_runs[len(w)]["moves"], chain_runs[len(w)]["moves_half"]
    for k in ("a2", "b2", "W0", "W2", "a1^4", "U", "D", "pos") + (("W1",) if len(w) > 1 else ()):
        est = 2 * half[k].mean() - run[k].mean()
        se = math.sqrt(4 * half[k].var() / half[k].numel() + run[k].var() / run[k].numel())
        z = float(est - truth[k]) / se
        assert abs(z) < Z_MAX, (k, float(est), truth[k], z)


@pytest.mark.slow
@pytest.mark.parametrize("w", [[1.0], [1.0, 0.5]], ids=["scalar", "variant"])
def test_gauge_moves_reduce_standard_errors(chain_runs, w):
    """At equal gradient evaluations, the across-chain standard error of the time average of
    D = a a^T - b^2 drops with GL moves: D only relaxes at rate 2 lam under Langevin, while a GL
    move jumps along the orbit (a, b) -> (g a, b/g). (For r = 1 the orthogonal move is the sign
    flip (a, b) -> -(a, b), which leaves D unchanged; what it speeds up is the sign-odd
    observable a_1, whose two modes a_1 > 0 and a_1 < 0 Langevin only crosses through the barrier
    at the origin.) Variance ratios are tested for significance: log F has sd sqrt(4/(n-1))."""
    run, plain = chain_runs[len(w)]["moves"], chain_runs[len(w)]["plain"]
    n = run["D"].numel()
    sd_log_f = math.sqrt(4 / (n - 1))
    for k in ("D", "a1"):
        log_f = math.log(plain[k].var() / run[k].var())
        assert log_f > Z_MAX * sd_log_f, (k, math.exp(log_f / 2))
