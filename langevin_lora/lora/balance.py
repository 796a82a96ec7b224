r"""Balancing LoRA factors (Castin et al. 2026; THEORY §4): for burn-in, never while sampling.

Among all factorisations :math:`(gA, Bg^{-1})` of the same :math:`\Delta W = s\,BA`
(:mod:`langevin_lora.lora.gauge`), balancing (:func:`balance_factors`, :func:`balance_lora_`,
:class:`BalanceSchedule`) moves to the one with the smallest
:math:`\lVert A\rVert^2 + \lVert B\rVert^2 = 2\lVert BA\rVert_*`. It is a deterministic projection
onto :math:`\{AA^\top = B^\top B\}`, a set that :math:`\pi_\beta` does **not** concentrate on
(:math:`E_\pi[AA^\top - B^\top B] = \tfrac{\text{in}-\text{out}}{\beta\lambda} I`). Projecting
during sampling changes the law of :math:`W` itself (THEORY §4, rank-1 example:
:math:`E[W] = 0.363` instead of :math:`0.655`), so it is allowed during burn-in or once when
sampling starts, and refused while sampling (use :class:`~langevin_lora.lora.gauge.GaugeMoves` then).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from langevin_lora._validation import check_bool, check_choice, check_int
from langevin_lora.core.engine import work_tensor_of
from langevin_lora.lora.gauge import CENTRE_REFUSAL
from langevin_lora.lora.pair import check_pair, matrix_views, work_dtype
from langevin_lora.lora.param_groups import lora_modules

__all__ = ["BalanceSchedule", "SAMPLING_REFUSAL", "balance_factors", "balance_lora_"]

SAMPLING_REFUSAL = (
    "balancing LoRA factors while sampling changes the law being sampled: pi_beta is not "
    "concentrated on the balanced set AA^T = B^T B (E_pi[AA^T - B^T B] = (in - out)/(beta*lambda) I), "
    "and projecting onto it after every step changes the law of W = BA itself (THEORY §4, rank-1 "
    "example: E[W] = 0.363 instead of 0.655). Balance during burn-in or once before "
    "sampling starts; use GaugeMoves for exact gauge moves during sampling."
)

_MOMENT_POLICIES = ("transport", "reset")
# First-moment-like optimizer states (linear in the gradient) and second-moment-like ones.
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _balance(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Balanced factors in the work dtype, plus the gauge ``g`` (A' = gA, B' = B g^-1) and
    ``g^-1`` when both factors have full rank r (else ``None``)."""
    r, fan_in, fan_out = check_pair(A, B)
    wd = work_dtype(A.dtype)
    A64, B64 = A.to(wd), B.to(wd)
    QB, RB = torch.linalg.qr(B64)            # (..., out, kB), (..., kB, r)
    QA, RA = torch.linalg.qr(A64.mT)         # (..., in, kA), (..., kA, r)
    U, S, Vh = torch.linalg.svd(RB @ RA.mT, full_matrices=False)  # (..., kB, k), (..., k), (..., k, kA)
    # Singular values at round-off level are zero (as in matrix_rank): their square roots would
    # otherwise leave ~1e-8 relative entries in directions that carry nothing.
    tol = torch.finfo(wd).eps * max(fan_in, fan_out, r) * S.amax(dim=-1, keepdim=True)
    S = torch.where(S > tol, S, torch.zeros_like(S))
    sq = S.sqrt()
    B_new = QB @ (U * sq.unsqueeze(-2))      # (..., out, k)
    A_new = (sq.unsqueeze(-1) * Vh) @ QA.mT  # (..., k, in)
    k = S.shape[-1]
    if k < r:  # r > min(in, out): the extra directions carry nothing, pad with zeros
        A_new = torch.cat([A_new, A_new.new_zeros(*A_new.shape[:-2], r - k, fan_in)], dim=-2)
        B_new = torch.cat([B_new, B_new.new_zeros(*B_new.shape[:-2], fan_out, r - k)], dim=-1)
    g = g_inv = None
    if k == r:
        # A = RA^T QA^T, A' = S^1/2 V^T QA^T  =>  g = S^1/2 V^T RA^-T;  B = QB RB  =>  g^-1 = RB^-1 U S^1/2.
        rtol = torch.finfo(wd).eps * max(fan_in, fan_out, r) * 10
        dA, dB = RA.diagonal(dim1=-2, dim2=-1).abs(), RB.diagonal(dim1=-2, dim2=-1).abs()
        ok = bool(dA.min() > rtol * dA.max()) and bool(dB.min() > rtol * dB.max())
        if ok and bool(S.min() > 0):
            VhS = sq.unsqueeze(-1) * Vh                                  # S^1/2 V^T
            g = torch.linalg.solve_triangular(RA, VhS.mT, upper=True).mT  # S^1/2 V^T RA^-T
            g_inv = torch.linalg.solve_triangular(RB, U * sq.unsqueeze(-2), upper=True)
    return A_new, B_new, g, g_inv


