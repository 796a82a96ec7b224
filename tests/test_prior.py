"""The prior convention beside the temperature convention (issue 12): lambda = 1/(N sigma_p^2).

With the mean loss L and U = L + (lambda/2)|theta|^2, the Bayesian log posterior of N examples with a
N(0, sigma_p^2 I) prior, -N L - |theta|^2/(2 sigma_p^2), must equal -N U for every theta; the recipes
plan their decay through the same helper."""
import math

import pytest
import torch

from langevin_lora.core.temperature import prior_std_from_weight_decay, weight_decay_from_prior_std


@pytest.mark.parametrize("sigma, n", [(0.1, 1000), (0.02, 2000), (1.0, 569), (0.5, 7.5)])
def test_weight_decay_makes_minus_N_U_the_log_posterior(sigma, n):
    lam = weight_decay_from_prior_std(sigma, n)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(50, dtype=torch.float64, generator=g) * 3
    loss = 0.731  # any mean loss
    log_post = -n * loss - (theta ** 2).sum() / (2 * sigma ** 2)
    minus_n_u = -n * (loss + 0.5 * lam * (theta ** 2).sum())
    assert float(log_post) == pytest.approx(float(minus_n_u), rel=1e-12)
    assert prior_std_from_weight_decay(lam, n) == pytest.approx(sigma, rel=1e-12)
    assert lam == pytest.approx(1.0 / (n * sigma ** 2), rel=1e-15)


def test_prior_helpers_check_their_arguments():
    import numpy as np

    assert weight_decay_from_prior_std(np.float64(0.1), np.int64(1000)) == pytest.approx(0.1)
    for bad in (0.0, -1.0, math.nan, math.inf, "0.1", True):
        with pytest.raises(ValueError, match="Invalid prior_std"):
            weight_decay_from_prior_std(bad, 10)
        with pytest.raises(ValueError, match="Invalid weight_decay"):
            prior_std_from_weight_decay(bad, 10)
    with pytest.raises(ValueError, match="Invalid num_data"):
        weight_decay_from_prior_std(0.1, 0)


def test_compare_plan_uses_the_prior_helper():
    from recipes.compare import LangevinSettings

    # burn_in given: the recipe's default is now 'best', whose plan needs the AdamW run's best step
    plan = LangevinSettings(prior_std=0.05, burn_in=0.5).plan(total_steps=40, num_data=1234)
    assert plan["weight_decay"] == weight_decay_from_prior_std(0.05, 1234)
    assert LangevinSettings(weight_decay=0.3, burn_in=0.5).plan(total_steps=40, num_data=1234)["weight_decay"] == 0.3


# -- issue 13 item 3: no improper target by default ----------------------------------------------------
def test_lora_callback_refuses_an_improper_prior_and_defaults_to_a_proper_one():
    """weight_decay=0 at T > 0 is refused (the message names weight_decay and the allowed range); at T = 0
    it is noise-free descent and allowed; weight_decay=None (default) resolves to 1/(N sigma_p^2) with the
    documented DEFAULT_PRIOR_STD, or with prior_std; prior_std beside weight_decay is refused."""
    from callback_helpers import N, Tiny, loader, trainer

    from langevin_lora.lightning.callback import LangevinLoRA
    from langevin_lora.core.temperature import DEFAULT_PRIOR_STD

    with pytest.raises(ValueError, match=r"Invalid weight_decay: 0 at temperature 1 > 0 \(expected weight_decay > 0"):
        LangevinLoRA(weight_decay=0.0)
    LangevinLoRA(weight_decay=0.0, temperature=0.0)
    with pytest.raises(ValueError, match="Invalid prior_std"):
        LangevinLoRA(weight_decay=0.1, prior_std=0.1)
    with pytest.raises(ValueError, match="Invalid prior_std"):
        LangevinLoRA(prior_std=0.0)
    assert DEFAULT_PRIOR_STD == 0.1
    for prior_std, sigma in ((None, DEFAULT_PRIOR_STD), (0.05, 0.05)):
        cb = LangevinLoRA(burn_in_steps=2, prior_std=prior_std, diagnostics=False)
        trainer([cb], 4).fit(Tiny(schedule=False), loader())
        assert cb.num_data == N and cb.weight_decay == pytest.approx(weight_decay_from_prior_std(sigma, N), rel=1e-12)
        assert all(v.weight_decay == cb.weight_decay for v in cb.langevin_groups())


def test_langevin_optimizers_refuse_an_improper_prior_for_lora_groups():
    """LangevinSGD/LangevinAdam over lora_param_groups: weight_decay=0 at T > 0 is refused for the LoRA
    groups, naming the group; a generic group (possibly confined by its loss) may sample with 0."""
    from peft import LoraConfig, get_peft_model
    from callback_helpers import Base

    from langevin_lora import LangevinAdam, LangevinSGD, lora_param_groups

    model = get_peft_model(Base(), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], modules_to_save=["head"]))
    for cls in (LangevinSGD, LangevinAdam):
        with pytest.raises(ValueError, match=r"Invalid weight_decay: 0 for the LoRA group 'lora_A/default'"):
            cls(lora_param_groups(model), lr=1e-3, num_data=10, weight_decay=0.0)
        cls(lora_param_groups(model, lora_temperature=0.0), lr=1e-3, num_data=10, weight_decay=0.0)
        cls(lora_param_groups(model), lr=1e-3, num_data=10, weight_decay=1e-2)
    LangevinSGD([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, num_data=10, weight_decay=0.0)
