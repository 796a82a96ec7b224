r"""The sampling engine: per-tensor sampler state and the operations every Langevin front-end shares.

:class:`LangevinEngine` is what :class:`~langevin_lora.LangevinSGD`, :class:`~langevin_lora.LangevinAdam`
(torch optimizers) and :class:`~langevin_lora.LangevinLoRA` (a Lightning callback) drive; they only
translate their framework's calls into its operations. The update itself is written once, in
:func:`langevin_lora.core.functional.langevin_step_` (THEORY §1–2):

.. math::
    \theta \leftarrow \theta - \eta\, G\odot(g + \lambda\theta) + \sqrt{2\eta/\beta}\,\sqrt G\odot\xi,
    \qquad \xi \sim N(0, I),

with, per group, the current step size :math:`\eta`, inverse temperature :math:`\beta = \beta_0/T` and
prior precision :math:`\lambda` (so LoRA ``A`` and ``B`` may differ), and, per tensor, a frozen
diagonal :math:`G` (none: :math:`G = 1`).

**Per-tensor state** (``engine.state[key]``, a dict of tensors):

- ``"master"``: the fp32 master copy of an fp16/bf16 parameter. It is the *work tensor*
  (:meth:`LangevinEngine.work_tensor`): every update, gauge move and balancing acts on it and the
  parameter receives its rounding, so noise far below the parameter's resolution accumulates.
- ``"precond"``, ``"precond_sqrt"``: the frozen :math:`G` and :math:`\sqrt G`
  (:meth:`~LangevinEngine.freeze`, :meth:`~LangevinEngine.refreeze`).
- ``"adapt_sq"``: running sum of :math:`(g + \lambda\theta)^2` while adapting :math:`G`
  (:meth:`~LangevinEngine.accumulate`).
- ``"momentum"``: the kinetic (BAOAB) momentum :math:`p` of a group with a ``friction``
  (:func:`~langevin_lora.core.functional.kinetic_step_`; :math:`p` stands for :math:`G\cdot p`, mass
  :math:`G^{-1}`), in the work dtype. Drawn from its stationary law :math:`N(0, G/\beta)` from the
  engine's generators at the tensor's first kinetic step (:math:`p = 0` at :math:`\beta = \infty`),
  so every data-parallel rank holds the same momenta. Stored *before* the closing half kick of the
  last step, which the next step's kick completes; rescaled by :math:`\sqrt{G_{new}/G_{old}}` when
  :math:`G` is re-frozen (the law :math:`N(0, G/\beta)` follows the new mass). Dropped when its group
  steps overdamped again.
- ``"prior_centre"``: the centre :math:`\theta_0` of the prior :math:`N(\theta_0, (\beta\lambda)^{-1})`
  (:meth:`~LangevinEngine.set_prior_centre`): the potential is
  :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2` and the drift's
  :math:`\lambda\theta` becomes :math:`\lambda(\theta - \theta_0)`, in both steps. Absent: :math:`\theta_0 = 0`.

Per group, :attr:`LangevinEngine.kinetic_lr` keeps the step size :math:`h_{t-1}` of each kinetic
group's last step (by :attr:`StepGroup.name`), so that the kick at step :math:`t` is
:math:`(h_{t-1} + h_t)/2\cdot G\nabla U` and an LR schedule keeps BAOAB's splitting consistent; it
is saved in :meth:`~LangevinEngine.state_dict`.

The key of a tensor is the front-end's: the callback keys by parameter name (its checkpoints are
matched by name), the optimizers hand over their own ``Optimizer.state`` (keyed by the parameter,
torch.optim's convention), so ``opt.state[p]["precond"]`` and ``Optimizer.state_dict()`` carry it.

**One step** (:meth:`~LangevinEngine.step`): the initial momenta of kinetic tensors taking their
first step (one draw), then one Gaussian draw for all noisy tensors of all groups
(:func:`langevin_lora.core.rng.draw_standard_normal`, explicit per-device generators), then one
:func:`~langevin_lora.core.functional.langevin_step_` (``friction=None``) or
:func:`~langevin_lora.core.functional.kinetic_step_` per (group, device, dtype) bucket, as torch.optim
groups its foreach kernels. Front-ends that present the same tensors, gradients, groups and seed
therefore produce bitwise-identical chains.

**Non-finite gradients** (:meth:`~LangevinEngine.check_finite`): ``"skip"`` warns
(:class:`NonFiniteGradientWarning`) and the front-end updates nothing and draws no noise;
``"raise"`` raises :class:`FloatingPointError`.

**Snapshots** (:meth:`~LangevinEngine.snapshot`, :meth:`~LangevinEngine.restore`): a copy of the work
tensors and of every slot of chosen keys, whatever the slots are, and its restoration; the divergence
guard (:mod:`langevin_lora.core.guard`) returns a chain to its last good position with them.

(Over 400 lines on purpose: the per-tensor state, its operations and its checkpoint form are one
contract shared by three front-ends; the update formulas themselves live in :mod:`langevin_lora.core.functional`.)
"""
from __future__ import annotations

