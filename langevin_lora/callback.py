r"""``LangevinLoRA``: Langevin sampling of PEFT LoRA adapters inside any Lightning ``Trainer``.

Add one callback to a Trainer whose LightningModule holds a PEFT LoRA model and configures its
own optimizer (typically AdamW)::

    trainer = Trainer(callbacks=[LangevinLoRA(burn_in_steps=500, weight_decay=1e-2,
                                              sample_every=50, num_samples=20)])

**Target.** After burn-in the LoRA tensors :math:`\theta` sample the Gibbs measure

.. math::
    \pi(\theta) \propto \exp\!\big(-\beta\,[\hat L(\theta) + \tfrac{\lambda}{2}\lVert\theta\rVert^2]\big),
    \qquad \beta = \beta_0 / T,\quad \beta_0 = N\ (\texttt{num\_data})\ \text{or}\ \texttt{beta},

with :math:`\hat L` the mean training loss the LightningModule returns, :math:`\lambda` =
``weight_decay`` (a Gaussian prior :math:`N(0, (N\lambda)^{-1} I)` when :math:`\beta_0 = N`) and
:math:`T` = ``temperature`` (see :mod:`langevin_lora.temperature`). ``num_data=N, temperature=1``
is the Bayesian posterior of a mean-NLL loss; ``num_data`` defaults to ``len(train_dataset)``.

**The contract with the user's optimizer.**

- *Burn-in* (optimizer steps ``0 .. burn_in_steps-1``, counted as ``trainer.global_step``): the
  user's optimizer runs untouched; it heads for a mode and, for Adam/AdamW, learns the second
  moment :math:`v`.
- *Sampling* (from step ``burn_in_steps`` on): every LoRA tensor takes the frozen-preconditioner
  Langevin step of :func:`langevin_lora.functional.langevin_step_`

  .. math::
      \theta \leftarrow \theta - \eta\, G\odot(g + \lambda\theta) + \sqrt{2\eta/\beta}\,\sqrt G\odot\xi,

  :math:`\eta` the **current** learning rate of the user's param group holding the tensor (LR
  schedules keep applying), :math:`G = \operatorname{clamp}(1/(\sqrt{\hat v}+\epsilon))` frozen
  once from the user's Adam/AdamW ``exp_avg_sq`` (its ``betas[1]``, ``eps``, ``step``) when
  sampling starts, or :math:`G = 1` (SGLD) for optimizers without a second moment or with
  ``precondition=False``. Weight decay is *coupled* (through :math:`G`); the user's own
  (decoupled) weight decay and moments are not applied to LoRA tensors while sampling.
- *Adaptation* (optional, ``precond_adapt_steps=k``): the first :math:`k` Langevin steps also
  average :math:`(g + \lambda\theta)^2`, then :math:`G` is re-frozen once from it (at
  stationarity :math:`\mathbb E[(\partial_i U)^2] = \mathbb E[\partial_{ii}U]/\beta`: a curvature
  scale, where AdamW's burn-in :math:`v` records the gradients met on the way to the mode), with
  the same median so the learning rate keeps its meaning. No sample is kept during adaptation.
- *Heads* (every other trainable tensor, e.g. a classifier in ``modules_to_save``) keep the user's
  optimizer, noise-free. With ``head_temperature > 0`` they join the Langevin step instead, at
  :math:`\beta_0/T_{head}` with ``head_weight_decay`` (default ``weight_decay``).

**One noise draw per optimizer step.** The callback wraps the torch optimizer's ``step`` (a torch
step pre-hook would fire before Lightning's closure has computed the gradients). The wrapper runs
Lightning's closure (forward, backward, ``on_before_optimizer_step``, gradient clipping), hides
the Langevin tensors' gradients from the user's optimizer, calls the original ``step`` for the
heads, restores the gradients, and applies one Langevin step. Hence:

- gradient accumulation over :math:`k` micro-batches gives one draw per optimizer step (the drift
  uses the accumulated mean gradient), exactly as with :math:`k = 1`;
- under AMP with a ``GradScaler``, a step with inf/NaN gradients is skipped by the scaler before
  the wrapper runs: no update, no noise; without a scaler a non-finite Langevin gradient skips the
  Langevin update (no noise, :class:`~langevin_lora.NonFiniteGradientWarning`);
- **gradient clipping** (``Trainer(gradient_clip_val=...)``) happens inside the closure, *before*
  the Langevin step: the drift uses clipped gradients. Clipping that is ever active changes the
  drift, so the chain no longer targets :math:`\pi_\beta` exactly; keep it off (or loose enough
  never to trigger) while sampling.

**Low precision.** fp16/bf16 Langevin tensors are updated through fp32 master copies (saved in
the checkpoint); gradients are upcast.

**Checkpoints.** :meth:`LangevinLoRA.state_dict` holds the phase, step counters, generator states,
frozen preconditioners, adaptation sums, master copies and the sample bank; a run resumed with
``trainer.fit(..., ckpt_path=...)`` continues bitwise identically, given the same data order
(Lightning restarts a plain, non-stateful DataLoader at its first batch on resume, so checkpoint at
epoch boundaries or use a stateful loader).

**Data parallel.** DDP works: gradients are averaged before the step and every rank draws the same
noise from identically seeded generators, so replicas stay identical. Sharded strategies (FSDP,
DeepSpeed, ModelParallel) are refused in ``setup`` with a ``MisconfigurationException``.

**Observers.** ``step_observers`` are called as ``fn(trainer, pl_module, callback)`` right before
each Langevin step and before the user's optimizer updates the heads (gradients final and present,
no parameter updated yet; not called for steps skipped for non-finite gradients);
``post_step_observers`` right after it. Both run on every rank.

**Gauge (THEORY §4).** ``balance=BalanceSchedule(every_n_steps=k, at_sampling_start=True)``
balances the LoRA factors (same :math:`BA`, minimal :math:`|A|^2+|B|^2`) after every ``k``-th
burn-in step and once at the end of burn-in, transporting the user's Adam moments to the new gauge
before the preconditioner is frozen; never while sampling (that would change the law of
:math:`W`). ``gauge_moves=GaugeMoves(...)`` applies exact orthogonal / Metropolis GL(r) gauge moves
after Langevin steps (no forward pass; they leave :math:`\pi_\beta` invariant) and logs
``langevin/gauge/*`` (e.g. the GL acceptance rate).
"""
from __future__ import annotations

