r"""The posterior: samples kept, written, read back and averaged.

- :mod:`~langevin_lora.posterior.bank`: :class:`~langevin_lora.SampleBank` stores adapter tensors;
- :mod:`~langevin_lora.posterior.adapter_folders`: PEFT folders, written atomically;
- :mod:`~langevin_lora.posterior.averaging`: Bayesian model averaging over a bank.

The bank stores and the averaging averages: the bank never computes predictions.
"""
