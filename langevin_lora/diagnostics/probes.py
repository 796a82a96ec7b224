r"""``CurvatureProbes``: the Hessian-vector-product diagnostics of a chain, with their state.

Two measurements on a loss closure at the current parameters (:mod:`langevin_lora.core.curvature`):

- the Laplacian :math:`\Delta U = \operatorname{tr}\nabla^2\hat L + \sum_i\lambda_i` by Hutchinson
  (``hutchinson_probes`` products), the denominator of the configurational temperature;
- :math:`\eta\lambda_{\max}` of :math:`(\eta G)^{1/2}\nabla^2 U(\eta G)^{1/2}` by power iteration
  (``power_iters`` products, warm-started from the previous vector).

The probe generator (Rademacher probes, first power-iteration vector) is seeded once and never
touches the global RNG; the generator state, the power-iteration vector and the fallback to finite
differences are in :meth:`~CurvatureProbes.state_dict`, so a resumed run draws the same probes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_choice, check_int, check_real
from langevin_lora.core.curvature import HessianVectorProduct, ShardedHVP, hutchinson_laplacian, power_iteration
from langevin_lora.core.sharding import is_sharded

__all__ = ["CurvatureProbes"]


class CurvatureProbes:
    """Hutchinson Laplacian and :math:`\\eta\\lambda_{\\max}` with persistent probe state.

    Args:
        hutchinson_probes: Rademacher probes per Laplacian estimate.
        power_iters: Hessian-vector products per power iteration.
        hvp_method: ``"auto"`` (double backward, falling back for good to finite differences the
            first time it fails), ``"double_backward"`` or ``"finite_difference"``.
        fd_eps: relative step of the finite differences.
        seed: seed of the probe generator.
    """

    def __init__(self, *, hutchinson_probes: int = 1, power_iters: int = 10, hvp_method: str = "auto",
                 fd_eps: float = 1e-3, seed: int = 0) -> None:
        self.hutchinson_probes = check_int("hutchinson_probes", hutchinson_probes, low=1)
        self.power_iters = check_int("power_iters", power_iters, low=1)
        self.hvp_method = check_choice("hvp_method", hvp_method, HessianVectorProduct.METHODS)
        self.fd_eps = check_real("fd_eps", fd_eps, low=0.0, high=1.0, low_open=True)
        self.seed = check_int("seed", seed, low=0)
        self.reset()

    def reset(self) -> None:
        """Forget the probe state: the generator restarts from ``seed``."""
        self.fallback = False
        self.power_vector: list[Tensor] | None = None
        self.evaluations = 0
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def measure(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *, weight_decay: Sequence[float],
                scale: Sequence[Tensor | float], laplacian: bool, power: bool) -> tuple[float | None, float | None]:
        r"""``(Delta U, eta*lambda_max)`` at the current ``params`` (``None`` for what was not asked).

        ``loss_fn`` must return the same function of ``params`` at every call (replay dropout);
        ``weight_decay`` is :math:`\lambda` per tensor and ``scale`` :math:`\eta G` per tensor. Sharded
        ``params`` (FSDP2; every rank calls it): finite differences on the shards with full probes
        (:class:`~langevin_lora.core.curvature.ShardedHVP`, which writes ``.grad``: the caller keeps them),
        ``scale`` full tensors; the values are the unsharded finite-difference ones."""
        params = list(params)
        generator = self._generator_on(params[0].device)
        method = "finite_difference" if self.fallback else self.hvp_method
        if any(is_sharded(p) for p in params):   # FSDP2: finite differences on the shards, full probes
            hvp = ShardedHVP(loss_fn, params, fd_eps=self.fd_eps)
            params = hvp.full
        else:
            hvp = HessianVectorProduct(loss_fn, params, method=method, fd_eps=self.fd_eps)
        lap = eig = None
        with torch.enable_grad():
            if laplacian:
                lap = float(hutchinson_laplacian(hvp, params, weight_decay=list(weight_decay),
                                                 num_probes=self.hutchinson_probes, generator=generator))
            if power:
                init = self.power_vector
                if init is not None and [tuple(v.shape) for v in init] != [tuple(p.shape) for p in params]:
                    init = None
                if init is None:
                    init = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]
                else:
                    init = [v.to(device=p.device, dtype=p.dtype) for v, p in zip(init, params)]
                value, self.power_vector = power_iteration(hvp, params, weight_decay=list(weight_decay),
                                                           scale=list(scale), num_iters=self.power_iters, init=init)
                eig = float(value)
        if hvp.used_method == "finite_difference" and method == "auto":
            self.fallback = True
        self.evaluations += 1
        return lap, eig

    def state_dict(self) -> dict[str, Any]:
        generator = self._generator.get_state() if self._generator is not None else self._generator_state
        return {"seed": self.seed, "fallback": self.fallback, "evaluations": self.evaluations,
                "generator": None if generator is None else generator.clone(),
                "power_vector": None if self.power_vector is None else [v.detach().cpu().clone()
                                                                         for v in self.power_vector]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.fallback, self.evaluations = state["seed"], state["fallback"], state["evaluations"]
        self._generator = None
        self._generator_state = state["generator"]
        self.power_vector = state["power_vector"]
