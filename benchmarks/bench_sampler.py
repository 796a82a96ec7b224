r"""Sampler efficiency: effective samples per gradient evaluation and moment error.

Compares, on the same targets and at the same step size (in the sense below):

* ``ours SGLD``        :class:`langevin_lora.LangevinSGD`;
* ``ours Adam-precond`` :class:`langevin_lora.LangevinAdam`: a short noise-free Adam warm-up,
  then Langevin sampling with the frozen preconditioner :math:`G` (warm-up gradients counted);
* ``ours Adam + adapt``: the same, with ``precond_adapt_steps``: :math:`G` re-frozen from the mean
  :math:`(\partial U)^2` of the first noisy steps (a curvature scale, see
  :func:`langevin_lora.core.functional.adapted_preconditioner`), step size re-tuned (same h);
* ``ours SGLD + gauge`` / ``ours Adam + gauge`` (LoRA targets only): the same chains with exact
  gauge moves (:class:`langevin_lora.lora.gauge.GaugeMoves`: Haar orthogonal move plus a Metropolis
  GL(r) move after every step; they cost no gradient evaluation);
* ``posteriors SGLD``  :func:`posteriors.sgmcmc.sgld.build` (benchmark-only extra).

Targets (THEORY §5 and a real posterior):

1. ``quadratic``: anisotropic quadratic, :math:`\hat L = |X\theta - y|^2/(2N)` with the columns of
   :math:`X` scaled from 1 to 6.3 (condition number of :math:`K = X^\top X/N + \lambda I` 60; 2.7 after
   the ideal diagonal preconditioning).
   Reference: the Gibbs law :math:`N(K^{-1}b, (\beta K)^{-1})`; also the *exact* law of each
   discretised chain (discrete Lyapunov equation), against which no bias is allowed.
2. ``lora-rank1``: :math:`U = (w - ba)^2 + \tfrac\lambda2(a^2+b^2)`, :math:`w=1, \lambda=0.5,
   \beta=4`; reference by quadrature (agrees with THEORY §5(ii) to 1e-5).
3. ``lora-1x2``: :math:`A` is 1x2, :math:`b` scalar, :math:`w=(1, 0.5)`; reference by quadrature
   (and :math:`E[|a|^2-b^2] = 1/(\beta\lambda) = 0.5` exactly).
4. ``logreg``: Bayesian logistic regression on scikit-learn's breast_cancer (N=569, 30
   standardised features + intercept), prior :math:`N(0, I)`: :math:`\beta = N`,
   :math:`\lambda = 1/N`. Reference: a long *exact* chain, MALA (Metropolis-adjusted) with the
   Laplace covariance at the MAP as its metric, many vectorised chains started from the Laplace
   approximation.

"Same step size": the identity-preconditioned samplers (ours SGLD, posteriors SGLD) use the
identical :math:`\eta = h/\lambda_{\max}(\nabla^2 U)`; the preconditioned sampler uses the same
dimensionless step :math:`h = \eta\,\lambda_{\max}(G^{1/2}\nabla^2U\,G^{1/2})` (THEORY §2's
stability number), with the Hessian taken at the mode. Equal :math:`h` means equal stability
margin and comparable :math:`O(h)` discretisation bias, which the moment columns check.

Metrics, from many vectorised chains started at one common point (all gradients counted:
warm-up, burn-in and kept samples): multi-chain ESS with Geyer's initial-sequence truncation
per gradient evaluation, minimum over the coordinates of :math:`\theta`, over the entries of the
gauge-invariant :math:`W = BA` (LoRA), and for :math:`U`; the largest :math:`|z|` over the
reference moments (per-chain time averages, z-test across chains, reference standard error
included); wall time per step (median of repeats, after a warm-up).

The quadratic and LoRA targets and their ground truth come from :mod:`langevin_lora.testing`.

Run ``python -m benchmarks.bench_sampler`` from the repository root (about 3-5 min on one core),
``--quick`` (about 30 s) or ``--smoke`` (tests); ``--append-results`` appends the table to
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks._common import (ESS_BACKEND, add_results_arguments, add_size_arguments, append_results,
                                effective_sample_size, machine_markdown, machine_record, markdown_table,
                                time_per_call)
from langevin_lora import LangevinAdam, LangevinSGD, weight_decay_from_prior_std
from langevin_lora.testing import RANK1_GROUND_TRUTH, Quadratic, lora_posterior_grid

try:
    from langevin_lora.lora.gauge import GaugeMoves
except ImportError:  # the gauge module is optional for this benchmark
    GaugeMoves = None

DTYPE = torch.float64

# ---------------------------------------------------------------------------------------------
# posteriors' SGLD and our convention
# ---------------------------------------------------------------------------------------------
# posteriors 0.1.3, posteriors/sgmcmc/sgld.py (read from site-packages), with its gradient-noise
# coefficient beta_pos = 0 (default):
#     theta <- theta + eps * grad log p(theta) + sqrt(T * eps * (2 - T * eps * beta_pos)) * xi
#            = theta + eps * grad log p(theta) + sqrt(2 eps T) * xi,
# whose stationary law (the Langevin SDE d theta = grad log p dt + sqrt(2T) dW) is
# p_T ∝ exp(log p(theta) / T). Ours (THEORY §1, langevin_lora.core.functional.langevin_step_):
#     theta <- theta - eta * (g + lam * theta) + sqrt(2 eta / beta) * xi,   g = grad of the MEAN loss,
# stationary law exp(-beta U), U = L_mean + (lam/2)|theta|^2.
# Matching drift and noise term by term:
#   * mean-scaled log posterior (posteriors' own recommended construction,
#     log p = mean log-likelihood + log prior / N):  log p := -U,  eps := eta,  T := 1/beta.
#     Drift: eps * grad(-U) = -eta (g + lam theta). Noise: sqrt(2 eps T) = sqrt(2 eta / beta).
#     Stationary: exp(-U / T) = exp(-beta U). For the Bayesian posterior (beta = N, prior N(0, s^2 I),
#     lam = 1/(N s^2)) this is exactly posteriors' "temperature = 1/N" with the mean-scaled log posterior.
#   * sum-scaled log posterior (log p := -N U, the usual sum log-likelihood + log prior):
#     eps := eta / N (drift eps * N grad U = eta grad U), and sqrt(2 eps T) = sqrt(2 eta / beta)
#     needs T := N / beta (T = 1 for the Bayesian posterior beta = N).
# Both give the *same* update; this benchmark uses the first (log p = -U, eps = eta, T = 1/beta),
# so posteriors' SGLD and LangevinSGD are the same Markov chain up to the random numbers.
# check_posteriors_convention() verifies it: a noise-free step (T = 0 vs temperature = 0) agrees to
# round-off, and on the quadratic both chains' stationary variances agree with each other and with
# the exact law of the discretised chain.
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensordict FutureWarnings on import
        import posteriors  # noqa: F401
        from posteriors.sgmcmc import sgld as posteriors_sgld
    POSTERIORS_VERSION = getattr(posteriors, "__version__", None)
except Exception:  # noqa: BLE001 - any import failure means "not available"
    posteriors_sgld = None
    POSTERIORS_VERSION = None

POSTERIORS_INSTALL = ("python -m pip install torch==2.13.0 posteriors==0.1.3 tensordict==0.15.3 "
                      "torchopt==0.7.3 optree==0.20.0")


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A potential :math:`U = \\hat L + \\tfrac\\lambda2|\\theta|^2` on vectorised chains.

    ``loss_fn(params) -> (C,)`` is the mean loss of every chain (params carry a leading chain
    dim); ``moment_fn`` maps params to ``(C, k)`` statistics named ``moment_names``, whose
    reference values are ``ref`` with standard errors ``ref_se``."""

    name: str
    shapes: list[tuple[int, ...]]
    loss_fn: Callable[[list[Tensor]], Tensor]
    lam: float
    beta: float
    h: float
    init: list[Tensor]
    mode: list[Tensor]
    moment_names: list[str]
    moment_fn: Callable[[list[Tensor]], Tensor]   # params -> (C, len(moment_names))
    ref: np.ndarray
    ref_se: np.ndarray
    warm_lr: float
    warm_steps: int
    chains: int
    trace_chains: int
    n_burn: int
    n_keep: int
    precond_adapt_steps: int = 300              # 'ours Adam + adapt': noisy steps measuring v
    lora: tuple[int, int] | None = None       # (fan_in, fan_out) when params are (A, B)
    exact_law: Callable | None = None           # (eta, G_flat or None) -> reference moments
    note: str = ""
    info: dict = field(default_factory=dict)

    def potential(self, params: list[Tensor]) -> Tensor:
        reg = sum(p.reshape(p.shape[0], -1).square().sum(1) for p in params)
        return self.loss_fn(params) + 0.5 * self.lam * reg

    def flat(self, params: list[Tensor]) -> Tensor:
        return torch.cat([p.detach().reshape(p.shape[0], -1) for p in params], 1)

    def unflat(self, x: Tensor) -> list[Tensor]:
        out, i = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(x[:, i:i + n].reshape(x.shape[0], *s))
            i += n
        return out

    def product(self, params: list[Tensor]) -> Tensor | None:
        if self.lora is None:
            return None
        A, B = params
        return (B.detach() @ A.detach()).reshape(A.shape[0], -1)

    def hessian_at_mode(self) -> np.ndarray:
        x0 = self.flat([m.unsqueeze(0) for m in self.mode])[0]
        H = torch.func.hessian(lambda x: self.potential(self.unflat(x.unsqueeze(0)))[0])(x0)
        return H.numpy()


