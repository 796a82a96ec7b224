r"""Lightning callback that watches a Langevin chain and tells whether it samples :math:`\pi_\beta`.

:class:`GibbsDiagnostics` finds the sampler (a callback with ``langevin_groups()``, e.g.
:class:`~langevin_lora.LangevinLoRA`, else the optimizer, e.g. :class:`~langevin_lora.LangevinSGD`),
measures the THEORY §3 identities at the point where :math:`\theta` and its gradient agree (the
final gradient, before the Langevin step), logs them through the Trainer's loggers and writes a
:func:`~langevin_lora.diagnostics.stationarity_report` at the end of ``fit``.

Cadences (defaults keep the overhead of the MiniLM recipe under 3%, see
``benchmarks/bench_diagnostics_overhead.py``: on a CPU one Hutchinson probe costs about 3.5 training
steps of MiniLM and a 10-product power iteration about 20, hence every 400 and every 4000 steps):

- every sampling step (free: no extra forward pass): centred virial temperature (global, per
  group, per LoRA module), mean force blocks, gauge gap per module, :math:`\lVert\theta\rVert^2`,
  and with ``accumulate_grad_batches >= 2`` the noise ratio :math:`\rho` and an unbiased
  :math:`\lVert\nabla U\rVert^2`;
- every ``log_every_n_steps`` steps: the window means are logged (one host sync);
- every ``hvp_every_n_steps``: one Hutchinson probe of :math:`\Delta U` (configurational
  temperature) by double backward through the training step on the current batch (central
  finite differences of the gradient where double backward is unsupported);
- every ``lambda_max_every_n_steps``: :math:`\eta\lambda_{\max}` by ``power_iters`` steps of power
  iteration (warm-started), with a warning above 0.1.
"""
from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from langevin_lora._validation import check_int, check_positive
from langevin_lora.diagnostics import functional as F
from langevin_lora.diagnostics.report import NOISE_HOW_TO, StationarityReport, stationarity_report

__all__ = ["GibbsDiagnostics", "StepSizeWarning"]

PREFIX = "langevin"


class StepSizeWarning(UserWarning):
    r""":math:`\eta\lambda_{\max}` exceeds the stability/bias gate (0.1 by default)."""


def _short(name: str) -> str:
    """Module name without the LightningModule attribute and PEFT wrapper prefixes."""
    return re.sub(r"^(.*?\.)?(base_model\.model\.)+", "", name)


