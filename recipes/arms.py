r"""The arms of the comparison, for one seed: one AdamW run gives ``adamw``, ``adamw_best`` and
``adamw_ts``; a Langevin run resumed from it gives ``langevin`` and ``langevin_ts``.

- **AdamW run** (:func:`run_adamw`): AdamW on the LoRA tensors and the head for the full budget,
  with :class:`~recipes.callbacks.ValidationSelection` watching the validation NLL (every epoch by
  default) and writing resumable checkpoints at the best point (and at a fixed burn-in step).
- ``adamw``: its final weights. ``adamw_best``: the best-validation-NLL weights (early stopping).
  ``adamw_ts``: the final weights with a temperature fitted on the validation split
  (:mod:`recipes.calibration`).
- **Langevin run** (:func:`run_langevin`): ``trainer.fit(ckpt_path=...)`` from the AdamW run's
  checkpoint at the burn-in point (weights, AdamW moments, loop state), then
  :class:`~langevin_lora.LangevinLoRA` samples (``burn_in_steps`` = that step, so the first step
  is a Langevin step and the frozen preconditioner comes from AdamW's second moment there).
  ``langevin`` predicts with the posterior average
  :math:`\bar p(y\mid x) = \frac1S\sum_s p_{\theta_s}(y \mid x)`; ``langevin_ts`` adds a
  temperature fitted on the validation split.

Costs reported per arm (the runs they need, test predictions excluded):
``grad_evals`` counts minibatch forward+backward passes of training data (optimizer steps x
gradient accumulation, plus the curvature probes the callbacks report, in minibatches of training
examples); ``val_passes`` counts the forward passes over the validation split separately (the
selection's checks, temperature scaling, the drop-in's validation loop and the ladder's scoring of
its samples). An arm that needs the whole AdamW run to select its point (``adamw_best``,
``burn_in: best``) pays for all of it. The drop-in (:func:`run_dropin`) is one run of its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor

from recipes.calibration import apply_temperature, fit_temperature
from recipes.callbacks import LossTrace, NoDropout, ScaleLearningRate, ValidationSelection, swapped_in
from recipes.compare_config import LangevinSettings, SelectionSettings
from recipes.config_check import ConfigError
from recipes.metrics import classification_metrics

__all__ = ["Shared", "AdamWRun", "run_adamw", "adamw_rows", "run_langevin", "run_dropin", "building", "PeakMemory"]


@contextlib.contextmanager
def building(section: str) -> Iterator[None]:
    """Turn a constructor's refusal of a config value (``ValueError``/``TypeError``) into a
    :class:`~recipes.config_check.ConfigError` that names the section."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        kind = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
        raise ConfigError(f"{section}: {kind}{exc}") from exc


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on GPU, else peak process RSS sampled every 50 ms (MB)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak = cuda, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss_mb())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss_mb())


@dataclasses.dataclass
class Shared:
    """What every run of one comparison shares: config, data, evaluation batches, budget."""

    cfg: dict[str, Any]
    settings: LangevinSettings
    selection: SelectionSettings
    module_cls: Any
    forward_fn: Any
    datamodule: Any
    out_dir: Path
    val_batches: list
    test_batches: list
    val_labels: Tensor
    test_labels: Tensor
    total_steps: int
    batch_size: int
    accumulate: int

    @property
    def num_train(self) -> int:
        return self.datamodule.num_train_examples

    @property
    def val_pass_grad_evals(self) -> float:
        """A forward pass over the validation split, in minibatch gradient evaluations (upper bound)."""
        return len(self.val_labels) / self.batch_size

    def trainer(self, run_dir: Path, callbacks: list, **override: Any):
        import lightning.pytorch as pl

        tcfg = {"logger": False, "enable_model_summary": False, "enable_checkpointing": False,
                "default_root_dir": str(run_dir)} | dict(self.cfg.get("trainer") or {}) | override
        if tcfg.get("logger") is True or tcfg.get("logger") == "csv":
            tcfg["logger"] = pl.loggers.CSVLogger(str(run_dir), name="logs")
        with building("trainer"):
            return pl.Trainer(callbacks=callbacks, **tcfg)

    def predict(self, module, batches) -> Tensor:
        from recipes.models import predict_proba
        return predict_proba(module, batches, self.forward_fn)[0]


