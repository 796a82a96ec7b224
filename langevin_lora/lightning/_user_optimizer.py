"""How :class:`~langevin_lora.LangevinLoRA` reads the user's torch optimizer.

Two translations into the engine's terms: which of the optimizer's param groups holds each
Langevin tensor (the Langevin step size is that group's *current* ``lr``, so LR schedules keep
applying), and the inputs of the frozen preconditioner taken from the optimizer's Adam/AdamW
state (``exp_avg_sq``, ``step``, ``betas[1]``, ``eps``):
:math:`r = 1/(\\sqrt{\\hat v} + \\epsilon)`, which :meth:`LangevinEngine.freeze` clamps jointly.
"""
from __future__ import annotations

from typing import Hashable

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from langevin_lora.core.functional import LOW_PRECISION, adam_inverse_scale
from langevin_lora.core.sharding import local_tensor
from langevin_lora.lora.param_groups import lora_param_groups

__all__ = ["LangevinGroup", "adam_freeze_inputs", "langevin_groups_in"]


class LangevinGroup:
    """Langevin tensors sharing a role (``lora_A/<adapter>`` …) and a user param group, with the
    temperature and prior precision of that role."""

    __slots__ = ("name", "params", "names", "opt_group", "temperature", "weight_decay")

    def __init__(self, name, params, names, opt_group, temperature, weight_decay):
        self.name, self.params, self.names = name, params, names
        self.opt_group, self.temperature, self.weight_decay = opt_group, temperature, weight_decay

    @property
    def lr(self) -> float:
        lr = self.opt_group["lr"]
        return float(lr.item() if torch.is_tensor(lr) else lr)


def langevin_groups_in(module: nn.Module, opt: torch.optim.Optimizer, adapter_name: str | None, *,
                       temperature: float, weight_decay: float, head_temperature: float,
                       head_weight_decay: float) -> list[LangevinGroup]:
    """The Langevin groups of ``module`` (:func:`~langevin_lora.lora_param_groups` roles; the head only
    when ``head_temperature > 0``), each split by the optimizer param group that holds its tensors
    (named ``<role>@pg<i>`` when a role spans several)."""
    owner = {}
    for gi, g in enumerate(opt.param_groups):
        for p in g["params"]:
            owner[id(p)] = gi
    groups: list[LangevinGroup] = []
    for spec in lora_param_groups(module, adapter_name):
        is_head = spec["name"] == "head"
        if is_head and head_temperature == 0:
            continue
        missing = [n for n, p in zip(spec["param_names"], spec["params"]) if id(p) not in owner]
        if missing:
            raise MisconfigurationException(
                f"LangevinLoRA: {len(missing)} trainable tensors of group {spec['name']} are in no param group "
                f"of the optimizer (e.g. {missing[0]!r}); pass all trainable parameters to the optimizer.")
        by_opt: dict[int, tuple[list, list]] = {}
        for n, p in zip(spec["param_names"], spec["params"]):
            ps, ns = by_opt.setdefault(owner[id(p)], ([], []))
            ps.append(p)
            ns.append(n)
        for gi, (ps, ns) in sorted(by_opt.items()):
            name = spec["name"] if len(by_opt) == 1 else f"{spec['name']}@pg{gi}"
            groups.append(LangevinGroup(name, ps, ns, opt.param_groups[gi],
                                        head_temperature if is_head else temperature,
                                        head_weight_decay if is_head else weight_decay))
    return groups


def adam_freeze_inputs(opt: torch.optim.Optimizer, groups: list[LangevinGroup], clamp: tuple[float, float],
                       precondition: bool = True
                       ) -> tuple[list[tuple[Hashable, Tensor, tuple[float, float]]], dict[str, Tensor], list[str]]:
    """``(raw, fixed, identity)`` for :meth:`LangevinEngine.freeze`: ``raw`` the unclamped
    :math:`1/(\\sqrt{\\hat v}+\\epsilon)` of every tensor with an Adam second moment (in the work dtype);
    ``identity`` the names of the others (no moment, or ``precondition=False``): plain SGLD, with an
    explicit :math:`G = 1` in ``fixed`` where the rest of their group is preconditioned (a group has
    :math:`G` for every tensor or none)."""
    raw, fixed, identity = [], {}, []
    for g in groups:
        betas, eps = g.opt_group.get("betas"), g.opt_group.get("eps")
        plain = []
        for n, p in zip(g.names, g.params):
            state = opt.state.get(p, {})
            v, t = state.get("exp_avg_sq"), state.get("step")
            t = float(t.item() if torch.is_tensor(t) else t) if t is not None else 0.0
            dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
            if precondition and v is not None and betas is not None and eps is not None and t > 0:
                v = local_tensor(v.detach())   # a sharded parameter's moment: its shard, like the engine's state
                raw.append((n, adam_inverse_scale(v.to(dtype), t, float(betas[1]), float(eps)), clamp))
            else:
                plain.append((n, torch.ones_like(local_tensor(p), dtype=dtype)))
        if len(plain) < len(g.names):
            fixed.update(plain)
        identity += [n for n, _ in plain]
    return raw, fixed, identity
