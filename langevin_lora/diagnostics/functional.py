r"""Pure estimators of the Gibbs-stationarity identities (THEORY §3).

Everything here follows from one identity of the Gibbs measure
:math:`\pi_\beta \propto e^{-\beta U}`, :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2`:
for any smooth vector field :math:`\varphi`,

.. math::
    \mathbb E_\pi[\varphi\cdot\nabla U] = \beta^{-1}\,\mathbb E_\pi[\nabla\!\cdot\varphi].

- :math:`\varphi = \theta - c` (c constant) gives the **virial temperature**
  :math:`\tfrac1d\mathbb E[(\theta-c)\cdot\nabla U] = 1/\beta`;
- :math:`\varphi = e_i` gives the **mean force** :math:`\mathbb E[\partial_i U] = 0`;
- :math:`\varphi = \nabla U` gives the **configurational temperature**
  :math:`\mathbb E|\nabla U|^2 / \mathbb E[\Delta U] = 1/\beta`;
- the LoRA gauge field :math:`(A, B) \mapsto (E_{ab}A, -BE_{ab})`, along which :math:`\hat L` is
  constant, gives the **gauge identity** :math:`\mathbb E[\beta\lambda(AA^\top - B^\top B)] =
  (\text{in} - \text{out})\,I`.

Conventions shared by every function:

- ``params`` / ``grads`` are lists of tensors; ``grads`` are gradients of the **mean** loss
  :math:`\hat L` (weight decay not included: it is added here as :math:`\lambda\theta`).
- ``batch_dims``: the number of leading dimensions that index independent chains (vectorised
  ensembles); every reduction sums over the remaining dimensions and over the list, so a result
  has shape ``params[0].shape[:batch_dims]`` (a scalar tensor when ``batch_dims == 0``).
- Quantities that mix groups weight each coordinate by its own :math:`\beta_i` and
  :math:`\lambda_i`; these functions handle one group (scalar :math:`\beta`, :math:`\lambda`) and
  the callers sum group results.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_int, check_non_negative, check_positive, check_real

__all__ = [
    "batched_dot",
    "virial_sum",
    "virial_temperature",
    "WindowCenter",
    "mean_force",
    "mean_force_chi2",
    "gauge_matrix",
    "gauge_gap",
    "gauge_target",
    "minibatch_noise_trace",
    "noise_ratio",
    "effective_temperature_factor",
    "gradient_square",
    "HessianVectorProduct",
    "hutchinson_laplacian",
    "power_iteration",
    "configurational_temperature",
]


# -- small helpers --------------------------------------------------------------------------------
def _check_batch_dims(batch_dims: int, tensors: Sequence[Tensor]) -> int:
    batch_dims = check_int("batch_dims", batch_dims, low=0)
    for t in tensors:
        if t.dim() < batch_dims:
            raise ValueError(f"Invalid batch_dims: {batch_dims} (tensors have only {t.dim()} dimensions)")
    return batch_dims


def _reduce(t: Tensor, batch_dims: int) -> Tensor:
    """Sum over every dimension after the first ``batch_dims`` (accumulating in fp32 or better)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if t.dim() == batch_dims:
        return t
    return t.sum(dim=tuple(range(batch_dims, t.dim())))