@dataclasses.dataclass
class AdamWRun:
    """The AdamW run of one seed: predictions (validation and test) of its final and best weights,
    the selection, its checkpoints and costs."""

    seed: int
    final: tuple[Tensor, Tensor] | None          # (val probs, test probs)
    best: tuple[Tensor, Tensor] | None
    selection: ValidationSelection
    steps: int
    train_s: float                               # the fit's wall time without selection work
    val_pass_s: float                            # one validation pass (the final weights)
    peak_mb: float
    loss: list[float]
    cuda: bool


def _metrics_row(method: str, seed: int, probs: Tensor, labels: Tensor, **extra: Any) -> dict[str, Any]:
    return {"method": method, "seed": seed, **classification_metrics(probs, labels), "num_samples": 1,
            "beta_virial": None, "stationarity": "n/a"} | extra


def run_adamw(shared: Shared, seed: int, module, *, select: bool, snapshot_step: int | None) -> AdamWRun:
    """Train with AdamW for the full budget, watching the validation NLL (``select``) and writing a
    checkpoint at ``snapshot_step`` (fixed burn-in); predict validation and test with the final and
    best weights (rank 0)."""
    run_dir = shared.out_dir / f"seed{seed}" / "adamw"
    loss = LossTrace()
    sel = ValidationSelection(shared.val_batches, shared.forward_fn, checkpoint_dir=run_dir / "checkpoints",
                              select=select, every_n_steps=shared.selection.every_n_steps,
                              snapshot_step=snapshot_step)
    trainer = shared.trainer(run_dir, [loss, sel])
    cuda = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
    t0 = time.perf_counter()
    with PeakMemory(cuda) as mem:
        trainer.fit(module, datamodule=shared.datamodule)
    train_s = time.perf_counter() - t0 - sel.seconds
    run = AdamWRun(seed, None, None, sel, trainer.global_step, train_s, 0.0, mem.peak, loss.values, cuda)
    if trainer.is_global_zero:
        module.to(trainer.strategy.root_device)
        t1 = time.perf_counter()
        val = shared.predict(module, shared.val_batches)
        run.val_pass_s = time.perf_counter() - t1
        run.final = (val, shared.predict(module, shared.test_batches))
        if sel.best_state is not None:
            with swapped_in(module, sel.best_state):
                run.best = (shared.predict(module, shared.val_batches), shared.predict(module, shared.test_batches))
    return run


def adamw_rows(shared: Shared, run: AdamWRun, methods: list[str]) -> tuple[list[dict], dict[str, Tensor]]:
    """Rows (and test probabilities) of the requested AdamW arms."""
    rows, probs = [], {}
    grads = run.steps * shared.accumulate
    y_val, y_test = shared.val_labels, shared.test_labels
    sel = run.selection
    common = {"optimizer_steps": run.steps, "peak_memory_mb": run.peak_mb}
    if "adamw" in methods:
        probs["adamw"] = run.final[1]
        rows.append(_metrics_row("adamw", run.seed, run.final[1], y_test, grad_evals=grads, val_passes=0,
                                 wall_time_s=run.train_s, **common))
    if "adamw_best" in methods:
        if run.best is None:
            raise RuntimeError("adamw_best: the AdamW run kept no best-validation checkpoint")
        probs["adamw_best"] = run.best[1]
        rows.append(_metrics_row("adamw_best", run.seed, run.best[1], y_test, selected_step=sel.best_step,
                                 grad_evals=grads, val_passes=sel.passes,
                                 wall_time_s=run.train_s + sel.seconds, val_nll=sel.best_nll, **common))
    if "adamw_ts" in methods:
        t0 = time.perf_counter()
        T = fit_temperature(run.final[0], y_val, shared.settings.temperature_scaling_bounds)
        probs["adamw_ts"] = apply_temperature(run.final[1], T)
        rows.append(_metrics_row("adamw_ts", run.seed, probs["adamw_ts"], y_test, ts_temperature=T,
                                 grad_evals=grads, val_passes=1,
                                 wall_time_s=run.train_s + run.val_pass_s + time.perf_counter() - t0, **common))
    return rows, probs


