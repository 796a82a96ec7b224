"""A read-only view of a sampler's parameter groups, shared by the optimizers and the callback.

Diagnostics (:mod:`langevin_lora.diagnostics`) and gauge moves need, for every group, the live
tensors, the current step size, inverse temperature, weight decay and frozen preconditioner,
whoever performs the Langevin step. Anything that samples implements
``langevin_groups() -> list[LangevinGroupView]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class LangevinGroupView:
    """One parameter group as the sampler sees it at this moment.

    Attributes:
        name: group name (``lora_A/default``, ``head``, or ``group<i>``).
        params: the live parameter tensors (their ``.grad`` holds the current gradient
            between backward and the optimizer step).
        lr: current step size :math:`\\eta` (after any LR schedule).
        beta: inverse temperature :math:`\\beta` (``inf`` for a noise-free group).
        weight_decay: :math:`\\lambda` (coupled).
        precond: the frozen diagonal preconditioner :math:`G` per tensor, or ``None`` (identity).
        sampling: ``True`` when the group takes Langevin steps now (``False`` during warm-up/burn-in).
    """

    name: str
    params: list[Tensor]
    lr: float
    beta: float
    weight_decay: float
    precond: list[Tensor] | None
    sampling: bool


@runtime_checkable
class LangevinSampler(Protocol):
    def langevin_groups(self) -> list[LangevinGroupView]: ...
