r"""Curvature probes of a loss: Hessian-vector products, Hutchinson traces, power iteration, and
the exact replay of a stochastic forward pass.

The diagnostics use them for the configurational temperature (:math:`\Delta U` by Hutchinson) and
the step-size check (:math:`\eta\lambda_{\max}`); a sampler can use :func:`top_eigenvalue` to set its
step from :math:`\lambda_{\max}(G^{1/2}\nabla^2 U\,G^{1/2})` (THEORY §2: keep
:math:`\eta\lambda_{\max} \lesssim 0.1`). This module depends on torch only (nothing from
:mod:`langevin_lora.diagnostics`, no Lightning), so samplers may import it.

Conventions: ``params`` is a list of tensors; a vector is a list of tensors shaped like ``params``;
``batch_dims`` leading dimensions index independent chains (vectorised ensembles; every reduction
keeps them). ``weight_decay`` :math:`\lambda` may be one number or one per tensor, and adds
:math:`\lambda I` to the Hessian of the loss: :math:`\nabla^2 U = \nabla^2\hat L + \lambda I`.

**Cost, in gradient evaluations** (one forward + backward pass of the loss):

- one Hessian-vector product by central finite differences: exactly 2 (two gradients);
- by double backward: the first product builds the gradient graph (one forward + backward with
  ``create_graph``, about 1), then each product is one backward pass through that graph (about 1
  more): about 2 per product, the graph built once per :class:`HessianVectorProduct`;
- :func:`hutchinson_laplacian` with :math:`m` probes: :math:`m` products;
- :func:`power_iteration` / :func:`top_eigenvalue` with :math:`k` iterations: :math:`k` products,
  so about :math:`2k` gradient evaluations. Measured on the MiniLM LoRA recipe (CPU): one product
  about 3.5 training steps (a training step also pays the optimizer and the data), 10 products about
  20. Warm-start ``init`` from the previous vector when the parameters moved little: the top
  eigenvector changes slowly along a chain, and 5–10 iterations then suffice.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_int, check_non_negative, check_real
from langevin_lora.core import sharding as _sharding
from langevin_lora.core.functional import LOW_PRECISION

__all__ = [
    "batched_dot",
    "num_coordinates",
    "HessianVectorProduct",
    "BackwardClosureHVP",
    "ShardedHVP",
    "rademacher",
    "hutchinson_laplacian",
    "power_iteration",
    "top_eigenvalue",
    "TopEigenvalue",
    "RngSnapshot",
]


# -- tensor-list algebra ------------------------------------------------------------------------
def check_batch_dims(batch_dims: int, tensors: Sequence[Tensor]) -> int:
    batch_dims = check_int("batch_dims", batch_dims, low=0)
    for t in tensors:
        if t.dim() < batch_dims:
            raise ValueError(f"Invalid batch_dims: {batch_dims} (tensors have only {t.dim()} dimensions)")
    return batch_dims


_log = logging.getLogger(__name__)


def _product(x: Tensor, y: Tensor) -> Tensor:
    """``x * y``, in fp32 when either is fp16/bf16 (a bf16 product keeps 8 bits)."""
    if x.dtype in LOW_PRECISION or y.dtype in LOW_PRECISION:
        return x.float() * y.float()
    return x * y


def _reduce(t: Tensor, batch_dims: int) -> Tensor:
    """Sum over every dimension after the first ``batch_dims``."""
    if t.dim() == batch_dims:
        return t
    return t.sum(dim=tuple(range(batch_dims, t.dim())))


def batched_dot(xs: Sequence[Tensor], ys: Sequence[Tensor], batch_dims: int = 0, *,
                per_tensor: bool = False) -> Tensor:
    r""":math:`\sum_k \langle x_k, y_k\rangle`, summed over the non-batch dimensions and over the list
    (fp16/bf16 inputs are multiplied and summed in fp32); with ``per_tensor`` the list is not summed:
    the result is stacked, shape ``(len(xs), *batch)``."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"Invalid xs/ys: expected two non-empty lists of equal length, got {len(xs)} and {len(ys)}")
    batch_dims = check_batch_dims(batch_dims, xs)
    if batch_dims == 0 and all(x is y for x, y in zip(xs, ys)) and all(x.dtype == xs[0].dtype for x in xs):
        # Squared norms: one fused kernel for the whole list (fp16/bf16 widened first).
        wide = [x.float() for x in xs] if xs[0].dtype in LOW_PRECISION else list(xs)
        norms = torch.stack(torch._foreach_norm(wide)).square()
        return norms if per_tensor else norms.sum()
    terms = [_reduce(_product(x, y), batch_dims) for x, y in zip(xs, ys)]
    if per_tensor:
        return torch.stack(terms)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def num_coordinates(params: Sequence[Tensor], batch_dims: int = 0) -> int:
    """Coordinates per chain: the number of elements of ``params`` outside the batch dimensions."""
    return sum(p[(0,) * batch_dims].numel() if batch_dims else p.numel() for p in params)