def quadratic_target(scale: float) -> Target:
    d, N, lam, beta = 8, 64, 0.1, 10.0
    g = torch.Generator().manual_seed(1234)
    s = torch.logspace(0, 0.8, d, dtype=DTYPE)                 # column scales 1 .. 6.3
    X = torch.randn(N, d, generator=g, dtype=DTYPE) * s
    theta_star = torch.randn(d, generator=g, dtype=DTYPE) / s
    y = X @ theta_star + 0.3 * torch.randn(N, generator=g, dtype=DTYPE)
    quad = Quadratic(X.numpy(), y.numpy(), lam)        # THEORY §5(i): its Gibbs law and exact chain laws
    K, mu, cov = quad.K, quad.mean, quad.gibbs_cov(beta)
    mu_t = torch.from_numpy(mu)

    def loss_fn(params):
        (th,) = params
        return 0.5 * (th @ X.T - y).square().mean(1)

    def law(eta, G=None):
        """Exact stationary law of theta' = theta - eta G (K theta - b) + sqrt(2 eta/beta) G^1/2 xi."""
        _, S = quad.preconditioned_law(eta, beta, np.ones(d) if G is None else G)
        return np.concatenate([mu, np.diag(S)])

    names = [f"E th{i}" for i in range(d)] + [f"Var th{i}" for i in range(d)]
    ev = np.linalg.eigvalsh(K)
    return Target(
        name="quadratic", shapes=[(d,)], loss_fn=loss_fn, lam=lam, beta=beta, h=0.05,
        init=[torch.zeros(d, dtype=DTYPE)], mode=[mu_t], moment_names=names,
        moment_fn=lambda q: torch.cat([q[0], (q[0] - mu_t).square()], 1),
        ref=np.concatenate([mu, np.diag(cov)]), ref_se=np.zeros(2 * d), warm_lr=0.05, warm_steps=300,
        chains=256, trace_chains=64, n_burn=int(5000 * scale), n_keep=int(14000 * scale), exact_law=law,
        note=f"d={d}, N={N}, lambda={lam}, beta={beta}, cond(K)={ev.max() / ev.min():.0f}",
        info={"K": K})


