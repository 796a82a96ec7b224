r"""Running accumulators of the live estimators, each with a complete ``state_dict``.

- :class:`WindowCenter`: the centre :math:`c` of the virial temperature;
- :class:`BlockMeans`: block sums of the mean force for its batch-means :math:`\chi^2`;
- :class:`MicroBatchMoments`: the moments of the :math:`k` micro-batch gradients of one optimizer
  step, for the noise ratio :math:`\rho` and the unbiased :math:`\lVert\nabla U\rVert^2`.

The formulas are those of :mod:`langevin_lora.diagnostics.functional` (these classes only keep
sums); a resumed accumulator continues exactly where the saved one stopped.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_choice, check_int
from langevin_lora.core.curvature import batched_dot
from langevin_lora.core.functional import LOW_PRECISION
from langevin_lora.diagnostics import functional as F

__all__ = ["WindowCenter", "BlockMeans", "MicroBatchMoments"]



def _tensors(xs: Sequence[Tensor] | None, device: torch.device | str | None = None) -> list[Tensor] | None:
    """Detached clones (for a state dict) or copies moved to ``device`` (when loading one)."""
    if xs is None:
        return None
    return [x.detach().clone() if device is None else x.detach().to(device).clone() for x in xs]


def _wide(p: Tensor) -> Tensor:
    """``p`` detached, in fp32 when it is fp16/bf16 (running means must not round to 8 bits)."""
    p = p.detach()
    return p.float() if p.dtype in LOW_PRECISION else p


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
    second window on). Sums of fp16/bf16 parameters are kept in fp32.
    """

    MODES = ("previous", "expanding")

    def __init__(self, window: int = 200, mode: str = "previous") -> None:
        self.window = check_int("window", window, low=1)
        self.mode = check_choice("mode", mode, self.MODES)
        self.center: list[Tensor] | None = None
        self._acc: list[Tensor] | None = None
        self._total: list[Tensor] | None = None
        self._count = 0
        self._windows = 0

    def __call__(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The centre to use for ``params`` now, then record ``params`` into the running window."""
        with torch.no_grad():
            thetas = [_wide(p) for p in params]
            if self.center is None:
                self.center = [t.clone() for t in thetas]
                self._acc = [torch.zeros_like(t) for t in thetas]
                self._total = [torch.zeros_like(t) for t in thetas]
            center = self.center
            torch._foreach_add_(self._acc, thetas)
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

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "mode": self.mode, "center": _tensors(self.center), "acc": _tensors(self._acc),
                "total": _tensors(self._total), "count": self._count, "windows": self._windows}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        self.window, self.mode = state["window"], state["mode"]
        self.center = _tensors(state["center"], device)
        self._acc, self._total = _tensors(state["acc"], device), _tensors(state["total"], device)
        self._count, self._windows = state["count"], state["windows"]


class BlockMeans:
    r"""Block means of the force :math:`\nabla U` over consecutive blocks of ``block_size`` steps,
    kept as the sums :math:`\sum_b \bar f_b` and :math:`\sum_b \bar f_b^2` (float64); :meth:`chi2` is
    :func:`~langevin_lora.diagnostics.functional.mean_force_chi2_from_sums` once 4 blocks are complete."""

    def __init__(self, block_size: int) -> None:
        self.block_size = check_int("block_size", block_size, low=1)
        self.reset()

    def reset(self) -> None:
        self._block: list[Tensor] | None = None
        self._sum_means: list[Tensor] | None = None
        self._sum_sq: list[Tensor] | None = None
        self.length = 0
        self.num_blocks = 0

    def update(self, forces: Sequence[Tensor]) -> None:
        with torch.no_grad():
            if self._block is None:
                self._block = [torch.zeros_like(f, dtype=torch.float64) for f in forces]
                self._sum_means = [torch.zeros_like(b) for b in self._block]
                self._sum_sq = [torch.zeros_like(b) for b in self._block]
            torch._foreach_add_(self._block, [f.detach() for f in forces])  # accumulates in float64
            self.length += 1
            if self.length == self.block_size:
                F.close_block_(self._block, self.length, self._sum_means, self._sum_sq)
                self.length = 0
                self.num_blocks += 1

    def chi2(self) -> tuple[float, float] | None:
        """``(chi2 per coordinate, its stationary expectation (m-1)/(m-3))``, or ``None`` below 4 blocks."""
        if self.num_blocks < 4 or self._sum_means is None:
            return None
        s = torch.cat([t.reshape(-1) for t in self._sum_means])
        q = torch.cat([t.reshape(-1) for t in self._sum_sq])
        chi2, expected = F.mean_force_chi2_from_sums(s, q, self.num_blocks)
        return float(chi2), expected

    def state_dict(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "block": _tensors(self._block), "sum_means": _tensors(self._sum_means),
                "sum_sq_means": _tensors(self._sum_sq), "length": self.length, "num_blocks": self.num_blocks}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        self.block_size = state["block_size"]
        self._block = _tensors(state["block"], device)
        self._sum_means, self._sum_sq = _tensors(state["sum_means"], device), _tensors(state["sum_sq_means"], device)
        self.length, self.num_blocks = state["length"], state["num_blocks"]


class MicroBatchMoments:
    r"""Moments of the micro-batch gradients :math:`g^{(1)},\dots,g^{(c)}` of one optimizer step,
    per tensor: :math:`\sum_j g^{(j)}`, :math:`\sum_j\lVert g^{(j)}\rVert_G^2` and
    :math:`\sum_j\lVert g^{(j)} + \lambda\theta\rVert^2`. :meth:`finish` turns them into the noise
    trace of the step's gradient and the unbiased :math:`\lVert\nabla U\rVert^2` through
    :func:`~langevin_lora.diagnostics.functional.noise_trace_from_moments` and
    :func:`~langevin_lora.diagnostics.functional.gradient_square_from_moments`.

    ``nominal`` is the number of micro-batches the step's gradient is normalised by (Lightning's
    ``accumulate_grad_batches``, :math:`k`): when only :math:`c < k` arrived (the end of an epoch),
    the step's gradient is :math:`\tfrac1k\sum_{j\le c} g^{(j)}`, whose noise trace is
    :math:`(c/k)^2` that of the mean of :math:`c`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.nominal = 0
        self._sum: list[Tensor] | None = None
        self._sq_G: Tensor | None = None
        self._sq_f: Tensor | None = None

    def add(self, thetas: Sequence[Tensor], grads: Sequence[Tensor], precond: Sequence[Tensor | None],
            decay: Sequence[float], nominal: int) -> None:
        with torch.no_grad():
            weighted = [g if G is None else g * G for g, G in zip(grads, precond)]
            sq_G = batched_dot(weighted, grads, per_tensor=True).double()
            forces = [g + lam * t.to(g.dtype) if lam else g for g, t, lam in zip(grads, thetas, decay)]
            sq_f = batched_dot(forces, forces, per_tensor=True).double()
            if self._sum is None:
                self._sum = [g.detach().clone() for g in grads]
                self._sq_G, self._sq_f = sq_G, sq_f
            else:
                torch._foreach_add_(self._sum, list(grads))
                self._sq_G, self._sq_f = self._sq_G + sq_G, self._sq_f + sq_f
            self.count += 1
            self.nominal = nominal

    def finish(self, thetas: Sequence[Tensor], precond: Sequence[Tensor | None],
               decay: Sequence[float]) -> tuple[Tensor, Tensor]:
        """Per tensor: :math:`\\widehat{\\operatorname{tr}(G\\Sigma_B)}` of the step's gradient and the
        unbiased :math:`\\lVert\\nabla U\\rVert^2` (float64, shape ``(n,)``); needs 2 micro-batches."""
        c = self.count
        if c < 2:
            raise ValueError(f"Invalid micro-batch count: {c} (the noise trace needs >= 2 micro-batches)")
        with torch.no_grad():
            mean = [s.double() / c for s in self._sum]
            weighted = [m if G is None else m * G.double() for m, G in zip(mean, precond)]
            trace = F.noise_trace_from_moments(self._sq_G, batched_dot(weighted, mean, per_tensor=True), c)
            total = [s.double() + c * lam * t.double() if lam else s.double()
                     for s, t, lam in zip(self._sum, thetas, decay)]
            grad_sq = F.gradient_square_from_moments(batched_dot(total, total, per_tensor=True), self._sq_f, c)
        return trace * (c / max(self.nominal, c)) ** 2, grad_sq
