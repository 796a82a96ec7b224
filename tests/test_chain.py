"""The phase logic of the zero-config drop-in (langevin_lora.lightning.schedule), without a Trainer."""
import math

import pytest

from langevin_lora.lightning.schedule import DEFAULT_PRIOR_LADDER, ChainSchedule, relaxation_steps


def test_watch_restores_the_best_after_patience():
    chain = ChainSchedule(patience=2)
    chain.reset(planned_steps=1000)
    assert chain.observe(1.0, 10) and chain.observe(0.8, 20)       # improvements: snapshot asked for
    assert not chain.observe(0.85, 30) and not chain.due(31)
    assert not chain.observe(0.9, 40) and chain.due(41)            # two checks without improvement
    assert "did not improve for 2" in chain.begin(41) and chain.best_step == 20 and chain.phase == "sample"


def test_min_delta_and_mode_max():
    chain = ChainSchedule(mode="max", min_delta=0.1, patience=1)
    chain.reset(100)
    assert chain.observe(0.5, 1)
    assert not chain.observe(0.55, 2) and chain.triggered           # +0.05 is not an improvement


def test_fallback_without_monitor_and_when_still_improving():
    chain = ChainSchedule(max_burn_in_fraction=0.5)
    chain.reset(planned_steps=100)
    assert not chain.observe(None, 10)          # not logged: nothing to judge
    assert not chain.due(49) and chain.due(50)
    assert "no 'val_loss' was logged" in chain.begin(50)
    chain.reset(planned_steps=100)
    for step in range(10, 110, 10):
        chain.observe(1.0 / step, step)         # still improving: the fraction does not apply
    assert not chain.due(99)
    assert "still improving when the budget ended" in chain.end_watching() and chain.phase == "done"


def test_integer_burn_in_is_the_fixed_schedule():
    chain = ChainSchedule(burn_in_steps=7, staged=False)
    chain.reset(10)
    assert not chain.observe(0.1, 3)            # the validation curve is not watched
    assert not chain.due(6) and chain.due(7)


def test_ladder_climbs_from_the_middle_then_samples_the_best_scale():
    chain = ChainSchedule(prior_stds=(0.01, 0.02, 0.04, 0.08), num_samples=4)
    chain.reset(1000)
    chain.begin(0)
    stage = chain.open_stage(0, relax=10)
    assert (stage.prior_std, stage.sample_every, stage.collect, stage.end, stage.final) == (0.02, 2, 8, 18, False)
    kept = [k for k in range(1, 19) if chain.sample_due(k)]
    assert kept == [12, 14, 16, 18] and chain.stage_complete(18) and not chain.stage_complete(17)
    stage.samples = 4
    assert chain.close_stage(0.50) == "next"         # first stage: the best so far, go up
    chain.open_stage(18, relax=10).samples = 4
    assert chain.stage.prior_std == 0.04
    assert chain.close_stage(0.45) == "next" and chain.best_stage == 1
    chain.open_stage(36, relax=10).samples = 4
    assert chain.stage.prior_std == 0.08
    assert chain.close_stage(0.47) == "final"        # worse: the ladder ends, back to 0.04
    assert chain.final_prior_std == 0.04 and "did not win" in chain.ladder_reason
    final = chain.open_stage(54, relax=10)
    assert final.final and final.prior_std == 0.04 and chain.phase == "sample" and final.sample_every == 2
    assert not chain.stage_complete(10 ** 6)          # only the caller ends the final stage
    assert [k for k in range(54, 75) if chain.sample_due(k)] == [66, 68, 70, 72, 74]
    final.samples = 8
    chain.thin()                                     # the reservoir dropped every other sample
    assert (final.sample_every, final.samples) == (4, 4) and chain.sample_due(72) and not chain.sample_due(70)
    chain.finish("settled")
    assert chain.phase == "done" and chain.stop_reason == "settled" and not chain.due(1000)


def test_wider_wins_ties_narrower_must_win_clearly():
    chain = ChainSchedule(prior_stds=(0.01, 0.02, 0.04, 0.08), num_samples=2)
    chain.reset(1000)
    chain.begin(0)
    chain.open_stage(0, relax=4).samples = 2                                  # 0.02
    assert chain.close_stage(0.50) == "next"
    chain.open_stage(12, relax=4).samples = 2                                 # 0.04: worse, within one se
    assert chain.close_stage(0.505, delta=0.005, se=0.01) == "next" and chain.best_stage == 1
    chain.open_stage(24, relax=4).samples = 2                                 # 0.08: worse by more than one se
    assert chain.close_stage(0.53, delta=0.025, se=0.01) == "final" and chain.final_prior_std == 0.04
    chain = ChainSchedule(prior_stds=(0.01, 0.02, 0.04), num_samples=2)
    chain.reset(1000)
    chain.begin(0)
    chain.open_stage(0, relax=4).samples = 2                                  # 0.02
    chain.close_stage(0.50)
    chain.open_stage(12, relax=4).samples = 2                                 # 0.04: clearly worse
    assert chain.close_stage(0.60, delta=0.1, se=0.01) == "next" and chain.next_rung == 0
    chain.open_stage(24, relax=4).samples = 2                                 # 0.01: better, but within one se
    assert chain.close_stage(0.495, delta=-0.005, se=0.01) == "final" and chain.final_prior_std == 0.02