def lora_target(n_in: int, scale: float) -> Target:
    """A is (1, n_in), B is (1, 1); w has n_in entries."""
    lam, beta = 0.5, 4.0
    w_np = np.array([1.0, 0.5][:n_in]) if n_in <= 2 else np.ones(n_in)
    w = torch.tensor(w_np, dtype=DTYPE).reshape(1, n_in)

    def loss_fn(params):
        A, B = params
        return (w - B @ A).square().sum((1, 2))

    # reference moments by quadrature on a grid (rectangle rule on a smooth, rapidly decaying density)
    a, bb, U, p = lora_posterior_grid(w_np, lam, beta, np.linspace(-5.5, 5.5, 401 if n_in == 1 else 161))
    a_sq = sum(ai ** 2 for ai in a)
    if n_in == 1:
        names = ["E a^2", "E ab", "E (ab)^2", "E a^4", "P(a>0)", "E U"]
        grid_stats = [a_sq, bb * a[0], (bb * a[0]) ** 2, a[0] ** 4, (a[0] > 0) + 0.5 * (a[0] == 0), U]

        def stats(q):
            av, bv = q[0][:, 0, 0], q[1][:, 0, 0]
            return torch.stack([av ** 2, av * bv, (av * bv) ** 2, av ** 4, (av > 0).to(DTYPE),
                                _potential(q)], 1)
    else:
        names = (["E |a|^2-b^2"] + [f"E b a{i}" for i in range(n_in)] + [f"E a{i}^2" for i in range(n_in)]
                 + ["E b^2", "P(b>0)", "E U"])
        grid_stats = ([a_sq - bb ** 2] + [bb * a[i] for i in range(n_in)] + [a[i] ** 2 for i in range(n_in)]
                      + [bb ** 2, (bb > 0) + 0.5 * (bb == 0), U])

        def stats(q):
            av, bv = q[0][:, 0, :], q[1][:, 0, :]
            return torch.cat([av.square().sum(1, keepdim=True) - bv.square(), bv * av, av.square(), bv.square(),
                              (bv > 0).to(DTYPE), _potential(q)[:, None]], 1)
    ref = np.array([float((p * f).sum()) for f in grid_stats])

    def _potential(q):
        return loss_fn(q) + 0.5 * lam * (q[0].square().sum((1, 2)) + q[1].square().sum((1, 2)))

    if n_in == 1:  # cross-check against THEORY §5(ii) ground truth
        ours = {"E a^2": "a2", "E ab": "ab", "E (ab)^2": "ab_sq", "E a^4": "a4", "E U": "U"}
        err = max(abs(ref[names.index(k)] - RANK1_GROUND_TRUTH[v]) for k, v in ours.items())
        if err > 5e-5:
            raise RuntimeError(f"rank-1 quadrature disagrees with THEORY §5(ii) by {err:.2e}")
    elif abs(ref[0] - 1 / (beta * lam)) > 1e-4:
        raise RuntimeError(f"1x2 quadrature E[|a|^2-b^2] = {ref[0]:.5f}, expected {1 / (beta * lam)}")
    m = math.sqrt(max(np.linalg.norm(w_np) - lam / 2, 1e-3))    # a balanced mode: b a = w (1 - lam/(2|w|))...
    u_dir = w_np / np.linalg.norm(w_np)
    A_mode = torch.tensor(m * u_dir, dtype=DTYPE).reshape(1, n_in)
    B_mode = torch.tensor([[m]], dtype=DTYPE)
    tgt = Target(
        name="lora-rank1" if n_in == 1 else f"lora-1x{n_in}", shapes=[(1, n_in), (1, 1)], loss_fn=loss_fn,
        lam=lam, beta=beta, h=0.015, init=[torch.full((1, n_in), 0.5, dtype=DTYPE), torch.zeros(1, 1, dtype=DTYPE)],
        mode=[A_mode, B_mode], moment_names=names, moment_fn=stats, ref=ref, ref_se=np.zeros(len(ref)), warm_lr=0.01,
        warm_steps=200, chains=500, trace_chains=128, n_burn=int(1500 * scale), n_keep=int(6000 * scale),
        lora=(n_in, 1), note=f"w={w_np.tolist()}, lambda={lam}, beta={beta}, init A=0.5, B=0")
    return tgt


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    X = np.hstack([np.ones((len(y), 1)), X])
    return torch.from_numpy(X).to(DTYPE), torch.from_numpy(y).to(DTYPE)


