r"""Langevin LoRA: sample the Gibbs measure :math:`\pi_\beta \propto \exp(-\beta(\hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2))`
over PEFT LoRA adapter tensors, as a drop-in optimizer or a Lightning callback.

The temperature convention is stated in :mod:`langevin_lora.core.temperature`.

Layers, each depending only on those above it: :mod:`~langevin_lora.core` (temperature, update
rules, noise, engine, step size, guard), :mod:`~langevin_lora.lora` (adapter groups, gauge,
balancing), :mod:`~langevin_lora.posterior` (sample bank, averaging, adapter folders),
:mod:`~langevin_lora.optim` (torch optimizers), :mod:`~langevin_lora.diagnostics` (Gibbs
stationarity) and :mod:`~langevin_lora.lightning` (the callback). Release 0.1's module paths are
aliases with a ``DeprecationWarning`` (:mod:`langevin_lora._moved`).
"""
from langevin_lora.core.engine import LangevinEngine
from langevin_lora.core.functional import adapted_preconditioner, frozen_preconditioner, langevin_step_
from langevin_lora.core.guard import DivergenceError, DivergenceGuard, DivergenceWarning
from langevin_lora.core.step_size import AutoStepSize, auto_step_size
from langevin_lora.core.temperature import (
    DEFAULT_PRIOR_STD,
    effective_beta,
    noise_std,
    prior_std_from_weight_decay,
    resolve_base_beta,
    weight_decay_from_prior_std,
)
from langevin_lora.lora.balance import BalanceSchedule, balance_factors, balance_lora_
from langevin_lora.lora.gauge import GaugeMoves
from langevin_lora.lora.param_groups import LoraFactors, lora_modules, lora_param_groups, lora_parameters
from langevin_lora.posterior.averaging import bma_predict_proba
from langevin_lora.posterior.bank import SampleBank
from langevin_lora.optim import LangevinAdam, LangevinSGD, NonFiniteGradientWarning
from langevin_lora import _moved
import langevin_lora.diagnostics  # noqa: F401  (registers the default diagnostics of LangevinLoRA)
from langevin_lora.lightning.callback import LangevinLoRA

__version__ = "0.2.0.dev0"

_moved.install()

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
