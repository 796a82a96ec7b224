r"""The Langevin step size from the measured curvature (THEORY §2–3).

A Langevin chain's stable step is set by the top eigenvalue of the preconditioned Hessian of the
potential, :math:`\lambda_{\max} = \lambda_{\max}(G^{1/2}\nabla^2 U\,G^{1/2})`,
:math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2`, not by an optimiser's learning rate
(AdamW's :math:`\eta G` is a descent step, 10–100× too long for a stable chain; on the MiniLM LoRA of
issue 13 with :math:`G` frozen from AdamW, up to 1000× too long). The automatic step is

.. math::
    \eta = \frac{c}{\lambda_{\max}} \quad\text{(overdamped, } c = 0.1\text{)}, \qquad
    h = \frac{c_k}{\sqrt{\lambda_{\max}}} \quad\text{(kinetic BAOAB, friction } \gamma > 0,\ c_k = 0.5\text{)}.

One bound rules both: the step number :math:`s` (:func:`step_number`: :math:`\eta\lambda_{\max}`, or
:math:`\tfrac{h^2}{2}\lambda_{\max}` kinetic) of the automatic step is at most
:data:`STEP_ACCURACY_BOUND` / :data:`AUTO_STEP_MARGIN` = 0.25 / 2 (kinetic: :math:`s = c_k^2/2 = 0.125`,
exactly that; overdamped: :math:`s = c = 0.1`, below it because its bias is first order), at least
half the bound the diagnostics' step check applies, so the automatic step passes that check even when
:math:`\lambda_{\max}` re-measured later is up to 2× larger (2.5× overdamped). Before issue 19 the
check's bound was 0.1, which every kinetic run failed (0.125) and every overdamped one met exactly.

**The bias these constants buy.** Overdamped ULA on a Gaussian (Hessian :math:`H`) is stable for
:math:`\eta\lambda_{\max} < 2` and samples :math:`N(\mu, \beta^{-1}[H(I - \eta H/2)]^{-1})` (THEORY §5):
the configurational temperature is :math:`\beta T_{\mathrm{conf}} \approx 1 + \tfrac{\eta}{2}
\operatorname{tr}(H^2)/\operatorname{tr}(H) \le 1 + \tfrac{\eta\lambda_{\max}}{2} = 1 + c/2`, so
:math:`c = 0.1` bounds the bias by 5%, and far less when the spectrum has a few outliers (the LoRA
case: :math:`\operatorname{tr}H^2/\operatorname{tr}H \ll \lambda_{\max}`); the top mode's variance is
inflated by :math:`1/(1 - c/2)` = 5.3%. Kinetic BAOAB is stable for :math:`h\sqrt{\lambda_{\max}} < 2`
and its configurational law is exact for Gaussians at any stable :math:`h`; for non-Gaussian
potentials the bias is :math:`O(h^2)`. Measured on a MiniLM LoRA posterior (research helper,
issue 13; configurational bias of :math:`\beta T_{\mathrm{conf}}`): kinetic :math:`c_k = 0.5` below 1%,
:math:`c_k = 1` about 3%, :math:`c_k = 2` runs away; overdamped :math:`c = 0.1` the same as kinetic 0.5
(below 1%), :math:`c = 0.5` about 8%, :math:`c = 2` diverges. Hence the defaults
:data:`OVERDAMPED_SAFETY` and :data:`KINETIC_SAFETY`: a factor 20 (overdamped) and 4 (kinetic) below
the divergence point, at a bias below 1% on that posterior and at most 5% (overdamped) on any
quadratic.

**Measurement.** :func:`langevin_lora.core.curvature.top_eigenvalue`: power iteration on Hessian-vector
products of a loss closure (double backward where the model supports it, central differences of
gradients where it does not, e.g. fused attention kernels on CPU), with the prior's
:math:`\lambda I` added and the frozen :math:`G` as the scale; the absolute value of the dominant
Rayleigh quotient is used (a large negative curvature limits the step's accuracy too), and never
less than the prior's own curvature :math:`\max_i\lambda_i G_i` (:func:`prior_curvature`: exact
along the directions where the loss is flat, which power iteration reaches slowly when a clamped
Adam :math:`G` is largest there).

**Cost, in gradient evaluations** (one forward + backward pass of the closure, i.e. of the probe
batch): ``num_iters`` products of 2 evaluations each by finite differences; by double backward one
evaluation builds the gradient graph and each product is one backward pass through it (counted
as 1; it costs about 1–2). The power iteration stops early once the Rayleigh quotient moves by
less than ``rtol`` (relative). Measured (benchmarks/RESULTS.md, "Automatic step size"): 15–40
evaluations of the probe batch for a first measurement, 4–10 for a warm-started re-measurement.

For a custom loop, :func:`auto_step_size` does the same from a closure::

    est = auto_step_size(closure, params, precond=G, weight_decay=lam)
    for g in opt.param_groups:
        g["lr"] = est.step_size
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from langevin_lora._docs import readable_docstring
from langevin_lora._validation import check_int, check_positive, check_real
from langevin_lora.core import sharding
from langevin_lora.core.curvature import HessianVectorProduct, top_eigenvalue
from langevin_lora.core.functional import check_friction

__all__ = ["AUTO_STEP_MARGIN", "KINETIC_SAFETY", "OVERDAMPED_SAFETY", "STEP_ACCURACY_BOUND", "AutoStepSize",
           "NonFiniteLossError", "StepSizeEstimate", "StepSizeWarning", "auto_step_size", "prior_curvature", "step_from_lambda_max", "step_number",
           "step_remedy"]

#: The accuracy bound, the one definition shared by the automatic step and the diagnostics' step
#: check (:func:`step_number`, :func:`langevin_lora.diagnostics.checks.check_step_size`): a step
#: passes when its step number :math:`s` (:math:`\eta\lambda_{\max}` overdamped,
#: :math:`\tfrac{h^2}{2}\lambda_{\max}` kinetic) is at most this (overdamped bias
#: :math:`\beta T_{\mathrm{conf}} - 1 \le s/2 \le 10\%` on any quadratic; both integrators are
#: stable up to :math:`s = 2`).
STEP_ACCURACY_BOUND = 0.25
#: The automatic step's step number is at most :data:`STEP_ACCURACY_BOUND` / ``AUTO_STEP_MARGIN``: a
#: :math:`\lambda_{\max}` re-measured later (another batch, a later point of the chain) may be up
#: to this factor larger before the check fails.
AUTO_STEP_MARGIN = 2.0
#: :math:`c_k` in :math:`h = c_k/\sqrt{\lambda_{\max}}` (kinetic BAOAB, stable below 2): the step number
#: :math:`c_k^2/2` is exactly :data:`STEP_ACCURACY_BOUND` / :data:`AUTO_STEP_MARGIN` = 0.125, so 0.5.
KINETIC_SAFETY = math.sqrt(2.0 * STEP_ACCURACY_BOUND / AUTO_STEP_MARGIN)
#: :math:`c` in :math:`\eta = c/\lambda_{\max}` (overdamped, step number :math:`s = c`):
#: :math:`\beta T_{\mathrm{conf}} - 1 \le c/2`; 0.1, below the 0.125 the bound allows (a first-order bias).
OVERDAMPED_SAFETY = 0.1
assert OVERDAMPED_SAFETY <= STEP_ACCURACY_BOUND / AUTO_STEP_MARGIN
#: The largest ``safety`` (:math:`c` or :math:`c_k`) accepted: both integrators diverge at 2.
MAX_SAFETY = 2.0


def step_number(step_size: float, lambda_max: float, *, kinetic: bool = False) -> float:
    r"""The step number :math:`s` the accuracy bound :data:`STEP_ACCURACY_BOUND` applies to:
    :math:`\eta\lambda_{\max}` (overdamped) or :math:`\tfrac{h^2}{2}\lambda_{\max}` (kinetic BAOAB, the
    overdamped step it matches at high friction, with the same stability margin :math:`s < 2`)."""
    return (0.5 * step_size * step_size if kinetic else step_size) * lambda_max


def step_remedy(ratio: float | None = None) -> str:
    """What to change when the step number exceeds :data:`STEP_ACCURACY_BOUND` (``ratio``: by how much)."""
    by = "" if ratio is None or not math.isfinite(ratio) else f" by a factor of about {ratio:.2g}"
    return (f"shorten the Langevin step{by}: under step_size='auto' lower step_safety (LangevinLoRA, "
            "LangevinSGD/LangevinAdam; the learning rate does not set the step there), else lower the float "
            "step_size, or the learning rate with step_size='optimizer' (LangevinLoRA) / 'lr' (the optimizers)")


def check_safety(value: object, name: str = "step_safety") -> float:
    """``step_safety`` (:math:`c` / :math:`c_k`) must lie in ``(0, 2)``: both integrators diverge at 2."""
    return check_real(name, value, low=0.0, high=MAX_SAFETY, low_open=True, high_open=True)


def step_from_lambda_max(lambda_max: float, *, friction: float | None = None, safety: float | None = None) -> float:
    r"""The step for a measured :math:`\lambda_{\max} > 0`: :math:`c/\lambda_{\max}` without ``friction``,
    :math:`c_k/\sqrt{\lambda_{\max}}` with it; ``safety`` overrides :math:`c` / :math:`c_k`.

    Example:
        >>> step_from_lambda_max(50.0)
        0.002
        >>> step_from_lambda_max(100.0, friction=1.0)
        0.05
    """
    lam = check_real("lambda_max", lambda_max, low=0.0, low_open=True)
    kinetic = check_friction(friction) is not None
    c = (KINETIC_SAFETY if kinetic else OVERDAMPED_SAFETY) if safety is None else check_safety(safety)
    return c / math.sqrt(lam) if kinetic else c / lam


def prior_curvature(params: Sequence[Tensor], precond: Sequence[Tensor | float] | None,
                    weight_decay: float | Sequence[float]) -> float:
    r""":math:`\max_i \lambda_i G_i`: the prior's own curvature in the preconditioned metric, the exact
    :math:`\lambda_{\max}` along any coordinate where the loss is flat (LoRA's null and gauge
    directions), and a free lower bound that power iteration may take many products to reach when
    :math:`G` is largest where the loss has no curvature (a clamped Adam :math:`G`)."""
    decay = list(weight_decay) if isinstance(weight_decay, (list, tuple)) else [weight_decay] * len(params)
    scale = list(precond) if precond is not None else [1.0] * len(params)
    out = 0.0
    for lam, G in zip(decay, scale):
        if lam:
            out = max(out, float(lam) * (float(G.max()) if torch.is_tensor(G) else float(G)))
    return out


@dataclass
class StepSizeEstimate:
    """Result of :func:`auto_step_size`.

    Attributes:
        step_size: :math:`\\eta` (or :math:`h` with friction) from :func:`step_from_lambda_max`.
        lambda_max: :math:`|\\lambda_{\\max}(G^{1/2}\\nabla^2 U G^{1/2})|` as measured.
        grad_evals: gradient evaluations of the closure spent (module docstring).
        products: Hessian-vector products taken.
        method: ``"double_backward"`` or ``"finite_difference"``.
        vector: the unit top eigenvector (``init`` of the next, warm-started measurement).
    """

    step_size: float
    lambda_max: float
    grad_evals: int
    products: int
    method: str | None
    vector: list[Tensor] = field(repr=False)

    def __repr__(self) -> str:   # the eigenvector is shown by its shapes, not its values
        shapes = ", ".join("x".join(map(str, v.shape)) or "scalar" for v in self.vector)
        return (f"StepSizeEstimate(step_size={self.step_size:.4g}, lambda_max={self.lambda_max:.4g}, "
                f"grad_evals={self.grad_evals}, products={self.products}, method={self.method!r}, "
                f"vector=[{len(self.vector)} tensors: {shapes}])")


def auto_step_size(closure: Callable[[], Tensor], params: Sequence[Tensor], *,
                   precond: Sequence[Tensor | float] | None = None, weight_decay: float | Sequence[float] = 0.0,
                   friction: float | None = None, safety: float | None = None, num_iters: int = 20,
                   rtol: float | None = 0.01, init: Sequence[Tensor] | None = None,
                   generator: torch.Generator | None = None, method: str = "auto",
                   fd_eps: float = 1e-3, backward_closure: bool = False) -> StepSizeEstimate:
    r"""Measure :math:`\lambda_{\max}(G^{1/2}\nabla^2 U\,G^{1/2})` at the current ``params`` and return
    the Langevin step it allows (module docstring), for custom loops.

    Args:
        closure: ``() -> loss``, the mean loss :math:`\hat L` on a fixed probe batch; it must be the
            same function of ``params`` at every call (fix dropout masks, e.g. with
            :class:`~langevin_lora.core.curvature.RngSnapshot`). Called ``grad_evals`` times.
        params: the sampled tensors (``requires_grad``).
        precond: the frozen :math:`G` per tensor (tensor or number), or ``None`` (:math:`G = 1`).
        weight_decay: :math:`\lambda`, one number or one per tensor.
        friction: ``None`` (overdamped) or :math:`\gamma > 0` / ``"auto"`` (kinetic: :math:`h = c_k/\sqrt{\lambda_{\max}}`).
        safety: :math:`c` (overdamped) or :math:`c_k` (kinetic); default :data:`OVERDAMPED_SAFETY` /
            :data:`KINETIC_SAFETY`.
        num_iters, rtol, init, generator: of the power iteration (``init``: a previous ``vector``).
        method, fd_eps: of the Hessian-vector products (:class:`~langevin_lora.core.curvature.HessianVectorProduct`).
        backward_closure: ``closure`` is a torch optimizer closure (zero_grad, loss, ``backward()``,
            return the loss): gradients are read from ``.grad`` (finite differences; the ``.grad`` it
            writes are the caller's to save and restore).

    Sharded ``params`` (FSDP2 / DTensor; every rank calls it): ``precond`` holds the local shards of
    :math:`G` (as the engine keeps them), gathered here; the products are finite differences on the
    shards with full probe vectors (:class:`~langevin_lora.core.curvature.ShardedHVP`), so the estimate
    is the unsharded finite-difference one bit for bit given the same gradients; they write ``.grad``
    (without ``backward_closure`` too): the caller saves and restores them. ``vector`` is full.

    Raises :class:`NonFiniteLossError` (a ``ValueError``) naming the cause when the parameters or the
    probe loss are inf/NaN (e.g. a NaN batch during burn-in), and ``ValueError`` when
    :math:`\lambda_{\max}` is not a finite positive number otherwise (a flat potential): then no step
    follows from the curvature.
    """
    check_friction(friction)
    params = list(params)
    full = params
    if any(sharding.is_sharded(p) for p in params):   # FSDP2: the full tensors (small LoRA factors) for the
        # checks, G's maximum and the power iteration's vectors; G given as local shards, like the engine's
        full = [sharding.full_tensor(p.detach()) for p in params]
        if precond is not None:
            precond = [sharding.full_tensor(G, sharding.shard_spec(p)) if torch.is_tensor(G) and sharding.is_sharded(p)
                       else G for G, p in zip(precond, params)]
    _check_finite_start(full)
    with torch.enable_grad():
        res = top_eigenvalue(closure, params, scale=precond, weight_decay=weight_decay, num_iters=num_iters,
                             rtol=rtol, init=init, generator=generator, method=method, fd_eps=fd_eps,
                             backward_closure=backward_closure)
    lam = max(abs(float(res.eigenvalue)), prior_curvature(full, precond, weight_decay))
    if not math.isfinite(lam):
        _check_finite_loss(closure, backward_closure)   # names a non-finite probe loss; else the message below
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"Invalid lambda_max: measured {lam!r} (expected a finite positive top eigenvalue of "
                         "G^1/2 Hess U G^1/2; is the loss finite and the prior weight_decay > 0?); pass a float "
                         "step size instead")
    evals = res.loss_evaluations + (res.products if res.method == "double_backward" else 0)
    return StepSizeEstimate(step_from_lambda_max(lam, friction=friction, safety=safety), lam, evals,
                            res.products, res.method, res.vector)


class StepSizeWarning(UserWarning):
    r"""The Langevin step is too long for the measured curvature (step number above
    :data:`STEP_ACCURACY_BOUND`), or ``step_size="auto"`` could not measure it; the message says what to change."""


class NonFiniteLossError(ValueError):
    """The parameters or the probe loss are inf/NaN where the step size is measured: no curvature
    (and no step) follows from them."""


def _check_finite_start(params: Sequence[Tensor]) -> None:
    """Refuse a measurement at non-finite parameters or loss with the cause, before power iteration
    turns it into a meaningless ``lambda_max = nan``."""
    with torch.no_grad():
        bad = [i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(
            f"Invalid parameters: {len(bad)} of the {len(params)} sampled tensors hold inf/NaN where sampling starts "
            "(a non-finite loss or gradient during burn-in reached them: your optimizer does not skip such "
            "steps). Find the batch with a non-finite loss (e.g. torch.autograd.set_detect_anomaly, or skip it in "
            "training_step), or lower the burn-in learning rate; a float step_size does not help, the parameters "
            "themselves are broken")

def _check_finite_loss(closure: Callable[[], Tensor], backward_closure: bool = False) -> None:
    with torch.enable_grad():
        loss = closure()
    value = float(loss.detach().float().sum()) if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"Invalid probe loss: {value!r} at finite parameters where the step size is measured (a batch of the probe "
            "set gives a non-finite loss: check the data of the last burn-in batches, e.g. empty or NaN inputs, or "
            "pass loss_fn=...); a float step_size skips the measurement but the training loss is broken too")


@readable_docstring
class AutoStepSize:
    r"""The automatic step of a front-end over a chain: measured when sampling starts and again every
    ``every_n_steps`` Langevin steps (warm-started from the previous eigenvector, ``warm_iters``
    products at most), with its state saved for an exact resume.

    Args:
        safety: :math:`c` / :math:`c_k` (default: :data:`OVERDAMPED_SAFETY` / :data:`KINETIC_SAFETY`).
        every_n_steps: Langevin steps between re-measurements (0: only at sampling start).
        num_iters: products of the first measurement (at most; ``rtol`` may stop it earlier).
        warm_iters: products of a warm-started re-measurement (at most).
        rtol: relative change of the Rayleigh quotient that ends the power iteration.
        method, fd_eps: of the Hessian-vector products; ``"auto"`` falls back to finite differences
            for good once double backward fails.
        seed: seed of the first random vector (the global RNG is never used).

    Attributes:
        lambda_max, step_size: of the last measurement (``None`` before the first).
        grad_evals: gradient evaluations spent on all measurements so far.
        seconds: wall time spent on them.
        measurements: how many measurements were taken.
    """

    def __init__(self, *, safety: float | None = None, every_n_steps: int = 1000, num_iters: int = 20,
                 warm_iters: int = 8, rtol: float = 0.01, method: str = "auto", fd_eps: float = 1e-3,
                 seed: int = 0) -> None:
        # Named as LangevinLoRA and the optimizers take them (step_safety, step_size_every_n_steps).
        self.safety = None if safety is None else check_safety(safety)
        self.every_n_steps = check_int("step_size_every_n_steps", every_n_steps, low=0)
        self.num_iters = check_int("num_iters", num_iters, low=1)
        self.warm_iters = check_int("warm_iters", warm_iters, low=1)
        self.rtol = check_positive("rtol", rtol)
        if method not in HessianVectorProduct.METHODS:
            raise ValueError(f"Invalid method: {method!r} (expected one of "
                             f"{', '.join(map(repr, HessianVectorProduct.METHODS))})")
        self.method = method
        self.fd_eps = check_real("fd_eps", fd_eps, low=0.0, high=1.0, low_open=True)
        self.seed = check_int("seed", seed, low=0)
        self.reset()

    def reset(self) -> None:
        """Forget every measurement (a new chain)."""
        self.lambda_max: float | None = None
        self.step_size: float | None = None
        self.grad_evals = 0
        self.seconds = 0.0
        self.measurements = 0
        self.fallback = False
        self.vector: list[Tensor] | None = None

    def due(self, langevin_steps: int) -> bool:
        """Whether a re-measurement is due after ``langevin_steps`` steps."""
        return self.every_n_steps > 0 and langevin_steps > 0 and langevin_steps % self.every_n_steps == 0

    def measure(self, closure: Callable[[], Tensor], params: Sequence[Tensor], *,
                precond: Sequence[Tensor | float] | None, weight_decay: Sequence[float],
                friction: float | None = None, cold: bool = False, backward_closure: bool = False) -> StepSizeEstimate:
        """Measure at the current ``params`` (:func:`auto_step_size`), warm-started unless ``cold`` or
        the shapes changed; updates :attr:`lambda_max`, :attr:`step_size` and the counters."""
        params = list(params)
        init = None if cold else self.vector
        if init is not None and [tuple(v.shape) for v in init] != [tuple(p.shape) for p in params]:
            init = None
        if init is not None:
            init = [v.to(device=p.device, dtype=p.dtype) for v, p in zip(init, params)]
        generator = torch.Generator(device=params[0].device)
        generator.manual_seed(self.seed + self.measurements)
        method = "finite_difference" if self.fallback else self.method
        start = time.perf_counter()
        est = auto_step_size(closure, params, precond=precond, weight_decay=list(weight_decay), friction=friction,
                             safety=self.safety, num_iters=self.num_iters if init is None else self.warm_iters,
                             rtol=self.rtol, init=init, generator=generator, method=method, fd_eps=self.fd_eps,
                             backward_closure=backward_closure)
        if est.method == "finite_difference" and method == "auto":
            self.fallback = True
        self.lambda_max, self.step_size, self.vector = est.lambda_max, est.step_size, est.vector
        self.grad_evals += est.grad_evals
        self.seconds += time.perf_counter() - start
        self.measurements += 1
        return est

    def state_dict(self) -> dict[str, Any]:
        return {"lambda_max": self.lambda_max, "step_size": self.step_size, "grad_evals": self.grad_evals,
                "measurements": self.measurements, "fallback": self.fallback,
                "vector": None if self.vector is None else [v.detach().cpu().clone() for v in self.vector]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lambda_max, self.step_size = state["lambda_max"], state["step_size"]
        self.grad_evals, self.measurements = int(state["grad_evals"]), int(state["measurements"])
        self.fallback, self.vector = bool(state["fallback"]), state["vector"]