def _sample_predictions(shared: Shared, module, bank) -> tuple[Tensor, Tensor, float]:
    """Validation and test probabilities of every banked sample ``(S, n, K)``, and the wall time of
    the validation passes."""
    from langevin_lora.posterior.averaging import sample_probabilities

    t0 = time.perf_counter()
    vals = sample_probabilities(module, bank, shared.val_batches, shared.forward_fn).cpu()
    val_s = time.perf_counter() - t0
    return vals, sample_probabilities(module, bank, shared.test_batches, shared.forward_fn).cpu(), val_s


def _langevin_rows(shared: Shared, seed: int, val: Tensor, test: Tensor, methods: list[str], wall: float,
                   common: dict[str, Any]) -> tuple[list[dict], dict[str, Tensor]]:
    """The ``langevin`` (posterior average) and ``langevin_ts`` (plus a temperature fitted on
    validation) rows and test probabilities from the samples' ``(S, n, K)`` probabilities."""
    rows, probs = [], {}
    mean_val, mean_test = val.mean(0), test.mean(0)
    if "langevin" in methods:
        probs["langevin"] = mean_test
        rows.append(_metrics_row("langevin", seed, mean_test, shared.test_labels, wall_time_s=wall, **common))
    if "langevin_ts" in methods:
        t1 = time.perf_counter()
        T = fit_temperature(mean_val, shared.val_labels, shared.settings.temperature_scaling_bounds)
        probs["langevin_ts"] = apply_temperature(mean_test, T)
        rows.append(_metrics_row("langevin_ts", seed, probs["langevin_ts"], shared.test_labels, ts_temperature=T,
                                 wall_time_s=wall + time.perf_counter() - t1, **common))
    return rows, probs


def _span_report(diag, span: float):
    """The stationarity report of the part of the chain the kept samples come from (the last
    ``span`` of the sampling steps), and the mean of β·T_virial there."""
    args = diag.recorder.report_arguments()
    traces = {k: list(v)[int(len(v) * (1 - span)):] for k, v in args["traces"].items()}
    vt = traces.get("virial_temperature") or []
    beta_virial = float(sum(vt) / len(vt)) if vt else None
    try:
        return diag.build_report(traces=traces), beta_virial
    except ValueError:   # too short to judge
        return None, beta_virial


