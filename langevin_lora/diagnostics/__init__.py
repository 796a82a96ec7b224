r"""Gibbs-stationarity diagnostics: is the chain sampling :math:`\pi_\beta \propto e^{-\beta U}`?

Live estimators (:mod:`~langevin_lora.diagnostics.functional`, torchmetrics wrappers in
:mod:`~langevin_lora.diagnostics.metrics`), offline chain analysis
(:mod:`~langevin_lora.diagnostics.chains`), the :func:`stationarity_report` and the Lightning
callback :class:`GibbsDiagnostics`. All follow THEORY §3: for any vector field :math:`\varphi`,
:math:`\mathbb E_\pi[\varphi\cdot\nabla U] = \beta^{-1}\mathbb E_\pi[\nabla\cdot\varphi]`.
"""
from langevin_lora.diagnostics.chains import (
    autocorrelation,
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
from langevin_lora.diagnostics.functional import (
    HessianVectorProduct,
    WindowCenter,
    configurational_temperature,
    effective_temperature_factor,
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
from langevin_lora.diagnostics.report import Check, StationarityReport, stationarity_report
from langevin_lora.view import register_default_diagnostics


def _default_diagnostics(trainer):
    """What ``LangevinLoRA(diagnostics=True)`` attaches (registered below; see
    :func:`langevin_lora.view.register_default_diagnostics`)."""
    from langevin_lora.diagnostics.callback import GibbsDiagnostics

    return GibbsDiagnostics(report=trainer.logger is not None)


register_default_diagnostics(_default_diagnostics)


def __getattr__(name: str):
    # The callback imports Lightning: load it only when asked for, so the estimators stay
    # importable (and cheap) without a Trainer.
    if name in ("GibbsDiagnostics", "StepSizeWarning"):
        from langevin_lora.diagnostics import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Check",
    "ConfigurationalTemperature",
    "GaugeGap",
    "GibbsDiagnostics",
    "HessianVectorProduct",
    "MeanForceChi2",
    "NoiseRatio",
    "StationarityReport",
    "StepSizeWarning",
    "VirialTemperature",
    "WindowCenter",
    "autocorrelation",
    "batch_means_se",
    "configurational_temperature",
    "effective_dimension",
    "effective_sample_size",
    "effective_temperature_factor",
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