def balance_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    r"""Balanced factorisation of :math:`BA` (Castin et al. 2026; THEORY §4).

    .. math::
        B = Q_B R_B,\quad A^\top = Q_A R_A,\quad R_B R_A^\top = U\Sigma V^\top,\qquad
        B' = Q_B U \Sigma^{1/2},\quad A' = \Sigma^{1/2} V^\top Q_A^\top .

    Then :math:`B'A' = BA`, :math:`A'A'^\top = B'^\top B' = \Sigma` (so :math:`D = 0`) and
    :math:`\lVert A'\rVert^2 + \lVert B'\rVert^2 = 2\lVert BA\rVert_*`, the minimum over all
    factorisations of :math:`BA`; the potential :math:`U` never increases. Cost
    :math:`O(r^2(\text{in}+\text{out}) + r^3)`. The PEFT scaling :math:`s` multiplies :math:`BA` and
    does not enter: balancing :math:`BA` balances :math:`s\,BA` too.

    Args:
        A: ``(..., r, in)``; B: ``(..., out, r)``; any leading (chain) dims, shared.

    Returns:
        ``(A', B')`` with the dtypes and devices of the inputs (computed in float64 for
        float16/bfloat16/float32 inputs, then cast back).

    Rank-deficient products: directions with singular value 0 get zero rows of :math:`A'` and
    zero columns of :math:`B'` (the minimum-norm balanced factorisation is unique there). In
    particular at LoRA's initialisation (:math:`B = 0`, so :math:`BA = 0`) both factors become 0:
    mathematically right, but :math:`(A, B) = (0, 0)` is a saddle where both gradients vanish, so a
    noise-free optimizer would never leave it. :func:`balance_lora_` therefore skips modules whose
    product is exactly zero. When :math:`r > \min(\text{in}, \text{out})` the surplus directions are
    zero as well.
    """
    A_new, B_new, _, _ = _balance(A, B)
    return A_new.to(A.dtype), B_new.to(B.dtype)


def _optimizer_state(optimizer: Any, p: Tensor) -> dict | None:
    if optimizer is None:
        return None
    return optimizer.state.get(p) if hasattr(optimizer, "state") else None


def _refuse_frozen_preconditioner(optimizer: Any, params: Iterable[Tensor]) -> None:
    if optimizer is None:
        return
    for p in params:
        st = _optimizer_state(optimizer, p)
        if st is not None and "prior_centre" in st:
            raise ValueError(f"Invalid optimizer: {type(optimizer).__name__} samples a prior centred away from 0 "
                             "(prior_centre='start'); balancing assumes a prior centred at 0: " + CENTRE_REFUSAL)
        if st is not None and "precond" in st:
            raise ValueError(
                f"Invalid optimizer: {type(optimizer).__name__} is sampling with a frozen preconditioner. "
                "Balancing now would move the factors to coordinates the frozen G was not measured in, "
                "and any balancing while sampling changes the law being sampled (" + SAMPLING_REFUSAL +
                ") Call balance_lora_ before start_sampling()."
            )


def _transport_moments(state: dict, g: Tensor, g_inv: Tensor, role: str, shape2: tuple[int, int]) -> None:
    """Move Adam/SGD moments of a factor to the new gauge (A' = gA, B' = B g^-1).

    Gradients transform as grad_A' = g^-T grad_A and grad_B' = grad_B g^T (exact for the loss
    term), so first moments are mapped exactly; a diagonal second moment cannot follow a
    non-diagonal map and is transported with the diagonal approximation
    v'_A = (g^-T)^{o2} v_A, v'_B = v_B (g^{o2})^T (exact when g is diagonal or a signed permutation).
    """
    gT_inv = g_inv.mT
    for key in _FIRST_MOMENTS + _SECOND_MOMENTS:
        t = state.get(key)
        if not torch.is_tensor(t) or t.dim() == 0:
            continue
        t2 = t.reshape(shape2)
        x = t2.to(g.dtype)
        if key in _FIRST_MOMENTS:
            new = gT_inv @ x if role == "A" else x @ g.mT
        else:
            new = gT_inv.square() @ x if role == "A" else x @ g.square().mT
        t2.copy_(new.to(t.dtype))