def _logreg_map(X, y, lam, iters=50):
    th = torch.zeros(X.shape[1], dtype=DTYPE)
    N = len(y)
    for _ in range(iters):
        p = torch.sigmoid(X @ th)
        g = X.T @ (p - y) / N + lam * th
        H = (X.T * (p * (1 - p))) @ X / N + lam * torch.eye(X.shape[1], dtype=DTYPE)
        th = th - torch.linalg.solve(H, g)
    return th, H


def mala_reference(X, y, lam, beta, *, chains: int, n_burn: int, n_keep: int, step: float = 0.85, seed: int = 7):
    r"""Exact reference for the logistic posterior: MALA with the Laplace covariance
    :math:`\Sigma = (\beta H_{MAP})^{-1}` as metric, proposal
    :math:`\theta' = \theta + \tfrac{\epsilon^2}{2}\Sigma\nabla\log\pi(\theta) + \epsilon L\xi`,
    Metropolis-Hastings accept/reject (so the chain is exact whatever :math:`\epsilon`). Returns
    per-chain time averages of :math:`\theta` and :math:`\theta^2`, and the acceptance rate."""
    gen = torch.Generator().manual_seed(seed)
    N = len(y)
    th_map, H = _logreg_map(X, y, lam)
    Sigma = torch.linalg.inv(beta * H)
    L = torch.linalg.cholesky(Sigma)
    d = X.shape[1]

    def logpi_grad(th):
        z = th @ X.T
        ll = (y * z - torch.nn.functional.softplus(z)).sum(1)              # sum log-likelihood
        lp = ll * (beta / N) - 0.5 * beta * lam * th.square().sum(1)       # -beta U
        g = ((y - torch.sigmoid(z)) @ X) * (beta / N) - beta * lam * th
        return lp, g

    def logq(to, frm, g_frm):  # log N(to; frm + eps^2/2 Sigma g, eps^2 Sigma), up to a constant
        mean = frm + 0.5 * step ** 2 * g_frm @ Sigma
        r = torch.linalg.solve_triangular(L, (to - mean).T, upper=False).T
        return -0.5 * r.square().sum(1) / step ** 2

    th = th_map + torch.randn(chains, d, generator=gen, dtype=DTYPE) @ L.T
    lp, g = logpi_grad(th)
    s1 = torch.zeros(chains, d, dtype=DTYPE)
    s2 = torch.zeros(chains, d, dtype=DTYPE)
    acc = 0.0
    for t in range(n_burn + n_keep):
        prop = th + 0.5 * step ** 2 * g @ Sigma + step * torch.randn(chains, d, generator=gen, dtype=DTYPE) @ L.T
        lp2, g2 = logpi_grad(prop)
        log_alpha = lp2 - lp + logq(th, prop, g2) - logq(prop, th, g)
        ok = torch.rand(chains, generator=gen, dtype=DTYPE).log() < log_alpha
        th = torch.where(ok[:, None], prop, th)
        lp = torch.where(ok, lp2, lp)
        g = torch.where(ok[:, None], g2, g)
        if t >= n_burn:
            s1 += th
            s2 += th.square()
            acc += float(ok.to(DTYPE).mean())
    return s1 / n_keep, s2 / n_keep, acc / n_keep, th_map


