"""Which tensors a :class:`~langevin_lora.diagnostics.GibbsRecorder` watches, and what one row holds.

A :class:`Layout` is built from the sampler's group views (and the LoRA modules whose two factors
are both sampled, with a prior centred at 0: a centred prior :math:`\theta_0 \neq 0` breaks the gauge
identity, so such modules get no gauge gap): the tensors in order, per-tensor hyperparameters as float64 vectors, the index
maps tensor -> group and module -> (A, B), and the names of the row's columns. It is rebuilt when
the views change (a group starts sampling, a preconditioner is re-frozen, a temperature changes);
the recorder's running state follows the :attr:`Layout.signature` (group names and tensor shapes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from langevin_lora.core import sharding

__all__ = ["Layout", "LoraModule", "UnshardedViews", "build_layout", "lora_modules_of", "views_key", "precond_of",
           "centres_of", "momenta_of", "BASE_COLUMNS", "KINETIC_COLUMN"]

# Columns of every row; then the virial temperature per group and per module, the gauge gap per
# module and their mean.
BASE_COLUMNS = ("virial_temperature", "virial_temperature_raw", "theta_sq", "prior", "grad_sq", "rho", "loss")
#: Column after the base ones when some group is kinetic: :math:`\beta p^\top G^{-1}p/d` of its momenta.
KINETIC_COLUMN = "kinetic_temperature"


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module to watch: its display name and factors ``A`` (r, in) and ``B`` (out, r)."""

    name: str
    A: Tensor
    B: Tensor


@dataclass
class Layout:
    """The tensors being sampled, in order, and what the row of one step holds."""

    key: tuple
    signature: tuple
    params: list[Tensor]
    group_slices: list[slice]
    decay: list[float]          # per tensor
    lr: list[float]             # per tensor, re-read at every step (schedules)
    precond: list[Tensor | None]
    friction: list[float | None]    # per tensor: gamma of a kinetic group, None when overdamped
    centred: bool                   # some tensor has a prior centre (forces use theta - theta_0)
    beta: Tensor                # per tensor, float64
    lam: Tensor
    numel: Tensor
    group_of: Tensor
    group_numel: Tensor
    mod_a: Tensor               # per module: index of A, of B, rank, fan-in, fan-out
    mod_b: Tensor
    mod_rank: Tensor
    mod_in: Tensor
    mod_out: Tensor
    columns: list[str]


def lora_modules_of(model: torch.nn.Module) -> list[LoraModule]:
    """The PEFT LoRA modules of ``model`` (none when it has no LoRA layer), named without the
    LightningModule attribute and PEFT wrapper prefixes (``bert.encoder.layer.0.attention.self.query``),
    suffixed ``.<adapter>`` for adapters other than ``default``."""
    from langevin_lora.lora.param_groups import lora_modules

    try:
        found = lora_modules(model)
    except ValueError:
        return []
    short = [re.sub(r"^(.*?\.)?(base_model\.model\.)+", "", m.name) for m in found]
    return [LoraModule(name + ("" if m.adapter == "default" else f".{m.adapter}"), m.A, m.B)
            for name, m in zip(short, found)]


def views_key(views: Sequence[Any]) -> tuple:
    """Changes whenever the layout must be rebuilt (tensors, hyperparameters, preconditioners)."""
    return tuple((v.name, v.beta, v.weight_decay, tuple(id(p) for p in v.params),
                  None if v.precond is None else tuple(id(G) for G in v.precond), getattr(v, "friction", None),
                  getattr(v, "prior_centre", None) is not None) for v in views)


def _per_tensor_lists(views: Sequence[Any], field: str) -> list[Tensor | None]:
    """A view's per-tensor list ``field`` spread over all views (``None`` for every tensor of a view
    without it)."""
    out: list[Tensor | None] = []
    for v in views:
        values = getattr(v, field, None)
        out += list(values) if values is not None else [None] * len(v.params)
    return out


def precond_of(views: Sequence[Any]) -> list[Tensor | None]:
    """The frozen preconditioner of every tensor (``None``: identity)."""
    return _per_tensor_lists(views, "precond")


def centres_of(views: Sequence[Any]) -> list[Tensor | None]:
    """The prior centre :math:`\theta_0` of every tensor (``None``: 0)."""
    return _per_tensor_lists(views, "prior_centre")


def momenta_of(views: Sequence[Any]) -> list[Tensor | None]:
    """The kinetic momentum of every tensor (``None``: overdamped, or before its first kinetic step)."""
    return _per_tensor_lists(views, "momentum")


def signature_of(views: Sequence[Any]) -> tuple:
    """What identifies the running state: group names and tensor shapes (not tensor identities,
    which change in a resumed process)."""
    return tuple((v.name, tuple(tuple(p.shape) for p in v.params)) for v in views)


