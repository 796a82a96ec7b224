r"""Exactly solvable targets of THEORY §5 with their ground-truth numbers, for tests, benchmarks and
users checking a sampler (the counterpart of :mod:`torch.testing` for Langevin samplers).

A sampler is checked by running ``C`` independent chains at once: the parameter tensors carry a
leading chain dimension (``(C, d)``, ``(C, r, in)``, ...), one optimizer steps all of them, and the
gradient written to ``.grad`` is, per chain, the gradient of that chain's **mean** loss (the
optimizers of this package add the coupled weight decay :math:`\lambda\theta` themselves). A
statistic is estimated by its per-chain time average :math:`\bar f_c`; chains are independent, so

.. math::
    z = \frac{\tfrac1C\sum_c \bar f_c - f^\star}{\operatorname{sd}_c(\bar f_c)/\sqrt C}

is asymptotically standard normal whatever the autocorrelation inside a chain (THEORY §5): a
correct sampler gives :math:`|z| \lesssim 4` on every moment, a biased one a growing :math:`|z|`.

Contents:

* :func:`zscores` and :func:`run_chains` (time averages of any statistics along the chains);
* :func:`linear_chain_law`: the exact stationary mean and covariance of a linear Gaussian
  recursion :math:`\theta' = M\theta + c + \varepsilon`, :math:`\operatorname{Cov}\varepsilon = Q`
  (discrete Lyapunov equation) — the exact law of ULA/SGLD on a quadratic, with or without a
  frozen diagonal preconditioner, with minibatch noise, or with decoupled decay;
* target (i), the quadratic: :class:`Quadratic` (full batch) and :class:`BlockQuadratic`
  (minibatches with exact gradient noise);
* target (ii), LoRA factorisations :math:`W = BA`: :func:`lora_loss`, :func:`lora_grads`,
  :func:`lora_gauge`, :func:`lora_gauge_source`, the quadrature :func:`lora_posterior_grid` /
  :func:`lora_quadrature_moments` and THEORY's numbers :data:`RANK1_GROUND_TRUTH`;
* target (iii), one tiny attention layer: :func:`attention_data`, :func:`attention_h`,
  :func:`attention_loss`, :func:`attention_loss_and_grad`, :func:`attention_potential`,
  :func:`attention_sample_posterior`, its ground truth :data:`ATTENTION_PARAMS`, :data:`ATTENTION_X`,
  :data:`ATTENTION_Y`, :data:`ATTENTION_MOMENTS` (together :func:`attention_ground_truth`), and the
  quadratures that produced it
  (:func:`attention_quadrature_3d`, the independent :func:`attention_quadrature_2d`,
  :func:`attention_barrier`; ``python -m benchmarks.attention_quadrature`` reruns them and writes
  ``tests/data/attention_ground_truth.json``).

Example (SGLD on a quadratic, 256 chains, against the exact law of the discretised chain)::

    import numpy as np, torch
    from langevin_lora import LangevinSGD
    from langevin_lora.testing import Quadratic, run_chains, zscores

    rng = np.random.default_rng(0)
    target = Quadratic(rng.standard_normal((64, 3)), rng.standard_normal(64), lam=0.1)
    theta = torch.nn.Parameter(torch.zeros(256, 3, dtype=torch.float64))
    opt = LangevinSGD([theta], lr=0.05, beta=10.0, weight_decay=target.lam, seed=0)

    def set_grads():
        theta.grad = target.grad(theta.detach())

    avg = run_chains(opt, set_grads, lambda: {"theta": theta.detach()}, n_steps=2000, burn_in=500)
    assert np.abs(zscores(avg["theta"], target.mean)).max() < 4.5
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ATTENTION_MOMENT_NAMES", "ATTENTION_MOMENTS", "ATTENTION_PARAMS", "ATTENTION_X", "ATTENTION_Y",
    "RANK1_GROUND_TRUTH", "attention_barrier", "attention_data", "attention_features",
    "attention_ground_truth", "attention_h", "attention_loss", "attention_loss_and_grad",
    "attention_potential", "attention_quadrature_2d", "attention_quadrature_3d",
    "attention_sample_posterior", "BlockQuadratic", "linear_chain_law", "lora_gauge", "lora_gauge_source",
    "lora_grads", "lora_loss", "lora_posterior_grid", "lora_quadrature_moments", "Quadratic", "run_chains",
    "zscores",
]

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
    import scipy.linalg  # SciPy is needed here only (not a dependency of the package itself)

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
        """The Gibbs mean :math:`K^{-1}b` (also the mean of every discretised chain)."""
        return np.linalg.solve(self.K, self.b)

    def gibbs_cov(self, beta: float) -> np.ndarray:
        r"""The Gibbs covariance :math:`(\beta K)^{-1}`."""
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
        """Exact stationary mean and covariance of minibatch SGLD (the recursion in the class docstring)."""
        M = np.eye(self.d) - eta * self.K
        return linear_chain_law(M, eta * self.b, eta ** 2 * self.Sigma + (2 * eta / beta) * np.eye(self.d))

    def grad(self, theta: Tensor, batch: Tensor) -> Tensor:
        """Minibatch gradient for chains ``theta (C, d)`` using block ``batch[c]`` in chain ``c``."""
        return theta @ self._S_t.to(theta) - self._bj_t.to(theta)[batch]


# ---------------------------------------------------------------------------------------------
# Target (ii): LoRA factorisations W = B A
# ---------------------------------------------------------------------------------------------

#: THEORY §5(ii) ground truth (5 decimals) for U(a, b) = (w - b a)^2 + (lam/2)(a^2 + b^2), w=1, lam=0.5, beta=4.
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


def lora_posterior_grid(w, lam: float, beta: float, nodes: np.ndarray
                        ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    r"""The rank-1 LoRA posterior of THEORY §5(ii) on a grid, for quadrature.

    :math:`A` is ``1 x n`` (entries :math:`a_i`), :math:`B` is ``1 x 1`` (:math:`b`), and
    :math:`U = \sum_i (w_i - b a_i)^2 + \tfrac\lambda2(\sum_i a_i^2 + b^2)`, :math:`\pi \propto e^{-\beta U}`.

    Args:
        w: the target row, ``n`` numbers (a scalar for the rank-1 scalar case ``n = 1``).
        lam, beta: weight decay and inverse temperature.
        nodes: the 1-D grid used on every axis (symmetric, with 0 a node, keeps the sign symmetry).

    Returns:
        ``(a, b, U, p)``: ``a`` a list of ``n`` arrays and ``b`` one array, the coordinates of the
        ``(n+1)``-D grid (``indexing="ij"``, ``b`` last), ``U`` the potential there and ``p`` the
        normalised weights :math:`e^{-\beta(U - \min U)}/\sum`. A moment is ``(p * f(a, b, U)).sum()``;
        the integrand decays like a Gaussian, so the rectangle rule converges fast.
    """
    w = np.atleast_1d(np.asarray(w, dtype=float))
    n = w.size
    grids = np.meshgrid(*([np.asarray(nodes, dtype=float)] * (n + 1)), indexing="ij")
    a, b = grids[:n], grids[n]
    U = sum((w[i] - b * a[i]) ** 2 for i in range(n)) + 0.5 * lam * (sum(ai ** 2 for ai in a) + b ** 2)
    p = np.exp(-beta * (U - U.min()))
    p /= p.sum()
    return a, b, U, p


def lora_quadrature_moments(w: float = 1.0, lam: float = 0.5, beta: float = 4.0, half_width: float = 8.0,
                            spacing: float = 0.01) -> dict[str, float]:
    """Independent 2-D rectangle-rule moments of the rank-1 target (checks :data:`RANK1_GROUND_TRUTH`):
    ``a2, ab, ab_sq, a4, U, P_a_pos`` = :math:`E a^2, E ab, E (ab)^2, E a^4, E U, P(a > 0)`."""
    g = np.arange(-round(half_width / spacing), round(half_width / spacing) + 1) * spacing
    (a,), b, U, p = lora_posterior_grid(w, lam, beta, g)
    return {"a2": float((p * a * a).sum()), "ab": float((p * a * b).sum()), "ab_sq": float((p * (a * b) ** 2).sum()),
            "a4": float((p * a ** 4).sum()), "U": float((p * U).sum()),
            "P_a_pos": float((p * ((a > 0) + 0.5 * (a == 0))).sum())}


# ---------------------------------------------------------------------------------------------
# Target (iii): one tiny attention layer
# ---------------------------------------------------------------------------------------------


#: The data and prior of THEORY §5(iii)'s attention target: ``num_sequences`` sequences of ``seq_len``
#: tokens ``x ~ N(0, 1)`` (``numpy.random.default_rng(data_seed)``), targets from :math:`qk = 2`,
#: :math:`v = 1` plus noise of sd 0.1; weight decay :math:`\lambda = 0.1`, :math:`\beta = 50`.
ATTENTION_PARAMS = dict(num_sequences=20, seq_len=4, data_seed=0, qk_true=2.0, v_true=1.0, noise_sd=0.1,
                        weight_decay=0.1, beta=50.0)
#: The moments of :math:`\pi_\beta` reported for the attention target, in this order.
ATTENTION_MOMENT_NAMES = ["q", "k", "v", "q2", "k2", "v2", "qk", "qv", "kv", "abs_q", "abs_k", "U", "P_q_pos"]
#: Moments of :math:`\pi_\beta \propto e^{-\beta U}` for :data:`ATTENTION_PARAMS` by the 3-D rectangle rule
#: (spacing 0.01 on :math:`[-4, 4]^3`; halving the spacing moves them by < 1e-9, the independent
#: semi-analytic 2-D quadrature agrees to 3e-15). Copied at full precision from
#: ``tests/data/attention_ground_truth.json`` (a test checks the two agree). By symmetry ``q, k, qv, kv``
#: are 0 and ``P_q_pos`` is 1/2 exactly.
ATTENTION_MOMENTS = {
    "q": -8.419041310813723e-18,
    "k": 5.2620946184838026e-17,
    "v": 1.1411350036679369,
    "q2": 0.8950243804393728,
    "k2": 0.8950243804393737,
    "v2": 1.3333730837854474,
    "qk": 0.8005859049524827,
    "qv": -1.8346466236780207e-17,
    "kv": 1.398508706083141e-17,
    "abs_q": 0.9072198330239126,
    "abs_k": 0.9072198330239115,
    "U": 0.1949193264642606,
    "P_q_pos": 0.5000000000000013,
}

#: The data of :data:`ATTENTION_MOMENTS` at full precision: tokens ``x`` (20 x 4) and targets ``y`` (20), as
#: written to ``tests/data/attention_ground_truth.json``; :func:`attention_data` regenerates them to within an
#: ulp (numpy's elementary functions may round the last bit differently across versions).
ATTENTION_X = [
    [0.1257302210933933, -0.1321048632913019, 0.6404226504432821, 0.10490011715303971],
    [-0.535669373161111, 0.36159505490948474, 1.3040000451301372, 0.9470809631292422],
    [-0.7037352358069926, -1.2654214710460525, -0.6232744625373522, 0.0413259793472436],
    [-2.3250307746388343, -0.21879166393254573, -1.2459109472530652, -0.7322673547034516],
    [-0.5442589828573099, -0.31630015636915454, 0.4116305363741328, 1.0425133694426776],
    [-0.12853466294403426, 1.3664634705496859, -0.6651946734866135, 0.3515100700930197],
    [0.9034701816518086, 0.09401229776087457, -0.7434992493538084, -0.9217253762584194],
    [-0.45772582566733916, 0.2201951234700494, -1.009618183538736, -0.20917557487171307],
    [-0.15922500991447772, 0.5408455846858077, 0.2146591225063409, 0.3553727090399214],
    [-0.6538286094183394, -0.12961363369276946, 0.7839754700613295, 1.4934311452207607],
    [-1.2590655321041202, 1.5139237747390626, 1.3458754237823045, 0.7813114007004275],
    [0.2644556303293035, -0.3139228145364278, 1.4580206835369587, 1.9602583164499647],
    [1.801634869866125, 1.31510376473437, 0.357380410658956, -1.2083186322821715],
    [-0.004454133120083229, 0.6564749350763358, -1.2883614637495544, 0.39512206018200824],
    [0.42986369482223, 0.6960427239628685, -1.184117966757189, -0.6617025720390349],
    [-0.43643524714322124, -1.169801907772864, 1.739367877130134, -0.4959107284421519],
    [0.3289696294602021, -0.258572545473924, 1.5834728788021222, 1.3203609870818391],
    [0.6333526228249152, -2.2035098806466507, 0.05202897425988651, 0.6836861907765345],
    [1.0039615758421696, -0.6179070447076008, 1.8220113633283233, -1.3204309700132935],
    [-0.6615280218152191, 0.9350499881140221, 0.049054613825311656, 2.002392583645255],
]
ATTENTION_Y = [
    0.2205948463868011, 1.008662550535973, -0.657717473643307, -2.0833638231486296,
    0.6894328116999103, 0.7047654717677078, -0.6814635391034364, -0.31823084155172143,
    0.20699185189426061, 1.5724968557439793, 1.295313314449402, 2.0540619029166676,
    -1.209325241666055, 0.19276410174374675, -0.8016365989911625, -0.6464027917608399,
    1.4756611039345926, 0.46972445074944524, -1.3547260255338018, 1.8467615287977752,
]


def attention_data(num_sequences: int = 20, seq_len: int = 4, data_seed: int = 0, qk_true: float = 2.0,
                   v_true: float = 1.0, noise_sd: float = 0.1, **_) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``x ~ N(0, 1)`` of shape ``(N, n)`` and targets ``y = v_true h(qk_true) + noise`` (float64 numpy).

    ``attention_data(**ATTENTION_PARAMS)`` regenerates :data:`ATTENTION_X`, :data:`ATTENTION_Y` (to an ulp;
    extra keys ignored)."""
    rng = np.random.default_rng(data_seed)
    x = rng.standard_normal((num_sequences, seq_len))
    y = v_true * _attention_h_numpy(np.array([qk_true]), x)[0] + noise_sd * rng.standard_normal(num_sequences)
    return x, y