class GibbsDiagnostics(Callback):
    r"""Live Gibbs-stationarity diagnostics and an end-of-fit report.

    Logged keys (all under ``langevin/``): ``virial_temperature`` (:math:`\beta T_{\mathrm{vir}}`,
    1 at stationarity), ``virial_temperature_raw`` (:math:`T_{\mathrm{vir}}` itself),
    ``<group>/virial_temperature``, ``<module>/virial_temperature``, ``<module>/gauge_gap``
    (:math:`\operatorname{tr}D_\beta/r - (\text{in}-\text{out})`, 0 at stationarity),
    ``gauge_gap`` (mean over modules), ``theta_sq``, ``U`` (loss + prior), ``mean_force_chi2`` and
    ``mean_force_chi2_expected``, ``noise_ratio`` and ``noise_temperature`` (:math:`1+\rho`),
    ``config_temperature`` (:math:`\beta T_{\mathrm{conf}}`), ``laplacian``, ``eta_lambda_max``,
    ``sampling_steps``, ``burn_in_steps``.

    Args:
        log_every_n_steps: sampling steps between two logs of the window means.
        hvp_every_n_steps: sampling steps between Hutchinson probes of :math:`\Delta U`
            (``0`` disables the configurational temperature).
        lambda_max_every_n_steps: sampling steps between power iterations (``0`` disables).
        power_iters: Hessian-vector products per power iteration.
        hutchinson_probes: Rademacher probes per Hutchinson estimate.
        center_window: steps per window of the virial centre (:class:`~langevin_lora.diagnostics.functional.WindowCenter`).
        center_mode: ``"expanding"`` (default: mean of all completed windows, whose bias vanishes
            for LoRA's slow directions too) or ``"previous"`` (mean of the previous window).
        block_size: steps per block of the mean-force :math:`\chi^2` (default ``center_window``).
        split_batch: optional ``batch -> (half1, half2)``; every ``noise_every_n_steps`` the
            callback computes both half-batch gradients to estimate :math:`\rho` when
            ``accumulate_grad_batches == 1``.
        noise_every_n_steps: cadence of the ``split_batch`` estimate.
        loss_fn: optional ``(pl_module, batch) -> loss`` for the Hessian-vector products; by
            default the module's ``training_step`` is replayed on the current batch, with the
            global RNG replayed identically (dropout) and ``self.log`` silenced.
        hvp_method: ``"auto"`` (double backward, falling back to finite differences),
            ``"double_backward"`` or ``"finite_difference"``.
        fd_eps: relative step of the finite differences.
        step_size_warning: warn when :math:`\eta\lambda_{\max}` exceeds it.
        report: build, print and save the stationarity report at the end of ``fit``.
        report_dir: where to write it (default ``trainer.log_dir`` or ``default_root_dir``).
        plots: also write the PNG figures.
        seed: seed of the probe generator (the global RNG is never touched).
    """

    def __init__(self, *, log_every_n_steps: int = 10, hvp_every_n_steps: int = 400,
                 lambda_max_every_n_steps: int = 4000, power_iters: int = 10, hutchinson_probes: int = 1,
                 center_window: int = 200, center_mode: str = "expanding", block_size: int | None = None,
                 split_batch: Callable[[Any], tuple[Any, Any]] | None = None, noise_every_n_steps: int = 100,
                 loss_fn: Callable[[LightningModule, Any], Tensor] | None = None, hvp_method: str = "auto",
                 fd_eps: float = 1e-3, step_size_warning: float = 0.1, report: bool = True,
                 report_dir: str | Path | None = None, plots: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, low=1)
        self.hvp_every_n_steps = check_int("hvp_every_n_steps", hvp_every_n_steps, low=0)
        self.lambda_max_every_n_steps = check_int("lambda_max_every_n_steps", lambda_max_every_n_steps, low=0)
        self.power_iters = check_int("power_iters", power_iters, low=1)
        self.hutchinson_probes = check_int("hutchinson_probes", hutchinson_probes, low=1)
        self.center_window = check_int("center_window", center_window, low=1)
        if center_mode not in F.WindowCenter.MODES:
            raise ValueError(f"Invalid center_mode: {center_mode!r} (expected one of "
                             f"{', '.join(map(repr, F.WindowCenter.MODES))})")
        self.center_mode = center_mode
        self.block_size = check_int("block_size", block_size if block_size is not None else center_window, low=1)
        if split_batch is not None and not callable(split_batch):
            raise ValueError(f"Invalid split_batch: {split_batch!r} (expected a callable batch -> (half1, half2))")
        self.split_batch = split_batch
        self.noise_every_n_steps = check_int("noise_every_n_steps", noise_every_n_steps, low=1)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (expected a callable (pl_module, batch) -> loss)")
        self.loss_fn = loss_fn
        if hvp_method not in F.HessianVectorProduct.METHODS:
            raise ValueError(f"Invalid hvp_method: {hvp_method!r} (expected one of "
                             f"{', '.join(map(repr, F.HessianVectorProduct.METHODS))})")
        self.hvp_method = hvp_method
        self.fd_eps = check_positive("fd_eps", fd_eps)
        self.step_size_warning = check_positive("step_size_warning", step_size_warning)
        self.report = bool(report)
        self.report_dir = report_dir
        self.plots = bool(plots)
        self.seed = check_int("seed", seed, low=0)
        self._reset()

    # -- state ----------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.sampler: Any = None
        self._mode: str | None = None
        self.sampling_steps = 0
        self.burn_in_steps = 0
        self.traces: dict[str, list[float]] = {}
        self.last_report: StationarityReport | None = None
        self.last_logged: dict[str, float] = {}
        self._layout_key: tuple | None = None
        self._center: F.WindowCenter | None = None
        self._pending: list[Tensor] = []
        self._pending_loss: list[Tensor] = []
        self._loss_acc: Tensor | None = None
        self._step_done: str | None = None
        self._batch: tuple[Any, int] | None = None
        self._micro: dict[str, Any] | None = None
        self._block: list[Tensor] | None = None
        self._block_len = 0
        self._block_sum: list[Tensor] | None = None
        self._block_sq: list[Tensor] | None = None
        self._num_blocks = 0
        self._rho_sum = 0.0
        self._rho_count = 0
        self._grad_sq: list[Tensor] = []
        self._grad_sq_unbiased = 0
        self._laplacians: list[float] = []
        self._eta_lambda_max: float | None = None
        self._power_vec: list[Tensor] | None = None
        self._hvp_fallback = False
        self._generator: torch.Generator | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"sampling_steps": self.sampling_steps, "burn_in_steps": self.burn_in_steps,
                "traces": {k: list(v) for k, v in self.traces.items()}, "laplacians": list(self._laplacians),
                "rho_sum": self._rho_sum, "rho_count": self._rho_count, "eta_lambda_max": self._eta_lambda_max}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampling_steps = state_dict["sampling_steps"]
        self.burn_in_steps = state_dict["burn_in_steps"]
        self.traces = {k: list(v) for k, v in state_dict["traces"].items()}
        self._laplacians = list(state_dict["laplacians"])
        self._rho_sum, self._rho_count = state_dict["rho_sum"], state_dict["rho_count"]
        self._eta_lambda_max = state_dict["eta_lambda_max"]

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
            "configure_optimizers (anything with a langevin_groups() method)."
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
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

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = (batch, batch_idx)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        k = trainer.accumulate_grad_batches
        if k < 2 or self.sampler is None:
            return
        views = self._views()
        if not views:
            return
        if self._pending and self._key(views) != self._layout_key:
            self._flush(trainer, pl_module)
        params, _ = self._layout(views, pl_module)
        with torch.no_grad():
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            inv_scale = 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0
            m = self._micro
            if m is None:
                m = self._micro = {"count": 0, "prev": [torch.zeros_like(g, dtype=torch.float32 if g.dtype in (
                    torch.float16, torch.bfloat16) else g.dtype) for g in grads],
                    "sq_G": None, "sq_f": None}
            g_j = [(g.to(pv.dtype) - pv) * (k * inv_scale) for g, pv in zip(grads, m["prev"])]
            # Per tensor: sum over the micro-batch of G*g_j^2 and of |g_j + lambda*theta|^2.
            prec = self._lay["precond"]
            sq_G = torch.stack([((gj * G) * gj).sum() if G is not None else gj.square().sum()
                                for gj, G in zip(g_j, prec)])
            lam = self._lay["lam_list"]
            f_j = [gj + l * p.detach().to(gj.dtype) if l else gj for gj, l, p in zip(g_j, lam, params)]
            sq_f = torch.stack([f.square().sum() for f in f_j])
            m["sq_G"] = sq_G if m["sq_G"] is None else m["sq_G"] + sq_G
            m["sq_f"] = sq_f if m["sq_f"] is None else m["sq_f"] + sq_f
            for pv, g in zip(m["prev"], grads):
                pv.copy_(g)
            m["count"] += 1
            m["inv_scale"] = inv_scale

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._mode != "hook":
            return
        if optimizer is not self.sampler and getattr(optimizer, "optimizer", None) is not self.sampler:
            return
        self._observe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            # Lightning hands over loss / accumulate_grad_batches: the sum over the micro-batches
            # of one optimizer step is their mean loss.
            loss = loss.detach().double().reshape(())
            self._loss_acc = loss if self._loss_acc is None else self._loss_acc + loss
        if self._step_done == "recorded":
            self._pending_loss.append(self._loss_acc if self._loss_acc is not None else
                                      torch.tensor(float("nan"), dtype=torch.float64))
        if self._step_done is not None:
            self._loss_acc = None
            self._step_done = None
        if len(self._pending) >= self.log_every_n_steps:
            self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending:
            self._flush(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending:
            self._flush(trainer, pl_module)
        if self._mode == "observer":
            observers = getattr(self.sampler, "step_observers", None)
            if isinstance(observers, list) and self._observer in observers:
                observers.remove(self._observer)
        if not self.report or self.sampling_steps == 0:
            return
        self.last_report = self.build_report()
        if trainer.is_global_zero:
            print(str(self.last_report))
            directory = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
            self.report_paths = self.last_report.save(directory, plots=self.plots)

    # -- the per-step measurement -----------------------------------------------------------------
    def _views(self) -> list:
        return [v for v in self.sampler.langevin_groups() if v.sampling and math.isfinite(v.beta) and v.params]

    @staticmethod
    def _key(views: list) -> tuple:
        return tuple((v.name, v.beta, v.weight_decay, tuple(id(p) for p in v.params),
                      None if v.precond is None else tuple(id(G) for G in v.precond)) for v in views)

    def _layout(self, views: list, pl_module: LightningModule) -> tuple[list[Tensor], dict[str, Any]]:
        """Tensors being sampled and index maps (tensor -> group, tensor -> LoRA module), rebuilt when
        the set of sampling tensors or their hyperparameters change."""
        key = self._key(views)
        if key == self._layout_key:
            # The step size may follow a schedule: read it at every step.
            self._lay["lr_list"] = [v.lr for v in views for _ in v.params]
            return self._lay["params"], self._lay
        ids_changed = self._layout_key is None or [k[3] for k in key] != [k[3] for k in self._layout_key]
        params, group_of, beta, lam, lr, precond = [], [], [], [], [], []
        for gi, v in enumerate(views):
            for j, p in enumerate(v.params):
                params.append(p)
                group_of.append(gi)
                beta.append(v.beta)
                lam.append(v.weight_decay)
                lr.append(v.lr)
                precond.append(None if v.precond is None else v.precond[j])
        device = params[0].device
        index = {id(p): i for i, p in enumerate(params)}
        modules = []
        try:
            from langevin_lora.param_groups import lora_modules
            for mf in lora_modules(pl_module):
                ia, ib = index.get(id(mf.A)), index.get(id(mf.B))
                if ia is None or ib is None:
                    continue
                modules.append({"name": _short(mf.name) + ("" if mf.adapter == "default" else f".{mf.adapter}"),
                                "a": ia, "b": ib, "r": mf.rank, "fan_in": mf.fan_in, "fan_out": mf.fan_out})
        except ValueError:
            pass
        numel = torch.tensor([float(p.numel()) for p in params], device=device, dtype=torch.float64)
        lay = {
            "params": params, "group_of": torch.tensor(group_of, device=device), "groups": [v.name for v in views],
            "beta": torch.tensor(beta, device=device, dtype=torch.float64),
            "lam": torch.tensor(lam, device=device, dtype=torch.float64), "lam_list": lam, "lr_list": lr,
            "beta_list": beta, "precond": precond, "numel": numel, "modules": modules, "n_groups": len(views),
        }
        lay["group_numel"] = torch.zeros(len(views), device=device, dtype=torch.float64).index_add_(
            0, lay["group_of"], numel)
        lay["columns"] = (["virial_temperature", "virial_temperature_raw", "theta_sq", "prior", "grad_sq", "rho"]
                          + [f"virial_temperature/{g}" for g in lay["groups"]]
                          + [f"virial_temperature/{m['name']}" for m in modules]
                          + [f"gauge_gap/{m['name']}" for m in modules]
                          + (["gauge_gap"] if modules else []))
        self._lay = lay
        self._layout_key = key
        if ids_changed:
            self._center = F.WindowCenter(self.center_window, self.center_mode)
            self._block = None
            self._block_sum = self._block_sq = None
            self._block_len = self._num_blocks = 0
            self._power_vec = None
        return params, lay

    @torch.no_grad()
    def _observe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        views = self._views()
        if not views:
            self.burn_in_steps += 1
            self._micro = None
            self._step_done = "skipped"
            return
        if self._pending and self._key(views) != self._layout_key:
            self._flush(trainer, pl_module)  # the columns are about to change (e.g. a group starts sampling)
        params, lay = self._layout(views, pl_module)
        self.sampling_steps += 1
        step = self.sampling_steps - 1
        thetas = [p.detach() for p in params]
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        centers = self._center(thetas)
        lam = lay["lam_list"]
        force = [g + l * t if l else g for g, t, l in zip(grads, thetas, lam)]
        diff = torch._foreach_sub(thetas, centers)
        dots = torch.stack([(d * f).sum() for d, f in zip(diff, force)]).double()
        tsq = torch.stack([t.double().square().sum() for t in thetas])
        fsq = torch.stack([f.double().square().sum() for f in force])
        beta, numel = lay["beta"], lay["numel"]
        total = numel.sum()
        virial = (beta * dots).sum() / total
        raw = dots.sum() / total
        theta_sq = tsq.sum()
        prior = (0.5 * lay["lam"] * tsq).sum()
        group_virial = torch.zeros(lay["n_groups"], device=dots.device, dtype=torch.float64).index_add_(
            0, lay["group_of"], beta * dots) / lay["group_numel"]

        # Gradient square (configurational-temperature numerator) and noise ratio.
        m = self._micro
        rho = torch.tensor(float("nan"), device=dots.device, dtype=torch.float64)
        grad_sq = (beta * fsq).sum()
        k = trainer.accumulate_grad_batches
        if m is not None and m["count"] >= 2:
            c = m["count"]
            gbar = [g.double() * (k / c) for g in grads]
            gbar_sq_G = torch.stack([((gb * G.double()) * gb).sum() if G is not None else gb.square().sum()
                                     for gb, G in zip(gbar, lay["precond"])])
            tr_micro = (m["sq_G"].double() - c * gbar_sq_G) / (c - 1)
            tr_step = tr_micro * (c / k ** 2)
            lr_t = torch.tensor(lay["lr_list"], device=dots.device, dtype=torch.float64)
            rho = (lr_t * beta * tr_step).sum() / (2 * total)
            fbar = [gb + l * t.double() if l else gb for gb, t, l in zip(gbar, thetas, lam)]
            sum_sq = torch.stack([(c * f).square().sum() for f in fbar])
            grad_sq = (beta * (sum_sq - m["sq_f"].double()) / (c * (c - 1))).sum()
            self._grad_sq_unbiased += 1
        elif self.split_batch is not None and step % self.noise_every_n_steps == 0 and self._batch is not None:
            rho_v, gs = self._split_batch_estimate(trainer, pl_module, params, thetas, lay)
            if rho_v is not None:
                rho, grad_sq = rho_v, gs
                self._grad_sq_unbiased += 1
        self._micro = None
        self._grad_sq.append(grad_sq)

        cols = [virial.reshape(1), raw.reshape(1), theta_sq.reshape(1), prior.reshape(1),
                grad_sq.reshape(1).double(), rho.reshape(1), group_virial]
        mods = lay["modules"]
        if mods:
            ia = torch.tensor([mm["a"] for mm in mods], device=dots.device)
            ib = torch.tensor([mm["b"] for mm in mods], device=dots.device)
            mod_virial = (beta[ia] * dots[ia] + beta[ib] * dots[ib]) / (numel[ia] + numel[ib])
            r = torch.tensor([float(mm["r"]) for mm in mods], device=dots.device, dtype=torch.float64)
            io = torch.tensor([float(mm["fan_in"] - mm["fan_out"]) for mm in mods], device=dots.device,
                              dtype=torch.float64)
            lam_t = lay["lam"]
            gap = (beta[ia] * lam_t[ia] * tsq[ia] - beta[ib] * lam_t[ib] * tsq[ib]) / r - io
            cols += [mod_virial, gap, gap.mean().reshape(1)]
        self._pending.append(torch.cat(cols))
        self._step_done = "recorded"

        # Mean-force blocks.
        if self._block is None:
            self._block = [torch.zeros_like(f, dtype=torch.float64) for f in force]
            self._block_sum = [torch.zeros_like(b) for b in self._block]
            self._block_sq = [torch.zeros_like(b) for b in self._block]
        torch._foreach_add_(self._block, [f.double() for f in force])
        self._block_len += 1
        if self._block_len == self.block_size:
            means = torch._foreach_div(self._block, float(self.block_size))
            torch._foreach_add_(self._block_sum, means)
            torch._foreach_addcmul_(self._block_sq, means, means)
            self._num_blocks += 1
            for b in self._block:
                b.zero_()
            self._block_len = 0

        # Hessian-vector-product diagnostics.
        do_hvp = self.hvp_every_n_steps and step % self.hvp_every_n_steps == 0
        do_pow = self.lambda_max_every_n_steps and step % self.lambda_max_every_n_steps == 0
        if (do_hvp or do_pow) and (self._batch is not None or self.loss_fn is not None):
            self._hvp_diagnostics(trainer, pl_module, params, lay, do_hvp, do_pow)

    # -- closures over the current batch ------------------------------------------------------------
    @contextmanager
    def _replay(self, pl_module: LightningModule):
        """Silence ``self.log`` and restore the global RNG afterwards; yields a function that
        resets the RNG to the state at entry (so every replay draws the same dropout masks)."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and any(
            p.is_cuda for p in self._lay["params"]) else []
        with torch.random.fork_rng(devices=devices):
            cpu_state = torch.get_rng_state()
            cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

            def reset() -> None:
                torch.set_rng_state(cpu_state)
                for d, s in zip(devices, cuda_states):
                    torch.cuda.set_rng_state(s, d)

            saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
            pl_module.log = lambda *a, **k: None  # type: ignore[method-assign]
            pl_module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
            try:
                yield reset
            finally:
                for name, value in saved.items():
                    if value is None:
                        pl_module.__dict__.pop(name, None)
                    else:
                        pl_module.__dict__[name] = value

    def _loss_of(self, pl_module: LightningModule, batch: Any, batch_idx: int, reset: Callable[[], None]) -> Tensor:
        reset()
        if self.loss_fn is not None:
            out = self.loss_fn(pl_module, batch)
        else:
            out = pl_module.training_step(batch, batch_idx)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor):
            raise MisconfigurationException(
                "GibbsDiagnostics: training_step returned no loss tensor to differentiate; pass loss_fn=...")
        return loss

    def _split_batch_estimate(self, trainer, pl_module, params, thetas, lay):
        batch, batch_idx = self._batch
        halves = self.split_batch(batch)
        grads = []
        with self._replay(pl_module) as reset, torch.enable_grad():
            for half in halves:
                loss = self._loss_of(pl_module, half, batch_idx, reset)
                g = torch.autograd.grad(loss, params, allow_unused=True)
                grads.append([torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)])
        if len(grads) < 2:
            return None, None
        beta = lay["beta"]
        total = lay["numel"].sum()
        tr = torch.stack([F.minibatch_noise_trace([[g[i]] for g in grads],
                                                  precond=None if lay["precond"][i] is None else [lay["precond"][i]])
                          for i in range(len(params))]).double()
        lr_t = torch.tensor(lay["lr_list"], device=tr.device, dtype=torch.float64)
        rho = (lr_t * beta * tr).sum() / (2 * total)
        gs = torch.stack([F.gradient_square([thetas[i]], [[g[i]] for g in grads], weight_decay=lay["lam_list"][i])
                          for i in range(len(params))]).double()
        return rho, (beta * gs).sum()

    @torch.no_grad()
    def _hvp_diagnostics(self, trainer, pl_module, params, lay, do_hvp: bool, do_pow: bool) -> None:
        if self.loss_fn is None and not pl_module.automatic_optimization:
            return
        batch, batch_idx = self._batch if self._batch is not None else (None, 0)
        if self._generator is None or self._generator.device != params[0].device:
            self._generator = torch.Generator(device=params[0].device)
            self._generator.manual_seed(self.seed)
        method = "finite_difference" if self._hvp_fallback else self.hvp_method
        with self._replay(pl_module) as reset:
            hvp = F.HessianVectorProduct(lambda: self._loss_of(pl_module, batch, batch_idx, reset), params,
                                         method=method, fd_eps=self.fd_eps)
            lam = lay["lam_list"]
            if do_hvp:
                with torch.enable_grad():
                    lap = F.hutchinson_laplacian(hvp, params, num_probes=self.hutchinson_probes,
                                                 generator=self._generator)
                lap = float(lap) + sum(l * p.numel() for l, p in zip(lam, params))
                self._laplacians.append(lap)

            if do_pow:
                def hvp_u(vs):
                    with torch.enable_grad():
                        hv = hvp(vs)
                    return [h + l * v if l else h for h, v, l in zip(hv, vs, lam)]

                scale = [lr * (G if G is not None else 1.0) for lr, G in zip(lay["lr_list"], lay["precond"])]
                init = self._power_vec
                if init is not None and any(a.shape != p.shape for a, p in zip(init, params)):
                    init = None
                if init is None:
                    init = [torch.randn(p.shape, generator=self._generator, device=p.device, dtype=p.dtype)
                            for p in params]
                eig, vec = F.power_iteration(hvp_u, params, scale=scale, num_iters=self.power_iters, init=init)
                self._power_vec = vec
                self._eta_lambda_max = float(eig)
                if abs(self._eta_lambda_max) > self.step_size_warning:
                    rank_zero_warn(
                        f"GibbsDiagnostics: eta*lambda_max = {self._eta_lambda_max:.3g} > {self.step_size_warning:g} "
                        "at sampling step {}: the Langevin step is biased (unstable above 2); lower the learning "
                        "rate".format(self.sampling_steps), category=StepSizeWarning)
            if hvp.used_method == "finite_difference" and not self._hvp_fallback and method == "auto":
                self._hvp_fallback = True

    # -- logging -------------------------------------------------------------------------------------
    def _flush(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = torch.stack(self._pending).cpu().numpy()
        n = rows.shape[0]
        losses = torch.stack(self._pending_loss).cpu().numpy() if self._pending_loss else np.zeros(0)
        self._pending.clear()
        self._pending_loss.clear()
        cols = self._lay["columns"]
        for j, name in enumerate(cols):
            if name in ("prior", "grad_sq"):
                continue
            self.traces.setdefault(name, []).extend(rows[:, j].tolist())
        if losses.size == n:
            self.traces.setdefault("U", []).extend((losses + rows[:, cols.index("prior")]).tolist())
        metrics: dict[str, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(rows, axis=0)
        for j, name in enumerate(cols):
            if name in ("prior", "grad_sq") or not np.isfinite(means[j]):
                continue
            if "/" in name:
                kind, sub = name.split("/", 1)
                metrics[f"{PREFIX}/{sub}/{kind}"] = float(means[j])
            else:
                metrics[f"{PREFIX}/{name.replace('rho', 'noise_ratio')}"] = float(means[j])
        if losses.size == n and np.isfinite(losses).any():
            metrics[f"{PREFIX}/U"] = float(np.nanmean(losses + rows[:, cols.index("prior")]))
        if np.isfinite(means[cols.index("rho")]):
            valid = rows[:, cols.index("rho")]
            valid = valid[np.isfinite(valid)]
            self._rho_sum += float(valid.sum())
            self._rho_count += int(valid.size)
            metrics[f"{PREFIX}/noise_temperature"] = 1.0 + float(means[cols.index("rho")])
        chi2 = self._chi2()
        if chi2 is not None:
            metrics[f"{PREFIX}/mean_force_chi2"], metrics[f"{PREFIX}/mean_force_chi2_expected"] = chi2
        tc = self._config_temperature()
        if tc is not None:
            metrics[f"{PREFIX}/config_temperature"] = tc
            metrics[f"{PREFIX}/laplacian"] = self._laplacians[-1]
        if self._eta_lambda_max is not None:
            metrics[f"{PREFIX}/eta_lambda_max"] = self._eta_lambda_max
        metrics[f"{PREFIX}/sampling_steps"] = float(self.sampling_steps)
        metrics[f"{PREFIX}/burn_in_steps"] = float(self.burn_in_steps)
        self.last_logged = metrics
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _chi2(self) -> tuple[float, float] | None:
        m = self._num_blocks
        if m < 4 or self._block_sum is None:
            return None
        S = torch.cat([s.reshape(-1) for s in self._block_sum])
        Q = torch.cat([q.reshape(-1) for q in self._block_sq])
        mean = S / m
        var = ((Q - m * mean * mean) / (m - 1)).clamp_min(torch.finfo(torch.float64).tiny)
        return float((mean * mean * m / var).mean()), (m - 1) / (m - 3)

    def _config_temperature(self) -> float | None:
        if not self._laplacians or not self._grad_sq:
            return None
        if len(self._grad_sq) > 4096:  # keep memory bounded: fold old entries into one mean
            folded = torch.stack(self._grad_sq).mean()
            self._grad_sq = [folded]
        laplacian = float(np.mean(self._laplacians))
        if laplacian == 0.0:  # flat potential (e.g. zero loss, no decay): T_conf is undefined
            return None
        return float(torch.stack(self._grad_sq).mean()) / laplacian

    # -- report ------------------------------------------------------------------------------------
    @property
    def noise_ratio(self) -> float | None:
        return self._rho_sum / self._rho_count if self._rho_count else None

    def build_report(self, **kwargs: Any) -> StationarityReport:
        """The :func:`~langevin_lora.diagnostics.stationarity_report` of what was recorded so far
        (keyword arguments override the thresholds)."""
        lay = getattr(self, "_lay", None)
        beta = lr = wd = None
        relax: dict[str, float] = {}
        if lay is not None:
            beta, lr, wd = lay["beta_list"][0], lay["lr_list"][0], lay["lam_list"][0]
            for mm in lay["modules"]:
                ia, ib = mm["a"], mm["b"]
                lam_a, lr_a = lay["lam_list"][ia], lay["lr_list"][ia]
                if lam_a > 0 and lay["precond"][ia] is None and lay["precond"][ib] is None:
                    relax[mm["name"]] = 1.0 / (2 * lam_a * lr_a)
        note_rho = None if self.noise_ratio is not None else NOISE_HOW_TO
        tc_note = None
        if self._laplacians and self._grad_sq_unbiased == 0:
            tc_note = ("its numerator |g + lambda theta|^2 includes the minibatch noise tr(Sigma_B) (biased upward "
                       "unless full-batch); " + NOISE_HOW_TO)
        chi2 = self._chi2()
        args = dict(traces=self.traces, beta=beta, lr=lr, weight_decay=wd,
                    noise_ratio=self.noise_ratio, noise_ratio_note=note_rho,
                    config_temperature=self._config_temperature(), config_temperature_note=tc_note,
                    eta_lambda_max=self._eta_lambda_max, mean_force_chi2=chi2,
                    gauge_relaxation_steps=relax, steps=self.sampling_steps)
        args.update(kwargs)
        rep = stationarity_report(**args)
        rep.summary["burn_in_steps"] = self.burn_in_steps
        if self._laplacians:
            rep.summary["hvp_evaluations"] = len(self._laplacians)
        return rep
