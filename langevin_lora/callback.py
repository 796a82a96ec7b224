"""Old import path of the sampler callback, kept for YAML ``class_path: langevin_lora.callback.LangevinLoRA``.

The callback lives in :mod:`langevin_lora.lora_callback`; the diagnostics callback in
:mod:`langevin_lora.diagnostics`.
"""
from langevin_lora.lora_callback import SHARDED_STRATEGIES, LangevinLoRA

__all__ = ["LangevinLoRA", "SHARDED_STRATEGIES"]
