"""Export to ArviZ (issue 20): the diagnostics' traces as sample_stats and the sample bank's held-out
log-likelihoods as log_likelihood; ArviZ's summary, rhat and loo run on the export, give the report's
numbers, and the tree survives a netCDF round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("arviz_base")
azs = pytest.importorskip("arviz_stats")
xr = pytest.importorskip("xarray")

from langevin_lora.diagnostics import GibbsRecorder, chain_summary, stationarity_report  # noqa: E402
from langevin_lora.diagnostics.inference_data import (  # noqa: E402
    bank_log_likelihood,
    bank_to_inference_data,
    to_inference_data,
)


def _traces(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return {"U": 3 + rng.standard_normal(n), "virial_temperature": 1 + 0.1 * rng.standard_normal(n),
            "theta_sq": 10 + rng.standard_normal(n),
            "gauge_gap/layer0.query": rng.standard_normal(n), "gauge_gap/layer0.value": rng.standard_normal(n),
            "step_size": np.full(n, 0.02), "step_cuts": np.zeros(n)}


def test_traces_export_and_arviz_reproduces_the_report(tmp_path):
    tr = _traces()
    rep = stationarity_report(tr)
    dt = to_inference_data(rep, beta=50.0, segments=4)
    ss = dt["sample_stats"]
    assert ss["U"].dims == ("chain", "draw") and ss["U"].shape == (4, 1000)
    assert list(ss["gauge_gap_parts"].coords["gauge_gap_part"].values) == ["layer0.query", "layer0.value"]
    np.testing.assert_array_equal(ss["lp"].values, -50.0 * ss["U"].values)
    np.testing.assert_array_equal(ss["U"].values.ravel(), tr["U"])
    # ArviZ on the export == the report's numbers (they are ArviZ's), to floating point.
    summ = azs.summary(dt, group="sample_stats", var_names=["U", "virial_temperature", "theta_sq"], round_to="none")
    quantities = rep.summary["chain_statistics"]["quantities"]
    for name in ("U", "virial_temperature", "theta_sq"):
        st = quantities[name]
        row = summ.loc[name]
        for ours, theirs in (("mean", "mean"), ("sd", "sd"), ("ess_bulk", "ess_bulk"), ("rhat", "r_hat"),
                             ("mcse_mean", "mcse_mean"), ("mcse_sd", "mcse_sd")):
            assert st[ours] == pytest.approx(float(row[theirs]), rel=1e-12, abs=1e-15), (name, ours)
        tail = azs.ess(dt, group="sample_stats", var_names=[name], method="tail", prob=(0.05, 0.95))
        assert st["ess_tail"] == pytest.approx(float(tail[name]), rel=1e-12)
        assert st["rhat"] == pytest.approx(float(azs.rhat(dt, group="sample_stats", var_names=[name])[name]),
                                           rel=1e-12)
    # The round trip: every group to netCDF and back (scipy's netCDF3 engine: DataTree.to_netcdf itself
    # needs netCDF4 or h5netcdf), reassembled, same arrays and the same ArviZ summary.
    back = {}
    for group in dt.children:
        path = tmp_path / f"{group}.nc"
        dt[group].to_dataset().to_netcdf(path, engine="scipy")
        back[group] = xr.load_dataset(path, engine="scipy")
    back = xr.DataTree.from_dict(back)
    for var in ss.data_vars:
        np.testing.assert_array_equal(back["sample_stats"][var].values, ss[var].values)
    assert "langevin_lora" in back["sample_stats"].attrs["created_by"]
    again = azs.summary(back, group="sample_stats", var_names=["U"], round_to="none")
    assert float(again.loc["U", "r_hat"]) == quantities["U"]["rhat"]


def test_independent_chains_and_input_checks():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 500))
    dt = to_inference_data({"U": x}, posterior={"w": x[..., None] * np.ones(3)})
    assert dt["sample_stats"]["U"].shape == (4, 500) and dt["posterior"]["w"].shape == (4, 500, 3)
    assert float(azs.rhat(dt)["w"][0]) == pytest.approx(chain_summary(x)["rhat"], rel=1e-12)
    with pytest.raises(ValueError, match=r"traces\['U'\].*more chains \(500\) than draws per chain \(4\)"):
        to_inference_data({"U": x.T})
    with pytest.raises(ValueError, match="differ between traces"):
        to_inference_data({"U": x[0], "theta_sq": x[0, :400]})
    with pytest.raises(ValueError, match="nothing to export"):
        to_inference_data({})
    with pytest.raises(TypeError, match="Invalid traces"):
        to_inference_data(3.0)


def test_recorder_traces_export():
    rec = GibbsRecorder()
    rec.traces.update({"U": [1.0, 2.0, 1.5, 1.2, 0.9, 1.1, 1.4, 1.3], "virial_temperature": [1.0] * 8})
    dt = to_inference_data(rec)
    assert dt["sample_stats"]["U"].shape == (1, 8)
    # Run constants (a fixed step size, the guard's cut count) are repeated for every draw.
    dt = to_inference_data({**rec.traces, "step_size": 0.02, "step_cuts": 0})
    assert dt["sample_stats"]["step_size"].shape == (1, 8) and float(dt["sample_stats"]["step_cuts"].max()) == 0
    with pytest.raises(ValueError, match="only constants"):
        to_inference_data({"step_size": 0.02})


def test_bank_log_likelihood_and_loo():
    from torch.utils.data import DataLoader, TensorDataset

    from langevin_lora.posterior.bank import SampleBank

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    bank = SampleBank(num_samples=40)
    g = torch.Generator().manual_seed(1)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(40):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w0[n] + 0.1 * torch.randn(p.shape, generator=g))
        bank.add(model, step)
    x = torch.randn(30, 5, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    ll = bank_log_likelihood(model, bank, dl)
    assert ll.shape == (40, 30) and ll.dtype == np.float64
    # Independent reference: each sample's log-softmax at the labels.
    for s in (0, 17, 39):
        ref = torch.nn.Sequential(torch.nn.Linear(5, 3))
        ref.load_state_dict(bank[s])
        with torch.no_grad():
            want = torch.log_softmax(ref(x), -1)[torch.arange(30), y].double().numpy()
        np.testing.assert_allclose(ll[s], want, rtol=1e-6, atol=1e-6)
    dt = bank_to_inference_data(model, bank, dl)
    assert dt["log_likelihood"]["y"].shape == (1, 40, 30)
    np.testing.assert_array_equal(dt["observed_data"]["y"].values, y.numpy())
    assert dt["posterior"]["sample_step"].values.ravel().tolist() == list(range(40))
    res = azs.loo(dt)
    # PSIS-LOO <= the in-sample log pointwise predictive density (lppd).
    lppd = float(np.sum(np.log(np.mean(np.exp(ll), axis=0))))
    # ArviZ read the log-likelihoods as they are: its p_loo is lppd - elpd_loo for our lppd.
    assert math.isfinite(res.elpd) and res.elpd <= lppd + 1e-9
    assert res.p == pytest.approx(lppd - res.elpd, rel=1e-9), res
    with pytest.raises(ValueError, match="Invalid labels: 29 labels for 30 examples"):
        bank_log_likelihood(model, bank, dl, labels=y[:29])
    # A shuffling DataLoader would pair each pass's predictions with another pass's labels: refused.
    with pytest.raises(ValueError, match=r"bank_log_likelihood: the DataLoader shuffles"):
        bank_log_likelihood(model, bank, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    with pytest.raises(ValueError, match=r"bank_to_inference_data: the DataLoader shuffles"):
        bank_to_inference_data(model, bank, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
