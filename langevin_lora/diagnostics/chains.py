r"""Offline analysis of recorded chains (numpy; no torch needed).

Where the statistics come from:

- **From arviz-stats** (its numpy-only array interface, :data:`arviz_stats.base.array_stats`;
  Vehtari, Gelman, Simpson, Carpenter, Bürkner 2021, "Rank-normalization, folding, and
  localization: an improved :math:`\hat R`"), called, not re-implemented, so they equal ArviZ's on
  any ``(chain, draw)`` array: :func:`rhat` (rank-normalised split-:math:`\hat R`, the maximum of the
  bulk and the folded one; ``method="split"`` the classic BDA3 form), :func:`ess` (bulk and tail
  ESS on split, rank-normalised chains; ``"mean"``, ``"sd"``, ``"quantile"``, ``"identity"``...),
  :func:`mcse` (of the mean, sd, median and quantiles) and :func:`chain_summary` (all of them for one
  quantity). :func:`effective_sample_size`, :func:`split_rhat` and :func:`integrated_autocorr_time`
  are the same calls under the names this package had before.
- **In house**, because no library has them: Geweke's z with a batch-means long-run variance
  (:func:`geweke_z`, :func:`batch_means_se`), kept because its power grows with the run where
  :math:`\hat R < 1.01` is a fixed effect size; the Poincaré-constant lower bounds and the effective
  dimension below.

Input shape is ``(chains, draws)`` (a 1-d trace is one chain). An array with more chains than
draws is refused (it is almost always ``(draws, chains)``), and so are fewer than 4 draws per chain,
NaN or inf, and a constant array (:math:`\hat R` and ESS are undefined for it). :math:`\hat R` needs
at least two chains: one chain is cut into ``segments`` consecutive pieces (:func:`segment_chain`,
default 4), which detects drift and changes of level or scale along the run, but not a mode the run
never visits (only independent chains started apart can show that).

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
    "as_chains",
    "segment_chain",
    "rhat",
    "rhat_nested",
    "ess",
    "mcse",
    "chain_summary",
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
    "TAIL_PROB",
]

#: Tail ESS is the smaller ESS of the 5% and 95% quantile indicators (Vehtari et al. 2021; Stan,
#: ArviZ 0.x). arviz-stats' own default for ``method="tail"`` follows its ``stats.ci_prob``
#: setting instead: pass ``prob=(0.05, 0.95)`` there to reproduce these numbers.
TAIL_PROB = (0.05, 0.95)
RHAT_METHODS = ("rank", "folded", "z_scale", "split", "identity")
ESS_METHODS = ("bulk", "tail", "mean", "sd", "quantile", "local", "median", "mad", "z_scale", "folded", "identity")
MCSE_METHODS = ("mean", "sd", "median", "quantile")


def _array_stats():
    try:
        from arviz_stats.base import array_stats
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("langevin_lora.diagnostics needs arviz-stats for R-hat, ESS and MCSE: "
                          "pip install 'arviz-stats>=0.8'") from err
    return array_stats


def arviz_stats_version() -> str:
    """``arviz-stats <version>``: the source of :func:`rhat`, :func:`ess` and :func:`mcse`."""
    from arviz_stats import __version__

    return f"arviz-stats {__version__}"


def _as_trace(trace: Any, name: str = "trace", min_len: int = 4) -> np.ndarray:
    x = np.asarray(trace, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"Invalid {name}: expected a 1-d sequence of draws, got shape {x.shape}")
    if x.size < min_len:
        raise ValueError(f"Invalid {name}: {x.size} draws (expected at least {min_len})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"Invalid {name}: contains inf or NaN")
    return x


def as_chains(chains: Any, name: str = "chains", *, min_draws: int = 4, allow_constant: bool = False,
              many_chains: bool = False) -> np.ndarray:
    """``chains`` as a float64 ``(chains, draws)`` array (a 1-d trace is one chain), or ``ValueError``.

    Refused, with the reason: another number of dimensions; more chains than draws (almost always a
    ``(draws, chains)`` array: transpose it); fewer than ``min_draws`` draws per chain; inf or NaN;
    and, unless ``allow_constant``, every draw equal (R-hat and ESS cannot judge a constant).
    ``many_chains=True`` allows more chains than draws (many short chains, on purpose).
    """
    x = np.asarray(chains, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"Invalid {name}: expected shape (chains, draws) or (draws,), got {x.shape}")
    m, n = x.shape
    if m > n and not many_chains:
        raise ValueError(f"Invalid {name}: shape {x.shape} has more chains ({m}) than draws per chain ({n}); "
                         f"expected (chains, draws): pass the transpose if this is (draws, chains)")
    if n < min_draws:
        raise ValueError(f"Invalid {name}: {n} draws per chain (expected at least {min_draws})")
    bad = ~np.isfinite(x)
    if bad.any():
        c, d = np.argwhere(bad)[0]
        raise ValueError(f"Invalid {name}: contains inf or NaN ({int(bad.sum())} values, first at chain {c}, "
                         f"draw {d}); drop the diverged draws or the chain")
    if not allow_constant and np.ptp(x) == 0:
        raise ValueError(f"Invalid {name}: every draw equals {float(x.flat[0])!r}; R-hat and ESS cannot judge a "
                         "constant "
                         "quantity")
    return x


def segment_chain(trace: Any, segments: int = 4) -> np.ndarray:
    """One chain cut into ``segments`` consecutive pieces of equal length, ``(segments, n // segments)``;
    the first ``n % segments`` draws are dropped (the end of a run is the part nearest stationarity)."""
    segments = check_int("segments", segments, low=2)
    x = np.asarray(trace, dtype=np.float64).ravel()
    size = x.size // segments
    if size < 4:
        raise ValueError(f"Invalid trace: {x.size} draws are too few for {segments} segments of at least 4 draws")
    return x[x.size - size * segments:].reshape(segments, size)


def _check_method(method: str, allowed: tuple[str, ...], what: str) -> str:
    if method not in allowed:
        raise ValueError(f"Invalid method: {method!r} for {what} (expected one of {', '.join(allowed)})")
    return method


def rhat(chains: Any, method: str = "rank", *, segments: int = 4, many_chains: bool = False) -> float:
    r""":math:`\hat R` of ``chains`` shaped ``(chains, draws)``, by arviz-stats.

    ``method="rank"`` (default, ArviZ's and Stan's): every chain is split in two halves, the draws
    are rank-normalised (:math:`z = \Phi^{-1}((r - 3/8)/(S + 1/4))` over all draws), and
    :math:`\hat R = \max(\hat R_{\mathrm{bulk}}, \hat R_{\mathrm{folded}})`, the folded one computed on
    :math:`|x - \mathrm{median}|`, so chains that differ in location *or scale* are flagged, heavy
    tails included. Each is :math:`\sqrt{((n-1)W/n + B/n)/W}` over the split sequences.
    ``"folded"``, ``"z_scale"`` (bulk) give one of the two; ``"split"`` is the classic split-:math:`\hat R`
    (BDA3), ``"identity"`` the unsplit one. Recommended: :math:`\hat R < 1.01` whatever the number of
    chains (Vehtari et al. 2021), with bulk and tail ESS above 100 per chain (:func:`ess`).
    A single chain (1-d, or one row) is cut into ``segments`` pieces first (:func:`segment_chain`).
    More chains than draws is refused (a transposed array) unless ``many_chains=True``.
    """
    method = _check_method(method, RHAT_METHODS, "rhat")
    x = as_chains(chains, many_chains=many_chains)
    if x.shape[0] == 1:
        x = segment_chain(x[0], segments)
    return float(_array_stats().rhat(x, method=method))


def rhat_nested(chains: Any, superchain_ids: Any, method: str = "rank") -> float:
    r"""Nested :math:`\hat R` (Margossian et al. 2024) of many short chains grouped into superchains
    (chains of one superchain started from the same point), by arviz-stats: the one case where more
    chains than draws is expected, so it is allowed here. ``superchain_ids``: one integer per chain,
    at least 2 superchains of equal size. Use it for many seeds run briefly."""
    method = _check_method(method, RHAT_METHODS, "rhat_nested")
    x = np.asarray(chains, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"Invalid chains: expected shape (chains, draws), got {x.shape}")
    if x.shape[1] < 4:
        raise ValueError(f"Invalid chains: {x.shape[1]} draws per chain (expected at least 4)")
    if not np.all(np.isfinite(x)):
        raise ValueError("Invalid chains: contains inf or NaN")
    if np.ptp(x) == 0:
        raise ValueError("Invalid chains: constant; R-hat cannot judge a constant quantity")
    ids = np.asarray(superchain_ids)
    if ids.shape != (x.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"Invalid superchain_ids: expected {x.shape[0]} integers (one per chain), got shape "
                         f"{ids.shape}")
    _, counts = np.unique(ids, return_counts=True)
    if counts.size < 2 or np.any(counts != counts[0]):
        raise ValueError(f"Invalid superchain_ids: {counts.size} superchains of sizes {counts.tolist()} (expected at "
                         "least 2 of equal size)")
    return float(_array_stats().rhat_nested(x, ids, method=method))


def ess(chains: Any, method: str = "bulk", *, prob: float | tuple[float, float] | None = None,
        relative: bool = False) -> float:
    r"""Effective sample size of ``chains`` shaped ``(chains, draws)`` (all chains together), by arviz-stats.

    ``"bulk"``: ESS of the rank-normalised split chains (of the mean, robust to heavy tails);
    ``"tail"``: the smaller ESS of the quantile indicators at ``prob`` (default :data:`TAIL_PROB`,
    5% and 95%); ``"mean"``, ``"sd"``: of the split draws and of their squared deviations;
    ``"quantile"`` (``prob`` a float), ``"median"``, ``"mad"``, ``"local"``, ``"folded"``,
    ``"z_scale"``; ``"identity"``: Geyer's initial monotone estimator on the draws as they are
    (no split, no ranks). ``relative``: divided by the number of draws.
    """
    method = _check_method(method, ESS_METHODS, "ess")
    x = as_chains(chains)
    if method == "tail" and prob is None:
        prob = TAIL_PROB
    if method in ("quantile", "local") and prob is None:
        raise ValueError(f"Invalid prob: None (method {method!r} needs it)")
    return float(_array_stats().ess(x, method=method, prob=prob, relative=relative))


def mcse(chains: Any, method: str = "mean", *, prob: float | None = None) -> float:
    r"""Monte Carlo standard error of the mean (``sd/sqrt(ESS_mean)``), sd, median or the ``prob``
    quantile of ``chains`` shaped ``(chains, draws)``, by arviz-stats."""
    method = _check_method(method, MCSE_METHODS, "mcse")
    x = as_chains(chains)
    if method == "quantile":
        prob = check_real("prob", prob, low=0.0, high=1.0, low_open=True, high_open=True)
    return float(_array_stats().mcse(x, method=method, prob=prob))


def chain_summary(chains: Any, *, segments: int = 4, prob: tuple[float, float] = TAIL_PROB) -> dict[str, Any]:
    r"""ArviZ's summary of one quantity (arviz-stats' array interface): ``mean``, ``sd`` (divisor
    :math:`n`, as ``arviz_stats.summary``), the ``prob``
    quantiles (``q5``, ``q95``), ``rhat`` (rank, = max of ``rhat_bulk`` and ``rhat_folded``),
    ``ess_bulk``, ``ess_tail``, ``mcse_mean``, ``mcse_sd``, ``mcse_q5``, ``mcse_q95``, with ``chains``
    and ``draws``. A single chain is cut into ``segments`` pieces, which are the chains here
    (``segmented``: True)."""
    x = as_chains(chains)
    segmented = x.shape[0] == 1
    if segmented:
        x = segment_chain(x[0], segments)
    st = _array_stats()
    lo, hi = (check_real("prob", p, low=0.0, high=1.0, low_open=True, high_open=True) for p in prob)
    out: dict[str, Any] = {"chains": int(x.shape[0]), "draws": int(x.shape[1]), "segmented": segmented,
                           "mean": float(x.mean()), "sd": float(x.std())}
    for key, p in ((f"q{lo * 100:g}", lo), (f"q{hi * 100:g}", hi)):
        out[key] = float(np.quantile(x, p))
    bulk, folded = (float(st.rhat(x, method=m)) for m in ("z_scale", "folded"))
    out.update(rhat=max(bulk, folded), rhat_bulk=bulk, rhat_folded=folded,
               ess_bulk=float(st.ess(x, method="bulk")), ess_tail=float(st.ess(x, method="tail", prob=(lo, hi))),
               mcse_mean=float(st.mcse(x, method="mean")), mcse_sd=float(st.mcse(x, method="sd")))
    for key, p in ((f"mcse_q{lo * 100:g}", lo), (f"mcse_q{hi * 100:g}", hi)):
        out[key] = float(st.mcse(x, method="quantile", prob=p))
    return out


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


def integrated_autocorr_time(trace: Any) -> float:
    r"""Integrated autocorrelation time :math:`\tau_{\mathrm{int}} = 1 + 2\sum_{k\ge1}\rho_k`, in draws:
    the number of draws over arviz-stats' ``ess(method="identity")`` (Geyer's initial monotone
    sequence on the draws as they are, no split, no ranks; for ``(chains, draws)`` Stan's combined
    estimator, which counts between-chain disagreement as correlation). AR(1) with coefficient
    :math:`\phi`: :math:`\tau = (1+\phi)/(1-\phi)`."""
    x = as_chains(trace, name="trace")
    return x.size / ess(x, method="identity")


def effective_sample_size(trace: Any, method: str = "bulk") -> float:
    r"""Effective sample size of a trace or of ``(chains, draws)`` (all chains together):
    :func:`ess`, bulk by default (rank-normalised split chains). Judge nothing else before the bulk
    and tail ESS reach about 100 per chain."""
    return ess(as_chains(trace, name="trace"), method=method)


def split_rhat(chains: Any, method: str = "rank", *, segments: int = 4, many_chains: bool = False) -> float:
    r""":func:`rhat` (this package's earlier name): rank-normalised split-:math:`\hat R` by default,
    ``method="split"`` the classic one. Aim for < 1.01 whatever the number of chains."""
    return rhat(chains, method=method, segments=segments, many_chains=many_chains)


def batch_means_se(trace: Any, num_batches: int | None = None) -> float:
    r"""Standard error of the mean of a correlated trace by non-overlapping batch means.

    ``num_batches`` defaults to :math:`\lfloor n/b\rfloor` with batch length
    :math:`b = \max(\sqrt n, 5\hat\tau_{\mathrm{int}})` (at least 4 batches), long enough for the
    batch means to be nearly independent.
    """
    x = _as_trace(trace)
    n = x.size
    if np.ptp(x) == 0:
        return 0.0
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
    u = as_chains(u, name="u_trace", allow_constant=True)
    dev2 = (u - u.mean()) ** 2
    var = float(dev2.sum() / (u.size - 1))
    n_eff = ess(dev2, method="mean") if np.ptp(dev2) > 0 else float(u.size)
    se = float(dev2.std(ddof=1) / math.sqrt(max(n_eff, 1.0)))
    return 2 * beta ** 2 * var, 2 * beta ** 2 * se

