r"""The GL(r) gauge symmetry of LoRA and the exact gauge moves that sample along it.

LoRA's update :math:`\Delta W = s\,BA` (``A`` is :math:`r\times\text{in}`, ``B`` is
:math:`\text{out}\times r`) is unchanged by :math:`(A, B) \mapsto (gA,\ Bg^{-1})` for every
invertible :math:`g \in GL(r)`. The loss therefore depends on the factors only through
:math:`BA`, while the prior term :math:`\tfrac{\lambda}{2}(\lVert A\rVert^2 + \lVert B\rVert^2)`
of the potential :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2` does not (THEORY §4).
The PEFT scaling :math:`s` multiplies :math:`BA` and plays no role in anything below.

The symmetry has two uses with different rules. **Balancing** (a deterministic projection, allowed
during burn-in only) lives in :mod:`langevin_lora.lora.balance`. **Gauge moves**
(:func:`orthogonal_gauge_move_`, :func:`gl_gauge_move_`, :class:`GaugeMoves`), here, are Markov
kernels that leave :math:`\pi_\beta \propto e^{-\beta U}` exactly invariant and need no forward
pass. Interleaved with Langevin steps they keep the target and speed up mixing along the gauge
orbits, where the Langevin dynamics relaxes only at rate :math:`2\lambda`.

Preconditioned samplers: with a frozen diagonal preconditioner :math:`G` (LangevinAdam), a gauge
move changes the coordinates in which :math:`G` was measured, so :math:`G` fits the local
curvature less well afterwards. This does not affect correctness: the Langevin step with *any*
constant :math:`G` leaves :math:`\pi_\beta` invariant (to :math:`O(\eta)`), and the gauge move is
an exact symmetry (or an exact Metropolis kernel) of :math:`\pi_\beta` itself, not of the
dynamics, so the composition keeps :math:`\pi_\beta`. The frozen :math:`G` is not transformed.

Low precision: a sampler's fp32 master copies are what it samples (:mod:`langevin_lora.core.engine`);
:class:`GaugeMoves` given the sampler moves those work tensors and copies their rounding into the
fp16/bf16 parameters, so a move keeps fp32 precision.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from langevin_lora._validation import check_bool, check_int, check_non_negative, check_positive
from langevin_lora.core.engine import work_tensor_of
from langevin_lora.core.rng import NoiseGenerators
from langevin_lora.lora.pair import check_pair, matrix_views, work_dtype
from langevin_lora.lora.param_groups import LoraFactors

__all__ = [
    "CENTRE_REFUSAL",
    "GaugeMoves",
    "gauge_imbalance",
    "gl_gauge_move_",
    "gl_gauge_proposal",
    "gl_log_acceptance",
    "haar_orthogonal",
    "orthogonal_gauge_move_",
]


#: Why gauge moves (and balancing while a centre is set) are refused with a prior centred away from 0.
CENTRE_REFUSAL = (
    "the LoRA gauge symmetry (A, B) -> (gA, B g^-1) leaves U invariant only for a prior centred at 0; with "
    "U = L + (lambda/2)|theta - theta_0|^2 and theta_0 != 0 the prior term changes along the orbit, so the "
    "orthogonal move is no longer exact and the GL acceptance ratio (THEORY §4) is wrong. Use "
    "prior_centre='zero' (or None) with gauge moves and balancing, or no gauge moves.")


# ---------------------------------------------------------------------------------------------
# the gauge statistic
# ---------------------------------------------------------------------------------------------

def _sqnorm(X: Tensor) -> Tensor:
    """Squared Frobenius norm over the two matrix dims, in float64."""
    return X.to(torch.float64).square().sum(dim=(-2, -1))


def gauge_imbalance(A: Tensor, B: Tensor) -> Tensor:
    r"""The gauge statistic :math:`D = AA^\top - B^\top B` (``(..., r, r)``).

    Under :math:`\pi_\beta`, :math:`E[D] = \tfrac{\text{in}-\text{out}}{\beta\lambda} I` whatever the
    data, and the Langevin dynamics relaxes it at rate exactly :math:`2\lambda` (THEORY §3); a
    balanced pair has :math:`D = 0`.
    """
    check_pair(A, B)
    return A @ A.mT - B.mT @ B


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
    r, _, _ = check_pair(A, B)
    wd = work_dtype(A.dtype)
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
    r, _, _ = check_pair(A, B)
    eps = check_positive("step_scale", step_scale)
    wd = work_dtype(A.dtype)
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
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (expected a number > 0 or a pair "
                             "(lambda_A, lambda_B))")
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
    _, fan_in, fan_out = check_pair(A, B)
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
    momentum refresh. They need a prior centred at 0: a sampler whose engine holds a prior centre
    (``prior_centre="start"``/``"burn_in"``) is refused with ``ValueError``. Noise comes from explicit per-device generators seeded by ``seed`` (saved in
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
        self.orthogonal = check_bool("orthogonal", orthogonal)
        self.gl_step = check_non_negative("gl_step", gl_step)
        self.generators = NoiseGenerators(seed)
        self.calls = 0
        self.gl_proposed = 0
        self.gl_accepted = 0

    @staticmethod
    def _pairs(factors: Iterable[LoraFactors | tuple[Tensor, Tensor]], sampler: Any
               ) -> list[tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]]:
        out = []
        for f in factors:
            if isinstance(f, LoraFactors):
                A_w, B_w = work_tensor_of(sampler, f.A), work_tensor_of(sampler, f.B)
                A2, B2 = matrix_views(A_w, B_w)
                sync = [(p, w) for p, w in ((f.A, A_w), (f.B, B_w)) if w is not p]
                out.append((A2, B2, sync))
            else:
                A, B = f
                out.append((A, B, []))
        return out

    @torch.no_grad()
    def __call__(self, factors: Iterable[LoraFactors | tuple[Tensor, Tensor]], beta: float,
                 weight_decay: float | tuple[float, float], sampler: Any = None) -> dict[str, float]:
        r"""Apply the moves (when due) to every ``LoraFactors`` or ``(A, B)`` pair (leading chain
        dims allowed). ``beta`` and ``weight_decay`` are those of the LoRA groups (a pair
        :math:`(\lambda_A, \lambda_B)` when they differ; :math:`\beta` must be the same for A and B,
        otherwise the dynamics has no Gibbs law to preserve). With ``sampler`` (a Langevin optimizer
        or the :class:`~langevin_lora.LangevinLoRA` callback), its work tensors are moved: the fp32
        master copies of fp16/bf16 factors, whose rounding is then copied into the parameters.

        Returns ``{}`` when not due, else ``{"gauge/orthogonal_moves": modules moved,
        "gauge/gl_acceptance": acceptance rate of this call, "gauge/gl_acceptance_mean": since
        the start}`` (the GL keys only when ``gl_step > 0``).
        """
        engine = getattr(sampler, "engine", None)
        if engine is not None and getattr(engine, "has_prior_centre", False):
            raise ValueError("Invalid sampler for GaugeMoves: its prior is centred away from 0: " + CENTRE_REFUSAL)
        self.calls += 1
        if self.calls % self.every_n_steps != 0:
            return {}
        if self.gl_step > 0:
            beta = check_positive("beta", beta)
            _decays(weight_decay)
        pairs = self._pairs(factors, sampler)
        stats: dict[str, float] = {}
        n_acc = n_prop = 0
        for A, B, sync in pairs:
            r, fan_in, fan_out = check_pair(A, B)
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

    def reset(self) -> None:
        """Back to the state of a new instance (a new chain): counters and generators."""
        self.generators.reset()
        self.calls = self.gl_proposed = self.gl_accepted = 0

    def state_dict(self) -> dict[str, Any]:
        return {"generators": self.generators.state_dict(), "calls": self.calls,
                "gl_proposed": self.gl_proposed, "gl_accepted": self.gl_accepted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generators.load_state_dict(state["generators"])
        self.calls = int(state["calls"])
        self.gl_proposed = int(state["gl_proposed"])
        self.gl_accepted = int(state["gl_accepted"])