import itertools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from langevin_lora._validation import check_choice
from langevin_lora.core import sharding
from langevin_lora.core.functional import (
    FRICTION_AUTO,
    LOW_PRECISION,
    accumulate_potential_grad_sq_,
    adapted_preconditioner,
    all_finite,
    auto_friction,
    kinetic_coefficients,
    kinetic_step_,
    langevin_step_,
    median_scale,
)
from langevin_lora.core.rng import NoiseBuffer, NoiseGenerators, draw_standard_normal
from langevin_lora.core.temperature import noise_std

__all__ = ["NONFINITE_POLICIES", "EngineFrontEnd", "LangevinEngine", "NonFiniteGradientWarning",
           "StepGroup", "work_tensor_of"]

NONFINITE_POLICIES = ("skip", "raise")
_DERIVED = ("precond_sqrt",)   # recomputed on load instead of saved
_log = logging.getLogger(__name__)


class NonFiniteGradientWarning(UserWarning):
    """A step was skipped because a gradient held inf or NaN."""


@dataclass
class StepGroup:
    r"""One group's share of a step: the tensors that have a gradient, their work tensors and
    gradients (in the update dtype), and the group's hyperparameters read at this step
    (``friction``: ``None`` for the overdamped step, :math:`\gamma > 0` or ``"auto"`` for BAOAB;
    ``name`` keys the group's last kinetic step size)."""

    keys: list
    params: list[Tensor]
    works: list[Tensor]
    grads: list[Tensor]
    lr: float = 0.0
    beta: float = math.inf
    weight_decay: float = 0.0
    foreach: bool | None = None
    mixed: bool = False   # the work tensors span several (device, dtype) buckets
    friction: float | str | None = None
    name: str = ""