def batched_dot(xs: Sequence[Tensor], ys: Sequence[Tensor], batch_dims: int = 0) -> Tensor:
    r""":math:`\sum_k \langle x_k, y_k\rangle`, summed over the list and over the non-batch dimensions."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"Invalid xs/ys: expected two non-empty lists of equal length, got {len(xs)} and {len(ys)}")
    batch_dims = _check_batch_dims(batch_dims, xs)
    total = None
    for x, y in zip(xs, ys):
        term = _reduce(x * y, batch_dims)
        total = term if total is None else total + term
    return total


def _numel(params: Sequence[Tensor], batch_dims: int) -> int:
    return sum(p[(0,) * batch_dims].numel() if batch_dims else p.numel() for p in params)


def _force(params: Sequence[Tensor], grads: Sequence[Tensor], weight_decay: float) -> list[Tensor]:
    if weight_decay == 0:
        return list(grads)
    return [g + weight_decay * p for p, g in zip(params, grads)]


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
               weight_decay: float = 0.0, batch_dims: int = 0) -> Tensor:
    r""":math:`\sum_i (\theta_i - c_i)(g_i + \lambda\theta_i)` (``centers=None`` means :math:`c = 0`)."""
    _check_lists(params, grads)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    force = _force(params, grads, weight_decay)
    if centers is None:
        return batched_dot(params, force, batch_dims)
    _check_lists(params, centers, "centers")
    return batched_dot([p - c for p, c in zip(params, centers)], force, batch_dims)


def virial_temperature(params: Sequence[Tensor], grads: Sequence[Tensor], centers: Sequence[Tensor] | None = None,
                       *, weight_decay: float = 0.0, beta: float = 1.0, batch_dims: int = 0) -> Tensor:
    r"""Centred virial temperature of one gradient evaluation, in units of :math:`1/\beta`.

    .. math::
        \beta\,T_{\mathrm{vir}} = \frac{\beta}{d}\sum_{i=1}^d (\theta_i - c_i)\,(g_i + \lambda\theta_i),
        \qquad \mathbb E_\pi[\beta T_{\mathrm{vir}}] = 1

    for any constant centre :math:`c` (the identity with :math:`\varphi = \theta - c`). Linear in
    the gradient, so a single unbiased minibatch gradient suffices. Centre on a recent mean of
    :math:`\theta` (:class:`WindowCenter`): the uncentred form has a variance of order
    :math:`|\mathbb E\theta|^2` and, under minibatch noise, a different bias (THEORY §3).

    Known biases (expected, not errors): the ULA step gives
    :math:`\beta T = \operatorname{tr}[(I - \eta K/2)^{-1}]/d` on a quadratic with Hessian
    :math:`K`; minibatch gradient noise multiplies the temperature by about :math:`1 + \rho`
    (:func:`noise_ratio`).

    Returns a tensor of shape ``batch shape`` (time-average it over a chain before judging).
    """
    beta = check_positive("beta", beta)
    s = virial_sum(params, grads, centers, weight_decay=weight_decay, batch_dims=batch_dims)
    return s * (beta / _numel(params, batch_dims))


class WindowCenter:
    r"""The centre :math:`c` of the virial, held constant within each window of ``window`` steps.

    While window :math:`k \ge 1` runs, the centre is the mean of :math:`\theta` over window
    :math:`k-1` (``mode="previous"``, THEORY §3) or over windows :math:`0..k-1`
    (``mode="expanding"``). A constant centre keeps the identity
    :math:`\mathbb E[(\theta - c)\cdot\nabla U] = d/\beta` up to the correlation between the
    current :math:`\theta` and the past it averages. On an Ornstein–Uhlenbeck mode with per-step
    autocorrelation :math:`a` and :math:`s_L = (1-a^L)/(1-a)`, the relative bias during window
    :math:`k` is exactly :math:`-a\,s_W s_W/W^2` (previous) or :math:`-a\,s_W s_{kW}/(kW^2)`
    (expanding). ``previous`` tracks a drifting mean but, for modes slower than the window
    (:math:`\tau \gg W`), its bias tends to :math:`-1`: the slow modes drop out of the
    temperature. ``expanding`` has a bias that vanishes as :math:`\tau/(2t)` whatever
    :math:`\tau`, which suits LoRA's slow directions. During the first window the centre is the
    first observed :math:`\theta` (biased by its correlation with the next steps; judge from the
    second window on).
    """

    MODES = ("previous", "expanding")

    def __init__(self, window: int = 200, mode: str = "previous") -> None:
        self.window = check_int("window", window, low=1)
        if mode not in self.MODES:
            raise ValueError(f"Invalid mode: {mode!r} (expected one of {', '.join(map(repr, self.MODES))})")
        self.mode = mode
        self.center: list[Tensor] | None = None
        self._acc: list[Tensor] | None = None
        self._total: list[Tensor] | None = None
        self._count = 0
        self._windows = 0

    def __call__(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The centre to use for ``params`` now, then record ``params`` into the running window."""
        with torch.no_grad():
            if self.center is None:
                self.center = [p.detach().clone() for p in params]
                self._acc = [torch.zeros_like(p) for p in params]
                self._total = [torch.zeros_like(p) for p in params]
            center = self.center
            torch._foreach_add_(self._acc, [p.detach() for p in params])
            self._count += 1
            if self._count == self.window:
                self._windows += 1
                if self.mode == "previous":
                    self.center = torch._foreach_div(self._acc, float(self.window))
                else:
                    torch._foreach_add_(self._total, self._acc)
                    self.center = torch._foreach_div(self._total, float(self.window * self._windows))
                for a in self._acc:
                    a.zero_()
                self._count = 0
        return center


