r"""LoRA geometry: finding the adapter tensors, and the :math:`GL(r)` gauge symmetry of :math:`BA`.

- :mod:`~langevin_lora.lora.param_groups`: PEFT adapter tensors as named parameter groups;
- :mod:`~langevin_lora.lora.pair`: one :math:`(A, B)` pair as matrices;
- :mod:`~langevin_lora.lora.gauge`: exact gauge moves (Markov kernels that keep :math:`\pi_\beta`);
- :mod:`~langevin_lora.lora.balance`: balancing (a projection, for burn-in only).
"""
