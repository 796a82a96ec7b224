r"""The phases of one Langevin LoRA run, without a Trainer: watch the validation curve, restore
the best point, sample a ladder of prior scales, keep the best stage, stop.

:class:`~langevin_lora.LangevinLoRA` drives a :class:`ChainSchedule` as
:class:`~langevin_lora.diagnostics.GibbsDiagnostics` drives its recorder: the callback feeds it
validation values and step counts and carries out its decisions (snapshot, restore, change the
prior, keep a sample, stop the Trainer); every decision lives here and is tested without Lightning.

**Watching** (``burn_in_steps="auto"``). The user's optimizer runs untouched while the monitored
validation value (``monitor``, default ``"val_loss"``, ``mode="min"``) improves by more than
``min_delta``; each improvement asks the caller for a snapshot of the trainable tensors and the
optimizer state. After ``patience`` validation checks without improvement (as in Lightning's
``EarlyStopping``), sampling starts at the best snapshot. When the monitored value is never logged,
sampling starts at ``max_burn_in_fraction`` of the planned steps (the caller warns). When it is
still improving at the end of the budget (the well-fit case), there is no over-fitting tail to
replace: nothing is sampled and the best point is the single sample
(:meth:`ChainSchedule.end_watching`), so the drop-in does no harm where early stopping would not
have stopped either. An integer ``burn_in_steps`` starts at that step.

**Sampling: a ladder of prior scales.** Sampling targets the local posterior

.. math::
    \pi_k(\theta) \propto \exp\!\big(-\beta\,[\hat L(\theta) + \tfrac{\lambda_k}{2}\lVert\theta-\theta_0\rVert^2]\big),
    \qquad \lambda_k = 1/(N\sigma_k^2),

centred at the point :math:`\theta_0` where sampling starts. No single :math:`\sigma` serves every
task (measured: 0.05 on Twitter sentiment, 0.02 on another packaged task), so the scale is chosen
per run from validation evidence: a scoring stage runs the chain at one rung :math:`\sigma_k` of
the ladder ``prior_stds`` (ascending) for ``relax`` steps, then keeps ``num_samples`` samples spread
over the next ``relax`` steps, and scores the stage by the validation NLL of its posterior average
:math:`\bar p_k = \frac1S\sum_s p_{\theta_s}`: every stage is scored with the same number of samples
spread over the same number of relaxation times, i.e. by what a bank of that size delivers at that
scale. (Extrapolating each score to infinitely many samples removes the finite-average penalty,
which grows with the posterior's width, but measured on Twitter sentiment it doubled the scores'
noise and let an under-relaxed wide stage win; the one-standard-error preference for wider scales
below offsets the penalty instead.)
Scores are compared
on the same validation examples: :math:`d` is the mean per-example difference from the best stage
so far and :math:`\mathrm{se}` its standard error. A wider prior replaces the best unless it is worse
by more than one standard error (:math:`d < \mathrm{se}`), a narrower one only when it is better by
more than one (:math:`d < -\mathrm{se}`): among the scales the validation data cannot tell apart,
the least informative prior, whose posterior keeps the uncertainty the data do not resolve. The
search starts at the middle rung (0.02 on the default ladder) and climbs while the stages win;
when the first step up does not win, it descends from the start instead; it stops at the first
stage that does not win, or at the ladder's end. Each stage starts from the previous stage's state.

**The final stage** samples the best scale :math:`\sigma^*`: it continues the best stage when that
was the last one, else it relaxes back to :math:`\sigma^*` first, and the best stage's samples
count with its own (both stretches of the chain sample :math:`\pi_{\sigma^*}`). It keeps a sample every
``sample_every`` steps; whenever it holds ``2 * num_samples`` it drops every other one and doubles
``sample_every`` (a thinning reservoir: between ``num_samples`` and ``2 * num_samples`` samples
spread over the whole stage). The caller ends it (:meth:`ChainSchedule.finish`) once the posterior
average has settled on validation and the stage's traces have enough effective samples for the
stationarity report, or when the budget runs out.

``relax`` is the time for ``relax_efolds`` e-folds (default 4) of the slowest prior-dominated mode, whose
curvature in the preconditioned coordinates is :math:`\omega^2 = \lambda_k G_{\min}`
(:func:`relaxation_steps`): per step, :math:`\eta\omega^2` overdamped, :math:`h\gamma/2` kinetic
below critical damping (:math:`\gamma < 2\omega`) and :math:`h\omega^2/\gamma` above it. Four, not
two: on a quadratic two would do (the prior-dominated coordinates start at their mean and only their
variance must grow, at twice the rate), but the loss is not quadratic, and with two e-folds the
wider stages were scored before the chain had slid into the regions of lower training loss that a
wide prior lets it reach (measured on Twitter sentiment: σ 0.08 then scored best on validation,
and the final stage at it ran hot, β·T_virial 1.06, and was worse on held-out data than 0.04).

**Stopping.** When the final stage ends the schedule is ``"done"`` and the caller stops the Trainer:
sampling replaces the over-fitting tail of the user's budget instead of adding to it. A budget
that runs out in a scoring stage closes it and goes to the final stage with what is left.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from langevin_lora._validation import check_choice, check_int, check_non_negative, check_real

__all__ = ["ChainSchedule", "Stage", "relaxation_steps", "PHASES", "DEFAULT_PRIOR_LADDER", "MODES"]

#: The phases, in order.
PHASES = ("watch", "sample", "done")
#: ``mode`` of the monitored value.
MODES = ("min", "max")
#: The default ladder of prior standard deviations :math:`\sigma_k` (ascending, a factor 2 apart):
#: a local posterior of LoRA factors and a head around a fine-tuned point, from tight (0.01) to the
#: scale of a LoRA A initialisation (about :math:`1/\sqrt{d_{in}}` = 0.05 at :math:`d_{in}` = 384).
DEFAULT_PRIOR_LADDER = (0.01, 0.02, 0.04, 0.08)


def relaxation_steps(step: float, weight_decay: float, precond_min: float, friction: float | None,
                     efolds: float = 4.0) -> int:
    r"""Chain steps for ``efolds`` e-folds of the slowest prior-dominated mode.

    That mode has curvature :math:`\omega^2 = \lambda\,G_{\min}` in the preconditioned coordinates.
    Its relaxation rate per step is :math:`\eta\omega^2` for the overdamped chain (``friction=None``,
    ``step`` = :math:`\eta`) and, for kinetic BAOAB (``step`` = :math:`h`), :math:`h\gamma/2` below
    critical damping and :math:`h\omega^2/\gamma` above it (THEORY §2b).
    """
    omega2 = check_real("weight_decay", weight_decay, low=0.0, low_open=True) * \
        check_real("precond_min", precond_min, low=0.0, low_open=True)
    step = check_real("step", step, low=0.0, low_open=True)
    if friction is None:
        rate = step * omega2
    else:
        gamma = check_real("friction", friction, low=0.0, low_open=True)
        rate = step * (gamma / 2 if gamma < 2 * math.sqrt(omega2) else omega2 / gamma)
    return max(1, math.ceil(efolds / min(rate, 1.0)))


@dataclass
class Stage:
    """One rung of the ladder: its prior scale, where it started (Langevin steps), its relaxation
    and collection lengths, how often it keeps a sample, and its validation score."""

    prior_std: float
    start: int
    relax: int
    collect: int
    sample_every: int
    samples: int = 0
    val_nll: float | None = None
    final: bool = False
    rung: int = 0
    delta: float | None = None   # val_nll minus the best stage's then, per example on average
    se: float | None = None      # standard error of delta

    @property
    def end(self) -> int:
        """The Langevin step a scoring stage ends at (a final stage ends when the caller says so)."""
        return self.start + self.relax + self.collect


class ChainSchedule:
    r"""Watch → sample (a ladder of prior scales) → done, for one run (module docstring).

    Args:
        burn_in_steps: ``"auto"`` (watch the validation curve) or optimizer steps before sampling.
        monitor: the logged validation key to watch (``"val_loss"``).
        mode: ``"min"`` or ``"max"``.
        patience: validation checks without improvement before sampling starts (>= 1).
        min_delta: an improvement must beat the best value by more than this (>= 0).
        max_burn_in_fraction: in ``(0, 1)``; when ``monitor`` is never logged, sampling starts at this
            fraction of the planned steps.
        prior_stds: the ladder :math:`\sigma_1 < \sigma_2 < \dots` (one value: a single stage).
        num_samples: samples that score a ladder stage, and that the final stage keeps at least (>= 1).
        relax_efolds: e-folds of the slowest prior mode before a stage keeps samples (> 0).
        staged: ``False`` for the fixed schedule of an integer ``burn_in_steps`` with a fixed prior:
            no stages, sampling runs to the end of the Trainer's budget.
    """

    def __init__(self, burn_in_steps: int | str = "auto", *, monitor: str = "val_loss", mode: str = "min",
                 patience: int = 2, min_delta: float = 0.0, max_burn_in_fraction: float = 0.75,
                 prior_stds: Sequence[float] = DEFAULT_PRIOR_LADDER, num_samples: int = 16,
                 relax_efolds: float = 4.0, staged: bool = True) -> None:
        if burn_in_steps != "auto":
            if isinstance(burn_in_steps, str):
                raise ValueError(f"Invalid burn_in_steps: {burn_in_steps!r} (expected 'auto' or an integer >= 0)")
            burn_in_steps = check_int("burn_in_steps", burn_in_steps, low=0)
        self.burn_in_steps = burn_in_steps
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"Invalid monitor: {monitor!r} (expected the non-empty name of a logged metric)")
        self.monitor = monitor
        self.mode = check_choice("mode", mode, MODES)
        self.patience = check_int("patience", patience, low=1)
        self.min_delta = check_non_negative("min_delta", min_delta)
        self.max_burn_in_fraction = check_real("max_burn_in_fraction", max_burn_in_fraction, low=0.0, high=1.0,
                                               low_open=True, high_open=True)
        stds = [check_real("prior_std", s, low=0.0, low_open=True) for s in prior_stds]
        if not stds or any(b <= a for a, b in zip(stds, stds[1:])):
            raise ValueError(f"Invalid prior_std: {list(prior_stds)!r} (expected a float > 0 or a non-empty, "
                             "strictly increasing sequence of floats > 0)")
        self.prior_stds = tuple(stds)
        self.num_samples = check_int("num_samples", num_samples, low=1)
        self.relax_efolds = check_real("relax_efolds", relax_efolds, low=0.0, low_open=True)
        self.staged = bool(staged)
        self.reset()

    # -- state ---------------------------------------------------------------------------------------
    def reset(self, planned_steps: float = math.inf) -> None:
        """A new chain over a budget of ``planned_steps`` optimizer steps."""
        self.planned_steps = planned_steps
        self.phase = "watch"
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.checks = 0
        self.triggered = False
        self.start_step: int | None = None
        self.start_reason = ""
        self.stages: list[Stage] = []
        self.best_stage: int | None = None
        self.stop_reason = ""
        self.ladder_reason = ""
        self._ladder_done = False
        self.next_rung = (len(self.prior_stds) - 1) // 2
        self._direction = 1
        self._descended = False

    @property
    def auto(self) -> bool:
        return self.burn_in_steps == "auto"

    @property
    def fallback_step(self) -> float:
        """The latest optimizer step at which watching ends."""
        return math.floor(self.max_burn_in_fraction * self.planned_steps) if math.isfinite(self.planned_steps) \
            else math.inf

    # -- watching ------------------------------------------------------------------------------------
    def observe(self, value: float | None, step: int) -> bool:
        """A validation check at optimizer step ``step`` gave ``value`` (``None``: not logged).
        Returns ``True`` when it is the best so far (the caller snapshots the point)."""
        if self.phase != "watch" or not self.auto or value is None or not math.isfinite(value):
            return False
        self.checks += 1
        better = self.best_value is None or (value < self.best_value - self.min_delta if self.mode == "min"
                                             else value > self.best_value + self.min_delta)
        if better:
            self.best_value, self.best_step, self.wait = float(value), int(step), 0
            return True
        self.wait += 1
        if self.wait >= self.patience:
            self.triggered = True
        return False

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is a sampling step."""
        if self.phase != "watch":
            return self.phase == "sample"
        if not self.auto:
            return step >= self.burn_in_steps
        return self.triggered or (self.checks == 0 and step >= self.fallback_step)

    def end_watching(self) -> str:
        """The budget ended while the monitored value was still improving (``patience`` was never
        exhausted): there is no over-fitting tail to replace, so nothing is sampled and the caller keeps
        the best point as the single sample. Returns why."""
        self.phase = "done"
        self.stop_reason = (f"{self.monitor} was still improving when the budget ended (best {self.best_value:.4g} at "
                            f"step {self.best_step}): no over-fitting tail to sample in; the bank holds that point")
        return self.stop_reason

    def begin(self, step: int) -> str:
        """Sampling starts at optimizer step ``step``; returns why (for the log)."""
        self.phase, self.start_step = "sample", int(step)
        if not self.auto:
            self.start_reason = f"burn_in_steps={self.burn_in_steps}"
        elif self.triggered:
            self.start_reason = (f"{self.monitor} did not improve for {self.patience} validation checks; best "
                                 f"{self.best_value:.4g} at step {self.best_step}")
        else:
            self.start_reason = (f"no {self.monitor!r} was logged; sampling starts at {self.max_burn_in_fraction:g} "
                                 f"of the planned steps")
        return self.start_reason

    # -- the ladder ----------------------------------------------------------------------------------
    @property
    def stage(self) -> Stage | None:
        return self.stages[-1] if self.stages else None

    @property
    def final_prior_std(self) -> float | None:
        r""":math:`\sigma^*`, the scale of the best scoring stage (``None`` before one is scored)."""
        return None if self.best_stage is None else self.stages[self.best_stage].prior_std

    def open_stage(self, langevin_step: int, relax: int) -> Stage:
        r"""Start the next scoring rung at Langevin step ``langevin_step`` with ``relax`` relaxation
        steps; once the ladder has ended, the final stage at :math:`\sigma^*` instead."""
        n = self.num_samples
        every = max(1, relax // n)
        if self.ladder_done:
            best = self.stages[self.best_stage]
            stage = Stage(prior_std=best.prior_std, start=int(langevin_step), relax=int(relax), collect=0,
                          sample_every=best.sample_every, final=True, rung=best.rung)
        else:
            stage = Stage(prior_std=self.prior_stds[self.next_rung], start=int(langevin_step), relax=int(relax),
                          collect=every * n, sample_every=every, rung=self.next_rung)
        self.stages.append(stage)
        return stage

    @property
    def ladder_done(self) -> bool:
        return bool(self.stages) and (self.stages[-1].final or self._ladder_done)

    def continue_as_final(self) -> Stage:
        """The best scoring stage was the last one: its chain goes on as the final stage (same target,
        its samples kept)."""
        stage = self.stages[-1]
        stage.final, stage.collect = True, 0
        return stage

    def thin(self) -> None:
        """The final stage dropped every other sample: keep one every ``2 * sample_every`` steps."""
        stage = self.stage
        stage.sample_every *= 2
        stage.samples //= 2

    def finish(self, reason: str) -> None:
        self.phase, self.stop_reason = "done", reason

    def sample_due(self, langevin_step: int) -> bool:
        """Whether the chain state after Langevin step ``langevin_step`` (counted from 1) is kept."""
        stage = self.stage
        if stage is None or self.phase != "sample":
            return False
        k = langevin_step - stage.start - stage.relax
        return 0 < k and (stage.final or k <= stage.collect) and k % stage.sample_every == 0

    def stage_complete(self, langevin_step: int) -> bool:
        """Whether a scoring stage has collected its samples (a final stage never completes by itself)."""
        stage = self.stage
        return stage is not None and self.phase == "sample" and not stage.final and langevin_step >= stage.end

    def close_stage(self, val_nll: float | None, *, delta: float | None = None, se: float = 0.0,
                    budget_left: bool = True) -> str:
        """Score the current scoring stage (``val_nll``; ``delta``: its mean per-example difference from
        the best stage so far, ``se`` the standard error of that mean; module docstring); returns what
        comes next: ``"next"`` (the next rung),
        ``"continue"`` (this stage was the best and goes on as the final one: :meth:`continue_as_final`),
        ``"final"`` (open the final stage at :attr:`final_prior_std`) or ``"done"`` (no stage has a sample)."""
        stage = self.stage
        stage.val_nll = None if val_nll is None or not math.isfinite(val_nll) else float(val_nll)
        stage.delta, stage.se = (None, None) if delta is None else (float(delta), float(se))
        k = len(self.stages) - 1
        best = None if self.best_stage is None else self.stages[self.best_stage].val_nll
        if self.best_stage is None or stage.samples == 0:
            improved = stage.samples > 0
        elif stage.val_nll is None or best is None:
            improved = False
        else:
            d = stage.val_nll - best if delta is None else float(delta)
            wider = stage.prior_std > self.stages[self.best_stage].prior_std
            improved = d < se if wider else d < -se
        if improved:
            self.best_stage = k
        step = stage.rung + self._direction
        down = (self._direction > 0 and not self._descended and self.best_stage == 0 and k == 1
                and self.stages[0].rung > 0)   # the first step up failed: try below the start
        if not improved and down and budget_left:
            self._direction, self._descended, self.next_rung = -1, True, self.stages[0].rung - 1
            return "next"
        if not improved:
            self.ladder_reason = (f"prior_std {stage.prior_std:g} did not win on the validation NLL of the posterior "
                                  f"average ({_fmt(stage.val_nll)} vs {_fmt(best)}, standard error {se:.4f})")
        elif stage.val_nll is None:
            self.ladder_reason = "no validation predictions to compare prior scales"
        elif not 0 <= step < len(self.prior_stds):
            self.ladder_reason = f"the ladder's end, prior_std {stage.prior_std:g}"
        elif not budget_left:
            self.ladder_reason = "the Trainer's budget left no room for another stage"
        else:
            self.next_rung = step
            return "next"
        self._ladder_done = True
        if self.best_stage is None:
            self.phase = "done"
            return "done"
        return "continue" if self.best_stage == k else "final"

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "planned_steps": self.planned_steps, "best_value": self.best_value,
                "best_step": self.best_step, "wait": self.wait, "checks": self.checks, "triggered": self.triggered,
                "start_step": self.start_step, "start_reason": self.start_reason,
                "stages": [asdict(s) for s in self.stages], "best_stage": self.best_stage,
                "stop_reason": self.stop_reason, "ladder_reason": self.ladder_reason, "ladder_done": self._ladder_done,
                "next_rung": self.next_rung, "direction": self._direction, "descended": self._descended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("phase", "planned_steps", "best_value", "best_step", "wait", "checks", "triggered", "start_step",
                    "start_reason", "best_stage", "stop_reason", "ladder_reason"):
            setattr(self, key, state[key])
        self._ladder_done, self.next_rung = state["ladder_done"], state["next_rung"]
        self._direction, self._descended = state["direction"], state["descended"]
        self.stages = [Stage(**s) for s in state["stages"]]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
