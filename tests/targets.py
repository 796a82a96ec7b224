r"""Exactly solvable targets of THEORY §5, vectorised over chains, and the z-test used on them.

Every sampler test here runs ``C`` independent chains at once: the parameter tensors carry a
leading chain dimension (``(C, d)``, ``(C, r, in)``, ...), one project optimizer steps all of
them, and the gradient written to ``.grad`` is, per chain, the gradient of that chain's **mean**
loss (the optimizer adds the coupled weight decay :math:`\lambda\theta` itself). A statistic is
estimated by its per-chain time average :math:`\bar f_c`; chains are independent, so

.. math::
    z = \frac{\tfrac1C\sum_c \bar f_c - f^\star}{\operatorname{sd}_c(\bar f_c)/\sqrt C}

is asymptotically standard normal whatever the autocorrelation inside a chain (THEORY §5).

Contents:

* :func:`zscores` and :func:`run_chains` (time averages of any statistics along the chains);
* :func:`linear_chain_law`: the exact stationary mean and covariance of a linear Gaussian
  recursion :math:`\theta' = M\theta + c + \varepsilon`, :math:`\operatorname{Cov}\varepsilon = Q`
  (discrete Lyapunov equation) — the exact law of ULA/SGLD on a quadratic, with or without a
  frozen diagonal preconditioner, with minibatch noise, or with decoupled decay;
* :class:`Quadratic` and :class:`BlockQuadratic` (target (i), full batch and minibatch);
* :func:`lora_loss`, :func:`lora_grads`, :func:`lora_quadrature_moments` and
  :data:`RANK1_GROUND_TRUTH` (target (ii));
* :func:`attention_h`, :func:`attention_loss`, :func:`attention_loss_and_grad`,
  :func:`attention_potential` and
  :func:`attention_sample_posterior` (target (iii); ground truth in
  ``tests/data/attention_ground_truth.json`` from ``benchmarks/attention_quadrature.py``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parent / "data"

# ---------------------------------------------------------------------------------------------
# z-test and chain runner
# ---------------------------------------------------------------------------------------------


def zscores(per_chain: Tensor | np.ndarray, truth: Tensor | np.ndarray | float) -> np.ndarray:
    r"""z-scores of per-chain time averages against the exact value.

    Args:
        per_chain: array of shape ``(C, ...)``: one time average per chain (leading dimension)
            for every entry of the statistic.
        truth: exact value, broadcastable to ``per_chain.shape[1:]``.

    Returns:
        ``(mean_c - truth) / (sd_c / sqrt(C))`` with shape ``per_chain.shape[1:]`` (``sd_c`` with
        ``ddof=1``). An entry whose chains all agree exactly gets ``z = 0`` if it equals the
        truth and ``inf`` otherwise.
    """
    x = per_chain.detach().cpu().double().numpy() if isinstance(per_chain, Tensor) else np.asarray(per_chain, float)
    t = truth.detach().cpu().double().numpy() if isinstance(truth, Tensor) else np.asarray(truth, float)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"Invalid per_chain: need a leading chain dimension of size >= 2, got shape {x.shape}")
    c = x.shape[0]
    mean = x.mean(0)
    se = x.std(0, ddof=1) / math.sqrt(c)
    diff = mean - t
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf))
    return z


def run_chains(optimizer: torch.optim.Optimizer, set_grads: Callable[[], None],
               stats: Callable[[], Mapping[str, Tensor]], n_steps: int, burn_in: int = 0,
               every: int = 1) -> dict[str, Tensor]:
    """Step ``optimizer`` ``burn_in + n_steps`` times and return per-chain time averages.

    ``set_grads()`` writes the per-chain mean-loss gradients into ``.grad`` at the current
    parameters; ``stats()`` returns per-chain statistics (tensors with a leading chain
    dimension), averaged over every ``every``-th of the ``n_steps`` post-burn-in states
    (subsampling a chain leaves its time average unbiased).
    """
    if n_steps < every or burn_in < 0 or every < 1:
        raise ValueError(f"Invalid n_steps/burn_in/every: {n_steps}/{burn_in}/{every} "
                         "(need every >= 1, n_steps >= every, burn_in >= 0)")
    sums: dict[str, Tensor] = {}
    count = 0
    for step in range(1, burn_in + n_steps + 1):
        set_grads()
        optimizer.step()
        if step > burn_in and (step - burn_in) % every == 0:
            with torch.no_grad():
                for name, value in stats().items():
                    if name in sums:
                        sums[name] += value
                    else:
                        sums[name] = value.double().clone()
            count += 1
    return {name: s / count for name, s in sums.items()}


# ---------------------------------------------------------------------------------------------
# Linear chains: exact laws on quadratics
# ---------------------------------------------------------------------------------------------


def linear_chain_law(M: np.ndarray, c: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Stationary mean and covariance of :math:`\theta' = M\theta + c + \varepsilon`, with
    :math:`E\varepsilon = 0`, :math:`\operatorname{Cov}\varepsilon = Q`, i.i.d. over steps:

    .. math::
        \mu = (I - M)^{-1} c, \qquad C = M C M^\top + Q .

    Requires the spectral radius of ``M`` below 1 (a stable step).
    """
    M, c, Q = np.asarray(M, float), np.asarray(c, float), np.asarray(Q, float)
    radius = max(abs(np.linalg.eigvals(M)))
    if radius >= 1:
        raise ValueError(f"Invalid M: spectral radius {radius:.4g} must be < 1 (unstable step)")
    mean = np.linalg.solve(np.eye(len(c)) - M, c)
    cov = scipy.linalg.solve_discrete_lyapunov(M, Q)
    return mean, 0.5 * (cov + cov.T)