def build_layout(views: Sequence[Any], modules: Iterable[LoraModule], key: tuple | None = None) -> Layout:
    """The :class:`Layout` of the sampled ``views``; ``modules`` whose factors are not both sampled
    are left out."""
    params = [p for v in views for p in v.params]
    device = params[0].device
    centred = [c is not None for c in centres_of(views)]
    index = {id(p): i for i, p in enumerate(params)}
    mods = []
    for m in modules:
        ia, ib = index.get(id(m.A)), index.get(id(m.B))
        if ia is not None and ib is not None and not (centred[ia] or centred[ib]):
            mods.append((m.name, ia, ib, m.A.shape[0], m.A[0].numel(), m.B.shape[0]))
    slices, start = [], 0
    for v in views:
        slices.append(slice(start, start + len(v.params)))
        start += len(v.params)
    friction = [getattr(v, "friction", None) for v in views for _ in v.params]
    columns = (list(BASE_COLUMNS) + ([KINETIC_COLUMN] if any(f is not None for f in friction) else [])
               + [f"virial_temperature/{v.name}" for v in views]
               + [f"virial_temperature/{m[0]}" for m in mods] + [f"gauge_gap/{m[0]}" for m in mods]
               + (["gauge_gap"] if mods else []))
    t64 = dict(device=device, dtype=torch.float64)

    def per_tensor(attr: str) -> list[float]:
        return [getattr(v, attr) for v in views for _ in v.params]

    def per_module(j: int) -> Tensor:
        return torch.tensor([float(m[j]) for m in mods], **t64)

    numel = torch.tensor([float(p.numel()) for p in params], **t64)
    group_of = torch.tensor([i for i, v in enumerate(views) for _ in v.params], device=device)
    return Layout(
        key=views_key(views) if key is None else key, signature=signature_of(views), params=params,
        group_slices=slices, decay=per_tensor("weight_decay"), lr=per_tensor("lr"), precond=precond_of(views),
        friction=friction, centred=any(centred),
        beta=torch.tensor(per_tensor("beta"), **t64), lam=torch.tensor(per_tensor("weight_decay"), **t64),
        numel=numel, group_of=group_of, group_numel=torch.zeros(len(views), **t64).index_add_(0, group_of, numel),
        mod_a=torch.tensor([m[1] for m in mods], dtype=torch.long, device=device),
        mod_b=torch.tensor([m[2] for m in mods], dtype=torch.long, device=device),
        mod_rank=per_module(3), mod_in=per_module(4), mod_out=per_module(5), columns=columns)


def any_sharded(views: Sequence[Any]) -> bool:
    """Whether a tensor of ``views`` is sharded (FSDP2 / DTensor)."""
    return any(sharding.is_sharded(p) for v in views for p in v.params)


class UnshardedViews:
    r"""Full (unsharded) copies of sharded views (FSDP2 / DTensor), for the recorder.

    The recorder's sums (:math:`\lVert\theta\rVert^2`, the virial, the kinetic temperature, the gauge gap
    from :math:`\lVert A\rVert^2, \lVert B\rVert^2`, the mean-force blocks, the virial centre) are taken
    on the full tensors: every rank gathers the parameters, their gradients, preconditioners, momenta
    and prior centres of the sampled groups (an all-gather each: LoRA factors are small) and runs the
    single-device arithmetic on them, so every value is the unsharded one bit for bit, and equal on
    every rank. The full copies live in buffers kept from step to step (their identities do not
    change, so the recorder's layout is not rebuilt at every step). Every rank must call it."""

    FIELDS = ("precond", "momentum", "prior_centre")

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], Tensor] = {}
        #: id(sharded parameter) -> its full buffer (the last call)
        self.full_of: dict[int, Tensor] = {}

    def _put(self, key: tuple[int, str], t: Tensor, spec: Any) -> Tensor:
        full = sharding.full_tensor(t.detach(), spec)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != full.shape or buf.dtype != full.dtype or buf.device != full.device:
            buf = self._buffers[key] = full.clone()
        else:
            buf.copy_(full)
        return buf

    def __call__(self, views: Sequence[Any], grads: bool = True) -> tuple[list[Any], list[Tensor] | None]:
        """``(full views, their full gradients)`` (``None`` unless ``grads``; a missing ``.grad`` gives zeros)."""
        out, full_grads, i = [], [] if grads else None, 0
        self.full_of = {}
        for v in views:
            specs = [sharding.shard_spec(p) if sharding.is_sharded(p) else None for p in v.params]
            params = []
            for p, spec in zip(v.params, specs):
                full = self._put((i + len(params), "param"), p, spec)
                self.full_of[id(p)] = full
                params.append(full)
                if grads:
                    g = p.grad
                    full_grads.append(torch.zeros_like(full) if g is None
                                      else self._put((i + len(params) - 1, "grad"), g, spec))
            fields = {}
            for field in self.FIELDS:
                values = getattr(v, field, None)
                if values is not None:
                    fields[field] = [self._put((i + k, field), t, spec)
                                     for k, (t, spec) in enumerate(zip(values, specs))]
            out.append(replace(v, params=params, **fields))
            i += len(params)
        return out, full_grads

    def modules(self, modules: Iterable[LoraModule]) -> list[LoraModule]:
        """``modules`` with their factors replaced by the full buffers of the last call."""
        return [LoraModule(m.name, self.full_of.get(id(m.A), m.A), self.full_of.get(id(m.B), m.B)) for m in modules]
