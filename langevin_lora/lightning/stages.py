r"""The zero-config drop-in's stages, as :class:`~langevin_lora.LangevinLoRA` drives them.

After burn-in (the best validation point restored), :class:`~langevin_lora.lightning.schedule.ChainSchedule`
decides; this mixin acts on the Trainer and the engine:

- a *scoring stage* at rung :math:`k` sets :math:`\lambda_k = 1/(\beta_0\sigma_k^2)` on every Langevin group
  (:meth:`DropInStages._set_stage_prior`), relaxes
  :func:`~langevin_lora.lightning.schedule.relaxation_steps` of its slowest prior mode, then keeps samples
  and their validation predictions (:mod:`langevin_lora.lightning.validation`);
- closing it scores the stage by the paired validation NLL of its average and moves up or down the
  ladder, or on to the *final stage* at the chosen :math:`\sigma^*`;
- the final stage keeps a thinning reservoir and stops the Trainer once the posterior average has
  settled on validation (:func:`~langevin_lora.diagnostics.convergence.sample_convergence`) and the
  stationarity report has enough effective samples, or when the Trainer's budget runs out.

A mixin, not a class of its own: every method reads and writes the callback's chain, engine, groups and
banks, which the callback owns and checkpoints; the module boundary keeps the stage logic apart from
the hooks, the step and the checkpoint code.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from langevin_lora.core.sharding import global_min
from langevin_lora.core.temperature import weight_decay_from_prior_std
from langevin_lora.diagnostics.convergence import sample_convergence
from langevin_lora.lightning.schedule import relaxation_steps
from langevin_lora.lightning.validation import paired_nll
from langevin_lora.posterior.bank import SampleBank

__all__ = ["DropInStages"]


class DropInStages:
    """The stage methods of :class:`~langevin_lora.LangevinLoRA` (``burn_in_steps="auto"``)."""

    def _set_stage_prior(self, k: int) -> None:
        r"""Rung ``k`` of the ladder, :math:`\lambda_k = 1/(\beta_0\sigma_k^2)`, on every Langevin group (heads too, unless
        ``head_weight_decay`` was given), unless ``weight_decay`` fixes the prior."""
        if self._weight_decay_arg is not None:
            return
        self.prior_std = self.chain.prior_stds[k]
        self.weight_decay = weight_decay_from_prior_std(self.prior_std, self.base_beta)
        recorder = getattr(self.diagnostics, "recorder", None)
        if recorder is not None and hasattr(recorder, "new_target"):
            recorder.new_target()
        for g in self._groups:
            if g.name.split("@")[0] != "head" or self._head_weight_decay_arg is None:
                g.weight_decay = self.weight_decay
        if self._head_weight_decay_arg is None:
            self.head_weight_decay = self.weight_decay
        self._metrics["prior_std"] = self.prior_std

    def _open_stage(self) -> None:
        """Open the next rung: its relaxation time from the slowest prior mode (:func:`relaxation_steps`)."""
        relax = 1
        for g in self._groups:
            G = self.engine.preconditioners(g.names)
            g_min = global_min(G, self.engine.specs(g.names)) if G else 1.0   # over every shard
            friction = self.engine.friction(self._step_group(g, gather=False))
            relax = max(relax, relaxation_steps(self.group_step(g), g.weight_decay, g_min, friction,
                                                self.chain.relax_efolds))
        left = self._steps_left()
        first = not self.chain.stages
        needed = relax + max(1, relax // self.num_samples) * self.num_samples
        if first and left < needed:   # relax and collect within what is left, and say so
            rank_zero_warn(f"LangevinLoRA: {left:g} optimizer steps are left for sampling, but the chain needs "
                           f"{relax} steps to relax and {needed - relax} to collect {self.num_samples} samples at "
                           f"prior_std {self.prior_std:g}: it gets half of what is left for each, short of "
                           "stationarity. Train for more steps (max_epochs / max_steps) or lower patience.")
            relax = max(1, int(left // 2))
        stage = self.chain.open_stage(self.langevin_steps - self.precond_adapt_steps, relax)
        self._stage_bank = SampleBank(2 * self.num_samples)
        self._stage_probs = []
        self._metrics["stage"] = float(len(self.chain.stages))
        rank_zero_info(f"LangevinLoRA: stage {len(self.chain.stages)} at prior_std {stage.prior_std:g} "
                       f"(weight_decay {self.weight_decay:.4g}): {stage.relax} relaxation steps, then a sample every "
                       f"{stage.sample_every} steps")

    def _stage_step(self, trainer: Trainer, module: LightningModule, kept: int) -> None:
        chain = self.chain
        stage = chain.stage
        if chain.sample_due(kept):
            self._stage_bank.add(module, trainer.global_step, write=False)
            stage.samples += 1
            probs = self._validation.probs(trainer, module, self._validation_fallback)
            if probs is not None:
                self._stage_probs.append(probs)
            if stage.final and len(self._stage_bank) >= 2 * self.num_samples:   # the thinning reservoir
                self._stage_bank.thin()
                self._stage_probs = self._stage_probs[1::2]
                chain.thin()
        left = self._steps_left()
        if stage.final:
            reason = "the Trainer's budget ran out" if left < 3 else self._final_stage_done(trainer, kept)
            if reason:
                self._finish(trainer, reason)
        elif chain.stage_complete(kept):   # the next stage needs about as many steps as this one
            self._close_stage(trainer, left - 1 >= stage.relax + stage.collect)
        elif left < 3:   # this step counts too (global_step moves on after it), and a probe may follow
            self._close_stage(trainer, False)

    def _final_stage_done(self, trainer: Trainer, kept: int) -> str:
        """Why the final stage can stop now (``""``: not yet): the posterior average has settled on
        validation (:func:`~langevin_lora.diagnostics.convergence.sample_convergence`) and the stage's traces hold
        enough effective samples for the stationarity report. Decided on rank 0 and broadcast."""
        if len(self._final_probs()) < self.num_samples or not self.chain.sample_due(kept):
            return ""
        reason = ""
        if trainer.is_global_zero:
            settled = True
            probs = self._final_probs()
            if probs:
                labels = self._validation.labels()
                settled = bool(sample_convergence(torch.stack(probs), labels)["converged"])
            ess, ess_min = self._final_stage_ess(kept)
            if settled and (ess is None or ess >= ess_min):
                reason = ("the posterior average has settled on validation"
                          + ("" if ess is None else f" and the stage's traces hold {ess:.0f} >= {ess_min:g} "
                             "effective samples"))
        if getattr(trainer, "world_size", 1) > 1:
            reason = trainer.strategy.broadcast(reason, src=0)
        return reason

    def _final_probs(self) -> list[Tensor]:
        """Validation probabilities of the final samples in chain order: the best scoring stage's, when
        the final stage went back to its scale, then the final stage's own."""
        return (self._best_probs if self._best_bank is not self._stage_bank else []) + self._stage_probs

    def _final_spans(self) -> list[tuple[int, int]]:
        """The stretches of the chain (Langevin steps, as the diagnostics count them) that the final
        samples come from."""
        chain, adapt = self.chain, self.precond_adapt_steps   # the recorder counts every Langevin step
        stage = chain.stage
        spans = [(stage.start + stage.relax + adapt, self.langevin_steps)]
        best = chain.stages[chain.best_stage] if chain.best_stage is not None else None
        if best is not None and best is not stage and self._best_bank is not None:
            spans.insert(0, (best.start + best.relax + adapt, best.end + adapt))
        return spans

    def _final_stage_ess(self, kept: int) -> tuple[float | None, float]:
        """Effective sample size of the stationarity report's main trace over the final samples'
        stretches of the chain, and the report's threshold (``None``: no diagnostics to read)."""
        diag = self.diagnostics
        if not hasattr(diag, "span_arguments"):
            return None, 100.0
        from langevin_lora.diagnostics.chains import effective_sample_size
        from langevin_lora.diagnostics.checks import STATIONARITY_TRACES

        from langevin_lora.diagnostics.checks import Evidence

        ess_min = float(Evidence.ess_min * Evidence.segments)   # the report's gate for one run
        diag.report_span = self._final_spans()
        traces = diag.span_arguments()["traces"]
        for name in STATIONARITY_TRACES:
            x = np.asarray(traces.get(name) or [], dtype=np.float64)
            if x.size >= 8:
                return (float(effective_sample_size(x)) if x.std() > 0 else float(x.size)), ess_min
        return 0.0, ess_min

    def probe_steps(self) -> float:
        """The curvature probes spent so far (this callback's step size and the diagnostics'), in
        optimizer steps of training examples."""
        trainer, probe = self._trainer, self._probe
        per_step = (probe.size / max(1, len(probe.batches))) * getattr(trainer, "accumulate_grad_batches", 1)
        examples = self.auto_step.grad_evals * probe.size
        probes = getattr(self.diagnostics, "probes", None)
        examples += getattr(probes, "evaluations", 0) * per_step   # replays of one training batch
        return examples / per_step if per_step > 0 else 0.0

    def _steps_left(self) -> float:
        """Optimizer steps left in the Trainer's plan, the curvature probes' cost taken off."""
        return self.chain.planned_steps - self._trainer.global_step - self.probe_steps()

    @property
    def _validation_fallback(self) -> str:
        return f"sampling keeps prior_std {self.prior_std:g}"

    def _close_stage(self, trainer: Trainer, budget_left: bool) -> None:
        """Score a ladder stage and go on: the next rung, the final stage, or (no sample at all) stop."""
        chain, stage = self.chain, self.chain.stage
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if getattr(trainer, "world_size", 1) > 1 \
            else None
        nll, delta, se, self._example_nll = paired_nll(self._stage_probs, self._validation.labels(),
                                                       self._best_example_nll, reduce)
        if nll is not None:
            self._metrics["val_nll_average"] = nll
        rank_zero_info(f"LangevinLoRA: stage {len(chain.stages)} (prior_std {stage.prior_std:g}, {stage.samples} "
                       f"samples): validation NLL of the posterior average {nll if nll is not None else math.nan:.4f}"
                       + ("" if delta is None else f" ({delta:+.4f} ± {se:.4f} against the best stage)"))
        step = chain.close_stage(nll, delta=delta, se=se, budget_left=budget_left)
        if chain.best_stage == len(chain.stages) - 1:   # the final stage counts its samples too
            self._best_bank, self._best_probs = self._stage_bank, list(self._stage_probs)
            self._best_example_nll = self._example_nll
        if step == "done":
            self._finish(trainer, "no stage kept a sample")
        elif step == "continue":
            chain.continue_as_final()
            rank_zero_info(f"LangevinLoRA: prior_std {stage.prior_std:g} chosen ({chain.ladder_reason}); its chain "
                           "goes on as the final stage")
        else:
            final = step == "final"
            if final:
                rank_zero_info(f"LangevinLoRA: prior_std {chain.final_prior_std:g} chosen ({chain.ladder_reason}); "
                               "the final stage relaxes back to it")
            self._set_stage_prior(chain.stages[chain.best_stage].rung if final else chain.next_rung)
            if self.step_size == "auto":
                self._measure_step()
            self._open_stage()

    def _finish(self, trainer: Trainer, reason: str) -> None:
        """The final stage is over: its samples become the bank, the report judges its stretch of the
        chain, and the Trainer stops."""
        chain = self.chain
        chain.finish(reason)
        stage, bank = chain.stage, self._stage_bank
        if stage is not None and stage.final and bank is not None:
            if self._best_bank is not None and self._best_bank is not bank:   # went back to sigma*: both count
                self.sample_bank.adopt(self._best_bank, write=trainer.is_global_zero)
            self.sample_bank.adopt(bank, write=trainer.is_global_zero)
            spans = self._final_spans()
        elif chain.best_stage is not None and self._best_bank is not None:   # the ladder never got to a final stage
            stage = chain.stages[chain.best_stage]
            self.sample_bank.adopt(self._best_bank, write=trainer.is_global_zero)
            adapt = self.precond_adapt_steps
            spans = [(stage.start + stage.relax + adapt, stage.end + adapt)]
        else:
            stage, spans = None, None
        if spans is not None and hasattr(self.diagnostics, "report_span"):
            self.diagnostics.report_span = spans
        self._stage_probs, self._stage_bank, self._best_bank, self._best_probs = [], None, None, []
        trainer.should_stop = True
        self._metrics["stopped"] = 1.0
        rank_zero_info(f"LangevinLoRA: sampling done at step {trainer.global_step} ({reason}); "
                       + (f"{len(self.sample_bank)} samples of prior_std {stage.prior_std:g}" if stage is not None
                          else "no sample") + "; stopping the Trainer")
