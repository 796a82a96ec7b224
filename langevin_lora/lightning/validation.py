r"""The validation set as :class:`~langevin_lora.LangevinLoRA`'s drop-in scores the chain on it.

The prior scale :math:`\sigma_p` is chosen on validation (:mod:`langevin_lora.lightning.schedule`): each
stage of the ladder keeps samples, and its score is the negative log-likelihood of their average,

.. math::
    \mathrm{NLL} = -\frac1n \sum_{i=1}^n \log \bar p(y_i \mid x_i), \qquad
    \bar p = \frac1S \sum_{s=1}^S \operatorname{softmax}(f_{\theta_s}(x_i)),

compared with the best stage's on the same examples by the mean per-example difference :math:`\bar d`
and its standard error :math:`\sqrt{\widehat{\mathrm{Var}}(d)/n}` (a paired comparison: both averages see
the same validation noise). :class:`ValidationSet` reads the Trainer's first validation DataLoader once
and predicts with the live module (the chain's current point, not the sample bank:
:mod:`langevin_lora.posterior.averaging` averages banked samples); :func:`paired_nll` scores.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from langevin_lora.posterior.averaging import default_forward

__all__ = ["ValidationSet", "labels_of", "paired_nll"]


def labels_of(batch: Any) -> Tensor | None:
    """The labels of a validation batch: its ``labels``/``label`` entry, or the second item of ``(x, y)``."""
    if isinstance(batch, Mapping):
        y = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        y = batch[1]
    else:
        y = None
    return y if torch.is_tensor(y) and y.dtype in (torch.int64, torch.int32) and y.ndim == 1 else None


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


class ValidationSet:
    """The first validation DataLoader as ``(batch on device, labels)`` pairs, read once per fit, and the
    live module's class probabilities on it.

    Args:
        forward_fn: ``(module, batch) -> logits``; ``None``:
            :func:`~langevin_lora.posterior.averaging.default_forward`, else ``module(batch)``.
    """

    def __init__(self, forward_fn: Callable[[Any, Any], Tensor] | None = None) -> None:
        self.forward_fn = forward_fn
        self._batches: list | None = None

    def reset(self) -> None:
        """Read the DataLoader again at the next use (a new fit)."""
        self._batches = None

    def batches(self, trainer: Trainer, module: LightningModule, fallback: str) -> list:
        """The pairs, empty (with one warning ending in ``fallback``) when there is no validation DataLoader
        or its batches carry no labels."""
        if self._batches is not None:
            return self._batches
        from lightning.fabric.utilities.apply_func import move_data_to_device

        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        self._batches = []
        if loader is None:
            rank_zero_warn("LangevinLoRA: the Trainer has no validation DataLoader, so the prior scale cannot be "
                           f"chosen on validation; {fallback}.")
            return self._batches
        for batch in loader:
            labels = labels_of(batch)
            if labels is None:
                rank_zero_warn("LangevinLoRA: validation batches carry no labels (a 'labels'/'label' key or (x, y)), "
                               f"so the prior scale cannot be chosen on validation; {fallback}.")
                self._batches = []
                break
            self._batches.append((move_data_to_device(batch, module.device), labels.to(module.device)))
        return self._batches

    def labels(self) -> Tensor:
        """The labels of the batches read, in order."""
        return torch.cat([y for _, y in self._batches or []])

    @torch.no_grad()
    def probs(self, trainer: Trainer, module: LightningModule, fallback: str) -> Tensor | None:
        """``(n, K)`` class probabilities of the live module in eval mode, or ``None`` (no usable validation
        set, or the forward failed: one warning, and validation is not used again in this fit)."""
        batches = self.batches(trainer, module, fallback)
        if not batches:
            return None
        was_training = module.training
        module.eval()
        try:
            return torch.cat([torch.softmax(self.forward(module, b).float(), dim=-1) for b, _ in batches])
        except (TypeError, AttributeError, RuntimeError) as exc:
            rank_zero_warn(f"LangevinLoRA: could not predict on the validation batches ({type(exc).__name__}: {exc}); "
                           f"pass forward_fn=(module, batch) -> logits. The prior scale is not chosen on validation.")
            self._batches = []
            return None
        finally:
            module.train(was_training)

    def forward(self, module: LightningModule, batch: Any) -> Tensor:
        """``forward_fn``, else :func:`~langevin_lora.posterior.averaging.default_forward`, else ``module(batch)``."""
        if self.forward_fn is not None:
            return self.forward_fn(module, batch)
        try:
            return default_forward(module, batch)
        except TypeError:
            self.forward_fn = lambda m, b: _logits(m(b))
            return self.forward_fn(module, batch)


def paired_nll(probs: list[Tensor], labels: Tensor, best_example_nll: Tensor | None,
               reduce: Callable[[Tensor], Tensor] | None = None
               ) -> tuple[float | None, float | None, float, Tensor | None]:
    r"""The score of a stage from its samples' validation probabilities ``probs`` (each ``(n, K)``):
    ``(NLL of their average, mean per-example difference from best_example_nll, its standard error,
    the per-example NLL)``; ``(None, None, 0, None)`` without samples, no difference without a best stage.
    ``reduce`` sums the four statistics over data-parallel ranks, each holding a shard of the examples."""
    if not probs:
        return None, None, 0.0, None
    average = torch.stack(probs).double().mean(0)
    example_nll = -average.clamp_min(1e-12).log().gather(1, labels.view(-1, 1)).squeeze(1)
    d = example_nll - best_example_nll if best_example_nll is not None else None
    zero = torch.zeros((), dtype=torch.float64, device=labels.device)
    stats = torch.stack([example_nll.sum(), torch.tensor(float(len(labels)), dtype=torch.float64, device=labels.device),
                         d.sum() if d is not None else zero, d.square().sum() if d is not None else zero])
    if reduce is not None:
        stats = reduce(stats)
    n = float(stats[1])
    score = float(stats[0]) / n
    if d is None:
        return score, None, 0.0, example_nll
    mean = float(stats[2]) / n
    var = max(0.0, float(stats[3]) / n - mean * mean) * n / max(1.0, n - 1)
    return score, mean, math.sqrt(var / n), example_nll
