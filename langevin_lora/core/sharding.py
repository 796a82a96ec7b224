r"""Sharded parameters (FSDP2's ``fully_shard``, DTensor): the chain does not depend on the sharding.

Every Langevin update is element-wise, so a sharded step equals the unsharded one exactly when each
shard receives the slice of the *unsharded* draw that covers it. The noise path
(:func:`langevin_lora._rng.draw_standard_normal`) therefore draws, on every rank, the full tensor of
each sharded parameter from the same seeded generators, in the same order and with the same bucket
layout as a single device would, and keeps the local slice (a view into the draw). A LoRA tensor is
small (``r * (d_in + d_out)`` numbers), so the full draw costs ``world_size`` times the local one
and no communication; the chain of a 1-process run, of DDP and of FSDP2 at any world size is one
chain, bit for bit, given the same gradients. (PyTorch's DTensor random ops are not
sharding-invariant: their draws change with the number of ranks and the layout, pytorch#168058.)

The engine (:class:`~langevin_lora.engine.LangevinEngine`) works on the *local* tensors of sharded
parameters (``DTensor.to_local()``, a view of the shard's storage): the fp32 masters, frozen
preconditioners, momenta, prior centres and adaptation sums are shards beside their parameters. A
:class:`ShardSpec` (global shape, the local slice, the process group that holds the other shards)
is recorded for each local tensor; the few non-element-wise quantities reduce over that group:

- sums (:math:`\lVert\theta\rVert^2`, the virial, the prior energy of the divergence guard):
  :func:`global_sums`, an all-reduce of the sharded part (replicated tensors counted once);
- minima (:math:`\min G` of ``friction="auto"``): :func:`global_min`;
- the median scale of a preconditioner freeze: computed on the gathered full tensors
  (:func:`full_tensor`), so it is the unsharded median exactly;
- the sample bank stores full tensors (:func:`full_tensor`) and writes them back into shards
  (:func:`copy_full_`).

Supported layouts: DTensors whose placements are ``Shard(d)`` on at most one mesh dimension and
``Replicate()`` on the others (FSDP2, HSDP). Anything else (tensor parallelism's strided or partial
placements, several sharded mesh dimensions) is refused with :class:`UnsupportedSharding`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["ShardSpec", "UnsupportedSharding", "copy_full_", "full_tensor", "global_min", "global_sums",
           "is_sharded", "local_tensor", "mark", "shard_spec", "spec_of"]

#: Shard specs of local tensors (parameter shards, their fp32 masters, gradients), by identity.
_SPECS: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: Shard specs of sharded parameters (DTensors), computed once.
_PARAM_SPECS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class UnsupportedSharding(ValueError):
    """A parameter's DTensor layout is not one the sampler supports (module docstring)."""


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """Where a local shard sits in its unsharded tensor.

    Attributes:
        global_shape: the unsharded shape.
        index: ``(start, stop)`` per dimension: the shard is ``full[start0:stop0, start1:stop1, ...]``.
        mesh, placements: the DTensor layout (to gather the full tensor).
        group: the process group over which the shards of the tensor are spread (``None``: replicated).
    """

    global_shape: torch.Size
    index: tuple[tuple[int, int], ...]
    mesh: Any
    placements: tuple
    group: Any

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.index)

    @property
    def global_numel(self) -> int:
        return self.global_shape.numel()


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a sharded or replicated parameter, gradient or optimizer state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # torch without DTensor
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view of its storage: writes reach the parameter), else ``t``."""
    if not is_sharded(t):
        return t
    with torch.no_grad():
        return t.to_local()


def shard_spec(param: Tensor, name: Any = None) -> ShardSpec:
    """The :class:`ShardSpec` of a DTensor ``param`` (cached). Raises :class:`UnsupportedSharding`
    naming ``name`` for a layout other than ``Shard(d)`` on one mesh dimension and ``Replicate()``."""
    spec = _PARAM_SPECS.get(param)
    if spec is not None:
        return spec
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, tuple(param.placements)
    sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if (len(sharded) > 1 or any(type(placements[i]) is not Shard for i in sharded)):
        raise UnsupportedSharding(
            f"Unsupported sharding of parameter {name!r}: placements {placements} on mesh {tuple(mesh.shape)} "
            "(expected FSDP2's Shard(d) on one mesh dimension, Replicate() on the others; tensor parallelism "
            "is not supported: shard the LoRA adapters with fully_shard only)")
    shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    index = tuple((o, o + s) for o, s in zip(offset, shape))
    group = mesh.get_group(sharded[0]) if sharded and mesh.size(sharded[0]) > 1 else None
    spec = ShardSpec(torch.Size(param.shape), index, mesh, placements, group)
    _PARAM_SPECS[param] = spec
    return spec


def mark(t: Tensor, spec: ShardSpec | None) -> Tensor:
    """Record that the plain tensor ``t`` is the local shard ``spec`` (no-op for ``None``); returns ``t``."""
    if spec is not None:
        _SPECS[t] = spec
    return t


def spec_of(t: Tensor) -> ShardSpec | None:
    """The :class:`ShardSpec` recorded for the local tensor ``t`` (``None``: an unsharded tensor)."""
    return _SPECS.get(t) if len(_SPECS) else None


def any_marked() -> bool:
    """Whether any local shard is recorded in this process (cheap: the unsharded path skips every lookup)."""
    return len(_SPECS) > 0


def full_tensor(t: Tensor, spec: ShardSpec | None = None) -> Tensor:
    """The unsharded tensor of ``t``: a DTensor's ``full_tensor()``, a recorded local shard gathered from
    its group (a collective: every rank of the group must call it), else ``t`` itself."""
    if is_sharded(t):
        return t.full_tensor()
    spec = spec or spec_of(t)
    if spec is None:
        return t
    from torch.distributed.tensor import DTensor

    stride = torch.empty(spec.global_shape, device="meta").stride()
    return DTensor.from_local(t, spec.mesh, spec.placements, run_check=False, shape=spec.global_shape,
                              stride=stride).full_tensor()


@torch.no_grad()
def copy_full_(param: Tensor, value: Tensor) -> None:
    """Write the unsharded ``value`` into ``param``: its slice into a DTensor's local shard, else in place."""
    if is_sharded(param):
        spec = shard_spec(param)
        param.to_local().copy_(value[spec.slices])
    else:
        param.copy_(value)


