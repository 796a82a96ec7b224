r"""Offline analysis of recorded chains (numpy; no torch needed).

- :func:`integrated_autocorr_time` and :func:`effective_sample_size`: Geyer's initial monotone
  sequence estimator, :math:`\tau = -1 + 2\sum_{k=0}^{K} (\hat\rho_{2k} + \hat\rho_{2k+1})`,
  truncated at the first negative pair; for several chains the autocorrelations are combined as in
  Stan (within-chain autocovariances against the between-chain variance estimate).
- :func:`split_rhat`: split-:math:`\hat R` (Gelman et al., BDA3 §11.4) over chains x draws.
- :func:`geweke_z`: first 10% vs last 50% of a trace, long-run variance by batch means.
- Poincaré-constant lower bounds (:func:`poincare_lower_bounds`): the Gibbs measure satisfies
  :math:`\operatorname{Var}_\pi f \le C_P\,\mathbb E_\pi\lVert\nabla f\rVert^2` and the Langevin
  diffusion relaxes as :math:`e^{-t/(\beta C_P)}` (time :math:`t = \eta\times` steps), so every
  lower bound on :math:`C_P` is a lower bound :math:`\beta C_P/\eta` on the mixing time in steps.
- :func:`effective_dimension`: :math:`\hat d_{\mathrm{eff}} = 2\beta^2\operatorname{Var}_\pi(U)`
  (:math:`= d` for a quadratic :math:`U`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from langevin_lora._validation import check_int, check_positive, check_real

__all__ = [
    "autocorrelation",
    "integrated_autocorr_time",
    "effective_sample_size",
    "split_rhat",
    "geweke_z",
    "batch_means_se",
    "poincare_rayleigh",
    "poincare_autocorrelation",
    "poincare_lora",
    "poincare_lower_bounds",
    "effective_dimension",
]


def _as_trace(trace: Any, name: str = "trace", min_len: int = 4) -> np.ndarray:
    x = np.asarray(trace, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"Invalid {name}: expected a 1-d sequence of draws, got shape {x.shape}")
    if x.size < min_len:
        raise ValueError(f"Invalid {name}: {x.size} draws (expected at least {min_len})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"Invalid {name}: contains inf or NaN")
    return x


def _as_chains(chains: Any, name: str = "chains", min_chains: int = 1, min_draws: int = 4) -> np.ndarray:
    x = np.asarray(chains, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"Invalid {name}: expected shape (chains, draws), got {x.shape}")
    if x.shape[0] < min_chains:
        raise ValueError(f"Invalid {name}: {x.shape[0]} chains (expected at least {min_chains})")
    if x.shape[1] < min_draws:
        raise ValueError(f"Invalid {name}: {x.shape[1]} draws per chain (expected at least {min_draws})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"Invalid {name}: contains inf or NaN")
    return x


def _autocov(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance (divisor n) along the last axis, by FFT."""
    n = x.shape[-1]
    xc = x - x.mean(axis=-1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(xc, n=size, axis=-1)
    return np.fft.irfft(f * np.conj(f), n=size, axis=-1)[..., :n] / n


def autocorrelation(trace: Any, max_lag: int | None = None) -> np.ndarray:
    r"""Sample autocorrelation :math:`\hat\rho_k = \hat\gamma_k/\hat\gamma_0` (biased autocovariance,
    divisor :math:`n`) for lags :math:`0..\texttt{max\_lag}` (default all)."""
    x = _as_trace(trace)
    acov = _autocov(x)
    rho = acov / acov[0] if acov[0] > 0 else np.zeros_like(acov)
    if max_lag is not None:
        rho = rho[: check_int("max_lag", max_lag, low=0) + 1]
    return rho


def _combined_rho(x: np.ndarray) -> np.ndarray:
    m, n = x.shape
    acov = _autocov(x)
    if m == 1:
        return acov[0] / acov[0, 0] if acov[0, 0] > 0 else np.zeros(n)
    w = x.var(axis=1, ddof=1).mean()
    b_over_n = x.mean(axis=1).var(ddof=1)
    var_plus = (n - 1) / n * w + b_over_n
    if var_plus <= 0:
        return np.zeros(n)
    return 1.0 - (w - acov.mean(axis=0)) / var_plus


def _geyer_tau(rho: np.ndarray) -> float:
    n = rho.size
    pairs = []
    for k in range(n // 2):
        p = rho[2 * k] + rho[2 * k + 1]
        if p < 0:
            break
        if pairs and p > pairs[-1]:
            p = pairs[-1]  # initial monotone sequence
        pairs.append(p)
    if not pairs:
        return 1.0
    return max(-1.0 + 2.0 * float(np.sum(pairs)), 1.0 / math.log10(max(n, 10)))


def integrated_autocorr_time(trace: Any) -> float:
    r"""Integrated autocorrelation time :math:`\tau_{\mathrm{int}} = 1 + 2\sum_{k\ge1}\rho_k`, in draws.

    Geyer's initial monotone sequence: pairs :math:`P_k = \hat\rho_{2k} + \hat\rho_{2k+1}` are summed
    until the first negative one and forced non-increasing, :math:`\hat\tau = -1 + 2\sum_k P_k`.
    ``trace`` is 1-d, or ``(chains, draws)``: then the chains are combined (Stan's estimator, which
    also counts between-chain disagreement as correlation). For AR(1) with coefficient
    :math:`\phi`, :math:`\tau = (1+\phi)/(1-\phi)`.
    """
    x = np.asarray(trace, dtype=np.float64)
    x = _as_chains(x[None, :] if x.ndim == 1 else x, name="trace")
    return _geyer_tau(_combined_rho(x))


def effective_sample_size(trace: Any) -> float:
    r"""Effective sample size :math:`n/\tau_{\mathrm{int}}` (total draws over all chains for a
    ``(chains, draws)`` array). Judge nothing else before it reaches about 100."""
    x = np.asarray(trace, dtype=np.float64)
    x = _as_chains(x[None, :] if x.ndim == 1 else x, name="trace")
    return x.size / integrated_autocorr_time(x)


def split_rhat(chains: Any) -> float:
    r"""Split-:math:`\hat R` of ``chains`` shaped ``(chains, draws)``.

    Every chain is cut in two halves (a middle draw is dropped when the length is odd), giving
    :math:`m` sequences of :math:`n` draws; with :math:`W` the mean within-sequence variance and
    :math:`B/n` the variance of the sequence means,

    .. math::
        \hat R = \sqrt{\Big(\tfrac{n-1}{n}W + \tfrac{B}{n}\Big)\Big/W} .

    Near 1 when the chains agree; aim for < 1.01 (< 1.05 with 4 or fewer chains). Splitting also
    flags a single chain that drifts.
    """
    x = _as_chains(chains, min_chains=1, min_draws=4)
    n = x.shape[1] // 2
    halves = np.concatenate([x[:, :n], x[:, -n:]], axis=0)
    w = halves.var(axis=1, ddof=1).mean()
    b_over_n = halves.mean(axis=1).var(ddof=1)
    if w <= 0:
        return math.inf if b_over_n > 0 else 1.0
    return float(math.sqrt(((n - 1) / n * w + b_over_n) / w))


def batch_means_se(trace: Any, num_batches: int | None = None) -> float:
    r"""Standard error of the mean of a correlated trace by non-overlapping batch means.

    ``num_batches`` defaults to :math:`\lfloor n/b\rfloor` with batch length
    :math:`b = \max(\sqrt n, 5\hat\tau_{\mathrm{int}})` (at least 4 batches), long enough for the
    batch means to be nearly independent.
    """
    x = _as_trace(trace)
    n = x.size
    if num_batches is None:
        b = max(math.sqrt(n), 5.0 * integrated_autocorr_time(x))
        num_batches = max(4, int(n // b))
    num_batches = check_int("num_batches", num_batches, low=2)
    if num_batches > n:
        raise ValueError(f"Invalid num_batches: {num_batches} (expected at most the {n} draws)")
    size = n // num_batches
    means = x[: size * num_batches].reshape(num_batches, size).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(num_batches))


def geweke_z(trace: Any, first: float = 0.1, last: float = 0.5, num_batches: int | None = None) -> float:
    r"""Geweke's convergence z-score: the mean of the first ``first`` fraction of ``trace`` against
    the mean of the last ``last`` fraction,

    .. math::
        z = \frac{\bar x_a - \bar x_b}{\sqrt{\sigma^2_\infty/n_a + \sigma^2_\infty/n_b}},

    with the long-run variance :math:`\sigma^2_\infty` (spectral density at frequency 0) estimated
    by batch means (:func:`batch_means_se`) on the last segment. Under stationarity both segments
    share it; estimating it on the start instead would let a steep initial drift inflate its own
    variance and hide. :math:`|z| < 3` for a stationary chain; a chain still relaxing from its start
    gives a large :math:`|z|`.
    """
    x = _as_trace(trace, min_len=20)
    first = check_real("first", first, low=0.0, high=1.0, low_open=True, high_open=True)
    last = check_real("last", last, low=0.0, high=1.0, low_open=True, high_open=True)
    if first + last > 1:
        raise ValueError(f"Invalid first/last: {first} + {last} > 1 (the two segments must not overlap)")
    n = x.size
    a = x[: max(8, int(first * n))]
    b = x[n - max(8, int(last * n)):]
    nb = None if num_batches is None else min(num_batches, b.size)
    long_run_var = batch_means_se(b, nb) ** 2 * b.size
    denom = math.sqrt(long_run_var / a.size + long_run_var / b.size)
    diff = a.mean() - b.mean()
    if denom == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return float(diff / denom)


# -- Poincaré constants -------------------------------------------------------------------------
def poincare_rayleigh(samples: Any) -> float:
    r"""Rayleigh lower bound :math:`C_P \ge \operatorname{Var}(v\cdot\theta)` for unit :math:`v`,
    maximised: :math:`\lambda_{\max}(\operatorname{Cov}\theta)`.

    ``samples``: draws ``(n, d)`` of :math:`\theta` (or of a random projection of it), or a 1-d
    array read as per-coordinate variances (then the bound is their maximum, :math:`f = \theta_i`).
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        if x.size == 0 or np.any(x < 0) or not np.all(np.isfinite(x)):
            raise ValueError("Invalid samples: per-coordinate variances must be finite and >= 0")
        return float(x.max())
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Invalid samples: expected draws shaped (n >= 2, d), got {x.shape}")
    xc = x - x.mean(axis=0)
    s = np.linalg.svd(xc, compute_uv=False)
    return float(s[0] ** 2 / (x.shape[0] - 1))


def poincare_autocorrelation(trace: Any, *, beta: float, lr: float, thin: int = 1, min_rho: float = 0.3) -> float:
    r"""Autocorrelation lower bound :math:`C_P \ge 1/(\beta\hat\gamma_f)`.

    For a reversible diffusion :math:`\rho_f(t) = \int e^{-\gamma t}\,d\mu_f(\gamma)` with
    :math:`\gamma \ge` the spectral gap :math:`1/(\beta C_P)`, so
    :math:`\hat\gamma_f = -\ln\hat\rho_f(k)/(k\eta)` over-estimates the gap. Since
    :math:`-\ln\rho(t)/t` decreases with :math:`t`, the lag used is the last one of the initial run
    with :math:`\hat\rho_f(k) \ge` ``min_rho`` (later lags are dominated by estimation noise of
    order :math:`\sqrt{\tau/n}`). ``thin``: steps between recorded draws. Returns 0 when no lag
    qualifies.
    """
    beta = check_positive("beta", beta)
    lr = check_positive("lr", lr)
    thin = check_int("thin", thin, low=1)
    min_rho = check_real("min_rho", min_rho, low=0.0, high=1.0, low_open=True, high_open=True)
    rho = autocorrelation(trace)
    best = 0
    for k in range(1, rho.size // 2):
        if rho[k] < min_rho:
            break
        best = k
    if best == 0:
        return 0.0
    gamma = -math.log(rho[best]) / (best * thin * lr)
    return 1.0 / (beta * gamma) if gamma > 0 else math.inf


def poincare_lora(beta: float, weight_decay: float) -> float:
    r"""LoRA gauge bound :math:`C_P \ge 1/(2\beta\lambda)`: the gauge matrix
    :math:`AA^\top - B^\top B` relaxes at rate exactly :math:`2\lambda` whatever the data (THEORY §3),
    so the gap is at most :math:`2\lambda`; mixing needs at least :math:`1/(2\lambda\eta)` steps."""
    beta = check_positive("beta", beta)
    weight_decay = check_positive("weight_decay", weight_decay)
    return 1.0 / (2.0 * beta * weight_decay)


def poincare_lower_bounds(*, beta: float, lr: float | None = None, traces: dict[str, Any] | None = None,
                          samples: Any = None, weight_decay: float | None = None, thin: int = 1) -> dict[str, Any]:
    r"""Every available lower bound on :math:`C_P`, their maximum, and the mixing time it implies
    (:math:`\beta C_P/\eta` steps). ``traces`` are scalar functions of :math:`\theta` along the chain."""
    beta = check_positive("beta", beta)
    bounds: dict[str, float] = {}
    if samples is not None:
        bounds["rayleigh"] = poincare_rayleigh(samples)
    if traces and lr is not None:
        for name, tr in traces.items():
            if np.asarray(tr).size >= 8:
                bounds[f"autocorrelation/{name}"] = poincare_autocorrelation(tr, beta=beta, lr=lr, thin=thin)
    if weight_decay is not None and weight_decay > 0:
        bounds["lora_gauge"] = poincare_lora(beta, weight_decay)
    best = max(bounds.values()) if bounds else 0.0
    out: dict[str, Any] = {"bounds": bounds, "max": best}
    if lr is not None and best > 0:
        out["mixing_steps_lower_bound"] = beta * best / check_positive("lr", lr)
    return out


def effective_dimension(u_trace: Any, beta: float) -> tuple[float, float]:
    r""":math:`\hat d_{\mathrm{eff}} = 2\beta^2\operatorname{Var}(U)` and its standard error.

    For a quadratic :math:`U` it equals the dimension; in general :math:`\mathbb E_\pi U - U^* \approx
    \hat d_{\mathrm{eff}}/(2\beta)` (THEORY §1). The standard error uses the effective sample size
    of :math:`(U - \bar U)^2`.
    """
    beta = check_positive("beta", beta)
    u = np.asarray(u_trace, dtype=np.float64)
    u = _as_chains(u[None, :] if u.ndim == 1 else u, name="u_trace")
    dev2 = (u - u.mean()) ** 2
    var = float(dev2.sum() / (u.size - 1))
    ess = effective_sample_size(dev2) if u.shape[1] >= 4 else float(u.size)
    se = float(dev2.std(ddof=1) / math.sqrt(max(ess, 1.0)))
    return 2 * beta ** 2 * var, 2 * beta ** 2 * se