def logreg_target(scale: float) -> Target:
    X, y = _breast_cancer()
    N, d = X.shape
    sigma_p = 1.0
    lam, beta = weight_decay_from_prior_std(sigma_p, N), float(N)
    mala_chains = 128 if scale >= 0.5 else 32
    m1, m2, acc, th_map = mala_reference(X, y, lam, beta, chains=mala_chains, n_burn=int(300 * max(scale, 0.2)),
                                         n_keep=int(3000 * scale) + 100)
    mean = m1.mean(0)
    # E (theta - mean)^2 per chain: m2 - 2 mean m1 + mean^2 (mean fixed from all chains)
    var_c = m2 - 2 * mean * m1 + mean.square()
    ref = torch.cat([mean, var_c.mean(0)]).numpy()
    se = torch.cat([m1.std(0), var_c.std(0)]).numpy() / math.sqrt(mala_chains)
    mean_t = mean.clone()

    def loss_fn(params):
        (th,) = params
        z = th @ X.T
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none").mean(1)

    names = [f"E th{i}" for i in range(d)] + [f"Var th{i}" for i in range(d)]
    return Target(
        name="logreg", shapes=[(d,)], loss_fn=loss_fn, lam=lam, beta=beta, h=0.05,
        init=[torch.zeros(d, dtype=DTYPE)], mode=[th_map], moment_names=names,
        moment_fn=lambda q: torch.cat([q[0], (q[0] - mean_t).square()], 1), ref=ref, ref_se=se,
        warm_lr=0.01, warm_steps=300, chains=32, trace_chains=32, n_burn=int(5000 * scale),
        n_keep=int(10000 * scale),
        note=(f"breast_cancer N={N}, d={d} (30 standardised features + intercept), prior N(0,1): "
              f"beta=N, lambda=1/N; reference MALA (Laplace metric) {mala_chains} chains x "
              f"{int(3000 * scale) + 100} kept steps, acceptance {acc:.2f}"))


# ---------------------------------------------------------------------------------------------
# samplers: each returns (params, step_fn, info)
# ---------------------------------------------------------------------------------------------
def _batched_init(target: Target, C: int) -> list[nn.Parameter]:
    return [nn.Parameter(x.unsqueeze(0).repeat(C, *([1] * x.dim())).clone()) for x in target.init]


def _backward(target: Target, params: list[Tensor]) -> None:
    for p in params:
        p.grad = None
    target.loss_fn(params).sum().backward()   # per chain: the gradient of that chain's mean loss


def _gauge(target: Target, params, seed: int):
    if not target.lora:
        return None
    moves = GaugeMoves(every_n_steps=1, orthogonal=True, gl_step=1.0, seed=seed + 99)
    A, B = params

    def apply(opt):
        moves([(A, B)], beta=target.beta, weight_decay=target.lam)
    apply.moves = moves
    return apply


def make_ours_sgd(target: Target, eta: float, seed: int, gauge: bool = False):
    params = _batched_init(target, target.chains)
    opt = LangevinSGD(params, lr=eta, beta=target.beta, weight_decay=target.lam, seed=seed, guard=False)
    move = _gauge(target, params, seed) if gauge else None

    def step():
        _backward(target, params)
        opt.step()
        if move is not None:
            move(opt)
    return params, step, {"eta": eta, "gauge": move}


def make_ours_adam(target: Target, h: float, H: np.ndarray, seed: int, gauge: bool = False, adapt: bool = False):
    """Adam warm-up (noise-free, coupled decay) for ``warm_steps`` steps, then the frozen G (re-frozen
    after ``target.precond_adapt_steps`` noisy steps with ``adapt``); the step size is set, and re-set when G
    changes, so that eta * lambda_max(G^1/2 H G^1/2) = h (same h as SGLD) for every chain."""
    params = _batched_init(target, target.chains)
    opt = LangevinAdam(params, lr=target.warm_lr, beta=target.beta, weight_decay=target.lam,
                       burn_in_steps=target.warm_steps, precond_adapt_steps=target.precond_adapt_steps if adapt else 0, seed=seed,
                       friction=None, prior_centre=None, step_size="lr", guard=False)   # the sampler compared
    move = _gauge(target, params, seed) if gauge else None
    info: dict = {"eta": None, "gauge": move}
    phase = ["warm-up"]

    def retune():
        # The chain depends on eta and G only through eta*G, so each chain's own step size is set by
        # scaling its G: eta * lambda_max(G_c^1/2 H G_c^1/2) = h for every chain c (one tuning per
        # chain, as a user of one chain would do); with a G common to all chains this is a no-op.
        G = torch.cat([opt.state[p]["precond"].reshape(target.chains, -1) for p in params], 1).numpy()
        lam = np.empty(target.chains)
        for c, Gc in enumerate(G):
            s = np.sqrt(Gc)
            lam[c] = float(np.linalg.eigvalsh(s[:, None] * H * s[None, :]).max())
        eta = h / float(np.median(lam))
        scale = torch.as_tensor(np.median(lam) / lam, dtype=DTYPE)
        for p in params:
            st = opt.state[p]
            shape = (target.chains,) + (1,) * (p.dim() - 1)
            st["precond"].mul_(scale.view(shape))
            st["precond_sqrt"] = st["precond"].sqrt()
        for group in opt.param_groups:
            group["lr"] = eta
        G = torch.cat([opt.state[p]["precond"].reshape(target.chains, -1) for p in params], 1).numpy()
        info.update(eta=eta, G=G[0], G_distinct=len(np.unique(G, axis=0)))

    def step():
        _backward(target, params)
        opt.step()
        now = "warm-up" if not opt.sampling else "adapting" if opt.adapting else "sampling"
        if now != phase[0]:
            phase[0] = now
            retune()
        if now != "warm-up" and move is not None:   # gauge moves only while sampling
            move(opt)
    return params, step, info


