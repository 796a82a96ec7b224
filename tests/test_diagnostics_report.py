"""stationarity_report: verdicts with reasons and remedies, JSON/Markdown/PNG output, and the
torchmetrics wrappers agreeing with the functional forms."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from langevin_lora.diagnostics import (
    ConfigurationalTemperature,
    GaugeGap,
    HessianVectorProduct,
    MeanForceChi2,
    NoiseRatio,
    VirialTemperature,
    gauge_gap,
    mean_force_chi2,
    gradient_square,
    noise_ratio,
    stationarity_report,
    virial_temperature,
)


def _stationary_traces(n=4000, seed=0):
    rng = np.random.default_rng(seed)

    def ar(phi, scale, mean):
        x = np.empty(n)
        x[0] = rng.standard_normal()
        for t in range(1, n):
            x[t] = phi * x[t - 1] + np.sqrt(1 - phi ** 2) * rng.standard_normal()
        return mean + scale * x

    return {"virial_temperature": ar(0.5, 0.3, 1.0), "U": ar(0.8, 0.5, 3.0), "theta_sq": ar(0.8, 1.0, 10.0),
            "gauge_gap/layer0.query": ar(0.9, 2.0, 0.0), "virial_temperature/lora_A": ar(0.5, 0.3, 1.0)}


def test_stationary_chain_passes_and_files_are_written(tmp_path):
    rep = stationarity_report(_stationary_traces(), beta=100.0, lr=1e-3, weight_decay=0.1, noise_ratio=0.03,
                              config_temperature=1.02, eta_lambda_max=0.02, mean_force_chi2=(1.1, 1.05),
                              gauge_relaxation_steps={"layer0.query": 500.0}, steps=4000)
    assert rep.verdict == "pass", str(rep)
    statuses = {c.name: c.status for c in rep.checks}
    assert statuses["virial_temperature"] == "pass" and statuses["gauge/layer0.query"] == "pass"
    assert statuses["poincare_lower_bound"] == "info" and statuses["effective_dimension"] == "info"
    assert rep.summary["poincare"]["bounds"]["lora_gauge"] == pytest.approx(1 / (2 * 100.0 * 0.1))
    paths = rep.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["verdict"] == "pass" and len(data["checks"]) == len(rep.checks)
    assert "| virial_temperature | pass |" in paths["markdown"].read_text()
    for key in ("traces_png", "autocorrelation_png", "temperatures_png", "gauge_png"):
        assert paths[key].stat().st_size > 1000
    assert "Gibbs stationarity report: PASS" in str(rep)


def test_each_failure_has_reason_and_remedy():
    tr = _stationary_traces(n=400, seed=1)
    tr["virial_temperature"] = tr["virial_temperature"] + 0.43
    tr["gauge_gap/layer0.query"] = tr["gauge_gap/layer0.query"] + 8.0
    tr["U"] = tr["U"] + 20 * np.exp(-np.arange(400) / 40.0)  # still relaxing
    rep = stationarity_report(tr, noise_ratio=0.42, mean_force_chi2=(9.0, 1.1), eta_lambda_max=1.3,
                              gauge_relaxation_steps={"layer0.query": 5000.0}, steps=400, ess_min=100)
    by = {c.name: c for c in rep.checks}
    v = by["virial_temperature"]
    assert v.status == "fail"
    assert re.match(r"virial temperature 1\.[34]\d/beta; ", v.reason)
    assert "minibatch noise ratio 0.42 > 0.1" in v.reason and "eta*lambda_max = 1.3" in v.reason
    assert "lower the learning rate or raise the batch size" in v.remedy
    assert by["noise_ratio"].status == "fail"
    # issue 19: the bound is STEP_ACCURACY_BOUND (0.25) and the remedy names step_safety, not the learning rate
    assert by["eta_lambda_max"].status == "fail" and "factor of about 5.2" in by["eta_lambda_max"].remedy
    assert "step_safety" in by["eta_lambda_max"].remedy
    assert by["geweke/U"].status == "fail" and "burn-in" in by["geweke/U"].remedy
    assert by["mean_force_chi2"].status == "fail"
    g = by["gauge/layer0.query"]
    assert g.status == "fail" and "5000 steps" in g.reason and "raise weight_decay" in g.remedy
    assert rep.verdict == "fail"


def test_unexplained_and_unavailable_and_low_ess():
    rng = np.random.default_rng(2)
    # 600 iid draws: ESS ~600 over 4 segments, above the 100-per-chain (400) that ArviZ asks for.
    rep = stationarity_report({"virial_temperature": 0.7 + 0.01 * rng.standard_normal(600)})
    v = rep.by_name("virial_temperature")
    assert v.status == "fail" and "not explained" in v.reason and "num_data" in v.remedy
    assert rep.by_name("noise_ratio").status == "unavailable"
    assert "accumulate_grad_batches >= 2" in rep.by_name("noise_ratio").reason
    assert rep.by_name("eta_lambda_max").status == "unavailable"
    # Strongly correlated, short: too few effective samples.
    x = np.cumsum(rng.standard_normal(200)) * 0.001 + 1.0
    low = stationarity_report({"virial_temperature": x})
    assert low.by_name("effective_sample_size").status == "fail"
    assert "run about" in low.by_name("effective_sample_size").remedy
    with pytest.raises(ValueError, match="temperature_tol"):
        stationarity_report({}, temperature_tol=0.0)
    with pytest.raises(KeyError, match="no check named"):
        rep.by_name("nope")


def test_metrics_agree_with_functional_forms():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    m = VirialTemperature()
    for t, gr in zip(thetas, grads):
        m.update([t], [gr], weight_decay=0.1, beta=2.0)
    expected = np.mean([float(virial_temperature([t], [gr], weight_decay=0.1, beta=2.0)) for t, gr in zip(thetas, grads)])
    assert float(m.compute()) == pytest.approx(expected)
    assert float(m.raw) == pytest.approx(expected / 2.0)

    mf = MeanForceChi2(num_coordinates=12, block_size=1)
    for t, gr in zip(thetas, grads):
        mf.update([t], [gr], weight_decay=0.1)
    blocks = torch.stack([(gr + 0.1 * t).reshape(-1) for t, gr in zip(thetas, grads)])
    from langevin_lora.diagnostics import mean_force_chi2
    chi2, exp = mean_force_chi2(blocks)
    assert float(mf.compute()) == pytest.approx(float(chi2)) and mf.expected == pytest.approx(exp)

    A, B = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    gg = GaugeGap()
    gg.update(A, B, beta=3.0, weight_decay=0.2)
    assert float(gg.compute()) == pytest.approx(float(gauge_gap(A, B, beta=3.0, weight_decay=0.2)))

    nr = NoiseRatio()
    nr.update([[grads[0]], [grads[1]]], lr=0.01, beta=50.0)
    assert float(nr.compute()) == pytest.approx(float(noise_ratio([[grads[0]], [grads[1]]], lr=0.01, beta=50.0)))

    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    loss = lambda: (torch.tensor([1.0, 3.0], dtype=torch.float64) * x ** 2).sum() / 2  # noqa: E731
    ct = ConfigurationalTemperature()
    gx = [torch.tensor([1.0, 6.0], dtype=torch.float64)]
    ct.update([x], [gx], weight_decay=0.0, beta=1.0, hvp=HessianVectorProduct(loss, [x]))
    assert float(ct.compute()) == pytest.approx(float(gradient_square([x], [gx])) / 4.0)
    with pytest.raises(ValueError, match="num_coordinates"):
        MeanForceChi2(num_coordinates=0)


def test_hottest_and_coldest_groups_are_named_for_what_they_are():
    """Issue 11 item 9: 'hottest_group' was the group farthest from 1 (the coldest one here)."""
    rng = np.random.default_rng(3)
    tr = {"virial_temperature/lora_A": 0.5 + 0.01 * rng.standard_normal(100),
          "virial_temperature/lora_B": 1.2 + 0.01 * rng.standard_normal(100),
          "virial_temperature/head": 1.0 + 0.01 * rng.standard_normal(100)}
    rep = stationarity_report(tr)
    assert rep.summary["hottest_group"]["name"] == "lora_B" and rep.summary["hottest_group"]["beta_T"] > 1.1
    assert rep.summary["coldest_group"]["name"] == "lora_A" and rep.summary["coldest_group"]["beta_T"] < 0.6


def test_mean_force_expectation_is_student_t():
    """E[t^2] over m blocks is (m-1)/(m-3) (Student t, m-1 degrees of freedom): 2 at m = 5, -> 1;
    the report says so and judges against it (it said "~2 (<= 3)" while the README said ~1)."""
    rng = np.random.default_rng(0)
    for m in (5, 12):
        blocks = torch.from_numpy(rng.standard_normal((4000, m, 50))).transpose(0, 1)  # 4000 tests of 50 coords
        chi2, expected = mean_force_chi2(blocks)
        assert expected == pytest.approx((m - 1) / (m - 3))
        se = chi2.std().item() / np.sqrt(chi2.numel())
        assert abs(chi2.mean().item() - expected) <= 4.5 * se
    check = stationarity_report(mean_force_chi2=(2.1, 2.0)).by_name("mean_force_chi2")
    assert check.status == "pass" and check.expected.startswith("(m-1)/(m-3) = 2 for m = 5 blocks")
    assert stationarity_report(mean_force_chi2=(3.1, 2.0)).by_name("mean_force_chi2").status == "fail"
    assert "m >= 4" in stationarity_report().by_name("mean_force_chi2").expected


def _texts(fig):
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]


def test_figures_are_readable_at_their_saved_size():
    """Every text of every figure is at least MIN_FONT points (at DPI, the saved size), module names
    are tick labels (not a tiny legend), and each trace has its own autocorrelation panel, so
    virial_temperature and virial_temperature_raw (equal up to beta) no longer hide each other."""
    from langevin_lora.diagnostics.plots import (
        MIN_FONT,
        autocorrelation_figure,
        gauge_figure,
        temperature_figure,
        trace_figure,
    )

    tr = _stationary_traces(n=400)
    tr["virial_temperature_raw"] = tr["virial_temperature"] / 100.0
    modules = [f"bert.encoder.layer.{i}.attention.self.{w}" for i in range(6) for w in ("query", "value")]
    for m in modules:
        tr[f"gauge_gap/{m}"] = tr["gauge_gap/layer0.query"]
    temps = {m: 1.0 for m in modules} | {"lora_A/default": 1.1, "lora_B/default": 0.9}
    figs = {"traces": trace_figure(tr), "acf": autocorrelation_figure(tr), "temps": temperature_figure(temps),
            "gauge": gauge_figure(tr)}
    for name, fig in figs.items():
        sizes = [t.get_fontsize() for t in _texts(fig)]
        assert sizes and min(sizes) >= MIN_FONT, name
    acf_titles = [ax.get_title(loc="left") for ax in figs["acf"].axes]
    assert "virial_temperature" in acf_titles and "virial_temperature_raw" in acf_titles
    assert all(len(ax.lines) == 2 for ax in figs["acf"].axes)  # the curve and the zero line
    labels = {t.get_text() for ax in figs["temps"].axes for t in ax.get_yticklabels()}
    assert set(temps) <= labels
    gauge_labels = {t.get_text() for ax in figs["gauge"].axes for t in ax.get_yticklabels()}
    assert set(modules) <= gauge_labels
    # Figures grow with the number of names: a row of about 0.3 inch per module.
    assert figs["temps"].get_size_inches()[1] >= 0.3 * len(temps)
