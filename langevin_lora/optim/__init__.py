from langevin_lora.core.engine import NonFiniteGradientWarning
from langevin_lora.optim.adam import LangevinAdam
from langevin_lora.optim.base import LangevinOptimizer
from langevin_lora.optim.sgd import LangevinSGD

__all__ = ["LangevinAdam", "LangevinOptimizer", "LangevinSGD", "NonFiniteGradientWarning"]
