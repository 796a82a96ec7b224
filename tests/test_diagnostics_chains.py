"""Offline chain analysis against independent reference computations on AR(1) chains with known
autocorrelation, and the Poincaré / effective-dimension helpers on Gaussians."""
from __future__ import annotations

import math

import numpy as np
import pytest

from langevin_lora.diagnostics import (
    autocorrelation,
    chain_summary,
    ess,
    mcse,
    rhat,
    rhat_nested,
    effective_dimension,
    effective_sample_size,
    geweke_z,
    integrated_autocorr_time,
    poincare_autocorrelation,
    poincare_lora,
    poincare_lower_bounds,
    poincare_rayleigh,
    split_rhat,
)


def ar1(phi: float, n: int, chains: int, seed: int, mu=0.0) -> np.ndarray:
    """Stationary AR(1), unit variance: x_t = phi x_{t-1} + sqrt(1 - phi^2) e_t; tau = (1+phi)/(1-phi)."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, n))
    x[:, 0] = rng.standard_normal(chains)
    e = rng.standard_normal((chains, n)) * math.sqrt(1 - phi ** 2)
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x + np.asarray(mu).reshape(-1, 1)


# -- independent references: direct sums, no FFT, written from the textbook definitions ----------
def ref_autocov(x: np.ndarray, lag: int) -> float:
    n = x.size
    xc = x - x.mean()
    return float(np.dot(xc[: n - lag], xc[lag:]) / n)


def ref_geyer_tau(rho, n: int) -> float:
    """Geyer's initial monotone sequence: tau = 2 * sum of pair sums Gamma_k (truncated at the first
    negative one, made non-increasing) - 1, from the autocorrelation function ``rho``."""
    total, prev, k = 0.0, math.inf, 0
    while 2 * k + 1 < n:
        gamma = rho(2 * k) + rho(2 * k + 1)
        if gamma < 0:
            break
        gamma = min(gamma, prev)
        total += gamma
        prev = gamma
        k += 1
    return 2 * total - 1


def ref_tau_single(x: np.ndarray) -> float:
    g0 = ref_autocov(x, 0)
    rho = lambda k: ref_autocov(x, k) / g0  # noqa: E731
    return ref_geyer_tau(rho, x.size)


def ref_tau_multi(chains: np.ndarray) -> float:
    m, n = chains.shape
    means = [c.mean() for c in chains]
    s2 = [sum((v - mu) ** 2 for v in c) / (n - 1) for c, mu in zip(chains, means)]
    W = sum(s2) / m
    grand = sum(means) / m
    B_over_n = sum((mu - grand) ** 2 for mu in means) / (m - 1)
    var_plus = (n - 1) / n * W + B_over_n
    rho = lambda t: 1 - (W - sum(ref_autocov(c, t) for c in chains) / m) / var_plus  # noqa: E731
    return ref_geyer_tau(rho, n)


def ref_split_rhat(chains: np.ndarray) -> float:
    half = chains.shape[1] // 2
    seqs = [c[:half] for c in chains] + [c[chains.shape[1] - half:] for c in chains]
    n = half
    means = [sum(s) / n for s in seqs]
    W = sum(sum((v - mu) ** 2 for v in s) / (n - 1) for s, mu in zip(seqs, means)) / len(seqs)
    grand = sum(means) / len(means)
    B = n * sum((mu - grand) ** 2 for mu in means) / (len(means) - 1)
    return math.sqrt(((n - 1) / n * W + B / n) / W)


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_tau_and_ess_single_chain_are_arviz_and_match_theory(phi):
    from arviz_stats.base import array_stats

    x = ar1(phi, 2000, 1, seed=int(phi * 10))[0]
    tau = integrated_autocorr_time(x)
    # Called, not re-implemented: arviz-stats' numbers exactly.
    assert tau == x.size / array_stats.ess(x[None], method="identity")
    assert effective_sample_size(x) == array_stats.ess(x[None], method="bulk")
    assert effective_sample_size(x, method="identity") == pytest.approx(x.size / tau, rel=1e-15)
    np.testing.assert_allclose(autocorrelation(x, max_lag=5), [ref_autocov(x, k) / ref_autocov(x, 0) for k in range(6)],
                               rtol=1e-9, atol=1e-12)
    # Against theory: tau = (1+phi)/(1-phi), over many independent chains (z-test).
    many = ar1(phi, 4000, 200, seed=1 + int(phi * 10))
    taus = np.array([integrated_autocorr_time(c) for c in many])
    exact = (1 + phi) / (1 - phi)
    se = taus.std(ddof=1) / math.sqrt(taus.size)
    # Known bias of the initial-sequence estimator: noisy pairs (sd ~ sqrt(2 tau / n)) keep being
    # added until the first negative one, on average one positive half-normal pair past the true
    # cut-off: + 2 sqrt(2 tau / n) sqrt(2 / pi) = 2.26 sqrt(tau / n) at most.
    allowance = 2.26 * math.sqrt(exact / 4000)
    assert abs(taus.mean() - exact) <= 4.5 * se + allowance, (taus.mean(), exact)


def test_multi_chain_statistics_are_arviz_and_classic_split_rhat_matches_reference():
    from arviz_stats.base import array_stats

    x = ar1(0.7, 400, 4, seed=3)
    assert integrated_autocorr_time(x) == x.size / array_stats.ess(x, method="identity")
    for method in ("bulk", "mean", "sd", "identity"):
        assert ess(x, method) == array_stats.ess(x, method=method)
    assert ess(x, "tail") == array_stats.ess(x, method="tail", prob=(0.05, 0.95))
    for method in ("rank", "folded", "z_scale", "split"):
        assert rhat(x, method) == array_stats.rhat(x, method=method)
    assert split_rhat(x) == rhat(x) == array_stats.rhat(x, method="rank")
    assert mcse(x) == array_stats.mcse(x, method="mean") and mcse(x, "sd") == array_stats.mcse(x, method="sd")
    assert mcse(x, "quantile", prob=0.05) == array_stats.mcse(x, method="quantile", prob=0.05)
    # ArviZ's classic split-R-hat is the textbook one (written above from BDA3 with direct sums).
    assert rhat(x, "split") == pytest.approx(ref_split_rhat(x), rel=1e-12)
    # Odd lengths drop the middle draw.
    assert rhat(x[:, :399], "split") == pytest.approx(ref_split_rhat(x[:, :399]), rel=1e-12)
    s = chain_summary(x)
    assert s["rhat"] == rhat(x) == max(s["rhat_bulk"], s["rhat_folded"]) and s["ess_bulk"] == ess(x)
    assert s["ess_tail"] == ess(x, "tail") and s["mcse_q5"] == mcse(x, "quantile", prob=0.05)
    assert (s["chains"], s["draws"], s["segmented"]) == (4, 400, False)
    # One chain: cut into 4 segments.
    one = chain_summary(x[0])
    assert (one["chains"], one["draws"], one["segmented"]) == (4, 100, True)
    assert rhat(x[0]) == array_stats.rhat(x[0].reshape(4, 100), method="rank")


def test_split_rhat_detects_disagreement_and_drift():
    ok = ar1(0.9, 4000, 8, seed=4)
    assert split_rhat(ok) < 1.01
    shifted = ar1(0.9, 4000, 8, seed=5, mu=[0, 0, 0, 0, 0, 0, 0, 3.0])
    assert split_rhat(shifted) > 1.05
    drifting = ar1(0.9, 4000, 4, seed=6) + np.linspace(0, 4, 4000)
    assert split_rhat(drifting) > 1.05
    # Multi-chain ESS counts the disagreement as correlation.
    assert effective_sample_size(shifted) < 0.2 * effective_sample_size(ok)


def test_geweke_false_alarm_rate_and_power():
    chains = ar1(0.9, 4000, 200, seed=7)
    z = np.array([geweke_z(c) for c in chains])
    # Standard normal under stationarity: P(|z| > 3) = 0.27%; batch-means noise allows a little more.
    assert np.mean(np.abs(z) > 3) <= 0.03
    assert abs(z.mean()) * math.sqrt(z.size) / z.std() <= 4.5
    relaxing = chains[:20] + 5 * np.exp(-np.arange(4000) / 400.0)
    assert all(abs(geweke_z(c)) > 3 for c in relaxing)


def test_poincare_bounds_on_ornstein_uhlenbeck():
    # ULA on U = k x^2 / 2: a = 1 - lr k, stationary variance 1/(beta k (1 - lr k / 2)); C_P = 1/(beta k).
    beta, k, lr = 2.0, 3.0, 0.01
    a = 1 - lr * k
    x = ar1(a, 20000, 1, seed=8)[0] * math.sqrt(1 / (beta * k * (1 - lr * k / 2)))
    exact_cp = 1 / (beta * k)
    bound = poincare_autocorrelation(x, beta=beta, lr=lr)
    # Its population value: -lr / (beta ln a) (the discrete chain decays a little faster than the SDE).
    assert bound == pytest.approx(-lr / (beta * math.log(a)), rel=0.1)
    assert bound <= exact_cp * 1.1
    assert poincare_rayleigh(x[:, None]) == pytest.approx(x.var(ddof=1), rel=1e-9)
    assert poincare_rayleigh(np.array([0.1, 0.4, 0.2])) == 0.4
    assert poincare_lora(4.0, 0.5) == pytest.approx(0.25)
    out = poincare_lower_bounds(beta=beta, lr=lr, traces={"x": x}, samples=x[:, None], weight_decay=0.5)
    assert out["max"] == max(out["bounds"].values())
    assert out["mixing_steps_lower_bound"] == pytest.approx(beta * out["max"] / lr)


def test_effective_dimension_of_a_gaussian():
    # U - U* = |z|^2 / (2 beta) with z ~ N(0, I_d): 2 beta^2 Var U = d.
    rng = np.random.default_rng(9)
    d, beta = 5, 3.0
    u = (rng.standard_normal((20000, d)) ** 2).sum(1) / (2 * beta)
    d_eff, se = effective_dimension(u, beta)
    assert abs(d_eff - d) <= 4.5 * se


def test_input_validation():
    with pytest.raises(ValueError, match="trace"):
        integrated_autocorr_time([1.0, 2.0])
    with pytest.raises(ValueError, match="chains"):
        split_rhat(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="first/last"):
        geweke_z(np.arange(100.0), first=0.6, last=0.5)
    with pytest.raises(ValueError, match="inf or NaN"):
        effective_sample_size([1.0, np.nan, 2.0, 3.0, 4.0])
    # (draws, chains) passed by mistake: refused, not R-hat 0.99 and ESS 8000.
    x = ar1(0.5, 2000, 4, seed=10)
    for f in (rhat, ess, mcse, chain_summary):
        with pytest.raises(ValueError, match=r"more chains \(2000\) than draws per chain \(4\).*transpose"):
            f(x.T)
    with pytest.raises(ValueError, match="3 draws per chain .expected at least 4"):
        ess(x[:2, :3])
    with pytest.raises(ValueError, match="first at chain 2, draw 7"):
        x2 = x.copy()
        x2[2, 7] = np.nan
        rhat(x2)
    with pytest.raises(ValueError, match="every draw equals 1.0; R-hat and ESS cannot judge"):
        rhat(np.ones((4, 100)))
    with pytest.raises(ValueError, match="too few for 4 segments"):
        rhat(np.arange(12.0))
    with pytest.raises(ValueError, match="Invalid method: 'bulk' for rhat"):
        rhat(x, "bulk")
    with pytest.raises(ValueError, match="Invalid prob"):
        mcse(x, "quantile")
    with pytest.raises(ValueError, match="beta"):
        poincare_lora(0.0, 1.0)


def test_nested_rhat_for_many_short_chains_is_arviz():
    from arviz_stats.base import array_stats

    x = ar1(0.5, 50, 200, seed=11)          # 200 chains x 50 draws: more chains than draws, allowed here
    ids = np.repeat(np.arange(4), 50)
    assert rhat_nested(x, ids) == array_stats.rhat_nested(x, ids, method="rank")
    with pytest.raises(ValueError, match="more chains"):
        rhat(x)
    assert rhat(x, many_chains=True) == array_stats.rhat(x, method="rank")   # on purpose
    with pytest.raises(ValueError, match="superchain_ids: 2 superchains of sizes"):
        rhat_nested(x, np.r_[np.zeros(150, int), np.ones(50, int)])
    with pytest.raises(ValueError, match="one per chain"):
        rhat_nested(x, ids[:10])
