"""A read-only view of a sampler's parameter groups, shared by the optimizers and the callback.

Diagnostics (:mod:`langevin_lora.diagnostics`) and gauge moves need, for every group, the live
tensors, the current step size, inverse temperature, weight decay and frozen preconditioner,
whoever performs the Langevin step. Anything that samples implements
``langevin_groups() -> list[LangevinGroupView]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class LangevinGroupView:
    r"""One parameter group as the sampler sees it at this moment.

    Attributes:
        name: group name (``lora_A/default``, ``head``, or ``group<i>``).
        params: the live parameter tensors (their ``.grad`` holds the current gradient
            between backward and the optimizer step).
        lr: current step size :math:`\eta` (after any LR schedule).
        beta: inverse temperature :math:`\beta` (``inf`` for a noise-free group).
        weight_decay: :math:`\lambda` (coupled).
        precond: the frozen diagonal preconditioner :math:`G` per tensor, or ``None`` (identity).
        sampling: ``True`` when the group takes Langevin steps now (``False`` during burn-in).
        friction: :math:`\gamma` of a kinetic (BAOAB) group, ``None`` for the overdamped step.
        momentum: the kinetic momenta :math:`p` (standing for :math:`G\cdot p`, stationary law
            :math:`N(0, G/\beta)`) per tensor, ``None`` before the first kinetic step or when overdamped.
        prior_centre: the prior centre :math:`\theta_0` per tensor (``None``: :math:`\theta_0 = 0`), so
            :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2`.
    """

    name: str
    params: list[Tensor]
    lr: float
    beta: float
    weight_decay: float
    precond: list[Tensor] | None
    sampling: bool
    friction: float | None = None
    momentum: list[Tensor] | None = None
    prior_centre: list[Tensor] | None = None


@runtime_checkable
class LangevinSampler(Protocol):
    def langevin_groups(self) -> list[LangevinGroupView]: ...


# -- default diagnostics: a registration, so samplers never import the diagnostics package -----------
_DEFAULT_DIAGNOSTICS: list[Callable[[Any], Any]] = []


def register_default_diagnostics(factory: Callable[[Any], Any]) -> None:
    """Register ``factory(trainer) -> lightning Callback``: what ``LangevinLoRA(diagnostics=True)``
    attaches. :mod:`langevin_lora.diagnostics` registers :class:`GibbsDiagnostics` when imported
    (``import langevin_lora`` does so), keeping the import graph layered: samplers depend on this
    module, diagnostics depend on samplers' views, never the reverse. The last registration wins."""
    if not callable(factory):
        raise ValueError(f"Invalid factory: {factory!r} (expected a callable trainer -> Callback)")
    _DEFAULT_DIAGNOSTICS[:] = [factory]


def default_diagnostics_factory() -> Callable[[Any], Any] | None:
    """The registered default-diagnostics factory, or ``None`` when none is registered."""
    return _DEFAULT_DIAGNOSTICS[0] if _DEFAULT_DIAGNOSTICS else None