def run_langevin(shared: Shared, seed: int, module, run: AdamWRun, methods: list[str]
                 ) -> tuple[list[dict], dict[str, Tensor], dict[str, Any]]:
    """Resume the AdamW run at its burn-in checkpoint, sample, and return the rows and test
    probabilities of the requested Langevin arms, and the extras (convergence, traces, plan)."""
    import lightning.pytorch as pl

    from langevin_lora.lightning.callback import LangevinLoRA
    from langevin_lora.diagnostics import GibbsDiagnostics

    from recipes.convergence import sample_convergence

    s, sel, n = shared.settings, run.selection, shared.num_train
    plan = s.plan(shared.total_steps, n, best_step=sel.best_step)
    ckpt = sel.best_path if plan["burn_in_mode"] == "best" else sel.snapshot_path
    if ckpt is None:
        raise RuntimeError(f"langevin: the AdamW run wrote no checkpoint at the burn-in step {plan['burn_in_steps']}")
    run_dir = shared.out_dir / f"seed{seed}" / "langevin"
    with building("langevin"):
        lcb = LangevinLoRA(num_data=n, burn_in_steps=plan["burn_in_steps"], sample_every=plan["sample_every"],
                           num_samples=plan["num_samples"], seed=seed, **s.callback_kwargs(n))
    with building("langevin.diagnostics"):
        diag = GibbsDiagnostics(log_every_n_steps=10, center_window=max(5, plan["sampling_steps"] // 10),
                                report_dir=str(run_dir), plots=True, seed=seed, **s.diagnostics)
    loss = LossTrace()
    callbacks = [loss, lcb, diag] + ([ScaleLearningRate(s.lr_scale)] if s.lr_scale != 1 else [])
    if not s.dropout:
        callbacks.append(NoDropout(from_step=plan["burn_in_steps"]))
    trainer = shared.trainer(run_dir, callbacks, max_steps=plan["burn_in_steps"] + plan["sampling_steps"],
                             max_epochs=-1)
    pl.seed_everything(seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    with PeakMemory(run.cuda) as mem:
        trainer.fit(module, datamodule=shared.datamodule, ckpt_path=str(ckpt))
    sample_s = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return [], {}, {}
    module.to(trainer.strategy.root_device)
    val, test, val_s = _sample_predictions(shared, module, lcb.sample_bank)
    conv = sample_convergence(val, shared.val_labels)
    report, beta_virial = _span_report(diag, s.sample_span)
    if report is not None:
        report.save(run_dir, stem="stationarity_samples", plots=False)
    auto = lcb.auto_step   # the automatic step size's curvature probes (step_size="auto")
    probes = diag.probes.evaluations + int(auto.grad_evals)
    best = plan["burn_in_mode"] == "best"
    adamw_steps = run.steps if best else plan["burn_in_steps"]
    grads = (adamw_steps + trainer.global_step - plan["burn_in_steps"]) * shared.accumulate + probes
    wall = (run.train_s + sel.seconds if best else run.train_s * plan["burn_in_steps"] / max(1, run.steps))
    wall += sample_s + val_s
    full = diag.last_report
    common = {"num_samples": len(val), "beta_virial": beta_virial,
              "stationarity": report.verdict if report is not None else "n/a",
              "stationarity_full_chain": full.verdict if full is not None else "n/a",
              "grad_evals": grads, "val_passes": (sel.passes if best else 0) + len(val), "probe_evaluations": probes,
              "optimizer_steps": trainer.global_step, "peak_memory_mb": max(run.peak_mb, mem.peak),
              "converged": conv["converged"], "ess_val_loglik": conv["ess"],
              **{f"plan_{k}": v for k, v in plan.items()}, "temperature": s.temperature, "num_data": n,
              "langevin_kwargs": s.callback_kwargs(n), "lr_scale": s.lr_scale,
              "step_size": auto.step_size, "lambda_max": auto.lambda_max, "step_measurements": auto.measurements}
    if full is not None:
        common["diagnostics"] = {c.name: {"status": c.status, "value": c.value} for c in full.checks}
    rows, probs = _langevin_rows(shared, seed, val, test, methods, wall, common)
    vt = list(diag.traces.get("virial_temperature", []))
    extras = {"convergence": conv, "plan": plan, "loss": loss.values, "virial": vt,
              "step_size": common["step_size"], "lambda_max": common["lambda_max"],
              "beta": plan["beta"] if math.isfinite(plan["beta"]) else None}
    return rows, probs, extras


class _ValidationCount(Callback):
    """Counts the Trainer's validation passes (the drop-in's ``val_loss`` checks)."""

    def __init__(self) -> None:
        self.passes = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.passes += 1


def run_dropin(shared: Shared, seed: int, module, run: AdamWRun, methods: list[str]
               ) -> tuple[list[dict], dict[str, Tensor], dict[str, Any]]:
    """The zero-config drop-in: the same Trainer as the AdamW run (same initialisation, data order and
    budget) with its validation loop on and ``callbacks=[LangevinLoRA()]`` (plus the ``langevin:`` keys
    that are LangevinLoRA arguments, none by default, and the run's seed); the module logs
    ``val_loss`` every epoch. Returns the rows, test probabilities and extras as :func:`run_langevin`.

    Costs: ``grad_evals`` = optimizer steps x accumulation + the curvature probes (in minibatch
    gradients), without validation; ``val_passes`` = the Trainer's validation checks + one pass per
    sample the ladder scored (each stage's samples are scored on validation as they are taken)."""
    from langevin_lora.lightning.callback import LangevinLoRA

    from recipes.convergence import sample_convergence

    s = shared.settings
    run_dir = shared.out_dir / f"seed{seed}" / "langevin"
    with building("langevin"):
        lcb = LangevinLoRA(seed=seed, **s.dropin_kwargs())
    loss, count = LossTrace(), _ValidationCount()
    trainer = shared.trainer(run_dir, [loss, lcb, count], limit_val_batches=1.0, check_val_every_n_epoch=1,
                             num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with PeakMemory(run.cuda) as mem:
        trainer.fit(module, datamodule=shared.datamodule)
    fit_s = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return [], {}, {}
    bank = lcb.sample_bank
    if len(bank) == 0:
        raise RuntimeError(f"langevin: the drop-in kept no sample ({lcb.chain.stop_reason or lcb.chain.phase})")
    module.to(trainer.strategy.root_device)
    val, test, val_s = _sample_predictions(shared, module, bank)
    conv = sample_convergence(val, shared.val_labels)
    diag = lcb.diagnostics if hasattr(lcb.diagnostics, "last_report") else None
    report = diag.last_report if diag is not None else None
    vt = list(diag.traces.get("virial_temperature", [])) if diag is not None else []
    vt_span = (diag.span_arguments().get("traces", {}).get("virial_temperature", vt) if diag is not None
               else vt)
    probes = lcb.probe_steps()
    chain = lcb.chain
    scored = sum(st.samples for st in chain.stages)
    best = chain.stages[chain.best_stage] if chain.best_stage is not None else None
    plan = {"burn_in_steps": chain.start_step, "sampling_steps": trainer.global_step - (chain.start_step or 0),
            "sample_every": best.sample_every if best else None, "num_samples": len(bank),
            "weight_decay": lcb.weight_decay, "beta": lcb.beta, "extended": False, "burn_in_mode": "auto"}
    common = {"num_samples": len(bank), "beta_virial": float(sum(vt_span) / len(vt_span)) if vt_span else None,
              "stationarity": report.verdict if report is not None else "n/a",
              "grad_evals": trainer.global_step * shared.accumulate + probes,
              "train_grad_evals": trainer.global_step * shared.accumulate, "probe_evaluations": probes,
              "val_passes": count.passes + scored, "optimizer_steps": trainer.global_step,
              "peak_memory_mb": max(run.peak_mb, mem.peak), "converged": conv["converged"], "ess_val_loglik": conv["ess"],
              **{f"plan_{k}": v for k, v in plan.items()}, "temperature": lcb.temperature, "num_data": shared.num_train,
              "langevin_kwargs": s.dropin_kwargs(), "lr_scale": 1.0, "step_size": lcb.auto_step.step_size,
              "lambda_max": lcb.auto_step.lambda_max, "step_measurements": lcb.auto_step.measurements,
              "prior_std": best.prior_std if best else None, "start_reason": chain.start_reason,
              "stop_reason": chain.stop_reason,
              "ladder": [{"prior_std": st.prior_std, "samples": st.samples, "val_nll": st.val_nll,
                          "relax": st.relax} for st in chain.stages]}
    if report is not None:
        common["diagnostics"] = {c.name: {"status": c.status, "value": c.value} for c in report.checks}
    rows, probs = _langevin_rows(shared, seed, val, test, methods, fit_s + val_s, common)
    extras = {"convergence": conv, "plan": plan, "loss": loss.values, "virial": vt,
              "step_size": common["step_size"], "lambda_max": common["lambda_max"], "beta": lcb.beta,
              "ladder": common["ladder"], "start_reason": chain.start_reason, "stop_reason": chain.stop_reason,
              "stop_step": trainer.global_step}
    return rows, probs, extras
