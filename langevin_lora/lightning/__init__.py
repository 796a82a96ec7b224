r"""The Lightning front-end: :class:`~langevin_lora.LangevinLoRA` and what it needs from a Trainer.

- :mod:`~langevin_lora.lightning.callback`: the callback over the core's engine;
- :mod:`~langevin_lora.lightning.schedule`: the run's phases (watch, burn-in, stages), Trainer-free;
- :mod:`~langevin_lora.lightning.stages`: the drop-in's stages acted out on the Trainer and the engine;
- :mod:`~langevin_lora.lightning.validation`: the validation set and the paired score of a stage;
- private helpers: the optimizer-step wrapper and the bridge to the user's torch optimizer (the
  replay of a ``training_step`` for curvature probes is :mod:`langevin_lora.diagnostics.replay`).
"""
