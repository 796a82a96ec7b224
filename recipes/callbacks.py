r"""Lightning callbacks of the comparison: model selection on the validation split, a learning-rate
factor for a resumed run, and a trace of the training loss.

:class:`ValidationSelection` is how ``adamw_best`` (early stopping by validation NLL) and the
Langevin burn-in ``burn_in: best`` are chosen: every epoch (or every ``every_n_steps`` optimizer
steps) it computes the validation NLL of the current weights,

.. math::
    \mathrm{NLL}_{val}(\theta_t) = -\frac1{n_{val}} \sum_{i \in val} \log p_{\theta_t}(y_i \mid x_i),

keeps the trainable tensors of the best :math:`\theta_t` in memory and writes a resumable Lightning
checkpoint there (weights, optimizer state with AdamW's moments, loop state), so that a second
``fit(ckpt_path=...)`` continues from the selected point exactly as the run stood then. The test
split is never passed to it.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

__all__ = ["ValidationSelection", "ScaleLearningRate", "LossTrace", "NoDropout", "trainable_state", "swapped_in"]


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the trainable tensors of ``module`` (LoRA factors and heads), by name."""
    return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def swapped_in(module: nn.Module, state: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """``module`` with the tensors of ``state`` copied in; its own values restored on exit."""
    params = dict(module.named_parameters())
    saved = {n: params[n].detach().clone() for n in state}
    try:
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)
        yield module
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


class ValidationSelection(Callback):
    """Validation NLL during training; the best weights in memory and as a resumable checkpoint.

    Args:
        batches: the validation batches (a list, evaluated in order; never the test split).
        forward_fn: ``forward_fn(module, batch) -> logits``.
        checkpoint_dir: folder of ``best.ckpt`` and ``step-<k>.ckpt``.
        select: evaluate and keep the best (``False``: only the fixed-step checkpoint below).
        every_n_steps: evaluate every this many optimizer steps; ``None``: at the end of every
            training epoch. The final weights are always evaluated.
        snapshot_step: also write ``step-<k>.ckpt`` when the run reaches optimizer step ``k``
            (a fixed burn-in); ``None``: none.

    Attributes:
        trace: ``[(step, nll, accuracy), ...]`` of every evaluation.
        best_step, best_nll, best_state, best_path: the selected point (``best_state``: CPU copies
            of the trainable tensors).
        snapshot_path: the fixed-step checkpoint.
        passes: validation passes run; seconds: wall time spent evaluating and writing checkpoints.
    """

    def __init__(self, batches: Sequence[Any], forward_fn: Callable[[nn.Module, Any], Tensor], *,
                 checkpoint_dir: str | Path, select: bool = True, every_n_steps: int | None = None,
                 snapshot_step: int | None = None) -> None:
        self.batches, self.forward_fn = list(batches), forward_fn
        self.dir = Path(checkpoint_dir)
        self.select, self.every_n_steps, self.snapshot_step = select, every_n_steps, snapshot_step
        self.trace: list[tuple[int, float, float]] = []
        self.best_step: int | None = None
        self.best_nll = float("inf")
        self.best_state: dict[str, Tensor] | None = None
        self.best_path: Path | None = None
        self.snapshot_path: Path | None = None
        self.passes = 0
        self.seconds = 0.0

    def _save(self, trainer: Trainer, name: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        trainer.save_checkpoint(path)
        return path

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from recipes.models import predict_proba

        step = trainer.global_step
        if self.trace and self.trace[-1][0] == step:
            return
        t0 = time.perf_counter()
        probs, labels = predict_proba(pl_module, self.batches, self.forward_fn)
        nll = float(-probs.double().clamp_min(1e-12).log().gather(1, labels[:, None]).mean())
        acc = float((probs.argmax(-1) == labels).double().mean())
        self.trace.append((step, nll, acc))
        self.passes += 1
        if nll < self.best_nll:
            self.best_nll, self.best_step = nll, step
            self.best_state = trainable_state(pl_module)
            self.best_path = self._save(trainer, "best.ckpt")
        self.seconds += time.perf_counter() - t0

    def _snapshot(self, trainer: Trainer) -> None:
        t0 = time.perf_counter()
        self.snapshot_path = self._save(trainer, f"step-{trainer.global_step}.ckpt")
        self.seconds += time.perf_counter() - t0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.snapshot_step == trainer.global_step:
            self._snapshot(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.snapshot_step is not None and step == self.snapshot_step and self.snapshot_path is None:
            self._snapshot(trainer)
        if self.select and self.every_n_steps and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.select and not self.every_n_steps:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.select:
            self._evaluate(trainer, pl_module)


class ScaleLearningRate(Callback):
    """Multiply every param group's learning rate (and a scheduler's base rates) by ``factor`` when
    the fit starts, after a resumed checkpoint has restored the optimizer: the Langevin step size of
    :class:`~langevin_lora.LangevinLoRA` is the param group's current ``lr``."""

    def __init__(self, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"Invalid factor: {factor!r} (expected a real number > 0)")
        self.factor = float(factor)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * self.factor
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [b * self.factor for b in config.scheduler.base_lrs]


class NoDropout(Callback):
    r"""The LightningModule in eval mode (no dropout) at every training step from ``from_step`` on:
    the Langevin target is then the posterior of the deterministic network,
    :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2`; with dropout on, the gradient
    would carry a multiplicative noise the temperature does not account for, and the chain would
    sample a different (dropout-averaged) target."""

    def __init__(self, from_step: int = 0) -> None:
        self.from_step = int(from_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.from_step:
            pl_module.eval()


class LossTrace(Callback):
    """The minibatch training loss at every optimizer step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.values.append(float(loss))
