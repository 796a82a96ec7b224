r"""Temperature scaling (Guo et al. 2017), fitted on the validation split only.

Given predictive probabilities :math:`p_{ik}` (of one model or a posterior average) the scaled
prediction is

.. math::
    p^{(T)}_{ik} = \frac{p_{ik}^{1/T}}{\sum_j p_{ij}^{1/T}}
                 = \operatorname{softmax}_k\!\big(\log p_{ik} / T\big),

i.e. the logits divided by :math:`T` (the log-probabilities differ from the logits by a constant per
row, which the softmax ignores). :func:`fit_temperature` chooses the scalar

.. math::
    T^\star = \arg\min_{T \in [T_{lo}, T_{hi}]} -\frac1n \sum_i \log p^{(T)}_{i y_i}

on the validation examples by golden-section search on :math:`\log T` (the NLL is smooth and, for
logits, convex in :math:`1/T`). :math:`T > 1` softens an over-confident model.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fit_temperature", "apply_temperature"]

_TINY = 1e-12


def _log_probs(probs: Tensor) -> Tensor:
    return probs.double().clamp_min(_TINY).log()


def apply_temperature(probs: Tensor, temperature: float) -> Tensor:
    """:math:`\\operatorname{softmax}(\\log p / T)` row by row (float32)."""
    if not temperature > 0:
        raise ValueError(f"Invalid temperature: {temperature!r} (expected a real number > 0)")
    return torch.softmax(_log_probs(probs) / temperature, dim=-1).float()


def fit_temperature(probs: Tensor, labels: Tensor, bounds: tuple[float, float] = (0.05, 20.0),
                    iters: int = 80) -> float:
    """The temperature minimising the NLL of :func:`apply_temperature` on ``(probs, labels)``
    (the validation split), within ``bounds``."""
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"Invalid bounds: {bounds!r} (expected 0 < low < high)")
    logp, y = _log_probs(probs), labels.long().reshape(-1, 1)

    def nll(log_t: float) -> float:
        return float(-torch.log_softmax(logp / math.exp(log_t), -1).gather(1, y).mean())

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)
