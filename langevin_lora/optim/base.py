"""The torch.optim front-end of the sampling engine (:mod:`langevin_lora.core.engine`): every
hyperparameter in the param group, the engine's per-tensor state in ``Optimizer.state``."""
from __future__ import annotations

import io
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from langevin_lora._validation import check_bool, check_choice, check_non_negative, check_positive, warn_deprecated
from langevin_lora.core.curvature import RngSnapshot
from langevin_lora.core.engine import EngineFrontEnd, LangevinEngine, NonFiniteGradientWarning, StepGroup
from langevin_lora.core.functional import FRICTION_AUTO, check_friction
from langevin_lora.core.guard import DivergenceGuard
from langevin_lora.core.sharding import is_sharded, local_tensor
from langevin_lora.core.step_size import AutoStepSize, NonFiniteLossError, StepSizeWarning, step_from_lambda_max
from langevin_lora.core.temperature import PRIOR_CENTRES, check_proper_prior, effective_beta, resolve_base_beta
from langevin_lora.core.view import LangevinGroupView

__all__ = ["LangevinOptimizer", "NonFiniteGradientWarning", "RENAMED", "STEP_SIZES"]

#: Keyword arguments and param-group keys of release 0.1, renamed to the vocabulary that
#: :class:`~langevin_lora.LangevinLoRA` uses (burn-in, preconditioner adaptation). The old names
#: still work for one release, with a :class:`DeprecationWarning`.
RENAMED = {"warmup_steps": "burn_in_steps", "adapt_steps": "precond_adapt_steps"}
#: ``prior_centre`` values of release 0.1 -> :data:`~langevin_lora.core.temperature.PRIOR_CENTRES`
#: (``None`` stays accepted for ``"zero"``; ``"start"`` warns).
_RENAMED_CENTRES = {"start": "burn_in"}


def renamed_keys(mapping: dict[str, Any], owner: str) -> dict[str, Any]:
    """``mapping`` with the names of :data:`RENAMED` replaced by the new ones (a warning each).
    Both spellings at once is an error: which one was meant is unknowable."""
    out = dict(mapping)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"Invalid arguments to {owner}: both {old!r} and {new!r} given; {old!r} is the "
                             f"name before release 0.2, pass only {new!r}")
        warn_deprecated(f"{owner}: {old!r} is now called {new!r} (the vocabulary of LangevinLoRA); the old name "
                        "is removed in release 0.3")
        out[new] = out.pop(old)
    return out


def check_prior_centre(value: Any, owner: str) -> str:
    """One of :data:`PRIOR_CENTRES` (``None`` is ``"zero"``; release 0.1's ``"start"`` warns)."""
    if value is None:
        return "zero"
    if value in _RENAMED_CENTRES:
        warn_deprecated(f"{owner}: prior_centre={value!r} is now spelled {_RENAMED_CENTRES[value]!r} (the "
                        "vocabulary of LangevinLoRA); the old spelling is removed in release 0.3")
        return _RENAMED_CENTRES[value]
    return check_choice("prior_centre", value, PRIOR_CENTRES)


#: ``step_size`` of an optimizer: ``"auto"`` (measured from ``step(closure)``), ``"lr"`` (each group's
#: ``lr`` is the Langevin step) or a float (the Langevin step at sampling start).
STEP_SIZES = ("auto", "lr")