def _per_tensor(name: str, value: float | Sequence[float], n: int) -> list[float]:
    """One non-negative number per tensor from a scalar or a sequence of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"Invalid {name}: {len(value)} values for {n} tensors")
        return [check_non_negative(name, v) for v in value]
    return [check_non_negative(name, value)] * n


def _add_decay(hv: Sequence[Tensor], vs: Sequence[Tensor], decay: list[float]) -> list[Tensor]:
    return [h + lam * v if lam else h for h, v, lam in zip(hv, vs, decay)]


# -- Hessian-vector products ----------------------------------------------------------------------
class HessianVectorProduct:
    r"""Hessian-vector products :math:`v \mapsto \nabla^2\hat L(\theta)\,v` of a scalar loss.

    ``method="double_backward"`` differentiates the gradient graph (built once, reused for many
    vectors, e.g. power iteration); ``"finite_difference"`` uses central differences of the
    gradient,

    .. math::
        \nabla^2\hat L\,v \approx \frac{\nabla\hat L(\theta + \epsilon v) - \nabla\hat L(\theta - \epsilon v)}{2\epsilon},
        \qquad \epsilon = \texttt{fd\_eps}\cdot\max(\lVert\theta\rVert, 1)/\lVert v\rVert,

    exact for quadratics, :math:`O(\epsilon^2)` otherwise, with :math:`\theta` restored bitwise;
    ``"auto"`` tries double backward and falls back (one debug log line, logger
    ``langevin_lora.core.curvature``) when it raises, e.g. for
    kernels without a second derivative. ``loss_fn`` must be deterministic between calls (replay
    dropout with :class:`RngSnapshot`). ``batch_dims`` marks leading chain dimensions (the loss must
    then be a sum of independent per-chain losses). :attr:`loss_evaluations` counts the calls of
    ``loss_fn`` (each followed by one backward pass), :attr:`products` the products returned.
    """

    METHODS = ("auto", "double_backward", "finite_difference")

    def __init__(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *, method: str = "auto",
                 fd_eps: float = 1e-3, batch_dims: int = 0) -> None:
        if method not in self.METHODS:
            raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(map(repr, self.METHODS))})")
        if not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (expected a callable () -> scalar loss)")
        self.loss_fn = loss_fn
        self.params = list(params)
        if not self.params:
            raise ValueError("Invalid params: expected a non-empty list of tensors")
        self.method = method
        self.fd_eps = check_real("fd_eps", fd_eps, low=0.0, high=1.0, low_open=True)
        self.batch_dims = check_batch_dims(batch_dims, self.params)
        self._grads: tuple[Tensor, ...] | None = None
        self.used_method: str | None = None
        self.loss: Tensor | None = None
        self.loss_evaluations = 0
        self.products = 0

    def _loss(self) -> Tensor:
        self.loss_evaluations += 1
        loss = self.loss_fn()
        if self.loss is None:
            self.loss = loss.detach()
        return loss

    def _double_backward(self, vs: Sequence[Tensor]) -> list[Tensor]:
        if self._grads is None:
            with torch.enable_grad():
                self._grads = torch.autograd.grad(self._loss(), self.params, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(self._grads, vs) if g is not None and g.requires_grad]
        if not pairs:
            raise RuntimeError("the gradient does not depend on the parameters (no graph for a second derivative)")
        with torch.enable_grad():
            hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[v for _, v in pairs],
                                     retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]

    def _gradient(self) -> list[Tensor]:
        with torch.enable_grad():
            g = torch.autograd.grad(self._loss(), self.params, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(self.params, g)]

    def _finite_difference(self, vs: Sequence[Tensor]) -> list[Tensor]:
        bd = self.batch_dims
        with torch.no_grad():
            theta_norm = batched_dot(self.params, self.params, bd).sqrt().clamp_min(1.0)
            v_norm = batched_dot(vs, vs, bd).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
            eps = self.fd_eps * theta_norm / v_norm  # batch shape

            def expand(e: Tensor, like: Tensor) -> Tensor:
                return e.to(like.dtype).reshape(e.shape + (1,) * (like.dim() - bd))

            steps = [v * expand(eps, v) for v in vs]
            saved = [p.detach().clone() for p in self.params]
            try:
                torch._foreach_add_([p.data for p in self.params], steps)
                g_plus = self._gradient()
                for p, s in zip(self.params, saved):
                    p.data.copy_(s)
                torch._foreach_sub_([p.data for p in self.params], steps)
                g_minus = self._gradient()
            finally:
                for p, s in zip(self.params, saved):
                    p.data.copy_(s)
            return [(gp - gm) / expand(2 * eps, gp) for gp, gm in zip(g_plus, g_minus)]

    def __call__(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """:math:`\\nabla^2\\hat L\\, v` for each tensor of ``vs`` (shaped like ``params``)."""
        if len(vs) != len(self.params):
            raise ValueError(f"Invalid vs: expected {len(self.params)} tensors, got {len(vs)}")
        self.products += 1
        if self.method == "finite_difference" or self.used_method == "finite_difference":
            self.used_method = "finite_difference"
            return self._finite_difference(vs)
        if self.method == "double_backward":
            self.used_method = "double_backward"
            return self._double_backward(vs)
        try:
            out = self._double_backward(vs)
            self.used_method = "double_backward"
            return out
        except (RuntimeError, NotImplementedError) as exc:
            # The expected path for kernels without a second derivative (e.g. fused attention on CPU): a
            # debug line, not a warning on every run.
            _log.debug("Hessian-vector product by double backward failed (%s); falling back to central finite "
                       "differences of the gradient", str(exc).splitlines()[0][:160])
            self._grads = None
            self.used_method = "finite_difference"
            return self._finite_difference(vs)


class BackwardClosureHVP(HessianVectorProduct):
    r"""Hessian-vector products from a *torch optimizer closure* (it zeroes the gradients, computes the
    loss, calls ``backward()`` and returns the loss, as :meth:`torch.optim.Optimizer.step` takes it):
    central finite differences of the gradients it leaves in ``.grad``. This is how
    :class:`~langevin_lora.LangevinSGD` / :class:`~langevin_lora.LangevinAdam` measure
    :math:`\lambda_{\max}` from ``opt.step(closure)`` with no other access to the loss. Every ``.grad``
    the closure writes is the caller's to save and restore; ``.grad`` of ``params`` is set to ``None``
    before each call, so a closure that does not zero them is still right."""

    def __init__(self, closure: Callable[[], Tensor], params: Sequence[Tensor], *, fd_eps: float = 1e-3) -> None:
        super().__init__(closure, params, method="finite_difference", fd_eps=fd_eps)

    def _gradient(self) -> list[Tensor]:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            self._loss()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]


class ShardedHVP(HessianVectorProduct):
    r"""Hessian-vector products for sharded (FSDP2 / DTensor) ``params``, equal to the unsharded ones.

    The vectors are *full* (unsharded) tensors, the same on every rank; only the parameters are
    sharded. A product is the central finite difference of :class:`HessianVectorProduct` with every
    step made on the shards: :math:`\epsilon` from the norms of the full parameters and vector, each
    rank adds its slice of :math:`\epsilon v` to its local shard, the gradients come back as shards
    through FSDP2's reduce-scatter (``loss.backward()``: ``torch.autograd.grad`` does not reach the
    sharded parameters, which FSDP2 replaces by unsharded copies in the forward pass, so there is no
    double backward) and are gathered to full tensors. Every element-wise operation is the unsharded
    one, so given the same gradients the product is the unsharded finite difference bit for bit.
    ``backward_closure``: ``loss_fn`` is a torch optimizer closure that calls ``backward()`` itself;
    else this calls ``loss_fn().backward()``. Either way it writes ``.grad`` of ``params`` (set to
    ``None`` before each call; the caller saves and restores them) and of whatever else the loss reaches.
    Every rank must call it (collectives)."""

    def __init__(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *, fd_eps: float = 1e-3,
                 backward_closure: bool = False) -> None:
        super().__init__(loss_fn, params, method="finite_difference", fd_eps=fd_eps)
        self.backward_closure = backward_closure
        #: the full parameters (gathered once: a product restores the shards bitwise)
        self.full = [_sharding.full_tensor(p.detach()) for p in self.params]
        self._slices = [_sharding.shard_spec(p).slices if _sharding.is_sharded(p) else None for p in self.params]

    def _gradient(self) -> list[Tensor]:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self._loss()
            if not self.backward_closure:
                loss.backward()
        return [torch.zeros_like(f) if p.grad is None else _sharding.full_tensor(p.grad.detach()).clone()
                for p, f in zip(self.params, self.full)]

    def _finite_difference(self, vs: Sequence[Tensor]) -> list[Tensor]:
        with torch.no_grad():
            theta_norm = batched_dot(self.full, self.full).sqrt().clamp_min(1.0)
            v_norm = batched_dot(vs, vs).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
            eps = self.fd_eps * theta_norm / v_norm
            steps = [v * eps.to(v.dtype) for v in vs]
            local = [_sharding.local_tensor(p.detach()) for p in self.params]
            steps = [s if sl is None else s[sl] for s, sl in zip(steps, self._slices)]
            saved = [t.clone() for t in local]
            try:
                torch._foreach_add_(local, steps)
                g_plus = self._gradient()
                for t, s in zip(local, saved):
                    t.copy_(s)
                torch._foreach_sub_(local, steps)
                g_minus = self._gradient()
            finally:
                for t, s in zip(local, saved):
                    t.copy_(s)
            return [(gp - gm) / (2 * eps).to(gp.dtype) for gp, gm in zip(g_plus, g_minus)]

    def __call__(self, vs: Sequence[Tensor]) -> list[Tensor]:
        if len(vs) != len(self.params):
            raise ValueError(f"Invalid vs: expected {len(self.params)} tensors, got {len(vs)}")
        self.products += 1
        self.used_method = "finite_difference"
        return self._finite_difference(vs)


def rademacher(params: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """Independent :math:`\\pm 1` entries shaped like ``params``, drawn from ``generator``."""
    out = []
    for p in params:
        device = p.device if generator is None else generator.device
        z = torch.randint(0, 2, p.shape, generator=generator, device=device, dtype=torch.int8)
        out.append(z.to(device=p.device, dtype=p.dtype).mul_(2).sub_(1))
    return out


def hutchinson_laplacian(hvp: Callable[[Sequence[Tensor]], Sequence[Tensor]], params: Sequence[Tensor], *,
                         weight_decay: float | Sequence[float] = 0.0, num_probes: int = 1,
                         generator: torch.Generator | None = None, batch_dims: int = 0) -> Tensor:
    r"""Hutchinson estimate of :math:`\Delta U = \operatorname{tr}\nabla^2\hat L + \sum_i \lambda_i`.

    .. math::
        \widehat{\Delta U} = \frac1m\sum_{k=1}^m z_k^\top\nabla^2\hat L\,z_k + \sum_i \lambda_i,
        \qquad z_k \text{ Rademacher},

    unbiased, with variance :math:`\tfrac2m\sum_{i\ne j}H_{ij}^2`; ``num_probes`` products.
    ``generator`` draws the probes (pass one to keep the global RNG untouched).
    """
    num_probes = check_int("num_probes", num_probes, low=1)
    decay = _per_tensor("weight_decay", weight_decay, len(params))
    total = None
    for _ in range(num_probes):
        z = rademacher(params, generator)
        term = batched_dot(z, hvp(z), batch_dims)
        total = term if total is None else total + term
    sizes = [num_coordinates([p], batch_dims) for p in params]
    return total / num_probes + sum(lam * n for lam, n in zip(decay, sizes))


def power_iteration(hvp: Callable[[Sequence[Tensor]], Sequence[Tensor]], params: Sequence[Tensor], *,
                    weight_decay: float | Sequence[float] = 0.0, scale: Sequence[Tensor | float] | None = None,
                    num_iters: int = 20, generator: torch.Generator | None = None, batch_dims: int = 0,
                    init: Sequence[Tensor] | None = None, rtol: float | None = None) -> tuple[Tensor, list[Tensor]]:
    r"""Largest-magnitude eigenvalue of :math:`M^{1/2}\,\nabla^2 U\,M^{1/2}` by power iteration.

    :math:`\nabla^2 U = \nabla^2\hat L + \lambda I` (``hvp`` gives :math:`\nabla^2\hat L\,v`).
    ``scale`` is the diagonal :math:`M` per tensor (a number or a tensor shaped like the parameter):
    the frozen preconditioner :math:`G` gives :math:`\lambda_{\max}(G^{1/2}\nabla^2 U G^{1/2})`, and
    :math:`M = \eta G` directly the stability number :math:`\eta\lambda_{\max}` of the
    (preconditioned) Langevin step, unstable above 2 and biased well before; keep it
    :math:`\lesssim 0.1` (THEORY §2). Cost: one product per iteration (module docstring). With
    ``rtol`` the iteration stops early once the Rayleigh quotient changes by less than ``rtol``
    (relative, every chain). Returns the Rayleigh quotient (shape ``batch``) and the unit vector
    (pass it back as ``init`` to warm-start the next call).
    """
    num_iters = check_int("num_iters", num_iters, low=1)
    if rtol is not None:
        rtol = check_real("rtol", rtol, low=0.0, low_open=True)
    decay = _per_tensor("weight_decay", weight_decay, len(params))
    bd = batch_dims

    def expand(x: Tensor, like: Tensor) -> Tensor:
        return x.to(like.dtype).reshape(x.shape + (1,) * (like.dim() - bd))

    sq = None
    if scale is not None:
        if len(scale) != len(params):
            raise ValueError(f"Invalid scale: {len(scale)} entries for {len(params)} tensors")
        sq = [math.sqrt(s) if isinstance(s, (int, float)) else s.sqrt() for s in scale]
    if init is not None:
        v = list(init)
    else:
        v = [torch.randn(p.shape, generator=generator, dtype=p.dtype,
                         device=generator.device if generator is not None else p.device).to(p.device) for p in params]

    def normalise(xs: list[Tensor]) -> list[Tensor]:
        n = batched_dot(xs, xs, bd).sqrt()
        n = n.clamp_min(torch.finfo(n.dtype).tiny)   # the float64 tiny would round to 0 in float32: 0/0
        return [x / expand(n, x) for x in xs]

    def apply(xs: list[Tensor]) -> list[Tensor]:
        ys = xs if sq is None else [x * s for x, s in zip(xs, sq)]
        hy = _add_decay(hvp(ys), ys, decay)
        return hy if sq is None else [h * s for h, s in zip(hy, sq)]

    v = normalise(v)
    eig = None
    for _ in range(num_iters):
        w = apply(v)
        new = batched_dot(v, w, bd)
        v = normalise(w)
        converged = (rtol is not None and eig is not None
                     and bool(((new - eig).abs() <= rtol * new.abs()).all()))
        eig = new
        if converged:
            break
    return eig, v


@dataclass
class TopEigenvalue:
    """Result of :func:`top_eigenvalue`: the eigenvalue, its unit vector, and what it cost."""

    eigenvalue: Tensor
    vector: list[Tensor]
    products: int
    loss_evaluations: int
    method: str | None


def top_eigenvalue(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *,
                   scale: Sequence[Tensor | float] | None = None, weight_decay: float | Sequence[float] = 0.0,
                   num_iters: int = 20, rtol: float | None = None, init: Sequence[Tensor] | None = None,
                   generator: torch.Generator | None = None, method: str = "auto", fd_eps: float = 1e-3,
                   batch_dims: int = 0, backward_closure: bool = False) -> TopEigenvalue:
    r""":math:`\lambda_{\max}(M^{1/2}\nabla^2 U\,M^{1/2})` of the loss closure ``loss_fn`` at the
    current ``params``: :class:`HessianVectorProduct` + :func:`power_iteration`.

    Example, the step size from the measured curvature (THEORY §2, :math:`\eta\lambda_{\max} = 0.1`)::

        res = top_eigenvalue(closure, params, scale=precond, weight_decay=lam, num_iters=10)
        lr = 0.1 / float(res.eigenvalue)

    ``res.loss_evaluations`` counts forward passes (each with a backward); about two gradient
    evaluations per iteration in all. ``backward_closure``: ``loss_fn`` is a torch optimizer closure
    (:class:`BackwardClosureHVP`, finite differences).

    Sharded ``params`` (FSDP2 / DTensor): the products are :class:`ShardedHVP`'s (finite differences on
    the shards, ``method="auto"`` included), ``scale`` and ``init`` hold *full* tensors and so does the
    returned vector; the random start is the unsharded draw, so the result is the unsharded
    finite-difference measurement bit for bit, given the same gradients. Every rank must call it.
    """
    if any(_sharding.is_sharded(p) for p in params):   # FSDP2: finite differences on the shards, full vectors
        if method == "double_backward":
            raise ValueError("Invalid method: 'double_backward' with sharded (FSDP2 / DTensor) parameters (their "
                             "gradients come back through FSDP2's reduce-scatter, not autograd.grad): pass 'auto' or "
                             "'finite_difference'")
        hvp = ShardedHVP(loss_fn, params, fd_eps=fd_eps, backward_closure=backward_closure)
        params = hvp.full
    elif backward_closure:   # a torch optimizer closure: gradients from .grad (BackwardClosureHVP)
        hvp = BackwardClosureHVP(loss_fn, params, fd_eps=fd_eps)
    else:
        hvp = HessianVectorProduct(loss_fn, params, method=method, fd_eps=fd_eps, batch_dims=batch_dims)
    eig, vec = power_iteration(hvp, params, weight_decay=weight_decay, scale=scale, num_iters=num_iters,
                               generator=generator, batch_dims=batch_dims, init=init, rtol=rtol)
    return TopEigenvalue(eig, vec, hvp.products, hvp.loss_evaluations, hvp.used_method)


# -- replaying a stochastic forward pass ----------------------------------------------------------
class RngSnapshot:
    """The global RNG state (CPU, and the given CUDA devices) at one moment, to replay a stochastic
    forward pass (dropout) exactly: every call of a closure wrapped by :meth:`replaying` starts from
    this state, so repeated evaluations of the loss (Hessian-vector products, finite differences)
    see one fixed function of :math:`\\theta`, the one the training step saw when the snapshot was
    taken just before it. The global RNG is left as it was before :meth:`replaying`.
    """

    def __init__(self, devices: Sequence[int] | None = None) -> None:
        if devices is None:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        self.devices = list(devices)
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]

    def restore(self) -> None:
        """Set the global RNG to the snapshot."""
        torch.set_rng_state(self.cpu_state)
        for d, s in zip(self.devices, self.cuda_states):
            torch.cuda.set_rng_state(s, d)

    @contextmanager
    def replaying(self) -> Iterator[Callable[[Callable[[], Tensor]], Callable[[], Tensor]]]:
        """Yield ``wrap(fn)``: a closure that restores the snapshot before each call of ``fn``. On exit
        the global RNG returns to its state at entry (:func:`torch.random.fork_rng`)."""
        with torch.random.fork_rng(devices=self.devices):
            def wrap(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
                def replayed() -> Tensor:
                    self.restore()
                    return fn()
                return replayed
            yield wrap
