r"""Enough posterior samples? The validation NLL of the running posterior average (used by
:class:`~langevin_lora.LangevinLoRA` to stop sampling once the average has settled, and by the recipes).

With :math:`p_s(y \mid x)` the predictive probabilities of sample :math:`s = 1..S` (in chain order)
and :math:`\bar p_m = \frac1m \sum_{s \le m} p_s` the running average, this module reports on the
validation split (never the test split):

- the running curve :math:`\mathrm{NLL}(\bar p_m)`, :math:`m = 1..S`;
- the per-sample validation log-likelihood :math:`\ell_s = \frac1n \sum_i \log p_s(y_i \mid x_i)` and its
  effective sample size :math:`\mathrm{ESS} = S/\tau_{int}`
  (:func:`langevin_lora.diagnostics.effective_sample_size`): how many independent draws the samples
  are worth;
- whether more sampling would still change the predictions: the last half of the samples moves the
  validation NLL by

  .. math::
      \Delta = \mathrm{NLL}(\bar p_S) - \mathrm{NLL}(\bar p_{\lfloor S/2 \rfloor}),

  compared with its standard error over validation examples,
  :math:`\mathrm{se} = \mathrm{sd}_i(d_i)/\sqrt n`,
  :math:`d_i = -\log \bar p_S(y_i \mid x_i) + \log \bar p_{\lfloor S/2\rfloor}(y_i \mid x_i)`.
  :math:`|\Delta| > \mathrm{se}`: the average was still moving, so more samples (or a longer chain)
  would still change the predictions; otherwise the average has settled at the resolution of the
  validation set.
- how much more sampling would still change them: the NLL of a finite average of exchangeable
  samples approaches its limit as :math:`\mathrm{NLL}(\bar p_S) \approx \mathrm{NLL}_\infty + c/S`
  (the average's excess loss is its variance term), so the gain still to come from :math:`S` to
  :math:`\infty` samples equals the gain from :math:`S/2` to :math:`S`:
  :math:`\mathrm{NLL}_\infty \approx \mathrm{NLL}(\bar p_S) + \Delta` (Richardson extrapolation);
  :func:`convergence_sentence` says it in words.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["sample_convergence", "convergence_sentence"]

_TINY = 1e-12


def _example_nll(probs: Tensor, labels: Tensor) -> Tensor:
    return -probs.double().clamp_min(_TINY).log().gather(1, labels.long()[:, None]).squeeze(1)


def sample_convergence(sample_probs: Tensor, labels: Tensor) -> dict[str, Any]:
    r"""``sample_probs`` ``(S, n, K)``: validation probabilities of each sample in chain order;
    ``labels`` ``(n,)``. Returns the running NLL curve, per-sample log-likelihoods, ESS, ``delta``,
    ``delta_se``, ``converged`` and ``extrapolated_nll`` (:math:`\mathrm{NLL}_\infty`; ``None`` with
    fewer than 2 samples)."""
    if sample_probs.ndim != 3 or sample_probs.shape[1] != labels.shape[0]:
        raise ValueError(f"Invalid sample_probs: expected shape (samples, {labels.shape[0]}, classes), got "
                         f"{tuple(sample_probs.shape)}")
    p = sample_probs.double()
    S = p.shape[0]
    running = torch.cumsum(p, 0) / torch.arange(1, S + 1, dtype=p.dtype)[:, None, None]
    curve = [float(_example_nll(running[m], labels).mean()) for m in range(S)]
    loglik = [float(-_example_nll(p[s], labels).mean()) for s in range(S)]
    out: dict[str, Any] = {"num_samples": S, "running_val_nll": curve, "sample_val_loglik": loglik,
                           "ess": None, "delta": None, "delta_se": None, "converged": None, "extrapolated_nll": None}
    if S >= 4:
        from langevin_lora.diagnostics import effective_sample_size
        series = np.asarray(loglik)
        out["ess"] = float(effective_sample_size(series)) if series.std() > 0 else float(S)
    if S >= 2:
        d = _example_nll(running[-1], labels) - _example_nll(running[S // 2 - 1], labels)
        delta = float(d.mean())
        se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")
        out.update(delta=delta, delta_se=se, converged=bool(abs(delta) <= se), extrapolated_nll=curve[-1] + delta)
    return out


def convergence_sentence(c: dict[str, Any]) -> str:
    """Whether more sampling would still change the predictions, in one sentence, from
    :func:`sample_convergence`'s result."""
    S = c["num_samples"]
    if c["converged"] is None:
        return f"{S} sample(s): too few to judge whether more sampling would change the predictions."
    nll, delta, se = c["running_val_nll"][-1], c["delta"], c["delta_se"]
    ess = "" if c["ess"] is None else f", worth {c['ess']:.0f} independent draws"
    if c["converged"]:
        return (f"The posterior average of {S} samples{ess} has settled: the last {S - S // 2} moved the validation "
                f"NLL by {delta:+.4f}, within its standard error {se:.4f}; more sampling would not change the "
                "predictions measurably.")
    change = "lower" if delta < 0 else "raise"
    return (f"The posterior average of {S} samples{ess} is still moving: the last {S - S // 2} moved the validation "
            f"NLL by {delta:+.4f} (standard error {se:.4f}), so about {2 * S} samples would {change} it by about "
            f"{abs(delta):.4f} more ({100 * abs(delta) / nll:.1f}% of {nll:.4f}; extrapolated limit "
            f"{c['extrapolated_nll']:.4f}).")
