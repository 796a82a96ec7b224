r"""Pure estimators of the Gibbs-stationarity identities (THEORY §3), one implementation each.

Everything here follows from one identity of the Gibbs measure
:math:`\pi_\beta \propto e^{-\beta U}`, :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2`:
for any smooth vector field :math:`\varphi`,

.. math::
    \mathbb E_\pi[\varphi\cdot\nabla U] = \beta^{-1}\,\mathbb E_\pi[\nabla\!\cdot\varphi].

- :math:`\varphi = \theta - c` (c constant) gives the **virial temperature**
  :math:`\tfrac1d\mathbb E[(\theta-c)\cdot\nabla U] = 1/\beta`;
- :math:`\varphi = e_i` gives the **mean force** :math:`\mathbb E[\partial_i U] = 0`;
- :math:`\varphi = \nabla U` gives the **configurational temperature**
  :math:`\mathbb E|\nabla U|^2 / \mathbb E[\Delta U] = 1/\beta` (the Laplacian by
  :func:`~langevin_lora.core.curvature.hutchinson_laplacian`);
- the LoRA gauge field :math:`(A, B) \mapsto (E_{ab}A, -BE_{ab})`, along which :math:`\hat L` is
  constant, gives the **gauge identity** :math:`\mathbb E[\beta\lambda(AA^\top - B^\top B)] =
  (\text{in} - \text{out})\,I`.

Conventions shared by every function:

- ``params`` / ``grads`` are lists of tensors; ``grads`` are gradients of the **mean** loss
  :math:`\hat L` (weight decay not included: it is added here as :math:`\lambda\theta`).
- ``batch_dims``: the number of leading dimensions that index independent chains (vectorised
  ensembles); every reduction sums over the remaining dimensions and over the list, so a result
  has shape ``params[0].shape[:batch_dims]`` (a scalar tensor when ``batch_dims == 0``);
  ``per_tensor=True`` keeps the list apart (a leading dimension of ``len(params)``).
- Quantities that mix groups weight each coordinate by its own :math:`\beta_i` and
  :math:`\lambda_i`; these functions handle one group (scalar :math:`\beta`, :math:`\lambda`) and
  the callers (:class:`~langevin_lora.diagnostics.GibbsRecorder`) sum group results.
- Streaming forms (``*_from_moments``, ``*_from_sums``) hold the formula; the list forms compute
  the moments and call them, so a running estimator and the offline one agree by construction.

The Hessian-vector-product probes live in :mod:`langevin_lora.core.curvature` (re-exported here).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_int, check_non_negative, check_positive
from langevin_lora.core.curvature import (
    HessianVectorProduct,
    batched_dot,
    hutchinson_laplacian,
    num_coordinates,
    power_iteration,
)

__all__ = [
    "batched_dot",
    "virial_sum",
    "virial_temperature",
    "mean_force",
    "mean_force_chi2",
    "mean_force_chi2_from_sums",
    "close_block_",
    "gauge_matrix",
    "gauge_gap",
    "gauge_gap_from_norms",
    "gauge_target",
    "minibatch_noise_trace",
    "noise_trace_from_moments",
    "noise_ratio",
    "noise_ratio_from_traces",
    "gradient_square",
    "gradient_square_from_moments",
    "HessianVectorProduct",
    "hutchinson_laplacian",
    "power_iteration",
]


def _force(params: Sequence[Tensor], grads: Sequence[Tensor], weight_decay: float) -> list[Tensor]:
    r""":math:`g + \lambda\theta` per tensor (one fused pass)."""
    if weight_decay == 0:
        return list(grads)
    return list(torch._foreach_add(list(grads), list(params), alpha=weight_decay))


def _check_lists(params: Sequence[Tensor], grads: Sequence[Tensor], name: str = "grads") -> None:
    if len(params) == 0:
        raise ValueError("Invalid params: expected a non-empty list of tensors")
    if len(params) != len(grads):
        raise ValueError(f"Invalid {name}: expected {len(params)} tensors (one per parameter), got {len(grads)}")
    for p, g in zip(params, grads):
        if p.shape != g.shape:
            raise ValueError(f"Invalid {name}: shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")


# -- virial temperature ---------------------------------------------------------------------------
def virial_sum(params: Sequence[Tensor], grads: Sequence[Tensor], centers: Sequence[Tensor] | None = None, *,
               weight_decay: float = 0.0, batch_dims: int = 0, per_tensor: bool = False) -> Tensor:
    r""":math:`\sum_i (\theta_i - c_i)(g_i + \lambda\theta_i)` (``centers=None`` means :math:`c = 0`)."""
    _check_lists(params, grads)
    force = _force(params, grads, check_non_negative("weight_decay", weight_decay))
    if centers is not None:
        _check_lists(params, centers, "centers")
        params = torch._foreach_sub(list(params), list(centers))
    return batched_dot(params, force, batch_dims, per_tensor=per_tensor)


def virial_temperature(params: Sequence[Tensor], grads: Sequence[Tensor], centers: Sequence[Tensor] | None = None,
                       *, weight_decay: float = 0.0, beta: float = 1.0, batch_dims: int = 0) -> Tensor:
    r"""Centred virial temperature of one gradient evaluation, in units of :math:`1/\beta`.

    .. math::
        \beta\,T_{\mathrm{vir}} = \frac{\beta}{d}\sum_{i=1}^d (\theta_i - c_i)\,(g_i + \lambda\theta_i),
        \qquad \mathbb E_\pi[\beta T_{\mathrm{vir}}] = 1

    for any constant centre :math:`c` (the identity with :math:`\varphi = \theta - c`). Linear in
    the gradient, so a single unbiased minibatch gradient suffices. Centre on a recent mean of
    :math:`\theta` (:class:`~langevin_lora.diagnostics.WindowCenter`): the uncentred form has a
    variance of order :math:`|\mathbb E\theta|^2` and, under minibatch noise, a different bias
    (THEORY §3).

    Known biases (expected, not errors): the ULA step gives
    :math:`\beta T = \operatorname{tr}[(I - \eta K/2)^{-1}]/d` on a quadratic with Hessian
    :math:`K`; minibatch gradient noise multiplies the temperature by about :math:`1 + \rho`
    (:func:`noise_ratio`).

    Returns a tensor of shape ``batch shape`` (time-average it over a chain before judging).
    """
    beta = check_positive("beta", beta)
    s = virial_sum(params, grads, centers, weight_decay=weight_decay, batch_dims=batch_dims)
    return s * (beta / num_coordinates(params, batch_dims))


# -- mean force ---------------------------------------------------------------------------------
def mean_force(params: Sequence[Tensor], grads: Sequence[Tensor], *, weight_decay: float = 0.0) -> list[Tensor]:
    r"""The force :math:`\nabla U = g + \lambda\theta` per tensor; :math:`\mathbb E_\pi[\nabla U] = 0`."""
    _check_lists(params, grads)
    return _force(params, grads, check_non_negative("weight_decay", weight_decay))


def _mean_t_squared(mean: Tensor, var: Tensor, m: int) -> tuple[Tensor, float]:
    r"""Per coordinate :math:`t_i^2 = m\,\bar f_i^2/s_i^2`, averaged over the last dimension, and its
    stationary expectation :math:`\mathbb E[t^2_{m-1}] = (m-1)/(m-3)`."""
    var = var.clamp_min(torch.finfo(torch.float64).tiny)
    return (mean.square() * m / var).mean(-1), (m - 1) / (m - 3)


def mean_force_chi2(block_means: Tensor) -> tuple[Tensor, float]:
    r"""Per-coordinate batch-means :math:`\chi^2` test of :math:`\mathbb E[\nabla U] = 0`.

    ``block_means`` has shape ``(m, *batch, d)``: the time average of :math:`\nabla U` over each
    of :math:`m \ge 4` consecutive blocks (blocks much longer than the autocorrelation time). Per
    coordinate, :math:`t_i = \bar f_i / (s_i/\sqrt m)` with :math:`s_i` the between-block standard
    deviation: Student's :math:`t` with :math:`m-1` degrees of freedom when the block means are
    independent normal with mean 0. Returns :math:`\chi^2/d = \tfrac1d\sum_i t_i^2` (shape
    ``batch``) and its stationary expectation :math:`\mathbb E[t^2_{m-1}] = (m-1)/(m-3)` (3 at
    :math:`m = 4`, 2 at 5, 1.29 at 10, 1.07 at 30: it tends to 1 as blocks accumulate). A chain
    still drifting has :math:`\chi^2/d \gg (m-1)/(m-3)`; so does one whose blocks are shorter than
    its autocorrelation time.
    """
    if block_means.dim() < 2:
        raise ValueError(f"Invalid block_means: expected shape (blocks, ..., d), got {tuple(block_means.shape)}")
    m = block_means.shape[0]
    if m < 4:
        raise ValueError(f"Invalid block_means: {m} blocks (expected >= 4)")
    x = block_means.double()
    return _mean_t_squared(x.mean(0), x.var(0, unbiased=True), m)


def mean_force_chi2_from_sums(sum_means: Tensor, sum_sq_means: Tensor, num_blocks: int) -> tuple[Tensor, float]:
    r""":func:`mean_force_chi2` from running sums over the :math:`m` blocks of the block means
    :math:`\sum_b \bar f_b` and of their squares :math:`\sum_b \bar f_b^2` (flat, shape ``(d,)``)."""
    m = check_int("num_blocks", num_blocks, low=4)
    s, q = sum_means.double(), sum_sq_means.double()
    mean = s / m
    return _mean_t_squared(mean, (q - m * mean * mean) / (m - 1), m)


def close_block_(block_sum: Sequence[Tensor], length: int, sum_means: Sequence[Tensor],
                 sum_sq_means: Sequence[Tensor]) -> None:
    r"""Close one block of ``length`` steps: add its mean :math:`\bar f_b` to ``sum_means`` and
    :math:`\bar f_b^2` to ``sum_sq_means``, and zero ``block_sum`` (in place, lists of tensors)."""
    means = torch._foreach_div(list(block_sum), float(length))
    torch._foreach_add_(list(sum_means), means)
    torch._foreach_addcmul_(list(sum_sq_means), means, means)
    for b in block_sum:
        b.zero_()


# -- LoRA gauge identity ------------------------------------------------------------------------
def gauge_target(fan_in: int, fan_out: int, beta: float, weight_decay: float) -> float:
    r""":math:`(\text{in} - \text{out})/(\beta\lambda)`: the stationary :math:`\mathbb E[AA^\top - B^\top B]`
    per diagonal entry (0 off the diagonal)."""
    check_int("fan_in", fan_in, low=1)
    check_int("fan_out", fan_out, low=1)
    check_positive("beta", beta)
    check_positive("weight_decay", weight_decay)
    return (fan_in - fan_out) / (beta * weight_decay)


def _gauge_coefficients(beta: float, weight_decay: float, beta_B: float | None,
                        weight_decay_B: float | None) -> tuple[float, float]:
    """:math:`\\beta_A\\lambda_A` and :math:`\\beta_B\\lambda_B`, checked."""
    beta = check_positive("beta", beta)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    beta_B = beta if beta_B is None else check_positive("beta_B", beta_B)
    weight_decay_B = weight_decay if weight_decay_B is None else check_non_negative("weight_decay_B", weight_decay_B)
    return beta * weight_decay, beta_B * weight_decay_B


def gauge_matrix(A: Tensor, B: Tensor, *, beta: float, weight_decay: float,
                 beta_B: float | None = None, weight_decay_B: float | None = None) -> Tensor:
    r"""The scaled gauge matrix :math:`D_\beta = \beta_A\lambda_A AA^\top - \beta_B\lambda_B B^\top B`
    (:math:`r \times r`), with PEFT shapes ``A`` :math:`(\dots, r, \text{in})`, ``B``
    :math:`(\dots, \text{out}, r)` (leading dimensions are chains).

    :math:`\hat L` depends on :math:`(A, B)` only through :math:`BA`, so the gauge field
    :math:`(E_{ab}A, -BE_{ab})` is orthogonal to :math:`\nabla\hat L` and the master identity
    gives, whatever the data,

    .. math::
        \mathbb E_\pi[D_\beta] = (\text{in} - \text{out})\,I .

    Under SGLD (no preconditioner) :math:`\tfrac{d}{dt}\mathbb E[D_\beta] = -2\lambda(\mathbb E
    D_\beta - (\text{in}-\text{out})I)`: it relaxes at rate exactly :math:`2\lambda`, so the chain
    needs at least :math:`1/(2\lambda\eta)` steps to mix, a data-free bound. ``beta_B`` /
    ``weight_decay_B`` default to ``beta`` / ``weight_decay`` (the factors share a group).
    """
    ca, cb = _gauge_coefficients(beta, weight_decay, beta_B, weight_decay_B)
    if A.shape[-2] != B.shape[-1]:
        raise ValueError(f"Invalid A/B: rank mismatch, A has {A.shape[-2]} rows and B {B.shape[-1]} columns")
    A = A.reshape(*A.shape[:-2], A.shape[-2], -1)
    Af, Bf = A.detach().double(), B.detach().double()
    return ca * Af @ Af.transpose(-1, -2) - cb * Bf.transpose(-1, -2) @ Bf


def gauge_gap_from_norms(a_sq: Tensor, b_sq: Tensor, *, rank: Tensor | float, fan_in: Tensor | float,
                         fan_out: Tensor | float, coef_A: Tensor | float, coef_B: Tensor | float) -> Tensor:
    r""":math:`\operatorname{tr}(D_\beta)/r - (\text{in} - \text{out})` from the squared norms
    :math:`\lVert A\rVert^2`, :math:`\lVert B\rVert^2` and :math:`\beta_A\lambda_A`, :math:`\beta_B\lambda_B`
    (``coef_A``, ``coef_B``); every argument broadcasts, so many modules are done at once."""
    return (coef_A * a_sq - coef_B * b_sq) / rank - (fan_in - fan_out)


def gauge_gap(A: Tensor, B: Tensor, *, beta: float, weight_decay: float,
              beta_B: float | None = None, weight_decay_B: float | None = None) -> Tensor:
    r"""Trace form of the gauge identity: :math:`\operatorname{tr}(D_\beta)/r - (\text{in} - \text{out})`,
    0 in expectation at stationarity; it costs two squared norms,

    .. math::
        \operatorname{tr} D_\beta = \beta_A\lambda_A\lVert A\rVert^2 - \beta_B\lambda_B\lVert B\rVert^2 .

    Returns a float64 tensor of shape ``A.shape[:-2]``.
    """
    ca, cb = _gauge_coefficients(beta, weight_decay, beta_B, weight_decay_B)
    fan_in = A[(0,) * (A.dim() - 1)].numel() if A.dim() >= 2 else 1
    a2 = A.detach().double().square().sum(dim=(-2, -1))
    b2 = B.detach().double().square().sum(dim=(-2, -1))
    return gauge_gap_from_norms(a2, b2, rank=A.shape[-2], fan_in=fan_in, fan_out=B.shape[-2], coef_A=ca, coef_B=cb)


# -- minibatch noise ------------------------------------------------------------------------------
def _check_micro(micro_grads: Sequence[Sequence[Tensor]], low: int) -> int:
    k = len(micro_grads)
    if k < low:
        raise ValueError(f"Invalid micro_grads: {k} gradient estimates (expected >= {low} independent ones)")
    n = len(micro_grads[0])
    if any(len(g) != n for g in micro_grads):
        raise ValueError("Invalid micro_grads: every gradient estimate must hold the same number of tensors")
    return k


def noise_trace_from_moments(sum_sq: Tensor, mean_sq: Tensor, k: int) -> Tensor:
    r""":math:`\widehat{\operatorname{tr}\Sigma_B} = \big(\sum_j\lVert g^{(j)}\rVert^2 -
    k\lVert\bar g\rVert^2\big)/(k(k-1))` from the two moments (any common weighting, e.g. by
    :math:`G`); elementwise in its arguments."""
    return (sum_sq - k * mean_sq) / (k * (k - 1))


def minibatch_noise_trace(micro_grads: Sequence[Sequence[Tensor]], *, precond: Sequence[Tensor] | None = None,
                          batch_dims: int = 0, per_tensor: bool = False) -> Tensor:
    r"""Unbiased :math:`\operatorname{tr}(G\Sigma_B)` of the **averaged** gradient
    :math:`\bar g = \tfrac1k\sum_j g^{(j)}` from :math:`k \ge 2` independent micro-batch gradients.

    .. math::
        \widehat{\operatorname{tr}\Sigma_B} = \frac{1}{k(k-1)}\sum_{j=1}^k \lVert g^{(j)} - \bar g\rVert_G^2
        = \frac{\sum_j\lVert g^{(j)}\rVert_G^2 - k\lVert\bar g\rVert_G^2}{k(k-1)},

    which for two half-batches is THEORY's :math:`\lVert g^1 - g^2\rVert^2/4`. ``precond`` weights
    coordinates by the frozen preconditioner :math:`G` (identity when ``None``).
    """
    k = _check_micro(micro_grads, 2)
    n = len(micro_grads[0])
    mean = [sum(g[i] for g in micro_grads) / k for i in range(n)]

    def sq(xs: Sequence[Tensor]) -> Tensor:
        weighted = list(xs) if precond is None else [x * G for x, G in zip(xs, precond)]
        return batched_dot(weighted, xs, batch_dims, per_tensor=per_tensor).double()

    return noise_trace_from_moments(sum(sq(g) for g in micro_grads), sq(mean), k)


def noise_ratio(micro_grads: Sequence[Sequence[Tensor]], *, lr: float, beta: float,
                precond: Sequence[Tensor] | None = None, batch_dims: int = 0) -> Tensor:
    r"""Minibatch-noise ratio :math:`\rho = \eta\beta\operatorname{tr}(G\Sigma_B)/(2d)`.

    One step injects the covariance :math:`\eta^2 G\Sigma_B G + (2\eta/\beta)G`: the gradient
    noise is a fraction :math:`\rho` of the Langevin noise, and the chain samples at about
    :math:`(1+\rho)/\beta` instead of :math:`1/\beta` (THEORY §3; 1.435 measured vs 1.432 predicted
    at :math:`\rho = 0.42`). Keep :math:`\rho \le 0.1`: lower the step size or raise the batch
    size. ``micro_grads`` as in :func:`minibatch_noise_trace`.
    """
    lr = check_positive("lr", lr)
    beta = check_positive("beta", beta)
    tr = minibatch_noise_trace(micro_grads, precond=precond, batch_dims=batch_dims)
    return noise_ratio_from_traces(tr, lr=lr, beta=beta, num_coordinates=num_coordinates(micro_grads[0], batch_dims))


def noise_ratio_from_traces(traces: Tensor, *, lr: Tensor | float, beta: Tensor | float,
                            num_coordinates: Tensor | float) -> Tensor:
    r"""Each tensor's (or group's) share :math:`\eta_k\beta_k\operatorname{tr}(G\Sigma_B)_k/(2d)` of
    :math:`\rho`, elementwise: sum it over the tensors of a chain of :math:`d` coordinates."""
    return lr * beta * traces / (2.0 * num_coordinates)


def gradient_square_from_moments(total_sq: Tensor, sum_sq: Tensor, k: int) -> Tensor:
    r"""The U-statistic :math:`\frac{1}{k(k-1)}\sum_{j\ne l} f^{(j)}\cdot f^{(l)} =
    \big(\lVert\sum_j f^{(j)}\rVert^2 - \sum_j\lVert f^{(j)}\rVert^2\big)/(k(k-1))`; for
    :math:`k = 1`, ``total_sq`` itself (biased upward by :math:`\operatorname{tr}\Sigma_B`)."""
    if k == 1:
        return total_sq
    return (total_sq - sum_sq) / (k * (k - 1))


def gradient_square(params: Sequence[Tensor], micro_grads: Sequence[Sequence[Tensor]], *,
                    weight_decay: float = 0.0, batch_dims: int = 0, per_tensor: bool = False) -> Tensor:
    r"""Estimate of :math:`\lVert\nabla U\rVert^2` from :math:`k` gradient estimates.

    With :math:`k \ge 2` independent estimates :math:`f^{(j)} = g^{(j)} + \lambda\theta`, the
    U-statistic :math:`\frac{1}{k(k-1)}\sum_{j\ne l} f^{(j)}\cdot f^{(l)}` is unbiased
    (:func:`gradient_square_from_moments`). With one, :math:`\lVert f\rVert^2` is biased upward by
    :math:`\operatorname{tr}\Sigma_B` (exact for full-batch gradients).
    """
    weight_decay = check_non_negative("weight_decay", weight_decay)
    k = _check_micro(micro_grads, 1)
    forces = [_force(params, g, weight_decay) for g in micro_grads]
    total = forces[0] if k == 1 else [sum(f[i] for f in forces) for i in range(len(params))]
    total_sq = batched_dot(total, total, batch_dims, per_tensor=per_tensor)
    sum_sq = sum(batched_dot(f, f, batch_dims, per_tensor=per_tensor) for f in forces) if k > 1 else None
    return gradient_square_from_moments(total_sq, sum_sq, k)