def _clear_state(state: dict) -> None:
    """Forget everything but a Langevin optimizer's fp32 master copy (torch Adam/AdamW re-create
    the state, ``step`` included, on their next step; LangevinAdam re-creates its moments)."""
    master = state.get("master")
    state.clear()
    if master is not None:
        state["master"] = master


@torch.no_grad()
def balance_lora_(model: nn.Module, adapter_name: str | None = None, optimizer: Any = None, *,
                  moments: str = "transport") -> list[str]:
    r"""Balance every LoRA module of a PEFT model in place (:func:`balance_factors` on each).

    Each module's :math:`\Delta W = s\,BA` is unchanged (to float round-off of the parameter
    dtype), so the model computes the same function, and :math:`\lVert A\rVert^2+\lVert B\rVert^2`
    drops to :math:`2\lVert BA\rVert_*`. Parameters keep their dtype and device (the algebra runs in
    float64 and is copied back). Modules whose product is exactly zero (LoRA's ``B = 0`` at
    initialisation) are left unchanged: balancing them would give :math:`A = B = 0`, a saddle where
    both gradients vanish. Convolution and embedding adapters are handled through their
    :math:`(r, \text{in})` / :math:`(\text{out}, r)` matrix views.

    **Only during burn-in or once before sampling starts** (THEORY §4): see
    :class:`BalanceSchedule`, which refuses balancing while sampling.

    Optimizer state: Adam's moments are coordinates of the old gauge. Under
    :math:`(A,B)\mapsto(gA, Bg^{-1})` the loss gradient transforms as
    :math:`\nabla_{A'} = g^{-\top}\nabla_A`, :math:`\nabla_{B'} = \nabla_B\,g^\top`.

    - ``moments="transport"`` (default): first moments (``exp_avg``, ``momentum_buffer``) are
      mapped exactly that way; second moments (``exp_avg_sq``, ``max_exp_avg_sq``), which a diagonal
      array cannot map exactly, get the diagonal approximation
      :math:`v_{A'} = (g^{-\top})^{\circ 2} v_A`, :math:`v_{B'} = v_B (g^{\circ 2})^\top` so the
      per-coordinate scales follow the rescaled rows/columns. ``step`` is kept. This is what
      balancing right before :meth:`LangevinAdam.start_sampling` needs: a reset second moment
      would freeze :math:`G \approx 1/\epsilon`. A module whose factors are not of full rank
      :math:`r` has no such :math:`g` and falls back to ``"reset"``.
    - ``moments="reset"``: the whole per-tensor state is cleared (but an fp32 master copy).
      ``torch.optim.Adam/AdamW`` and :class:`~langevin_lora.LangevinAdam` restart the moments
      with their bias correction counted from the restart (LangevinAdam keeps a per-tensor
      ``step`` for that; its burn-in length still counts the group's steps). A second moment
      restarted shortly before sampling starts is estimated from few gradients: prefer
      ``"transport"`` there.

    A Langevin optimizer's fp32 master copies of fp16/bf16 parameters are balanced first and
    copied into the parameters, so the next step does not undo the change.

    Args:
        model: a PEFT model (see :func:`~langevin_lora.lora_modules`).
        adapter_name: the adapter to balance (default: the active ones).
        optimizer: optional optimizer holding state for the LoRA tensors.
        moments: ``"transport"`` or ``"reset"`` (see above).

    Returns:
        The names of the modules that were balanced.

    Raises:
        ValueError: if ``optimizer`` is sampling with a frozen preconditioner (LangevinAdam after
            ``start_sampling``): the frozen :math:`G` was measured in the old coordinates and
            balancing while sampling changes the law being sampled; or if it holds a prior centre
            (``prior_centre="start"``): the gauge symmetry that balancing uses assumes a prior centred at 0.
    """
    check_choice("moments", moments, _MOMENT_POLICIES)
    factors = lora_modules(model, adapter_name)
    _refuse_frozen_preconditioner(optimizer, [t for f in factors for t in (f.A, f.B)])
    done = []
    for f in factors:
        A_w, B_w = work_tensor_of(optimizer, f.A), work_tensor_of(optimizer, f.B)
        A2, B2 = matrix_views(A_w, B_w)
        if not bool((B2 != 0).any()) or not bool((A2 != 0).any()):
            continue
        A_new, B_new, g, g_inv = _balance(A2, B2)
        if not bool((A_new != 0).any()):  # BA == 0 with nonzero factors: nothing to balance
            continue
        A2.copy_(A_new.to(A2.dtype))
        B2.copy_(B_new.to(B2.dtype))
        for p, w in ((f.A, A_w), (f.B, B_w)):
            if w is not p:
                p.copy_(w)
        for role, p, shape2 in (("A", f.A, tuple(A2.shape)), ("B", f.B, tuple(B2.shape))):
            st = _optimizer_state(optimizer, p)
            if not st:
                continue
            if moments == "transport" and g is not None:
                _transport_moments(st, g, g_inv, role, shape2)
            else:
                _clear_state(st)
        done.append(f.name)
    return done


