from __future__ import annotations

from typing import Iterable

from langevin_lora.engine import StepGroup
from langevin_lora.optim.base import LangevinOptimizer


class LangevinSGD(LangevinOptimizer):
    r"""Stochastic-gradient Langevin dynamics (SGLD / ULA) with coupled weight decay.

    Samples the Gibbs measure :math:`\pi_\beta(\theta) \propto \exp(-\beta U(\theta))`,
    :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2`, with the update

    .. math::
        \theta \leftarrow \theta - \eta\,(g + \lambda\theta) + \sqrt{2\eta/\beta}\;\xi,
        \qquad \xi \sim N(0, I),

    where :math:`g` is the minibatch gradient of the **mean** loss and, per param group,
    :math:`\beta = \beta_0 / T` with :math:`\beta_0 =` ``num_data`` or ``beta`` (see
    :mod:`langevin_lora.temperature`). ``temperature=0`` is exactly :class:`torch.optim.SGD` with
    (coupled) ``weight_decay``. The step size is read from the group at every step, so an LR
    scheduler changes drift and noise together and the chain keeps its target.

    Known biases (THEORY §3): the discretisation inflates the temperature by about
    :math:`1 + \tfrac{\eta}{2}\operatorname{tr}H^2/\operatorname{tr}H`; minibatch gradient noise by
    :math:`1 + \rho`, :math:`\rho = \eta\beta\operatorname{tr}\Sigma_B/(2d)`. Keep
    :math:`\eta\lambda_{\max}(\nabla^2 U) \lesssim 0.1` and :math:`\rho \le 0.1`.

    Args:
        params: parameters or param groups (e.g. :func:`~langevin_lora.lora_param_groups`).
        lr: step size :math:`\eta > 0`.
        num_data: number of training examples :math:`N` (Bayesian reading, :math:`\beta_0 = N`).
        temperature: :math:`T \ge 0`; :math:`\beta = \beta_0/T`.
        beta: :math:`\beta_0 > 0` given directly. Exactly one of ``num_data`` / ``beta``.
        weight_decay: :math:`\lambda \ge 0`, the Gaussian prior precision per example. ``0`` at
            :math:`T > 0` is refused for LoRA groups (named ``lora_A/…``, ``lora_B/…``,
            ``lora_magnitude/…`` by :func:`~langevin_lora.lora_param_groups`): their Gibbs measure is
            improper without a prior; other groups may use it (proper only if the loss confines them).
        seed: seed of the noise generators (saved in ``state_dict``). Pass it for reproducible
            runs; under ``torch.distributed`` an unseeded optimizer takes rank 0's seed.
        foreach: ``None`` (auto), ``True`` or ``False``.
        nonfinite: ``"skip"`` (default: warn, update nothing, draw no noise) or ``"raise"``
            (:class:`FloatingPointError`) when a gradient holds inf/NaN.

    Parameters whose ``.grad`` is ``None`` are left untouched. fp16/bf16 parameters are updated
    through an fp32 master copy kept in the optimizer state, so noise far below the
    parameter's rounding step still accumulates.

    Example:
        >>> import torch
        >>> from langevin_lora import LangevinSGD
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = LangevinSGD([w], lr=1e-3, num_data=1000, weight_decay=1e-2, seed=0)
        >>> w.grad = torch.ones(3); opt.step()
    """

    def __init__(self, params: Iterable, lr: float, *, num_data: int | None = None,
                 temperature: float = 1.0, beta: float | None = None, weight_decay: float = 0.0,
                 seed: int | None = None, foreach: bool | None = None, nonfinite: str = "skip") -> None:
        defaults = dict(lr=lr, temperature=temperature, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, num_data=num_data, beta=beta, seed=seed, nonfinite=nonfinite)

    def _update(self, batches: list[StepGroup]) -> None:
        self.engine.step(batches)
