r"""Bayesian model averaging (BMA) over the samples of a :class:`~langevin_lora.posterior.bank.SampleBank`.

The posterior predictive is approximated by the sample average

.. math::
    p(y \mid x, \mathcal D) = \int p(y \mid x, \theta)\, \pi(\mathrm d\theta)
    \approx \frac1S \sum_{s=1}^{S} \operatorname{softmax}\big(f_{\theta_s}(x)\big)_y ,

with :math:`\theta_1, \dots, \theta_S` the banked samples. Each sample is loaded into the model
*in place* (``Tensor.copy_`` into the live parameters, no deep copy of the model), the forward pass
runs, the probabilities are averaged and the model's own tensors are restored.

The model may be the module the samples were taken from (e.g. the LightningModule) or the PEFT
model inside it: banked names are matched to the model's parameters by name, by parameter
identity, or by the PEFT model's prefix (:meth:`SampleBank.load_into`).

A sample whose probabilities are not finite (a chain that diverged) is never averaged silently:
:class:`FloatingPointError` names the sample's index and optimizer step.
"""
from __future__ import annotations

import inspect

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from langevin_lora.core.sharding import copy_full_

if TYPE_CHECKING:  # pragma: no cover
    from langevin_lora.posterior.bank import SampleBank

__all__ = ["Averager", "bma_predict_proba", "default_forward", "fixed_batches", "sample_probabilities"]

Forward = Callable[[nn.Module, Any], Tensor]


