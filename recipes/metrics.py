r"""Held-out metrics of a predictive distribution: accuracy, ECE, NLL and Brier score.

For predictive probabilities :math:`p_{ik}` (rows sum to one) and labels :math:`y_i`,
:math:`i = 1..n`:

.. math::
    \mathrm{acc} = \frac1n\sum_i [\arg\max_k p_{ik} = y_i], \qquad
    \mathrm{NLL} = -\frac1n\sum_i \log p_{i y_i}, \qquad
    \mathrm{Brier} = \frac1n\sum_i\sum_k (p_{ik} - [k = y_i])^2,

    \mathrm{ECE} = \sum_{b=1}^{15} \frac{|B_b|}{n}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|,

with :math:`B_b` the examples whose confidence :math:`\max_k p_{ik}` falls in the b-th of 15
equal-width bins of :math:`[0, 1]` (torchmetrics ``MulticlassCalibrationError``, L1 norm).
The Brier score is the multiclass (sum over classes) form, in :math:`[0, 2]`.

NLL and Brier are :class:`torchmetrics.Metric` objects whose states reduce by summation, so
they are exact under data parallelism.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

__all__ = ["NegativeLogLikelihood", "BrierScore", "classification_metrics", "METRIC_NAMES", "ECE_BINS"]

METRIC_NAMES = ("accuracy", "ece", "nll", "brier")
ECE_BINS = 15
_TINY = 1e-12


def _check_inputs(probs: Tensor, target: Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"Invalid probs: expected shape (n, num_classes), got {tuple(probs.shape)}")
    if target.ndim != 1 or target.shape[0] != probs.shape[0]:
        raise ValueError(f"Invalid target: expected shape ({probs.shape[0]},), got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= probs.shape[1]):
        raise ValueError(f"Invalid target: labels must lie in [0, {probs.shape[1] - 1}]")


class _MeanOverExamples(Metric):
    """Mean of a per-example loss; ``total``/``count`` states reduce by summation (exact under DDP)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_example(self, probs: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, probs: Tensor, target: Tensor) -> None:
        _check_inputs(probs, target)
        self.total += self._per_example(probs.double(), target.long()).sum()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class NegativeLogLikelihood(_MeanOverExamples):
    r"""Mean negative log predictive probability of the true class, :math:`-\frac1n\sum_i\log p_{iy_i}`
    (probabilities floored at 1e-12)."""

    def _per_example(self, probs: Tensor, target: Tensor) -> Tensor:
        return -probs.gather(1, target[:, None]).squeeze(1).clamp_min(_TINY).log()


class BrierScore(_MeanOverExamples):
    r"""Multiclass Brier score :math:`\frac1n\sum_i\sum_k (p_{ik} - [k=y_i])^2`."""

    def _per_example(self, probs: Tensor, target: Tensor) -> Tensor:
        onehot = torch.nn.functional.one_hot(target, probs.shape[1]).double()
        return ((probs - onehot) ** 2).sum(1)


def classification_metrics(probs: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> dict[str, float]:
    """Accuracy, ECE (``n_bins`` equal-width bins, L1), NLL and Brier of predictive ``probs``
    ``(n, K)`` against integer labels ``target`` ``(n,)``; returns plain floats."""
    probs = probs.detach().float().cpu()
    target = target.detach().long().cpu()
    _check_inputs(probs, target)
    k = probs.shape[1]
    if k < 2:
        raise ValueError(f"Invalid probs: need at least 2 classes, got {k}")
    acc = MulticlassAccuracy(num_classes=k, average="micro")(probs, target)
    ece = MulticlassCalibrationError(num_classes=k, n_bins=n_bins, norm="l1")(probs, target)
    nll = NegativeLogLikelihood()(probs, target)
    brier = BrierScore()(probs, target)
    return {"accuracy": float(acc), "ece": float(ece), "nll": float(nll), "brier": float(brier)}
