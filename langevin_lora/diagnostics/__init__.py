r"""Gibbs-stationarity diagnostics: is the chain sampling :math:`\pi_\beta \propto e^{-\beta U}`?

All follow THEORY §3: for any vector field :math:`\varphi`,
:math:`\mathbb E_\pi[\varphi\cdot\nabla U] = \beta^{-1}\mathbb E_\pi[\nabla\cdot\varphi]`.

Layers, each usable alone (dependencies point down):

- :mod:`~langevin_lora.diagnostics.functional`: pure estimators, one implementation per identity
  (virial, mean-force :math:`\chi^2`, gauge gap, noise ratio, gradient square); torchmetrics
  wrappers in :mod:`~langevin_lora.diagnostics.metrics`; running sums with ``state_dict`` in
  :mod:`~langevin_lora.diagnostics.accumulators`;
- :class:`GibbsRecorder` (:mod:`~langevin_lora.diagnostics.recorder`): the live estimators of one
  chain, fed ``(group views, gradients, loss)`` per step, no Trainer needed;
- :class:`~langevin_lora.diagnostics.probes.CurvatureProbes`: Hutchinson :math:`\Delta U` and
  :math:`\eta\lambda_{\max}` on a loss closure (the products themselves are in
  :mod:`langevin_lora.core.curvature`);
- offline chain analysis (:mod:`~langevin_lora.diagnostics.chains`: R-hat, bulk/tail ESS and MCSE
  from arviz-stats; Geweke, Poincaré bounds in house) and the report: small check
  functions (:mod:`~langevin_lora.diagnostics.checks`) giving :class:`Check` verdicts in a
  :class:`StationarityReport` (:mod:`~langevin_lora.diagnostics.report`, figures in
  :mod:`~langevin_lora.diagnostics.plots`);
- :class:`GibbsDiagnostics` (:mod:`~langevin_lora.diagnostics.gibbs_callback`): the Lightning
  callback over all of them (imports Lightning, loaded on first use).
"""
from langevin_lora.core.view import register_default_diagnostics
from langevin_lora.diagnostics.accumulators import BlockMeans, MicroBatchMoments, WindowCenter
from langevin_lora.diagnostics.chains import (
    as_chains,
    autocorrelation,
    chain_summary,
    ess,
    mcse,
    rhat,
    rhat_nested,
    segment_chain,
    batch_means_se,
    effective_dimension,
    effective_sample_size,
    geweke_z,
    integrated_autocorr_time,
    poincare_autocorrelation,
    poincare_lora,
    poincare_lower_bounds,
    poincare_rayleigh,
    split_rhat,
)
from langevin_lora.diagnostics.checks import CHECKS, Evidence, stationarity_report
from langevin_lora.diagnostics.functional import (
    HessianVectorProduct,
    gauge_gap,
    gauge_matrix,
    gauge_target,
    gradient_square,
    hutchinson_laplacian,
    mean_force,
    mean_force_chi2,
    minibatch_noise_trace,
    noise_ratio,
    power_iteration,
    virial_sum,
    virial_temperature,
)
from langevin_lora.diagnostics.metrics import (
    ConfigurationalTemperature,
    GaugeGap,
    MeanForceChi2,
    NoiseRatio,
    VirialTemperature,
)
from langevin_lora.diagnostics.probes import CurvatureProbes
from langevin_lora.diagnostics.recorder import GibbsRecorder, LoraModule
from langevin_lora.diagnostics.report import Check, StationarityReport


def _default_diagnostics(trainer):
    """What ``LangevinLoRA(diagnostics=True)`` attaches (registered below; see
    :func:`langevin_lora.core.view.register_default_diagnostics`)."""
    from langevin_lora.diagnostics.gibbs_callback import GibbsDiagnostics

    return GibbsDiagnostics(report=trainer.logger is not None)


register_default_diagnostics(_default_diagnostics)


def __getattr__(name: str):
    # The callback imports Lightning: load it only when asked for, so the estimators stay
    # importable (and cheap) without a Trainer.
    if name in ("GibbsDiagnostics", "StepSizeWarning"):
        from langevin_lora.diagnostics import gibbs_callback

        return getattr(gibbs_callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockMeans",
    "CHECKS",
    "Check",
    "ConfigurationalTemperature",
    "CurvatureProbes",
    "Evidence",
    "GaugeGap",
    "GibbsDiagnostics",
    "GibbsRecorder",
    "HessianVectorProduct",
    "LoraModule",
    "MeanForceChi2",
    "MicroBatchMoments",
    "NoiseRatio",
    "StationarityReport",
    "StepSizeWarning",
    "VirialTemperature",
    "WindowCenter",
    "as_chains",
    "autocorrelation",
    "chain_summary",
    "ess",
    "mcse",
    "rhat",
    "rhat_nested",
    "segment_chain",
    "batch_means_se",
    "effective_dimension",
    "effective_sample_size",
    "gauge_gap",
    "gauge_matrix",
    "gauge_target",
    "geweke_z",
    "gradient_square",
    "hutchinson_laplacian",
    "integrated_autocorr_time",
    "mean_force",
    "mean_force_chi2",
    "minibatch_noise_trace",
    "noise_ratio",
    "poincare_autocorrelation",
    "poincare_lora",
    "poincare_lower_bounds",
    "poincare_rayleigh",
    "power_iteration",
    "split_rhat",
    "stationarity_report",
    "virial_sum",
    "virial_temperature",
]
