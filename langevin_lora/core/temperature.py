r"""The temperature convention, stated once.

Langevin LoRA samples the Gibbs measure

.. math::
    \pi(\theta) \propto \exp\!\big(-\beta\, U(\theta)\big), \qquad
    U(\theta) = \hat L(\theta) + \tfrac{\lambda}{2}\lVert\theta\rVert^2,

where :math:`\hat L` is the **mean** training loss and :math:`\lambda` the weight decay, read as a
Gaussian prior :math:`N(0, \sigma_p^2 I)` with :math:`\lambda = 1/(N\sigma_p^2)`
(:func:`weight_decay_from_prior_std`, :func:`prior_std_from_weight_decay`).

The inverse temperature of a parameter group is

.. math::
    \beta = \frac{\beta_0}{T}, \qquad \beta_0 = N \ (\texttt{num\_data}) \ \text{or}\ \beta_0 = \texttt{beta},

so ``num_data=N, temperature=1`` is the Bayesian posterior of a mean-NLL loss
(:math:`\exp(-N \hat L)` times the prior), ``temperature=T`` the tempered posterior
:math:`p^{1/T}` ("cold" when :math:`T<1`), and ``beta`` sets :math:`\beta_0` directly (the seed
paper's form; its SGD-mimicking SDE with learning rate :math:`s` has :math:`\beta = 2/s`).
``temperature=0`` means :math:`\beta=\infty`: no noise, plain (preconditioned) gradient descent on
:math:`U`. For a token-averaged language-model loss, :math:`N` is the number of supervised tokens.

The prior. With the sum log-likelihood :math:`N\hat L` and a prior :math:`N(0,\sigma_p^2 I)`,
the log posterior is :math:`-N\hat L - \lVert\theta\rVert^2/(2\sigma_p^2) = -N\,U` exactly when

.. math::
    \lambda = \frac{1}{N\sigma_p^2}, \qquad \sigma_p = \frac{1}{\sqrt{N\lambda}} ,

so :math:`\lambda` depends on :math:`N` (the same prior is a smaller decay on more data). At
temperature :math:`T` the Gibbs measure tempers the prior too: its Gaussian factor
:math:`\exp(-\beta\tfrac{\lambda}{2}\lVert\theta\rVert^2)` has variance :math:`(\beta\lambda)^{-1}
= T\sigma_p^2` per coordinate. With ``beta`` given directly, pass :math:`\beta_0` as ``num_data``
to read :math:`\sigma_p` as the prior of :math:`\exp(-\beta_0 U)`.

**No improper target.** At :math:`T > 0` the Gibbs measure needs :math:`\lambda > 0` for LoRA
tensors: the factors' gauge orbits :math:`(A, B) \to (gA, Bg^{-1})` leave :math:`\hat L`
unchanged, and so do the loss's null directions, so :math:`\exp(-\beta\hat L)` alone is not
normalisable (the seed paper's "mild regularisation"). :class:`~langevin_lora.LangevinLoRA` therefore
defaults to the prior :math:`\sigma_p` = :data:`DEFAULT_PRIOR_STD` (:math:`\lambda = 1/(N\sigma_p^2)`,
resolved once :math:`N` is known), and :func:`check_proper_prior` refuses :math:`\lambda = 0` at
:math:`T > 0` for the LoRA groups of the optimizers. A generic group may sample with
:math:`\lambda = 0`: its target is proper only if the loss confines every direction.
"""
from __future__ import annotations

import math

from langevin_lora._validation import check_int, check_non_negative, check_positive

__all__ = ["DEFAULT_PRIOR_STD", "LORA_ROLES", "PRIOR_CENTRES", "check_proper_prior", "effective_beta", "noise_std",
           "prior_std_from_weight_decay", "resolve_base_beta", "weight_decay_from_prior_std"]

#: Where the Gaussian prior is centred, for the optimizers and :class:`~langevin_lora.LangevinLoRA` alike:
#: ``"zero"`` (:math:`U = \hat L + \tfrac\lambda2\lVert\theta\rVert^2`) or ``"burn_in"`` (at the tensors
#: when burn-in ends and sampling starts, :math:`\theta_0`: a local posterior,
#: :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2`).
PRIOR_CENTRES = ("zero", "burn_in")

#: The default prior standard deviation :math:`\sigma_p` of :class:`~langevin_lora.LangevinLoRA`
#: (``weight_decay=None``): a Gaussian :math:`N(0, \sigma_p^2 I)` on every LoRA coordinate, the value
#: the recipes used (issue 13). A research helper found :math:`\sigma_p = 0.05` good for a posterior
#: centred at the burn-in weights on MiniLM/Twitter (THEORY §6); how to choose it well is the
#: calibration issue's subject, and this default may change.
DEFAULT_PRIOR_STD = 0.1

#: Param-group name prefixes (:func:`~langevin_lora.lora_param_groups`) of LoRA tensors, whose Gibbs
#: measure is improper without a prior.
LORA_ROLES = ("lora_A/", "lora_B/", "lora_magnitude/")


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


def weight_decay_from_prior_std(prior_std: float, num_data: float) -> float:
    r"""The coupled weight decay :math:`\lambda = 1/(N\sigma_p^2)` of a Gaussian prior
    :math:`N(0, \sigma_p^2 I)` for a mean loss over :math:`N` = ``num_data`` examples.

    Example:
        >>> weight_decay_from_prior_std(0.1, 1000)
        0.1
    """
    sigma = check_positive("prior_std", prior_std)
    return 1.0 / (check_positive("num_data", num_data) * sigma * sigma)


def prior_std_from_weight_decay(weight_decay: float, num_data: float) -> float:
    r"""The prior standard deviation :math:`\sigma_p = 1/\sqrt{N\lambda}` that a coupled weight
    decay :math:`\lambda` > 0 encodes for a mean loss over :math:`N` = ``num_data`` examples
    (the inverse of :func:`weight_decay_from_prior_std`).

    Example:
        >>> prior_std_from_weight_decay(0.1, 1000)
        0.1
    """
    lam = check_positive("weight_decay", weight_decay)
    return 1.0 / math.sqrt(check_positive("num_data", num_data) * lam)


def check_proper_prior(group: str | None, temperature: float, weight_decay: float) -> None:
    r"""Refuse :math:`\lambda = 0` at :math:`T > 0` for a LoRA group (name starting with one of
    :data:`LORA_ROLES`, e.g. ``"lora_A/default"``): its Gibbs measure would be improper (module
    docstring). Other groups pass: they are proper if their loss confines them."""
    if weight_decay == 0 and temperature > 0 and isinstance(group, str) and group.startswith(LORA_ROLES):
        raise ValueError(
            f"Invalid weight_decay: 0 for the LoRA group {group!r} at temperature {temperature:g} > 0 (expected "
            "weight_decay > 0): without a prior the Gibbs measure of LoRA factors is improper (their gauge orbits "
            "and the loss's null directions are not normalisable). Use e.g. weight_decay_from_prior_std(0.1, "
            "num_data), or temperature=0 for noise-free descent.")
