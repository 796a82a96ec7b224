r"""``GibbsRecorder``: the live Gibbs diagnostics of a Langevin chain, without a Trainer.

Feed it, once per optimizer step at the point where :math:`\theta` and its gradient agree (the
final gradient, before the Langevin step), the sampler's
:class:`~langevin_lora.core.view.LangevinGroupView` list, the gradients (default: ``p.grad``) and the
loss; it updates the THEORY §3 estimators through the functions of
:mod:`langevin_lora.diagnostics.functional` and the accumulators of
:mod:`langevin_lora.diagnostics.accumulators`, keeps one row of per-step values per step on the
device, and on :meth:`~GibbsRecorder.flush` (one host sync) appends them to its traces and returns
the window means. A custom loop::

    rec = GibbsRecorder(center_window=200)
    for batch in loader:
        loss = model_loss(batch); loss.backward()
        rec.record(opt.langevin_groups(), loss=loss)      # before opt.step()
        opt.step(); opt.zero_grad()
        if rec.pending >= 10:
            print(rec.flush())
    report = stationarity_report(**rec.report_arguments())

Per step (no extra forward pass): the centred virial temperature (global, per group, per LoRA
module), the potential :math:`U = \hat L + \sum\tfrac{\lambda}{2}\lVert\theta - \theta_0\rVert^2`,
:math:`\lVert\theta\rVert^2`, the mean-force blocks, the gauge gap per LoRA module, and
:math:`\lVert\nabla U\rVert^2` (unbiased, with :math:`\rho`, when two or more gradient estimates
were given through :meth:`~GibbsRecorder.observe_micro_batch` or ``micro_grads``).

**Prior centre** (a view's ``prior_centre`` :math:`\theta_0`, THEORY §6): the force is
:math:`\nabla U = g + \lambda(\theta - \theta_0)` and every identity that needs only
:math:`\nabla U` keeps its value (virial and configurational temperatures, mean force: the master
identity holds for any :math:`U`); they are computed in the shifted coordinates
:math:`\theta - \theta_0`. The gauge identity does not hold (the centred prior is not invariant
under :math:`(A, B) \mapsto (gA, Bg^{-1})`): modules with a centre get no gauge gap.

**Kinetic groups** (a view's ``friction``, BAOAB): the configuration :math:`\theta` recorded at the
pre-step point has law :math:`\pi_\beta` (exactly on Gaussian targets), so the identities above keep
their values. Added: the kinetic temperature :math:`\beta\,p^\top G^{-1}p/d` over the kinetic
tensors (``kinetic_temperature``; the stored momentum, taken before the closing half kick, is exactly
:math:`N(0, G/\beta)` on a Gaussian target at every stable :math:`h`, so its value is 1 up to
:math:`O(h^2)` on other targets and minibatch noise). The noise ratio of a kinetic tensor is
:math:`\rho = (h/\gamma)\beta\operatorname{tr}(G\Sigma_B)/(2d)` (the configurational temperature
rises by :math:`\rho`: one step injects :math:`h^2 G\Sigma_B G` into :math:`p` against the O-step's
:math:`(1-e^{-2\gamma h})G/\beta \approx 2\gamma h\,G/\beta`), and the step-size number is
:math:`(h^2/2)\lambda_{\max}` (:meth:`~GibbsRecorder.step_scale`: BAOAB is stable for
:math:`h^2\lambda_{\max}/4 < 1`, as the overdamped step for :math:`\eta\lambda_{\max}/2 < 1`, and in
the high-friction limit it is the overdamped step with :math:`\eta = h^2/2`). The Laplacian and
:math:`\eta\lambda_{\max}` come from :mod:`langevin_lora.diagnostics.probes`
(:meth:`~GibbsRecorder.add_laplacian`, :meth:`~GibbsRecorder.set_eta_lambda_max`).

:meth:`~GibbsRecorder.state_dict` holds everything: traces, pending rows, the virial centre, the
mean-force blocks, the running sums; a recorder loaded from it continues as if never interrupted.

(Over 400 lines on purpose: every estimator shares one pass over the groups' tensors per step and
one checkpoint state; the identities themselves are :mod:`langevin_lora.diagnostics.functional`'s.)
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from langevin_lora._validation import check_choice, check_int, check_version
from langevin_lora.core.curvature import batched_dot
from langevin_lora.diagnostics import functional as F
from langevin_lora.diagnostics.accumulators import BlockMeans, MicroBatchMoments, WindowCenter
from langevin_lora.diagnostics.layout import (
    KINETIC_COLUMN,
    Layout,
    LoraModule,
    build_layout,
    centres_of,
    momenta_of,
    precond_of,
    views_key,
)

__all__ = ["GibbsRecorder", "LoraModule"]

# Not traced: the prior (folded into U), the gradient square (a running sum) and the loss (U = loss + prior).
UNTRACED = ("prior", "grad_sq", "loss")
# State adopted at the first record() after load_state_dict (it needs the tensors' device and layout).
ADOPTED = ("signature", "center", "blocks")


class GibbsRecorder:
    r"""Running Gibbs-stationarity estimators of one chain (see the module docstring).

    Args:
        center_window: steps per window of the virial centre (:class:`WindowCenter`).
        center_mode: ``"expanding"`` (mean of all completed windows) or ``"previous"``.
        block_size: steps per block of the mean-force :math:`\chi^2` (default ``center_window``).
    """

    def __init__(self, *, center_window: int = 200, center_mode: str = "expanding",
                 block_size: int | None = None) -> None:
        self.center_window = check_int("center_window", center_window, low=1)
        self.center_mode = check_choice("center_mode", center_mode, WindowCenter.MODES)
        self.block_size = check_int("block_size", center_window if block_size is None else block_size, low=1)
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self.sampling_steps = 0
        self.burn_in_steps = 0
        self.traces: dict[str, list[float]] = {}
        self.laplacians: list[float] = []
        self.eta_lambda_max: float | None = None
        self._layout: Layout | None = None
        self._signature: tuple | None = None
        self._center = WindowCenter(self.center_window, self.center_mode)
        self._blocks = BlockMeans(self.block_size)
        self._micro = MicroBatchMoments()
        self._pending: list[Tensor] = []
        self._pending_columns: list[str] | None = None
        self._grad_sq_sum: Tensor | None = None
        self._grad_sq_count = 0
        self._grad_sq_unbiased = 0
        self._rho_sum = 0.0
        self._rho_count = 0
        self._restored: dict[str, Any] | None = None

    # -- what the caller reads --------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Rows recorded since the last :meth:`flush`."""
        return len(self._pending)

    @property
    def params(self) -> list[Tensor]:
        """The sampled tensors of the last recorded step, in row order."""
        return [] if self._layout is None else self._layout.params

    @property
    def weight_decay(self) -> list[float]:
        return [] if self._layout is None else self._layout.decay

    def step_scale(self) -> list[Tensor | float]:
        r"""Per tensor :math:`\eta G` (or :math:`\eta`): the scale of :math:`\eta\lambda_{\max}`; for a kinetic
        tensor :math:`(h^2/2) G`, the overdamped step with the same stability margin (module docstring)."""
        lay = self._layout
        if lay is None:
            return []
        eta = [lr if f is None else 0.5 * lr * lr for lr, f in zip(lay.lr, lay.friction)]
        return [e if G is None else e * G for e, G in zip(eta, lay.precond)]

    @property
    def noise_ratio(self) -> float | None:
        return self._rho_sum / self._rho_count if self._rho_count else None

    @property
    def gradient_square_unbiased(self) -> bool:
        """Whether any :math:`\\lVert\\nabla U\\rVert^2` came from two or more gradient estimates."""
        return self._grad_sq_unbiased > 0

    def mean_force_chi2(self) -> tuple[float, float] | None:
        return self._blocks.chi2()

    def config_temperature(self) -> float | None:
        r""":math:`\beta T_{\mathrm{conf}} = \overline{\beta\lVert\nabla U\rVert^2}/\overline{\Delta U}`."""
        if not self.laplacians or not self._grad_sq_count:
            return None
        laplacian = float(np.mean(self.laplacians))
        if laplacian == 0.0:  # flat potential (e.g. zero loss, no decay): T_conf is undefined
            return None
        return float(self._grad_sq_sum) / self._grad_sq_count / laplacian

    # -- feeding it ---------------------------------------------------------------------------------
    @staticmethod
    def sampling_groups(views: Iterable[Any]) -> list[Any]:
        """The groups that take Langevin steps now (finite beta, some tensors)."""
        return [v for v in views if v.sampling and math.isfinite(v.beta) and v.params]

    def skip(self) -> None:
        """An optimizer step with nothing sampling (burn-in): counted, nothing recorded."""
        self.burn_in_steps += 1
        self._micro.reset()

    def observe_micro_batch(self, views: Sequence[Any], grads: Sequence[Tensor], *, nominal: int) -> None:
        """One micro-batch gradient :math:`g^{(j)}` (an unbiased estimate of :math:`\\nabla\\hat L`,
        one tensor per sampled tensor of ``views``) of the coming step, whose gradient is normalised
        by ``nominal`` micro-batches."""
        views = self.sampling_groups(views)
        if not views:
            return
        thetas = self._shifted(views, [p.detach() for v in views for p in v.params])
        self._micro.add(thetas, grads, precond_of(views), [v.weight_decay for v in views for _ in v.params], nominal)

    def discard_micro_batches(self) -> None:
        """Forget the micro-batches observed so far (a new optimizer step begins)."""
        self._micro.reset()

    def add_laplacian(self, value: float) -> None:
        r"""One estimate of :math:`\Delta U` (configurational-temperature denominator)."""
        self.laplacians.append(float(value))

    def set_eta_lambda_max(self, value: float) -> None:
        self.eta_lambda_max = float(value)

    @torch.no_grad()
    def record(self, views: Sequence[Any], *, grads: Sequence[Tensor] | None = None, loss: Tensor | float | None = None,
               modules: Callable[[], Iterable[LoraModule]] | None = None,
               micro_grads: Sequence[Sequence[Tensor]] | None = None) -> dict[str, float] | None:
        r"""Record one optimizer step at its pre-step point.

        Args:
            views: the sampler's ``langevin_groups()``; groups not sampling are ignored (a step with
                none sampling counts as burn-in, :meth:`skip`).
            grads: gradients of the mean loss, one per sampled tensor (default ``p.grad``).
            loss: the step's mean loss :math:`\hat L` (for the :math:`U` trace).
            modules: called when the sampled tensors change: the LoRA modules to watch.
            micro_grads: two or more independent gradient estimates (lists like ``grads``), e.g.
                half-batches, for :math:`\rho` and the unbiased :math:`\lVert\nabla U\rVert^2`
                (used when no micro-batches were observed).

        Returns the window means of the rows flushed because the set of sampled tensors changed
        (their columns change), else ``None``.
        """
        views = self.sampling_groups(views)
        if not views:
            self.skip()
            return None
        flushed = self._ensure_layout(views, modules)
        lay = self._layout
        lay.lr = [v.lr for v in views for _ in v.params]
        params = lay.params
        thetas = [p.detach() for p in params]
        shifted = self._shifted(views, thetas) if lay.centred else thetas   # theta - theta_0
        if grads is None:
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        centers = self._center(shifted)
        forces: list[Tensor] = []
        for v, sl in zip(views, lay.group_slices):
            forces += F.mean_force(shifted[sl], grads[sl], weight_decay=v.weight_decay)
        dots = F.virial_sum(shifted, forces, centers, per_tensor=True).double()
        tsq = batched_dot(thetas, thetas, per_tensor=True).double()
        csq = batched_dot(shifted, shifted, per_tensor=True).double() if lay.centred else tsq
        beta, numel = lay.beta, lay.numel
        total = numel.sum()
        group_virial = torch.zeros_like(lay.group_numel).index_add_(0, lay.group_of, beta * dots) / lay.group_numel
        trace, grad_sq = self._noise_and_gradient_square(shifted, forces, micro_grads)
        rho = torch.full((), math.nan, dtype=torch.float64, device=dots.device)
        if trace is not None:   # a kinetic tensor's noise ratio has h / gamma in place of eta
            lr = torch.tensor([lr if f is None else lr / f for lr, f in zip(lay.lr, lay.friction)],
                              dtype=torch.float64, device=dots.device)
            rho = F.noise_ratio_from_traces(trace, lr=lr, beta=beta, num_coordinates=total).sum()
        grad_sq = (beta * grad_sq).sum()
        self._grad_sq_sum = grad_sq if self._grad_sq_sum is None else self._grad_sq_sum + grad_sq
        self._grad_sq_count += 1
        loss_t = (torch.full((), math.nan, dtype=torch.float64, device=dots.device) if loss is None else
                  torch.as_tensor(loss).detach().to(device=dots.device, dtype=torch.float64).reshape(()))
        head = [(beta * dots).sum() / total, dots.sum() / total, tsq.sum(), (0.5 * lay.lam * csq).sum(), grad_sq,
                rho, loss_t]
        if KINETIC_COLUMN in lay.columns:
            head.append(self._kinetic_temperature(views, dots.device))
        head = torch.stack(head)
        cols = [head, group_virial]
        if lay.mod_a.numel():
            a, b = lay.mod_a, lay.mod_b
            cols.append((beta[a] * dots[a] + beta[b] * dots[b]) / (numel[a] + numel[b]))
            gap = F.gauge_gap_from_norms(tsq[a], tsq[b], rank=lay.mod_rank, fan_in=lay.mod_in, fan_out=lay.mod_out,
                                         coef_A=beta[a] * lay.lam[a], coef_B=beta[b] * lay.lam[b])
            cols += [gap, gap.mean().reshape(1)]
        self._pending.append(torch.cat(cols))
        self._blocks.update(forces)
        self.sampling_steps += 1
        return flushed

    @staticmethod
    def _shifted(views: Sequence[Any], thetas: list[Tensor]) -> list[Tensor]:
        """:math:`\theta - \theta_0` per tensor (``thetas`` itself where the prior is centred at 0)."""
        return [t if c is None else t - c.to(t.dtype) for t, c in zip(thetas, centres_of(views))]

    def _kinetic_temperature(self, views: Sequence[Any], device: torch.device) -> Tensor:
        r""":math:`\sum_i \beta_i p_i^\top G_i^{-1} p_i / \sum_i d_i` over the tensors with a momentum (NaN: none yet)."""
        lay = self._layout
        idx = [i for i, m in enumerate(momenta_of(views)) if m is not None]
        if not idx:
            return torch.full((), math.nan, dtype=torch.float64, device=device)
        moms = [m for m in momenta_of(views) if m is not None]
        scaled = [m if lay.precond[i] is None else m / lay.precond[i] for i, m in zip(idx, moms)]
        sq = batched_dot(moms, scaled, per_tensor=True).double()
        sel = torch.tensor(idx, dtype=torch.long, device=lay.beta.device)
        return (lay.beta[sel] * sq).sum() / lay.numel[sel].sum()

    def _noise_and_gradient_square(self, thetas: list[Tensor], forces: list[Tensor],
                                   micro_grads: Sequence[Sequence[Tensor]] | None) -> tuple[Tensor | None, Tensor]:
        """Per tensor: the noise trace of the step's gradient (``None`` without two estimates) and
        :math:`\\lVert\\nabla U\\rVert^2` (unbiased with two estimates, else :math:`\\lVert f\\rVert^2`)."""
        lay = self._layout
        micro, self._micro = self._micro, MicroBatchMoments()
        if micro.count >= 2:
            self._grad_sq_unbiased += 1
            return micro.finish(thetas, lay.precond, lay.decay)
        if micro_grads is not None and len(micro_grads) >= 2:
            traces, squares = [], []
            for sl, lam in zip(lay.group_slices, (lay.decay[s.start] for s in lay.group_slices)):
                mg = [list(g)[sl] for g in micro_grads]
                pre = lay.precond[sl]
                traces.append(F.minibatch_noise_trace(mg, precond=None if any(G is None for G in pre) else pre,
                                                      per_tensor=True))
                squares.append(F.gradient_square(thetas[sl], mg, weight_decay=lam, per_tensor=True).double())
            self._grad_sq_unbiased += 1
            return torch.cat(traces), torch.cat(squares)
        return None, F.gradient_square(thetas, [forces], per_tensor=True).double()

    def _ensure_layout(self, views: list[Any], modules: Callable[[], Iterable[LoraModule]] | None) -> dict | None:
        """(Re)build the layout when the sampled tensors or their hyperparameters change; reset the
        running state when the group names or shapes change (or adopt a loaded state that matches)."""
        key = views_key(views)
        if self._layout is not None and key == self._layout.key:
            return None
        layout = build_layout(views, modules() if modules is not None else (), key)
        flushed = self.flush() if self._pending and layout.columns != self._pending_columns else None
        self._layout = layout
        self._pending_columns = layout.columns
        if layout.signature != self._signature or self._restored is not None:
            self._adopt_or_reset(layout.signature, layout.params[0].device)
        return flushed

    def _adopt_or_reset(self, signature: tuple, device: torch.device) -> None:
        restored, self._restored = self._restored, None
        self._signature = signature
        if restored is not None and restored["signature"] == signature:
            self._center.load_state_dict(restored["center"], device)
            self._blocks.load_state_dict(restored["blocks"], device)
            self._pending = [r.to(device) for r in self._pending]
            if self._grad_sq_sum is not None:
                self._grad_sq_sum = self._grad_sq_sum.to(device)
            return
        if restored is not None and restored["signature"] is not None:   # (None: saved before sampling began)
            warnings.warn("GibbsRecorder: the loaded diagnostics state was recorded on other tensors (group names "
                          "or shapes differ); the virial centre and mean-force blocks restart", RuntimeWarning,
                          stacklevel=3)
        self._center = WindowCenter(self.center_window, self.center_mode)
        self._blocks = BlockMeans(self.block_size)

    def new_target(self) -> None:
        """The sampler moved to another target (e.g. another prior scale): the estimators that average
        over the chain (virial centre, mean-force blocks, configurational temperature) restart; the
        traces go on, so a report can still judge any stretch of them."""
        self._center = WindowCenter(self.center_window, self.center_mode)
        self._blocks = BlockMeans(self.block_size)
        self.laplacians = []
        self._grad_sq_sum, self._grad_sq_count = None, 0

    # -- output -------------------------------------------------------------------------------------
    def flush(self) -> dict[str, float]:
        """Append the pending rows to :attr:`traces` and return their window means (keys such as
        ``virial_temperature``, ``<group>/virial_temperature``, ``<module>/gauge_gap``, ``noise_ratio``,
        ``U``) with the running statistics (``mean_force_chi2``, ``config_temperature``, ...)."""
        metrics: dict[str, float] = {}
        if self._pending:
            rows = torch.stack(self._pending).cpu().numpy()
            self._pending.clear()
            metrics.update(self._absorb(rows, self._pending_columns))
        chi2 = self.mean_force_chi2()
        if chi2 is not None:
            metrics["mean_force_chi2"], metrics["mean_force_chi2_expected"] = chi2
        tc = self.config_temperature()
        if tc is not None:
            metrics["config_temperature"] = tc
            metrics["laplacian"] = self.laplacians[-1]
        if self.eta_lambda_max is not None:
            metrics["eta_lambda_max"] = self.eta_lambda_max
        metrics["sampling_steps"] = float(self.sampling_steps)
        metrics["burn_in_steps"] = float(self.burn_in_steps)
        return metrics

    def _absorb(self, rows: np.ndarray, cols: list[str]) -> dict[str, float]:
        for j, name in enumerate(cols):
            if name not in UNTRACED:
                self.traces.setdefault(name, []).extend(rows[:, j].tolist())
        u = rows[:, cols.index("loss")] + rows[:, cols.index("prior")]
        if np.isfinite(u).any():
            self.traces.setdefault("U", []).extend(u.tolist())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(rows, axis=0)
        metrics: dict[str, float] = {}
        for j, name in enumerate(cols):
            if name in UNTRACED or not np.isfinite(means[j]):
                continue
            if "/" in name:
                kind, sub = name.split("/", 1)
                metrics[f"{sub}/{kind}"] = float(means[j])
            else:
                metrics["noise_ratio" if name == "rho" else name] = float(means[j])
        if np.isfinite(u).any():
            metrics["U"] = float(np.nanmean(u))
        rho = rows[:, cols.index("rho")]
        rho = rho[np.isfinite(rho)]
        if rho.size:
            self._rho_sum += float(rho.sum())
            self._rho_count += int(rho.size)
            metrics["noise_temperature"] = 1.0 + float(rho.mean())
        return metrics

    def report_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~langevin_lora.diagnostics.stationarity_report` for what was
        recorded (flush first to include the pending rows)."""
        lay = self._layout
        beta = lr = wd = None
        relax: dict[str, float] = {}
        if lay is not None:
            # The autocorrelation Poincare bounds and the gauge relaxation time 1/(2 lambda eta) are those of
            # the overdamped dynamics: not passed for kinetic chains.
            kinetic = any(f is not None for f in lay.friction)
            beta, lr, wd = float(lay.beta[0]), None if kinetic else lay.lr[0], lay.decay[0]
            names = [c.split("/", 1)[1] for c in lay.columns if c.startswith("gauge_gap/")]
            for name, a, b in zip(names, lay.mod_a.tolist(), lay.mod_b.tolist()):
                if lay.decay[a] > 0 and lay.precond[a] is None and lay.precond[b] is None and not kinetic:
                    relax[name] = 1.0 / (2 * lay.decay[a] * lay.lr[a])
        return dict(traces=self.traces, beta=beta, lr=lr, weight_decay=wd, noise_ratio=self.noise_ratio,
                    config_temperature=self.config_temperature(), eta_lambda_max=self.eta_lambda_max,
                    mean_force_chi2=self.mean_force_chi2(), gauge_relaxation_steps=relax, steps=self.sampling_steps)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything, as tensors and builtins (``weights_only`` checkpoint loading works)."""
        state = {
            "version": 2, "sampling_steps": self.sampling_steps, "burn_in_steps": self.burn_in_steps,
            "traces": {k: list(v) for k, v in self.traces.items()}, "laplacians": list(self.laplacians),
            "eta_lambda_max": self.eta_lambda_max, "rho_sum": self._rho_sum, "rho_count": self._rho_count,
            "grad_sq_sum": None if self._grad_sq_sum is None else self._grad_sq_sum.detach().cpu().clone(),
            "grad_sq_count": self._grad_sq_count, "grad_sq_unbiased": self._grad_sq_unbiased,
            "signature": self._signature, "columns": self._pending_columns,
            "pending": [r.detach().cpu().clone() for r in self._pending],
            "center": self._center.state_dict(), "blocks": self._blocks.state_dict(),
        }
        if self._restored is not None:  # loaded, not yet adopted by a record(): pass its tensors on
            state.update({k: self._restored[k] for k in ADOPTED})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The virial centre and the mean-force blocks are adopted at the
        next :meth:`record`, once the sampled tensors are known and match the saved ones."""
        version = check_version("GibbsRecorder", state, 2, missing=1)
        self.reset()
        self.sampling_steps, self.burn_in_steps = state["sampling_steps"], state["burn_in_steps"]
        self.traces = {k: list(v) for k, v in state["traces"].items()}
        self.laplacians = list(state["laplacians"])
        self.eta_lambda_max = state["eta_lambda_max"]
        self._rho_sum, self._rho_count = state["rho_sum"], state["rho_count"]
        if version < 2:  # written before the complete state existed
            return
        self._grad_sq_sum, self._grad_sq_count = state["grad_sq_sum"], state["grad_sq_count"]
        self._grad_sq_unbiased = state["grad_sq_unbiased"]
        self._pending = [r.clone() for r in state["pending"]]
        self._pending_columns = state["columns"]
        self._restored = {k: state[k] for k in ADOPTED}