def _cloned(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def work_tensor_of(sampler: Any, p: Tensor) -> Tensor:
    """The tensor ``sampler`` updates for ``p`` (its fp32 master copy, or ``p``); ``p`` for anything
    that is not a Langevin sampler (e.g. a torch optimizer)."""
    fn = getattr(sampler, "work_tensor", None)
    return fn(p) if callable(fn) else p


class EngineFrontEnd:
    """What a front-end holding ``self.engine`` shows of it: generators, policy, skipped steps."""

    engine: "LangevinEngine"

    @property
    def generators(self) -> NoiseGenerators:
        """The noise generators (saved in the front-end's ``state_dict``)."""
        return self.engine.generators

    @property
    def nonfinite(self) -> str:
        """The non-finite-gradient policy, ``"skip"`` or ``"raise"``."""
        return self.engine.nonfinite

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients."""
        return self.engine.skipped_steps


class LangevinEngine:
    """Per-tensor sampler state, noise generators and the non-finite policy (see the module docstring).

    Args:
        seed: seed of the noise generators (``None``: from the OS, shared from rank 0 under
            ``torch.distributed``).
        nonfinite: ``"skip"`` or ``"raise"``.
        owner: the front-end's name, used in messages.
        state: the mapping that holds the per-tensor state (default: a new ``dict``).
    """

    def __init__(self, *, seed: int | None = None, nonfinite: str = "skip", owner: str = "LangevinEngine",
                 state: MutableMapping[Hashable, dict[str, Tensor]] | None = None) -> None:
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.generators = NoiseGenerators(seed)
        self._noise = NoiseBuffer()   # storage of the per-step draw, reused (no per-tensor work per step)
        self.owner = owner
        self.state: MutableMapping[Hashable, dict[str, Tensor]] = {} if state is None else state
        self.skipped_steps = 0
        self.kinetic_lr: dict[str, float] = {}   # group name -> h of its last kinetic step
        self._auto: dict[str, tuple[list[Tensor] | None, float, float]] = {}   # "auto" friction, cached
        #: key -> :class:`~langevin_lora.core.sharding.ShardSpec` of each sharded (DTensor) parameter met
        self.shards: dict[Hashable, sharding.ShardSpec] = {}

    # -- per-tensor state ----------------------------------------------------------------------------
    def _slot(self, key: Hashable) -> dict[str, Tensor]:
        slot = self.state.get(key)
        if slot is None:
            slot = self.state[key] = {}
        return slot

    def work_tensor(self, key: Hashable, param: Tensor) -> Tensor:
        """The tensor updated for ``param``: its fp32 master copy for fp16/bf16 (made on first use),
        else ``param`` itself; for a sharded (DTensor) parameter, its local shard or the shard's master
        (:mod:`langevin_lora.core.sharding`). Anything that writes a sampled parameter (gauge moves,
        balancing) must write this tensor and then copy it into ``param``."""
        spec = None
        if sharding.is_sharded(param):
            spec = self.shards.get(key) or self.shards.setdefault(key, sharding.shard_spec(param, key))
            param = sharding.mark(sharding.local_tensor(param), spec)
        if param.dtype not in LOW_PRECISION:
            return param
        slot = self._slot(key)
        master = slot.get("master")
        if master is None:
            master = slot["master"] = sharding.mark(param.detach().float(), spec)
        return master

    def track(self, params: Mapping[Hashable, Tensor]) -> None:
        """Record the :class:`~langevin_lora.core.sharding.ShardSpec` of every sharded (DTensor) parameter of
        ``params`` (key -> parameter) before anything reduces over the shards (e.g. the median of a freeze
        made before the first step); raises :class:`~langevin_lora.core.sharding.UnsupportedSharding` for an
        unsupported layout. Cheap for unsharded parameters."""
        for key, p in params.items():
            if sharding.is_sharded(p) and key not in self.shards:
                self.shards[key] = sharding.shard_spec(p, key)

    @property
    def sharded(self) -> bool:
        """Whether any parameter met so far is sharded (then sums, minima and medians reduce over ranks)."""
        return bool(self.shards)

    def specs(self, keys: Iterable[Hashable]) -> list[sharding.ShardSpec | None]:
        """The :class:`~langevin_lora.core.sharding.ShardSpec` of each key (``None``: unsharded)."""
        return [self.shards.get(k) for k in keys]

    def _full(self, key: Hashable, t: Any) -> Any:
        """The unsharded tensor of the per-tensor value ``t`` of ``key`` (gathered over its shards: a
        collective), else ``t`` (also a front-end's counters: builtins or tensors not shaped like the shard)."""
        spec = self.shards.get(key)
        if spec is None or not torch.is_tensor(t) or t.dim() != len(spec.global_shape):
            return t
        return sharding.full_tensor(t, spec)

    def gather(self, params: Sequence[Tensor], keys: Sequence[Hashable] | None = None, **hyper: Any) -> StepGroup:
        """The parameters of ``params`` that have a gradient, with their work tensors and gradients in
        the update dtype (fp16/bf16 gradients upcast). ``keys`` default to the parameters; ``hyper``
        fills the :class:`StepGroup`'s hyperparameters."""
        keys = params if keys is None else keys
        out = StepGroup([], [], [], [], **hyper)
        okeys, oparams, works, grads = out.keys, out.params, out.works, out.grads
        dtype0 = device0 = None
        for key, p in zip(keys, params):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{self.owner} does not support sparse gradients")
            okeys.append(key)
            oparams.append(p)
            dtype = p.dtype
            if sharding.is_sharded(p):   # the local shard, its gradient's shard beside it
                works.append(self.work_tensor(key, p))
                grads.append(sharding.local_tensor(g).float() if dtype in LOW_PRECISION else sharding.local_tensor(g))
                dtype = works[-1].dtype
            elif dtype in LOW_PRECISION:
                works.append(self.work_tensor(key, p))
                grads.append(g.float())
                dtype = torch.float32
            else:
                works.append(p)
                grads.append(g)
            device = p.get_device()   # an int: cheaper than p.device
            if dtype0 is None:
                dtype0, device0 = dtype, device
            elif dtype is not dtype0 or device != device0:
                out.mixed = True
        return out

    def preconditioners(self, keys: Iterable[Hashable]) -> list[Tensor] | None:
        """The frozen :math:`G` of every key, or ``None`` unless all of them have one."""
        state, out = self.state, []
        for key in keys:
            slot = state.get(key)
            G = slot.get("precond") if slot else None
            if G is None:
                return None
            out.append(G)
        return out

    def prior_centres(self, keys: Sequence[Hashable], works: Sequence[Tensor] | None = None) -> list[Tensor] | None:
        """The prior centres :math:`\theta_0` of ``keys``, or ``None`` when none has one; a key without a
        centre among keys with one gets an explicit zero (shaped like its work tensor in ``works``)."""
        state = self.state
        found = [state.get(k, {}).get("prior_centre") for k in keys]
        if all(c is None for c in found):
            return None
        if any(c is None for c in found):
            if works is None:
                raise ValueError(f"{self.owner}: some tensors have a prior centre and others not")
            found = [torch.zeros_like(w) if c is None else c for c, w in zip(found, works)]
        return found

    def set_prior_centre(self, keys: Sequence[Hashable], works: Sequence[Tensor]) -> None:
        """Centre the prior of each key at (a copy of) its work tensor's current value (THEORY §6)."""
        for key, w in zip(keys, works):
            self._slot(key)["prior_centre"] = w.detach().clone()

    @property
    def has_prior_centre(self) -> bool:
        """Whether any tensor's prior is centred away from 0 (gauge moves and balancing refuse it)."""
        return any("prior_centre" in slot for slot in self.state.values())

    def momenta(self, keys: Iterable[Hashable]) -> list[Tensor] | None:
        """The kinetic momenta of ``keys``, or ``None`` unless all of them have one."""
        out = []
        for key in keys:
            m = self.state.get(key, {}).get("momentum")
            if m is None:
                return None
            out.append(m)
        return out

    def masters(self) -> dict[Hashable, Tensor]:
        """The fp32 master copies, by key."""
        return {k: s["master"] for k, s in self.state.items() if "master" in s}

    @staticmethod
    def write_back(group: StepGroup) -> None:
        """Copy updated master copies into their fp16/bf16 parameters (their rounding)."""
        for p, w in zip(group.params, group.works):
            if w is not p:
                p = sharding.local_tensor(p)
                if w is not p:
                    p.copy_(w)

    # -- the non-finite policy -------------------------------------------------------------------------
    def check_finite(self, grads: Sequence[Tensor], *, stacklevel: int = 3) -> bool:
        """``True`` when every gradient is finite; else raise (``"raise"``) or count, warn and return
        ``False`` (``"skip"``: the caller updates nothing and draws no noise)."""
        if self.shards:   # every rank judges its shards: decide together
            if sharding.all_ranks_true(all_finite([sharding.local_tensor(g) for g in grads]),
                                       list(self.shards.values())):
                return True
        elif all_finite(grads):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{self.owner}: non-finite gradient (inf or NaN); nothing was updated")
        self.skipped_steps += 1
        # One constant message (the count is ``skipped_steps``): Python's warning filter then shows it once
        # per call site instead of flooding the log with one distinct line per skipped step.
        warnings.warn(f"{self.owner}: non-finite gradient (inf or NaN); step skipped, nothing updated, no noise "
                      "drawn (the count is the skipped_steps attribute)", NonFiniteGradientWarning,
                      stacklevel=stacklevel)
        return False

    # -- the preconditioner ----------------------------------------------------------------------------
    def _set_precond(self, key: Hashable, G: Tensor) -> None:
        slot = self._slot(key)
        momentum = slot.get("momentum")
        if momentum is not None:   # keep p ~ N(0, G/beta) under the new mass G^-1
            old = slot.get("precond")
            momentum.mul_((G / old).sqrt() if old is not None else G.sqrt())
        slot["precond"] = G
        slot["precond_sqrt"] = G.sqrt()

    def freeze(self, raw: Sequence[tuple[Hashable, Tensor, tuple[float, float]]],
               fixed: Mapping[Hashable, Tensor] | None = None) -> float:
        r"""Freeze :math:`G` jointly: for each ``(key, r, (lo, hi))``, with :math:`r = 1/(\sqrt{\hat v}+\epsilon)`,
        :math:`G = \operatorname{clamp}(r, lo\,m, hi\,m)` where :math:`m` is the median of every
        :math:`r` together (so a tensor whose gradient stayed ~0, LoRA ``A`` while ``B = 0``, is
        capped). ``fixed`` tensors are stored as given (e.g. ones). Returns :math:`m` (1 if ``raw``
        is empty), the reference scale :meth:`refreeze` keeps."""
        reference = median_scale([self._full(key, r) for key, r, _ in raw]) if raw else 1.0
        for key, r, (lo, hi) in raw:
            self._set_precond(key, r.clamp_(min=lo * reference, max=hi * reference))
        for key, G in (fixed or {}).items():
            self._set_precond(key, G)
        return reference

    def accumulate(self, groups: Iterable[StepGroup]) -> None:
        r"""Add :math:`(g + \lambda(\theta - \theta_0))^2` at the pre-step point to each tensor's adaptation sum."""
        for g in groups:
            if not g.works:
                continue
            sums = []
            for key, w in zip(g.keys, g.works):
                slot = self._slot(key)
                if "adapt_sq" not in slot:
                    slot["adapt_sq"] = torch.zeros_like(w)
                sums.append(slot["adapt_sq"])
            accumulate_potential_grad_sq_(sums, g.grads, g.works, g.weight_decay, self.prior_centres(g.keys, g.works))

    def refreeze(self, counts: Mapping[Hashable, int], reference: float, *, eps: float = 1e-8,
                 clamp: tuple[float, float] = (0.01, 100.0)) -> list[Tensor]:
        """End of adaptation: :math:`G` from the mean squared gradient of U of every key of ``counts``
        that has a sum (:func:`~langevin_lora.core.functional.adapted_preconditioner`, jointly, median
        ``reference``); the sums are dropped. Keys without a sum keep their :math:`G`. Returns the new
        :math:`G` tensors."""
        keys = [k for k in counts if "adapt_sq" in self.state.get(k, {})]
        if not keys:
            return []
        means = [self._full(k, self.state[k].pop("adapt_sq").div_(counts[k])) for k in keys]
        G = adapted_preconditioner(means, reference, eps, clamp)   # its median: over the unsharded tensors
        G = [Gk if k not in self.shards else Gk[self.shards[k].slices].clone() for k, Gk in zip(keys, G)]
        for key, Gk in zip(keys, G):
            self._set_precond(key, Gk)
        return G

    # -- the step --------------------------------------------------------------------------------------
    def friction(self, group: StepGroup) -> float | None:
        r"""The group's :math:`\gamma` (``"auto"`` resolved by :func:`~langevin_lora.core.functional.auto_friction`
        from its weight decay and frozen :math:`G`, cached until either changes)."""
        if group.friction != FRICTION_AUTO:
            return group.friction
        precond = self.preconditioners(group.keys)
        cached = self._auto.get(group.name)
        if (cached is None or cached[1] != group.weight_decay or (cached[0] is None) != (precond is None)
                or (precond is not None and (len(precond) != len(cached[0])
                                             or any(a is not b for a, b in zip(precond, cached[0]))))):
            mins = precond
            if precond is not None and self.shards:   # the smallest G over every shard
                mins = [torch.tensor(sharding.global_min(precond, self.specs(group.keys)))]
            cached = self._auto[group.name] = (precond, group.weight_decay, auto_friction(group.weight_decay, mins))
            _log.info("%s: friction='auto' of group %r: gamma = 2*sqrt(weight_decay * min G) = %.4g "
                      "(weight_decay %.4g)", self.owner, group.name, cached[2], group.weight_decay)
        return cached[2]

    def auto_frictions(self) -> dict[str, float]:
        r"""The :math:`\gamma` that ``friction="auto"`` resolved to, by group name (also logged at INFO by
        logger ``langevin_lora.core.engine`` each time it is resolved)."""
        return {name: value[2] for name, value in self._auto.items()}

    def _init_momenta(self, groups: Sequence[StepGroup]) -> None:
        r"""Draw :math:`p \sim N(0, G/\beta)` for every kinetic tensor without a momentum (one draw)."""
        fresh = [(g, key, w) for g in groups for key, w in zip(g.keys, g.works)
                 if "momentum" not in self.state.get(key, {})]
        noisy = [(g, key, w) for g, key, w in fresh if not math.isinf(g.beta)]
        draws = draw_standard_normal([w for _, _, w in noisy], self.generators) if noisy else []
        for g, key, w in fresh:
            self._slot(key)["momentum"] = torch.zeros_like(w)
        for (g, key, _), xi in zip(noisy, draws):
            if key in self.shards:
                xi = xi.clone()   # the shard's slice only: not a view of the full draw
            slot = self.state[key]
            G_sqrt = slot.get("precond_sqrt")
            p = xi.mul_(1.0 / math.sqrt(g.beta))
            slot["momentum"] = p.mul_(G_sqrt) if G_sqrt is not None else p

    def _noise_std(self, group: StepGroup, friction: float | None) -> float:
        if friction is None:
            return noise_std(group.lr, group.beta)
        return kinetic_coefficients(group.lr, friction, group.beta)[1]

    def step(self, groups: Sequence[StepGroup]) -> None:
        """One Langevin step of every group (one noise draw over all of them, in group order): the
        overdamped step, or BAOAB for groups with a friction; then the master copies are written back
        into their parameters."""
        frictions = [self.friction(g) if g.works else None for g in groups]
        kinetic = [g for g, f in zip(groups, frictions) if f is not None]
        if kinetic:
            kicks = {id(g): [g.lr / 2 if "momentum" not in self.state.get(k, {}) else
                             (self.kinetic_lr.get(g.name, g.lr) + g.lr) / 2 for k in g.keys] for g in kinetic}
            self._init_momenta(kinetic)
        stds = [self._noise_std(g, f) for g, f in zip(groups, frictions)]
        noisy = [w for g, std in zip(groups, stds) if std > 0 for w in g.works]
        draws = iter(draw_standard_normal(noisy, self.generators, buffer=self._noise)) if noisy else iter(())
        for g, std, friction in zip(groups, stds, frictions):
            if not g.works:
                continue
            noise = list(itertools.islice(draws, len(g.works))) if std > 0 else None
            precond = self.preconditioners(g.keys)
            precond_sqrt = None if precond is None else [self.state[k]["precond_sqrt"] for k in g.keys]
            centre = self.prior_centres(g.keys, g.works)
            if friction is None:
                for k in g.keys:
                    self.state.get(k, {}).pop("momentum", None)
                lists = [g.works, g.grads, noise or [], precond or [], precond_sqrt or [], centre or []]
            else:
                lists = [g.works, g.grads, noise or [], precond or [], precond_sqrt or [], centre or [],
                         self.momenta(g.keys)]
                damping = kinetic_coefficients(g.lr, friction, g.beta)[0]
            buckets = (Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True) if g.mixed
                       else {None: (lists, list(range(len(g.works))))})
            for (works, grads, nz, pre, pre_sqrt, cen, *mom), index in buckets.values():
                common = dict(noise_std=std, weight_decay=g.weight_decay, precond=pre or None,
                              precond_sqrt=pre_sqrt or None, prior_centre=cen or None, foreach=g.foreach)
                if friction is None:
                    langevin_step_(works, grads, nz or None, lr=g.lr, **common)
                else:
                    kick = [kicks[id(g)][i] for i in index]
                    kinetic_step_(works, grads, mom[0], nz or None, lr=g.lr, kick=kick, damping=damping, **common)
            self.write_back(g)
        for g in kinetic:
            self.kinetic_lr[g.name] = g.lr

    # -- snapshots (the divergence guard) --------------------------------------------------------------
    def snapshot(self, params: Mapping[Hashable, Tensor]) -> dict[str, Any]:
        """A copy of the chain's position for the keys of ``params`` (key -> parameter): each work tensor
        (:meth:`work_tensor`) and every per-tensor state slot (preconditioner, momenta, masters, ...),
        tensors cloned, other values copied. :meth:`restore` returns to it. Generators are not part of
        it: a chain restored after a divergence draws fresh noise."""
        works = {k: self.work_tensor(k, p).detach().clone() for k, p in params.items()}
        state = {}
        for k in params:
            slot = self.state.get(k)
            state[k] = {n: t.clone() if torch.is_tensor(t) else t for n, t in (slot or {}).items()}
        return {"works": works, "state": state}

    @torch.no_grad()
    def restore(self, snapshot: Mapping[str, Any], params: Mapping[Hashable, Tensor]) -> None:
        """Return the keys of ``params`` to :meth:`snapshot`'s copy: every state slot takes its saved
        value (in place when shape, dtype and device agree, so references stay valid), slots made since
        are dropped, and each work tensor and its parameter receive the saved position."""
        for k, p in params.items():
            saved = snapshot["state"].get(k, {})
            slot = self._slot(k)
            for name in [n for n in slot if n not in saved]:
                del slot[name]
            for name, value in saved.items():
                live = slot.get(name)
                if (torch.is_tensor(value) and torch.is_tensor(live) and live.shape == value.shape
                        and live.dtype == value.dtype and live.device == value.device):
                    live.copy_(value)
                else:
                    slot[name] = value.clone() if torch.is_tensor(value) else value
            work = self.work_tensor(k, p)
            work.copy_(snapshot["works"][k])
            p = sharding.local_tensor(p)
            if work is not p:
                p.copy_(work)

    # -- state -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every per-tensor state and restart the generators from the seed (a new chain)."""
        self.state.clear()
        self.shards.clear()
        self.generators.reset()
        self.skipped_steps = 0
        self.kinetic_lr.clear()
        self._auto.clear()

    def state_dict(self, per_tensor: bool = True) -> dict[str, Any]:
        """Generators, skipped-step count and (``per_tensor``) the per-tensor state, cloned, without
        the tensors derived on load (:math:`\\sqrt G`). Tensors and builtins only."""
        out: dict[str, Any] = {"generators": self.generators.state_dict(), "skipped_steps": self.skipped_steps,
                               "kinetic_lr": dict(self.kinetic_lr)}
        if per_tensor:   # sharded tensors saved unsharded: the checkpoint does not depend on the sharding
            out["state"] = {k: {n: _cloned(self._full(k, t)) for n, t in s.items() if n not in _DERIVED}
                            for k, s in self.state.items() if s}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Per-tensor tensors stay where they were loaded until
        :meth:`bind` places them beside their parameters."""
        self.generators.load_state_dict(state["generators"])
        self.skipped_steps = int(state["skipped_steps"])
        self.kinetic_lr = {str(k): float(v) for k, v in state.get("kinetic_lr", {}).items()}
        if "state" in state:
            self.state.clear()
            for key, slot in state["state"].items():
                self.state[key] = dict(slot)

    def bind(self, params: Mapping[Hashable, Tensor]) -> None:
        """Check that every key of the state names one of ``params``, move its tensors to that
        parameter's device and recompute the derived tensors. Raises ``ValueError`` naming an
        unknown key."""
        for key, slot in self.state.items():
            p = params.get(key)
            if p is None:
                raise ValueError(f"{self.owner} state: the module has no parameter {key!r}")
            spec = None
            if sharding.is_sharded(p):   # a full (or same-layout) checkpoint: keep this rank's slice
                spec = self.shards[key] = sharding.shard_spec(p, key)
            for name, t in list(slot.items()):
                if name not in _DERIVED and torch.is_tensor(t):   # (a front-end's counters stay as they are)
                    if spec is not None and t.shape == spec.global_shape != p.to_local().shape:
                        t = t[spec.slices].clone()
                    slot[name] = sharding.mark(t.to(p.device), spec if name == "master" else None)
            if "precond" in slot:
                slot["precond_sqrt"] = slot["precond"].sqrt()