# -- mean force ---------------------------------------------------------------------------------
def mean_force(params: Sequence[Tensor], grads: Sequence[Tensor], *, weight_decay: float = 0.0) -> list[Tensor]:
    r"""The force :math:`\nabla U = g + \lambda\theta` per tensor; :math:`\mathbb E_\pi[\nabla U] = 0`."""
    _check_lists(params, grads)
    return _force(params, grads, check_non_negative("weight_decay", weight_decay))


def mean_force_chi2(block_means: Tensor) -> tuple[Tensor, float]:
    r"""Per-coordinate batch-means :math:`\chi^2` test of :math:`\mathbb E[\nabla U] = 0`.

    ``block_means`` has shape ``(m, *batch, d)``: the time average of :math:`\nabla U` over each
    of :math:`m \ge 4` consecutive blocks (blocks much longer than the autocorrelation time). Per
    coordinate, :math:`t_i = \bar f_i / (s_i/\sqrt m)` with :math:`s_i` the between-block standard
    deviation. Returns :math:`\chi^2/d = \tfrac1d\sum_i t_i^2` (shape ``batch``) and its value
    :math:`\mathbb E[t^2_{m-1}] = (m-1)/(m-3)` under stationarity with independent blocks. A chain
    still drifting has :math:`\chi^2/d \gg (m-1)/(m-3)`; so does one whose blocks are shorter than
    its autocorrelation time.
    """
    if block_means.dim() < 2:
        raise ValueError(f"Invalid block_means: expected shape (blocks, ..., d), got {tuple(block_means.shape)}")
    m = block_means.shape[0]
    if m < 4:
        raise ValueError(f"Invalid block_means: {m} blocks (expected >= 4)")
    x = block_means.double()
    mean = x.mean(0)
    var = x.var(0, unbiased=True).clamp_min(torch.finfo(torch.float64).tiny)
    t2 = mean.square() * m / var
    return t2.mean(-1), (m - 1) / (m - 3)


# -- LoRA gauge identity ------------------------------------------------------------------------
def gauge_target(fan_in: int, fan_out: int, beta: float, weight_decay: float) -> float:
    r""":math:`(\text{in} - \text{out})/(\beta\lambda)`: the stationary :math:`\mathbb E[AA^\top - B^\top B]`
    per diagonal entry (0 off the diagonal)."""
    check_int("fan_in", fan_in, low=1)
    check_int("fan_out", fan_out, low=1)
    check_positive("beta", beta)
    check_positive("weight_decay", weight_decay)
    return (fan_in - fan_out) / (beta * weight_decay)


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
    beta = check_positive("beta", beta)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    beta_B = beta if beta_B is None else check_positive("beta_B", beta_B)
    weight_decay_B = weight_decay if weight_decay_B is None else check_non_negative("weight_decay_B", weight_decay_B)
    if A.shape[-2] != B.shape[-1]:
        raise ValueError(f"Invalid A/B: rank mismatch, A has {A.shape[-2]} rows and B {B.shape[-1]} columns")
    A = A.reshape(*A.shape[:-2], A.shape[-2], -1)
    Af, Bf = A.detach().double(), B.detach().double()
    return (beta * weight_decay) * Af @ Af.transpose(-1, -2) - (beta_B * weight_decay_B) * Bf.transpose(-1, -2) @ Bf


def gauge_gap(A: Tensor, B: Tensor, *, beta: float, weight_decay: float,
              beta_B: float | None = None, weight_decay_B: float | None = None) -> Tensor:
    r"""Trace form of the gauge identity: :math:`\operatorname{tr}(D_\beta)/r - (\text{in} - \text{out})`,
    0 in expectation at stationarity; it costs two squared norms,

    .. math::
        \operatorname{tr} D_\beta = \beta_A\lambda_A\lVert A\rVert^2 - \beta_B\lambda_B\lVert B\rVert^2 .

    Returns a float64 tensor of shape ``A.shape[:-2]``.
    """
    beta = check_positive("beta", beta)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    beta_B = beta if beta_B is None else check_positive("beta_B", beta_B)
    weight_decay_B = weight_decay if weight_decay_B is None else check_non_negative("weight_decay_B", weight_decay_B)
    r = A.shape[-2]
    fan_in = A[(0,) * (A.dim() - 1)].numel() if A.dim() >= 2 else 1
    fan_out = B.shape[-2]
    a2 = A.detach().double().square().sum(dim=(-2, -1))
    b2 = B.detach().double().square().sum(dim=(-2, -1))
    return (beta * weight_decay * a2 - beta_B * weight_decay_B * b2) / r - (fan_in - fan_out)