class Quadratic:
    r"""Target (i): :math:`\hat L(\theta) = \lVert X\theta - y\rVert^2/(2N)`, prior
    :math:`\tfrac\lambda2\lVert\theta\rVert^2`.

    :math:`K = X^\top X/N + \lambda I`, :math:`b = X^\top y/N`; Gibbs law
    :math:`N(K^{-1}b, (\beta K)^{-1})`.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, lam: float) -> None:
        self.X, self.y, self.lam = np.asarray(X, float), np.asarray(y, float), float(lam)
        self.N, self.d = self.X.shape
        self.S = self.X.T @ self.X / self.N  # Hessian of the mean loss
        self.K = self.S + self.lam * np.eye(self.d)
        self.b = self.X.T @ self.y / self.N
        self._S_t = torch.from_numpy(self.S)
        self._b_t = torch.from_numpy(self.b)

    @property
    def mean(self) -> np.ndarray:
        return np.linalg.solve(self.K, self.b)

    def gibbs_cov(self, beta: float) -> np.ndarray:
        return np.linalg.inv(beta * self.K)

    def ula_cov(self, eta: float, beta: float) -> np.ndarray:
        r"""Exact full-batch ULA covariance :math:`\beta^{-1}[K(I - \eta K/2)]^{-1}`."""
        return np.linalg.inv(beta * self.K @ (np.eye(self.d) - 0.5 * eta * self.K))

    def preconditioned_law(self, eta: float, beta: float, G: np.ndarray,
                           decoupled: bool = False) -> tuple[np.ndarray, np.ndarray]:
        r"""Exact law of ULA with a frozen diagonal preconditioner ``G`` (shape ``(d,)``).

        Coupled decay (the project's update):
        :math:`\theta' = \theta - \eta G(S\theta - b + \lambda\theta) + \sqrt{2\eta/\beta}\sqrt G\xi`.
        Decoupled (AdamW-style) decay:
        :math:`\theta' = \theta - \eta\lambda\theta - \eta G(S\theta - b) + \sqrt{2\eta/\beta}\sqrt G\xi`,
        whose :math:`\eta \to 0` limit is :math:`N((S + \lambda G^{-1})^{-1}b, (\beta(S + \lambda G^{-1}))^{-1})`.
        """
        Gm = np.diag(np.asarray(G, float))
        I = np.eye(self.d)
        if decoupled:
            M = I - eta * self.lam * I - eta * Gm @ self.S
        else:
            M = I - eta * Gm @ self.K
        return linear_chain_law(M, eta * Gm @ self.b, (2 * eta / beta) * Gm)

    def grad(self, theta: Tensor) -> Tensor:
        """Per-chain gradient of the mean loss (no prior term), ``theta`` of shape ``(C, d)``."""
        return theta @ self._S_t.to(theta) - self._b_t.to(theta)


class BlockQuadratic:
    r"""Target (i) with exact minibatch noise.

    The ``N = M m`` examples form ``M`` minibatches that all share one design block ``X0``
    (``m x d``) with their own targets ``Y[j]``. A minibatch ``j`` drawn uniformly (independently
    per chain and per step) gives the gradient :math:`S\theta - b_j`, :math:`S = X_0^\top X_0/m`,
    :math:`b_j = X_0^\top Y_j/m`: the gradient noise :math:`\bar b - b_J` does not depend on
    :math:`\theta`, has mean 0 and covariance
    :math:`\Sigma = \tfrac1M\sum_j (b_j - \bar b)(b_j - \bar b)^\top`. SGLD is then the linear chain
    :math:`\theta' = (I - \eta K)\theta + \eta\bar b + \eta(b_J - \bar b) + \sqrt{2\eta/\beta}\xi`
    with exact law: mean :math:`K^{-1}\bar b`, covariance solving
    :math:`C = (I - \eta K)C(I - \eta K)^\top + \eta^2\Sigma + (2\eta/\beta)I`.
    """

    def __init__(self, X0: np.ndarray, Y: np.ndarray, lam: float) -> None:
        self.X0, self.Y, self.lam = np.asarray(X0, float), np.asarray(Y, float), float(lam)
        self.M, self.m = self.Y.shape
        self.d = self.X0.shape[1]
        self.S = self.X0.T @ self.X0 / self.m
        self.K = self.S + self.lam * np.eye(self.d)
        self.bj = self.Y @ self.X0 / self.m  # (M, d)
        self.b = self.bj.mean(0)
        dev = self.bj - self.b
        self.Sigma = dev.T @ dev / self.M
        self._S_t, self._bj_t = torch.from_numpy(self.S), torch.from_numpy(self.bj)

    def full(self) -> Quadratic:
        """The same data as one full batch (``N = M m`` rows)."""
        return Quadratic(np.tile(self.X0, (self.M, 1)), self.Y.reshape(-1), self.lam)

    def rho(self, eta: float, beta: float) -> float:
        r"""Minibatch-noise ratio :math:`\rho = \eta\beta\operatorname{tr}\Sigma/(2d)` (THEORY §3)."""
        return eta * beta * float(np.trace(self.Sigma)) / (2 * self.d)

    def sgld_law(self, eta: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
        M = np.eye(self.d) - eta * self.K
        return linear_chain_law(M, eta * self.b, eta ** 2 * self.Sigma + (2 * eta / beta) * np.eye(self.d))

    def grad(self, theta: Tensor, batch: Tensor) -> Tensor:
        """Minibatch gradient for chains ``theta (C, d)`` using block ``batch[c]`` in chain ``c``."""
        return theta @ self._S_t.to(theta) - self._bj_t.to(theta)[batch]


# ---------------------------------------------------------------------------------------------
# Target (ii): LoRA factorisations W = B A
# ---------------------------------------------------------------------------------------------

#: THEORY §5(ii) ground truth for U(a, b) = (w - b a)^2 + (lam/2)(a^2 + b^2), w=1, lam=0.5, beta=4.
RANK1_GROUND_TRUTH = {"a2": 0.87094, "ab": 0.65452, "ab_sq": 0.56178, "a4": 1.43272, "U": 0.68822, "P_a_pos": 0.5}


def lora_loss(A: Tensor, B: Tensor, w: Tensor) -> Tensor:
    r"""Per-chain :math:`\lVert w - BA\rVert_F^2`, ``A (C, r, in)``, ``B (C, out, r)``, ``w (out, in)``."""
    R = w - B @ A
    return (R * R).sum((-2, -1))


def lora_grads(A: Tensor, B: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\partial L/\partial A = -2B^\top R`, :math:`\partial L/\partial B = -2RA^\top`, :math:`R = w - BA`."""
    R = w - B @ A
    return -2 * B.transpose(-2, -1) @ R, -2 * R @ A.transpose(-2, -1)


def lora_gauge(A: Tensor, B: Tensor) -> Tensor:
    r"""The gauge matrix :math:`D = AA^\top - B^\top B` (``(C, r, r)``).

    THEORY §3: :math:`E_\pi D = \frac{in - out}{\beta\lambda}I`, relaxing at rate :math:`2\lambda`."""
    return A @ A.transpose(-2, -1) - B.transpose(-2, -1) @ B


def lora_gauge_source(A: Tensor, B: Tensor, w: Tensor) -> Tensor:
    r"""The :math:`O(\eta^2)` source term of the discrete gauge recursion, per chain (``(C, r, r)``).

    One SGLD step :math:`A' = (1-\eta\lambda)A - \eta B^\top\Gamma + \sigma\xi_A`,
    :math:`B' = (1-\eta\lambda)B - \eta\Gamma A^\top + \sigma\xi_B` on
    :math:`U = L(BA) + \tfrac\lambda2(\lVert A\rVert^2 + \lVert B\rVert^2)`, with
    :math:`\Gamma = \partial L/\partial W` and :math:`\sigma^2 = 2\eta/\beta`, gives exactly

    .. math::
        E[D' \mid A, B] = (1 - \eta\lambda)^2 D + \eta^2 \big(B^\top\Gamma\Gamma^\top B
        - A\Gamma^\top\Gamma A^\top\big) + \sigma^2 (in - out) I,

    since the first-order cross terms :math:`-\eta(1-\eta\lambda)(B^\top\Gamma A^\top + A\Gamma^\top B)`
    are the same in :math:`AA^\top` and :math:`B^\top B` and cancel. This returns
    :math:`B^\top\Gamma\Gamma^\top B - A\Gamma^\top\Gamma A^\top` for :math:`L = \lVert w - BA\rVert_F^2`.
    As :math:`\eta \to 0` the recursion becomes :math:`dE D/dt = -2\lambda E D + \tfrac2\beta(in-out)I`.
    """
    gamma = -2 * (w - B @ A)  # dL/dW, (C, out, in)
    bg = B.transpose(-2, -1) @ gamma  # (C, r, in)
    ga = gamma @ A.transpose(-2, -1)  # (C, out, r)
    return bg @ bg.transpose(-2, -1) - ga.transpose(-2, -1) @ ga


def lora_quadrature_moments(w: float = 1.0, lam: float = 0.5, beta: float = 4.0, half_width: float = 8.0,
                            spacing: float = 0.01) -> dict[str, float]:
    """Independent 2-D rectangle-rule moments of the rank-1 target (checks :data:`RANK1_GROUND_TRUTH`)."""
    g = np.arange(-round(half_width / spacing), round(half_width / spacing) + 1) * spacing
    a, b = np.meshgrid(g, g, indexing="ij")
    U = (w - b * a) ** 2 + 0.5 * lam * (a * a + b * b)
    p = np.exp(-beta * (U - U.min()))
    p /= p.sum()
    return {"a2": float((p * a * a).sum()), "ab": float((p * a * b).sum()), "ab_sq": float((p * (a * b) ** 2).sum()),
            "a4": float((p * a ** 4).sum()), "U": float((p * U).sum()),
            "P_a_pos": float((p * ((a > 0) + 0.5 * (a == 0))).sum())}


# ---------------------------------------------------------------------------------------------
# Target (iii): one tiny attention layer
# ---------------------------------------------------------------------------------------------


def attention_h(s: Tensor, x: Tensor) -> Tensor:
    r""":math:`h_i(s) = \sum_j \operatorname{softmax}_j(s\,x_{in}x_{ij})\,x_{ij}`.

    ``s`` of shape ``(C,)`` and ``x`` of shape ``(N, n)`` give ``(C, N)``."""
    logits = s[:, None, None] * (x[:, -1:] * x)[None]
    return (torch.softmax(logits, dim=-1) * x[None]).sum(-1)


def attention_loss(theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    r"""Per-chain mean loss :math:`\frac1N\sum_i \tfrac12(f_i - y_i)^2`, :math:`f_i = v\,h_i(qk)`.

    ``theta`` has shape ``(C, 3)``, columns ``(q, k, v)``."""
    q, k, v = theta.unbind(-1)
    f = v[:, None] * attention_h(q * k, x)
    return 0.5 * ((f - y) ** 2).mean(-1)


def attention_loss_and_grad(theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-chain mean loss and its gradient in one pass, by hand (checked against autograd in the tests).

    With :math:`c_{ij} = x_{in}x_{ij}`, :math:`p_{ij} = \operatorname{softmax}_j(s c_{ij})`, :math:`s = qk`:
    :math:`h_i = \sum_j p_{ij}x_{ij}`, :math:`h_i' = \sum_j p_{ij}c_{ij}x_{ij} - (\sum_j p_{ij}c_{ij})h_i`,
    :math:`r_i = v h_i - y_i`, and :math:`\partial_v L = \overline{r h}`,
    :math:`\partial_q L = k\, v\, \overline{r h'}`, :math:`\partial_k L = q\, v\, \overline{r h'}`.
    """
    q, k, v = theta.unbind(-1)
    c = x[:, -1:] * x  # (N, n)
    logits = (q * k)[:, None, None] * c[None]
    p = torch.softmax(logits, dim=-1)
    h = (p * x).sum(-1)
    mc = (p * c).sum(-1)
    dh = (p * c * x).sum(-1) - mc * h
    r = v[:, None] * h - y
    ds = v * (r * dh).mean(-1)
    grad = torch.stack([k * ds, q * ds, (r * h).mean(-1)], dim=-1)
    return 0.5 * (r * r).mean(-1), grad


def attention_potential(theta: Tensor, x: Tensor, y: Tensor, lam: float) -> Tensor:
    r""":math:`U = \hat L + \tfrac\lambda2\lVert\theta\rVert^2` per chain."""
    return attention_loss(theta, x, y) + 0.5 * lam * (theta * theta).sum(-1)


def load_attention_ground_truth() -> dict:
    """The JSON written by ``benchmarks/attention_quadrature.py`` (data, parameters, moments)."""
    return json.loads((DATA_DIR / "attention_ground_truth.json").read_text())


def attention_sample_posterior(x: Tensor, y: Tensor, lam: float, beta: float, n: int, generator: torch.Generator,
                               half_width: float = 4.0, spacing: float = 0.02) -> Tensor:
    r"""Draws ``(n, 3)`` from the grid approximation of :math:`\pi_\beta` (initial points of chains).

    :math:`U` is quadratic in :math:`v`, so :math:`v \mid (q, k) \sim N(B/P, 1/(\beta P))` exactly
    (:math:`P = \overline{h^2} + \lambda`, :math:`B = \overline{hy}`); :math:`(q, k)` is drawn from
    its marginal on a grid (a cell by its weight, then uniformly inside it). Both sign modes
    :math:`\pm(q, k)` are thereby populated in proportion to their mass, which chains cannot
    establish themselves (the barrier between the modes is about 11.8/\beta).
    """
    m = round(half_width / spacing)
    g = torch.arange(-m, m + 1, dtype=torch.float64) * spacing
    Q, K = torch.meshgrid(g, g, indexing="ij")
    h = attention_h((Q * K).reshape(-1), x)
    P = (h * h).mean(-1) + lam
    Bv = (h * y).mean(-1)
    e = beta * (0.5 * lam * (Q * Q + K * K).reshape(-1) - 0.5 * Bv ** 2 / P) + 0.5 * torch.log(P)
    w = torch.exp(-(e - e.min()))
    idx = torch.multinomial(w, n, replacement=True, generator=generator)
    jitter = (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * spacing
    q = Q.reshape(-1)[idx] + jitter[:, 0]
    k = K.reshape(-1)[idx] + jitter[:, 1]
    hs = attention_h(q * k, x)
    Ps = (hs * hs).mean(-1) + lam
    v = (hs * y).mean(-1) / Ps + torch.randn(n, generator=generator, dtype=torch.float64) / torch.sqrt(beta * Ps)
    return torch.stack([q, k, v], dim=-1)
