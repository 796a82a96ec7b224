r"""``GibbsDiagnostics``: the Lightning callback that watches a Langevin chain and tells whether it
samples :math:`\pi_\beta`.

It only translates Lightning's hooks: it finds the sampler (a callback with ``langevin_groups()``,
e.g. :class:`~langevin_lora.LangevinLoRA`, else the optimizer, e.g. :class:`~langevin_lora.LangevinSGD`),
feeds every optimizer step to a :class:`~langevin_lora.diagnostics.GibbsRecorder` at the point where
:math:`\theta` and its gradient agree (the final gradient, before the Langevin step), runs the
:class:`~langevin_lora.diagnostics.probes.CurvatureProbes` on a replay of the training step, logs
the window means, and writes a :func:`~langevin_lora.diagnostics.stationarity_report` at the end
of ``fit``.

Cadences (defaults keep the overhead of the MiniLM recipe under 3%, see
``benchmarks/bench_diagnostics_overhead.py``: on a CPU one Hutchinson probe costs about 3.5 training
steps of MiniLM and a 10-product power iteration about 20, hence every 400 and every 4000 steps):

- every sampling step (free: no extra forward pass): the recorder's estimators, and with
  ``accumulate_grad_batches >= 2`` the noise ratio :math:`\rho` and an unbiased
  :math:`\lVert\nabla U\rVert^2` from the micro-batch gradients;
- every ``log_every_n_steps`` steps: the window means are logged (one host sync);
- every ``hvp_every_n_steps``: one Hutchinson probe of :math:`\Delta U` (configurational temperature);
- every ``lambda_max_every_n_steps``: :math:`\eta\lambda_{\max}` by ``power_iters`` steps of power
  iteration (warm-started), with a :class:`StepSizeWarning` above ``step_size_warning``.

**Logging.** Every ``log_every_n_steps`` the means go to ``trainer.callback_metrics`` through
``pl_module.log_dict(..., logger=False)`` from ``on_train_batch_end`` (so ``ModelCheckpoint`` or
``EarlyStopping`` may monitor them) and to the Trainer's loggers with ``logger.log_metrics`` at the
diagnostics' own cadence, as Lightning's ``LearningRateMonitor`` does (the Trainer's
``log_every_n_steps`` would otherwise drop most of them).

**The replayed training step.** The probes need the loss as a function of :math:`\theta` on the
current batch: ``loss_fn(pl_module, batch)`` when given, else the module's ``training_step``, run
again with (i) the global RNG set to its state at the start of the real step, so the replay draws
the same dropout masks (:class:`~langevin_lora.core.curvature.RngSnapshot`) and the global RNG is left as
it was; (ii) Lightning's logging isolated: during the replay the training loop's result collection
is a scratch one and the hook name is ``training_step``, so whatever ``self.log``/``self.log_dict``
the step calls is validated exactly as in the real step and then discarded, never reaching
``callback_metrics``, the progress bar or a logger; (iii) the state of every ``torchmetrics.Metric``
of the module saved and restored, so metrics updated inside ``training_step`` do not count the
replayed batch. Other side effects of ``training_step`` (direct writes to ``self.logger.experiment``,
BatchNorm running statistics, counters) are not undone: pass ``loss_fn`` for such a step.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from langevin_lora._validation import check_bool, check_directory, check_int, check_positive, check_version
from langevin_lora.core.curvature import RngSnapshot
from langevin_lora.core.functional import LOW_PRECISION
from langevin_lora.core.sharding import full_tensor, is_sharded
from langevin_lora.core.step_size import STEP_ACCURACY_BOUND, StepSizeWarning, step_remedy
from langevin_lora.diagnostics.checks import stationarity_report
from langevin_lora.diagnostics.layout import UnshardedViews, any_sharded, lora_modules_of
from langevin_lora.diagnostics.probes import CurvatureProbes
from langevin_lora.diagnostics.recorder import GibbsRecorder
from langevin_lora.diagnostics.replay import isolated_training_step, loss_tensor
from langevin_lora.diagnostics.report import NOISE_HOW_TO, StationarityReport

__all__ = ["GibbsDiagnostics", "StepSizeWarning"]

PREFIX = "langevin"
CONFIG_TEMPERATURE_NOTE = ("its numerator |g + lambda theta|^2 includes the minibatch noise tr(Sigma_B) (biased "
                           "upward unless full-batch); " + NOISE_HOW_TO)




class GibbsDiagnostics(Callback):
    r"""Live Gibbs-stationarity diagnostics and an end-of-fit report.

    Logged keys (all under ``langevin/``): ``virial_temperature`` (:math:`\beta T_{\mathrm{vir}}`,
    1 at stationarity), ``virial_temperature_raw`` (:math:`T_{\mathrm{vir}}` itself),
    ``<group>/virial_temperature``, ``<module>/virial_temperature``, ``<module>/gauge_gap``
    (:math:`\operatorname{tr}D_\beta/r - (\text{in}-\text{out})`, 0 at stationarity),
    ``gauge_gap`` (mean over modules), ``theta_sq``, ``U`` (loss + prior), ``mean_force_chi2`` and
    ``mean_force_chi2_expected`` (:math:`(m-1)/(m-3)` for :math:`m` blocks), ``noise_ratio`` and
    ``noise_temperature`` (:math:`1+\rho`), ``config_temperature`` (:math:`\beta T_{\mathrm{conf}}`),
    ``laplacian``, ``eta_lambda_max``, ``sampling_steps``, ``burn_in_steps``.

    Args:
        log_every_n_steps: sampling steps between two logs of the window means.
        hvp_every_n_steps: sampling steps between Hutchinson probes of :math:`\Delta U`
            (``0`` disables the configurational temperature).
        lambda_max_every_n_steps: sampling steps between power iterations (``0`` disables).
        power_iters: Hessian-vector products per power iteration.
        hutchinson_probes: Rademacher probes per Hutchinson estimate.
        center_window: steps per window of the virial centre (:class:`~langevin_lora.diagnostics.WindowCenter`).
        center_mode: ``"expanding"`` (default: mean of all completed windows, whose bias vanishes
            for LoRA's slow directions too) or ``"previous"`` (mean of the previous window).
        block_size: steps per block of the mean-force :math:`\chi^2` (default ``center_window``).
        split_batch: optional ``batch -> (half1, half2)``; every ``noise_every_n_steps`` the
            callback computes both half-batch gradients to estimate :math:`\rho` when
            ``accumulate_grad_batches == 1``.
        noise_every_n_steps: cadence of the ``split_batch`` estimate.
        loss_fn: optional ``(pl_module, batch) -> loss`` for the Hessian-vector products; by
            default the module's ``training_step`` is replayed on the current batch (module docstring).
        hvp_method: ``"auto"`` (double backward, falling back to finite differences),
            ``"double_backward"`` or ``"finite_difference"``.
        fd_eps: relative step of the finite differences.
        step_size_warning: warn when :math:`\eta\lambda_{\max}` exceeds it.
        report: build, print and save the stationarity report at the end of ``fit``.
        report_dir: where to write it (default ``trainer.log_dir`` or ``default_root_dir``); checked
            to be a writable folder path at construction.
        plots: also write the PNG figures.
        seed: seed of the probe generator (the global RNG is never touched).
    """

    def __init__(self, *, log_every_n_steps: int = 10, hvp_every_n_steps: int = 400,
                 lambda_max_every_n_steps: int = 4000, power_iters: int = 10, hutchinson_probes: int = 1,
                 center_window: int = 200, center_mode: str = "expanding", block_size: int | None = None,
                 split_batch: Callable[[Any], tuple[Any, Any]] | None = None, noise_every_n_steps: int = 100,
                 loss_fn: Callable[[LightningModule, Any], Tensor] | None = None, hvp_method: str = "auto",
                 fd_eps: float = 1e-3, step_size_warning: float = STEP_ACCURACY_BOUND, report: bool = True,
                 report_dir: str | Path | None = None, plots: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, low=1)
        self.hvp_every_n_steps = check_int("hvp_every_n_steps", hvp_every_n_steps, low=0)
        self.lambda_max_every_n_steps = check_int("lambda_max_every_n_steps", lambda_max_every_n_steps, low=0)
        for name, fn, what in (("split_batch", split_batch, "batch -> (half1, half2)"),
                               ("loss_fn", loss_fn, "(pl_module, batch) -> loss")):
            if fn is not None and not callable(fn):
                raise ValueError(f"Invalid {name}: {fn!r} (expected a callable {what})")
        self.split_batch, self.loss_fn = split_batch, loss_fn
        self.noise_every_n_steps = check_int("noise_every_n_steps", noise_every_n_steps, low=1)
        self.step_size_warning = check_positive("step_size_warning", step_size_warning)
        self.report = check_bool("report", report)
        self.plots = check_bool("plots", plots)
        self.report_dir = check_directory("report_dir", report_dir, must_write=True)
        self.recorder = GibbsRecorder(center_window=center_window, center_mode=center_mode, block_size=block_size)
        self._unsharded = UnshardedViews()   # FSDP2: full copies of the sampled tensors for the recorder
        self.probes = CurvatureProbes(hutchinson_probes=hutchinson_probes, power_iters=power_iters,
                                      hvp_method=hvp_method, fd_eps=fd_eps, seed=seed)
        self.sampler: Any = None
        self._mode: str | None = None
        self._restored = False
        self.last_report: StationarityReport | None = None
        self.last_logged: dict[str, float] = {}
        self.report_paths: dict[str, Path] = {}
        #: ``(first, end)`` sampling steps the end-of-fit report judges, or a list of such stretches
        #: (``None``: all of them); set by a sampler whose kept samples come from parts of the chain
        #: (LangevinLoRA's final stage).
        self.report_span: tuple[int, int] | list[tuple[int, int]] | None = None
        self._reset_step_state()

    def _reset_step_state(self) -> None:
        self._batch: tuple[Any, int] | None = None
        self._batch_step = -1       # trainer.global_step when the current batch started
        self._observed_step = -1    # global step whose pre-step point was observed
        self._loss_step, self._loss_acc = -1, None
        self._micro_step, self._prev_grads = -1, None
        self._rng: RngSnapshot | None = None
        self._params: list[Tensor] = []   # the live sampled tensors of the last observed step

    # -- read-only views of the recorder (the names tests and recipes use) --------------------------
    @property
    def sampling_steps(self) -> int:
        return self.recorder.sampling_steps

    @property
    def burn_in_steps(self) -> int:
        return self.recorder.burn_in_steps

    @property
    def traces(self) -> dict[str, list[float]]:
        return self.recorder.traces

    @property
    def noise_ratio(self) -> float | None:
        return self.recorder.noise_ratio

    @property
    def eta_lambda_max(self) -> float | None:
        return self.recorder.eta_lambda_max

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": 2, "recorder": self.recorder.state_dict(), "probes": self.probes.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "recorder" in state_dict:
            check_version("GibbsDiagnostics", state_dict, 2)
        self._restored = True
        if "recorder" not in state_dict:  # version 1 (counters, traces and a few sums only)
            self.recorder.load_state_dict(state_dict)
            return
        self.recorder.load_state_dict(state_dict["recorder"])
        self.probes.load_state_dict(state_dict["probes"])

    # -- finding the sampler ------------------------------------------------------------------------
    def _find_sampler(self, trainer: Trainer) -> Any:
        for cb in trainer.callbacks:
            if cb is not self and callable(getattr(cb, "langevin_groups", None)):
                return cb
        for opt in trainer.optimizers:
            if callable(getattr(opt, "langevin_groups", None)):
                return opt
        raise MisconfigurationException(
            "GibbsDiagnostics found no Langevin sampler: add the langevin_lora.LangevinLoRA callback to "
            "Trainer(callbacks=[...]) or return a langevin_lora.LangevinSGD / LangevinAdam optimizer from "
            "configure_optimizers (anything with a langevin_groups() method).")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._restored and (self.recorder.sampling_steps or self.recorder.burn_in_steps):
            # A new fit that does not resume a checkpoint starts a new chain: start clean too.
            self.recorder.reset()
            self.probes.reset()
            self.report_span = None
            self.last_report, self.last_logged, self.report_paths = None, {}, {}
        self._restored = False
        self._reset_step_state()
        self.sampler = self._find_sampler(trainer)
        observers = getattr(self.sampler, "step_observers", None)
        if isinstance(observers, list):
            self._mode = "observer"
            if self._observer not in observers:
                observers.append(self._observer)
        else:
            self._mode = "hook"
        if trainer.accumulate_grad_batches < 2 and self.split_batch is None:
            rank_zero_info(f"GibbsDiagnostics: noise ratio unavailable ({NOISE_HOW_TO})")

    def _observer(self, trainer: Trainer, pl_module: LightningModule, sampler: Any = None) -> None:
        self._observe(trainer, pl_module)

    # -- hooks --------------------------------------------------------------------------------------
    def _probe_due(self, step: int) -> bool:
        return any(every and step % every == 0 for every in (self.hvp_every_n_steps, self.lambda_max_every_n_steps))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = (batch, batch_idx)
        self._batch_step = trainer.global_step
        due = self._probe_due(self.recorder.sampling_steps) or self.split_batch is not None
        # A replay at this step draws this step's dropout masks: snapshot the global RNG before the forward.
        self._rng = RngSnapshot(self._cuda_devices(pl_module)) if due else None

    @staticmethod
    def _cuda_devices(pl_module: LightningModule) -> list[int]:
        device = pl_module.device
        if device.type != "cuda":
            return []
        return [device.index if device.index is not None else torch.cuda.current_device()]

    @staticmethod
    def _inv_scale(trainer: Trainer) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        # Lightning hands over loss / accumulate_grad_batches (scaled under AMP): the sum over the
        # micro-batches of one optimizer step is their mean loss. Keyed by global step, so a step the
        # diagnostics never observe (burn-in, a skipped step) cannot leak into the next one.
        if self._loss_step != trainer.global_step:
            self._loss_step, self._loss_acc = trainer.global_step, None
        value = loss.detach().double().reshape(()) * self._inv_scale(trainer)
        self._loss_acc = value if self._loss_acc is None else self._loss_acc + value

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        k = trainer.accumulate_grad_batches
        if k < 2 or self.sampler is None:
            return
        if self._micro_step != trainer.global_step:  # first micro-batch of a new optimizer step
            self._micro_step, self._prev_grads = trainer.global_step, None
            self.recorder.discard_micro_batches()
        views = self.recorder.sampling_groups(self.sampler.langevin_groups())
        if not views:
            return
        params = [p for v in views for p in v.params]
        with torch.no_grad():
            if any_sharded(views):   # FSDP2: the full tensors (UnshardedViews)
                views, grads = self._unsharded(views)
            else:
                grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
            wide = [g.float() if g.dtype in LOW_PRECISION else g for g in grads]
            prev = self._prev_grads or [torch.zeros_like(g) for g in wide]
            scale = k * self._inv_scale(trainer)
            # This micro-batch's own gradient: the growth of the accumulated .grad, undoing 1/k.
            micro = [(g - p) * scale for g, p in zip(wide, prev)]
            self._prev_grads = [g.clone() for g in wide]
        self.recorder.observe_micro_batch(views, micro, nominal=k)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        ours = optimizer is self.sampler or getattr(optimizer, "optimizer", None) is self.sampler
        if self._mode == "hook" and ours:
            self._observe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped = trainer.global_step != self._batch_step
        if stepped and self._observed_step != self._batch_step and self.recorder.sampling_steps == 0:
            self.recorder.skip()  # a burn-in step the sampler did not show us (LangevinLoRA's burn-in)
        if self.recorder.pending >= self.log_every_n_steps:
            self._publish(trainer, pl_module, self.recorder.flush(), can_log=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.recorder.pending:
            self._publish(trainer, pl_module, self.recorder.flush(), can_log=False)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.recorder.pending:
            self._publish(trainer, pl_module, self.recorder.flush(), can_log=False)
        observers = getattr(self.sampler, "step_observers", None)
        if self._mode == "observer" and isinstance(observers, list) and self._observer in observers:
            observers.remove(self._observer)
        if self.sampling_steps == 0 or not (self.report or self.report_span is not None):
            return
        self.last_report = self.build_report(**self.span_arguments())
        if self.report and trainer.is_global_zero:
            print(str(self.last_report))
            directory = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
            self.report_paths = self.last_report.save(directory, plots=self.plots)

    # -- one optimizer step -------------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._observed_step = trainer.global_step
        views = self.sampler.langevin_groups()
        step = self.recorder.sampling_steps  # index of this step if it samples
        sampled = self.recorder.sampling_groups(views)
        self._params = [p for v in sampled for p in v.params]   # the live tensors (the probes move them)
        micro_grads = None
        if (sampled and self.split_batch is not None and trainer.accumulate_grad_batches < 2
                and step % self.noise_every_n_steps == 0 and self._batch is not None):
            micro_grads = self._half_batch_gradients(trainer, pl_module, self._params)
        loss = self._loss_acc if self._loss_step == trainer.global_step else None
        grads, modules = None, lambda: lora_modules_of(pl_module)
        if sampled and any_sharded(sampled):   # FSDP2: the recorder works on full copies (UnshardedViews)
            views, grads = self._unsharded(sampled)
            modules = lambda: self._unsharded.modules(lora_modules_of(pl_module))   # noqa: E731
        flushed = self.recorder.record(views, grads=grads, loss=loss, modules=modules, micro_grads=micro_grads)
        if flushed:
            self._publish(trainer, pl_module, flushed, can_log=True)
        if sampled and self._probe_due(step):
            self._run_probes(trainer, pl_module, step)

    # -- replays of the training step ---------------------------------------------------------------
    @contextmanager
    def _replay(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[Callable]:
        """Yield ``replayed(batch, batch_idx) -> loss``: the training step (or ``loss_fn``) again, with
        this step's dropout masks and no trace in the user's logs or metrics (module docstring)."""
        snapshot = self._rng if self._rng is not None else RngSnapshot(self._cuda_devices(pl_module))
        with snapshot.replaying() as deterministic, isolated_training_step(trainer, pl_module):
            def replayed(batch: Any, batch_idx: int) -> Tensor:
                return deterministic(lambda: self._loss_of(pl_module, batch, batch_idx))()
            yield replayed

    def _loss_of(self, pl_module: LightningModule, batch: Any, batch_idx: int) -> Tensor:
        out = self.loss_fn(pl_module, batch) if self.loss_fn is not None else pl_module.training_step(batch, batch_idx)
        loss = loss_tensor(out)
        if loss is None:
            raise MisconfigurationException(
                "GibbsDiagnostics: training_step returned no loss tensor to differentiate; pass loss_fn=...")
        return loss

    def _half_batch_gradients(self, trainer: Trainer, pl_module: LightningModule, params: list[Tensor]) -> list | None:
        batch, batch_idx = self._batch
        grads = []
        sharded = any(is_sharded(p) for p in params)
        with self._replay(trainer, pl_module) as replayed, torch.enable_grad(), self._grads_kept(pl_module, sharded):
            for half in self.split_batch(batch):
                if sharded:   # FSDP2: backward() (its reduce-scatter), the full gradients gathered
                    for p in params:
                        p.grad = None
                    replayed(half, batch_idx).backward()
                    grads.append([torch.zeros(p.shape, dtype=p.dtype, device=p.device) if p.grad is None
                                  else full_tensor(p.grad.detach()) for p in params])
                    continue
                g = torch.autograd.grad(replayed(half, batch_idx), params, allow_unused=True)
                grads.append([torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)])
        return grads if len(grads) >= 2 else None

    @staticmethod
    @contextmanager
    def _grads_kept(pl_module: LightningModule, sharded: bool) -> Iterator[None]:
        """Sharded (FSDP2) replays differentiate with ``backward()``, which writes ``.grad``: every gradient
        of the step is set aside meanwhile and put back (no-op unsharded: ``autograd.grad`` writes none)."""
        stash = [(p, p.grad) for p in pl_module.parameters()] if sharded else []
        for p, _ in stash:
            p.grad = None
        try:
            yield
        finally:
            for p, g in stash:
                p.grad = g

    def _run_probes(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self.loss_fn is None and (not pl_module.automatic_optimization or self._batch is None):
            return
        batch, batch_idx = self._batch if self._batch is not None else (None, 0)
        do_hvp = bool(self.hvp_every_n_steps) and step % self.hvp_every_n_steps == 0
        do_pow = bool(self.lambda_max_every_n_steps) and step % self.lambda_max_every_n_steps == 0
        rec = self.recorder
        params = self._params if self._params and any(is_sharded(p) for p in self._params) else rec.params
        with self._replay(trainer, pl_module) as replayed, self._grads_kept(pl_module, params is self._params):
            lap, eig = self.probes.measure(lambda: replayed(batch, batch_idx), params,
                                           weight_decay=rec.weight_decay, scale=rec.step_scale(),
                                           laplacian=do_hvp, power=do_pow)
        if lap is not None:
            rec.add_laplacian(lap)
        if eig is not None:
            rec.set_eta_lambda_max(eig)
            if abs(eig) > self.step_size_warning:
                rank_zero_warn(
                    f"GibbsDiagnostics: eta*lambda_max = {eig:.3g} > {self.step_size_warning:g} at sampling step "
                    f"{step}: the Langevin step is biased (unstable above 2); {step_remedy(eig / self.step_size_warning)}",
                    category=StepSizeWarning)

    # -- logging and report ---------------------------------------------------------------------------
    def _publish(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float], *,
                 can_log: bool) -> None:
        metrics = {f"{PREFIX}/{k}": float(v) for k, v in metrics.items() if math.isfinite(v)}
        self.last_logged = metrics
        if can_log and not trainer.barebones:
            try:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False, prog_bar=False, batch_size=1)
            except MisconfigurationException:  # called from a hook where Lightning forbids self.log
                pass
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def span_arguments(self) -> dict[str, Any]:
        """The traces of :attr:`report_span`, one ``(first, end)`` pair or a list of them, joined in
        order (each trace cut in proportion to the sampling steps)."""
        if self.report_span is None:
            return {}
        spans = [self.report_span] if isinstance(self.report_span[0], int) else list(self.report_span)
        total = max(1, self.recorder.sampling_steps)
        cuts = [tuple(max(0, min(total, int(x))) for x in span) for span in spans]
        traces = {k: [x for lo, hi in cuts for x in list(v)[len(v) * lo // total: len(v) * hi // total]]
                  for k, v in self.recorder.traces.items()}
        return {"traces": traces, "steps": sum(hi - lo for lo, hi in cuts)}

    def build_report(self, **kwargs: Any) -> StationarityReport:
        """The :func:`~langevin_lora.diagnostics.stationarity_report` of what was recorded so far
        (keyword arguments override the thresholds and inputs)."""
        args = self.recorder.report_arguments()
        args["noise_ratio_note"] = None if self.noise_ratio is not None else NOISE_HOW_TO
        if self.recorder.laplacians and not self.recorder.gradient_square_unbiased:
            args["config_temperature_note"] = CONFIG_TEMPERATURE_NOTE
        args.update(kwargs)
        rep = stationarity_report(**args)
        rep.summary["burn_in_steps"] = self.burn_in_steps
        if self.recorder.laplacians:
            rep.summary["hvp_evaluations"] = len(self.recorder.laplacians)
        return rep
