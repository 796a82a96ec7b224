r"""Functional core of every Langevin update in this package.

All samplers (:class:`~langevin_lora.LangevinSGD`, :class:`~langevin_lora.LangevinAdam` and the
:class:`~langevin_lora.LangevinLoRA` callback) step through :class:`~langevin_lora.core.engine.LangevinEngine`,
which calls :func:`langevin_step_`, the frozen-preconditioner unadjusted Langevin step (THEORY §1–2)

.. math::
    \theta \leftarrow \theta - \eta\, G \odot \big(g + \lambda\theta\big)
        + \sqrt{2\eta/\beta}\; \sqrt{G} \odot \xi, \qquad \xi \sim N(0, I),

with :math:`g` an unbiased minibatch gradient of the mean loss, :math:`\lambda` the weight decay
(coupled: it passes through :math:`G`), and :math:`G` a diagonal preconditioner that is constant
while sampling (:math:`G \equiv 1` for SGLD). A constant :math:`G` makes the divergence
correction :math:`\Gamma = \nabla\!\cdot G` vanish, so the step leaves
:math:`\pi_\beta \propto e^{-\beta U}` invariant up to :math:`O(\eta)`.

and :func:`kinetic_step_`, one step of kinetic (underdamped) Langevin by the BAOAB splitting
(THEORY §2b). Both take an optional prior centre :math:`\theta_0` (a local posterior, THEORY §6):
the potential is then :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2` and the
drift's :math:`\lambda\theta` becomes :math:`\lambda(\theta - \theta_0)` (:func:`potential_force`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_real

__all__ = ["LOW_PRECISION", "langevin_step_", "kinetic_step_", "kinetic_coefficients", "potential_force", "check_friction",
           "FRICTION_AUTO", "frozen_preconditioner", "adapted_preconditioner", "accumulate_potential_grad_sq_",
           "adam_inverse_scale", "median_scale", "all_finite"]

#: Parameter dtypes whose update arithmetic runs on float32 master copies (and whose sums run in float32).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """``True`` when every element of every tensor is finite (one reduction per device/dtype)."""
    if not tensors:
        return True
    # One reduction per (device, dtype) bucket, in the tensors' own dtype: casting the norms
    # (float64 -> float32) would turn large finite values into inf.
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for ts in buckets.values():
        # Fast path: the 2-norm (~10x faster than max|x| on CPU) is finite when every element is.
        # Only a non-finite 2-norm is re-checked with max|x|, which never overflows, so a
        # finite-but-large fp16 gradient is not mistaken for inf.
        if bool(torch.stack(torch._foreach_norm(ts, 2)).isfinite().all()):
            continue
        if not bool(torch.stack(torch._foreach_norm(ts, math.inf)).isfinite().all()):
            return False
    return True


def adam_inverse_scale(exp_avg_sq: Tensor, step: int | float, beta2: float, eps: float) -> Tensor:
    r""":math:`1/(\sqrt{\hat v} + \epsilon)` with :math:`\hat v = v/(1-\beta_2^t)`; ones when ``step == 0``."""
    if step <= 0:
        return torch.ones_like(exp_avg_sq)
    return 1.0 / ((exp_avg_sq / (1.0 - beta2 ** step)).sqrt() + eps)


def median_scale(tensors: Sequence[Tensor]) -> float:
    """Median of all elements of ``tensors`` together (the reference scale of the clamp)."""
    return float(torch.cat([t.detach().reshape(-1) for t in tensors]).median())


def frozen_preconditioner(exp_avg_sq: Tensor, step: int | float, beta2: float, eps: float,
                          clamp: tuple[float, float] = (0.01, 100.0),
                          reference: float | None = None) -> Tensor:
    r"""Freeze an Adam second moment into a Langevin preconditioner.

    .. math::
        \hat v = v / (1 - \beta_2^{t}), \qquad
        G = \operatorname{clamp}\!\big(1/(\sqrt{\hat v} + \epsilon),\ c_{lo}\, m,\ c_{hi}\, m\big),

    with :math:`m` the ``reference`` scale: by default the median of the unclamped :math:`G` over
    this tensor; :class:`~langevin_lora.LangevinAdam` and the callback pass the median over every
    tensor frozen together (:func:`median_scale`), so a tensor whose gradient stayed ~0 is capped
    too. The clamp matters for LoRA: :math:`B = 0` at start, so :math:`\partial L/\partial A = 0`
    early, :math:`v_A \approx 0` and :math:`1/\epsilon` would make the noise explode (THEORY §2).
    With ``step == 0`` (no moment yet) :math:`G \equiv 1`.
    """
    lo, hi = clamp
    g = adam_inverse_scale(exp_avg_sq, step, beta2, eps)
    m = float(g.median()) if reference is None else float(reference)
    return g.clamp_(min=lo * m, max=hi * m)


def adapted_preconditioner(grad_sq_means: Sequence[Tensor], reference: float, eps: float = 1e-8,
                           clamp: tuple[float, float] = (0.01, 100.0)) -> list[Tensor]:
    r"""Re-shape a frozen preconditioner from squared gradients of :math:`U` measured *while sampling*.

    At stationarity of :math:`\pi_\beta \propto e^{-\beta U}`, integration by parts gives
    :math:`\mathbb E[(\partial_i U)^2] = \mathbb E[\partial_{ii} U]/\beta`, so the mean square
    :math:`v_i` of :math:`\partial_i U = g_i + \lambda\theta_i` over a few hundred noisy steps
    measures curvature, and :math:`1/\sqrt{v_i}\propto(\mathbb E\,\partial_{ii}U)^{-1/2}`. A second
    moment collected during a *noise-free* descent instead records the gradients met on the way
    to the mode, which can leave :math:`G^{1/2}\nabla^2 U G^{1/2}` worse conditioned than
    :math:`\nabla^2 U` itself (bench_sampler.py's logistic regression: condition number 85 for
    :math:`G = 1`, 1300 after a noise-free Adam burn-in, 107 after 300 adaptation steps, which
    took effective samples per gradient from 0.36× to 1.01× SGLD's). The new preconditioner is

    .. math::
        r_i = 1/(\sqrt{v_i} + \epsilon), \qquad
        G_i = \operatorname{clamp}\big(r_i\, m / \operatorname{median}(r),\ c_{lo} m,\ c_{hi} m\big),

    with :math:`m` = ``reference``, the median scale of the preconditioner it replaces: only the
    *shape* changes, so a step size tuned for the old :math:`G` keeps its overall scale.

    Args:
        grad_sq_means: :math:`v`, per tensor (mean of :math:`(g + \lambda\theta)^2` over the window).
        reference: :math:`m > 0`, the median scale to keep.
        eps, clamp: as in :func:`frozen_preconditioner`.
    """
    lo, hi = clamp
    raw = [1.0 / (v.sqrt() + eps) for v in grad_sq_means]
    scale = float(reference) / median_scale(raw)
    return [r.mul_(scale).clamp_(min=lo * reference, max=hi * reference) for r in raw]


def accumulate_potential_grad_sq_(sums: list[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor],
                                  weight_decay: float, prior_centre: Sequence[Tensor] | None = None) -> None:
    r"""``sums[i] += (g_i + \lambda(\theta_i - \theta_{0,i}))^2`` in place: the running sums of the squared
    gradient of :math:`U` that :func:`adapted_preconditioner` turns into :math:`G` (read at the pre-step point)."""
    d = potential_force(params, grads, weight_decay, prior_centre)
    torch._foreach_addcmul_(sums, d, d)


def check_clamp(clamp: tuple[float, float]) -> tuple[float, float]:
    """``precond_clamp`` must be a pair ``0 < lo <= 1 <= hi < inf``."""
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise ValueError(f"Invalid precond_clamp: {clamp!r} (expected a pair (lo, hi) with 0 < lo <= 1 <= hi)") from None
    lo = check_real("precond_clamp[0]", lo, low=0.0, high=1.0, low_open=True)
    hi = check_real("precond_clamp[1]", hi, low=1.0)
    return lo, hi


def langevin_step_(params: list[Tensor], grads: list[Tensor], noise: list[Tensor] | None, *,
                   lr: float, noise_std: float, weight_decay: float = 0.0,
                   precond: list[Tensor] | None = None, precond_sqrt: list[Tensor] | None = None,
                   prior_centre: list[Tensor] | None = None, foreach: bool | None = None) -> None:
    r"""Apply one Langevin step in place to ``params``.

    .. math::
        \theta \leftarrow \theta - \eta\, G\odot\big(g + \lambda(\theta - \theta_0)\big) + \sigma \sqrt{G}\odot\xi,
        \qquad \sigma = \sqrt{2\eta/\beta}.

    Args:
        params: tensors updated in place (fp32/fp64 master copies for low-precision models).
        grads: gradients of the **mean** loss, same dtypes as ``params``; never modified.
        noise: standard normal draws shaped like ``params``, or ``None`` when ``noise_std == 0``.
        lr: step size :math:`\eta`.
        noise_std: :math:`\sigma = \sqrt{2\eta/\beta}` (0 for :math:`\beta = \infty`).
        weight_decay: :math:`\lambda`, coupled (passes through :math:`G`).
        precond, precond_sqrt: :math:`G` and :math:`\sqrt G` per tensor, or ``None`` for identity.
        prior_centre: :math:`\theta_0` per tensor, or ``None`` for :math:`\theta_0 = 0`.
        foreach: use the ``torch._foreach_*`` kernels (default: whenever there is more than
            one tensor). Both paths run the same elementwise operations and agree bitwise.
    """
    if not params:
        return
    if noise_std > 0 and noise is None:
        raise ValueError("noise must be given when noise_std > 0")
    fn = _multi_tensor_step if _use_foreach(foreach, params) else _single_tensor_step
    fn(params, grads, noise, lr=lr, noise_std=noise_std, weight_decay=weight_decay,
       precond=precond, precond_sqrt=precond_sqrt, prior_centre=prior_centre)


def _use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    return len(params) > 1 and not torch.jit.is_scripting() if foreach is None else foreach


def potential_force(params: Sequence[Tensor], grads: Sequence[Tensor], weight_decay: float,
                    prior_centre: Sequence[Tensor] | None = None, foreach: bool = True) -> list[Tensor]:
    r"""The force :math:`\nabla U = g + \lambda(\theta - \theta_0)` per tensor (new tensors, or ``grads``
    itself when :math:`\lambda = 0`), written once for the steps and the diagnostics:
    :math:`g + \lambda\theta` without a centre; with one, :math:`\theta - \theta_0` first (no
    cancellation when :math:`\theta \approx \theta_0` is large). The foreach and per-tensor forms
    run the same elementwise operations (bitwise equal)."""
    if weight_decay == 0:
        return list(grads)
    if foreach:
        diff = list(params) if prior_centre is None else torch._foreach_sub(list(params), list(prior_centre))
        return list(torch._foreach_add(list(grads), diff, alpha=weight_decay))
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        diff = p if prior_centre is None else torch.sub(p, prior_centre[i])
        out.append(torch.add(g, diff, alpha=weight_decay))
    return out


def _single_tensor_step(params, grads, noise, *, lr, noise_std, weight_decay, precond, precond_sqrt, prior_centre):
    forces = potential_force(params, grads, weight_decay, prior_centre, foreach=False)
    for i, (p, d) in enumerate(zip(params, forces)):
        if precond is not None:
            p.addcmul_(d, precond[i], value=-lr)   # one pass: p - lr * G * d
        else:
            p.add_(d, alpha=-lr)
        if noise_std > 0:
            if precond_sqrt is not None:
                p.addcmul_(noise[i], precond_sqrt[i], value=noise_std)
            else:
                p.add_(noise[i], alpha=noise_std)


def _multi_tensor_step(params, grads, noise, *, lr, noise_std, weight_decay, precond, precond_sqrt, prior_centre):
    # Same elementwise operations as the single-tensor path, in the same order (bitwise equal).
    d = potential_force(params, grads, weight_decay, prior_centre)
    if precond is not None:
        torch._foreach_addcmul_(params, d, precond, value=-lr)
    else:
        torch._foreach_add_(params, d, alpha=-lr)
    if noise_std > 0:
        if precond_sqrt is not None:
            torch._foreach_addcmul_(params, noise, precond_sqrt, value=noise_std)
        else:
            torch._foreach_add_(params, noise, alpha=noise_std)


# -- kinetic (underdamped) Langevin ----------------------------------------------------------------
#: ``friction="auto"``: :math:`\gamma = 2\sqrt{\lambda\,\min_i G_i}` per group (:func:`auto_friction`).
FRICTION_AUTO = "auto"


def check_friction(friction: object) -> float | str | None:
    """``friction`` must be ``None`` (overdamped), ``"auto"`` or a finite real number > 0."""
    if friction is None or friction == FRICTION_AUTO:
        return friction
    if isinstance(friction, str):
        raise ValueError(f"Invalid friction: {friction!r} (expected None, 'auto' or a real number > 0)")
    return check_real("friction", friction, low=0.0, low_open=True)


def auto_friction(weight_decay: float, precond: Sequence[Tensor] | None) -> float:
    r"""Near-critical damping of the slowest prior-dominated mode: :math:`\gamma = 2\sqrt{\lambda\,G_{\min}}`.

    Along a direction the data do not pin down, :math:`U` is the prior alone, whose curvature in the
    preconditioned coordinates is :math:`\lambda G_i`; for LoRA (:math:`d \gg N`) these directions
    are the slowest ones. A mode of curvature :math:`\omega^2` relaxes at rate :math:`\gamma/2` when
    :math:`\gamma < 2\omega` and :math:`\approx \omega^2/\gamma` when :math:`\gamma > 2\omega`, so
    :math:`\gamma = 2\omega_{\min}` maximises the slowest rate (THEORY §2b). Needs
    :math:`\lambda > 0` (without a prior there is no slowest mode to damp: pass a number).
    """
    if weight_decay <= 0:
        raise ValueError("Invalid friction: 'auto' needs weight_decay > 0 (it damps the prior-dominated modes, "
                         "curvature weight_decay * G); pass a number instead")
    g_min = 1.0 if precond is None else min(float(G.min()) for G in precond)
    return 2.0 * math.sqrt(weight_decay * g_min)


def kinetic_coefficients(lr: float, friction: float, beta: float) -> tuple[float, float]:
    r"""The O-step's damping :math:`e^{-\gamma h}` and noise scale :math:`\sqrt{(1 - e^{-2\gamma h})/\beta}`
    (0 at :math:`\beta = \infty`: deterministic damped dynamics)."""
    damping = math.exp(-friction * lr)
    std = 0.0 if math.isinf(beta) else math.sqrt(-math.expm1(-2.0 * friction * lr) / beta)
    return damping, std


def kinetic_step_(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], noise: list[Tensor] | None, *,
                  lr: float, kick: float | Sequence[float], damping: float, noise_std: float,
                  weight_decay: float = 0.0, precond: list[Tensor] | None = None,
                  precond_sqrt: list[Tensor] | None = None, prior_centre: list[Tensor] | None = None,
                  foreach: bool | None = None) -> None:
    r"""One BAOAB step of kinetic Langevin, in place on ``params`` and ``momenta`` (THEORY §2b).

    With mass :math:`G^{-1}` and :math:`p` standing for :math:`G\cdot p` (a velocity), the SDE
    :math:`d\theta = p\,dt`, :math:`dp = -G\nabla U\,dt - \gamma p\,dt + \sqrt{2\gamma/\beta}\sqrt G\,dW`
    leaves :math:`\exp(-\beta(U(\theta) + \tfrac12 p^\top G^{-1} p))` invariant: its
    :math:`\theta`-marginal is :math:`\pi_\beta`. One step of size :math:`h`, with
    :math:`\nabla U = g + \lambda(\theta - \theta_0)` at the current :math:`\theta`:

    .. math::
        p &\leftarrow p - k\, G\odot\nabla U(\theta) &&\text{(B: closing kick of the last step + opening kick)}\\
        \theta &\leftarrow \theta + \tfrac h2\, p &&\text{(A)}\\
        p &\leftarrow e^{-\gamma h} p + \sqrt{(1 - e^{-2\gamma h})/\beta}\;\sqrt G\odot\xi &&\text{(O)}\\
        \theta &\leftarrow \theta + \tfrac h2\, p &&\text{(A)}

    The closing B of BAOAB (:math:`p \mathrel{-}= \tfrac h2 G\nabla U(\theta')`) needs the gradient at the
    new point, which the next step computes anyway: it is folded into that step's kick
    :math:`k = (h_{t-1} + h_t)/2` (:math:`h/2` at the first step), so one gradient per step and the
    stored momentum is the one *before* the closing kick (its stationary law is exactly
    :math:`N(0, G/\beta)` on a Gaussian target, THEORY §2b and :mod:`langevin_lora.diagnostics`).

    Args:
        params, grads, noise, weight_decay, precond, precond_sqrt, prior_centre, foreach: as in
            :func:`langevin_step_` (``noise`` may be ``None`` when ``noise_std == 0``).
        momenta: :math:`p` per tensor (same shapes and dtypes as ``params``), updated in place.
        lr: the step :math:`h` (the A steps move :math:`\theta` by :math:`h/2\cdot p` each).
        kick: :math:`k`, one value or one per tensor.
        damping, noise_std: :math:`e^{-\gamma h}` and :math:`\sqrt{(1 - e^{-2\gamma h})/\beta}`
            (:func:`kinetic_coefficients`).
    """
    if not params:
        return
    if noise_std > 0 and noise is None:
        raise ValueError("noise must be given when noise_std > 0")
    kicks = [float(kick)] * len(params) if isinstance(kick, (int, float)) else [float(k) for k in kick]
    fn = _multi_tensor_kinetic if _use_foreach(foreach, params) else _single_tensor_kinetic
    fn(params, grads, momenta, noise, lr=lr, kicks=kicks, damping=damping, noise_std=noise_std,
       weight_decay=weight_decay, precond=precond, precond_sqrt=precond_sqrt, prior_centre=prior_centre)


def _single_tensor_kinetic(params, grads, momenta, noise, *, lr, kicks, damping, noise_std, weight_decay, precond,
                           precond_sqrt, prior_centre):
    forces = potential_force(params, grads, weight_decay, prior_centre, foreach=False)
    for i, (p, m, d) in enumerate(zip(params, momenta, forces)):
        if precond is not None:
            m.addcmul_(d, precond[i], value=-kicks[i])
        else:
            m.add_(d, alpha=-kicks[i])
        p.add_(m, alpha=0.5 * lr)
        m.mul_(damping)
        if noise_std > 0:
            if precond_sqrt is not None:
                m.addcmul_(noise[i], precond_sqrt[i], value=noise_std)
            else:
                m.add_(noise[i], alpha=noise_std)
        p.add_(m, alpha=0.5 * lr)


def _multi_tensor_kinetic(params, grads, momenta, noise, *, lr, kicks, damping, noise_std, weight_decay, precond,
                          precond_sqrt, prior_centre):
    # Same elementwise operations as the single-tensor path, in the same order (bitwise equal).
    d = potential_force(params, grads, weight_decay, prior_centre)
    for k in dict.fromkeys(kicks):   # one kernel per distinct kick (one, but for a tensor's first step)
        idx = [i for i, ki in enumerate(kicks) if ki == k]
        ms, ds = [momenta[i] for i in idx], [d[i] for i in idx]
        if precond is not None:
            torch._foreach_addcmul_(ms, ds, [precond[i] for i in idx], value=-k)
        else:
            torch._foreach_add_(ms, ds, alpha=-k)
    torch._foreach_add_(params, momenta, alpha=0.5 * lr)
    torch._foreach_mul_(momenta, damping)
    if noise_std > 0:
        if precond_sqrt is not None:
            torch._foreach_addcmul_(momenta, noise, precond_sqrt, value=noise_std)
        else:
            torch._foreach_add_(momenta, noise, alpha=noise_std)
    torch._foreach_add_(params, momenta, alpha=0.5 * lr)