def _group_of(specs: Sequence[ShardSpec | None]) -> Any:
    groups = {id(s.group): s.group for s in specs if s is not None and s.group is not None}
    if len(groups) > 1:
        raise UnsupportedSharding("Unsupported sharding: the Langevin tensors are sharded over different process "
                                  "groups (expected one fully_shard mesh for all the adapters)")
    return next(iter(groups.values()), None)


def global_sums(sharded: Tensor, replicated: Tensor, specs: Sequence[ShardSpec | None]) -> Tensor:
    """``replicated + all_reduce(sharded)``: per-statistic sums whose sharded tensors' part (``sharded``,
    summed over the local shards) is added over their group, while replicated tensors count once.
    Without a sharded tensor in ``specs``: ``replicated`` unchanged (no communication)."""
    group = _group_of(specs)
    if group is None:
        return replicated if not any(s is not None for s in specs) else replicated + sharded
    sharded = sharded.clone()
    dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=group)
    return replicated + sharded


def global_min(tensors: Sequence[Tensor], specs: Sequence[ShardSpec | None]) -> float:
    """The minimum over every element of ``tensors`` (local shards reduced over their group; an empty
    shard counts as ``+inf``)."""
    mins = [float(t.min()) if t.numel() else float("inf") for t in tensors]
    value = min(mins) if mins else float("inf")
    group = _group_of(specs)
    if group is not None:
        device = tensors[0].device if tensors else "cpu"
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        value = float(t)
    return value


def all_ranks_true(flag: bool, specs: Sequence[ShardSpec | None]) -> bool:
    """``flag`` on every rank of the shards' group (an all-reduce of its minimum; local when unsharded)."""
    group = _group_of(specs)
    if group is None:
        return flag
    device = "cpu" if dist.get_backend(group) != "nccl" else torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


#: The supported alternative named when a strategy is refused.
_ALTERNATIVE = ("strategy=ModelParallelStrategy() with torch.distributed.fsdp.fully_shard in configure_model "
                "(FSDP2), or strategy='ddp'")


def sharding_refusal(strategy: Any, refused: Sequence[str]) -> str | None:
    """One line refusing ``strategy`` when its class (or a base class) is named in ``refused``, else ``None``."""
    names = [c.__name__ for c in type(strategy).__mro__]
    hit = next((n for n in names if n in refused), None)
    if hit is None:
        return None
    return (f"does not support the sharded strategy {type(strategy).__name__} ({hit}): its parameters are "
            "flattened or partitioned shards, not DTensors, so the noise cannot be drawn independently of the "
            f"sharding. Use {_ALTERNATIVE}.")


def check_sharded_params(named: Sequence[tuple[str, Tensor]], module: Any = None, device: Any = None) -> bool:
    """Whether any of ``named`` (name, parameter) is a DTensor; raises :class:`UnsupportedSharding` for an
    unsupported layout (:func:`shard_spec`) or FSDP2's CPU offload of ``module`` (the update would run on
    the host copy while the forward pass runs on ``device``)."""
    sharded = False
    for name, p in named:
        if is_sharded(p):
            shard_spec(p, name)
            sharded = True
    if sharded and module is not None:
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
        except ImportError:
            return sharded
        for m in module.modules():
            if isinstance(m, FSDPModule):
                state = m._get_fsdp_state()
                groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
                if any(isinstance(getattr(g, "offload_policy", None), CPUOffloadPolicy) for g in groups):
                    raise UnsupportedSharding(
                        f"CPU offload (fully_shard(..., offload_policy=CPUOffloadPolicy()) on {type(m).__name__}) is "
                        "not supported: shard without offload_policy (LoRA adapters and their sampler state are "
                        f"small), or use strategy='ddp'. Device: {device}")
    return sharded


def reshard(module: Any) -> None:
    """Free FSDP2's unsharded parameters of ``module`` so that ``named_parameters()`` are the sharded
    DTensors again. After a forward pass without backward (validation, prediction) the root module stays
    unsharded; a write into those unsharded tensors would be lost at the next reshard, and a copy of
    them is not the sharded parameter. No-op without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
