r"""Functional core of every Langevin update in this package.

All samplers (:class:`~langevin_lora.LangevinSGD`, :class:`~langevin_lora.LangevinAdam` and the
:class:`~langevin_lora.LangevinLoRA` callback) step through :class:`~langevin_lora.engine.LangevinEngine`,
which calls :func:`langevin_step_`, the frozen-preconditioner unadjusted Langevin step (THEORY §1–2)

.. math::
    \theta \leftarrow \theta - \eta\, G \odot \big(g + \lambda\theta\big)
        + \sqrt{2\eta/\beta}\; \sqrt{G} \odot \xi, \qquad \xi \sim N(0, I),

with :math:`g` an unbiased minibatch gradient of the mean loss, :math:`\lambda` the weight decay
(coupled: it passes through :math:`G`), and :math:`G` a diagonal preconditioner that is constant
while sampling (:math:`G \equiv 1` for SGLD). A constant :math:`G` makes the divergence
correction :math:`\Gamma = \nabla\!\cdot G` vanish, so the step leaves
:math:`\pi_\beta \propto e^{-\beta U}` invariant up to :math:`O(\eta)`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_real

__all__ = ["langevin_step_", "frozen_preconditioner", "adapted_preconditioner", "accumulate_potential_grad_sq_",
           "adam_inverse_scale", "median_scale", "all_finite"]


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
    :math:`G = 1`, 1300 after a noise-free Adam warm-up, 107 after 300 adaptation steps, which
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
                                  weight_decay: float) -> None:
    r"""``sums[i] += (g_i + \lambda\theta_i)^2`` in place: the running sums of the squared gradient of
    :math:`U` that :func:`adapted_preconditioner` turns into :math:`G` (read at the pre-step point)."""
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads
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
                   foreach: bool | None = None) -> None:
    r"""Apply one Langevin step in place to ``params``.

    .. math::
        \theta \leftarrow \theta - \eta\, G\odot(g + \lambda\theta) + \sigma \sqrt{G}\odot\xi,
        \qquad \sigma = \sqrt{2\eta/\beta}.

    Args:
        params: tensors updated in place (fp32/fp64 master copies for low-precision models).
        grads: gradients of the **mean** loss, same dtypes as ``params``; never modified.
        noise: standard normal draws shaped like ``params``, or ``None`` when ``noise_std == 0``.
        lr: step size :math:`\eta`.
        noise_std: :math:`\sigma = \sqrt{2\eta/\beta}` (0 for :math:`\beta = \infty`).
        weight_decay: :math:`\lambda`, coupled (passes through :math:`G`).
        precond, precond_sqrt: :math:`G` and :math:`\sqrt G` per tensor, or ``None`` for identity.
        foreach: use the ``torch._foreach_*`` kernels (default: whenever there is more than
            one tensor). Both paths run the same elementwise operations and agree bitwise.
    """
    if not params:
        return
    if noise_std > 0 and noise is None:
        raise ValueError("noise must be given when noise_std > 0")
    if foreach is None:
        foreach = len(params) > 1 and not torch.jit.is_scripting()
    fn = _multi_tensor_step if foreach else _single_tensor_step
    fn(params, grads, noise, lr=lr, noise_std=noise_std, weight_decay=weight_decay,
       precond=precond, precond_sqrt=precond_sqrt)


def _single_tensor_step(params, grads, noise, *, lr, noise_std, weight_decay, precond, precond_sqrt):
    for i, (p, g) in enumerate(zip(params, grads)):
        d = torch.add(g, p, alpha=weight_decay) if weight_decay != 0 else g
        if precond is not None:
            p.addcmul_(d, precond[i], value=-lr)   # one pass: p - lr * G * d
        else:
            p.add_(d, alpha=-lr)
        if noise_std > 0:
            if precond_sqrt is not None:
                p.addcmul_(noise[i], precond_sqrt[i], value=noise_std)
            else:
                p.add_(noise[i], alpha=noise_std)


def _multi_tensor_step(params, grads, noise, *, lr, noise_std, weight_decay, precond, precond_sqrt):
    # Same elementwise operations as the single-tensor path, in the same order (bitwise equal).
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads
    if precond is not None:
        torch._foreach_addcmul_(params, d, precond, value=-lr)
    else:
        torch._foreach_add_(params, d, alpha=-lr)
    if noise_std > 0:
        if precond_sqrt is not None:
            torch._foreach_addcmul_(params, noise, precond_sqrt, value=noise_std)
        else:
            torch._foreach_add_(params, noise, alpha=noise_std)
