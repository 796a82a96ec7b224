r"""The core: what every Langevin front-end shares, with no Lightning, PEFT or LoRA knowledge.

Dependencies point down the list:

- :mod:`~langevin_lora.core.temperature`: the temperature convention, prior scale and weight decay;
- :mod:`~langevin_lora.core.functional`: the update rules as pure functions on tensor lists;
- :mod:`~langevin_lora.core.rng`: explicit noise generators (sharding- and thread-count-independent);
- :mod:`~langevin_lora.core.engine`: per-tensor sampler state and the step every front-end takes;
- :mod:`~langevin_lora.core.curvature` and :mod:`~langevin_lora.core.step_size`: the measured step;
- :mod:`~langevin_lora.core.guard`: the divergence guard;
- :mod:`~langevin_lora.core.view`: the read-only view of a sampler's groups that diagnostics read;
- :mod:`~langevin_lora.core.sharding`: FSDP2 shards (each rank's slice of the unsharded noise, sums over ranks).
"""