def test_ladder_descends_when_the_first_step_up_fails():
    chain = ChainSchedule(prior_stds=(0.005, 0.01, 0.02, 0.04), num_samples=2)
    chain.reset(1000)
    chain.begin(0)
    chain.open_stage(0, relax=4).samples = 2           # 0.01
    assert chain.close_stage(0.40) == "next"
    chain.open_stage(12, relax=4).samples = 2          # 0.02: worse
    assert chain.close_stage(0.42) == "next" and chain.next_rung == 0
    chain.open_stage(24, relax=4).samples = 2          # 0.005: better, and the ladder's end
    assert chain.stage.prior_std == 0.005
    assert chain.close_stage(0.39) == "continue" and "end" in chain.ladder_reason


def test_the_best_last_stage_continues_as_the_final_one():
    chain = ChainSchedule(prior_stds=(0.01, 0.02), num_samples=2)
    chain.reset(100)
    chain.begin(0)
    chain.open_stage(0, relax=4).samples = 2
    assert chain.stage.prior_std == 0.01
    assert chain.close_stage(0.4) == "next"
    chain.open_stage(12, relax=4).samples = 2
    assert chain.close_stage(0.3) == "continue" and "end" in chain.ladder_reason
    stage = chain.continue_as_final()
    assert stage.final and stage.samples == 2 and chain.stage is stage


def test_ladder_budget_and_no_validation_end_it():
    for nll, budget, reason in ((0.3, False, "budget"), (None, True, "no validation")):
        chain = ChainSchedule(prior_stds=(0.01, 0.02), num_samples=2)
        chain.reset(100)
        chain.begin(0)
        chain.open_stage(0, relax=4).samples = 2
        assert chain.close_stage(nll, budget_left=budget) == "continue"
        assert reason in chain.ladder_reason and chain.best_stage == 0


def test_no_sample_at_all_is_done():
    chain = ChainSchedule(prior_stds=(0.01, 0.02), num_samples=2)
    chain.reset(100)
    chain.begin(0)
    chain.open_stage(0, relax=4)
    assert chain.close_stage(None, budget_left=False) == "done" and chain.phase == "done"


def test_state_round_trip():
    chain = ChainSchedule()
    chain.reset(500)
    chain.observe(1.0, 5)
    chain.begin(9)
    chain.open_stage(0, 20).samples = 3
    other = ChainSchedule()
    other.load_state_dict(chain.state_dict())
    assert other.state_dict() == chain.state_dict()


def test_relaxation_steps_regimes():
    # overdamped: rate eta*lambda*G per step
    assert relaxation_steps(0.01, 2.0, 5.0, None, efolds=4.0) == math.ceil(4 / 0.1)
    # kinetic below critical damping: rate h*gamma/2; above: h*omega^2/gamma
    assert relaxation_steps(0.1, 1.0, 4.0, 1.0, efolds=2.0) == math.ceil(2 / 0.05)
    assert relaxation_steps(0.1, 1.0, 4.0, 40.0, efolds=2.0) == math.ceil(2 / (0.1 * 4 / 40))
    assert relaxation_steps(10.0, 1.0, 1.0, None) == 4     # never faster than one e-fold per step


@pytest.mark.parametrize("kwargs, match", [
    (dict(burn_in_steps="later"), r"Invalid burn_in_steps: 'later' \(expected 'auto' or an integer >= 0\)"),
    (dict(burn_in_steps=-1), "Invalid burn_in_steps"),
    (dict(monitor=""), "Invalid monitor"),
    (dict(mode="up"), "Invalid mode"),
    (dict(patience=0), r"Invalid patience: 0 \(expected an integer >= 1\)"),
    (dict(min_delta=-1.0), "Invalid min_delta"),
    (dict(max_burn_in_fraction=1.0), r"Invalid max_burn_in_fraction: 1.0 \(allowed range \(0, 1\)\)"),
    (dict(prior_stds=(0.02, 0.01)), "strictly increasing"),
    (dict(prior_stds=()), "Invalid prior_std"),
    (dict(prior_stds=(0.0,)), "Invalid prior_std"),
    (dict(num_samples=0), "Invalid num_samples"),
    (dict(relax_efolds=0.0), "Invalid relax_efolds"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChainSchedule(**kwargs)


def test_default_ladder_is_ascending():
    assert list(DEFAULT_PRIOR_LADDER) == sorted(DEFAULT_PRIOR_LADDER)


def test_paired_nll_scores_the_average_and_the_paired_difference():
    """lightning.validation.paired_nll: NLL of the samples' average, and the mean and standard error of the
    per-example difference from the best stage's NLL (the paired comparison the ladder uses)."""
    import math

    import torch

    from langevin_lora.lightning.validation import paired_nll

    labels = torch.tensor([0, 1, 1])
    probs = [torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]]), torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])]
    assert paired_nll([], labels, None) == (None, None, 0.0, None)
    nll, delta, se, per_example = paired_nll(probs, labels, None)
    expected = -torch.tensor([0.7, 0.7, 0.6], dtype=torch.float64).log()
    torch.testing.assert_close(per_example, expected)
    assert nll == pytest.approx(float(expected.mean())) and delta is None and se == 0.0
    best = torch.tensor([0.5, 0.2, 0.4], dtype=torch.float64)
    _, delta, se, _ = paired_nll(probs, labels, best)
    d = expected - best
    assert delta == pytest.approx(float(d.mean()))
    assert se == pytest.approx(math.sqrt(float(d.var(unbiased=True)) / 3))
    _, delta2, se2, _ = paired_nll(probs, labels, best, reduce=lambda t: 2 * t)   # two ranks with equal shards
    assert delta2 == pytest.approx(delta) and se2 == pytest.approx(math.sqrt(float(d.var(unbiased=False)) * 6 / 5 / 6))