import math
import os
import types
import warnings
import weakref
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from langevin_lora._rng import NoiseGenerators, draw_standard_normal
from langevin_lora._validation import check_choice, check_int, check_non_negative, check_positive
from langevin_lora.functional import (
    accumulate_potential_grad_sq_,
    adam_inverse_scale,
    adapted_preconditioner,
    all_finite,
    check_clamp,
    langevin_step_,
    median_scale,
)
from langevin_lora.gauge import SAMPLING_REFUSAL, BalanceSchedule, GaugeMoves
from langevin_lora.optim.base import LOW_PRECISION, LangevinOptimizer, NonFiniteGradientWarning
from langevin_lora.param_groups import lora_modules, lora_param_groups
from langevin_lora.samples import SampleBank
from langevin_lora.temperature import effective_beta, noise_std, resolve_base_beta
from langevin_lora.view import LangevinGroupView

__all__ = ["LangevinLoRA", "SHARDED_STRATEGIES"]

#: Strategy classes refused: their parameters are shards, so per-tensor noise would not be
#: identical across world sizes.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")

Observer = Callable[[Trainer, LightningModule, "LangevinLoRA"], None]


class _Group:
    """Langevin tensors sharing a role (``lora_A/<adapter>`` …) and a user param group."""

    __slots__ = ("name", "params", "names", "opt_group", "base_temperature", "weight_decay")

    def __init__(self, name, params, names, opt_group, temperature, weight_decay):
        self.name, self.params, self.names = name, params, names
        self.opt_group, self.base_temperature, self.weight_decay = opt_group, temperature, weight_decay

    @property
    def lr(self) -> float:
        lr = self.opt_group["lr"]
        return float(lr.item() if torch.is_tensor(lr) else lr)


