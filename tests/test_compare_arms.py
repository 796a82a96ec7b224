"""The comparison's arms: temperature scaling, the convergence of the posterior average, the Langevin
settings passed to LangevinLoRA, and end-to-end runs (all arms, burn-in at the best-validation
checkpoint with the AdamW state, the causal-LM protocol)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
TINY = ["threads=1", "data.num_train=48", "data.num_val=24", "data.num_test=40", "data.max_length=32", "data.batch_size=16",
        "trainer.max_epochs=3", "langevin.num_samples=2",
        "langevin.diagnostics={hvp_every_n_steps: 0, lambda_max_every_n_steps: 0}"]


# -- temperature scaling ----------------------------------------------------------------------------
def test_temperature_scaling_recovers_the_temperature_of_the_labels():
    """Labels drawn from softmax(z / 2): the NLL-optimal temperature of softmax(z) is 2 up to sampling
    noise (n = 40000: the fit's standard error is about 0.02)."""
    from recipes.calibration import apply_temperature, fit_temperature

    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(40000, 3, generator=g)
    y = torch.multinomial(torch.softmax(z / 2, -1), 1, generator=g).squeeze(1)
    T = fit_temperature(torch.softmax(z, -1), y)
    assert abs(T - 2) < 0.1
    p = torch.softmax(z[:5], -1)
    torch.testing.assert_close(apply_temperature(p, 1.0), p)
    torch.testing.assert_close(apply_temperature(p, 2.0), torch.softmax(z[:5] / 2, -1))
    with pytest.raises(ValueError, match="Invalid temperature"):
        apply_temperature(p, 0.0)


# -- enough samples? --------------------------------------------------------------------------------
def test_sample_convergence_running_average_and_verdict():
    from recipes.convergence import sample_convergence

    y = torch.tensor([0, 1, 1, 0])
    a = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    b = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5]])
    out = sample_convergence(torch.stack([a, b]), y)
    nll = lambda p: float(-p[torch.arange(4), y].log().mean())   # noqa: E731
    assert out["running_val_nll"] == pytest.approx([nll(a), nll((a + b) / 2)])
    assert out["sample_val_loglik"] == pytest.approx([-nll(a), -nll(b)])
    assert out["delta"] == pytest.approx(nll((a + b) / 2) - nll(a))
    assert out["converged"] is False and out["ess"] is None            # the second sample moved every prediction
    same = sample_convergence(torch.stack([a] * 8), y)
    assert same["delta"] == 0 and same["converged"] is True and same["ess"] == 8
    # a chain drifting in one direction: the last half moves the average by many standard errors
    rate = torch.tensor([[1.0], [0.8], [1.2], [0.9]])
    drift = torch.stack([torch.softmax(torch.cat([rate * s / 4, torch.zeros(4, 1)], 1), -1) for s in range(8)])
    moving = sample_convergence(drift, torch.zeros(4, dtype=torch.long))
    assert moving["delta"] < -5 * moving["delta_se"] and moving["converged"] is False


def test_convergence_extrapolates_a_one_over_s_law_and_says_so():
    """Averages whose NLL follows NLL_inf + c/S: NLL(S) + Delta recovers NLL_inf exactly; the sentence
    names the verdict, the expected further change and the limit."""
    from recipes.convergence import convergence_sentence, sample_convergence

    # two-point averages: p_s alternates between q + e and q - e; NLL(mean of the first m) is exact below
    y = torch.zeros(3, dtype=torch.long)
    q, e = 0.5, 0.3
    probs = torch.tensor([[[q + e, 1 - q - e]] * 3, [[q - e, 1 - q + e]] * 3] * 4)   # S = 8, in chain order
    out = sample_convergence(probs, y)
    nll = lambda p: -math.log(p)   # noqa: E731
    assert out["running_val_nll"][-1] == pytest.approx(nll(q)) and out["delta"] == pytest.approx(0.0)
    assert out["extrapolated_nll"] == pytest.approx(nll(q))
    assert "has settled" in convergence_sentence(out)
    # a synthetic 1/S curve through the formula itself
    c = {"num_samples": 32, "running_val_nll": [0.65 + 0.1 / m for m in range(1, 33)], "ess": 20.0,
         "delta": 0.1 / 32 - 0.1 / 16, "delta_se": 0.0005, "converged": False}
    c["extrapolated_nll"] = c["running_val_nll"][-1] + c["delta"]
    assert c["extrapolated_nll"] == pytest.approx(0.65)
    text = convergence_sentence(c)
    assert "still moving" in text and "about 64 samples would lower it by about 0.0031" in text and "0.6500" in text
    assert "too few" in convergence_sentence({"num_samples": 1, "converged": None})


