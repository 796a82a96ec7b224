r"""Langevin LoRA: sample the Gibbs measure :math:`\pi_\beta \propto \exp(-\beta(\hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2))`
over PEFT LoRA adapter tensors, as a drop-in optimizer or a Lightning callback.

The temperature convention is stated in :mod:`langevin_lora.temperature`.
"""
import langevin_lora.diagnostics  # noqa: F401  (registers the default diagnostics of LangevinLoRA)
from langevin_lora.balance import BalanceSchedule, balance_factors, balance_lora_
from langevin_lora.engine import LangevinEngine
from langevin_lora.gauge import GaugeMoves
from langevin_lora.guard import DivergenceError, DivergenceGuard, DivergenceWarning
from langevin_lora.lora_callback import LangevinLoRA
from langevin_lora.functional import adapted_preconditioner, frozen_preconditioner, langevin_step_
from langevin_lora.optim import LangevinAdam, LangevinSGD, NonFiniteGradientWarning
from langevin_lora.param_groups import LoraFactors, lora_modules, lora_param_groups, lora_parameters
from langevin_lora.samples import SampleBank, bma_predict_proba
from langevin_lora.step_size import AutoStepSize, auto_step_size
from langevin_lora.temperature import (
    DEFAULT_PRIOR_STD,
    effective_beta,
    noise_std,
    prior_std_from_weight_decay,
    resolve_base_beta,
    weight_decay_from_prior_std,
)

__version__ = "0.1.0"

__all__ = [
    "AutoStepSize",
    "BalanceSchedule",
    "DEFAULT_PRIOR_STD",
    "DivergenceError",
    "DivergenceGuard",
    "DivergenceWarning",
    "GaugeMoves",
    "balance_factors",
    "balance_lora_",
    "bma_predict_proba",
    "LangevinAdam",
    "LangevinEngine",
    "LangevinLoRA",
    "LangevinSGD",
    "LoraFactors",
    "NonFiniteGradientWarning",
    "SampleBank",
    "effective_beta",
    "adapted_preconditioner",
    "auto_step_size",
    "frozen_preconditioner",
    "langevin_step_",
    "lora_modules",
    "lora_param_groups",
    "lora_parameters",
    "noise_std",
    "prior_std_from_weight_decay",
    "resolve_base_beta",
    "weight_decay_from_prior_std",
]
