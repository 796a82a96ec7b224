"""What every Langevin optimizer shares: noise generators in the state dict, fp32 master copies
of low-precision parameters, the non-finite-gradient policy, and per-group inverse temperature."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from langevin_lora._rng import NoiseGenerators
from langevin_lora._validation import check_choice, check_non_negative, check_positive
from langevin_lora.functional import all_finite
from langevin_lora.temperature import effective_beta, resolve_base_beta
from langevin_lora.view import LangevinGroupView

LOW_PRECISION = (torch.float16, torch.bfloat16)
NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteGradientWarning(UserWarning):
    """A step was skipped because a gradient held inf or NaN."""


class LangevinOptimizer(Optimizer):
    """Base class: subclasses implement :meth:`_update_group`.

    Every hyperparameter lives in the param group and is read at each step, so LR schedulers
    and per-group overrides (e.g. ``{"params": head, "temperature": 0.0}``) work unchanged.
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, num_data: int | None,
                 beta: float | None, seed: int | None, nonfinite: str) -> None:
        base_beta = resolve_base_beta(num_data, beta)
        defaults = dict(defaults, base_beta=base_beta)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.generators = NoiseGenerators(seed)
        self.skipped_steps = 0
        super().__init__(params, defaults)

    # -- validation of every group, including ones added later or overridden by the user ----------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay behind
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("lr", group["lr"])
        check_non_negative("temperature", group["temperature"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_positive("beta", group["base_beta"])

    @staticmethod
    def group_beta(group: dict[str, Any]) -> float:
        r"""Inverse temperature :math:`\beta = \beta_0 / T` of a param group (``inf`` at ``T = 0``)."""
        return effective_beta(group["base_beta"], group["temperature"])

    # -- the step ----------------------------------------------------------------------------
    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Parameters with a gradient, the tensors to update (fp32 masters for fp16/bf16) and
        their gradients in the update dtype."""
        params, work, grads = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            if p.dtype in LOW_PRECISION:
                state = self.state[p]
                if "master" not in state:
                    state["master"] = p.detach().float()
                work.append(state["master"])
                grads.append(p.grad.float())
            else:
                work.append(p)
                grads.append(p.grad)
        return params, work, grads

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = [self._gather(group) for group in self.param_groups]
        if not all_finite([g for _, _, grads in gathered for g in grads]):
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient (inf or NaN); nothing was updated"
                )
            self.skipped_steps += 1
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient (inf or NaN); step skipped, no noise "
                f"drawn ({self.skipped_steps} skipped so far)", NonFiniteGradientWarning, stacklevel=2,
            )
            return loss
        for group, (params, work, grads) in zip(self.param_groups, gathered):
            if params:
                self._update_group(group, params, work, grads)
                for p, w in zip(params, work):
                    if w is not p:
                        p.copy_(w)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[Tensor], work: list[Tensor],
                      grads: list[Tensor]) -> None:
        raise NotImplementedError

    def langevin_groups(self) -> list[LangevinGroupView]:
        """The :class:`~langevin_lora.view.LangevinGroupView` of every param group (for diagnostics)."""
        views = []
        for i, group in enumerate(self.param_groups):
            precond = [self.state[p].get("precond") for p in group["params"]]
            views.append(LangevinGroupView(
                name=group.get("name", f"group{i}"), params=list(group["params"]), lr=group["lr"],
                beta=self.group_beta(group), weight_decay=group["weight_decay"],
                precond=None if any(G is None for G in precond) else precond,
                sampling=group.get("sampling", True)))
        return views

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["langevin"] = {"generators": self.generators.state_dict(), "skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("langevin", None)
        # torch casts every floating state tensor to its parameter's dtype; the fp32 master copies
        # and moments of fp16/bf16 parameters must keep their precision, so restore them after.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        keep = {}
        for pid, p in zip(saved_ids, current):
            for key, value in state_dict["state"].get(pid, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and value.dtype != p.dtype:
                    keep[(p, key)] = value
        super().load_state_dict(state_dict)
        for (p, key), value in keep.items():
            self.state[p][key] = value.to(device=p.device, copy=True)
        if extra is not None:
            self.generators.load_state_dict(extra["generators"])
            self.skipped_steps = extra["skipped_steps"]