def _required_inputs(model: nn.Module) -> int:
    """How many positional inputs ``model.forward`` requires (at least 1; 1 when it takes ``*args``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(1 for p in params if p.kind in positional and p.default is inspect.Parameter.empty))


def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """Logits of a batch: ``model(**inputs)`` for a dict (``labels``/``label`` removed); for a tuple/list
    ``(x_1, …, x_k, y)``, ``model(x_1, …, x_k)`` with ``k`` the number of positional inputs ``forward``
    requires (``model(batch[0])`` for the usual ``(x, y)``); else ``model(batch)``. ``.logits`` is taken
    from model outputs that have it (Hugging Face models). Any other layout: pass
    ``forward_fn=lambda model, batch: ...`` to :func:`bma_predict_proba`."""
    try:
        if isinstance(batch, Mapping):
            out = model(**{k: v for k, v in batch.items() if k not in ("labels", "label")})
        elif isinstance(batch, (tuple, list)):
            k = min(_required_inputs(model), max(1, len(batch) - 1))
            out = model(*batch[:k])
        else:
            out = model(batch)
    except TypeError as exc:
        kind = "dict" if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(f"bma_predict_proba: the default forward could not call {type(model).__name__} on a {kind} "
                        f"batch ({exc}); pass forward_fn=lambda model, batch: <logits>, e.g. "
                        "forward_fn=lambda m, b: m(b[0], b[1]) for batches (x, mask, y)") from exc
    return out.logits if hasattr(out, "logits") else out


def check_finite_probs(probs: Tensor, bank: "SampleBank", i: int, where: str) -> Tensor:
    """``probs`` (one row per example) unchanged, or :class:`FloatingPointError` naming sample ``i``."""
    bad = ~torch.isfinite(probs.reshape(probs.shape[0], -1) if probs.ndim else probs.reshape(1, 1)).all(-1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise FloatingPointError(
            f"{where}: sample {i} (optimizer step {bank.steps[i]}) gives non-finite probabilities for "
            f"{int(bad.sum())} of {bad.numel()} examples (first: example {first}); the chain had diverged by "
            "that step. Shorten the Langevin step (η·λ_max(G^½∇²UG^½) ≤ 0.25, see StepSizeWarning: lower step_safety under "
            "step_size='auto', else the float step_size) or keep "
            "only samples taken before the divergence.")
    return probs


def fixed_batches(dataloader_or_batches: Iterable[Any], where: str) -> Iterable[Any]:
    """Batches that can be read once per sample in the same order: a DataLoader that does not shuffle (else
    ``ValueError`` naming ``where``), a list, or a one-shot iterator read once into a list."""
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(dataloader_or_batches, DataLoader) and isinstance(dataloader_or_batches.sampler, RandomSampler):
        raise ValueError(f"{where}: the DataLoader shuffles (RandomSampler); each sample makes one pass, "
                         "so the example order must be fixed: use shuffle=False")
    if iter(dataloader_or_batches) is dataloader_or_batches:  # one-shot iterator: read it once
        return list(dataloader_or_batches)
    return dataloader_or_batches


class Averager:
    """What :meth:`SampleBank.averaging` yields: loads samples into ``model`` and runs it on batches,
    one sample at a time. :meth:`per_sample` is the one loop over samples of this package."""

    def __init__(self, bank: "SampleBank", model: nn.Module, targets: dict[str, nn.Parameter]) -> None:
        self.bank, self.model, self._targets = bank, model, targets

    @torch.no_grad()
    def load(self, i: int) -> None:
        """Copy sample ``i`` into the model in place."""
        sample = self.bank[i]
        for name, p in self._targets.items():
            copy_full_(p, sample[name])   # a sharded (FSDP2) parameter receives its slice

    def per_sample(self, batches: Iterable[Any], forward_fn: Forward | None = None, *, log: bool = False,
                   where: str = "SampleBank.averaging") -> Iterator[Tensor]:
        """For each sample in bank order: the ``(n, K)`` probabilities ``softmax(forward_fn(model, b))`` (their
        logarithms with ``log=True``) of all ``batches``, concatenated; ``FloatingPointError`` names a
        sample with non-finite values."""
        forward = forward_fn or default_forward
        normalise = torch.log_softmax if log else torch.softmax
        for i in range(len(self.bank)):
            self.load(i)
            out = torch.cat([normalise(forward(self.model, b).float(), dim=-1) for b in batches])
            yield check_finite_probs(out, self.bank, i, where)

    def predict_proba(self, batch: Any, forward_fn: Forward | None = None) -> Tensor:
        """Average over the bank of ``softmax(forward_fn(model, batch))`` for one batch."""
        total = None
        for p in self.per_sample([batch], forward_fn):
            total = p if total is None else total.add_(p)
        return total.div_(len(self.bank))


def sample_probabilities(model: nn.Module, bank: "SampleBank", dataloader_or_batches: Iterable[Any],
                         forward_fn: Forward | None = None) -> Tensor:
    r"""Class probabilities of every banked sample, ``(S, n_examples, n_classes)``:
    :math:`p_s(y \mid x_n) = \operatorname{softmax}(f_{\theta_s}(x_n))_y`, in bank and data order.

    The average (:func:`bma_predict_proba`), its convergence
    (:func:`~langevin_lora.diagnostics.convergence.sample_convergence`) and the recipes' per-sample
    metrics are computed from these. Arguments, restoring and errors as in :func:`bma_predict_proba`;
    all ``S`` passes are held in memory (the average alone holds one).
    """
    batches = fixed_batches(dataloader_or_batches, "sample_probabilities")
    with bank.averaging(model) as averager:
        return torch.stack(list(averager.per_sample(batches, forward_fn, where="sample_probabilities")))


def bma_predict_proba(model: nn.Module, bank: "SampleBank", dataloader_or_batches: Iterable[Any],
                      forward_fn: Forward | None = None) -> Tensor:
    r"""Bayesian-model-averaged class probabilities, one row per example.

    .. math::
        \bar p(y \mid x_n) = \frac1S \sum_{s=1}^S \operatorname{softmax}\big(f_{\theta_s}(x_n)\big)_y

    Args:
        model: the module the samples were taken from (e.g. the LightningModule) or the PEFT model
            inside it; each sample is copied into it in place, and its own tensors and train/eval
            mode are restored after.
        bank: a non-empty :class:`~langevin_lora.posterior.bank.SampleBank`.
        dataloader_or_batches: a DataLoader without shuffling, a list of batches, or any iterable
            of batches (a one-shot iterator is read once into a list).
        forward_fn: ``forward_fn(model, batch) -> logits`` of shape ``(batch, n_classes)``;
            default :func:`default_forward` (a dict batch as keywords; ``(x_1, …, x_k, y)`` as the ``k``
            inputs ``forward`` requires). Pass it for any other batch layout.

    Returns:
        ``(n_examples, n_classes)`` float32 tensor of averaged probabilities, in data order.

    Raises:
        FloatingPointError: a sample gives non-finite probabilities (its index and step are named).
        ValueError: the bank is empty, the DataLoader shuffles, or ``model`` holds no parameter
            for some banked tensor.
    """
    batches = fixed_batches(dataloader_or_batches, "bma_predict_proba")
    total: Tensor | None = None
    with bank.averaging(model) as averager:
        for i, probs in enumerate(averager.per_sample(batches, forward_fn, where="bma_predict_proba")):
            if total is not None and total.shape != probs.shape:
                raise ValueError(f"bma_predict_proba: pass {i} gave {tuple(probs.shape)} probabilities, the first "
                                 f"{tuple(total.shape)}; the batches must be the same on every pass")
            total = probs if total is None else total.add_(probs)
    assert total is not None
    return total.div_(len(bank))
