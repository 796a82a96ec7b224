r"""``LangevinLoRA``: the Lightning front-end of the sampling engine, for PEFT LoRA adapters.

Add one callback to a Trainer whose LightningModule holds a PEFT LoRA model, configures its own
optimizer (typically AdamW) and logs ``val_loss`` in its validation loop::

    langevin = LangevinLoRA()
    trainer = Trainer(max_epochs=30, callbacks=[langevin])
    trainer.fit(module, train_loader, val_loader)
    probs = bma_predict_proba(module, langevin.sample_bank, test_loader)

**Two modes.** ``burn_in_steps="auto"`` (default) is the zero-config drop-in, at no extra training
cost: the user's optimizer runs while ``val_loss`` improves; ``patience`` validation checks after
the best one the callback restores the best point (adapters, heads, optimizer state) and samples a
local posterior centred there, with the prior scale chosen on validation from a ladder of scales,
until the posterior average has settled; then it stops the Trainer (:mod:`langevin_lora.lightning.schedule`).
Validation still improving at the end of the budget: nothing to replace, the best point is the one
sample. ``val_loss`` never logged: one warning, sampling from ``max_burn_in_fraction`` of the plan. Its defaults are the measured target: prior
centred where sampling starts (``prior_centre="burn_in"``), the head sampled with the adapters
(``head_temperature=1``), kinetic BAOAB (``friction="auto"``), :math:`G` clamped to
``[0.1, 10]`` × its median, the model in eval mode while sampling (``dropout=False``). An integer
``burn_in_steps`` is the fixed schedule: sampling from that step to the end of the budget with one
prior (``prior_std``, default 0.1, centred at 0), overdamped, heads on the user's optimizer, dropout
as the module has it, the last ``num_samples`` samples every ``sample_every`` steps. Every argument
given explicitly wins in both modes.

**Target.** After burn-in the LoRA tensors :math:`\theta` sample the Gibbs measure

.. math::
    \pi(\theta) \propto \exp\!\big(-\beta\,[\hat L(\theta) + \tfrac{\lambda}{2}\lVert\theta\rVert^2]\big),
    \qquad \beta = \beta_0 / T,\quad \beta_0 = N\ (\texttt{num\_data})\ \text{or}\ \texttt{beta},

with :math:`\hat L` the mean training loss the LightningModule returns, :math:`\lambda` =
``weight_decay`` (a Gaussian prior :math:`N(0, (N\lambda)^{-1} I)` when :math:`\beta_0 = N`) and
:math:`T` = ``temperature`` (see :mod:`langevin_lora.core.temperature`). ``num_data=N, temperature=1``
is the Bayesian posterior of a mean-NLL loss; ``num_data`` defaults to ``len(train_dataset)``.

**The prior.** ``weight_decay=None`` (default) is the prior :math:`N(0, \sigma_p^2 I)` with
:math:`\sigma_p` = ``prior_std`` (default :data:`~langevin_lora.core.temperature.DEFAULT_PRIOR_STD` = 0.1),
i.e. :math:`\lambda = 1/(N\sigma_p^2)` once :math:`N` is known (:math:`\beta_0` in place of
:math:`N` when ``beta`` is given). ``weight_decay=0`` with ``temperature > 0`` is refused: the Gibbs
measure of LoRA factors is improper without a prior (:func:`~langevin_lora.core.temperature.check_proper_prior`).

**The contract with the user's optimizer.**

- *Burn-in* (optimizer steps ``0 .. burn_in_steps-1``, counted as ``trainer.global_step``): the
  user's optimizer runs untouched; it heads for a mode and, for Adam/AdamW, learns the second
  moment :math:`v`.
- *Sampling* (from step ``burn_in_steps`` on): every LoRA tensor takes the frozen-preconditioner
  Langevin step of :class:`~langevin_lora.core.engine.LangevinEngine`

  .. math::
      \theta \leftarrow \theta - \eta\, G\odot(g + \lambda\theta) + \sqrt{2\eta/\beta}\,\sqrt G\odot\xi,

  :math:`\eta` the Langevin step (**Step size** below), :math:`G = \operatorname{clamp}(1/(\sqrt{\hat v}+\epsilon))` frozen
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

**Step size** (``step_size``). ``"auto"`` (default): when sampling starts the callback measures
:math:`\lambda_{\max}(G^{1/2}\nabla^2 U\,G^{1/2})` by power iteration on Hessian-vector products
of the training loss on a fixed probe set (the last burn-in batches holding ``probe_examples``
examples, replayed with fixed dropout masks and no trace in the user's logs or metrics;
:mod:`langevin_lora.diagnostics.replay`) and takes :math:`\eta_{\mathrm{auto}} = c/\lambda_{\max}`, :math:`c = 0.1`
(kinetic, ``friction`` set: :math:`h = c_k/\sqrt{\lambda_{\max}}`, :math:`c_k = 0.5`;
:mod:`langevin_lora.core.step_size` gives the measured bias: :math:`\beta T_{\mathrm{conf}} - 1 \le c/2`
overdamped, below 1% on a MiniLM LoRA posterior for both), re-measured every
``step_size_every_n_steps`` Langevin steps (warm-started). A float fixes :math:`\eta` at sampling
start; ``"optimizer"`` is the user's learning rate itself (the behaviour before issue 13: AdamW's
:math:`\eta G` is a descent step, often far too long for a stable chain). With ``"auto"`` or a float
the user's LR schedule still applies, as a relative factor from sampling start:
:math:`\eta_t = \eta_{\mathrm{auto}}\,\mathrm{lr}_t/\mathrm{lr}_{t_0}` per param group.
``langevin/step_size`` (the first group's current :math:`\eta`), ``langevin/lambda_max`` and
``langevin/step_size_grad_evals`` (gradient evaluations of the probe set spent so far) go to the
Trainer's loggers and ``callback_metrics``.

**Divergence guard** (``guard=True``, :mod:`langevin_lora.core.guard`). A chain whose
:math:`\lVert\theta\rVert^2`, :math:`U` or virial temperature runs away, whose parameters turn
non-finite, or that skips three steps in a row for non-finite gradients, is returned to its last
good snapshot (parameters, masters, every per-tensor state), its step is cut by 4 (and
:math:`\lambda_{\max}` re-measured when automatic) with a :class:`~langevin_lora.core.guard.DivergenceWarning`
giving the numbers; after 5 cuts :class:`~langevin_lora.core.guard.DivergenceError` stops the fit. Under
DDP the energy statistic (a rank's own minibatch loss) is left out so every rank decides alike.

**One noise draw per optimizer step.** The callback wraps the torch optimizer's ``step``
(:mod:`langevin_lora.lightning._step_wrapper`): the wrapper runs Lightning's closure (forward, backward,
``on_before_optimizer_step``, gradient clipping), hides the Langevin tensors' gradients from the
user's optimizer, calls the original ``step`` for the heads, restores the gradients, and applies
one Langevin step. Hence:

- gradient accumulation over :math:`k` micro-batches gives one draw per optimizer step (the drift
  uses the accumulated mean gradient), exactly as with :math:`k = 1`;
- **non-finite gradients while sampling** skip the *whole* optimizer step: with a ``GradScaler``
  (AMP) the scaler skips it before the wrapper runs; without one, an inf/NaN in any gradient the
  step would use (LoRA tensors or heads) skips the Langevin update *and* the user's optimizer, so
  no head is stepped with NaN gradients (``nonfinite="skip"``:
  :class:`~langevin_lora.NonFiniteGradientWarning`, training continues; ``"raise"``:
  :class:`FloatingPointError`). During burn-in the user's optimizer is left to its own devices;
- **gradient clipping** (``Trainer(gradient_clip_val=...)``) happens inside the closure, *before*
  the Langevin step: the drift uses clipped gradients. Clipping that is ever active changes the
  drift, so the chain no longer targets :math:`\pi_\beta` exactly; keep it off (or loose enough
  never to trigger) while sampling.

**Low precision.** fp16/bf16 Langevin tensors are updated through fp32 master copies (saved in
the checkpoint; :meth:`LangevinLoRA.work_tensor`); gradients are upcast. Gauge moves act on the
master copies too.

**Checkpoints.** :meth:`LangevinLoRA.state_dict` holds the phase, step counters, the engine's
generator states and per-tensor state (frozen preconditioners, adaptation sums, master copies) and
the sample bank; a run resumed with ``trainer.fit(..., ckpt_path=...)`` continues bitwise
identically, given the same data order (Lightning restarts a plain, non-stateful DataLoader at its
first batch on resume, so checkpoint at epoch boundaries or use a stateful loader).

**Another fit.** Every ``fit`` that does not resume from a checkpoint starts a new chain: phase,
counters, preconditioners, master copies and generators (back to ``seed``) are reset and the
in-memory sample bank is emptied. A ``sample_dir`` that already holds ``sample-*`` folders is
refused at the start of such a fit (they belong to an earlier run; empty the folder, choose
another, or resume that run with ``ckpt_path``).

**Data parallel.** DDP works: gradients are averaged before the step and every rank draws the same
noise from identically seeded generators, so replicas stay identical. **FSDP2** works through
Lightning's ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``): every rank draws the
unsharded noise and keeps its shard's slice, so the chain is the one a single device or DDP runs
(:mod:`langevin_lora.core.sharding`); the guard's sums reduce over the ranks, the sample bank keeps full
tensors and checkpoints hold the unsharded state. ``step_size="auto"`` measures the curvature by finite
differences on the shards with full probe vectors (:class:`~langevin_lora.core.curvature.ShardedHVP`;
the gradients come back through FSDP2's reduce-scatter; no double backward), the unsharded
finite-difference measurement bit for bit; the diagnostics run on full copies of the shards
(:class:`~langevin_lora.diagnostics.layout.UnshardedViews`); ``balance`` and ``gauge_moves`` are
refused. FSDP1 (``FSDPStrategy``), DeepSpeed, XLA FSDP, tensor-parallel layouts and FSDP2's CPU
offload are refused with a ``MisconfigurationException`` naming the alternative.

**Observers.** ``step_observers`` are called as ``fn(trainer, pl_module, callback)`` right before
each Langevin step and before the user's optimizer updates the heads (gradients final and present,
no parameter updated yet; not called for skipped steps); ``post_step_observers`` right after it.
Both run on every rank.

**Gauge (THEORY §4).** ``balance=BalanceSchedule(every_n_steps=k, at_sampling_start=True)``
balances the LoRA factors (same :math:`BA`, minimal :math:`|A|^2+|B|^2`) after every ``k``-th
burn-in step and once at the end of burn-in, transporting the user's Adam moments to the new gauge
before the preconditioner is frozen; never while sampling (that would change the law of
:math:`W`). ``gauge_moves=GaugeMoves(...)`` applies exact orthogonal / Metropolis GL(r) gauge moves
after Langevin steps (no forward pass; they leave :math:`\pi_\beta` invariant) and logs
``langevin/gauge/*`` (e.g. the GL acceptance rate).

This module is longer than ~400 lines because ~170 of them are the user contract (this docstring
and the class's); the sampling itself is the engine's, the step wrapper lives in
:mod:`langevin_lora.lightning._step_wrapper`, the reading of the user's optimizer (param groups, Adam moments)
in :mod:`langevin_lora.lightning._user_optimizer`, the step size's measurement in :mod:`langevin_lora.core.step_size`,
the probe's replays in :mod:`langevin_lora.diagnostics.replay` and the divergence guard in :mod:`langevin_lora.core.guard`.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from numbers import Real
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from langevin_lora._docs import readable_docstring
from langevin_lora._validation import (
    check_bool,
    check_choice,
    check_directory,
    check_int,
    check_non_negative,
    check_positive,
    check_version,
)
from langevin_lora.core.engine import NONFINITE_POLICIES, EngineFrontEnd, LangevinEngine, StepGroup
from langevin_lora.core.functional import check_clamp, check_friction
from langevin_lora.core.guard import Divergence, DivergenceGuard
from langevin_lora.core.sharding import UnsupportedSharding, check_sharded_params, global_min, reshard, sharding_refusal
from langevin_lora.core.step_size import AutoStepSize, step_from_lambda_max
from langevin_lora.core.temperature import (
    DEFAULT_PRIOR_STD,
    PRIOR_CENTRES,
    effective_beta,
    resolve_base_beta,
    weight_decay_from_prior_std,
)
from langevin_lora.core.view import LangevinGroupView, default_diagnostics_factory
from langevin_lora.lora.balance import SAMPLING_REFUSAL, BalanceSchedule
from langevin_lora.lora.gauge import CENTRE_REFUSAL, GaugeMoves
from langevin_lora.lora.param_groups import lora_adapter_names, lora_modules, lora_param_groups
from langevin_lora.posterior.bank import SAMPLE_PREFIX, SampleBank
from langevin_lora.optim.base import LangevinOptimizer
from langevin_lora.diagnostics.replay import ProbeBatches, replayed_training_loss
from langevin_lora.lightning._step_wrapper import StepWrapper
from langevin_lora.lightning._user_optimizer import LangevinGroup, adam_freeze_inputs, langevin_groups_in
from langevin_lora.lightning.stages import DropInStages
from langevin_lora.lightning.schedule import DEFAULT_PRIOR_LADDER, ChainSchedule
from langevin_lora.lightning.validation import ValidationSet

__all__ = ["CHECKPOINT_VERSION", "LangevinLoRA", "SHARDED_STRATEGIES"]

#: The format of :meth:`LangevinLoRA.state_dict`, read on load: 1 per-kind tensor dicts (before the
#: engine), 2 the engine's state, 3 the measured step size and guard, 4 the drop-in's chain schedule.
CHECKPOINT_VERSION = 4


#: Strategy classes refused (their parameters are flattened or partitioned shards that are not DTensors,
#: so the sharding-invariant noise of :mod:`langevin_lora.core.sharding` cannot find each element's place).
#: FSDP2 through ``ModelParallelStrategy`` is supported.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")

Observer = Callable[[Trainer, LightningModule, "LangevinLoRA"], None]

#: The named values of ``step_size`` (else a float).
STEP_SIZE_MODES = ("auto", "optimizer")

#: Samples kept (per ladder stage with ``burn_in_steps="auto"``) when ``num_samples`` is not given.
DEFAULT_NUM_SAMPLES = 16

#: The default of ``friction``: ``"auto"`` with ``burn_in_steps="auto"``, else ``None`` (overdamped).
DEFAULT = "default"


def _ladder(prior_std: Any, weight_decay: Any, auto: bool) -> tuple[float, ...]:
    """The prior scales the chain schedule climbs: the default ladder (``burn_in_steps="auto"``), the
    given scale(s), or one placeholder when ``weight_decay`` fixes the prior."""
    if prior_std is None:
        return DEFAULT_PRIOR_LADDER if auto and weight_decay is None else (DEFAULT_PRIOR_STD,)
    if isinstance(prior_std, (str, bytes)) or not isinstance(prior_std, Sequence):
        return (check_positive("prior_std", prior_std),)
    if not auto and len(prior_std) > 1:
        raise ValueError(f"Invalid prior_std: {list(prior_std)!r} (a ladder of prior scales needs "
                         "burn_in_steps='auto'; with an integer burn_in_steps pass one float)")
    return tuple(prior_std)


def _no_steps_left(trainer: Trainer) -> bool:
    """Whether this fit can take no optimizer step: the Trainer already ran to its ``max_steps``/``max_epochs``."""
    try:
        return trainer.global_step > 0 and bool(trainer.fit_loop.done)
    except Exception:   # a Trainer without the loop state: assume steps are left
        return False


@readable_docstring
class LangevinLoRA(DropInStages, EngineFrontEnd, Callback):
    r"""Langevin sampling of the LoRA adapters of a LightningModule, plus a posterior sample bank.

    See the module docstring for the full contract. Inverse temperature of the LoRA tensors:
    :math:`\beta = \beta_0/T`, :math:`\beta_0` = ``num_data`` (inferred from the training dataset
    when neither ``num_data`` nor ``beta`` is given) or ``beta``.

    Args:
        num_data: number of training examples :math:`N` (supervised tokens for a token-averaged
            LM loss); ``None`` infers ``len(trainer.train_dataloader.dataset)``.
        temperature: :math:`T \ge 0` (``0``: noise-free descent on :math:`U`).
        beta: :math:`\beta_0 > 0` directly, instead of ``num_data``.
        weight_decay: :math:`\lambda > 0`, coupled L2 prior on the LoRA tensors; ``None`` (default): the
            prior ``prior_std`` (module docstring); ``0`` only at ``temperature=0``.
        prior_std: :math:`\sigma_p > 0` of the default prior, or (``"auto"`` only) an increasing
            ladder of them to choose from on validation (``None``: the ladder
            :data:`~langevin_lora.lightning.schedule.DEFAULT_PRIOR_LADDER` with ``"auto"``, ``DEFAULT_PRIOR_STD`` = 0.1
            with an integer ``burn_in_steps``); only with ``weight_decay=None``.
        step_size: ``"auto"`` (default), an :class:`~langevin_lora.core.step_size.AutoStepSize` to configure it
            (as ``guard=`` takes a :class:`~langevin_lora.core.guard.DivergenceGuard`), a float :math:`\eta > 0`
            (at sampling start) or ``"optimizer"`` (the param group's learning rate); module docstring.
        step_safety: :math:`c` of :math:`\eta = c/\lambda_{\max}` (:math:`c_k` of :math:`h = c_k/\sqrt{\lambda_{\max}}`
            with friction); ``None``: 0.1 (0.5 kinetic).
        step_size_every_n_steps: Langevin steps between re-measurements of :math:`\lambda_{\max}`
            (``"auto"`` only; 0: only at sampling start).
        probe_examples: examples of the probe set (the newest burn-in batches holding at least that many;
            at least one batch).
        loss_fn: optional ``(pl_module, batch) -> loss`` for the probe, instead of replaying
            ``training_step`` (pass it when the training step has side effects beyond ``self.log`` and
            torchmetrics, e.g. appends to a list).
        guard: ``True`` (default) for a :class:`~langevin_lora.core.guard.DivergenceGuard` with its defaults,
            your own instance to configure it, ``False`` for none.
        burn_in_steps: ``"auto"`` (default: decided by the validation curve, module docstring "Two
            modes") or optimizer steps (``trainer.global_step``) run by the user's optimizer alone
            (the fixed schedule). A warning says so when the Trainer's planned steps leave no room
            for sampling, and at the end of a fit that took no Langevin step.
        monitor, mode, patience: with ``burn_in_steps="auto"``: the logged validation value watched
            (``"val_loss"``), ``"min"``/``"max"``, and the validation checks without improvement
            after which sampling starts (2), as in Lightning's ``EarlyStopping``.
        max_burn_in_fraction: with ``"auto"`` and ``monitor`` never logged, sampling starts (with one
            warning) at this fraction of the planned steps (0.75).
        sample_every: fixed schedule: keep a sample every this many Langevin steps (>= 1; default 1).
        num_samples: fixed schedule: capacity of :attr:`sample_bank` (0: keep none; default 16), the
            most recent are kept. ``"auto"``: the final stage keeps between ``num_samples`` and twice
            as many, spread over it; each ladder stage is scored with half as many.
        dropout: keep the module's dropout on while sampling (default: ``False`` with ``"auto"``,
            eval mode while sampling, the deterministic network's posterior; ``True`` with an integer
            ``burn_in_steps``).
        forward_fn: ``(module, batch) -> logits`` for the validation predictions that score the
            ladder's stages (default: :func:`~langevin_lora.posterior.averaging.default_forward`, then
            ``module(batch)``).
        seed: seed of the noise generators (``None``: random, shared from rank 0).
        adapter_name: PEFT adapter to sample (a non-empty ``str`` naming an adapter of the model,
            checked at ``setup``; default: the active adapters).
        head_temperature: :math:`T_{head}`; 0 keeps heads on the user's optimizer, noise-free (default: 1
            with ``"auto"``, 0 with an integer ``burn_in_steps``).
        precondition: freeze the user's Adam second moment into :math:`G` (else :math:`G = 1`).
        precond_clamp: ``(c_lo, c_hi)``, :math:`G` clamped to ``[c_lo m, c_hi m]``, :math:`m` the median
            of the unclamped :math:`G` over all Langevin tensors (default ``(0.1, 10)`` with ``"auto"``,
            ``(0.01, 100)`` with an integer ``burn_in_steps``).
        precond_adapt_steps: after burn-in, take this many Langevin steps with the frozen
            :math:`G` while averaging :math:`(g + \lambda\theta)^2` per coordinate, then re-freeze
            :math:`G` once from that average (:func:`~langevin_lora.core.functional.adapted_preconditioner`:
            a curvature scale, same median, so the learning rate keeps its meaning). No sample is
            kept during those steps. 0 (default): keep the burn-in's :math:`G`.
        sample_dir: write samples as PEFT adapter folders here instead of keeping them in memory
            (a ``str``/``os.PathLike`` folder, not a file; its writability is checked at ``setup``).
        head_weight_decay: :math:`\lambda` of sampled heads (default ``weight_decay``).
        foreach: ``None`` (automatic), ``True`` or ``False``: the ``torch._foreach_*`` update path.
        nonfinite: ``"skip"`` (warn, skip the whole optimizer step: nothing updated, no noise) or
            ``"raise"`` on a non-finite gradient while sampling.
        balance: a :class:`~langevin_lora.lora.balance.BalanceSchedule`: balance the factors during burn-in
            (every ``every_n_steps`` steps) and/or once when burn-in ends. Never while sampling.
        gauge_moves: a :class:`~langevin_lora.lora.gauge.GaugeMoves` applied after Langevin steps.
        friction: ``None`` (the overdamped step; the default with an integer ``burn_in_steps``),
            :math:`\gamma > 0` or ``"auto"`` (the default with ``burn_in_steps="auto"``): kinetic
            Langevin (BAOAB, THEORY §2b) with time step :math:`h` = the group's learning rate and mass
            :math:`G^{-1}` (:func:`~langevin_lora.core.functional.kinetic_step_`); momenta drawn from
            :math:`N(0, G/\beta)` when sampling starts and saved in the checkpoint. ``"auto"``:
            :math:`\gamma = 2\sqrt{\lambda\min G}` per group (:func:`~langevin_lora.core.functional.auto_friction`).
        prior_centre: ``"zero"`` (:math:`U = \hat L + \tfrac\lambda2\lVert\theta\rVert^2`; the default with an
            integer ``burn_in_steps`` or ``gauge_moves``) or (the default otherwise)
            ``"burn_in"``: :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2` with
            :math:`\theta_0` the LoRA tensors (and sampled heads) when sampling starts: a local posterior
            around where burn-in arrived (THEORY §6). Exact gauge moves assume a prior centred at 0 and
            are refused with ``"burn_in"`` (balancing during burn-in is allowed: it happens before
            :math:`\theta_0` is taken).
        diagnostics: ``True`` (default) attaches the registered default diagnostics
            (:func:`langevin_lora.core.view.default_diagnostics_factory`: :mod:`langevin_lora.diagnostics`'
            ``GibbsDiagnostics``, cheap estimators every step, the end-of-fit stationarity report saved
            when the Trainer has a logger) unless the Trainer already has one of that type; pass your
            own lightning ``Callback`` instance to configure it, ``False`` for none.

    Attributes:
        engine: the :class:`~langevin_lora.core.engine.LangevinEngine` (per-tensor state keyed by
            parameter name, generators, non-finite policy).
        sample_bank: the :class:`~langevin_lora.posterior.bank.SampleBank`.
        sampling: ``True`` once Langevin sampling has started.
        num_data, beta: as resolved (``beta`` is the effective :math:`\beta_0/T` of the LoRA groups).
        step_observers, post_step_observers: lists of ``fn(trainer, pl_module, callback)``.
        langevin_steps, skipped_steps: Langevin steps taken / optimizer steps skipped for non-finite
            gradients.
        auto_step: the :class:`~langevin_lora.core.step_size.AutoStepSize` (``lambda_max``, ``grad_evals``).
        guard: the :class:`~langevin_lora.core.guard.DivergenceGuard` or ``None``.
    """

    def __init__(self, num_data: int | None = None, temperature: float = 1.0, beta: float | None = None,
                 weight_decay: float | None = None, burn_in_steps: int | str = "auto", sample_every: int | None = None,
                 num_samples: int | None = None, seed: int | None = 0, adapter_name: str | None = None,
                 head_temperature: float | None = None, precondition: bool = True,
                 precond_clamp: tuple[float, float] | None = None,
                 sample_dir: str | os.PathLike | None = None, head_weight_decay: float | None = None,
                 foreach: bool | None = None, nonfinite: str = "skip", balance: BalanceSchedule | None = None,
                 gauge_moves: GaugeMoves | None = None, diagnostics: Any = True,
                 precond_adapt_steps: int = 0, friction: float | str | None = DEFAULT,
                 prior_centre: str | None = None, prior_std: float | Sequence[float] | None = None,
                 step_size: float | str = "auto",
                 step_safety: float | None = None, step_size_every_n_steps: int = 1000, probe_examples: int = 64,
                 loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
                 guard: bool | DivergenceGuard = True, monitor: str = "val_loss", mode: str = "min",
                 patience: int = 2, max_burn_in_fraction: float = 0.75, dropout: bool | None = None,
                 forward_fn: Callable[[Any, Any], Tensor] | None = None) -> None:
        auto = burn_in_steps == "auto"
        self.chain = ChainSchedule(burn_in_steps, monitor=monitor, mode=mode, patience=patience,
                                   max_burn_in_fraction=max_burn_in_fraction,
                                   num_samples=DEFAULT_NUM_SAMPLES if num_samples is None or not auto
                                   else max(1, check_int("num_samples", num_samples, low=0)),
                                   prior_stds=_ladder(prior_std, weight_decay, auto), staged=auto)
        # the defaults that depend on the mode (module docstring, "Two modes")
        self._num_samples_given = num_samples is not None
        if num_samples is None:
            num_samples = DEFAULT_NUM_SAMPLES
        if sample_every is None:
            sample_every = 1
        if head_temperature is None:
            head_temperature = 1.0 if auto else 0.0
        if precond_clamp is None:
            precond_clamp = (0.1, 10.0) if auto else (0.01, 100.0)
        if friction is DEFAULT:
            friction = "auto" if auto else None
        if prior_centre is None:
            prior_centre = "burn_in" if auto and gauge_moves is None else "zero"
        self.dropout = check_bool("dropout", (not auto) if dropout is None else dropout)
        if forward_fn is not None and not callable(forward_fn):
            raise ValueError(f"Invalid forward_fn: {forward_fn!r} (expected a callable (module, batch) -> logits)")
        self.forward_fn = forward_fn
        self._validation = ValidationSet(forward_fn)
        if num_data is not None and beta is not None:
            resolve_base_beta(num_data, beta)  # raises: exactly one of them
        self._num_data_arg = check_int("num_data", num_data, low=1, allow_none=True)
        self._beta_arg = None if beta is None else check_positive("beta", beta)
        self.temperature = check_non_negative("temperature", temperature)
        self._weight_decay_arg = None if weight_decay is None else check_non_negative("weight_decay", weight_decay)
        if self._weight_decay_arg is not None and prior_std is not None:
            raise ValueError(f"Invalid prior_std: {prior_std!r} given with weight_decay={weight_decay!r} (expected one "
                             "of them: prior_std sets weight_decay = 1/(num_data * prior_std**2))")
        self.prior_std = self.chain.prior_stds[0] if auto or prior_std is not None else DEFAULT_PRIOR_STD
        self._prior_std_given = prior_std is not None
        if self._weight_decay_arg == 0 and self.temperature > 0:
            raise ValueError(f"Invalid weight_decay: 0 at temperature {self.temperature:g} > 0 (expected weight_decay > 0, "
                             "or None for the default prior N(0, prior_std^2)): without a prior the Gibbs measure of "
                             "LoRA factors is improper (their gauge orbits and the loss's null directions are not "
                             "normalisable). Use temperature=0 for noise-free descent.")
        self.weight_decay: float | None = self._weight_decay_arg  # resolved from prior_std once N is known
        self.burn_in_steps = self.chain.burn_in_steps
        self.sample_every = check_int("sample_every", sample_every, low=1)
        self.num_samples = check_int("num_samples", num_samples, low=0)
        self.head_temperature = check_non_negative("head_temperature", head_temperature)
        self._head_weight_decay_arg = (None if head_weight_decay is None
                                       else check_non_negative("head_weight_decay", head_weight_decay))
        self.head_weight_decay = self._head_weight_decay_arg if head_weight_decay is not None else self.weight_decay
        auto_step = step_size if isinstance(step_size, AutoStepSize) else None
        if auto_step is not None:
            step_size = "auto"
        if not (step_size in STEP_SIZE_MODES or (isinstance(step_size, Real) and not isinstance(step_size, bool))):
            raise ValueError(f"Invalid step_size: {step_size!r} (expected 'auto', 'optimizer', a float > 0 or a "
                             "langevin_lora.AutoStepSize)")
        self.step_size = step_size if isinstance(step_size, str) else check_positive("step_size", step_size)
        self.probe_examples = check_int("probe_examples", probe_examples, low=1)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (expected a callable (pl_module, batch) -> loss)")
        self.loss_fn = loss_fn
        self.auto_step = auto_step or AutoStepSize(safety=step_safety, every_n_steps=step_size_every_n_steps,
                                                   seed=0 if seed is None else check_int("seed", seed, low=0))
        if not isinstance(guard, (bool, DivergenceGuard)):
            raise ValueError(f"Invalid guard: {guard!r} (expected True, False or a langevin_lora.DivergenceGuard)")
        self.guard = DivergenceGuard(owner="LangevinLoRA") if guard is True else guard or None
        self.precondition = check_bool("precondition", precondition)
        self.precond_clamp = check_clamp(precond_clamp)
        self.precond_adapt_steps = check_int("precond_adapt_steps", precond_adapt_steps, low=0)
        self.foreach = check_bool("foreach", foreach, allow_none=True)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name.strip()):
            raise ValueError(f"Invalid adapter_name: {adapter_name!r} (expected None or a non-empty str naming "
                             "a PEFT adapter)")
        self.adapter_name = adapter_name
        sample_dir = check_directory("sample_dir", sample_dir, must_write=True)
        if sample_dir is not None and self.num_samples == 0:
            raise ValueError(f"Invalid sample_dir: {str(sample_dir)!r} given with num_samples=0 (expected "
                             "num_samples >= 1 to write samples, or sample_dir=None)")
        if auto and self.num_samples == 0:
            raise ValueError("Invalid num_samples: 0 with burn_in_steps='auto' (expected an integer >= 1: each stage "
                             "of the prior-scale ladder is scored by the posterior average of its samples)")
        if balance is not None and not isinstance(balance, BalanceSchedule):
            raise ValueError(f"Invalid balance: {balance!r} (expected a langevin_lora.BalanceSchedule or None)")
        if gauge_moves is not None and not isinstance(gauge_moves, GaugeMoves):
            raise ValueError(f"Invalid gauge_moves: {gauge_moves!r} (expected a langevin_lora.GaugeMoves or None)")
        if balance is not None and balance.every_n_steps is not None and self.burn_in_steps == 0:
            raise ValueError(f"Invalid balance: every_n_steps={balance.every_n_steps} with burn_in_steps=0 would "
                             "balance during sampling: " + SAMPLING_REFUSAL)
        self.friction = check_friction(friction)
        self.prior_centre = check_choice("prior_centre", prior_centre, PRIOR_CENTRES)
        if gauge_moves is not None and self.prior_centre != "zero":
            raise ValueError(f"Invalid gauge_moves with prior_centre={self.prior_centre!r}: " + CENTRE_REFUSAL)
        if not isinstance(diagnostics, (bool, Callback)):
            raise ValueError(f"Invalid diagnostics: {diagnostics!r} (expected True, False or a lightning "
                             "Callback instance, e.g. langevin_lora.diagnostics.GibbsDiagnostics(...))")
        self._diagnostics_arg = self.diagnostics = diagnostics
        self.balance = balance
        self.gauge_moves = gauge_moves
        self.gauge_stats: dict[str, float] = {}
        self.num_data: int | None = self._num_data_arg
        self.engine = LangevinEngine(seed=seed, nonfinite=nonfinite, owner="LangevinLoRA")
        # "auto" keeps the final stage's samples, and the best scoring stage's when it went back to that scale
        self.sample_bank = SampleBank(3 * self.num_samples if auto else self.num_samples, directory=sample_dir)
        self.step_observers: list[Observer] = []
        self.post_step_observers: list[Observer] = []
        self.sampling = False
        self.langevin_steps = 0
        self._precond_reference = 1.0                # median scale of G frozen at the end of burn-in
        self._restored = False                       # this fit resumes from a checkpoint
        self._groups: list[LangevinGroup] = []
        self._names: dict[int, str] = {}             # id(Langevin tensor) -> parameter name
        self._others: list[Tensor] = []              # the user's optimizer's other parameters
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None
        self._wrapper: StepWrapper | None = None
        self._probe = ProbeBatches(self.probe_examples)
        self._base_step: float | None = None         # eta at sampling start (auto or float), before the guard's cuts
        self._lr0: dict[str, float] = {}             # each group's optimizer lr at sampling start
        self._metrics: dict[str, float] = {}         # to log at the end of the batch
        self._probe_state: dict[str, Any] | None = None  # a checkpoint's probe set, until on_train_start
        self._new_chain()                            # a fresh callback's state_dict() is complete

    # -- the engine's work tensors -----------------------------------------------------------------
    def work_tensor(self, p: Tensor) -> Tensor:
        """The tensor sampled for ``p``: its fp32 master copy while sampling fp16/bf16 LoRA tensors,
        else ``p`` (what :class:`~langevin_lora.lora.gauge.GaugeMoves` moves)."""
        name = self._names.get(id(p))
        return p if name is None or not self.sampling else self.engine.work_tensor(name, p)

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

    def _group_beta(self, group: LangevinGroup) -> float:
        return effective_beta(self.base_beta, group.temperature)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refusal = sharding_refusal(trainer.strategy, SHARDED_STRATEGIES)
        if refusal:
            raise MisconfigurationException(f"LangevinLoRA {refusal}")
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "LangevinLoRA needs automatic optimization (it wraps the optimizer step Lightning calls); "
                f"{type(pl_module).__name__}.automatic_optimization is False. Use LangevinSGD/LangevinAdam "
                "as the optimizer for manual optimization instead.")
        adapters = lora_adapter_names(pl_module)
        if self.adapter_name is not None and adapters and self.adapter_name not in adapters:
            raise MisconfigurationException(f"LangevinLoRA: Invalid adapter_name: {self.adapter_name!r} (the model's "
                                            f"LoRA adapters are {adapters})")
        try:
            lora_param_groups(pl_module, self.adapter_name)
        except ValueError as exc:
            raise MisconfigurationException(f"LangevinLoRA: {exc}") from exc
        if self.sample_bank.directory is not None and trainer.is_global_zero:
            check_directory("sample_dir", self.sample_bank.directory, must_write=True)
        if _no_steps_left(trainer):   # issue 19: a second fit on a finished Trainer runs no step
            rank_zero_warn(f"LangevinLoRA: this Trainer already reached its end (global step {trainer.global_step}, "
                           f"max_steps={trainer.max_steps}): fit runs no step, so the chain and its sample bank "
                           f"({len(self.sample_bank)} samples) are kept. Use a new Trainer, or raise max_steps, to sample "
                           "again.")
        else:
            self._new_chain()
        self._attach_diagnostics(trainer)
        max_steps = trainer.max_steps
        if (not self.chain.auto and self._num_samples_given and self.num_samples > 0 and max_steps is not None
                and max_steps >= 0):
            room = (max_steps - self.burn_in_steps) // self.sample_every
            if room < 1:
                raise MisconfigurationException(
                    f"LangevinLoRA: num_samples={self.num_samples} but burn_in_steps={self.burn_in_steps}, "
                    f"sample_every={self.sample_every} and Trainer(max_steps={max_steps}) leave room for no "
                    "sample; lower burn_in_steps or sample_every, or raise max_steps.")

    def _new_chain(self) -> None:
        """Every fit starts a new chain; a resumed one is then overwritten by :meth:`load_state_dict`
        (Lightning restores callback states after ``setup``)."""
        self.sampling = False
        self.langevin_steps = 0
        self.num_data = self._num_data_arg
        self._precond_reference = 1.0
        self._restored = False
        self.engine.reset()
        self.sample_bank.clear()
        self.gauge_stats = {}
        self.weight_decay = self._weight_decay_arg
        self.head_weight_decay = self._head_weight_decay_arg if self._head_weight_decay_arg is not None \
            else self._weight_decay_arg
        self.auto_step.reset()
        if self.guard is not None:
            self.guard.reset()
        self._probe.clear()
        self._base_step, self._lr0, self._metrics, self._probe_state = None, {}, {}, None
        self.chain.reset()
        self._best_point = None                      # the best-monitored point while watching
        self._stage_bank = SampleBank(2 * self.num_samples)
        self._best_bank: SampleBank | None = None     # the best scoring stage's samples
        self._best_probs: list[Tensor] = []
        self._best_example_nll: Tensor | None = None   # per-example score of the best stage
        self._example_nll: Tensor | None = None
        self._stage_probs: list[Tensor] = []         # the stage's samples' validation probabilities
        self._validation.reset()
        self._stage_prior: tuple[float, float] | None = None
        for schedule in (self.balance, self.gauge_moves):
            if schedule is not None:
                schedule.reset()

    def _attach_diagnostics(self, trainer: Trainer) -> None:
        """Add the live Gibbs diagnostics to the Trainer's callbacks (they find this sampler through
        :meth:`langevin_groups` and observe every Langevin step). Added during ``setup``, so their own
        hooks and checkpoint state work as if the user had listed them."""
        arg = self._diagnostics_arg
        if arg is False:
            return
        if arg is True:
            factory = default_diagnostics_factory()
            if factory is None:
                rank_zero_info("LangevinLoRA: no default diagnostics registered (import langevin_lora.diagnostics)")
                return
            arg = factory(trainer)
        if any(isinstance(c, type(arg)) for c in trainer.callbacks):
            return
        self.diagnostics = arg
        trainer.callbacks.append(arg)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = self.sample_bank.directory
        if not self._restored and directory is not None and directory.is_dir():
            earlier = sorted(p.name for p in directory.glob(f"{SAMPLE_PREFIX}*"))
            if earlier:
                raise MisconfigurationException(
                    f"LangevinLoRA: sample_dir={str(directory)!r} already holds {len(earlier)} sample folders of an "
                    f"earlier run (e.g. {earlier[0]!r}) and this fit does not resume from a checkpoint: empty it or "
                    "choose another sample_dir, or continue that run with trainer.fit(..., ckpt_path=...).")
        try:
            planned = trainer.estimated_stepping_batches
        except Exception:   # the Trainer could not size the epoch: fall back to max_steps
            planned = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else math.inf
        if not self._restored:
            self.chain.planned_steps = float(planned)
        if not self.chain.auto and planned <= self.burn_in_steps:
            rank_zero_warn(f"LangevinLoRA: the Trainer plans {int(planned)} optimizer steps and burn_in_steps="
                           f"{self.burn_in_steps}: sampling never starts (no Langevin step, no sample). Lower "
                           "burn_in_steps or train for more steps.")

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
        if self._stage_prior is not None:   # resumed inside a stage of the ladder
            self.prior_std, self._stage_prior = self._stage_prior[0], None
        self._resolve_weight_decay()
        if self._probe_state is not None:
            self._probe.load_state_dict(self._probe_state, pl_module.device)
            self._probe_state = None
        self._groups = langevin_groups_in(pl_module, opt, self.adapter_name, temperature=self.temperature,
                                          weight_decay=self.weight_decay, head_temperature=self.head_temperature,
                                          head_weight_decay=self.head_weight_decay)
        self._names = {id(p): n for g in self._groups for n, p in zip(g.names, g.params)}
        self._check_sharded(trainer, pl_module)
        self._others = [p for g in opt.param_groups for p in g["params"] if id(p) not in self._names]
        self.sample_bank.bind(pl_module, self.adapter_name)
        try:
            self.engine.bind(dict(pl_module.named_parameters()))
        except ValueError as exc:
            raise MisconfigurationException(f"LangevinLoRA checkpoint does not fit this module: {exc}") from exc
        if not self.sampling and self.balance is not None and self.burn_in_steps == 0 and trainer.global_step == 0:
            self.balance.start_sampling(pl_module, optimizer=opt, adapter_name=self.adapter_name)
        self._uninstall()
        self._wrapper = StepWrapper(opt, self._on_optimizer_step)

    def _check_sharded(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """FSDP2-sharded Langevin tensors: a supported layout, and the options that work on shards."""
        named = [(n, p) for g in self._groups for n, p in zip(g.names, g.params)]
        try:
            sharded = check_sharded_params(named, pl_module, trainer.strategy.root_device)
        except UnsupportedSharding as exc:
            raise MisconfigurationException(f"LangevinLoRA: {exc}") from None
        if not sharded:
            return
        self.engine.track(dict(named))   # before the freeze's median reduces over the shards
        for arg, bad in (("balance", self.balance is not None), ("gauge_moves", self.gauge_moves is not None)):
            if bad:
                raise MisconfigurationException(
                    f"LangevinLoRA: {arg}={getattr(self, arg)!r} is not supported with sharded (fully_shard) adapters "
                    f"(it needs the unsharded LoRA factors): pass {arg}=None, or train with strategy='ddp'.")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.sampling and self.chain.phase == "watch" and self.chain.due(trainer.global_step):
            self._leave_burn_in(trainer, pl_module)
        if self.step_size == "auto" or self.guard is not None:   # the guard measures a fixed step's stable scale
            self._probe.add(batch, batch_idx)
        if self.chain.phase == "sample" and not self.dropout:
            pl_module.eval()   # the deterministic network's posterior (no dropout while sampling)

    # -- watching the validation curve -------------------------------------------------------------
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.chain.auto or self.chain.phase != "watch":
            return
        value = trainer.callback_metrics.get(self.chain.monitor)
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float64, device=trainer.strategy.root_device)
            if getattr(trainer, "world_size", 1) > 1:   # every rank decides alike
                value = trainer.strategy.reduce(value, reduce_op="mean")
            value = float(value)
        if self.chain.observe(value, trainer.global_step):
            opt = trainer.optimizers[0]
            reshard(pl_module)   # FSDP2 leaves the root unsharded after validation: copy the shards
            self._best_point = {"step": trainer.global_step,
                                "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()
                                           if p.requires_grad},
                                "optimizer": copy.deepcopy(opt.state_dict())}

    @torch.no_grad()
    def _take_best_point(self, pl_module: LightningModule) -> dict[str, Any]:
        """Copy the best-monitored trainable tensors back into the module and hand over the snapshot."""
        best, self._best_point = self._best_point, None
        reshard(pl_module)   # write the shards, not FSDP2's unsharded copies (lost at its next reshard)
        for n, p in pl_module.named_parameters():
            if n in best["params"]:
                p.copy_(best["params"][n])
        return best

    def _keep_best_point(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The budget ended while ``monitor`` was still improving (the well-fit case): no sampling; the
        best-monitored point goes back into the module and is the bank's one sample."""
        best = self._take_best_point(pl_module)
        reason = self.chain.end_watching()
        self.sample_bank.add(pl_module, best["step"], write=trainer.is_global_zero)
        rank_zero_info(f"LangevinLoRA: {reason}")

    def _leave_burn_in(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sampling is due: go back to the best-monitored point (weights and optimizer state), so the
        chain starts, and the prior is centred, where validation was best."""
        reason = self.chain.begin(trainer.global_step)
        best = self._best_point
        if self.chain.auto and best is None:
            rank_zero_warn(f"LangevinLoRA: no {self.chain.monitor!r} was logged by step {trainer.global_step} (log it in "
                           "validation_step, or pass monitor=<your key>); sampling starts now, at "
                           f"max_burn_in_fraction={self.chain.max_burn_in_fraction:g} of the "
                           f"{self.chain.planned_steps:g} planned steps, from the current weights.")
        elif best is not None:
            self._take_best_point(pl_module)
            trainer.optimizers[0].load_state_dict(copy.deepcopy(best["optimizer"]))
        if self.chain.auto and self.balance is not None:
            self.balance.start_sampling(pl_module, optimizer=trainer.optimizers[0], adapter_name=self.adapter_name)
        rank_zero_info(f"LangevinLoRA: burn-in ends at step {trainer.global_step} ({reason})"
                       + (f"; restored the weights and optimizer state of step {best['step']}" if best else ""))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._metrics:
            metrics = {f"langevin/{k}": float(v) for k, v in self._metrics.items()}
            self._metrics = {}
            if not trainer.barebones:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False, prog_bar=False, batch_size=1)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.gauge_stats:
            pl_module.log_dict({f"langevin/{k}": v for k, v in self.gauge_stats.items()}, on_step=True,
                               on_epoch=False, sync_dist=False)
            self.gauge_stats = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.guard is not None and self.sampling:
            with torch.no_grad():
                self.guard.finish()   # a runaway in the last, partial window: restored and warned
        chain = self.chain
        if chain.auto and chain.phase == "watch" and self._best_point is not None:   # still improving at the end
            self._keep_best_point(trainer, pl_module)
        if chain.staged and chain.phase == "sample" and chain.stage is not None:   # the budget ended in a stage
            if not chain.stage.final:
                self._close_stage(trainer, budget_left=False)
            if chain.phase == "sample":
                self._finish(trainer, "the Trainer's budget ran out")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.langevin_steps == 0 and not (self.chain.auto and self.chain.phase == "done"):
            rank_zero_warn(f"LangevinLoRA: the fit ended without a Langevin step (global_step {trainer.global_step}, "
                           f"burn_in_steps={self.burn_in_steps}, {self.skipped_steps} steps skipped for non-finite "
                           "gradients): the adapters are the optimizer's and the sample bank is empty.")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        if self._wrapper is not None:
            self._wrapper.remove()
            self._wrapper = None

    # -- num_data ----------------------------------------------------------------------------------
    def _resolve_num_data(self, trainer: Trainer) -> None:
        if self._beta_arg is not None or self._num_data_arg is not None:
            return
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        try:
            sized = dataset is not None and not isinstance(dataset, torch.utils.data.IterableDataset)
            n = len(dataset) if sized else None
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

    def _resolve_weight_decay(self) -> None:
        """``weight_decay=None``: the prior ``prior_std``, :math:`\\lambda = 1/(\\beta_0\\sigma_p^2)`
        (:math:`\\beta_0 = N` with ``num_data``); the heads' default follows it."""
        if self._weight_decay_arg is not None:
            return
        self.weight_decay = weight_decay_from_prior_std(self.prior_std, self.base_beta)
        if self._head_weight_decay_arg is None:
            self.head_weight_decay = self.weight_decay
        source = "prior_std" if self._prior_std_given else "the default prior"
        rank_zero_info(f"LangevinLoRA: weight_decay={self.weight_decay:.4g} from {source} "
                       f"N(0, {self.prior_std:g}^2) and num_data={self.base_beta:g}")

    # -- groups ------------------------------------------------------------------------------------
    def langevin_groups(self) -> list[LangevinGroupView]:
        """One :class:`~langevin_lora.core.view.LangevinGroupView` per Langevin group (``lora_A/<adapter>``,
        ``lora_B/<adapter>``, ``lora_magnitude/<adapter>``, ``head`` when sampled; suffixed ``@pg<i>``
        when the tensors of a role sit in several optimizer param groups). Empty before ``fit`` starts."""
        if self.base_beta is None:
            return []
        out = []
        for g in self._groups:
            friction = self.engine.friction(self._step_group(g, gather=False)) if self.sampling else None
            out.append(LangevinGroupView(
                name=g.name, params=list(g.params), lr=self.group_step(g), beta=self._group_beta(g),
                weight_decay=g.weight_decay,
                sampling=self.sampling, precond=self.engine.preconditioners(g.names) if self.sampling else None,
                friction=friction, momentum=None if friction is None else self.engine.momenta(g.names),
                prior_centre=self.engine.prior_centres(g.names, g.params) if self.sampling else None))
        return out

    def _step_group(self, g: LangevinGroup, gather: bool = True) -> StepGroup:
        """The engine's view of group ``g`` at this step: its tensors with a gradient (``gather``), or
        only its keys and hyperparameters."""
        hyper = dict(lr=self.group_step(g), beta=self._group_beta(g), weight_decay=g.weight_decay, foreach=self.foreach,
                     friction=self.friction, name=g.name)
        return self.engine.gather(g.params, g.names, **hyper) if gather else StepGroup(list(g.names), [], [], [], **hyper)

    # -- the step size -----------------------------------------------------------------------------
    def group_step(self, group: LangevinGroup) -> float:
        r"""The Langevin step :math:`\eta_t` of ``group`` now: the optimizer's lr before sampling and with
        ``step_size="optimizer"``, else :math:`\eta_{t_0}\,\mathrm{lr}_t/\mathrm{lr}_{t_0}`; times the
        guard's cut factor while sampling."""
        lr = group.lr
        if not self.sampling:
            return lr
        lr0 = self._lr0.get(group.name)
        if self._base_step is not None and lr0:
            lr = self._base_step * lr / lr0
        return lr * (self.guard.scale if self.guard is not None else 1.0)

    def _probe_loss(self):
        """The probe closure (:func:`~langevin_lora.diagnostics.replay.replayed_training_loss` over the probe set)."""
        return replayed_training_loss(self._trainer, self._module, self._probe.batches, loss_fn=self.loss_fn,
                                      owner="LangevinLoRA")

    def _measure_step(self, cold: bool = False) -> None:
        r"""Measure :math:`\lambda_{\max}(G^{1/2}\nabla^2U G^{1/2})` on the probe set and set the base step
        (the largest value over DDP ranks, so every replica takes the same step)."""
        params, scale, decay = [], [], []
        for g in self._groups:
            G = self.engine.preconditioners(g.names)
            params += g.params
            scale += G if G is not None else [1.0] * len(g.params)
            decay += [g.weight_decay] * len(g.params)
        # Sharded (FSDP2) adapters: finite differences through loss.backward(), which writes .grad (the
        # unsharded path's autograd.grad does not): every gradient of the step is kept aside meanwhile.
        stash = [(p, p.grad) for p in self._module.parameters()] if self.engine.sharded else []
        for p, _ in stash:
            p.grad = None
        try:
            with self._probe_loss() as closure:
                est = self.auto_step.measure(closure, params, precond=scale, weight_decay=decay,
                                             friction=getattr(self, "friction", None), cold=cold)
        finally:
            for p, g in stash:
                p.grad = g
        lam = est.lambda_max
        strategy = self._trainer.strategy
        if getattr(self._trainer, "world_size", 1) > 1:
            lam = float(strategy.reduce(torch.tensor(lam, device=strategy.root_device), reduce_op="max"))
            self.auto_step.lambda_max = lam
            self.auto_step.step_size = step_from_lambda_max(lam, friction=getattr(self, "friction", None),
                                                            safety=self.auto_step.safety)
        self._base_step = self.auto_step.step_size
        self._metrics.update({"lambda_max": lam, "step_size_grad_evals": float(self.auto_step.grad_evals)})
        rank_zero_info(f"LangevinLoRA: lambda_max(G^1/2 Hess U G^1/2) = {lam:.4g} on {self._probe.size} probe examples "
                       f"({est.grad_evals} gradient evaluations, {est.method}); step size {self._base_step:.4g}")

    def _recover(self, event: Divergence) -> None:
        """The guard saw a runaway: restore, cut, re-measure (``"auto"``); raises past its last cut."""
        first = self._groups[0] if self._groups else None
        stable = self._stable_step if self.step_size != "auto" and first is not None else None
        self.guard.recover(event, step_size=self.group_step(first) if first is not None else None, stable_step=stable)
        if self.step_size == "auto":
            self._measure_step()
        self._metrics["step_cuts"] = float(self.guard.cuts)

    def _stable_step(self) -> float | None:
        """A fixed step that ran away: the automatic step measured at the restored point, in units of the
        step now (issue 19: the guard cuts straight to it instead of refusing after quarterings that never
        reach it); ``None`` when it cannot be measured. The fixed base step is kept."""
        base = self._base_step
        try:
            self._measure_step()
            measured = self._base_step
        except ValueError:
            return None
        finally:
            self._base_step = base
        g = self._groups[0]
        lr0 = self._lr0.get(g.name)
        return measured * (g.lr / lr0 if lr0 else 1.0)

    # -- the optimizer step ------------------------------------------------------------------------
    def _on_optimizer_step(self, original: Callable, closure: Callable | None, kwargs: dict) -> Any:
        if self.chain.phase == "done":   # the ladder has ended: the samples are kept, nothing moves
            if closure is not None:
                closure()
            return None
        if self._trainer is not None and self.chain.due(self._trainer.global_step):
            return self._step(original, closure, kwargs)
        out = original(closure, **kwargs) if closure is not None else original(**kwargs)
        self._after_burn_in_step()
        return out

    def _after_burn_in_step(self) -> None:
        """Balancing after a burn-in optimizer step (counted from 1; the step has just been applied,
        the next forward pass has not run, so every gradient stays consistent with its point)."""
        if self.balance is None:
            return
        done = self._trainer.global_step + 1
        opt = self._wrapper.optimizer
        if self.balance.due(done):
            self.balance.step(self._module, done, sampling=False, optimizer=opt, adapter_name=self.adapter_name)
        if not self.chain.auto and done == self.burn_in_steps:
            self.balance.start_sampling(self._module, optimizer=opt, adapter_name=self.adapter_name)

    @torch.no_grad()
    def _step(self, original: Callable, closure: Callable | None, kwargs: dict) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.sampling:
            self._start_sampling()
        batches = [self._step_group(g) for g in self._groups]
        grads = [gr for b in batches for gr in b.grads] + [p.grad for p in self._others if p.grad is not None]
        if self.guard is not None and not self.guard.started:
            self.guard.start(self.engine, {n: p for g in self._groups for n, p in zip(g.names, g.params)}, batches)
        if not self.engine.check_finite(grads, stacklevel=5):
            event = self.guard.skipped() if self.guard is not None else None
            if event is not None:
                self._recover(event)
            return loss   # the whole optimizer step is skipped: Langevin tensors and heads alike
        ready = any(b.params for b in batches)  # False when the training step returned None
        if ready:
            for fn in self.step_observers:  # every parameter still holds its pre-step value
                fn(self._trainer, self._module, self)
        params = [p for g in self._groups for p in g.params]
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None  # the user's optimizer neither moves nor decays the Langevin tensors
        try:
            original(**kwargs)
        finally:
            for p, gr in zip(params, stash):
                p.grad = gr
        if ready:
            self._langevin_update(batches, loss)
        return loss

    def _start_sampling(self) -> None:
        """Freeze :math:`G` from the user's Adam second moments, jointly over every Langevin tensor
        (:meth:`LangevinEngine.freeze`), and make the fp32 master copies."""
        opt = self._wrapper.optimizer
        raw, fixed, identity = adam_freeze_inputs(opt, self._groups, self.precond_clamp, self.precondition)
        self._precond_reference = self.engine.freeze(raw, fixed)
        if self.precondition and identity:
            rank_zero_warn(f"LangevinLoRA: no Adam second moment for {len(identity)} Langevin tensors "
                           f"(e.g. {identity[0]!r}; optimizer {type(opt).__name__}, step {self._trainer.global_step}); "
                           "their preconditioner is the identity (plain SGLD)")
        self.sampling = True
        for g in self._groups:
            works = [self.engine.work_tensor(n, p) for n, p in zip(g.names, g.params)]
            if self.prior_centre == "burn_in":
                self.engine.set_prior_centre(g.names, works)
        self._lr0 = {g.name: g.lr for g in self._groups}
        self._probe.freeze()
        if self.chain.staged:
            self._set_stage_prior(self.chain.next_rung)
        if self.step_size == "auto":
            self._measure_step(cold=True)
        elif self.step_size != "optimizer":
            self._base_step = float(self.step_size)
        if self.chain.staged:
            self._open_stage()
        if self._groups:
            self._metrics["step_size"] = self.group_step(self._groups[0])
        rank_zero_info(f"LangevinLoRA: sampling starts at optimizer step {self._trainer.global_step} "
                       f"(beta={self.beta:g}, weight_decay={self.weight_decay:g}, "
                       f"{sum(len(g.params) for g in self._groups)} tensors, step size "
                       f"{self.group_step(self._groups[0]) if self._groups else math.nan:.4g})")

    @property
    def adapting(self) -> bool:
        """``True`` during the ``precond_adapt_steps`` Langevin steps that measure the new ``G``."""
        return self.sampling and self.langevin_steps < self.precond_adapt_steps

    def _langevin_update(self, batches: list[StepGroup], loss: Tensor | None) -> None:
        trainer, module = self._trainer, self._module
        adapting = self.adapting
        if adapting:  # at the pre-step point, like the gradients
            self.engine.accumulate(batches)
        guard = self.guard
        if guard is not None:
            use_loss = loss is not None and getattr(trainer, "world_size", 1) == 1  # ranks must decide alike
            guard.observe(batches, loss * trainer.accumulate_grad_batches if use_loss else None)
        self.engine.step(batches)
        self.langevin_steps += 1
        event = guard.check([w for b in batches for w in b.works]) if guard is not None else None
        if event is not None:
            self._recover(event)
        if adapting and not self.adapting:
            counts = {n: self.precond_adapt_steps for g in self._groups for n in g.names}
            G = self.engine.refreeze(counts, self._precond_reference, clamp=self.precond_clamp)
            if G:
                specs = self.engine.specs(counts)
                rank_zero_info(f"LangevinLoRA: preconditioner re-frozen after {self.precond_adapt_steps} adaptation "
                               f"steps (G in [{global_min(G, specs):.3g}, {-global_min([-x for x in G], specs):.3g}], "
                               f"median {self._precond_reference:.3g})")
                if self.step_size == "auto":
                    self._measure_step()
                if guard is not None:
                    guard.mark_good()
        elif self.step_size == "auto" and self.auto_step.due(self.langevin_steps):
            self._measure_step()
        if self._groups and (self._metrics or self.langevin_steps % max(1, trainer.log_every_n_steps) == 0):
            self._metrics["step_size"] = self.group_step(self._groups[0])
        if self.gauge_moves is not None:
            stats = self.gauge_moves(lora_modules(module, self.adapter_name), beta=self.beta,
                                     weight_decay=self.weight_decay, sampler=self)
            self.gauge_stats.update(stats)
        for fn in self.post_step_observers:
            fn(trainer, module, self)
        kept = self.langevin_steps - self.precond_adapt_steps   # adaptation steps are burn-in
        if self.chain.staged:
            self._stage_step(trainer, module, kept)
        elif self.num_samples > 0 and kept > 0 and kept % self.sample_every == 0:
            self.sample_bank.add(module, trainer.global_step, write=trainer.is_global_zero)

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Phase, counters, ``num_data``, the engine's state (generators, frozen preconditioners,
        adaptation sums, fp32 masters, by parameter name), the step size (base step, each group's lr at
        sampling start, the last :math:`\\lambda_{\\max}` and its eigenvector, the guard's cut factor) and
        the sample bank (tensors and builtins only, so ``weights_only`` checkpoint loading works), and the
        probe set when its batches are tensors in plain containers (else a resumed run collects a new one
        from the batches after the resume). The guard's snapshots are not saved: it restarts its
        references where the run resumes."""
        return {"version": CHECKPOINT_VERSION, "sampling": self.sampling, "langevin_steps": self.langevin_steps,
                "num_data": self.num_data, "engine": self.engine.state_dict(),
                "step_size": {"base": self._base_step, "lr0": dict(self._lr0), "auto": self.auto_step.state_dict(),
                              "probe": self._probe.state_dict() if self.step_size == "auto" else None,
                              "guard": None if self.guard is None else self.guard.state_dict()},
                "precond_reference": self._precond_reference, "sample_bank": self.sample_bank.state_dict(),
                "balance": None if self.balance is None else self.balance.state_dict(),
                "gauge_moves": None if self.gauge_moves is None else self.gauge_moves.state_dict(),
                "chain": {"schedule": self.chain.state_dict(), "best_point": self._best_point,
                          "stage_bank": None if self._stage_bank is None else self._stage_bank.state_dict(),
                          "best_bank": None if self._best_bank is None else self._best_bank.state_dict(),
                          "stage_probs": list(self._stage_probs), "best_probs": list(self._best_probs),
                          "best_example_nll": self._best_example_nll,
                          "best_is_stage": self._best_bank is not None and self._best_bank is self._stage_bank,
                          "prior_std": self.prior_std,
                          "weight_decay": self.weight_decay}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of any :data:`CHECKPOINT_VERSION` up to this one (version 1 was written
        before the engine existed). Tensors are matched to parameters by name, and moved beside them, once
        the module is known (``on_train_start``)."""
        version = check_version("LangevinLoRA", state_dict, CHECKPOINT_VERSION)
        engine = state_dict["engine"] if version >= 2 else None
        if engine is None:   # version 1: per-kind dicts of tensors by name
            per_tensor: dict[str, dict[str, Tensor]] = {}
            for key, slot in (("precond", "precond"), ("masters", "master"), ("adapt_sq", "adapt_sq")):
                for n, t in state_dict.get(key, {}).items():
                    per_tensor.setdefault(n, {})[slot] = t
            engine = {"generators": state_dict["generators"], "skipped_steps": state_dict["skipped_steps"],
                      "state": per_tensor}
        self.engine.load_state_dict(engine)
        self.sampling = bool(state_dict["sampling"])
        self.langevin_steps = int(state_dict["langevin_steps"])
        if self._num_data_arg is None and self._beta_arg is None:
            self.num_data = state_dict["num_data"]
        self._precond_reference = float(state_dict.get("precond_reference", 1.0))
        step = state_dict["step_size"] if version >= 3 else None   # before 3 the optimizer's lr was the step
        if step is not None:
            self._base_step, self._lr0 = step["base"], dict(step["lr0"])
            self.auto_step.load_state_dict(step["auto"])
            self._probe_state = step.get("probe")   # moved to the module's device in on_train_start
            if self.guard is not None and step["guard"] is not None:
                self.guard.load_state_dict(step["guard"])
        self.sample_bank.load_state_dict(state_dict["sample_bank"])
        for key, obj in (("balance", self.balance), ("gauge_moves", self.gauge_moves)):
            if obj is not None and state_dict.get(key) is not None:
                obj.load_state_dict(state_dict[key])
        chain = state_dict["chain"] if version >= 4 else None   # before 4 only the fixed schedule existed
        if chain is not None:
            self.chain.load_state_dict(chain["schedule"])
            self._best_point, self._stage_probs = chain["best_point"], list(chain["stage_probs"])
            for key in ("stage_bank", "best_bank"):
                bank = None
                if chain[key] is not None:
                    bank = SampleBank(2 * self.num_samples)
                    bank.load_state_dict(chain[key])
                setattr(self, f"_{key}", bank)
            self._best_probs, self._best_example_nll = list(chain["best_probs"]), chain["best_example_nll"]
            if chain["best_is_stage"]:
                self._best_bank = self._stage_bank
            if self.chain.staged and self.sampling:   # the stage's prior, set on the groups in on_train_start
                self._stage_prior = (chain["prior_std"], chain["weight_decay"])
        elif self.sampling or self.langevin_steps:
            self.chain.phase = "sample"
        self._restored = True

