r"""STOP-GAP until ``LangevinLoRA(step_size="auto")`` is on main (branch ``stepsize``): the kinetic
step from the measured curvature, :math:`h = c/\sqrt{\lambda_{\max}(G^{1/2}\nabla^2 U\,G^{1/2})}`,
:math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2`, on a fixed probe set, when
sampling starts. Delete this module (and ``langevin.step_constant``) once ``step_size: auto`` exists.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["MeasuredStep"]


class MeasuredStep:
    """A ``step_observers`` entry of LangevinLoRA: at the first Langevin step (G frozen, gradients
    present) measure :math:`\lambda_{\max}` on ``probe`` (batches; mean cross-entropy through
    ``forward_fn``) and set every param group's ``lr`` to :math:`c/\sqrt{\lambda_{\max}}` (the
    Langevin step is the group's lr). The first Langevin step itself keeps the burn-in lr."""

    def __init__(self, probe: list, forward_fn: Any, constant: float = 0.5, num_iters: int = 20) -> None:
        self.probe, self.forward_fn, self.constant, self.num_iters = list(probe), forward_fn, constant, num_iters
        self.lambda_max: float | None = None
        self.step_size: float | None = None
        self.probe_evaluations = 0       # in minibatch gradient evaluations (probe batches x loss evaluations)

    def __call__(self, trainer, pl_module, callback) -> None:
        if self.lambda_max is not None:
            return
        from langevin_lora.curvature import top_eigenvalue

        views = [v for v in callback.langevin_groups() if v.params]
        params = [p for v in views for p in v.params]
        scale = [g for v in views for g in (v.precond or [torch.ones_like(p) for p in v.params])]
        decay = [v.weight_decay for v in views for _ in v.params]
        grads = [p.grad for p in params]
        was_training = pl_module.training
        pl_module.eval()

        def loss():
            return sum(torch.nn.functional.cross_entropy(self.forward_fn(pl_module, b), b["labels"].to(params[0].device))
                       for b in self.probe) / len(self.probe)

        try:
            with torch.enable_grad():
                res = top_eigenvalue(loss, params, scale=scale, weight_decay=decay, num_iters=self.num_iters,
                                     rtol=1e-3, generator=torch.Generator().manual_seed(0))
        finally:
            pl_module.train(was_training)
            for p, g in zip(params, grads):
                p.grad = g
        self.lambda_max = float(res.eigenvalue)
        self.step_size = self.constant / math.sqrt(self.lambda_max)
        self.probe_evaluations = 2 * res.products * len(self.probe)   # an HVP ~ two gradients
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.step_size
