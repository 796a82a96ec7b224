from __future__ import annotations

from typing import Iterable

from langevin_lora._docs import readable_docstring
from langevin_lora.core.engine import StepGroup
from langevin_lora.core.guard import DivergenceGuard
from langevin_lora.optim.base import LangevinOptimizer


@readable_docstring
class LangevinSGD(LangevinOptimizer):
    r"""Stochastic-gradient Langevin dynamics (SGLD / ULA) with coupled weight decay.

    Samples the Gibbs measure :math:`\pi_\beta(\theta) \propto \exp(-\beta U(\theta))`,
    :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2`, with the update

    .. math::
        \theta \leftarrow \theta - \eta\,(g + \lambda\theta) + \sqrt{2\eta/\beta}\;\xi,
        \qquad \xi \sim N(0, I),

    where :math:`g` is the minibatch gradient of the **mean** loss and, per param group,
    :math:`\beta = \beta_0 / T` with :math:`\beta_0 =` ``num_data`` or ``beta`` (see
    :mod:`langevin_lora.core.temperature`). ``temperature=0`` is exactly :class:`torch.optim.SGD` with
    (coupled) ``weight_decay``. The step size is read from the group at every step, so an LR
    scheduler changes drift and noise together and the chain keeps its target.

    **Kinetic Langevin** (``friction`` :math:`\gamma > 0`): the same target sampled by the BAOAB
    splitting of underdamped Langevin with momentum :math:`p` (:func:`~langevin_lora.core.functional.kinetic_step_`,
    THEORY §2b), one gradient per step, time step :math:`h` = ``lr``:

    .. math::
        p \leftarrow p - \tfrac{h_{t-1}+h_t}{2}\nabla U,\quad \theta \leftarrow \theta + \tfrac h2 p,\quad
        p \leftarrow e^{-\gamma h}p + \sqrt{(1-e^{-2\gamma h})/\beta}\,\xi,\quad \theta \leftarrow \theta + \tfrac h2 p .

    Its :math:`\theta`-law is *exact* on Gaussian targets at every stable :math:`h`
    (:math:`h\sqrt{\lambda_{\max}} < 2`), and it relaxes the slowest mode (curvature
    :math:`\lambda_{\min}`) at about :math:`h\sqrt{\lambda_{\min}}` per step instead of
    :math:`\eta\lambda_{\min}`: :math:`\sqrt\kappa` times fewer steps. Note that ``lr`` is then
    :math:`h`, a time step whose stable scale is :math:`1/\sqrt{\lambda_{\max}}` (take
    :math:`h \approx 0.5/\sqrt{\lambda_{\max}}`), not :math:`1/\lambda_{\max}`. Choose
    :math:`\gamma \approx 2\sqrt{\lambda_{\min}}` (critical damping of the slowest mode), or
    ``"auto"``: :math:`2\sqrt{\lambda}`, the slowest prior-dominated mode
    (:func:`~langevin_lora.core.functional.auto_friction`). Momenta start from their stationary law
    :math:`N(0, I/\beta)` at the first step and are saved in :meth:`state_dict`.

    **Prior centre** (``prior_centre="burn_in"``): :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2`
    with :math:`\theta_0` the parameters at the group's first step (a local posterior, THEORY §6;
    saved in :meth:`state_dict`).

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
        friction: ``None`` (default: the overdamped step above), :math:`\gamma > 0` or ``"auto"``:
            kinetic Langevin (BAOAB) with time step ``lr``.
        prior_centre: ``"zero"`` (default, or ``None``: the prior is centred at 0) or ``"burn_in"`` (at the
            parameters of the first sampling step; release 0.1 spelled it ``"start"``).
        step_size: ``"lr"`` (default: each group's ``lr`` is the Langevin step :math:`\eta`, or :math:`h`
            with friction), ``"auto"`` (measured: :math:`\eta = 0.1/\lambda_{\max}`,
            :math:`h = 0.5/\sqrt{\lambda_{\max}}`, :mod:`langevin_lora.core.step_size`, from the closure of
            ``step(closure)`` at the first step and every ``step_size_every_n_steps`` steps; your LR
            schedule applies as a factor relative to ``lr`` at the first step) or a float (that step at
            the first step, times the same factor).
        step_safety: :math:`c` of the automatic step (:math:`c_k` kinetic), in ``(0, 2)``; default 0.1 (0.5).
        step_size_every_n_steps: steps between re-measurements under ``"auto"`` (0: once).
        guard: ``True`` (default): a :class:`~langevin_lora.DivergenceGuard` watches every step of the
            groups at ``temperature > 0``; on a runaway it restores the last good snapshot and cuts the
            step (straight to the measured stable step when ``step(closure)`` gives a closure), and raises
            :class:`~langevin_lora.DivergenceError` after its last cut. A bad batch (non-finite gradients
            at finite parameters) is skipped and is not a divergence. ``False``: off; or your own guard.

    **Defaults, and why they differ from** :class:`~langevin_lora.LangevinAdam`'s: ``LangevinSGD``
    samples from its first step (it has no burn-in of its own), so ``"burn_in"`` would centre the
    Bayesian prior at your initialisation, a random point, not a mode: hence ``"zero"``. Its ``lr`` is the Langevin step itself (SGLD's :math:`\eta`, a sampler's step
    you chose, no descent learning rate), hence ``step_size="lr"``, and ``friction=None``: kinetic
    sampling would silently re-read that ``lr`` as a time step :math:`h` on a :math:`1/\sqrt{\lambda}`
    scale. The divergence guard is on, as everywhere.

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
                 seed: int | None = None, foreach: bool | None = None, nonfinite: str = "skip",
                 friction: float | str | None = None, prior_centre: str | None = "zero",
                 step_size: float | str = "lr", step_safety: float | None = None, step_size_every_n_steps: int = 1000,
                 guard: bool | DivergenceGuard = True) -> None:
        defaults = dict(lr=lr, temperature=temperature, weight_decay=weight_decay, foreach=foreach, friction=friction,
                        prior_centre=prior_centre)
        super().__init__(params, defaults, num_data=num_data, beta=beta, seed=seed, nonfinite=nonfinite,
                         step_size=step_size, step_safety=step_safety, step_size_every_n_steps=step_size_every_n_steps,
                         guard=guard)

    def _update(self, batches: list[StepGroup]) -> None:
        self._centre_priors(self.param_groups)
        self._langevin_step(list(zip(self.param_groups, batches)))
