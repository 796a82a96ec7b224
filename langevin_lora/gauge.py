r"""The GL(r) gauge symmetry of LoRA: balancing for warm-up, exact gauge moves for sampling.

LoRA's update :math:`\Delta W = s\,BA` (``A`` is :math:`r\times\text{in}`, ``B`` is
:math:`\text{out}\times r`) is unchanged by :math:`(A, B) \mapsto (gA,\ Bg^{-1})` for every
invertible :math:`g \in GL(r)`. The loss therefore depends on the factors only through
:math:`BA`, while the prior term :math:`\tfrac{\lambda}{2}(\lVert A\rVert^2 + \lVert B\rVert^2)`
of the potential :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2` does not (THEORY §4).
The PEFT scaling :math:`s` multiplies :math:`BA` and plays no role in anything below.

Two different uses, with different rules:

* **Balancing** (:func:`balance_factors`, :func:`balance_lora_`, :class:`BalanceSchedule`) moves
  to the factorisation of the same :math:`BA` with the smallest
  :math:`\lVert A\rVert^2 + \lVert B\rVert^2 = 2\lVert BA\rVert_*`. It is a deterministic
  projection onto :math:`\{AA^\top = B^\top B\}`, a set that :math:`\pi_\beta` does **not**
  concentrate on (:math:`E_\pi[AA^\top - B^\top B] = \tfrac{\text{in}-\text{out}}{\beta\lambda} I`).
  Projecting during sampling changes the law of :math:`W` itself (THEORY §4, rank-1 example:
  :math:`E[W] = 0.363` instead of :math:`0.655`), so it is allowed during warm-up/burn-in or once
  when sampling starts, and refused while sampling.

* **Gauge moves** (:func:`orthogonal_gauge_move_`, :func:`gl_gauge_move_`, :class:`GaugeMoves`)
  are Markov kernels that leave :math:`\pi_\beta \propto e^{-\beta U}` exactly invariant and need
  no forward pass. Interleaved with Langevin steps they keep the target and speed up mixing
  along the gauge orbits, where the Langevin dynamics relaxes only at rate :math:`2\lambda`.

Preconditioned samplers: with a frozen diagonal preconditioner :math:`G` (LangevinAdam), a gauge
move changes the coordinates in which :math:`G` was measured, so :math:`G` fits the local
curvature less well afterwards. This does not affect correctness: the Langevin step with *any*
constant :math:`G` leaves :math:`\pi_\beta` invariant (to :math:`O(\eta)`), and the gauge move is
an exact symmetry (or an exact Metropolis kernel) of :math:`\pi_\beta` itself, not of the
dynamics, so the composition keeps :math:`\pi_\beta`. The frozen :math:`G` is not transformed.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from langevin_lora._rng import NoiseGenerators
from langevin_lora._validation import check_int, check_non_negative, check_positive
from langevin_lora.param_groups import LoraFactors, lora_modules

__all__ = [
    "BalanceSchedule",
    "GaugeMoves",
    "SAMPLING_REFUSAL",
    "balance_factors",
    "balance_lora_",
    "gauge_imbalance",
    "gl_gauge_move_",
    "gl_gauge_proposal",
    "gl_log_acceptance",
    "haar_orthogonal",
    "orthogonal_gauge_move_",
]

SAMPLING_REFUSAL = (
    "balancing LoRA factors while sampling changes the law being sampled: pi_beta is not "
    "concentrated on the balanced set AA^T = B^T B (E_pi[AA^T - B^T B] = (in - out)/(beta*lambda) I), "
    "and projecting onto it after every step changes the law of W = BA itself (THEORY §4, rank-1 "
    "example: E[W] = 0.363 instead of 0.655). Balance during warm-up/burn-in or once before "
    "sampling starts; use GaugeMoves for exact gauge moves during sampling."
)

_MOMENT_POLICIES = ("transport", "reset")
# First-moment-like optimizer states (linear in the gradient) and second-moment-like ones.
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


# ---------------------------------------------------------------------------------------------
# shapes and precision
# ---------------------------------------------------------------------------------------------
def _check_pair(A: Tensor, B: Tensor) -> tuple[int, int, int]:
    """``A`` is ``(..., r, in)``, ``B`` is ``(..., out, r)`` with equal leading (chain) dims."""
    if not (torch.is_tensor(A) and torch.is_tensor(B)):
        raise ValueError(f"Invalid A/B: expected tensors, got {type(A).__name__}/{type(B).__name__}")
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"Invalid A/B: A must be (..., r, in) and B (..., out, r); got shapes "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"Invalid A/B: A must be (..., r, in) and B (..., out, r) with the same r and "
                         f"leading dims; got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise ValueError(f"Invalid A/B: expected real floating tensors, got {A.dtype}/{B.dtype}")
    return A.shape[-2], A.shape[-1], B.shape[-2]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The gauge algebra runs in float64 (cheap: O(r^2 (in + out))) unless already wider."""
    return torch.float64 if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else dtype


