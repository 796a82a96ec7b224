r"""The divergence guard: a Langevin chain that runs away never ends in a silent "success".

A chain whose step is too long for the curvature it meets grows geometrically (ULA's error
multiplies by :math:`|1 - \eta\lambda|` per step along an eigendirection with
:math:`\eta\lambda > 2`) until its loss, its norm or its parameters overflow. The guard watches
cheap statistics at every step's pre-step point (where :math:`\theta` and its gradient agree) and
the parameters after it, and on a runaway returns the chain to its last good snapshot, cuts the
step and warns with the numbers; after ``max_cuts`` cuts it raises :class:`DivergenceError`.

**Statistics** (per step; one host synchronisation), over the sampled tensors with per-group
:math:`\beta_g`, :math:`\lambda_g` and :math:`d = \sum_g d_g` coordinates:

- non-finite parameters after an update (immediate alarm);
- at a step skipped for non-finite gradients (reported by the front-end with
  :meth:`DivergenceGuard.skipped`), the parameters themselves: non-finite, or
  :math:`\lVert\theta\rVert^2` above its single-step threshold, is a runaway; finite parameters in
  range mean a bad batch, not divergence, and nothing is cut (a skipped step counts toward no
  window and no cut; ``max_skips`` of them in a row give one warning that the data or the loss,
  not the chain, is producing them);
- the window mean of :math:`\lVert\theta\rVert^2` above
  ``theta_factor`` :math:`\cdot(\lVert\theta_0\rVert^2 + \sum_g d_g/(\beta_g\lambda_g))`
  (:math:`\theta_0` at the start; the Gibbs measure's prior part has :math:`\mathbb E\lVert\theta\rVert^2`
  of order :math:`\lVert\text{centre}\rVert^2 + d/(\beta\lambda)`);
- the window mean of :math:`U = \hat L_B + \sum_g \tfrac{\lambda_g}{2}\lVert\theta_g - c_g\rVert^2` (the
  minibatch loss the step returned; :math:`c_g` the prior centre, 0 unless one was set) above :math:`U_0` + ``energy_factor``
  :math:`\cdot(\sum_g d_g/(2\beta_g) + |U_0|)` (at stationarity :math:`\mathbb E U - U^* \approx d_{\mathrm{eff}}/(2\beta)`);
- (overdamped chains) the window mean of the virial :math:`\frac1d\sum_g \beta_g(\theta_g - \theta_{g,0})\cdot\nabla U_g`
  above ``virial_limit`` (a kinetic chain's stable transient overshoots its mode and makes it large, so
  kinetic chains are judged by the other statistics): for any fixed :math:`\theta_0` its expectation under :math:`\pi_\beta` is
  exactly 1 (THEORY §3, :math:`\phi = \theta - \theta_0`), ``1 + ρ`` with minibatch noise, and it is
  *negative* while a chain relaxes from :math:`\theta_0` towards the mode, so only a runaway
  drives it far above 1.

Any non-finite statistic, and :math:`\lVert\theta\rVert^2` above its threshold at a single step, is an
alarm at once (a fast runaway does not wait for the window's end); at the end of a run
:meth:`DivergenceGuard.finish` judges the last, partial window. The thresholds are deliberately loose (a runaway is
geometric: a 100× margin costs a few steps of detection, never a false alarm on a stable chain).

**Snapshots.** Every ``snapshot_every`` steps without alarm the guard copies the chain's position
(:meth:`LangevinEngine.snapshot`: work tensors and every per-tensor slot, momenta included); a copy
becomes the *good* one once another ``snapshot_every`` steps have passed without alarm, so the
chain is never returned to a point already on its way out. The position at the start is good.

**Recovery.** :meth:`DivergenceGuard.recover` restores the good snapshot, multiplies the step
factor :attr:`~DivergenceGuard.scale` by ``cut`` (or more: when the front-end can measure the stable
step at the restored point, ``stable_step``, the step goes straight down to it, so a step far too
long is not refused after ``max_cuts`` quarterings that never reached the measurable scale) and warns (:class:`DivergenceWarning`, with the
statistic, its value and threshold, the step and the new factor); the front-end multiplies its
step by :attr:`~DivergenceGuard.scale` (and re-measures :math:`\lambda_{\max}` when automatic).
Past ``max_cuts`` cuts it raises :class:`DivergenceError` instead.

**The optimizers** (:class:`~langevin_lora.LangevinSGD` / :class:`~langevin_lora.LangevinAdam`) hold one
by default (``guard=True``, since issue 19) and need nothing more. To drive your own in a custom loop,
build the optimizer with ``guard=False``::

    guard = DivergenceGuard()
    for batch in loader:
        opt.zero_grad(); loss = loss_fn(batch); loss.backward()
        guard.before_step(opt, loss)
        opt.step()
        guard.after_step(opt)   # on a runaway: restored, every group's lr *= cut, warned
    guard.finish()              # judges the last, partial window

(an LR scheduler that rewrites ``lr`` each step undoes the cut: scale its base rates too.)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
from torch import Tensor

from langevin_lora._docs import readable_docstring
from langevin_lora._validation import check_int, check_positive, check_real
from langevin_lora.core.engine import LangevinEngine, StepGroup
from langevin_lora.core.sharding import global_sums, spec_of

__all__ = ["Divergence", "DivergenceError", "DivergenceGuard", "DivergenceWarning"]


class DivergenceWarning(UserWarning):
    """A Langevin chain ran away: it was returned to its last good position with a shorter step."""


class DivergenceError(RuntimeError):
    """A Langevin chain kept running away after every allowed cut of its step."""


@dataclass
class Divergence:
    """What the guard saw: the statistic (``reason``), its value, the threshold and the step."""

    reason: str
    value: float
    threshold: float
    step: int

    def __str__(self) -> str:
        return f"{self.reason} = {self.value:.4g} (threshold {self.threshold:.4g}) at step {self.step}"


def _wide(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@readable_docstring
class DivergenceGuard:
    """Online detection of a runaway chain, last-good snapshots and step cuts (module docstring).

    Attributes:
        scale: the step factor, ``cut ** cuts``.
        cuts: recoveries so far; ``events``: the :class:`Divergence` of each.
        steps: steps judged by :meth:`check`.
        theta_scale: :math:`\\lVert\\theta_0\\rVert^2 + \\sum_g d_g/(\\beta_g\\lambda_g)`, the unit of the
            :math:`\\lVert\\theta\\rVert^2` threshold.

    Args:
        window: steps per window mean of :math:`\\lVert\\theta\\rVert^2`, :math:`U` and the virial.
        snapshot_every: steps between snapshots (a snapshot becomes good ``snapshot_every`` steps later).
        theta_factor, energy_factor: margins of the :math:`\\lVert\\theta\\rVert^2` and :math:`U` thresholds.
        virial_limit: threshold of the window-mean virial temperature (1 at stationarity).
        max_skips: consecutive steps skipped for non-finite gradients at in-range parameters after
            which one warning says that the data or the loss produce them (no cut: that is not divergence).
        cut: factor applied to the step at each recovery, in (0, 1).
        max_cuts: recoveries allowed; the next runaway raises :class:`DivergenceError`.
        owner: the front-end's name, used in messages.
    """

    def __init__(self, *, window: int = 20, snapshot_every: int = 50, theta_factor: float = 100.0,
                 energy_factor: float = 100.0, virial_limit: float = 20.0, max_skips: int = 3, cut: float = 0.25,
                 max_cuts: int = 5, owner: str = "DivergenceGuard") -> None:
        self.window = check_int("window", window, low=1)
        self.snapshot_every = check_int("snapshot_every", snapshot_every, low=1)
        self.theta_factor = check_real("theta_factor", theta_factor, low=1.0, low_open=True)
        self.energy_factor = check_positive("energy_factor", energy_factor)
        self.virial_limit = check_real("virial_limit", virial_limit, low=1.0, low_open=True)
        self.max_skips = check_int("max_skips", max_skips, low=1)
        self.cut = check_real("cut", cut, low=0.0, high=1.0, low_open=True, high_open=True)
        self.max_cuts = check_int("max_cuts", max_cuts, low=0)
        self.owner = owner
        self.reset()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed chain keeps: the step factor and the cuts so far (the snapshots and window
        statistics are not saved: the guard restarts its references where the run resumes)."""
        return {"scale": self.scale, "cuts": self.cuts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.cuts = float(state["scale"]), int(state["cuts"])

    def reset(self) -> None:
        """Forget the chain: references, windows, snapshots, cuts."""
        self.scale = 1.0
        self.cuts = 0
        self.steps = 0
        self.events: list[Divergence] = []
        self._engine: LangevinEngine | None = None
        self._params: dict[Hashable, Tensor] = {}
        self._good: Any = None
        self._candidate: Any = None
        self._good_step = self._candidate_step = 0
        self._ref: dict[Hashable, Tensor] | None = None
        self._limits: dict[str, float] = {}
        self.theta_scale = math.nan   # |theta_0|^2 + sum_g d_g / (beta_g lambda_g), set by start()
        self._dims = 0
        self._kinetic = False
        self._u0: float | None = None
        self._skips = 0
        self._pending: Tensor | None = None
        self._skipped_before = 0
        self._clear_window()

    def _clear_window(self) -> None:
        self._sums = [0.0, 0.0, 0.0]
        self._counts = [0, 0, 0]

    @property
    def started(self) -> bool:
        return self._ref is not None

    # -- start --------------------------------------------------------------------------------------
    def start(self, engine: LangevinEngine, params: Mapping[Hashable, Tensor], groups: Sequence[StepGroup]) -> None:
        """Take the references at the chain's start: the work tensors of ``params`` (key -> parameter)
        are :math:`\\theta_0`, the first (good) snapshot, and the thresholds follow from ``groups``'
        :math:`\\beta` and :math:`\\lambda` (see the module docstring)."""
        self._engine, self._params = engine, dict(params)
        self._good, self._good_step = engine.snapshot(self._params), self.steps
        self._candidate = None
        self._ref = {k: engine.work_tensor(k, p).detach().clone() for k, p in self._params.items()}
        theta0 = sum(float(_wide(w).square().sum()) for w in self._ref.values())
        if engine.sharded:   # |theta_0|^2 over every shard; dimensions of the unsharded tensors
            specs = engine.specs(self._ref)
            theta0 = self._sum_sq(list(self._ref.values()), specs)
        spread, energy, dims = 0.0, 0.0, 0
        for g in groups:
            n = sum(w.numel() if s is None else s.global_numel for w, s in zip(g.works, engine.specs(g.keys)))
            if math.isinf(g.beta) or n == 0:
                continue
            dims += n
            energy += n / (2.0 * g.beta)
            spread += n / (g.beta * g.weight_decay) if g.weight_decay > 0 else math.inf
        self._dims = dims
        # A kinetic chain started away from its mode overshoots: (theta - theta_0) . grad U turns positive and
        # large in a stable transient (excess energy beta * dU / d), so the virial is judged for overdamped
        # chains only; |theta|^2, U and finiteness watch kinetic ones.
        self._kinetic = any(getattr(g, "friction", None) is not None for g in groups)
        self.theta_scale = theta0 + spread
        self._limits = {"theta_sq": self.theta_factor * self.theta_scale, "energy_scale": energy}
        self._u0 = None
        self._skips = 0
        self._clear_window()

    @staticmethod
    def _sum_sq(works: Sequence[Tensor], specs: Sequence[Any]) -> float:
        """:math:`\sum\lVert w\rVert^2` over the unsharded tensors (sharded ones reduced over their group)."""
        parts = [_wide(w).double().square().sum() if w.numel() else torch.zeros((), dtype=torch.float64,
                                                                                 device=w.device) for w in works]
        zero = torch.zeros(1, dtype=torch.float64, device=works[0].device if works else "cpu")
        sharded = zero + sum((t for t, s in zip(parts, specs) if s is not None), zero)
        replicated = zero + sum((t for t, s in zip(parts, specs) if s is None), zero)
        return float(global_sums(sharded, replicated, specs))

    def mark_good(self) -> None:
        """Take the current position as the good snapshot (e.g. after the front-end changed the
        preconditioner: an older snapshot would bring the old one back)."""
        self._good, self._good_step = self._engine.snapshot(self._params), self.steps
        self._candidate = None

    # -- per step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, groups: Sequence[StepGroup], loss: Tensor | float | None = None) -> None:
        """Record the pre-step statistics of ``groups`` (work tensors, gradients, :math:`\\beta`,
        :math:`\\lambda`) and the step's minibatch ``loss`` (``None``: no energy statistic); they are
        judged by the next :meth:`check`."""
        if self._ref is None:
            raise RuntimeError(f"{self.owner}: DivergenceGuard.observe before start")
        works = [w for g in groups for w in g.works]
        if not works:
            return
        zero = torch.zeros((), dtype=torch.float64, device=works[0].device)
        sq, virial, prior = zero, zero, zero
        sharded = self._engine.sharded
        if sharded:   # sums over the local shards, then over the ranks (global_sums)
            parts, specs = torch.zeros(2, 3, dtype=torch.float64, device=zero.device), []
        for g in groups:
            centres = self._engine.prior_centres(g.keys, g.works) or [None] * len(g.works)
            for key, w, grad, c in zip(g.keys, g.works, g.grads, centres):
                w, grad = _wide(w), _wide(grad)
                if sharded:
                    spec = self._engine.shards.get(key)
                    specs.append(spec)
                    sq, virial, prior = zero, zero, zero
                sq = sq + w.square().sum().double()
                shift = w if c is None else w - _wide(c)   # theta - centre: the prior's force is lambda * shift
                if g.weight_decay:
                    prior = prior + shift.square().sum().double() * (g.weight_decay / 2)
                ref = self._ref.get(key)
                if ref is not None and not math.isinf(g.beta):
                    force = grad.add(shift, alpha=g.weight_decay) if g.weight_decay else grad
                    virial = virial + (w - ref).mul_(force).sum().double() * g.beta
                if sharded:
                    parts[0 if spec is not None else 1] += torch.stack([sq, virial, prior])
        if sharded:
            sq, virial, prior = global_sums(parts[0], parts[1], specs).unbind()
        nan = torch.full((), math.nan, dtype=torch.float64, device=zero.device)
        if loss is None:
            energy = nan
        else:
            lval = loss.detach().reshape(()).to(zero) if torch.is_tensor(loss) else zero + float(loss)
            energy = lval + prior
        self._pending = torch.stack([sq, virial / self._dims if self._dims else nan, energy])

    @torch.no_grad()
    def skipped(self) -> Divergence | None:
        r"""Report a step skipped for non-finite gradients. A bad batch is not divergence: the step counts
        toward no window and no cut. The parameters are judged instead: non-finite, or
        :math:`\lVert\theta\rVert^2` above the single-step threshold (the chain ran away and its loss
        overflowed) is a runaway, returned as a :class:`Divergence`."""
        self._pending = None
        self._skips += 1
        if self._ref is not None and self._params:
            works = [_wide(self._engine.work_tensor(k, p)) for k, p in self._params.items()]
            if self._engine.sharded:
                sq = self._sum_sq(works, self._engine.specs(self._params))
            else:
                sq = float(torch.stack(torch._foreach_norm(works)).double().square().sum())
            if not math.isfinite(sq):
                return self._event("|theta|^2 at a step with non-finite gradients (non-finite parameters)", sq, math.inf)
            if sq > self._limits["theta_sq"]:
                return self._event("|theta|^2 at a step with non-finite gradients", sq, self._limits["theta_sq"])
        if self._skips == self.max_skips:
            warnings.warn(f"{self.owner}: {self._skips} consecutive steps with non-finite gradients at finite parameters "
                          f"in range (|theta|^2 below {self._limits.get('theta_sq', math.inf):.4g}): a bad batch or loss, "
                          "not a divergence of the chain; nothing was cut. Check the data (NaN/inf inputs, empty "
                          "sequences) or the loss.", DivergenceWarning, stacklevel=3)
        return None

    @torch.no_grad()
    def check(self, works: Sequence[Tensor] | None = None) -> Divergence | None:
        """After a step: judge the statistics recorded by :meth:`observe` and, when ``works`` (the
        updated work tensors) are given, their finiteness. Returns the :class:`Divergence` or ``None``;
        counts the step and takes the snapshots that are due when all is well."""
        self.steps += 1
        self._skips = 0
        values = [math.nan, math.nan, math.nan]
        post = math.inf
        if works and self._engine is not None and self._engine.sharded:   # |theta|^2 over every shard
            post_sq = self._sum_sq(works, [spec_of(w) for w in works])
            if self._pending is not None:
                values, post = self._pending.tolist(), post_sq
                self._pending = None
            else:
                post = post_sq
        elif self._pending is not None:
            stats = self._pending
            if works:
                norms = torch._foreach_norm([_wide(w) for w in works])
                stats = torch.cat([stats, torch.stack(norms).square().sum().double().reshape(1).to(stats.device)])
            got = stats.tolist()
            values, post = got[:3], (got[3] if works else 0.0)
            self._pending = None
        elif works:
            post = float(torch.stack(torch._foreach_norm([_wide(w) for w in works])).square().sum())
        if works and not math.isfinite(post):
            return self._event("|theta|^2 after the update (non-finite parameters)", post, math.inf)
        if values[0] > self._limits["theta_sq"]:   # a fast runaway need not wait for the window's end
            return self._event("|theta|^2", values[0], self._limits["theta_sq"])
        names = ("window mean of |theta|^2", "window mean of the virial beta*T_virial", "window mean of U")
        for i, (name, value) in enumerate(zip(names, values)):
            if i == 2 and math.isnan(value):
                continue  # no loss given
            if i == 1 and ((math.isnan(value) and not self._dims) or self._kinetic):
                continue  # noise-free chain: no virial; kinetic chain: not judged (see start())
            if not math.isfinite(value):
                return self._event(name.replace("window mean of ", ""), value, math.inf)
            self._sums[i] += value
            self._counts[i] += 1
        if self._u0 is None and not math.isnan(values[2]):
            self._u0 = values[2]
        if self._counts[0] >= self.window or self._counts[2] >= self.window:
            event = self._judge_window(names)
            if event is not None:
                return event
        if self.steps % self.snapshot_every == 0:
            if self._candidate is not None:
                self._good, self._good_step = self._candidate, self._candidate_step
            self._candidate, self._candidate_step = self._engine.snapshot(self._params), self.steps
        return None

    def finish(self) -> Divergence | None:
        """End of the run: judge the last, partial window; on a runaway return the chain to the good
        snapshot and warn (there is no later step to cut). Returns the :class:`Divergence` or ``None``."""
        if self._ref is None or not any(self._counts):
            return None
        names = ("window mean of |theta|^2", "window mean of the virial beta*T_virial", "window mean of U")
        event = self._judge_window(names)
        if event is not None:
            self.events.append(event)
            self._engine.restore(self._good, self._params)
            warnings.warn(f"{self.owner}: the Langevin chain ran away in its last steps: {event}. The parameters were "
                          f"returned to the last good snapshot (step {self._good_step}); samples taken after it may "
                          "come from the runaway.", DivergenceWarning, stacklevel=2)
        return event

    def _judge_window(self, names: tuple[str, str, str]) -> Divergence | None:
        means = [s / c if c else math.nan for s, c in zip(self._sums, self._counts)]
        self._clear_window()
        limits = [self._limits["theta_sq"], self.virial_limit, math.inf]
        if self._u0 is not None:
            limits[2] = self._u0 + self.energy_factor * (self._limits["energy_scale"] + abs(self._u0))
        for name, mean, limit in zip(names, means, limits):
            if not math.isnan(mean) and mean > limit:
                return self._event(name, mean, limit)
        return None

    def _event(self, reason: str, value: float, threshold: float) -> Divergence:
        return Divergence(reason, value, threshold, self.steps)

    # -- recovery -----------------------------------------------------------------------------------
    def recover(self, event: Divergence, *, step_size: float | None = None,
                stable_step: Callable[[], float | None] | None = None) -> float:
        """Return the chain to the good snapshot and cut the step: :attr:`scale` is multiplied by ``cut``
        and returned; a :class:`DivergenceWarning` says what happened (``step_size``, the step in use,
        is quoted). ``stable_step``: called after the restore, the step measured there (e.g.
        :func:`~langevin_lora.core.step_size.auto_step_size`'s, ``None`` when it cannot be measured); when the
        cut step is still longer, the step goes down to it in this one cut. Raises
        :class:`DivergenceError` after ``max_cuts`` cuts."""
        self.events.append(event)
        if self.cuts >= self.max_cuts:
            raise DivergenceError(
                f"{self.owner}: the Langevin chain ran away again ({event}) after {self.cuts} step cuts (step factor "
                f"{self.scale:.3g}{'' if step_size is None else f', step {step_size:.3g}'}); it cannot be stabilised "
                "by a shorter step. Check the loss and the prior (weight_decay > 0), or lower the temperature.")
        self._engine.restore(self._good, self._params)
        self._candidate = None
        self._pending = None
        self._skips = 0
        self._clear_window()
        self.cuts += 1
        factor = self.cut
        measured = ""
        if stable_step is not None and step_size is not None and step_size > 0:
            stable = stable_step()
            if stable is not None and math.isfinite(stable) and 0 < stable < step_size * self.cut:
                factor = stable / step_size
                measured = f", the stable step measured at the restored point {stable:.3g}"
        self.scale *= factor
        new = "" if step_size is None else f"; step {step_size:.3g} -> {step_size * factor:.3g}{measured}"
        warnings.warn(f"{self.owner}: the Langevin chain diverged: {event}. Returned to the last good snapshot (step "
                      f"{self._good_step}) and "
                      f"cut the step by {factor:.3g} (cut {self.cuts} of {self.max_cuts}, step factor "
                      f"{self.scale:.3g}{new}).", DivergenceWarning, stacklevel=3)
        return self.scale

    # -- custom loops with a LangevinOptimizer ------------------------------------------------------
    def _optimizer_groups(self, opt: Any) -> list[StepGroup]:
        groups = []
        for group in opt.param_groups:
            if not group.get("sampling", True):
                continue
            groups.append(opt.engine.gather(group["params"], lr=group["lr"], beta=opt.group_beta(group),
                                            weight_decay=group["weight_decay"]))
        return groups

    def before_step(self, opt: Any, loss: Tensor | float | None = None) -> None:
        """Custom loops: record the pre-step statistics of a :class:`~langevin_lora.optim.base.LangevinOptimizer`
        (its sampling groups' gradients must be in ``.grad``); starts the guard at the first call."""
        groups = self._optimizer_groups(opt)
        if not self.started:
            params = {p: p for g in groups for p in g.params}
            if not params:
                return
            self.start(opt.engine, params, groups)
        self._skipped_before = opt.engine.skipped_steps
        self.observe(groups, loss)

    def after_step(self, opt: Any) -> Divergence | None:
        """Custom loops: judge the step just taken by ``opt``; on a runaway restore, multiply every
        group's ``lr`` by ``cut`` and warn (:meth:`recover`), or raise :class:`DivergenceError`."""
        if not self.started:
            return None
        if opt.engine.skipped_steps > self._skipped_before:
            event = self.skipped()   # the optimizer skipped the step (non-finite gradient)
        else:
            event = self.check([opt.engine.work_tensor(p, p) for p in self._params])
        if event is not None:
            lr = opt.param_groups[0]["lr"]
            before = self.scale
            self.recover(event, step_size=float(lr))
            for group in opt.param_groups:
                group["lr"] = group["lr"] * (self.scale / before)
        return event
