r"""Glue between the recipes and the sampler: posterior samples, their model average, and a
centred-virial temperature check.

Two routes produce posterior samples of the LoRA adapters:

- the :class:`~langevin_lora.callback.LangevinLoRA` callback (preferred; the module's optimizer
  stays AdamW and its ``sample_bank`` holds the samples), averaged with
  :func:`langevin_lora.samples.bma_predict_proba`;
- ``optimizer="langevin_adam"`` in the module plus :class:`SnapshotBank` here, which keeps the
  last ``num_samples`` snapshots (taken every ``sample_every`` optimizer steps once sampling has
  started), averaged by :func:`bank_predict_proba`.

Either way the prediction is the Bayesian model average

.. math::
    p(y\mid x) \approx \frac1S \sum_{s=1}^S \operatorname{softmax} f_{\theta_s}(x)_y .
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from lightning.pytorch import Callback
from torch import Tensor

from recipes.models import forward_logits

__all__ = ["SnapshotBank", "VirialTemperature", "bank_predict_proba", "is_sampling"]


def is_sampling(trainer) -> bool:
    """Whether the trainer's sampler has left burn-in (LangevinAdam ``.sampling``, or any
    optimizer/callback exposing ``langevin_groups()``)."""
    for opt in trainer.optimizers:
        inner = getattr(opt, "optimizer", opt)
        if hasattr(inner, "sampling"):
            return bool(inner.sampling)
        if hasattr(inner, "langevin_groups"):
            return any(v.sampling for v in inner.langevin_groups())
    for cb in trainer.callbacks:
        if hasattr(cb, "langevin_groups") and hasattr(cb, "sample_bank"):
            try:
                return any(v.sampling for v in cb.langevin_groups())
            except Exception:  # noqa: BLE001 - callback not set up yet
                return False
    return False


def _trainable(module: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class SnapshotBank(Callback):
    """Keep the last ``num_samples`` copies (on CPU) of every trainable tensor, one every
    ``sample_every`` optimizer steps after burn-in (never on accumulation micro-batches)."""

    def __init__(self, sample_every: int = 1, num_samples: int = 20) -> None:
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"Invalid sample_every: {sample_every!r} (expected an integer >= 1)")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"Invalid num_samples: {num_samples!r} (expected an integer >= 1)")
        self.sample_every = sample_every
        self.num_samples = num_samples
        self.samples: list[dict[str, Tensor]] = []
        self._sampling_steps = 0
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or not is_sampling(trainer):
            return
        self._last_step = step
        self._sampling_steps += 1
        if self._sampling_steps % self.sample_every == 0:
            self.samples.append({n: p.detach().to("cpu", copy=True) for n, p in _trainable(pl_module).items()})
            del self.samples[:-self.num_samples]

    def __len__(self) -> int:
        return len(self.samples)


@torch.no_grad()
def bank_predict_proba(module: torch.nn.Module, samples: list[dict[str, Tensor]], batches: Iterable[dict],
                       forward_fn: Callable = forward_logits) -> tuple[Tensor, Tensor]:
    """Model average of the softmax over ``samples`` (loaded into ``module`` in turn; the current
    weights are restored afterwards). Returns ``(probs (n, K), labels (n,))``."""
    from recipes.models import predict_proba

    if not samples:
        raise ValueError("Invalid samples: the bank is empty (did sampling start? lower burn_in_steps)")
    batches = list(batches)
    params = _trainable(module)
    current = {n: p.detach().clone() for n, p in params.items()}
    total, labels = None, None
    try:
        for sample in samples:
            for n, p in params.items():
                p.copy_(sample[n])
            probs, labels = predict_proba(module, batches, forward_fn)
            total = probs.double() if total is None else total + probs.double()
    finally:
        for n, p in params.items():
            p.copy_(current[n])
    return (total / len(samples)).float(), labels


class VirialTemperature(Callback):
    r"""Centred virial estimate of the sampling temperature (THEORY §3).

    At every optimizer step after burn-in, with :math:`g` the minibatch gradient of the mean loss
    over the LoRA tensors and :math:`c` the running mean of :math:`\theta` over the previous
    sampling steps,

    .. math::
        \hat T_t = \frac1d \sum_{i} (\theta_i - c_i)(g_i + \lambda\theta_i),
        \qquad \mathbb E_\pi[\hat T] = 1/\beta ,

    (the master identity with :math:`\varphi = \theta - c`, for any constant preconditioner).
    ``ratio`` reports :math:`\beta\cdot\overline{T}`: 1 at stationarity, about :math:`1 + \rho`
    with minibatch-noise ratio :math:`\rho`, plus :math:`O(\eta)`.

    Args:
        beta: the sampler's inverse temperature :math:`\beta = N/T`.
        weight_decay: the coupled decay :math:`\lambda` of the LoRA tensors.
        skip: sampling steps to skip before averaging (the running mean needs to settle).
    """

    def __init__(self, beta: float, weight_decay: float = 0.0, skip: int = 10) -> None:
        self.beta = float(beta)
        self.weight_decay = float(weight_decay)
        self.skip = int(skip)
        self.values: list[float] = []
        self._mean: list[Tensor] | None = None
        self._count = 0

    def _lora(self, pl_module) -> list[Tensor]:
        from langevin_lora import lora_parameters

        roles = lora_parameters(pl_module)
        return [p for ps in roles.values() for _, p in ps]

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not is_sampling(trainer):
            return
        params = self._lora(pl_module)
        if any(p.grad is None for p in params):
            return
        theta = [p.detach().float() for p in params]
        if self._mean is not None and self._count > self.skip:
            s = sum(float(((t - c) * (p.grad.float() + self.weight_decay * t)).sum())
                    for t, c, p in zip(theta, self._mean, params))
            d = sum(t.numel() for t in theta)
            self.values.append(s / d)
        self._count += 1
        if self._mean is None:
            self._mean = [t.clone() for t in theta]
        else:
            for c, t in zip(self._mean, theta):
                c.add_(t - c, alpha=1.0 / self._count)

    def summary(self) -> dict[str, Any]:
        """Mean virial temperature, its batch-means standard error, :math:`1/\\beta` and the ratio."""
        v = torch.tensor(self.values, dtype=torch.float64)
        n = len(v)
        if n < 2:
            return {"virial_T": math.nan, "virial_se": math.nan, "target_T": 1 / self.beta, "ratio": math.nan, "n": n}
        nb = max(2, min(20, n // 5))
        bm = torch.stack([c.mean() for c in torch.tensor_split(v, nb)])
        mean = float(v.mean())
        se = float(bm.std() / math.sqrt(nb))
        return {"virial_T": mean, "virial_se": se, "target_T": 1 / self.beta, "ratio": mean * self.beta, "n": n}