class LangevinLoRA(Callback):
    r"""Langevin sampling of the LoRA adapters of a LightningModule, plus a posterior sample bank.

    See the module docstring for the full contract. Inverse temperature of the LoRA tensors:
    :math:`\beta = \beta_0/T`, :math:`\beta_0` = ``num_data`` (inferred from the training dataset
    when neither ``num_data`` nor ``beta`` is given) or ``beta``.

    Args:
        num_data: number of training examples :math:`N` (supervised tokens for a token-averaged
            LM loss); ``None`` infers ``len(trainer.train_dataloader.dataset)``.
        temperature: :math:`T \ge 0` (``0``: noise-free descent on :math:`U`).
        beta: :math:`\beta_0 > 0` directly, instead of ``num_data``.
        weight_decay: :math:`\lambda \ge 0`, coupled L2 prior on the LoRA tensors.
        burn_in_steps: optimizer steps (``trainer.global_step``) run by the user's optimizer alone.
        sample_every: keep a sample every this many Langevin steps (>= 1).
        num_samples: capacity of :attr:`sample_bank` (0: keep none); the most recent are kept.
        seed: seed of the noise generators (``None``: random, shared from rank 0).
        adapter_name: PEFT adapter to sample (default: the active adapters).
        head_temperature: :math:`T_{head}`; 0 keeps heads on the user's optimizer, noise-free.
        precondition: freeze the user's Adam second moment into :math:`G` (else :math:`G = 1`).
        precond_clamp: ``(c_lo, c_hi)``, :math:`G` clamped to ``[c_lo m, c_hi m]``, :math:`m` the median
            of the unclamped :math:`G` over all Langevin tensors.
        precond_adapt_steps: after burn-in, take this many Langevin steps with the frozen
            :math:`G` while averaging :math:`(g + \lambda\theta)^2` per coordinate, then re-freeze
            :math:`G` once from that average (:func:`~langevin_lora.functional.adapted_preconditioner`:
            a curvature scale, same median, so the learning rate keeps its meaning). No sample is
            kept during those steps. 0 (default): keep the burn-in's :math:`G`.
        sample_dir: write samples as PEFT adapter folders here instead of keeping them in memory.
        head_weight_decay: :math:`\lambda` of sampled heads (default ``weight_decay``).
        foreach: use the ``torch._foreach_*`` update path (default: automatic).
        nonfinite: ``"skip"`` (warn, no update, no noise) or ``"raise"`` on non-finite gradients
            of the Langevin tensors.
        balance: a :class:`~langevin_lora.gauge.BalanceSchedule`: balance the factors during burn-in
            (every ``every_n_steps`` steps) and/or once when burn-in ends. Never while sampling.
        gauge_moves: a :class:`~langevin_lora.gauge.GaugeMoves` applied after Langevin steps.
        diagnostics: ``True`` (default) attaches a :class:`~langevin_lora.diagnostics.GibbsDiagnostics`
            with its default cadence (cheap estimators every step, logged every 10; HVP ones rarely;
            the end-of-fit stationarity report is saved when the Trainer has a logger) unless the
            Trainer already has one; pass your own instance to configure it, ``False`` for none.

    Attributes:
        sample_bank: the :class:`~langevin_lora.samples.SampleBank`.
        sampling: ``True`` once Langevin sampling has started.
        num_data, beta: as resolved (``beta`` is the effective :math:`\beta_0/T` of the LoRA groups).
        step_observers, post_step_observers: lists of ``fn(trainer, pl_module, callback)``.
        langevin_steps, skipped_steps: Langevin steps taken / skipped for non-finite gradients.
    """

    def __init__(self, num_data: int | None = None, temperature: float = 1.0, beta: float | None = None,
                 weight_decay: float = 0.0, burn_in_steps: int = 0, sample_every: int = 1, num_samples: int = 0,
                 seed: int | None = 0, adapter_name: str | None = None, head_temperature: float = 0.0,
                 precondition: bool = True, precond_clamp: tuple[float, float] = (0.01, 100.0),
                 sample_dir: str | os.PathLike | None = None, head_weight_decay: float | None = None,
                 foreach: bool | None = None, nonfinite: str = "skip", balance: BalanceSchedule | None = None,
                 gauge_moves: GaugeMoves | None = None, diagnostics: Any = True,
                 precond_adapt_steps: int = 0) -> None:
        if num_data is not None and beta is not None:
            resolve_base_beta(num_data, beta)  # raises: exactly one of them
        if num_data is not None:
            check_int("num_data", num_data, low=1)
        if beta is not None:
            check_positive("beta", beta)
        self.temperature = check_non_negative("temperature", temperature)
        self.weight_decay = check_non_negative("weight_decay", weight_decay)
        self.burn_in_steps = check_int("burn_in_steps", burn_in_steps, low=0)
        self.sample_every = check_int("sample_every", sample_every, low=1)
        self.num_samples = check_int("num_samples", num_samples, low=0)
        self.head_temperature = check_non_negative("head_temperature", head_temperature)
        self.head_weight_decay = (self.weight_decay if head_weight_decay is None
                                  else check_non_negative("head_weight_decay", head_weight_decay))
        if not isinstance(precondition, bool):
            raise ValueError(f"Invalid precondition: {precondition!r} (expected True or False)")
        self.precondition = precondition
        self.precond_clamp = check_clamp(precond_clamp)
        self.precond_adapt_steps = check_int("precond_adapt_steps", precond_adapt_steps, low=0)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("skip", "raise"))
        if sample_dir is not None and self.num_samples == 0:
            raise ValueError(f"Invalid sample_dir: {sample_dir!r} given with num_samples=0 (expected num_samples >= 1 "
                             "to write samples, or sample_dir=None)")
        if balance is not None and not isinstance(balance, BalanceSchedule):
            raise ValueError(f"Invalid balance: {balance!r} (expected a langevin_lora.BalanceSchedule or None)")
        if gauge_moves is not None and not isinstance(gauge_moves, GaugeMoves):
            raise ValueError(f"Invalid gauge_moves: {gauge_moves!r} (expected a langevin_lora.GaugeMoves or None)")
        if balance is not None and balance.every_n_steps is not None and self.burn_in_steps == 0:
            raise ValueError(f"Invalid balance: every_n_steps={balance.every_n_steps} with burn_in_steps=0 would "
                             "balance during sampling: " + SAMPLING_REFUSAL)
        from langevin_lora.diagnostics import GibbsDiagnostics

        if not isinstance(diagnostics, (bool, GibbsDiagnostics)):
            raise ValueError(f"Invalid diagnostics: {diagnostics!r} (expected True, False or a GibbsDiagnostics)")
        self.diagnostics = diagnostics
        self.balance = balance
        self.gauge_moves = gauge_moves
        self.gauge_stats: dict[str, float] = {}
        self.adapter_name = adapter_name
        self.foreach = foreach
        self._num_data_arg = num_data
        self._beta_arg = None if beta is None else float(beta)
        self.num_data: int | None = num_data
        self.generators = NoiseGenerators(seed)
        self.sample_bank = SampleBank(self.num_samples, directory=sample_dir)
        self.step_observers: list[Observer] = []
        self.post_step_observers: list[Observer] = []
        self.sampling = False
        self.langevin_steps = 0
        self.skipped_steps = 0
        self._groups: list[_Group] = []
        self._precond: dict[str, Tensor] = {}
        self._precond_sqrt: dict[str, Tensor] = {}
        self._masters: dict[str, Tensor] = {}
        self._adapt_sq: dict[str, Tensor] = {}      # running sums of (g + lam theta)^2 while adapting
        self._precond_reference = 1.0                # median scale of G frozen at the end of burn-in
        self._pending: dict[str, Any] | None = None
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None
        self._installed: tuple[torch.optim.Optimizer, Any, bool, Callable] | None = None
        self._wrapper_active = [False]

    # -- temperature -------------------------------------------------------------------------------
    @property
    def base_beta(self) -> float | None:
        r""":math:`\beta_0` (``None`` until ``num_data`` is known)."""
        if self._beta_arg is not None:
            return self._beta_arg
        return None if self.num_data is None else float(self.num_data)

    @property
    def beta(self) -> float | None:
        r"""Effective :math:`\beta = \beta_0/T` of the LoRA groups (``inf`` at ``T = 0``)."""
        b0 = self.base_beta
        return None if b0 is None else effective_beta(b0, self.temperature)

    def _group_beta(self, group: _Group) -> float:
        return effective_beta(self.base_beta, group.base_temperature)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = {c.__name__ for c in type(trainer.strategy).__mro__}
        refused = names.intersection(SHARDED_STRATEGIES)
        if refused:
            raise MisconfigurationException(
                f"LangevinLoRA does not support the sharded strategy {type(trainer.strategy).__name__} "
                f"({sorted(refused)[0]}): each rank holds shards of the adapter tensors, so noise drawn per "
                "tensor would depend on the sharding. Use strategy='ddp' (or a single device).")
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "LangevinLoRA needs automatic optimization (it wraps the optimizer step Lightning calls); "
                f"{type(pl_module).__name__}.automatic_optimization is False. Use LangevinSGD/LangevinAdam "
                "as the optimizer for manual optimization instead.")
        try:
            lora_param_groups(pl_module, self.adapter_name)
        except ValueError as exc:
            raise MisconfigurationException(f"LangevinLoRA: {exc}") from exc
        self._attach_diagnostics(trainer)
        max_steps = trainer.max_steps
        if self.num_samples > 0 and max_steps is not None and max_steps >= 0:
            room = (max_steps - self.burn_in_steps) // self.sample_every
            if room < 1:
                raise MisconfigurationException(
                    f"LangevinLoRA: num_samples={self.num_samples} but burn_in_steps={self.burn_in_steps}, "
                    f"sample_every={self.sample_every} and Trainer(max_steps={max_steps}) leave room for no "
                    "sample; lower burn_in_steps or sample_every, or raise max_steps.")

    def _attach_diagnostics(self, trainer: Trainer) -> None:
        """Add the live Gibbs diagnostics to the Trainer's callbacks (they find this sampler through
        :meth:`langevin_groups` and observe every Langevin step). Added during ``setup``, so their own
        hooks and checkpoint state work as if the user had listed them."""
        from langevin_lora.diagnostics import GibbsDiagnostics

        if self.diagnostics is False or any(isinstance(c, GibbsDiagnostics) for c in trainer.callbacks):
            return
        if self.diagnostics is True:
            self.diagnostics = GibbsDiagnostics(report=trainer.logger is not None)
        trainer.callbacks.append(self.diagnostics)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"LangevinLoRA supports exactly one optimizer; configure_optimizers returned {len(optimizers)}.")
        opt = optimizers[0]
        if isinstance(opt, LangevinOptimizer):
            raise MisconfigurationException(
                f"LangevinLoRA wraps a standard optimizer; {type(opt).__name__} already adds Langevin noise "
                "(the noise would be added twice). Use AdamW/Adam/SGD with the callback, or the optimizer alone.")
        self._trainer, self._module = trainer, pl_module
        self._resolve_num_data(trainer)
        self._groups = self._build_groups(pl_module, opt)
        self.sample_bank.bind(pl_module, self.adapter_name)
        self._apply_pending(pl_module)
        if self.sampling:
            self._ensure_masters()
        elif self.balance is not None and self.burn_in_steps == 0 and trainer.global_step == 0:
            self.balance.start_sampling(pl_module, optimizer=opt, adapter_name=self.adapter_name)
        self._install(opt)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.gauge_stats:
            pl_module.log_dict({f"langevin/{k}": v for k, v in self.gauge_stats.items()}, on_step=True,
                               on_epoch=False, sync_dist=False)
            self.gauge_stats = {}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()

    # -- num_data ----------------------------------------------------------------------------------
    def _resolve_num_data(self, trainer: Trainer) -> None:
        if self._beta_arg is not None or self._num_data_arg is not None:
            return
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        try:
            n = len(dataset) if dataset is not None and not isinstance(dataset, torch.utils.data.IterableDataset) else None
        except TypeError:
            n = None
        if not n:
            raise MisconfigurationException(
                "LangevinLoRA could not infer num_data: the training dataloader "
                f"({type(loader).__name__}) has no sized map-style dataset. Pass "
                "LangevinLoRA(num_data=<number of training examples>) or beta=<inverse temperature>.")
        if self.num_data is not None and self.num_data != n:
            rank_zero_warn(f"LangevinLoRA: the checkpoint had num_data={self.num_data}, the dataset has {n}; using {n}")
        self.num_data = int(n)
        rank_zero_info(f"LangevinLoRA: inferred num_data={n} from len(train_dataloader.dataset); "
                       f"beta = num_data / temperature = {self.beta:g}")

    # -- groups ------------------------------------------------------------------------------------
    def _build_groups(self, pl_module: LightningModule, opt: torch.optim.Optimizer) -> list[_Group]:
        owner = {}
        for gi, g in enumerate(opt.param_groups):
            for p in g["params"]:
                owner[id(p)] = gi
        groups: list[_Group] = []
        for spec in lora_param_groups(pl_module, self.adapter_name):
            is_head = spec["name"] == "head"
            if is_head and self.head_temperature == 0:
                continue
            temp = self.head_temperature if is_head else self.temperature
            wd = self.head_weight_decay if is_head else self.weight_decay
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
                groups.append(_Group(name, ps, ns, opt.param_groups[gi], temp, wd))
        return groups

    def langevin_groups(self) -> list[LangevinGroupView]:
        """One :class:`~langevin_lora.view.LangevinGroupView` per Langevin group (``lora_A/<adapter>``,
        ``lora_B/<adapter>``, ``lora_magnitude/<adapter>``, ``head`` when sampled; suffixed ``@pg<i>``
        when the tensors of a role sit in several optimizer param groups). Empty before ``fit`` starts."""
        if self.base_beta is None:
            return []
        views = []
        for g in self._groups:
            precond = [self._precond[n] for n in g.names] if self.sampling and g.names[0] in self._precond else None
            views.append(LangevinGroupView(name=g.name, params=list(g.params), lr=g.lr, beta=self._group_beta(g),
                                           weight_decay=g.weight_decay, precond=precond, sampling=self.sampling))
        return views

    # -- optimizer wrapper -------------------------------------------------------------------------
    def _install(self, opt: torch.optim.Optimizer) -> None:
        self._uninstall()
        had_attr = "step" in opt.__dict__
        original = opt.step  # bound method, or an instance-level wrapper (LR scheduler, ...)
        active = [True]
        cb_ref = weakref.ref(self)

        def step(opt_self, closure=None, **kwargs):
            cb = cb_ref()
            if cb is None or not active[0]:
                return original(closure, **kwargs) if closure is not None else original(**kwargs)
            if not cb._wants_langevin_step():
                out = original(closure, **kwargs) if closure is not None else original(**kwargs)
                cb._after_burn_in_step()
                return out
            return cb._step(original, closure, kwargs)

        if hasattr(original, "_wrapped_by_lr_sched"):
            step._wrapped_by_lr_sched = True  # keep torch's "step overridden after scheduler" check quiet
        wrapper = types.MethodType(step, opt)  # a bound method, so torch's LR-scheduler patch can wrap it
        opt.step = wrapper
        self._installed = (opt, original if had_attr else None, had_attr, wrapper)
        self._wrapper_active = active

    def _uninstall(self) -> None:
        if self._installed is None:
            return
        opt, original, had_attr, wrapper = self._installed
        self._wrapper_active[0] = False  # pass-through even if something wrapped on top of us
        if opt.__dict__.get("step") is wrapper:
            if had_attr:
                opt.step = original
            else:
                del opt.step
        self._installed = None

    def _wants_langevin_step(self) -> bool:
        return self._trainer is not None and self._trainer.global_step >= self.burn_in_steps

    def _after_burn_in_step(self) -> None:
        """Balancing after a burn-in optimizer step (counted from 1; the step has just been applied,
        the next forward pass has not run, so every gradient stays consistent with its point)."""
        if self.balance is None:
            return
        done = self._trainer.global_step + 1
        opt = self._installed[0]
        if self.balance.due(done):
            self.balance.step(self._module, done, sampling=False, optimizer=opt, adapter_name=self.adapter_name)
        if done == self.burn_in_steps:
            self.balance.start_sampling(self._module, optimizer=opt, adapter_name=self.adapter_name)

    @torch.no_grad()
    def _step(self, original: Callable, closure: Callable | None, kwargs: dict) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.sampling:
            self._start_sampling()
        params = [p for g in self._groups for p in g.params]
        ready = self._check_grads()
        if ready:
            for fn in self.step_observers:  # every parameter still holds its pre-step value
                fn(self._trainer, self._module, self)
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None  # the user's optimizer neither moves nor decays the Langevin tensors
        try:
            original(**kwargs)
        finally:
            for p, gr in zip(params, stash):
                p.grad = gr
        if ready:
            self._langevin_update()
        return loss

    def _check_grads(self) -> bool:
        """``False`` (no step, no noise) when no Langevin tensor has a gradient (the training step
        returned ``None``) or one is non-finite (warn or raise, per ``nonfinite``)."""
        grads = [p.grad for g in self._groups for p in g.params if p.grad is not None]
        if not grads:
            return False
        if all_finite(grads):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError("LangevinLoRA: non-finite gradient (inf or NaN) of a Langevin tensor")
        self.skipped_steps += 1
        warnings.warn(f"LangevinLoRA: non-finite gradient (inf or NaN); Langevin step skipped, no noise drawn "
                      f"({self.skipped_steps} skipped so far)", NonFiniteGradientWarning, stacklevel=4)
        return False

    def _start_sampling(self) -> None:
        opt = self._installed[0]
        identity, raw = [], []
        for g in self._groups:
            for n, p in zip(g.names, g.params):
                state = opt.state.get(p, {})
                v, t = state.get("exp_avg_sq"), state.get("step")
                betas, eps = g.opt_group.get("betas"), g.opt_group.get("eps")
                t = float(t.item() if torch.is_tensor(t) else t) if t is not None else 0.0
                if self.precondition and v is not None and betas is not None and eps is not None and t > 0:
                    dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
                    raw.append((n, adam_inverse_scale(v.detach().to(dtype), t, float(betas[1]), float(eps))))
                else:
                    identity.append(n)
        # One reference scale for the clamp over every tensor (as LangevinAdam does), so a tensor whose
        # gradient stayed ~0 during burn-in (LoRA A while B = 0) is capped, not left at 1/eps.
        lo, hi = self.precond_clamp
        reference = median_scale([G for _, G in raw]) if raw else 1.0
        self._precond_reference = reference
        for n, G in raw:
            G = G.clamp_(min=lo * reference, max=hi * reference)
            self._precond[n] = G
            self._precond_sqrt[n] = G.sqrt()
        if self.precondition and identity:
            rank_zero_warn(f"LangevinLoRA: no Adam second moment for {len(identity)} Langevin tensors "
                           f"(e.g. {identity[0]!r}; optimizer {type(opt).__name__}, step {self._trainer.global_step}); "
                           "their preconditioner is the identity (plain SGLD)")
        self.sampling = True
        self._ensure_masters()
        rank_zero_info(f"LangevinLoRA: sampling starts at optimizer step {self._trainer.global_step} "
                       f"(beta={self.beta:g}, weight_decay={self.weight_decay:g}, "
                       f"{sum(len(g.params) for g in self._groups)} tensors)")

    def _ensure_masters(self) -> None:
        for g in self._groups:
            for n, p in zip(g.names, g.params):
                if p.dtype in LOW_PRECISION and n not in self._masters:
                    self._masters[n] = p.detach().float()

    @property
    def adapting(self) -> bool:
        """``True`` during the ``precond_adapt_steps`` Langevin steps that measure the new ``G``."""
        return self.sampling and self.langevin_steps < self.precond_adapt_steps

    def _accumulate_adaptation(self, plan: list) -> None:
        for g, items, works, grads, *_ in plan:
            for (n, _), w in zip(items, works):
                if n not in self._adapt_sq:
                    self._adapt_sq[n] = torch.zeros_like(w)
            accumulate_potential_grad_sq_([self._adapt_sq[n] for n, _ in items], grads, works, g.weight_decay)

    def _refreeze(self) -> None:
        """End of adaptation: ``G`` from the averaged squared gradients of U, jointly over every
        Langevin tensor, with the burn-in's median scale."""
        if not self._adapt_sq:
            return
        names = list(self._adapt_sq)
        G = adapted_preconditioner([self._adapt_sq[n] / self.precond_adapt_steps for n in names],
                                   self._precond_reference, clamp=self.precond_clamp)
        for n, Gn in zip(names, G):
            self._precond[n] = Gn
            self._precond_sqrt[n] = Gn.sqrt()
        self._adapt_sq.clear()
        rank_zero_info(f"LangevinLoRA: preconditioner re-frozen after {self.precond_adapt_steps} adaptation steps "
                       f"(G in [{min(float(x.min()) for x in G):.3g}, {max(float(x.max()) for x in G):.3g}], "
                       f"median {self._precond_reference:.3g})")

    def _langevin_update(self) -> None:
        trainer, module = self._trainer, self._module
        work_groups = []
        for g in self._groups:
            items = [(n, p) for n, p in zip(g.names, g.params) if p.grad is not None]
            if items:
                work_groups.append((g, items))
        plan = []
        for g, items in work_groups:
            works, grads, pre, pre_sqrt = [], [], [], []
            for n, p in items:
                if p.dtype in LOW_PRECISION:
                    master = self._masters[n]
                    if not torch.equal(master.to(p.dtype), p):  # p was changed from outside (gauge move, load)
                        master.copy_(p)
                    works.append(master)
                    grads.append(p.grad.float())
                else:
                    works.append(p)
                    grads.append(p.grad)
                G = self._precond.get(n)
                pre.append(G if G is not None else torch.ones_like(works[-1]))
                pre_sqrt.append(self._precond_sqrt.get(n, pre[-1]))
            has_precond = any(n in self._precond for n, _ in items)
            std = noise_std(g.lr, self._group_beta(g))
            plan.append((g, items, works, grads, pre if has_precond else None, pre_sqrt if has_precond else None, std))
        adapting = self.adapting
        if adapting:  # at the pre-step point, like the gradients
            self._accumulate_adaptation(plan)
        noisy = [w for (_, _, works, _, _, _, std) in plan if std > 0 for w in works]
        draws = iter(draw_standard_normal(noisy, self.generators)) if noisy else iter(())
        for g, items, works, grads, pre, pre_sqrt, std in plan:
            noise = [next(draws) for _ in works] if std > 0 else None
            langevin_step_(works, grads, noise, lr=g.lr, noise_std=std, weight_decay=g.weight_decay,
                           precond=pre, precond_sqrt=pre_sqrt, foreach=self.foreach)
            for (_, p), w in zip(items, works):
                if w is not p:
                    p.copy_(w)
        self.langevin_steps += 1
        if adapting and not self.adapting:
            self._refreeze()
        if self.gauge_moves is not None:
            stats = self.gauge_moves(lora_modules(module, self.adapter_name), beta=self.beta,
                                     weight_decay=self.weight_decay)
            self.gauge_stats.update(stats)
        for fn in self.post_step_observers:
            fn(trainer, module, self)
        kept = self.langevin_steps - self.precond_adapt_steps   # adaptation steps are burn-in
        if self.num_samples > 0 and kept > 0 and kept % self.sample_every == 0:
            self.sample_bank.add(module, trainer.global_step, write=trainer.is_global_zero)

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Phase, counters, ``num_data``, generator states, frozen preconditioners, fp32 masters and
        the sample bank (tensors and builtins only, so ``weights_only`` checkpoint loading works)."""
        return {"version": 1, "sampling": self.sampling, "langevin_steps": self.langevin_steps,
                "skipped_steps": self.skipped_steps, "num_data": self.num_data,
                "generators": self.generators.state_dict(),
                "precond": {n: t.clone() for n, t in self._precond.items()},
                "adapt_sq": {n: t.clone() for n, t in self._adapt_sq.items()},
                "precond_reference": self._precond_reference,
                "masters": {n: t.clone() for n, t in self._masters.items()},
                "sample_bank": self.sample_bank.state_dict(),
                "balance": None if self.balance is None else self.balance.state_dict(),
                "gauge_moves": None if self.gauge_moves is None else self.gauge_moves.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampling = bool(state_dict["sampling"])
        self.langevin_steps = int(state_dict["langevin_steps"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        if self._num_data_arg is None and self._beta_arg is None:
            self.num_data = state_dict["num_data"]
        self.generators.load_state_dict(state_dict["generators"])
        self.sample_bank.load_state_dict(state_dict["sample_bank"])
        for key, obj in (("balance", self.balance), ("gauge_moves", self.gauge_moves)):
            if obj is not None and state_dict.get(key) is not None:
                obj.load_state_dict(state_dict[key])
        # Tensors are matched to parameters by name once the module is known (on_train_start).
        self._precond_reference = float(state_dict.get("precond_reference", 1.0))
        self._pending = {"precond": state_dict["precond"], "masters": state_dict["masters"],
                         "adapt_sq": state_dict.get("adapt_sq", {})}

    def _apply_pending(self, pl_module: LightningModule) -> None:
        if self._pending is None:
            return
        params = dict(pl_module.named_parameters())
        for key, target in (("precond", self._precond), ("masters", self._masters), ("adapt_sq", self._adapt_sq)):
            target.clear()
            for n, t in self._pending[key].items():
                if n not in params:
                    raise MisconfigurationException(f"LangevinLoRA checkpoint: the module has no parameter {n!r}")
                target[n] = t.to(params[n].device)
        self._precond_sqrt = {n: G.sqrt() for n, G in self._precond.items()}
        self._pending = None