# -- the langevin section: recipe keys + LangevinLoRA's arguments ----------------------------------
def test_langevin_settings_map_onto_langevin_lora(monkeypatch):
    from recipes.compare_config import LangevinSettings
    from recipes.config_check import ConfigError

    s = LangevinSettings(temperature=0.5, head_temperature=1.0, precond_clamp=[0.1, 10], prior_std=0.05)
    kw = s.callback_kwargs(num_data=2000)
    # LangevinLoRA takes prior_std itself (issue 13): passed on; the recipe's lambda is the same 1/(N sigma_p^2)
    assert kw == {"temperature": 0.5, "head_temperature": 1.0, "precond_clamp": (0.1, 10), "prior_std": 0.05}
    assert s.weight_decay(2000) == pytest.approx(1 / (2000 * 0.05 ** 2))
    assert s.temperature == 0.5 and s.nonfinite == "skip" and s.burn_in == "auto"   # the recipe default: the drop-in (issue 18)
    assert LangevinSettings(weight_decay=0.3).callback_kwargs(10)["weight_decay"] == 0.3
    with pytest.raises(ConfigError, match=r"unknown key 'langevin.temprature'; .* closest first: temperature, "):
        LangevinSettings(temprature=1.0)
    with pytest.raises(ConfigError, match="Invalid key langevin.num_data: the comparison passes N"):
        LangevinSettings(num_data=10)
    with pytest.raises(ConfigError, match="Invalid langevin.nonfinite"):   # refused by LangevinLoRA itself
        LangevinSettings(nonfinite="ignore")
    with pytest.raises(ConfigError, match="Invalid langevin.burn_in: 'worst'"):
        LangevinSettings(burn_in="worst")
    assert s.dropout is False
    with pytest.raises(ConfigError, match="Invalid langevin.dropout: 'no'"):
        LangevinSettings(dropout="no")

    # an argument LangevinLoRA gains later is a config key at once (no change in the recipes)
    import langevin_lora.lightning.callback as cb

    class Future(cb.LangevinLoRA):
        def __init__(self, *args, friction: float | None = None, prior_std: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.friction, self.prior_std = friction, prior_std

    monkeypatch.setattr(cb, "LangevinLoRA", Future)
    kw = LangevinSettings(friction=10.0, prior_std=0.05).callback_kwargs(num_data=2000)
    assert kw == {"friction": 10.0, "prior_std": 0.05}   # prior_std passed on, not turned into weight_decay


def test_plan_for_best_and_fixed_burn_in():
    from recipes.compare_config import LangevinSettings

    s = LangevinSettings(burn_in="best", num_samples=16, sample_span=0.5)
    p = s.plan(total_steps=1890, num_data=2000, best_step=441)
    assert (p["burn_in_steps"], p["sampling_steps"], p["sample_every"], p["num_samples"]) == (441, 1449, 45, 16)
    assert p["sample_every"] * p["num_samples"] <= round(0.5 * p["sampling_steps"]) and not p["extended"]
    at_end = s.plan(total_steps=100, num_data=10, best_step=100)     # AdamW never over-fitted: sample anyway
    assert at_end["sampling_steps"] == 16 and at_end["extended"]
    assert LangevinSettings(burn_in=0.25).plan(total_steps=100, num_data=10)["burn_in_steps"] == 25
    assert LangevinSettings(burn_in=30, sampling_steps=10).plan(total_steps=100, num_data=10)["sampling_steps"] == 10


def test_no_dropout_from_the_sampling_step_on():
    """langevin.dropout false: eval mode (no dropout) at every training step from the first Langevin
    step on, also after Lightning puts the module back in train mode at an epoch start."""
    from types import SimpleNamespace

    from recipes.callbacks import NoDropout

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    cb = NoDropout(from_step=3)
    for step in range(6):
        module.train()   # what Lightning does at an epoch start
        cb.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        assert module[1].training == (step < 3), step


# -- end to end -------------------------------------------------------------------------------------
def test_all_arms_from_one_adamw_run(tmp_path, monkeypatch):
    """burn_in 'best': the Langevin run starts at the best-validation step from that checkpoint's
    weights and AdamW moments; every arm is reported with its costs; the test split is not read
    before the end."""
    import langevin_lora.lightning.callback as cb

    from recipes.compare import load_config, run_comparison
    from recipes.report import REPORT_COLUMNS

    seen = {}

    class Recording(cb.LangevinLoRA):
        def _start_sampling(self):
            opt = self._wrapper.optimizer
            seen["step"] = self._trainer.global_step
            seen["training"] = self._module.training
            seen["weights"] = {n: p.detach().clone() for n, p in self._module.named_parameters() if p.requires_grad}
            seen["exp_avg_sq"] = [opt.state[p]["exp_avg_sq"].clone() for p in opt.param_groups[0]["params"]]
            super()._start_sampling()

    monkeypatch.setattr(cb, "LangevinLoRA", Recording)
    cfg = load_config(CONFIGS / "compare_sms_spam.yaml", TINY)
    out = run_comparison(cfg, output_dir=str(tmp_path), quiet=True)
    runs = {r["method"]: r for r in out["rows"]}
    assert list(runs) == ["adamw", "adamw_best", "adamw_ts", "langevin", "langevin_ts"]
    best = runs["adamw_best"]["selected_step"]
    assert runs["langevin"]["plan_burn_in_steps"] == best == seen["step"]
    assert seen["training"] is False   # langevin.dropout false: the deterministic network's posterior
    ckpt = torch.load(tmp_path / "seed0" / "adamw" / "checkpoints" / "best.ckpt", weights_only=False)
    assert ckpt["global_step"] == best
    for n, v in seen["weights"].items():
        assert torch.equal(v, ckpt["state_dict"][n]), n
    saved = ckpt["optimizer_states"][0]["state"]
    for i, v in enumerate(seen["exp_avg_sq"]):
        assert torch.equal(v, saved[i]["exp_avg_sq"])
    # costs: early stopping pays validation passes, temperature scaling one, Langevin the sampling on top
    assert runs["adamw"]["grad_evals"] == runs["adamw"]["optimizer_steps"] == 9
    assert runs["adamw_best"]["val_passes"] == 3 and runs["adamw_ts"]["val_passes"] == 1
    assert runs["adamw_best"]["grad_evals"] == 9   # validation passes are counted apart (issue 18)
    assert runs["langevin"]["grad_evals"] > runs["adamw_best"]["grad_evals"]
    assert runs["langevin"]["val_passes"] == 3 + runs["langevin"]["num_samples"]
    for r in out["rows"]:
        assert set(REPORT_COLUMNS) <= set(r) and r["wall_time_s"] > 0
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0
    assert runs["adamw_ts"]["ts_temperature"] > 0 and runs["adamw_ts"]["accuracy"] == runs["adamw"]["accuracy"]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["convergence"]["0"]["running_val_nll"]) == runs["langevin"]["num_samples"]
    report = (tmp_path / "report.md").read_text()
    assert "## Enough samples?" in report and "| adamw_best |" in report and "| langevin_ts |" in report
    for f in ("reliability.png", "convergence.png", "diagnostics.png"):
        assert (tmp_path / f).is_file()


