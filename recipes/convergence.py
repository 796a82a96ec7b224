"""The predictive convergence estimator now lives in :mod:`langevin_lora.diagnostics.convergence` (the callback
stops sampling with it); this module keeps the recipes' import path."""
from langevin_lora.diagnostics.convergence import convergence_sentence, sample_convergence

__all__ = ["sample_convergence", "convergence_sentence"]
