"""The torch.optim front-end of the sampling engine (:mod:`langevin_lora.engine`): every
hyperparameter in the param group, the engine's per-tensor state in ``Optimizer.state``."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from langevin_lora._validation import check_bool, check_choice, check_non_negative, check_positive
from langevin_lora.engine import EngineFrontEnd, LangevinEngine, NonFiniteGradientWarning, StepGroup
from langevin_lora.functional import check_friction
from langevin_lora.temperature import check_proper_prior, effective_beta, resolve_base_beta
from langevin_lora.view import LangevinGroupView

__all__ = ["LangevinOptimizer", "NonFiniteGradientWarning", "PRIOR_CENTRES"]

#: ``prior_centre`` of a param group: ``None`` (the prior is centred at 0) or ``"start"`` (at the
#: parameters of the group's first sampling step).
PRIOR_CENTRES = (None, "start")


class LangevinOptimizer(EngineFrontEnd, Optimizer):
    """Base class: subclasses implement :meth:`_update` (the step once every gradient is known finite).

    Every hyperparameter lives in the param group and is read at each step, so LR schedulers
    and per-group overrides (e.g. ``{"params": head, "temperature": 0.0}``,
    ``{"params": lora_B, "friction": 5.0}``) work unchanged. The engine's per-tensor state (fp32
    masters, frozen ``G``, adaptation sums, kinetic momenta, prior centres) is ``self.state[p]``,
    saved by :meth:`state_dict` as torch.optim saves its moments; generator states, the
    skipped-step count and the kinetic groups' last step sizes go under ``state_dict()["langevin"]``.
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, num_data: int | None,
                 beta: float | None, seed: int | None, nonfinite: str) -> None:
        base_beta = resolve_base_beta(num_data, beta)
        defaults = dict(defaults, base_beta=base_beta)
        self.engine = LangevinEngine(seed=seed, nonfinite=nonfinite, owner=type(self).__name__)
        super().__init__(params, defaults)
        self.engine.state = self.state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "engine" in self.__dict__:   # load_state_dict replaces self.state: the engine follows
            self.engine.state = self.state

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
        check_proper_prior(group.get("name"), group["temperature"], group["weight_decay"])
        check_positive("beta", group["base_beta"])
        check_bool("foreach", group["foreach"], allow_none=True)
        group["friction"] = check_friction(group.get("friction"))
        check_choice("prior_centre", group.get("prior_centre"), PRIOR_CENTRES)

    @staticmethod
    def group_beta(group: dict[str, Any]) -> float:
        r"""Inverse temperature :math:`\beta = \beta_0 / T` of a param group (``inf`` at ``T = 0``)."""
        return effective_beta(group["base_beta"], group["temperature"])

    def work_tensor(self, p: Tensor) -> Tensor:
        """The tensor updated for ``p``: its fp32 master copy (fp16/bf16), else ``p``."""
        return self.engine.work_tensor(p, p)

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [self.engine.gather(group["params"], lr=group["lr"], beta=self.group_beta(group),
                                      weight_decay=group["weight_decay"], foreach=group["foreach"],
                                      friction=group["friction"], name=str(i))
                   for i, group in enumerate(self.param_groups)]
        if self.engine.check_finite([g for b in batches for g in b.grads], stacklevel=4):
            self._update(batches)
        return loss

    def _update(self, batches: list[StepGroup]) -> None:
        """Update every group (``batches[i]`` belongs to ``self.param_groups[i]``)."""
        raise NotImplementedError

    def _centre_priors(self, groups: Iterable[dict[str, Any]]) -> None:
        """``prior_centre="start"``: centre the prior of every tensor of ``groups`` (sampling now) that has
        no centre yet at its current value (the first sampling step's pre-step point)."""
        for group in groups:
            if group["prior_centre"] != "start":
                continue
            todo = [p for p in group["params"] if "prior_centre" not in self.state.get(p, {})]
            if todo:
                self.engine.set_prior_centre(todo, [self.engine.work_tensor(p, p) for p in todo])

    def langevin_groups(self) -> list[LangevinGroupView]:
        """The :class:`~langevin_lora.view.LangevinGroupView` of every param group (for diagnostics)."""
        views = []
        for i, group in enumerate(self.param_groups):
            params = list(group["params"])
            friction = self.engine.friction(StepGroup(params, [], [], [], weight_decay=group["weight_decay"],
                                                      friction=group["friction"], name=str(i)))
            views.append(LangevinGroupView(
                name=group.get("name", f"group{i}"), params=params, lr=group["lr"],
                beta=self.group_beta(group), weight_decay=group["weight_decay"],
                precond=self.engine.preconditioners(params), sampling=group.get("sampling", True),
                friction=friction, momentum=self.engine.momenta(params) if friction is not None else None,
                prior_centre=self.engine.prior_centres(params, params)))
        return views

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["langevin"] = self.engine.state_dict(per_tensor=False)
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
            self.engine.load_state_dict(extra)
