r"""The temperature convention, stated once.

Langevin LoRA samples the Gibbs measure

.. math::
    \pi(\theta) \propto \exp\!\big(-\beta\, U(\theta)\big), \qquad
    U(\theta) = \hat L(\theta) + \tfrac{\lambda}{2}\lVert\theta\rVert^2,

where :math:`\hat L` is the **mean** training loss and :math:`\lambda` the weight decay, read as a
Gaussian prior :math:`N(0, \sigma_p^2 I)` with :math:`\lambda = 1/(N\sigma_p^2)`.

The inverse temperature of a parameter group is

.. math::
    \beta = \frac{\beta_0}{T}, \qquad \beta_0 = N \ (\texttt{num\_data}) \ \text{or}\ \beta_0 = \texttt{beta},

so ``num_data=N, temperature=1`` is the Bayesian posterior of a mean-NLL loss
(:math:`\exp(-N \hat L)` times the prior), ``temperature=T`` the tempered posterior
:math:`p^{1/T}` ("cold" when :math:`T<1`), and ``beta`` sets :math:`\beta_0` directly (the seed
paper's form; its SGD-mimicking SDE with learning rate :math:`s` has :math:`\beta = 2/s`).
``temperature=0`` means :math:`\beta=\infty`: no noise, plain (preconditioned) gradient descent on
:math:`U`. For a token-averaged language-model loss, :math:`N` is the number of supervised tokens.
"""
from __future__ import annotations

import math

from langevin_lora._validation import check_int, check_non_negative, check_positive


def resolve_base_beta(num_data: int | None, beta: float | None) -> float:
    r"""Return :math:`\beta_0` from exactly one of ``num_data`` and ``beta``."""
    if (num_data is None) == (beta is None):
        raise ValueError(
            "Invalid num_data/beta: pass exactly one of them (num_data = number of training "
            f"examples, or beta > 0 directly); got num_data={num_data!r}, beta={beta!r}"
        )
    if beta is not None:
        return check_positive("beta", beta)
    return float(check_int("num_data", num_data, low=1))


def effective_beta(base_beta: float, temperature: float) -> float:
    r""":math:`\beta = \beta_0 / T`, with :math:`T = 0` giving :math:`\beta = \infty`."""
    check_non_negative("temperature", temperature)
    return math.inf if temperature == 0 else base_beta / temperature


def noise_std(lr: float, beta: float) -> float:
    r"""Standard deviation :math:`\sqrt{2\eta/\beta}` of the Langevin noise for one step of size ``lr``."""
    return 0.0 if math.isinf(beta) else math.sqrt(2.0 * lr / beta)