# -- minibatch noise ------------------------------------------------------------------------------
def minibatch_noise_trace(micro_grads: Sequence[Sequence[Tensor]], *, precond: Sequence[Tensor] | None = None,
                          batch_dims: int = 0) -> Tensor:
    r"""Unbiased :math:`\operatorname{tr}(G\Sigma_B)` of the **averaged** gradient
    :math:`\bar g = \tfrac1k\sum_j g^{(j)}` from :math:`k \ge 2` independent micro-batch gradients.

    .. math::
        \widehat{\operatorname{tr}\Sigma_B} = \frac{1}{k(k-1)}\sum_{j=1}^k \lVert g^{(j)} - \bar g\rVert_G^2,

    which for two half-batches is THEORY's :math:`\lVert g^1 - g^2\rVert^2/4`. ``precond`` weights
    coordinates by the frozen preconditioner :math:`G` (identity when ``None``).
    """
    k = len(micro_grads)
    if k < 2:
        raise ValueError(f"Invalid micro_grads: {k} gradient estimates (expected >= 2 independent ones)")
    n = len(micro_grads[0])
    if any(len(g) != n for g in micro_grads):
        raise ValueError("Invalid micro_grads: every gradient estimate must hold the same number of tensors")
    mean = [sum(g[i] for g in micro_grads) / k for i in range(n)]
    total = None
    for g in micro_grads:
        diff = [gi - mi for gi, mi in zip(g, mean)]
        weighted = diff if precond is None else [d * G for d, G in zip(diff, precond)]
        term = batched_dot(weighted, diff, batch_dims)
        total = term if total is None else total + term
    return total / (k * (k - 1))


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
    return tr * (lr * beta / (2.0 * _numel(micro_grads[0], batch_dims)))


def effective_temperature_factor(rho: float | Tensor) -> float | Tensor:
    r"""The temperature inflation :math:`1 + \rho` implied by a noise ratio: :math:`T_{\mathrm{eff}} = (1+\rho)/\beta`."""
    return 1.0 + rho


def gradient_square(params: Sequence[Tensor], micro_grads: Sequence[Sequence[Tensor]], *,
                    weight_decay: float = 0.0, batch_dims: int = 0) -> Tensor:
    r"""Estimate of :math:`\lVert\nabla U\rVert^2` from :math:`k` gradient estimates.

    With :math:`k \ge 2` independent estimates :math:`f^{(j)} = g^{(j)} + \lambda\theta`, the
    U-statistic :math:`\frac{1}{k(k-1)}\sum_{j\ne l} f^{(j)}\cdot f^{(l)}` is unbiased. With one,
    :math:`\lVert f\rVert^2` is biased upward by :math:`\operatorname{tr}\Sigma_B` (exact for
    full-batch gradients).
    """
    weight_decay = check_non_negative("weight_decay", weight_decay)
    k = len(micro_grads)
    if k == 0:
        raise ValueError("Invalid micro_grads: expected at least one gradient estimate")
    forces = [_force(params, g, weight_decay) for g in micro_grads]
    if k == 1:
        return batched_dot(forces[0], forces[0], batch_dims)
    total = [sum(f[i] for f in forces) for i in range(len(params))]
    sq_total = batched_dot(total, total, batch_dims)
    sq_each = sum(batched_dot(f, f, batch_dims) for f in forces)
    return (sq_total - sq_each) / (k * (k - 1))