def make_posteriors_sgld(target: Target, eta: float, seed: int):
    """posteriors' SGLD with log p = -U (mean-scaled), lr = eta, temperature = 1/beta (see the
    conversion at the top of this file). Its noise comes from the global RNG (torch.randn_like)."""
    params = [p.detach() for p in _batched_init(target, target.chains)]
    names = [f"p{i}" for i in range(len(params))]

    def log_post(tree, batch):
        return -target.potential([tree[k] for k in names]).sum(), torch.zeros(())

    transform = posteriors_sgld.build(log_post, lr=eta, temperature=1.0 / target.beta)
    state = transform.init({k: p for k, p in zip(names, params)})
    live = [state.params[k] for k in names]

    def step():
        transform.update(state, None, inplace=True)
    torch.manual_seed(seed)
    return live, step, {"eta": eta, "gauge": None}


# ---------------------------------------------------------------------------------------------
# running and measuring
# ---------------------------------------------------------------------------------------------
def run(target: Target, params: list[Tensor], step: Callable[[], None], info: dict, *, label: str,
        time_steps: int) -> dict:
    C, Ct = target.chains, target.trace_chains
    n_burn, n_keep = target.n_burn, target.n_keep
    sums = torch.zeros(C, len(target.moment_names), dtype=DTYPE)
    dim = sum(math.prod(s) for s in target.shapes)
    trace = torch.empty(Ct, n_keep, dim, dtype=torch.float32)
    nw = math.prod(target.lora) if target.lora else 0
    wtrace = torch.empty(Ct, n_keep, nw, dtype=torch.float32) if nw else None
    utrace = torch.empty(Ct, n_keep, dtype=DTYPE)
    t0 = time.perf_counter()
    for t in range(n_burn + n_keep):
        step()
        if t < n_burn:
            continue
        k = t - n_burn
        with torch.no_grad():
            q = [p.detach() for p in params]
            sums += target.moment_fn(q)
            trace[:, k] = target.flat(q)[:Ct]
            if wtrace is not None:
                wtrace[:, k] = target.product(q)[:Ct]
            utrace[:, k] = target.potential([x[:Ct] for x in q])
    loop_s = time.perf_counter() - t0
    if not all(torch.isfinite(p).all() for p in params):
        raise FloatingPointError(f"{target.name}/{label}: chain diverged")
    sec_per_step = time_per_call(step, number=max(time_steps // 5, 1), repeats=5, warmup=max(time_steps // 10, 1))
    grads = n_burn + n_keep
    ess_theta = effective_sample_size(trace.numpy())
    ess_u = effective_sample_size(utrace.numpy())[0]
    ess_w = effective_sample_size(wtrace.numpy()) if wtrace is not None else None
    per_chain = (sums / n_keep).numpy()
    est = per_chain.mean(0)
    se = per_chain.std(0, ddof=1) / math.sqrt(C)
    z = (est - target.ref) / np.sqrt(se ** 2 + target.ref_se ** 2)
    out = {"label": label, "eta": info["eta"], "grads": grads, "ess_theta_min": float(ess_theta.min()) / (Ct * grads),
           "ess_u": float(ess_u) / (Ct * grads), "ess_w_min": None if ess_w is None else float(ess_w.min()) / (Ct * grads),
           "z": z, "est": est, "se": se, "per_chain": per_chain, "sec_per_step": sec_per_step, "loop_s": loop_s,
           "info": info, "argmin_theta": int(ess_theta.argmin()),
           "worst": target.moment_names[int(np.abs(z).argmax())]}
    if target.exact_law is not None and info.get("G_distinct", 1) == 1:   # one chain law for all chains
        G = info.get("G")
        ref_exact = target.exact_law(info["eta"], G)
        out["z_exact"] = (est - ref_exact) / se
        # predicted O(h) bias of the discretised chain against pi_beta, relative, worst moment
        out["pred_bias"] = float(np.max(np.abs(ref_exact - target.ref) / np.maximum(np.abs(target.ref), 1e-12)))
        out["pred_bias_z"] = float(np.max(np.abs(ref_exact - target.ref) / se))
    if info.get("gauge") is not None and info["gauge"].moves.gl_step > 0:
        out["gl_acceptance"] = info["gauge"].moves.acceptance_rate
    return out


def check_posteriors_convention(target: Target, eta: float, seed: int = 0, steps: int = 200) -> dict:
    """Check the conversion (log p = -U, lr = eta, temperature = 1/beta) on ``target``:

    * ``noise_free``: max |difference| after ``steps`` noise-free steps (posteriors temperature 0,
      LangevinSGD temperature 0) from the same random start;
    * ``same_noise``: max |difference| after ``steps`` noisy steps when both draw the same normal
      numbers (LangevinSGD's generator seeded with ``seed``; posteriors uses the global RNG, seeded
      with the same ``seed``; both draw one ``randn`` of the parameter's size per step for a
      single-tensor target), i.e. the two are the same Markov chain, noise scale included.
    The stationary-moment comparison on independent noise is done by the main benchmark."""
    if len(target.shapes) != 1:
        raise ValueError("check_posteriors_convention needs a single-tensor target")
    x0 = _batched_init(target, 4)[0].detach()
    x0 = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    out = {}
    for key, temp in (("noise_free", 0.0), ("same_noise", 1.0)):
        ours = [nn.Parameter(x0.clone())]
        opt = LangevinSGD(ours, lr=eta, beta=target.beta, temperature=temp, weight_decay=target.lam, seed=seed, guard=False)

        def log_post(tree, batch):
            return -target.potential([tree["p0"]]).sum(), torch.zeros(())

        tr = posteriors_sgld.build(log_post, lr=eta, temperature=temp / target.beta)
        state = tr.init({"p0": x0.clone()})
        torch.manual_seed(seed)
        for _ in range(steps):
            _backward(target, ours)
            opt.step()
            tr.update(state, None, inplace=True)
        out[key] = float((ours[0].detach() - state.params["p0"]).abs().max())
        out[key + "_moved"] = float((ours[0].detach() - x0).abs().max())
    return out


def bench_target(target: Target, *, seed: int, time_steps: int, log=print) -> list[dict]:
    H = target.hessian_at_mode()
    lmax = float(np.linalg.eigvalsh(H).max())
    eta = target.h / lmax
    log(f"\n[{target.name}] {target.note}")
    log(f"  h = eta*lambda_max = {target.h}, lambda_max(H at mode) = {lmax:.4g}, eta(SGLD) = {eta:.4g}; "
        f"{target.chains} chains ({target.trace_chains} traced), {target.n_burn} burn-in + {target.n_keep} kept steps")
    specs: list[tuple[str, Callable]] = [
        ("ours SGLD", lambda: make_ours_sgd(target, eta, seed)),
        ("ours Adam-precond", lambda: make_ours_adam(target, target.h, H, seed)),
        ("ours Adam + adapt", lambda: make_ours_adam(target, target.h, H, seed, adapt=True)),
    ]
    if target.lora:
        if GaugeMoves is not None:
            specs += [("ours SGLD + gauge", lambda: make_ours_sgd(target, eta, seed, gauge=True)),
                      ("ours Adam + gauge", lambda: make_ours_adam(target, target.h, H, seed, gauge=True))]
        else:
            log("  gauge moves: not available (langevin_lora.lora.gauge missing)")
    if posteriors_sgld is not None:
        specs.append(("posteriors SGLD", lambda: make_posteriors_sgld(target, eta, seed + 1)))
    else:
        log(f"  posteriors: not installed; install the benchmark extra: {POSTERIORS_INSTALL}")
    results = []
    for label, make in specs:
        params, step, info = make()
        r = run(target, params, step, info, label=label, time_steps=time_steps)
        r["target"] = target.name
        results.append(r)
        extra = f", GL acceptance {r['gl_acceptance']:.2f}" if "gl_acceptance" in r else ""
        if label.startswith("ours Adam"):
            G = info["G"]
            extra += f", G range [{G.min():.3g}, {G.max():.3g}] (distinct across chains: {info['G_distinct']})"
        log(f"  {label:20s} eta={r['eta']:.4g} loop {r['loop_s']:.1f}s{extra}")
    return results


def _fmt(x, nd=3):
    if x is None:
        return "—"
    if isinstance(x, float) and (x == 0 or abs(x) >= 1e-2):
        return f"{x:.{nd}f}"
    return f"{x:.{nd - 1}e}"


def summarise(results: list[dict]) -> tuple[list[str], list[list]]:
    header = ["target", "sampler", "eta", "grads/chain", "ESS/grad min θ", "ESS/grad W", "ESS/grad U",
              "× post. (min θ)", "× post. (U)", "max |z| vs π (worst moment)", "max |z| vs exact chain law",
              "µs/step",
              "time × post."]
    rows = []
    by_target: dict[str, list[dict]] = {}
    for r in results:
        by_target.setdefault(r["target"], []).append(r)
    for name, rs in by_target.items():
        base = next((r for r in rs if r["label"] == "posteriors SGLD"), None)
        for r in rs:
            rows.append([
                name, r["label"], f"{r['eta']:.4g}", r["grads"], _fmt(r["ess_theta_min"]), _fmt(r["ess_w_min"]),
                _fmt(r["ess_u"]),
                f"{r['ess_theta_min'] / base['ess_theta_min']:.2f}" if base else "—",
                f"{r['ess_u'] / base['ess_u']:.2f}" if base else "—",
                f"{np.abs(r['z']).max():.2f} ({r['worst']})",
                f"{np.abs(r['z_exact']).max():.2f}" if "z_exact" in r else "—",
                f"{1e6 * r['sec_per_step']:.0f}",
                f"{r['sec_per_step'] / base['sec_per_step']:.2f}" if base else "—",
            ])
    return header, rows


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
TARGETS = {"quadratic": quadratic_target, "lora-rank1": lambda s: lora_target(1, s),
           "lora-1x2": lambda s: lora_target(2, s), "logreg": logreg_target}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(ap, quick_help="about 10x fewer steps (about 30 s)")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    add_results_arguments(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    scale = 0.02 if args.smoke else 0.08 if args.quick else 1.0
    t_start = time.perf_counter()
    machine = machine_record()
    print(machine_markdown(machine))
    print(f"ESS estimator: {ESS_BACKEND}; posteriors: {POSTERIORS_VERSION or 'not installed'}; "
          f"gauge moves: {'available' if GaugeMoves is not None else 'not available'}")
    targets = []
    for name in args.targets:
        t = TARGETS[name](scale)
        if args.smoke:
            t.chains, t.trace_chains = min(t.chains, 64), min(t.trace_chains, 16)
            t.warm_steps = min(t.warm_steps, 50)
        elif args.quick:
            t.chains, t.trace_chains = min(t.chains, 256), min(t.trace_chains, 32)
            t.warm_steps = min(t.warm_steps, 150)
        t.precond_adapt_steps = min(t.precond_adapt_steps, 50) if args.smoke else t.precond_adapt_steps
        t.n_burn = max(t.n_burn, t.warm_steps + t.precond_adapt_steps + 10)
        targets.append(t)
    time_steps = 50 if args.smoke else 150 if args.quick else 300
    results: list[dict] = []
    conv_lines = []
    for t in targets:
        if posteriors_sgld is not None and t.name == "quadratic":
            eta = t.h / float(np.linalg.eigvalsh(t.hessian_at_mode()).max())
            chk = check_posteriors_convention(t, eta)
            conv_lines.append(
                f"posteriors convention check on the quadratic (log p = -U, lr = eta, temperature = 1/beta), "
                f"200 steps from one start: noise-free max |diff| {chk['noise_free']:.1e} "
                f"(moved {chk['noise_free_moved']:.2f}); with the same normal draws max |diff| "
                f"{chk['same_noise']:.1e} (moved {chk['same_noise_moved']:.2f}): the same Markov chain. "
                f"The benchmark rows use independent noise (posteriors seeded with seed+1).")
            print(conv_lines[-1])
        res = bench_target(t, seed=args.seed, time_steps=time_steps)
        results += res
        ours = next(r for r in res if r["label"] == "ours SGLD")
        post = next((r for r in res if r["label"] == "posteriors SGLD"), None)
        if post is not None:
            # stationary moments of the two (identical-in-law) chains must agree
            dz = (ours["est"] - post["est"]) / np.sqrt(ours["se"] ** 2 + post["se"] ** 2)
            var_keys = [i for i, k in enumerate(t.moment_names) if k.startswith("Var") or "^2" in k]
            ratio = (post["est"][var_keys] / ours["est"][var_keys]) if var_keys else np.array([np.nan])
            conv_lines.append(f"{t.name}: ours SGLD vs posteriors SGLD stationary moments, max |z| = "
                              f"{np.abs(dz).max():.2f}; second-moment ratio posteriors/ours in "
                              f"[{ratio.min():.3f}, {ratio.max():.3f}]")
            print("  " + conv_lines[-1])
    header, rows = summarise(results)
    table = markdown_table(header, rows)
    total = time.perf_counter() - t_start
    print("\n" + table)
    notes = [
        f"Mode: {'smoke' if args.smoke else 'quick' if args.quick else 'full'}; total {total:.0f} s; "
        f"torch threads 1; ESS: {ESS_BACKEND}.",
        "ESS/grad = multi-chain ESS (Geyer initial sequence) / (traced chains x all gradient evaluations "
        "per chain: warm-up + burn-in + kept). '× post.' = ratio to posteriors' SGLD measured in this run. "
        "'max |z| vs π': largest |error|/SE over the reference moments of π_β (Gibbs / quadrature / MALA); "
        "'vs exact chain law': against the exact stationary law of the discretised chain (quadratic only).",
        "Same step size: SGLD rows share eta = h/λmax(∇²U at the mode); the preconditioned rows use the same "
        "h = eta·λmax(G^½ ∇²U G^½) after the Adam warm-up (warm-up gradients counted), re-tuned after "
        "adaptation in the '+ adapt' row (its adaptation steps are burn-in, counted as gradients).",
    ] + [f"Target {t.name}: {t.note}" for t in targets] + conv_lines
    for r in results:
        if "pred_bias" in r:
            notes.append(f"{r['target']} / {r['label']}: exact discretisation bias of the chain vs π_β (THEORY §5(i)): "
                         f"at most {100 * r['pred_bias']:.1f}% of a moment, i.e. up to {r['pred_bias_z']:.1f} SE here; "
                         f"so '|z| vs π' includes this predicted O(h) bias, '|z| vs exact chain law' does not.")
    if GaugeMoves is None:
        notes.append("gauge moves: not available (langevin_lora.lora.gauge missing) — rows 'ours SGLD + gauge' / "
                     "'ours Adam + gauge' go here.")
    print("\n".join(notes))
    if args.append_results:
        cmd = "python -m benchmarks.bench_sampler" + (" --quick" if args.quick else " --smoke" if args.smoke else "")
        path = append_results("Sampler efficiency (bench_sampler.py)", table, cmd,
                              notes="\n".join(f"- {n}" for n in notes), machine=machine, path=args.results)
        print(f"appended to {path}")
    return results


if __name__ == "__main__":
    main()
