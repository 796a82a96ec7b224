r"""torchmetrics wrappers of the live estimators, for custom training loops.

Each metric accumulates time sums of one identity of :math:`\pi_\beta` (see
:mod:`langevin_lora.diagnostics.functional`) in states added with ``dist_reduce_fx="sum"``, and
``compute()`` returns a ratio of sums, so the value is unchanged when every rank holds the same
parameters and gradients (data parallelism: the sums and the counts scale together).

Example:
    >>> import torch
    >>> from langevin_lora.diagnostics import VirialTemperature
    >>> theta = torch.tensor([1.0, -1.0]); grad = torch.tensor([0.5, -0.5])
    >>> m = VirialTemperature()
    >>> m.update([theta], [grad], weight_decay=0.0, beta=2.0)
    >>> float(m.compute())
    1.0
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from langevin_lora._validation import check_int, check_positive
from langevin_lora.diagnostics import functional as F

__all__ = ["VirialTemperature", "MeanForceChi2", "GaugeGap", "NoiseRatio", "ConfigurationalTemperature"]


def _zero() -> Tensor:
    return torch.tensor(0.0, dtype=torch.float64)


class VirialTemperature(Metric):
    r"""Time-averaged centred virial temperature :math:`\beta T_{\mathrm{vir}}` (1 at stationarity).

    ``update(params, grads, centers=None, weight_decay=0, beta=1)`` adds
    :math:`\beta\sum_i(\theta_i - c_i)(g_i + \lambda\theta_i)` and :math:`d`; call it once per group
    per step (groups may differ in :math:`\beta`, :math:`\lambda`). ``compute()`` returns
    :math:`\beta T_{\mathrm{vir}}`; :attr:`raw` the unweighted :math:`T_{\mathrm{vir}}`.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("weighted_sum", default=_zero(), dist_reduce_fx="sum")
        self.add_state("raw_sum", default=_zero(), dist_reduce_fx="sum")
        self.add_state("num_coords", default=_zero(), dist_reduce_fx="sum")

    def update(self, params: Sequence[Tensor], grads: Sequence[Tensor], centers: Sequence[Tensor] | None = None,
               weight_decay: float = 0.0, beta: float = 1.0) -> None:
        beta = check_positive("beta", beta)
        s = F.virial_sum(params, grads, centers, weight_decay=weight_decay).double()
        self.raw_sum += s
        self.weighted_sum += beta * s
        self.num_coords += float(sum(p.numel() for p in params))

    def compute(self) -> Tensor:
        return self.weighted_sum / self.num_coords

    @property
    def raw(self) -> Tensor:
        return self.raw_sum / self.num_coords


class MeanForceChi2(Metric):
    r"""Batch-means :math:`\chi^2/d` of :math:`\mathbb E_\pi[\nabla U] = 0` over ``num_coordinates``
    coordinates, blocks of ``block_size`` updates (see :func:`~langevin_lora.diagnostics.functional.mean_force_chi2`).

    ``compute()`` returns :math:`\chi^2/d` over the complete blocks (NaN below 4);
    :attr:`expected` its stationary value :math:`(m-1)/(m-3)`.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, num_coordinates: int, block_size: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_coordinates = check_int("num_coordinates", num_coordinates, low=1)
        self.block_size = check_int("block_size", block_size, low=1)
        for name in ("sum_means", "sum_sq_means", "current"):
            self.add_state(name, default=torch.zeros(self.num_coordinates, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_blocks", default=_zero(), dist_reduce_fx="sum")
        self.add_state("current_len", default=_zero(), dist_reduce_fx="sum")

    def update(self, params: Sequence[Tensor], grads: Sequence[Tensor], weight_decay: float = 0.0) -> None:
        force = torch.cat([f.detach().reshape(-1).double() for f in F.mean_force(params, grads, weight_decay=weight_decay)])
        if force.numel() != self.num_coordinates:
            raise ValueError(f"Invalid params: {force.numel()} coordinates (metric built for {self.num_coordinates})")
        self.current += force
        self.current_len += 1
        if int(self.current_len) >= self.block_size:
            F.close_block_([self.current], int(self.current_len), [self.sum_means], [self.sum_sq_means])
            self.num_blocks += 1
            self.current_len.zero_()

    @property
    def expected(self) -> float:
        m = float(self.num_blocks)
        return (m - 1) / (m - 3) if m > 3 else float("nan")

    def compute(self) -> Tensor:
        m = int(self.num_blocks)
        if m < 4:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return F.mean_force_chi2_from_sums(self.sum_means, self.sum_sq_means, m)[0]


class GaugeGap(Metric):
    r"""Time-averaged LoRA gauge gap :math:`\operatorname{tr}(D_\beta)/r - (\text{in} - \text{out})` of one
    module (0 at stationarity); ``update(A, B, beta, weight_decay)``. :attr:`std` is the per-step spread."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("gap_sum", default=_zero(), dist_reduce_fx="sum")
        self.add_state("gap_sq_sum", default=_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_zero(), dist_reduce_fx="sum")

    def update(self, A: Tensor, B: Tensor, beta: float, weight_decay: float) -> None:
        g = F.gauge_gap(A, B, beta=beta, weight_decay=weight_decay).double().reshape(-1)
        self.gap_sum += g.sum()
        self.gap_sq_sum += (g * g).sum()
        self.count += g.numel()

    def compute(self) -> Tensor:
        return self.gap_sum / self.count

    @property
    def std(self) -> Tensor:
        mean = self.gap_sum / self.count
        return (self.gap_sq_sum / self.count - mean * mean).clamp_min(0).sqrt()