def attention_ground_truth(dtype: torch.dtype = torch.float64) -> dict:
    """The attention target ready to sample: ``{"params", "x", "y", "moments"}`` with ``x, y`` tensors of
    ``dtype`` (:data:`ATTENTION_X`, :data:`ATTENTION_Y`), ``lam = params["weight_decay"]``,
    ``beta = params["beta"]`` and the exact ``moments`` (:data:`ATTENTION_MOMENTS`)."""
    return {"params": dict(ATTENTION_PARAMS), "x": torch.tensor(ATTENTION_X, dtype=dtype),
            "y": torch.tensor(ATTENTION_Y, dtype=dtype),
            "moments": dict(ATTENTION_MOMENTS)}


def attention_h(s: Tensor, x: Tensor) -> Tensor:
    r""":math:`h_i(s) = \sum_j \operatorname{softmax}_j(s\,x_{in}x_{ij})\,x_{ij}`: the layer's output for
    :math:`qk = s` and :math:`v = 1` (the query is the last token :math:`x_{in}`).

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


# ---------------------------------------------------------------------------------------------
# Target (iii): its ground truth by quadrature
# ---------------------------------------------------------------------------------------------
# The attention posterior is invariant under (q, k) -> (-q, -k) and q <-> k and bimodal: the modes near
# +-(0.9, 0.9) are separated by a barrier of about 11.8 / beta at q = k = 0 (attention_barrier), so
# Langevin chains started in one mode stay there; the symmetric grids below cover both modes and the
# region qk < 0 (negligible mass). U is quadratic in v,
#     U = P(s) v^2 / 2 - B(s) v + mean(y^2) / 2 + lam (q^2 + k^2) / 2,   s = qk,
#     P = mean(h^2) + lam,   B = mean(h y),
# so v | (q, k) is exactly N(B/P, 1/(beta P)) and a 2-D grid suffices for the independent check.


def _attention_h_numpy(s: np.ndarray, x: np.ndarray) -> np.ndarray:
    """:func:`attention_h` in numpy for every ``s`` (shape ``(len(s), N)``), the softmax shifted by its maximum."""
    logits = s[:, None, None] * (x[:, -1:] * x)[None]
    logits -= logits.max(axis=-1, keepdims=True)
    w = np.exp(logits)
    return (w * x[None]).sum(-1) / w.sum(-1)


def attention_features(s: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    r""":math:`P(s) = \overline{h^2} + \lambda` and :math:`B(s) = \overline{h y}` for every ``s`` (any shape),
    evaluated in chunks of 20000."""
    P, B = np.empty_like(s), np.empty_like(s)
    flat_s, flat_P, flat_B = s.reshape(-1), P.reshape(-1), B.reshape(-1)
    for i in range(0, flat_s.size, 20000):
        h = _attention_h_numpy(flat_s[i:i + 20000], x)
        flat_P[i:i + 20000] = (h * h).mean(1) + lam
        flat_B[i:i + 20000] = (h * y).mean(1)
    return P, B


def _attention_grid(x: np.ndarray, y: np.ndarray, lam: float, half_width: float, spacing: float):
    """The (q, k) grid on [-half_width, half_width]^2, mean y^2, and the features P, B of every node."""
    m = int(round(half_width / spacing))
    g = np.arange(-m, m + 1) * spacing
    Q, K = np.meshgrid(g, g, indexing="ij")
    P, B = attention_features(Q * K, x, y, lam)
    return g, float((y * y).mean()), Q, K, P, B


def attention_quadrature_3d(x: np.ndarray, y: np.ndarray, lam: float, beta: float, half_width: float,
                            spacing: float) -> dict:
    r"""Moments (:data:`ATTENTION_MOMENT_NAMES`) of :math:`e^{-\beta U}` by the rectangle rule on the symmetric
    3-D grid :math:`[-w, w]^3` (``w = half_width``), one q-slice at a time.

    Returns ``dict(spacing, points_per_axis, moments, boundary_rel_density)``, the last being the largest
    density on the boundary of the box relative to the peak (the box must hold the mass)."""
    g, c0, Q, K, P, B = _attention_grid(x, y, lam, half_width, spacing)
    base = 0.5 * c0 + 0.5 * lam * (Q ** 2 + K ** 2)
    # Shift by the minimum of U over the grid (q, k and v all on nodes) for a stable exponent.
    u_min = np.inf
    for i in range(g.size):
        u = base[i, :, None] + 0.5 * P[i, :, None] * g ** 2 - B[i, :, None] * g
        u_min = min(u_min, float(u.min()))
    acc = {name: 0.0 for name in ATTENTION_MOMENT_NAMES}
    z = 0.0
    edge = 0.0  # largest density on the boundary of the box, relative to the peak (peak = 1)
    for i, qi in enumerate(g):
        u = base[i, :, None] + 0.5 * P[i, :, None] * g ** 2 - B[i, :, None] * g  # (k, v)
        w = np.exp(-beta * (u - u_min))
        kk, vv = g[:, None], g[None, :]
        wk, wv = w.sum(1), w.sum(0)
        sw = float(wk.sum())
        z += sw
        acc["q"] += qi * sw
        acc["k"] += float(wk @ g)
        acc["v"] += float(wv @ g)
        acc["q2"] += qi * qi * sw
        acc["k2"] += float(wk @ g ** 2)
        acc["v2"] += float(wv @ g ** 2)
        acc["qk"] += qi * float(wk @ g)
        acc["qv"] += qi * float(wv @ g)
        acc["kv"] += float((w * kk * vv).sum())
        acc["abs_q"] += abs(qi) * sw
        acc["abs_k"] += float(wk @ np.abs(g))
        acc["U"] += float((w * u).sum())
        acc["P_q_pos"] += (1.0 if qi > 0 else 0.5 if qi == 0 else 0.0) * sw
        if i in (0, g.size - 1):
            edge = max(edge, float(w.max()))
        else:
            edge = max(edge, float(w[[0, -1], :].max()), float(w[:, [0, -1]].max()))
    moments = {name: acc[name] / z for name in ATTENTION_MOMENT_NAMES}
    return dict(spacing=spacing, points_per_axis=int(g.size), moments=moments, boundary_rel_density=edge)


def attention_quadrature_2d(x: np.ndarray, y: np.ndarray, lam: float, beta: float, half_width: float,
                            spacing: float) -> dict:
    r"""Independent check of :func:`attention_quadrature_3d`: :math:`v` integrated exactly
    (:math:`v \mid q, k` is Gaussian), the rectangle rule in :math:`(q, k)`.

    Returns ``dict(spacing, points_per_axis, moments, mass_qk_negative)``."""
    g, c0, Q, K, P, B = _attention_grid(x, y, lam, half_width, spacing)
    mv = B / P
    # -log of the v-marginal weight, up to a constant: beta * (c0/2 + lam/2 (q^2+k^2) - B^2/(2P)) + log(P)/2
    e = beta * (0.5 * c0 + 0.5 * lam * (Q ** 2 + K ** 2) - 0.5 * B ** 2 / P) + 0.5 * np.log(P)
    w = np.exp(-(e - e.min()))
    w /= w.sum()
    ev, ev2 = mv, mv ** 2 + 1.0 / (beta * P)
    # U = P/2 v^2 - B v + c0/2 + lam/2 (q^2+k^2) (P holds the prior on v), so E[U | q, k] =
    # P/2 E[v^2|q,k] - B E[v|q,k] + ... = -B^2/(2P) + 1/(2 beta) + c0/2 + lam/2 (q^2+k^2).
    eu = 0.5 * c0 + 0.5 * lam * (Q ** 2 + K ** 2) - 0.5 * B ** 2 / P + 0.5 / beta
    sign_q = np.where(Q > 0, 1.0, np.where(Q == 0, 0.5, 0.0))
    moments = {
        "q": (w * Q).sum(), "k": (w * K).sum(), "v": (w * ev).sum(),
        "q2": (w * Q ** 2).sum(), "k2": (w * K ** 2).sum(), "v2": (w * ev2).sum(),
        "qk": (w * Q * K).sum(), "qv": (w * Q * ev).sum(), "kv": (w * K * ev).sum(),
        "abs_q": (w * np.abs(Q)).sum(), "abs_k": (w * np.abs(K)).sum(), "U": (w * eu).sum(),
        "P_q_pos": (w * sign_q).sum(),
    }
    return dict(spacing=spacing, points_per_axis=int(g.size), moments={k: float(v) for k, v in moments.items()},
                mass_qk_negative=float(w[Q * K < 0].sum()))


def attention_barrier(x: np.ndarray, y: np.ndarray, lam: float, beta: float) -> dict:
    r"""The barrier between the two sign modes: :math:`\beta(\min_v U|_{q=k=0} - \min U|_{q=k>0})`, with the
    mode on the balanced diagonal ``mode_q_eq_k`` (grid of step 0.001 on [0, 3])."""
    c0 = float((y * y).mean())
    t = np.linspace(0.0, 3.0, 3001)
    P, B = attention_features(t * t, x, y, lam)
    u = 0.5 * c0 + lam * t ** 2 - 0.5 * B ** 2 / P
    i = int(u.argmin())
    return dict(mode_q_eq_k=float(t[i]), beta_delta_U=float(beta * (u[0] - u[i])))
