"""The report's chain verdicts on synthetic chains with known truth (issue 20): 4 chains x 2000 draws
where one chain is shifted, scaled, heavy-tailed and shifted, or drifting must fail; stationary AR(1)
chains (phi = 0, 0.5, 0.9) with enough draws must pass. Then the same for a single run cut into
segments, and why Geweke stays. Statistics are arviz-stats' (see test_diagnostics_chains for the
exact agreement); here every case is replicated (fixed seeds, vectorised) and the deciding statistic
is required to sit beyond its threshold by 4.5 standard errors of its replicate mean, on top of the
verdict of every replicate."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import lfilter

from langevin_lora.diagnostics import rhat, stationarity_report

R, C, N = 16, 4, 2000   # replicates, chains, draws


def ar1(phi: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Stationary AR(1) with unit variance along the last axis; tau = (1 + phi)/(1 - phi)."""
    e = rng.standard_normal(shape) * math.sqrt(1 - phi ** 2)
    e[..., 0] = rng.standard_normal(shape[:-1])
    return lfilter([1.0], [1.0, -phi], e, axis=-1)


def failing_case(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "shifted":        # one chain 0.5 sd off
        x = ar1(0.5, (R, C, N), rng)
        x[:, 0] += 0.5
    elif kind == "scaled":       # one chain twice as wide: same mean, so only the folded R-hat sees it
        x = ar1(0.5, (R, C, N), rng)
        x[:, 0] *= 2.0
    elif kind == "heavy_tailed":  # Cauchy draws, one chain shifted by one scale: the classic R-hat is blind
        x = rng.standard_t(1, (R, C, N))
        x[:, 0] += 1.0
    elif kind == "drifting":     # one chain drifting over 2 sd
        x = ar1(0.5, (R, C, N), rng)
        x[:, 0] += np.linspace(-1.0, 1.0, N)
    else:
        raise AssertionError(kind)
    return x


def _verdicts(x: np.ndarray, **kw) -> tuple[list[str], np.ndarray, np.ndarray]:
    reps = [stationarity_report(chains={"x": xr}, **kw) for xr in x]
    rh = np.array([r.summary["chain_statistics"]["quantities"]["x"]["rhat"] for r in reps])
    ess = np.array([r.by_name("effective_sample_size/x").value for r in reps])
    return [r.verdict for r in reps], rh, ess


def _beyond(values: np.ndarray, bound: float, side: str) -> bool:
    """The replicate mean lies beyond ``bound`` by 4.5 standard errors of that mean."""
    m, se = values.mean(), values.std(ddof=1) / math.sqrt(values.size)
    return (m - bound) / se >= 4.5 if side == "above" else (bound - m) / se >= 4.5


@pytest.mark.parametrize("kind", ["shifted", "scaled", "heavy_tailed", "drifting"])
def test_report_fails_on_disagreeing_chains(kind):
    x = failing_case(kind, seed=["shifted", "scaled", "heavy_tailed", "drifting"].index(kind))
    verdicts, rh, ess = _verdicts(x)
    assert verdicts == ["fail"] * R, (kind, rh, ess)
    # What fails: R-hat >= 1.01 on every kind (ArviZ's threshold, whatever the number of chains) ...
    assert _beyond(rh, 1.01, "above"), (kind, rh)
    # ... and the disagreement is what the classic split-R-hat misses where the issue found it passing.
    classic = np.array([rhat(xr, "split") for xr in x])
    if kind in ("scaled", "heavy_tailed"):
        assert _beyond(classic, 1.01, "below"), (kind, classic)
    if kind == "scaled":   # one wide chain: the tails disagree, tail ESS far below 400
        assert _beyond(ess, 400, "below"), ess


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_report_passes_on_stationary_chains_with_enough_draws(phi):
    tau = (1 + phi) / (1 - phi)
    n = int(1000 * tau)   # about 1000 effective draws per chain, 4000 in all (400 needed)
    x = ar1(phi, (R, C, n), np.random.default_rng(10 + int(10 * phi)))
    verdicts, rh, ess = _verdicts(x)
    assert verdicts == ["pass"] * R, (phi, rh, ess)
    assert _beyond(rh, 1.01, "below") and _beyond(ess, 400, "above")
    # ESS over all chains is about chains x draws / tau (z-test over the replicates, 10% Geyer-bias allowance).
    assert abs(ess.mean() / (C * n / tau) - 1) <= 4.5 * ess.std(ddof=1) / math.sqrt(R) / (C * n / tau) + 0.1


def test_single_run_is_cut_into_segments():
    """One run: its traces are cut into 4 segments that serve as chains; a drift or a change of scale along
    the run fails R-hat, a stationary run passes, a run too short for 400 effective draws fails the ESS."""
    rng = np.random.default_rng(20)
    n = 8000
    ok = ar1(0.5, (R, n), rng)
    drift = ar1(0.5, (R, n), rng) + np.linspace(-0.5, 0.5, n)
    wider = ar1(0.5, (R, n), rng) * np.where(np.arange(n) < n // 2, 1.0, 1.5)
    for x, want in ((ok, "pass"), (drift, "fail"), (wider, "fail")):
        reps = [stationarity_report({"U": xr}) for xr in x]
        chk = [r.by_name("split_rhat/U") for r in reps]
        assert [c.status for c in chk] == [want] * R, [c.value for c in chk]
        assert "4 segments of one run x 2000 draws" in chk[0].reason
        assert {r.verdict for r in reps} == {want}
    short = stationarity_report({"U": ok[0, :600]})   # ESS ~ 200 < 4 x 100
    ess = short.by_name("effective_sample_size")
    assert ess.status == "fail" and ess.expected.startswith(">= 400") and "run about" in ess.remedy


def test_geweke_adds_power_against_a_small_initial_transient():
    """Why Geweke stays: a transient of one sd decaying over 400 steps at the start of a 40,000-step run
    moves the first segment's mean by 0.04 sd, far inside R-hat < 1.01, while Geweke's z-test (first 10%
    against the last half, long-run variance) flags it."""
    rng = np.random.default_rng(21)
    n = 40000
    x = rng.standard_normal((R, n)) + np.exp(-np.arange(n) / 400.0)
    reps = [stationarity_report({"U": xr}) for xr in x]
    assert all(r.by_name("split_rhat/U").status == "pass" for r in reps)
    assert all(r.by_name("geweke/U").status == "fail" for r in reps)


def test_report_input_checks():
    x = ar1(0.5, (C, N), np.random.default_rng(30))
    with pytest.raises(ValueError, match=r"chains\['x'\].*more chains \(2000\) than draws per chain \(4\)"):
        stationarity_report(chains={"x": x.T})
    with pytest.raises(ValueError, match=r"chains\['x'\].*inf or NaN"):
        stationarity_report(chains={"x": np.where(np.arange(N) == 5, np.nan, x)})
    with pytest.raises(ValueError, match=r"chains\['x'\]: 5 draws per chain \(expected at least 8\)"):
        stationarity_report(chains={"x": x[:, :5]})
    with pytest.raises(ValueError, match=r"chains\['x'\]: one chain"):
        stationarity_report(chains={"x": x[0]})
    with pytest.raises(ValueError, match="segments"):
        stationarity_report({}, segments=1)
    with pytest.raises(ValueError, match="rhat_max"):
        stationarity_report({}, rhat_max=1.0)
    # Constant: a clear "cannot judge", never a number.
    rep = stationarity_report({"U": np.full(400, 3.0)}, chains={"x": np.ones((4, 100))})
    for name in ("split_rhat/x", "effective_sample_size/x", "split_rhat/U", "effective_sample_size"):
        c = rep.by_name(name)
        assert c.status == "unavailable" and c.value is None and "cannot judge" in c.reason


def test_recipes_report_renders_the_chain_statistics():
    from recipes.report import stationarity_lines

    rep = stationarity_report({"U": ar1(0.5, (8000,), np.random.default_rng(40)),
                               "virial_temperature": 1 + 0.1 * np.random.default_rng(41).standard_normal(8000)})
    diag = {c.name: {"status": c.status, "value": c.value} for c in rep.checks}   # as recipes.arms stores them
    lines = stationarity_lines([{"method": "adamw", "seed": 0}, {"method": "langevin", "seed": 0, "diagnostics": diag},
                                {"method": "langevin_ts", "seed": 0, "diagnostics": diag}])
    text = "\n".join(lines)
    assert "| seed | R-hat U | R-hat virial_temperature | ESS min(bulk, tail) |" in text
    row = next(ln for ln in lines if ln.startswith("| 0 |"))
    assert f"{rep.by_name('split_rhat/U').value:.4f}" in row and "fail" not in row
    assert len([ln for ln in lines if ln.startswith("| 0 |")]) == 1
    assert stationarity_lines([{"method": "adamw", "seed": 0}]) == []