class NoiseRatio(Metric):
    r"""Time-averaged minibatch-noise ratio :math:`\rho = \eta\beta\operatorname{tr}(G\Sigma_B)/(2d)`
    from :math:`k \ge 2` independent gradient estimates per step; ``update(micro_grads, lr, beta, precond=None)``."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("weighted_trace", default=_zero(), dist_reduce_fx="sum")
        self.add_state("num_coords", default=_zero(), dist_reduce_fx="sum")

    def update(self, micro_grads: Sequence[Sequence[Tensor]], lr: float, beta: float,
               precond: Sequence[Tensor] | None = None) -> None:
        lr = check_positive("lr", lr)
        beta = check_positive("beta", beta)
        tr = F.minibatch_noise_trace(micro_grads, precond=precond).double()
        self.weighted_trace += lr * beta * tr / 2.0
        self.num_coords += float(sum(g.numel() for g in micro_grads[0]))

    def compute(self) -> Tensor:
        return self.weighted_trace / self.num_coords


class ConfigurationalTemperature(Metric):
    r""":math:`\beta T_{\mathrm{conf}} = \overline{\beta\lVert\nabla U\rVert^2}/\overline{\Delta U}` (1 at stationarity).

    ``update(params, micro_grads, weight_decay, beta, hvp=None)`` adds the numerator (unbiased
    with :math:`\ge 2` gradient estimates) every call and, when ``hvp`` (a
    :class:`~langevin_lora.diagnostics.functional.HessianVectorProduct` or any
    ``list -> list`` callable) is given, a Hutchinson estimate of :math:`\Delta U`.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, num_probes: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_probes = check_int("num_probes", num_probes, low=1)
        self.add_state("grad_sq_sum", default=_zero(), dist_reduce_fx="sum")
        self.add_state("grad_count", default=_zero(), dist_reduce_fx="sum")
        self.add_state("laplacian_sum", default=_zero(), dist_reduce_fx="sum")
        self.add_state("laplacian_count", default=_zero(), dist_reduce_fx="sum")

    def update(self, params: Sequence[Tensor], micro_grads: Sequence[Sequence[Tensor]], weight_decay: float = 0.0,
               beta: float = 1.0, hvp: Callable | None = None, generator: torch.Generator | None = None) -> None:
        beta = check_positive("beta", beta)
        self.grad_sq_sum += beta * F.gradient_square(params, micro_grads, weight_decay=weight_decay).double()
        self.grad_count += 1
        if hvp is not None:
            lap = F.hutchinson_laplacian(hvp, params, weight_decay=weight_decay, num_probes=self.num_probes,
                                         generator=generator)
            self.laplacian_sum += lap.double()
            self.laplacian_count += 1

    def compute(self) -> Tensor:
        return (self.grad_sq_sum / self.grad_count) / (self.laplacian_sum / self.laplacian_count)