class BalanceSchedule:
    r"""When to balance (THEORY §4): every ``every_n_steps`` burn-in steps, and/or once
    when sampling starts; never while sampling.

    Meant to be driven by a sampler (the LangevinLoRA callback, or a training loop)::

        schedule = BalanceSchedule(every_n_steps=50, at_sampling_start=True)
        # after each burn-in optimizer step:
        schedule.step(model, step, sampling=False, optimizer=opt)
        # right before the preconditioner is frozen / samples start being kept:
        schedule.start_sampling(model, optimizer=opt)
        opt.start_sampling()

    Args:
        every_n_steps: balance after every this many burn-in steps (``None``: never).
        at_sampling_start: balance once in :meth:`start_sampling`.
        moments: optimizer-state policy passed to :func:`balance_lora_`.

    Why never during sampling: :math:`\pi_\beta` is not concentrated on the balanced set, and
    projecting after every step changes the law of :math:`W` (rank-1 example: :math:`E[W] = 0.363`
    instead of :math:`0.655`). :meth:`check_phase` raises ``ValueError`` with that reason.
    """

    def __init__(self, every_n_steps: int | None = None, at_sampling_start: bool = True,
                 moments: str = "transport") -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, low=1, allow_none=True)
        self.at_sampling_start = check_bool("at_sampling_start", at_sampling_start)
        self.moments = check_choice("moments", moments, _MOMENT_POLICIES)
        self.num_balanced = 0

    @staticmethod
    def check_phase(sampling: bool) -> None:
        """Raise ``ValueError`` (with the reason) if balancing is requested while sampling."""
        if sampling:
            raise ValueError("Invalid sampling=True for balancing: " + SAMPLING_REFUSAL)

    def due(self, step: int) -> bool:
        """Whether burn-in step ``step`` (counted from 1) is a balancing step."""
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0

    def step(self, model: nn.Module, step: int, *, sampling: bool, optimizer: Any = None,
             adapter_name: str | None = None) -> bool:
        """Balance after burn-in step ``step`` when :meth:`due`; returns whether it did.

        Raises ``ValueError`` when called with ``sampling=True``: the caller must stop driving
        the schedule once sampling has started (use :class:`GaugeMoves` then)."""
        self.check_phase(sampling)
        if not self.due(step):
            return False
        balance_lora_(model, adapter_name, optimizer, moments=self.moments)
        self.num_balanced += 1
        return True

    def start_sampling(self, model: nn.Module, optimizer: Any = None, adapter_name: str | None = None) -> bool:
        """Balance once if ``at_sampling_start``; call it *before* a preconditioner is frozen."""
        if not self.at_sampling_start:
            return False
        balance_lora_(model, adapter_name, optimizer, moments=self.moments)
        self.num_balanced += 1
        return True

    def reset(self) -> None:
        """Back to the state of a new instance (a new run)."""
        self.num_balanced = 0

    def state_dict(self) -> dict[str, Any]:
        return {"num_balanced": self.num_balanced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_balanced = int(state["num_balanced"])