def check_step_size(step_size: Any) -> str | float:
    if isinstance(step_size, str):
        return check_choice("step_size", step_size, STEP_SIZES)
    try:
        return check_positive("step_size", step_size)
    except ValueError:
        raise ValueError(f"Invalid step_size: {step_size!r} (expected 'auto', 'lr' or a finite float > 0)") from None


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
                 beta: float | None, seed: int | None, nonfinite: str, step_size: float | str = "lr",
                 step_safety: float | None = None, step_size_every_n_steps: int = 1000,
                 guard: bool | DivergenceGuard = True) -> None:
        base_beta = resolve_base_beta(num_data, beta)
        defaults = dict(defaults, base_beta=base_beta)
        owner = type(self).__name__
        self.step_size = check_step_size(step_size)
        self.auto_step = AutoStepSize(safety=step_safety, every_n_steps=step_size_every_n_steps)
        if not isinstance(guard, (bool, DivergenceGuard)):
            raise ValueError(f"Invalid guard: {guard!r} (expected True, False or a langevin_lora.DivergenceGuard)")
        self.guard = DivergenceGuard(owner=owner) if guard is True else guard or None
        self.engine = LangevinEngine(seed=seed, nonfinite=nonfinite, owner=owner)
        self._base_step: float | None = None   # the measured (auto) or given (float) step at sampling start
        self._langevin_steps = 0                # noisy/sampling steps taken (re-measurement cadence)
        self._warned_no_closure = False
        self._remeasure = False                  # G was re-frozen: measure again at the next closure
        super().__init__(params, defaults)
        self.engine.state = self.state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "engine" in self.__dict__:   # load_state_dict replaces self.state: the engine follows
            self.engine.state = self.state

    # -- validation of every group, including ones added later or overridden by the user ----------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(renamed_keys(param_group, type(self).__name__))
        try:
            self._validate_group(self.param_groups[-1])
            if hasattr(self, "engine"):   # sharded (FSDP2) parameters: known before any freeze
                self.engine.track({p: p for p in self.param_groups[-1]["params"]})
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
        group["prior_centre"] = check_prior_centre(group.get("prior_centre"), type(self).__name__)

    @staticmethod
    def group_beta(group: dict[str, Any]) -> float:
        r"""Inverse temperature :math:`\beta = \beta_0 / T` of a param group (``inf`` at ``T = 0``)."""
        return effective_beta(group["base_beta"], group["temperature"])

    def work_tensor(self, p: Tensor) -> Tensor:
        """The tensor updated for ``p``: its fp32 master copy (fp16/bf16), else ``p``."""
        return self.engine.work_tensor(p, p)

    # -- the step size -----------------------------------------------------------------------
    def _is_sampling(self, group: dict[str, Any]) -> bool:
        return group.get("sampling", True)

    def _friction_of(self, group: dict[str, Any]) -> float | str | None:
        """``friction="auto"`` damps the thermal prior-dominated modes; a noise-free group (``temperature=0``,
        e.g. the head of :func:`~langevin_lora.lora_param_groups`) has none and steps overdamped (descent)."""
        friction = group["friction"]
        if friction == FRICTION_AUTO and group["temperature"] == 0:
            return None
        return friction

    def group_step(self, group: dict[str, Any]) -> float:
        r"""The Langevin step of ``group`` now: ``lr`` before sampling (Adam's burn-in), for noise-free
        groups and with ``step_size="lr"``; else the measured (``"auto"``) or given (float) step at sampling
        start times :math:`\mathrm{lr}_t/\mathrm{lr}_{t_0}` (your LR schedule, relative to its value when
        sampling started). Times the divergence guard's cut factor while sampling."""
        lr = group["lr"]
        if not self._is_sampling(group):
            return lr
        if self.step_size != "lr" and group["temperature"] > 0 and self._base_step is not None:
            lr0 = group.get("sampling_lr0") or lr
            lr = self._base_step * lr / lr0
        return lr * (self.guard.scale if self.guard is not None else 1.0)

    def _gather(self, i: int, group: dict[str, Any]) -> StepGroup:
        return self.engine.gather(group["params"], lr=self.group_step(group), beta=self.group_beta(group),
                                  weight_decay=group["weight_decay"], foreach=group["foreach"],
                                  friction=self._friction_of(group), name=str(i))

    def _noisy(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """The sampling groups at a finite temperature, with their parameters."""
        return [(g, list(g["params"])) for g in self.param_groups if self._is_sampling(g) and g["temperature"] > 0]

    def _measure_due(self) -> bool:
        if self.step_size != "auto" or not self._noisy():
            return False
        return self._base_step is None or self._remeasure or self.auto_step.due(self._langevin_steps)

    def _measure(self, closure: Callable[[], Any], rng: RngSnapshot | None, *, cold: bool = False) -> float | None:
        r"""Measure :math:`\lambda_{\max}(G^{1/2}\nabla^2U G^{1/2})` of the noisy sampling groups from the
        torch closure (finite differences of the gradients it leaves in ``.grad``, the dropout masks of
        this step replayed) at the current parameters; every ``.grad`` is restored. Returns the step."""
        noisy = self._noisy()
        params, scale, decay = [], [], []
        for group, ps in noisy:
            G = self.engine.preconditioners(ps)
            params += ps
            scale += G if G is not None else [1.0] * len(ps)
            decay += [group["weight_decay"]] * len(ps)
        friction = next((f for f in (self._friction_of(g) for g, _ in noisy) if f is not None), None)
        if friction == FRICTION_AUTO:
            friction = 1.0   # only kinetic or not matters to the step rule
        every = [p for g in self.param_groups for p in g["params"]]
        saved = [p.grad for p in every]
        masters = {p: self.engine.work_tensor(p, p) for p in params}
        try:
            if rng is None:
                rng = RngSnapshot()
            with rng.replaying() as replay:
                est = self.auto_step.measure(replay(closure), params, precond=scale, weight_decay=decay,
                                             friction=friction, cold=cold, backward_closure=True)
        finally:
            for p, g in zip(every, saved):
                p.grad = g
            for p, w in masters.items():   # finite differences moved p, not its fp32 master: resync
                if is_sharded(p):   # its local shard from the shard's master (a bf16 shard)
                    if w.dtype != p.dtype:
                        local_tensor(p).copy_(w)
                elif w is not p:
                    p.copy_(w)
        lam = est.lambda_max
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every replica must take the same step (their probe batches differ): the largest lambda_max
            t = torch.tensor(lam, dtype=torch.float64, device=params[0].device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            lam = float(t)
            self.auto_step.lambda_max = lam
            self.auto_step.step_size = step_from_lambda_max(lam, friction=friction, safety=self.auto_step.safety)
        self._remeasure = False
        return self.auto_step.step_size

    def _start_steps(self, closure: Callable[[], Any] | None, rng: RngSnapshot | None) -> None:
        """At a sampling step, before the update: the step size at sampling start and when re-measurement
        is due (``"auto"``; a warning before the first noisy step when there is no closure), and each
        group's lr at sampling start (the LR schedule's reference)."""
        for group, _ in self._noisy():
            group.setdefault("sampling_lr0", group["lr"])
        if self._base_step is None and isinstance(self.step_size, float):
            self._base_step = self.step_size
        if not self._measure_due():
            return
        if closure is None:
            if self._base_step is None and not self._warned_no_closure:
                self._warned_no_closure = True
                lrs = sorted({g["lr"] for g, _ in self._noisy()})
                warnings.warn(
                    f"{type(self).__name__}: step_size='auto' measures the Langevin step from a closure, and step() got "
                    f"none: this first noisy step and the next ones use lr={lrs[0]:.3g} as the Langevin step, unmeasured "
                    "(an optimizer's lr is usually far too long for a chain; the divergence guard will cut it). Pass "
                    "the closure: opt.step(closure) with closure() = zero_grad, loss on the batch, loss.backward(), "
                    "return loss (at least at the first sampling step); or pass step_size=<float> or 'lr' to choose "
                    "the step yourself.", StepSizeWarning, stacklevel=4)
            return
        self._base_step = self._measure(closure, rng, cold=self._base_step is None)

    def _stable_step(self, closure: Callable[[], Any] | None, rng: RngSnapshot | None) -> Callable[[], float | None] | None:
        """For the guard's recovery: the stable step measured at the restored point (``None`` without a closure)."""
        if closure is None or not self._noisy():
            return None

        def measure() -> float | None:
            try:
                est = self._measure(closure, rng, cold=True)
            except (NonFiniteLossError, ValueError):
                return None
            group = self._noisy()[0][0]
            # in units of the first noisy group's step now (group_step), whatever the mode
            lr0 = group.get("sampling_lr0") or group["lr"]
            return est * group["lr"] / lr0
        return measure

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is None and self.engine.sharded and not self.state and all(
                g["lr"] == 0 for g in self.param_groups):
            # torch.distributed.checkpoint.state_dict's _init_optim_state: a step at lr 0 on zero gradients to
            # create the per-tensor state before a checkpoint is loaded. Sharded, this optimizer keeps its
            # state in SHARDED_STATE_KEY (state_dict), which needs no such step: nothing moves, nothing is drawn.
            return None
        rng = RngSnapshot() if closure is not None and self._measure_due_soon() else None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._closure, self._rng, self._loss = closure, rng, loss
        try:
            batches = [self._gather(i, group) for i, group in enumerate(self.param_groups)]
            if self.engine.check_finite([g for b in batches for g in b.grads], stacklevel=4):
                self._update(batches)
            elif self.guard is not None and self.guard.started:
                event = self.guard.skipped()   # judges the parameters: a bad batch is not a divergence
                if event is not None:
                    self._recover(event)
        finally:
            self._closure = self._rng = self._loss = None
        return loss

    def _measure_due_soon(self) -> bool:
        """Whether this step may measure (so its dropout masks are worth a snapshot): ``"auto"`` and the first
        sampling step or a re-measurement is near."""
        if self.step_size != "auto":
            return False
        if self._base_step is None:
            return True
        return self.auto_step.due(self._langevin_steps) or self.guard is not None

    def _update(self, batches: list[StepGroup]) -> None:
        """Update every group (``batches[i]`` belongs to ``self.param_groups[i]``)."""
        raise NotImplementedError

    def _langevin_step(self, pairs: list[tuple[dict[str, Any], StepGroup]], *, before: Callable[[], None] | None = None) -> None:
        """The engine step of the sampling groups ``pairs`` with the step size, the guard and the
        re-measurement around it. ``before`` runs after the step size is set (e.g. adaptation sums)."""
        closure, rng = self._closure, self._rng
        self._start_steps(closure, rng)
        for group, batch in pairs:
            batch.lr = self.group_step(group)
        if before is not None:
            before()
        guard = self.guard if self._noisy() else None   # a noise-free run has no chain to guard
        if guard is not None:
            if not guard.started:
                guard.start(self.engine, {p: p for _, b in pairs for p in b.params}, [b for _, b in pairs])
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            guard.observe([b for _, b in pairs], None if distributed else self._loss)   # ranks must decide alike
        self.engine.step([b for _, b in pairs])
        self._langevin_steps += 1
        if guard is not None:
            event = guard.check([w for _, b in pairs for w in b.works])
            if event is not None:
                self._recover(event)

    def _recover(self, event: Any) -> None:
        """The guard saw a runaway: restore, cut (straight to the measured stable step when a closure allows
        it), re-measure under ``"auto"``; :class:`~langevin_lora.DivergenceError` past the last cut."""
        noisy = self._noisy()
        step = self.group_step(noisy[0][0]) if noisy else None
        auto = self.step_size == "auto" and self._closure is not None
        self.guard.recover(event, step_size=step, stable_step=None if auto else self._stable_step(self._closure, self._rng))
        if auto:
            try:
                self._base_step = self._measure(self._closure, self._rng)
            except ValueError:   # unmeasurable at the restored point (e.g. a non-finite probe loss): keep the base
                pass

    def _centre_priors(self, groups: Iterable[dict[str, Any]]) -> None:
        """``prior_centre="burn_in"``: centre the prior of every tensor of ``groups`` (sampling now) that has
        no centre yet at its current value (the first sampling step's pre-step point)."""
        for group in groups:
            if group["prior_centre"] != "burn_in":
                continue
            todo = [p for p in group["params"] if "prior_centre" not in self.state.get(p, {})]
            if todo:
                self.engine.set_prior_centre(todo, [self.engine.work_tensor(p, p) for p in todo])

    def langevin_groups(self) -> list[LangevinGroupView]:
        """The :class:`~langevin_lora.core.view.LangevinGroupView` of every param group (for diagnostics)."""
        views = []
        for i, group in enumerate(self.param_groups):
            params = list(group["params"])
            friction = self.engine.friction(StepGroup(params, [], [], [], weight_decay=group["weight_decay"],
                                                      friction=self._friction_of(group), name=str(i)))
            views.append(LangevinGroupView(
                name=group.get("name", f"group{i}"), params=params, lr=self.group_step(group),
                beta=self.group_beta(group), weight_decay=group["weight_decay"],
                precond=self.engine.preconditioners(params), sampling=group.get("sampling", True),
                friction=friction, momentum=self.engine.momenta(params) if friction is not None else None,
                prior_centre=self.engine.prior_centres(params, params)))
        return views

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``"langevin"`` (generators, step size, guard). With sharded (FSDP2)
        parameters the whole state travels unsharded in ``param_groups[0][SHARDED_STATE_KEY]``
        (:meth:`_sharded_state_dict`; a collective: every rank calls it)."""
        state = super().state_dict()
        state["langevin"] = self.engine.state_dict(per_tensor=False)
        state["langevin"]["step_size"] = {
            "base": self._base_step, "langevin_steps": self._langevin_steps, "auto": self.auto_step.state_dict(),
            "warned_no_closure": self._warned_no_closure,
            "guard": None if self.guard is None else {"scale": self.guard.scale, "cuts": self.guard.cuts}}
        if self.engine.sharded:
            state = self._sharded_state_dict(state)
        return state

    #: ``param_groups[0]`` key of a sharded optimizer's state, and the key of its placeholder tensors in
    #: ``state`` (:meth:`_sharded_state_dict`).
    SHARDED_STATE_KEY, SHARDED_DEVICE_KEY = "langevin_state", "langevin_state_device"

    def _sharded_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        r"""The state of an optimizer over sharded (FSDP2 / DTensor) parameters, in a form that survives
        ``torch.distributed.checkpoint.state_dict`` (what Lightning's ``ModelParallelStrategy`` saves and
        loads through): that API keeps only ``state`` and ``param_groups``, saves plain tensors of
        ``state`` as replicated (the local shards would be lost) and builds its loading template from a
        zero-lr step (whose state lacks what only sampling creates). So everything (per-tensor state
        gathered to full tensors, keyed by position, and ``"langevin"``) is serialised into one ``bytes``
        value of ``param_groups[0]``, the same on every rank, loaded back whole by the sharded (DCP) and
        the full checkpoint alike; the checkpoint does not depend on the sharding. ``state`` holds only
        a 1-element placeholder tensor per parameter (torch's loaders want a state for every parameter
        that requires a gradient, and a tensor to find the device; Lightning's rekeying, a non-empty
        ``state``)."""
        params = [p for g in self.param_groups for p in g["params"]]
        index = {p: i for i, p in enumerate(params)}
        per_tensor = {index[p]: {n: t.detach().cpu() if torch.is_tensor(t) else t for n, t in slot.items()}
                      for p, slot in self.engine.state_dict()["state"].items()}   # gathered unsharded, cloned
        buffer = io.BytesIO()
        torch.save({"state": per_tensor, "langevin": state.pop("langevin")}, buffer)
        groups = [dict(g) for g in state["param_groups"]]
        groups[0][self.SHARDED_STATE_KEY] = buffer.getvalue()
        marker = {i: {self.SHARDED_DEVICE_KEY: torch.zeros(1, device=params[0].device)}
                  for g in groups for i in g["params"]}
        return {"state": marker, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        sharded = next((g[self.SHARDED_STATE_KEY] for g in state_dict["param_groups"] if self.SHARDED_STATE_KEY in g),
                       None)
        if sharded is not None:   # _sharded_state_dict's form: unpack, then load as usual, then place the shards
            payload = torch.load(io.BytesIO(sharded), map_location="cpu", weights_only=True)
            state_dict["param_groups"] = [{k: v for k, v in g.items()
                                           if k not in (self.SHARDED_STATE_KEY, self.SHARDED_DEVICE_KEY)}
                                          for g in state_dict["param_groups"]]
            state_dict["state"], state_dict["langevin"] = {}, payload["langevin"]
        with warnings.catch_warnings():   # a checkpoint of release 0.1: its names, translated silently
            warnings.simplefilter("ignore", DeprecationWarning)
            state_dict["param_groups"] = [
                dict(renamed_keys(g, type(self).__name__), prior_centre=check_prior_centre(g.get("prior_centre"), ""))
                if "prior_centre" in g else renamed_keys(g, type(self).__name__) for g in state_dict["param_groups"]]
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
            extra = dict(extra)
            step = extra.pop("step_size", None)
            self.engine.load_state_dict(extra)
            if step is not None:
                self._base_step = step["base"]
                self._langevin_steps = int(step["langevin_steps"])
                self.auto_step.load_state_dict(step["auto"])
                self._warned_no_closure = bool(step["warned_no_closure"])
                if self.guard is not None and step["guard"] is not None:
                    # the guard restarts its windows and snapshots at the next sampling step
                    self.guard.reset()
                    self.guard.scale, self.guard.cuts = float(step["guard"]["scale"]), int(step["guard"]["cuts"])
        if sharded is not None:   # the full per-tensor state, each rank keeping its slices (engine.bind)
            params = [p for g in self.param_groups for p in g["params"]]
            self.state.clear()
            for i, slot in payload["state"].items():
                self.state[params[int(i)]] = dict(slot)
            self.engine.bind({p: p for p in params if p in self.state})