def _sqnorm(X: Tensor) -> Tensor:
    """Squared Frobenius norm over the two matrix dims, in float64."""
    return X.to(torch.float64).square().sum(dim=(-2, -1))


def gauge_imbalance(A: Tensor, B: Tensor) -> Tensor:
    r"""The gauge statistic :math:`D = AA^\top - B^\top B` (``(..., r, r)``).

    Under :math:`\pi_\beta`, :math:`E[D] = \tfrac{\text{in}-\text{out}}{\beta\lambda} I` whatever the
    data, and the Langevin dynamics relaxes it at rate exactly :math:`2\lambda` (THEORY §3); a
    balanced pair has :math:`D = 0`.
    """
    _check_pair(A, B)
    return A @ A.mT - B.mT @ B


# ---------------------------------------------------------------------------------------------
# balancing
# ---------------------------------------------------------------------------------------------
def _balance(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Balanced factors in the work dtype, plus the gauge ``g`` (A' = gA, B' = B g^-1) and
    ``g^-1`` when both factors have full rank r (else ``None``)."""
    r, fan_in, fan_out = _check_pair(A, B)
    wd = _work_dtype(A.dtype)
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


def _matrix_views(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, in)`` and ``(out, r)`` views of PEFT factors (conv LoRA stores ``(r, in, *k)`` and
    ``(out, r, 1, ...)``; linear and embedding factors are already matrices)."""
    r = A.shape[0]
    A2 = A.reshape(r, -1)
    if B.dim() > 2:
        if any(s != 1 for s in B.shape[2:]):
            raise ValueError(f"Invalid lora_B: expected a 1x1 kernel for a conv LoRA factor, got shape {tuple(B.shape)}")
        B2 = B.reshape(B.shape[0], B.shape[1])
    else:
        B2 = B
    if A2.data_ptr() != A.data_ptr() or B2.data_ptr() != B.data_ptr():  # pragma: no cover - reshape copied
        raise ValueError("LoRA factors must be contiguous to be updated in place")
    return A2, B2


def _optimizer_state(optimizer: Any, p: Tensor) -> dict | None:
    if optimizer is None:
        return None
    return optimizer.state.get(p) if hasattr(optimizer, "state") else None


def _work_tensor(optimizer: Any, p: Tensor) -> Tensor:
    """The tensor a Langevin optimizer actually updates: its fp32 master copy of an fp16/bf16
    parameter when it keeps one, else the parameter."""
    st = _optimizer_state(optimizer, p)
    if st is not None and "master" in st:
        return st["master"]
    return p


def _refuse_frozen_preconditioner(optimizer: Any, params: Iterable[Tensor]) -> None:
    if optimizer is None:
        return
    for p in params:
        st = _optimizer_state(optimizer, p)
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

    **Only during warm-up/burn-in or once before sampling starts** (THEORY §4): see
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
      ``step`` for that; its warm-up length still counts the group's steps). A second moment
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
            balancing while sampling changes the law being sampled.
    """
    if moments not in _MOMENT_POLICIES:
        raise ValueError(f"Invalid moments: {moments!r} (expected one of {', '.join(map(repr, _MOMENT_POLICIES))})")
    factors = lora_modules(model, adapter_name)
    _refuse_frozen_preconditioner(optimizer, [t for f in factors for t in (f.A, f.B)])
    done = []
    for f in factors:
        A_w, B_w = _work_tensor(optimizer, f.A), _work_tensor(optimizer, f.B)
        A2, B2 = _matrix_views(A_w, B_w)
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
    r"""When to balance (THEORY §4): every ``every_n_steps`` warm-up/burn-in steps, and/or once
    when sampling starts; never while sampling.

    Meant to be driven by a sampler (the LangevinLoRA callback, or a training loop)::

        schedule = BalanceSchedule(every_n_steps=50, at_sampling_start=True)
        # after each warm-up/burn-in optimizer step:
        schedule.step(model, step, sampling=False, optimizer=opt)
        # right before the preconditioner is frozen / samples start being kept:
        schedule.start_sampling(model, optimizer=opt)
        opt.start_sampling()

    Args:
        every_n_steps: balance after every this many warm-up/burn-in steps (``None``: never).
        at_sampling_start: balance once in :meth:`start_sampling`.
        moments: optimizer-state policy passed to :func:`balance_lora_`.

    Why never during sampling: :math:`\pi_\beta` is not concentrated on the balanced set, and
    projecting after every step changes the law of :math:`W` (rank-1 example: :math:`E[W] = 0.363`
    instead of :math:`0.655`). :meth:`check_phase` raises ``ValueError`` with that reason.
    """

    def __init__(self, every_n_steps: int | None = None, at_sampling_start: bool = True,
                 moments: str = "transport") -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, low=1, allow_none=True)
        if not isinstance(at_sampling_start, bool):
            raise ValueError(f"Invalid at_sampling_start: {at_sampling_start!r} (expected True or False)")
        if moments not in _MOMENT_POLICIES:
            raise ValueError(f"Invalid moments: {moments!r} (expected one of {', '.join(map(repr, _MOMENT_POLICIES))})")
        self.at_sampling_start = at_sampling_start
        self.moments = moments
        self.num_balanced = 0

    @staticmethod
    def check_phase(sampling: bool) -> None:
        """Raise ``ValueError`` (with the reason) if balancing is requested while sampling."""
        if sampling:
            raise ValueError("Invalid sampling=True for balancing: " + SAMPLING_REFUSAL)

    def due(self, step: int) -> bool:
        """Whether warm-up/burn-in step ``step`` (counted from 1) is a balancing step."""
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0

    def step(self, model: nn.Module, step: int, *, sampling: bool, optimizer: Any = None,
             adapter_name: str | None = None) -> bool:
        """Balance after warm-up/burn-in step ``step`` when :meth:`due`; returns whether it did.

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

    def state_dict(self) -> dict[str, Any]:
        return {"num_balanced": self.num_balanced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_balanced = int(state["num_balanced"])


# ---------------------------------------------------------------------------------------------
# exact gauge moves
# ---------------------------------------------------------------------------------------------
def haar_orthogonal(batch_shape: Sequence[int], r: int, *, generator: torch.Generator | None,
                    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    r"""Haar-distributed :math:`O \in O(r)`, shape ``(*batch_shape, r, r)``.

    QR of a standard Gaussian matrix with the signs fixed so that :math:`\operatorname{diag}R > 0`
    (without the fix the law of :math:`Q` depends on the QR implementation's sign convention and
    is not Haar). The Haar law is invariant under :math:`O \mapsto O^\top = O^{-1}`.
    """
    r = check_int("r", r, low=1)
    Z = torch.randn(*batch_shape, r, r, generator=generator, dtype=dtype, device=device)
    if r == 1:  # O(1) = {-1, +1}: the sign of the Gaussian (what QR with the sign fix returns)
        return torch.where(Z < 0, -torch.ones_like(Z), torch.ones_like(Z))
    Q, R = torch.linalg.qr(Z)
    d = R.diagonal(dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return Q * sign.unsqueeze(-2)


@torch.no_grad()
def orthogonal_gauge_move_(A: Tensor, B: Tensor, generator: torch.Generator | None) -> Tensor:
    r"""Random orthogonal gauge move :math:`(A, B) \leftarrow (OA,\ BO^\top)`, :math:`O` Haar on
    :math:`O(r)`, independently per chain (leading dims). In place; returns :math:`O`.

    :math:`BA`, :math:`\lVert A\rVert` and :math:`\lVert B\rVert` are unchanged, so :math:`U` is,
    and the map has unit Jacobian: the move is an exact symmetry of :math:`\pi_\beta`, always
    accepted (THEORY §4a). For :math:`r = 1` it is the sign flip :math:`(a, b) \to \pm(a, b)`,
    which removes the sign bimodality. It rotates :math:`D = AA^\top - B^\top B \to ODO^\top`.
    """
    r, _, _ = _check_pair(A, B)
    wd = _work_dtype(A.dtype)
    O = haar_orthogonal(A.shape[:-2], r, generator=generator, dtype=wd, device=A.device)
    A.copy_((O @ A.to(wd)).to(A.dtype))
    B.copy_((B.to(wd) @ O.mT).to(B.dtype))
    return O


def gl_gauge_proposal(A: Tensor, B: Tensor, step_scale: float, generator: torch.Generator | None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Propose :math:`(A', B') = (gA,\ Bg^{-1})`, :math:`g = \exp(\epsilon M)`, :math:`M_{ij}\sim N(0,1)`.

    Returns ``(A', B', log_det_g)`` with :math:`\log\det g = \epsilon\operatorname{tr}M` per chain.
    The proposal is symmetric in the sense the Metropolis rule needs: :math:`M` and :math:`-M` are
    equally likely and :math:`\exp(-\epsilon M) = g^{-1}`, so the map
    :math:`(\theta, M) \mapsto (g\cdot\theta, -M)` is a volume-preserving-in-:math:`M` involution.
    """
    r, _, _ = _check_pair(A, B)
    eps = check_positive("step_scale", step_scale)
    wd = _work_dtype(A.dtype)
    M = torch.randn(*A.shape[:-2], r, r, generator=generator, dtype=wd, device=A.device)
    if r == 1:  # exp of a 1x1 matrix (much cheaper than the batched matrix_exp kernel)
        g, g_inv = torch.exp(eps * M), torch.exp(-eps * M)
    else:
        g, g_inv = torch.linalg.matrix_exp(eps * M), torch.linalg.matrix_exp(-eps * M)
    A_new = (g @ A.to(wd)).to(A.dtype)
    B_new = (B.to(wd) @ g_inv).to(B.dtype)
    log_det = eps * M.diagonal(dim1=-2, dim2=-1).sum(-1)
    return A_new, B_new, log_det.to(torch.float64)


def _decays(weight_decay: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(weight_decay, (tuple, list)):
        if len(weight_decay) != 2:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (expected a number > 0 or a pair (lambda_A, lambda_B))")
        lam_a, lam_b = weight_decay
    else:
        lam_a = lam_b = weight_decay
    lam_a = check_positive("weight_decay", lam_a)
    lam_b = check_positive("weight_decay", lam_b)
    return lam_a, lam_b


def gl_log_acceptance(A: Tensor, B: Tensor, A_new: Tensor, B_new: Tensor, log_det_g: Tensor, *,
                      beta: float, weight_decay: float | tuple[float, float]) -> Tensor:
    r"""Log Metropolis ratio of the GL(r) gauge move (THEORY §4b), per chain:

    .. math::
        \log\alpha = -\frac{\beta}{2}\Big(\lambda_A\,\Delta\lVert A\rVert^2
            + \lambda_B\,\Delta\lVert B\rVert^2\Big) + (\text{in} - \text{out})\,\log\det g .

    The loss term cancels because :math:`BA` is unchanged. The Jacobian: :math:`A \mapsto gA` acts
    on each of the ``in`` columns of :math:`A`, so its determinant is :math:`\det(g)^{\text{in}}`;
    :math:`B \mapsto Bg^{-1}` acts on each of the ``out`` rows, :math:`\det(g)^{-\text{out}}`;
    and :math:`\det\exp(\epsilon M) = e^{\epsilon\operatorname{tr}M}`.
    """
    _, fan_in, fan_out = _check_pair(A, B)
    beta = check_positive("beta", beta)
    lam_a, lam_b = _decays(weight_decay)
    dA = _sqnorm(A_new) - _sqnorm(A)
    dB = _sqnorm(B_new) - _sqnorm(B)
    return -0.5 * beta * (lam_a * dA + lam_b * dB) + (fan_in - fan_out) * log_det_g


@torch.no_grad()
def gl_gauge_move_(A: Tensor, B: Tensor, *, beta: float, weight_decay: float | tuple[float, float],
                   step_scale: float, generator: torch.Generator | None) -> Tensor:
    r"""Metropolis GL(r) gauge move, in place, independently per chain; returns the accepted mask.

    Proposal :math:`(A, B) \to (gA,\ Bg^{-1})`, :math:`g = \exp(\epsilon M)`, :math:`M_{ij} \sim N(0,1)`
    (:func:`gl_gauge_proposal`), accepted with probability
    :math:`\min\{1, \exp(-(\beta\lambda/2)\Delta(\lVert A\rVert^2+\lVert B\rVert^2)
    + (\text{in}-\text{out})\,\epsilon\operatorname{tr}M)\}` (:func:`gl_log_acceptance`). It leaves
    :math:`\pi_\beta \propto e^{-\beta U}` exactly invariant whatever :math:`\hat L`, since
    :math:`\hat L` depends on :math:`BA` only. Unlike the orthogonal move it changes
    :math:`\lVert A\rVert`, :math:`\lVert B\rVert` and :math:`D = AA^\top - B^\top B`, which the Langevin
    dynamics relaxes only at rate :math:`2\lambda`.

    Args:
        A: ``(..., r, in)``, B: ``(..., out, r)``, updated in place.
        beta: inverse temperature :math:`\beta > 0` (finite) of both factors.
        weight_decay: :math:`\lambda > 0`, or a pair :math:`(\lambda_A, \lambda_B)`. With
            :math:`\lambda = 0`, :math:`\pi_\beta` is improper along the orbit and the move is refused.
        step_scale: :math:`\epsilon > 0`.
        generator: explicit ``torch.Generator`` on ``A.device``.
    """
    beta = check_positive("beta", beta)
    _decays(weight_decay)
    A_new, B_new, log_det = gl_gauge_proposal(A, B, step_scale, generator)
    log_alpha = gl_log_acceptance(A, B, A_new, B_new, log_det, beta=beta, weight_decay=weight_decay)
    u = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float64, device=A.device)
    accept = u.log() < log_alpha
    mask = accept.reshape(*accept.shape, 1, 1)
    A.copy_(torch.where(mask, A_new, A))
    B.copy_(torch.where(mask, B_new, B))
    return accept


class GaugeMoves:
    r"""Exact gauge moves to call after Langevin steps while sampling (THEORY §4).

    Every ``every_n_steps`` calls, each LoRA module gets (a) a Haar orthogonal move
    :math:`(A,B)\to(OA, BO^\top)` (always accepted) if ``orthogonal``, then (b) if ``gl_step > 0``,
    a Metropolis GL(r) move with :math:`\epsilon = \texttt{gl\_step}/\sqrt{r(\text{in}+\text{out})}`
    (the orbit's width shrinks like that when the prior dominates, so one ``gl_step`` suits
    modules of every size; tune it for an acceptance of 0.2-0.6). Both leave :math:`\pi_\beta`
    invariant, need no forward pass and cost :math:`O(r^2(\text{in}+\text{out}))`.

    Gauge moves preserve :math:`\pi_\beta`, not the discretised dynamics, and are valid with a
    frozen preconditioner (see the module docstring). With a momentum sampler they act on
    :math:`\theta` only, which keeps the product law of :math:`(\theta, m)` and acts as a partial
    momentum refresh. Noise comes from explicit per-device generators seeded by ``seed`` (saved in
    :meth:`state_dict`).

    Args:
        every_n_steps: act on every this-many-th call (>= 1).
        orthogonal: do the orthogonal move.
        gl_step: dimensionless GL step (0: no GL move).
        seed: generator seed (``None``: from the OS, shared from rank 0 under torch.distributed).

    Example:
        >>> moves = GaugeMoves(every_n_steps=10, gl_step=1.0, seed=0)           # doctest: +SKIP
        >>> stats = moves(lora_modules(model), beta=N, weight_decay=wd)         # doctest: +SKIP
        >>> stats["gauge/gl_acceptance"]                                        # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 1, orthogonal: bool = True, gl_step: float = 0.0,
                 seed: int | None = None) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, low=1)
        if not isinstance(orthogonal, bool):
            raise ValueError(f"Invalid orthogonal: {orthogonal!r} (expected True or False)")
        self.orthogonal = orthogonal
        self.gl_step = check_non_negative("gl_step", gl_step)
        self.generators = NoiseGenerators(seed)
        self.calls = 0
        self.gl_proposed = 0
        self.gl_accepted = 0

    @staticmethod
    def _pairs(factors: Iterable[LoraFactors | tuple[Tensor, Tensor]], optimizer: Any
               ) -> list[tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]]:
        out = []
        for f in factors:
            if isinstance(f, LoraFactors):
                A_w, B_w = _work_tensor(optimizer, f.A), _work_tensor(optimizer, f.B)
                A2, B2 = _matrix_views(A_w, B_w)
                sync = [(p, w) for p, w in ((f.A, A_w), (f.B, B_w)) if w is not p]
                out.append((A2, B2, sync))
            else:
                A, B = f
                out.append((A, B, []))
        return out

    @torch.no_grad()
    def __call__(self, factors: Iterable[LoraFactors | tuple[Tensor, Tensor]], beta: float,
                 weight_decay: float | tuple[float, float], optimizer: Any = None) -> dict[str, float]:
        r"""Apply the moves (when due) to every ``LoraFactors`` or ``(A, B)`` pair (leading chain
        dims allowed). ``beta`` and ``weight_decay`` are those of the LoRA groups (a pair
        :math:`(\lambda_A, \lambda_B)` when they differ; :math:`\beta` must be the same for A and B,
        otherwise the dynamics has no Gibbs law to preserve). With ``optimizer``, a Langevin
        optimizer's fp32 master copies are moved and copied into the fp16/bf16 parameters.

        Returns ``{}`` when not due, else ``{"gauge/orthogonal_moves": modules moved,
        "gauge/gl_acceptance": acceptance rate of this call, "gauge/gl_acceptance_mean": since
        the start}`` (the GL keys only when ``gl_step > 0``).
        """
        self.calls += 1
        if self.calls % self.every_n_steps != 0:
            return {}
        if self.gl_step > 0:
            beta = check_positive("beta", beta)
            _decays(weight_decay)
        pairs = self._pairs(factors, optimizer)
        stats: dict[str, float] = {}
        n_acc = n_prop = 0
        for A, B, sync in pairs:
            r, fan_in, fan_out = _check_pair(A, B)
            gen = self.generators.get(A.device)
            if self.orthogonal:
                orthogonal_gauge_move_(A, B, gen)
            if self.gl_step > 0:
                eps = self.gl_step / math.sqrt(r * (fan_in + fan_out))
                acc = gl_gauge_move_(A, B, beta=beta, weight_decay=weight_decay, step_scale=eps, generator=gen)
                n_acc += int(acc.sum())
                n_prop += acc.numel()
            for p, w in sync:
                p.copy_(w)
        if self.orthogonal:
            stats["gauge/orthogonal_moves"] = float(len(pairs))
        if self.gl_step > 0 and n_prop:
            self.gl_accepted += n_acc
            self.gl_proposed += n_prop
            stats["gauge/gl_acceptance"] = n_acc / n_prop
            stats["gauge/gl_acceptance_mean"] = self.gl_accepted / self.gl_proposed
        return stats

    @property
    def acceptance_rate(self) -> float:
        """GL acceptance rate since the start (NaN before any GL proposal)."""
        return self.gl_accepted / self.gl_proposed if self.gl_proposed else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"generators": self.generators.state_dict(), "calls": self.calls,
                "gl_proposed": self.gl_proposed, "gl_accepted": self.gl_accepted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generators.load_state_dict(state["generators"])
        self.calls = int(state["calls"])
        self.gl_proposed = int(state["gl_proposed"])
        self.gl_accepted = int(state["gl_accepted"])