# -- Hessian-vector products ---------------------------------------------------------------------
class HessianVectorProduct:
    r"""Hessian-vector products :math:`v \mapsto \nabla^2\hat L(\theta)\,v` of a scalar loss.

    ``method="double_backward"`` differentiates the gradient graph (built once, reused for many
    vectors, e.g. power iteration); ``"finite_difference"`` uses central differences of the
    gradient,

    .. math::
        \nabla^2\hat L\,v \approx \frac{\nabla\hat L(\theta + \epsilon v) - \nabla\hat L(\theta - \epsilon v)}{2\epsilon},
        \qquad \epsilon = \texttt{fd\_eps}\cdot\max(\lVert\theta\rVert, 1)/\lVert v\rVert,

    exact for quadratics, :math:`O(\epsilon^2)` otherwise, with :math:`\theta` restored bitwise;
    ``"auto"`` tries double backward and falls back (with one warning) when it raises, e.g. for
    kernels without a second derivative. ``loss_fn`` must be deterministic between calls (the
    callback replays the global RNG for dropout). ``batch_dims`` marks leading chain dimensions
    (the loss must then be a sum of independent per-chain losses).
    """

    METHODS = ("auto", "double_backward", "finite_difference")

    def __init__(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *, method: str = "auto",
                 fd_eps: float = 1e-3, batch_dims: int = 0) -> None:
        if method not in self.METHODS:
            raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(map(repr, self.METHODS))})")
        self.loss_fn = loss_fn
        self.params = list(params)
        if not self.params:
            raise ValueError("Invalid params: expected a non-empty list of tensors")
        self.method = method
        self.fd_eps = check_real("fd_eps", fd_eps, low=0.0, high=1.0, low_open=True)
        self.batch_dims = _check_batch_dims(batch_dims, self.params)
        self._grads: tuple[Tensor, ...] | None = None
        self.used_method: str | None = None
        self.loss: Tensor | None = None

    def _build(self) -> None:
        with torch.enable_grad():
            loss = self.loss_fn()
            self.loss = loss.detach()
            self._grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    def _double_backward(self, vs: Sequence[Tensor]) -> list[Tensor]:
        if self._grads is None:
            self._build()
        pairs = [(g, v) for g, v in zip(self._grads, vs) if g is not None and g.requires_grad]
        if not pairs:
            raise RuntimeError("the gradient does not depend on the parameters (no graph for a second derivative)")
        hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[v for _, v in pairs],
                                 retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]

    def _gradient(self) -> list[Tensor]:
        with torch.enable_grad():
            loss = self.loss_fn()
            if self.loss is None:
                self.loss = loss.detach()
            g = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(self.params, g)]

    def _finite_difference(self, vs: Sequence[Tensor]) -> list[Tensor]:
        bd = self.batch_dims
        with torch.no_grad():
            theta_norm = batched_dot(self.params, self.params, bd).sqrt().clamp_min(1.0)
            v_norm = batched_dot(vs, vs, bd).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
            eps = self.fd_eps * theta_norm / v_norm  # batch shape

            def scaled(v: Tensor) -> Tensor:
                e = eps.to(v.dtype).reshape(eps.shape + (1,) * (v.dim() - bd))
                return v * e

            steps = [scaled(v) for v in vs]
            saved = [p.detach().clone() for p in self.params]
            try:
                torch._foreach_add_([p.data for p in self.params], steps)
                g_plus = self._gradient()
                for p, s in zip(self.params, saved):
                    p.data.copy_(s)
                torch._foreach_sub_([p.data for p in self.params], steps)
                g_minus = self._gradient()
            finally:
                for p, s in zip(self.params, saved):
                    p.data.copy_(s)
            out = []
            for gp, gm in zip(g_plus, g_minus):
                e = (2 * eps).to(gp.dtype).reshape(eps.shape + (1,) * (gp.dim() - bd))
                out.append((gp - gm) / e)
            return out

    def __call__(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """:math:`\\nabla^2\\hat L\\, v` for each tensor of ``vs`` (shaped like ``params``)."""
        if len(vs) != len(self.params):
            raise ValueError(f"Invalid vs: expected {len(self.params)} tensors, got {len(vs)}")
        if self.method == "finite_difference" or self.used_method == "finite_difference":
            self.used_method = "finite_difference"
            return self._finite_difference(vs)
        if self.method == "double_backward":
            self.used_method = "double_backward"
            return self._double_backward(vs)
        try:
            out = self._double_backward(vs)
            self.used_method = "double_backward"
            return out
        except (RuntimeError, NotImplementedError) as exc:
            warnings.warn(f"Hessian-vector product by double backward failed ({str(exc).splitlines()[0][:160]}); "
                          "falling back to central finite differences of the gradient", RuntimeWarning, stacklevel=2)
            self._grads = None
            self.used_method = "finite_difference"
            return self._finite_difference(vs)


def _rademacher(params: Sequence[Tensor], generator: torch.Generator | None) -> list[Tensor]:
    out = []
    for p in params:
        z = torch.randint(0, 2, p.shape, generator=generator, device=p.device if generator is None else generator.device,
                          dtype=torch.int8)
        out.append(z.to(device=p.device, dtype=p.dtype).mul_(2).sub_(1))
    return out


def hutchinson_laplacian(hvp: Callable[[Sequence[Tensor]], Sequence[Tensor]], params: Sequence[Tensor], *,
                         weight_decay: float = 0.0, num_probes: int = 1, generator: torch.Generator | None = None,
                         batch_dims: int = 0) -> Tensor:
    r"""Hutchinson estimate of :math:`\Delta U = \operatorname{tr}\nabla^2\hat L + \lambda d`.

    .. math::
        \widehat{\Delta U} = \frac1m\sum_{k=1}^m z_k^\top\nabla^2\hat L\,z_k + \lambda d,
        \qquad z_k \text{ Rademacher},

    unbiased, with variance :math:`\tfrac2m\sum_{i\ne j}H_{ij}^2`. ``generator`` draws the
    probes (pass one to keep the global RNG untouched).
    """
    weight_decay = check_non_negative("weight_decay", weight_decay)
    num_probes = check_int("num_probes", num_probes, low=1)
    total = None
    for _ in range(num_probes):
        z = _rademacher(params, generator)
        hz = hvp(z)
        term = batched_dot(z, hz, batch_dims)
        total = term if total is None else total + term
    return total / num_probes + weight_decay * _numel(params, batch_dims)


def power_iteration(hvp: Callable[[Sequence[Tensor]], Sequence[Tensor]], params: Sequence[Tensor], *,
                    weight_decay: float = 0.0, scale: Sequence[Tensor | float] | None = None, num_iters: int = 20,
                    generator: torch.Generator | None = None, batch_dims: int = 0,
                    init: Sequence[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    r"""Largest-magnitude eigenvalue of :math:`M^{1/2}\,\nabla^2 U\,M^{1/2}` by power iteration.

    :math:`\nabla^2 U = \nabla^2\hat L + \lambda I`. With ``scale`` :math:`M = \eta G` (per
    coordinate: step size times frozen preconditioner) the result is directly the stability
    number :math:`\eta\lambda_{\max}` of the (preconditioned) Langevin step: the discrete chain
    is unstable above 2 and biased well before; keep it :math:`\lesssim 0.1` (THEORY §2). Returns
    the Rayleigh quotient after ``num_iters`` products (shape ``batch``) and the unit vector.
    """
    weight_decay = check_non_negative("weight_decay", weight_decay)
    num_iters = check_int("num_iters", num_iters, low=1)
    bd = batch_dims

    def expand(x: Tensor, like: Tensor) -> Tensor:
        return x.to(like.dtype).reshape(x.shape + (1,) * (like.dim() - bd))

    sq = None
    if scale is not None:
        sq = [s ** 0.5 if isinstance(s, (int, float)) else s.sqrt() for s in scale]
    v = list(init) if init is not None else [torch.randn(p.shape, generator=generator, dtype=p.dtype,
                                                         device=generator.device if generator is not None else p.device).to(p.device)
                                             for p in params]

    def normalise(xs: list[Tensor]) -> list[Tensor]:
        n = batched_dot(xs, xs, bd).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        return [x / expand(n, x) for x in xs]

    def apply(xs: list[Tensor]) -> list[Tensor]:
        ys = xs if sq is None else [x * s for x, s in zip(xs, sq)]
        hy = hvp(ys)
        hy = [h + weight_decay * y for h, y in zip(hy, ys)] if weight_decay else list(hy)
        return hy if sq is None else [h * s for h, s in zip(hy, sq)]

    v = normalise(v)
    eig = None
    for _ in range(num_iters):
        w = apply(v)
        eig = batched_dot(v, w, bd)
        v = normalise(w)
    return eig, v


def configurational_temperature(grad_square: Tensor, laplacian: Tensor, *, beta: float = 1.0) -> Tensor:
    r"""Configurational temperature in units of :math:`1/\beta`, a ratio of time averages:

    .. math::
        \beta T_{\mathrm{conf}} = \beta\,\frac{\overline{\lVert\nabla U\rVert^2}}{\overline{\Delta U}}
        \;\xrightarrow{\ \pi_\beta\ }\; 1 .

    ``grad_square`` (from :func:`gradient_square`) and ``laplacian`` (from
    :func:`hutchinson_laplacian`) are traces over time along dimension 0 (they may be sampled at
    different steps). The ULA step biases it by about
    :math:`1 + \tfrac\eta2\operatorname{tr}H^2/\operatorname{tr}H` (exactly
    :math:`\operatorname{tr}[H(I-\eta H/2)^{-1}]/\operatorname{tr}H` on a quadratic).
    """
    beta = check_positive("beta", beta)
    return beta * grad_square.double().mean(0) / laplacian.double().mean(0)
