from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from langevin_lora._docs import readable_docstring
from langevin_lora._validation import check_int, check_real
from langevin_lora.core.engine import StepGroup
from langevin_lora.core.functional import FRICTION_AUTO, LOW_PRECISION, adam_inverse_scale, check_clamp
from langevin_lora.core.guard import DivergenceGuard
from langevin_lora.optim.base import RENAMED, LangevinOptimizer, renamed_keys


@readable_docstring
class LangevinAdam(LangevinOptimizer):
    r"""Adam burn-in, then exact Langevin sampling with a frozen Adam preconditioner.

    **Burn-in** (the first ``burn_in_steps`` steps, no noise) is Adam on the potential
    :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2` with *coupled* L2 decay,
    :math:`g' = g + \lambda\theta`, :math:`m \leftarrow \beta_1 m + (1-\beta_1) g'`,
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g'^2`,
    :math:`\theta \leftarrow \theta - \eta\,\hat m/(\sqrt{\hat v}+\epsilon)`; it heads for the mode
    of :math:`\pi_\beta` and learns the curvature scale :math:`v`.

    **Sampling** (after ``burn_in_steps`` steps, or from :meth:`start_sampling`): the second moment
    is frozen into a diagonal preconditioner (THEORY §2)

    .. math::
        G = \operatorname{clamp}\big(1/(\sqrt{\hat v}+\epsilon),\; c_{lo} m,\; c_{hi} m\big),

    :math:`m` the median of :math:`1/(\sqrt{\hat v}+\epsilon)` over all tensors frozen together, and
    every step is

    .. math::
        \theta \leftarrow \theta - \eta\, G\odot(g + \lambda\theta) + \sqrt{2\eta/\beta}\,\sqrt G\odot\xi .

    A constant :math:`G` has zero divergence, so this leaves
    :math:`\pi_\beta \propto e^{-\beta U}` invariant up to :math:`O(\eta)`: it is exact, unlike
    pSGLD, whose gradient-dependent :math:`G` drops a non-vanishing correction term.

    *Why the decay is coupled.* AdamW's decoupled decay :math:`\theta \leftarrow \theta - \eta\lambda\theta`
    beside a preconditioned gradient step has the stationary law
    :math:`\exp(-\beta(\hat L + \tfrac{\lambda}{2}\sum_i \theta_i^2 / G_i))`: a different prior in
    every coordinate (THEORY §2 measures 0.02275 instead of 0.01602 for a variance). Passing the
    decay through :math:`G` keeps the Gaussian prior :math:`N(0, (N\lambda)^{-1} I)`.

    Args:
        params, lr, num_data, temperature, beta, weight_decay, seed, nonfinite: as in
            :class:`~langevin_lora.LangevinSGD`.
        betas: Adam coefficients, each in ``[0, 1)``.
        eps: :math:`\epsilon > 0` in the denominator.
        burn_in_steps: Adam steps before sampling starts (``None``: only :meth:`start_sampling`);
            called ``warmup_steps`` before release 0.2 (still accepted, with a ``DeprecationWarning``).
        precond_clamp: ``(c_lo, c_hi)`` with ``0 < c_lo <= 1 <= c_hi``, relative to the median
            (caps the preconditioner's condition number at ``c_hi / c_lo``).
        precond_adapt_steps: after the freeze, take this many Langevin steps with the burn-in's
            :math:`G` while averaging :math:`v = (g + \lambda\theta)^2`, then re-freeze
            :math:`G` from :math:`v` with :func:`~langevin_lora.core.functional.adapted_preconditioner`
            (same median, curvature-based shape; 0: keep the burn-in's :math:`G`). Those steps are
            burn-in: discard them. Recommended when the burn-in's path gradients are not a
            curvature scale (well-conditioned or standardised problems, LoRA from ``B = 0``). Called
            ``adapt_steps`` before release 0.2.
        friction: ``"auto"`` (default: kinetic BAOAB after the burn-in, :math:`\gamma = 2\sqrt{\lambda G_{\min}}`,
            logged at INFO by ``langevin_lora.core.engine``; noise-free groups step overdamped), :math:`\gamma > 0`,
            or ``None`` (overdamped sampling). ``"auto"`` needs ``weight_decay > 0`` in groups at ``temperature > 0``.
        prior_centre: ``"burn_in"`` (default: the parameters when sampling starts, i.e. where the burn-in
            ended: a local posterior around it, as :class:`~langevin_lora.LangevinLoRA`) or ``"zero"``
            (or ``None``; centre 0). Release 0.1's ``"start"`` means ``"burn_in"``.
        step_size: ``"auto"`` (default): when sampling starts, the Langevin step is measured from
            ``step(closure)``'s closure (:math:`\lambda_{\max}(G^{1/2}\nabla^2U G^{1/2})` by power iteration on
            finite differences of its gradients, this step's dropout masks replayed, 5–40 closure calls;
            :math:`h = 0.5/\sqrt{\lambda_{\max}}`, or :math:`\eta = 0.1/\lambda_{\max}` overdamped) and again
            every ``step_size_every_n_steps`` sampling steps; ``lr`` then only scales it (your LR schedule,
            relative to ``lr`` when sampling started). Without a closure a :class:`StepSizeWarning` says so before
            the first noisy step and ``lr`` is used. ``"lr"``: ``lr`` is the Langevin step (the behaviour
            before issue 19); a float: that step when sampling starts.
        step_safety, step_size_every_n_steps, guard: as in :class:`~langevin_lora.LangevinSGD` (the guard
            watches the sampling steps, not the burn-in).

    **Defaults** (since issue 18/19, as :class:`~langevin_lora.LangevinLoRA`'s): prior centred where
    sampling starts, kinetic ``friction="auto"``, measured step, divergence guard on. The earlier
    behaviour is ``prior_centre=None, friction=None, step_size="lr", guard=False``.

    The quick start (a plain loop, with the closure the measurement needs)::

        opt = LangevinAdam(lora_param_groups(model), lr=2e-4, num_data=N, weight_decay=1e-3, burn_in_steps=200)
        for x, y in loader:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)

    Sampling starts right after the ``burn_in_steps``-th Adam step (``burn_in_steps=0``: the first
    step already samples, with :math:`G \equiv 1`). With ``precond_adapt_steps > 0`` the first
    ``precond_adapt_steps`` sampling steps also measure :math:`v` and :math:`G` is re-frozen once after them
    (:attr:`adapting` is ``True`` until then).

    Stability: keep :math:`\eta\,\lambda_{\max}(G^{1/2}\nabla^2 U\, G^{1/2}) \lesssim 0.1`.

    **Kinetic sampling** (``friction`` :math:`\gamma > 0` or ``"auto"``): after the freeze, the BAOAB
    step of :class:`~langevin_lora.LangevinSGD` with mass :math:`G^{-1}` (THEORY §2b), time step
    :math:`h` = ``lr``: kicks :math:`p \mathrel{-}= \tfrac{h_{t-1}+h_t}{2} G\odot\nabla U`, O-step noise
    :math:`\sqrt{(1-e^{-2\gamma h})/\beta}\,\sqrt G\odot\xi`, momenta drawn from :math:`N(0, G/\beta)`
    at the first sampling step (and rescaled when ``precond_adapt_steps`` re-freezes :math:`G`). Exact
    :math:`\theta`-law on Gaussian targets for every :math:`h\sqrt{\lambda_{\max}(G^{1/2}\nabla^2U G^{1/2})} < 2`;
    take :math:`h \approx 0.5/\sqrt{\lambda_{\max}}`. ``prior_centre="burn_in"`` centres the prior at the
    parameters of the freeze (the first sampling step), as in :class:`~langevin_lora.LangevinSGD`.
    """

    def __init__(self, params: Iterable, lr: float, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, num_data: int | None = None, temperature: float = 1.0,
                 beta: float | None = None, weight_decay: float = 0.0, burn_in_steps: int | None = 100,
                 precond_clamp: tuple[float, float] = (0.01, 100.0), precond_adapt_steps: int = 0,
                 seed: int | None = None, foreach: bool | None = None, nonfinite: str = "skip",
                 friction: float | str | None = "auto", prior_centre: str | None = "burn_in",
                 step_size: float | str = "auto", step_safety: float | None = None, step_size_every_n_steps: int = 1000,
                 guard: bool | DivergenceGuard = True, **renamed: Any) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, temperature=temperature, weight_decay=weight_decay,
                        burn_in_steps=burn_in_steps, precond_clamp=precond_clamp,
                        precond_adapt_steps=precond_adapt_steps,
                        foreach=foreach, sampling=False, step=0, adapted=0, precond_reference=None,
                        friction=friction, prior_centre=prior_centre)
        unknown = sorted(set(renamed) - set(RENAMED))
        if unknown:
            raise TypeError(f"LangevinAdam.__init__() got an unexpected keyword argument {unknown[0]!r}")
        defaults.update(renamed_keys(renamed, "LangevinAdam"))
        super().__init__(params, defaults, num_data=num_data, beta=beta, seed=seed, nonfinite=nonfinite,
                         step_size=step_size, step_safety=step_safety, step_size_every_n_steps=step_size_every_n_steps,
                         guard=guard)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        b = group["betas"]
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise ValueError(f"Invalid betas: {b!r} (expected a pair (beta1, beta2), each in [0, 1))")
        for i, bi in enumerate(b):
            check_real(f"betas[{i}]", bi, low=0.0, high=1.0, high_open=True)
        check_real("eps", group["eps"], low=0.0, low_open=True)
        check_int("burn_in_steps", group["burn_in_steps"], low=0, allow_none=True)
        group["precond_clamp"] = check_clamp(group["precond_clamp"])
        check_int("precond_adapt_steps", group["precond_adapt_steps"], low=0)
        if group["friction"] == FRICTION_AUTO and group["temperature"] > 0 and group["weight_decay"] == 0:
            raise ValueError(
                f"Invalid friction: 'auto' (the default) with weight_decay=0 in group {group.get('name', '')!r}: "
                "'auto' damps the prior-dominated modes (gamma = 2*sqrt(weight_decay * min G)) and needs "
                "weight_decay > 0 (the Gaussian prior); pass weight_decay > 0, a number friction > 0, or "
                "friction=None (overdamped)")

    @property
    def sampling(self) -> bool:
        """``True`` once every param group has switched to Langevin sampling."""
        return all(g["sampling"] for g in self.param_groups)

    @property
    def adapting(self) -> bool:
        """``True`` while a sampling group is still measuring :math:`v` for its re-frozen ``G``."""
        return any(self._adapting(g) for g in self.param_groups)

    @staticmethod
    def _adapting(group: dict[str, Any]) -> bool:
        return group["sampling"] and group["adapted"] < group["precond_adapt_steps"]

    @torch.no_grad()
    def start_sampling(self) -> None:
        """Freeze the preconditioner of every group still in burn-in and switch to Langevin steps.

        A group with no Adam step yet gets :math:`G \\equiv 1` (plain SGLD) and a warning.
        Calling it again does nothing."""
        self._freeze([g for g in self.param_groups if not g["sampling"]])

    def _freeze(self, groups: list[dict[str, Any]]) -> None:
        """Freeze ``groups`` together (:meth:`LangevinEngine.freeze`): the clamp's reference scale is
        the median of the unclamped :math:`G` over all their tensors, so a tensor whose gradient
        stayed ~0 (LoRA ``A`` while ``B = 0``) is capped at ``c_hi`` times the typical scale instead
        of :math:`1/\\epsilon`."""
        if not groups:
            return
        raw = []
        for group in groups:
            if group["step"] == 0:
                warnings.warn("LangevinAdam.start_sampling: no burn-in step taken, the preconditioner "
                              "is the identity (plain SGLD)", stacklevel=3)
            _, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                v = state.get("exp_avg_sq")
                if v is None:
                    v = torch.zeros_like(p, dtype=torch.float32 if p.dtype in LOW_PRECISION else p.dtype)
                steps = state.get("step", group["step"])
                raw.append((p, adam_inverse_scale(v, steps, beta2, group["eps"]), group["precond_clamp"]))
                state.pop("exp_avg", None)  # no longer used: the frozen G replaces the moments
        reference = self.engine.freeze(raw)
        for group in groups:
            group["sampling"] = True
            group["adapted"] = 0
            group["precond_reference"] = reference

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self._refreeze_due()  # the adaptation window has just ended
        self._freeze_due()    # sampling starts right after the burn_in_steps-th Adam step
        return loss

    def _freeze_due(self) -> None:
        # Every group that is due is frozen at once: they share the clamp's reference scale.
        self._freeze([g for g in self.param_groups if not g["sampling"] and self._burn_in_done(g)])

    @staticmethod
    def _burn_in_done(group: dict[str, Any]) -> bool:
        return group["burn_in_steps"] is not None and group["step"] >= group["burn_in_steps"]

    def _update(self, batches: list[StepGroup]) -> None:
        self._freeze_due()  # burn_in_steps=0, or lowered since the last step
        sampling = []
        for group, batch in zip(self.param_groups, batches):
            if not batch.params:
                continue
            if group["sampling"]:
                sampling.append((group, batch))
            else:
                self._adam(group, batch)
                self.engine.write_back(batch)
        if not sampling:
            return
        self._centre_priors(group for group, _ in sampling)
        adapting = [(group, batch) for group, batch in sampling if self._adapting(group)]
        self._langevin_step(sampling, before=lambda: self.engine.accumulate(batch for _, batch in adapting))  # pre-step
        for group, _ in adapting:
            group["adapted"] += 1
            group["refreeze_due"] = group["adapted"] == group["precond_adapt_steps"]

    def _adam(self, group: dict[str, Any], batch: StepGroup) -> None:
        beta1, beta2 = group["betas"]
        lam, lr, eps = group["weight_decay"], group["lr"], group["eps"]
        work, grads = batch.works, batch.grads
        group["step"] += 1
        m, v, steps = [], [], []
        for p, w in zip(batch.params, work):
            state = self.state[p]
            if "exp_avg" not in state:  # first step, or moments cleared by balance_lora_(moments="reset")
                state["exp_avg"] = torch.zeros_like(w)
                state["exp_avg_sq"] = torch.zeros_like(w)
                state["step"] = 0
            # Bias correction counts the steps of *these* moments (a per-tensor count), so moments
            # restarted mid-run are corrected like fresh ones; group["step"] counts the burn-in.
            state["step"] = state.get("step", group["step"] - 1) + 1
            m.append(state["exp_avg"])
            v.append(state["exp_avg_sq"])
            steps.append(state["step"])
        d = torch._foreach_add(grads, work, alpha=lam) if lam != 0 else list(grads)
        torch._foreach_lerp_(m, d, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, d, d, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        if len(set(steps)) == 1:  # the common case: one scalar for all tensors
            t = steps[0]
            torch._foreach_div_(denom, (1 - beta2 ** t) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(work, m, denom, value=-lr / (1 - beta1 ** t))
        else:
            torch._foreach_div_(denom, [(1 - beta2 ** t) ** 0.5 for t in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(work, m, denom, [-lr / (1 - beta1 ** t) for t in steps])

    def _refreeze_due(self) -> None:
        """Re-freeze ``G`` from the averaged squared gradients of U of every group whose adaptation
        window has just ended (:meth:`LangevinEngine.refreeze`). Groups frozen together (same reference
        scale) are re-frozen together, so the relative scale of, e.g., LoRA ``A`` and ``B`` groups
        comes from the measurement. A tensor that never had a gradient during adaptation keeps its
        burn-in ``G``."""
        due: dict[float, list[dict[str, Any]]] = {}
        for group in self.param_groups:
            if group.pop("refreeze_due", False):
                due.setdefault(group["precond_reference"], []).append(group)
        for reference, groups in due.items():
            counts = {p: g["adapted"] for g in groups for p in g["params"]}
            self.engine.refreeze(counts, reference, eps=groups[0]["eps"], clamp=groups[0]["precond_clamp"])
        if due:
            self._remeasure = True   # the step follows the new G (at the next step(closure))
            if self.guard is not None and self.guard.started:
                self.guard.mark_good()   # an older snapshot would bring the old G back