@pytest.mark.slow
def test_causal_lm_comparison_smoke(tmp_path):
    """The causal-LM protocol (packaged SmolLM2, answer-letter logits) through the same arms."""
    from recipes.compare import load_config, run_comparison

    cfg = load_config(CONFIGS / "compare_smollm2.yaml",
                      ["threads=1", "data.num_train=4", "data.num_val=3", "data.num_test=3", "data.max_length=32",
                       "data.batch_size=2", "data.eval_batch_size=4", "trainer.max_epochs=2",
                       "trainer.enable_progress_bar=false", "langevin.num_samples=2",
                       "langevin.step_size=0.001"])   # no curvature probe of the 135M model: keep it a smoke test
    out = run_comparison(cfg, output_dir=str(tmp_path), quiet=True)
    runs = {r["method"]: r for r in out["rows"]}
    assert list(runs) == ["adamw", "adamw_best", "adamw_ts", "langevin", "langevin_ts"]
    assert runs["langevin"]["num_samples"] == 2 and all(math.isfinite(r["nll"]) for r in out["rows"])
    ckpt = torch.load(tmp_path / "seed0" / "adamw" / "checkpoints" / "best.ckpt", weights_only=False)
    assert ckpt["adapter_only"] and all("lora_" in k for k in ckpt["state_dict"])   # not the 135M base


def test_bench_quality_verdicts_per_langevin_arm(monkeypatch):
    """bench_quality's goal checks of issue 14, from the per-method means, for either Langevin arm."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench = importlib.import_module("benchmarks.bench_quality")

    def row(method, acc, ece, nll, stationarity="n/a"):
        return {"method": method, "accuracy_mean": acc, "ece_mean": ece, "nll_mean": nll, "stationarity": stationarity}

    summary = [row("adamw", .696, .189, 1.058), row("adamw_best", .721, .049, .674), row("adamw_ts", .696, .015, .714),
               row("langevin", .728, .022, .655, "3/3 pass"), row("langevin_ts", .728, .0147, .6526, "2/3 pass")]
    lg = bench.verdicts(summary)
    assert [ok for ok, _ in lg.values()] == [True, True, True, False, True]   # ECE .022 > .015 + .005
    ts = bench.verdicts(summary, "langevin_ts")
    assert [ok for ok, _ in ts.values()] == [True, True, True, True, False]   # one seed not stationary
    assert bench.verdicts(summary, "missing") == {}
    for r, g in zip(summary, (100, 100, 100, 99, 101)):   # issue 18: the cost goal and the well-fit regime
        r["grad_evals_mean"] = g
    cost = bench.verdicts(summary)["cost <= 1.0x adamw's gradient evaluations"]
    assert cost[0] and not bench.verdicts(summary, "langevin_ts")["cost <= 1.0x adamw's gradient evaluations"][0]
    wellfit = bench.verdicts(summary, regime="wellfit")
    assert wellfit["NLL <= adamw_best + 0.01"][0] and wellfit["accuracy within 0.5 points of adamw_best"][0]
    assert not bench.verdicts([*summary[:3], row("langevin", .71, .02, .69, "3/3 pass")], regime="wellfit")[
        "NLL <= adamw_best + 0.01"][0]
