r"""The checks of the stationarity report: small functions ``Evidence -> list[Check]``.

Order of judgement (THEORY §3): effective sample size first (nothing else is meaningful below
about 100 per chain), then stationarity of the traces (rank-normalised split-:math:`\hat R`, Geweke),
then the Gibbs identities (virial and configurational temperatures at :math:`1/\beta`, mean force 0,
gauge identity), whose deviations are explained by the known biases where they apply (minibatch
noise :math:`1+\rho`, step size :math:`\eta\lambda_{\max}`), then information (Poincaré lower bounds,
effective dimension). :func:`stationarity_report` runs :data:`CHECKS` in that order; pass
``checks=`` to run others (any ``Evidence -> list[Check]``).

Chain statistics (:math:`\hat R`, bulk and tail ESS, MCSE) are arviz-stats' (see
:mod:`~langevin_lora.diagnostics.chains`), judged as ArviZ recommends (Vehtari et al. 2021):
:math:`\hat R < 1.01` whatever the number of chains, bulk and tail ESS above 100 per chain on all
chains together. How chains are formed: ``chains=`` holds independent chains (runs with other
seeds; not the DDP replicas of one run, which draw identical noise and are one chain); a single
run's traces (``traces=``) are cut into ``segments``
consecutive pieces (4), which then count as the chains (so 400 effective draws are needed). Segments
of one run detect drift, a start not yet forgotten, and changes of level or scale along the run;
they cannot detect a mode the run never visits, nor relaxation slower than the run.
Geweke's z stays on single-run traces because it adds power against an initial transient that
grows with the run length (a z-test against the long-run variance), where the fixed
:math:`\hat R < 1.01` misses a small transient confined to the first segment of a long run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from langevin_lora._validation import check_int, check_positive, check_real
from langevin_lora.core.step_size import STEP_ACCURACY_BOUND, step_remedy
from langevin_lora.diagnostics.chains import (
    as_chains,
    TAIL_PROB,
    arviz_stats_version,
    chain_summary,
    effective_dimension,
    geweke_z,
    mcse,
    poincare_lower_bounds,
)
from langevin_lora.diagnostics.report import NOISE_HOW_TO, Check, StationarityReport

__all__ = ["Evidence", "CHECKS", "stationarity_report", "STATIONARITY_TRACES"]

# Scalar traces whose drift (Geweke) means non-stationarity, in order of preference for the ESS.
STATIONARITY_TRACES = ("virial_temperature", "U", "theta_sq", "gauge_gap")


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(float(x))


def _trace_stats(x: np.ndarray) -> tuple[float, float | None]:
    """Mean and its Monte Carlo standard error (arviz-stats' ``mcse(method="mean")``)."""
    mean = float(x.mean())
    if x.size < 16:
        return mean, None
    if np.ptp(x) == 0:
        return mean, 0.0
    return mean, mcse(x, "mean")


@dataclass
class Evidence:
    r"""What the checks judge. Every field but ``traces`` is optional.

    Attributes:
        traces: per-step scalar traces (1-d arrays, non-finite entries dropped), recorded while
            sampling. Recognised names: ``virial_temperature`` (:math:`\beta T_{\mathrm{vir}}` per
            step), ``U`` (potential), ``theta_sq`` (:math:`\lVert\theta\rVert^2`), ``gauge_gap`` and
            ``gauge_gap/<module>`` (:func:`~langevin_lora.diagnostics.gauge_gap`),
            ``virial_temperature/<name>`` per group or module. Others are plotted and Geweke-tested too.
        chains: name -> ``(chains, draws)`` arrays of independent chains (runs with other seeds; DDP
            replicas of one run draw identical noise: one chain), for :math:`\hat R` and ESS over all
            of them; refused when not ``(chains, draws)``
            (more chains than draws), shorter than 8 draws, or not finite.
        beta, lr, weight_decay: the (LoRA) group's :math:`\beta`, :math:`\eta`, :math:`\lambda`,
            for the Poincaré bounds and the effective dimension.
        virial_temperature, virial_temperature_se: :math:`\beta T_{\mathrm{vir}}` and its standard
            error (default: from the ``virial_temperature`` trace, batch means).
        group_temperatures: :math:`\beta T_{\mathrm{vir}}` per group/module (default: trace means).
        noise_ratio: :math:`\rho`, or ``None`` when unavailable (``noise_ratio_note`` says why).
        config_temperature, config_temperature_se, config_temperature_note: :math:`\beta T_{\mathrm{conf}}`.
        eta_lambda_max: :math:`\eta\lambda_{\max}` of the (preconditioned) Hessian of :math:`U`.
        mean_force_chi2: ``(chi2_per_dof, expected)`` from
            :func:`~langevin_lora.diagnostics.mean_force_chi2` (expected :math:`(m-1)/(m-3)`).
        gauge_relaxation_steps: module -> :math:`1/(2\lambda\eta)`, the data-free gauge relaxation
            time in steps (with ``steps``, the number of sampling steps taken).
        thin: steps between recorded trace entries.
        temperature_tol: accepted :math:`|\beta T - 1|` (default 0.1).
        noise_ratio_max: gate on :math:`\rho` (0.1).
        step_size_max: gate on the step number :math:`\eta\lambda_{\max}` (:math:`\tfrac{h^2}{2}\lambda_{\max}`
            kinetic): :data:`langevin_lora.core.step_size.STEP_ACCURACY_BOUND` (0.25), at least twice the automatic step's.
        ess_min: bulk and tail ESS needed per chain before judging (100: Vehtari et al. 2021), so
            ``ess_min x chains`` in total (x ``segments`` for one run).
        segments: pieces a single run's trace is cut into to serve as chains (default 4).
        rhat_max: :math:`\hat R` bound (1.01, whatever the number of chains).
        geweke_max, z_max: Geweke :math:`|z|` bound; z bound of the identities tested against their
            standard errors.
        summary: numbers the checks add for the report (filled while checking).
    """

    traces: dict[str, np.ndarray] = field(default_factory=dict)
    chains: Mapping[str, Any] | None = None
    beta: float | None = None
    lr: float | None = None
    weight_decay: float | None = None
    virial_temperature: float | None = None
    virial_temperature_se: float | None = None
    group_temperatures: Mapping[str, float] | None = None
    noise_ratio: float | None = None
    noise_ratio_note: str | None = None
    config_temperature: float | None = None
    config_temperature_se: float | None = None
    config_temperature_note: str | None = None
    eta_lambda_max: float | None = None
    mean_force_chi2: tuple[float, float] | None = None
    gauge_relaxation_steps: Mapping[str, float] | None = None
    steps: int | None = None
    thin: int = 1
    temperature_tol: float = 0.1
    noise_ratio_max: float = 0.1
    step_size_max: float = STEP_ACCURACY_BOUND
    ess_min: float = 100.0
    segments: int = 4
    rhat_max: float = 1.01
    geweke_max: float = 3.0
    z_max: float = 4.5
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.temperature_tol = check_real("temperature_tol", self.temperature_tol, low=0.0, low_open=True)
        for name in ("noise_ratio_max", "step_size_max", "ess_min", "geweke_max", "z_max"):
            setattr(self, name, check_positive(name, getattr(self, name)))
        self.segments = check_int("segments", self.segments, low=2)
        self.rhat_max = check_real("rhat_max", self.rhat_max, low=1.0, low_open=True)
        chains = {}
        for name, arr in (self.chains or {}).items():
            x = as_chains(arr, name=f"chains[{name!r}]", min_draws=8, allow_constant=True)
            if x.shape[0] < 2:
                raise ValueError(f"Invalid chains[{name!r}]: one chain; pass independent chains shaped "
                                 "(chains, draws), "
                                 "or the single run in traces= (it is cut into segments)")
            chains[name] = x
        self.chains = chains
        tr = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in (self.traces or {}).items()}
        self.traces = {k: v[np.isfinite(v)] for k, v in tr.items()}
        if self.steps is not None:
            self.summary["sampling_steps"] = int(self.steps)

    @cached_property
    def main_trace(self) -> str | None:
        """The single-run trace the effective sample size is judged on."""
        return next((k for k in STATIONARITY_TRACES if k in self.traces and self.traces[k].size >= 8), None)

    @cached_property
    def chain_stats(self) -> dict[str, dict[str, Any]]:
        """arviz-stats' summary (:func:`~langevin_lora.diagnostics.chains.chain_summary`) of every
        ``chains`` entry (independent chains) and of every stationarity trace of the single run (cut
        into ``segments``) that is long enough; ``{"constant": value}`` where nothing can be judged."""
        out: dict[str, dict[str, Any]] = {}
        todo = [(k, v, "independent chains") for k, v in self.chains.items()]
        todo += [(k, self.traces[k], "segments of one run") for k in STATIONARITY_TRACES
                 if k in self.traces and k not in self.chains and self.traces[k].size >= 8 * self.segments]
        for name, x, source in todo:
            if np.ptp(x) == 0:
                out[name] = {"source": source, "constant": float(np.ravel(x)[0])}
                continue
            out[name] = {"source": source, **chain_summary(x, segments=self.segments)}
        return out

    def ess_needed(self, name: str) -> float:
        st = self.chain_stats.get(name)
        return self.ess_min * (st["chains"] if st and "chains" in st else self.segments)

    @cached_property
    def ess(self) -> float | None:
        """min(bulk, tail) ESS of the main trace (its segments), or None when it cannot be computed."""
        st = self.chain_stats.get(self.main_trace) if self.main_trace else None
        if not st or "ess_bulk" not in st:
            return None
        return min(st["ess_bulk"], st["ess_tail"])

    @cached_property
    def ess_ok(self) -> bool:
        return self.ess is not None and self.ess >= self.ess_needed(self.main_trace)

    @cached_property
    def geweke(self) -> dict[str, float]:
        """Geweke z of every scalar trace long enough (40 steps) and not constant."""
        return {name: geweke_z(x) for name, x in self.traces.items()
                if "/" not in name and x.size >= 40 and x.std() > 0}

    @cached_property
    def explanations(self) -> list[tuple[str, str]]:
        """Known causes of a temperature off 1, as ``(reason, remedy)``."""
        out = []
        if _finite(self.noise_ratio) and self.noise_ratio > self.noise_ratio_max:
            out.append((f"minibatch noise ratio {self.noise_ratio:.2f} > {self.noise_ratio_max:g} "
                        f"(predicts {1 + self.noise_ratio:.2f}/beta)",
                        "lower the learning rate or raise the batch size"))
        if _finite(self.eta_lambda_max) and self.eta_lambda_max > self.step_size_max:
            out.append((f"step size eta*lambda_max = {self.eta_lambda_max:.2g} > {self.step_size_max:g}",
                        step_remedy(self.eta_lambda_max / self.step_size_max)))
        drifting = any(abs(z) >= self.geweke_max for z in self.geweke.values()) or any(
            st.get("rhat", 1.0) >= self.rhat_max for st in self.chain_stats.values())
        if drifting or not self.ess_ok:
            out.append(("the traces are not stationary yet" if drifting else "too few effective samples",
                        "run longer / discard more burn-in"))
        return out


# -- the checks --------------------------------------------------------------------------------------
def _ess_reason(st: dict[str, Any]) -> str:
    return (f"bulk ESS {st['ess_bulk']:.4g}, tail ESS {st['ess_tail']:.4g} over {st['chains']} "
            f"{'segments of one run' if st['segmented'] else 'chains'} x {st['draws']} draws")


def check_effective_sample_size(ev: Evidence) -> list[Check]:
    """Bulk and tail ESS (arviz-stats) >= ``ess_min`` per chain, all chains together: the main
    single-run trace (cut into ``segments``) and every ``chains`` entry."""
    out = []
    need = ev.ess_min * ev.segments
    name = ev.main_trace
    if name is None:
        if not ev.chains:
            out.append(Check("effective_sample_size", "unavailable", None, f">= {need:g} (bulk and tail)",
                             "no trace of at least 8 recorded steps", "record more sampling steps"))
    else:
        x, st = ev.traces[name], ev.chain_stats.get(name)
        if st is None:
            out.append(Check("effective_sample_size", "fail", None, f">= {need:g} (bulk and tail)",
                             f"{name}: only {x.size} recorded steps, too few to estimate the ESS over {ev.segments} "
                             f"segments (needs {8 * ev.segments})",
                             f"run about {math.ceil(need * ev.thin)} steps in total before judging the other checks"))
        elif "constant" in st:
            out.append(Check("effective_sample_size", "unavailable", None, f">= {need:g} (bulk and tail)",
                             f"{name} is constant ({st['constant']:.4g}): cannot judge", "check what is recorded"))
        else:
            ess = ev.ess
            tau = x.size / max(st["ess_bulk"], 1e-12)
            ev.summary["tau_int"] = {name: tau * ev.thin}
            ok = ev.ess_ok
            out.append(Check("effective_sample_size", "pass" if ok else "fail", ess, f">= {need:g} (bulk and tail)",
                             f"{name}: {_ess_reason(st)} ({x.size} recorded steps, autocorrelation time "
                             f"{tau * ev.thin:.3g} steps); ArviZ: > 100 per chain",
                             "" if ok else f"run about {math.ceil(need / max(ess, 1e-9) * x.size * ev.thin)} steps in "
                                           "total before judging the other checks"))
    for cname in ev.chains:
        st = ev.chain_stats[cname]
        need = ev.ess_needed(cname)
        if "constant" in st:
            out.append(Check(f"effective_sample_size/{cname}", "unavailable", None, f">= {need:g} (bulk and tail)",
                             f"constant ({st['constant']:.4g}): cannot judge", "check what is recorded"))
            continue
        ess = min(st["ess_bulk"], st["ess_tail"])
        ok = ess >= need
        out.append(Check(f"effective_sample_size/{cname}", "pass" if ok else "fail", ess,
                         f">= {need:g} (bulk and tail)",
                         _ess_reason(st) + "; ArviZ: > 100 per chain",
                         "" if ok else f"run about {math.ceil(need / max(ess, 1e-9))}x longer (or more chains)"))
    return out


def check_geweke(ev: Evidence) -> list[Check]:
    out = []
    for name, z in ev.geweke.items():
        ok = abs(z) < ev.geweke_max
        out.append(Check(f"geweke/{name}", "pass" if ok else "fail", z, f"|z| < {ev.geweke_max:g}",
                         f"first 10% vs last 50% of the {name} trace"
                         + ("" if ok else ": it drifts, the chain is still relaxing"),
                         "" if ok else "discard the drifting start as burn-in (start sampling later) or run longer"))
    return out


def check_split_rhat(ev: Evidence) -> list[Check]:
    r"""Rank-normalised split-:math:`\hat R` (arviz-stats; max of bulk and folded) < ``rhat_max`` of
    every ``chains`` entry and of the single run's stationarity traces cut into segments."""
    out = []
    for name, st in ev.chain_stats.items():
        bound = ev.rhat_max
        if "constant" in st:
            out.append(Check(f"split_rhat/{name}", "unavailable", None, f"< {bound:g}",
                             f"constant ({st['constant']:.4g}): cannot judge", "check what is recorded"))
            continue
        rh, m = st["rhat"], st["chains"]
        ok = rh < bound
        status = "pass" if ok else "fail"
        if st["segmented"]:
            reason = (f"rank-normalised split-R-hat {rh:.4f} over {m} segments of one run x {st['draws']} draws "
                      f"(bulk {st['rhat_bulk']:.4g}, folded {st['rhat_folded']:.4g}): sees drift and changes of "
                      "level or scale along the run, not modes it never visits")
            remedy = "the run is not stationary: discard more burn-in or run longer"
        else:
            reason = (f"rank-normalised split-R-hat {rh:.4f} over {m} chains x {st['draws']} draws (bulk "
                      f"{st['rhat_bulk']:.4g}, folded {st['rhat_folded']:.4g})")
            remedy = "chains disagree (location or scale): run longer or start them closer to the bulk of pi"
            if m < 4:
                status = "warn" if ok else "fail"
                reason += " (fewer than 4 chains: weak test)"
        ess, need = min(st["ess_bulk"], st["ess_tail"]), ev.ess_needed(name)
        if not ok and ess < need:
            # Stationary chains read about 1 + 1/(2 ESS per split half) (Vehtari et al. 2021, hence ESS > 100 per chain)
            expected = 1 + 1 / max(st["ess_bulk"] / st["chains"], 1e-9)
            reason += (f"; only {ess:.0f} effective draws (ArviZ asks {need:g}): R-hat of stationary chains reads "
                       f"about {expected:.3g} here, too few draws to tell drift from noise")
            remedy = f"run about {math.ceil(need / max(ess, 1e-9))}x longer, then judge again"
        out.append(Check(f"split_rhat/{name}", status, rh, f"< {bound:g}", reason, "" if ok else remedy))
        if not st["segmented"]:
            ev.summary.setdefault("ess_multi_chain", {})[name] = st["ess_bulk"]
    if ev.chain_stats:
        ev.summary["chain_statistics"] = {"source": arviz_stats_version(), "tail_prob": list(TAIL_PROB),
                                          "quantities": ev.chain_stats}
    return out


def _temperature(ev: Evidence, name: str, x: float | None, se: float | None, note: str | None = None) -> Check:
    """A temperature in units of :math:`1/\\beta` against 1, explained by the known biases."""
    tol = ev.temperature_tol
    if not _finite(x):
        return Check(name, "unavailable", None, "1 (units of 1/beta)", note or "not measured", "")
    dev, label = abs(x - 1.0), name.replace("_", " ")
    if dev <= tol:
        return Check(name, "pass", x, f"1 +- {tol:g}", f"{label} {x:.3g}/beta"
                     + (f" (+- {se:.2g})" if _finite(se) else "") + (f"; {note}" if note else ""))
    if _finite(se) and dev <= tol + ev.z_max * se:
        return Check(name, "warn", x, f"1 +- {tol:g}",
                     f"{label} {x:.3g}/beta, within {ev.z_max:g} standard errors ({se:.2g}) of the tolerance",
                     "run longer to decide")
    if ev.explanations:
        reason = f"{label} {x:.3g}/beta; " + "; ".join(e for e, _ in ev.explanations)
        remedy = "; ".join(dict.fromkeys(r for _, r in ev.explanations))
    else:
        reason = f"{label} {x:.3g}/beta, not explained by minibatch noise or step size"
        remedy = ("check that the loss is the mean over the batch and that num_data/beta match the data "
                  "(beta = N/T); run longer")
    return Check(name, "fail", x, f"1 +- {tol:g}", reason + (f"; {note}" if note else ""), remedy)


def check_virial_temperature(ev: Evidence) -> list[Check]:
    x, se = ev.virial_temperature, ev.virial_temperature_se
    if x is None and ev.traces.get("virial_temperature", np.zeros(0)).size:
        x, se = _trace_stats(ev.traces["virial_temperature"])
    temps = dict(ev.group_temperatures or {})
    for k, v in ev.traces.items():
        if k.startswith("virial_temperature/") and v.size:
            temps.setdefault(k.split("/", 1)[1], float(v.mean()))
    if temps:
        hottest, coldest = max(temps, key=temps.__getitem__), min(temps, key=temps.__getitem__)
        ev.summary["group_temperatures"] = temps
        ev.summary["hottest_group"] = {"name": hottest, "beta_T": temps[hottest]}
        ev.summary["coldest_group"] = {"name": coldest, "beta_T": temps[coldest]}
    return [_temperature(ev, "virial_temperature", x, se)]


def check_kinetic_temperature(ev: Evidence) -> list[Check]:
    r"""Kinetic chains (BAOAB): :math:`\beta\,p^\top G^{-1}p/d` of the stored momentum, 1 exactly on a
    Gaussian target at any stable step, :math:`1 + O(h^2)` otherwise (nothing to check for overdamped chains)."""
    x = ev.traces.get("kinetic_temperature")
    if x is None or not x.size:
        return []
    mean, se = _trace_stats(x)
    return [_temperature(ev, "kinetic_temperature", mean, se, "momentum before the closing half kick: exact on "
                                                              "Gaussian targets, O(h^2) otherwise")]


def check_noise_ratio(ev: Evidence) -> list[Check]:
    rho, cap = ev.noise_ratio, ev.noise_ratio_max
    if rho is None:
        return [Check("noise_ratio", "unavailable", None, f"<= {cap:g}", ev.noise_ratio_note or NOISE_HOW_TO)]
    ok = rho <= cap
    ev.summary["noise_temperature"] = 1.0 + rho
    return [Check("noise_ratio", "pass" if ok else "fail", rho, f"<= {cap:g}",
                  f"gradient noise adds {rho:.2g} x the Langevin noise: effective temperature {1 + rho:.3g}/beta",
                  "" if ok else "lower the learning rate or raise the batch size")]


def check_config_temperature(ev: Evidence) -> list[Check]:
    return [_temperature(ev, "config_temperature", ev.config_temperature, ev.config_temperature_se,
                         ev.config_temperature_note)]


def check_step_size(ev: Evidence) -> list[Check]:
    e, cap = ev.eta_lambda_max, ev.step_size_max
    if not _finite(e):
        return [Check("eta_lambda_max", "unavailable", None, f"<= {cap:g}",
                      "not measured (needs Hessian-vector products of the loss)")]
    status = "pass" if e <= cap else ("warn" if e <= 1.0 else "fail")
    return [Check("eta_lambda_max", status, e, f"<= {cap:g}",
                  "largest curvature times step size"
                  + ("" if e <= 1 else ": the discretisation is unstable or heavily biased"),
                  "" if status == "pass" else step_remedy(e / cap))]


def check_mean_force(ev: Evidence) -> list[Check]:
    r"""Each coordinate's :math:`t^2` over :math:`m` blocks is :math:`t^2_{m-1}` at stationarity:
    the average has expectation :math:`(m-1)/(m-3)` (3 at :math:`m=4`, 2 at 5, tending to 1)."""
    if ev.mean_force_chi2 is None:
        return [Check("mean_force_chi2", "unavailable", None, "(m-1)/(m-3) for m >= 4 blocks (-> 1)",
                      "needs at least 4 complete blocks")]
    chi2, expected = ev.mean_force_chi2
    m = round((3 * expected - 1) / (expected - 1)) if expected > 1 else None
    ok = _finite(chi2) and chi2 <= 1.5 * expected
    blocks = f"(m-1)/(m-3) = {expected:.3g} for m = {m} blocks" if m else f"{expected:.3g}"
    return [Check("mean_force_chi2", "pass" if ok else "fail", chi2, f"{blocks} (fail above {1.5 * expected:.3g})",
                  "per-coordinate batch-means t^2 of E[grad U] = 0 (Student t, m-1 degrees of freedom)"
                  + ("" if ok else ": the mean force is not zero, the chain drifts (or blocks are shorter than the "
                                   "autocorrelation time)"),
                  "" if ok else "run longer / discard more burn-in")]


def check_gauge(ev: Evidence) -> list[Check]:
    out, relax, z_max = [], dict(ev.gauge_relaxation_steps or {}), ev.z_max
    for name, x in ev.traces.items():
        if not name.startswith("gauge_gap/"):
            continue
        module = name.split("/", 1)[1]
        if x.size < 16:
            out.append(Check(f"gauge/{module}", "unavailable", None, f"|z| <= {z_max:g}",
                             f"only {x.size} recorded steps (need 16 for a standard error)", "run longer"))
            continue
        mean, se = _trace_stats(x)
        z = mean / se if se and se > 0 else (0.0 if mean == 0 else math.inf)
        ok = abs(z) <= z_max
        status = "pass" if ok else "fail"
        reason = f"tr(D_beta)/r - (in - out) = {mean:.3g} +- {se:.2g}" if se else f"mean gap {mean:.3g}"
        rs = relax.get(module)
        if rs is not None and _finite(rs):
            reason += f"; data-free relaxation time 1/(2 lambda eta) = {rs:.0f} steps"
            if ev.steps is not None and ev.steps < 3 * rs:
                reason += f" but only {ev.steps} sampling steps were taken"
                status = "warn" if ok else status
        out.append(Check(f"gauge/{module}", status, z, f"|z| <= {z_max:g}", reason,
                         "" if ok else "the LoRA gauge has not relaxed (rate 2*lambda): run longer or raise "
                                       "weight_decay"))
    return out


def info_poincare(ev: Evidence) -> list[Check]:
    if ev.beta is None or not math.isfinite(ev.beta):
        return []
    tr = ev.traces
    pt = {k: tr[k] for k in STATIONARITY_TRACES if k in tr and tr[k].size >= 8 and tr[k].std() > 0}
    pb = poincare_lower_bounds(beta=ev.beta, lr=ev.lr, traces=pt, weight_decay=ev.weight_decay, thin=ev.thin)
    ev.summary["poincare"] = pb
    if not pb["bounds"]:
        return []
    msg = ", ".join(f"{k} {v:.4g}" for k, v in pb["bounds"].items())
    if "mixing_steps_lower_bound" in pb:
        msg += f"; mixing needs >= {pb['mixing_steps_lower_bound']:.3g} steps"
    return [Check("poincare_lower_bound", "info", pb["max"], "-", msg)]


def info_effective_dimension(ev: Evidence) -> list[Check]:
    if ev.beta is None or not math.isfinite(ev.beta) or ev.traces.get("U", np.zeros(0)).size < 8:
        return []
    d_eff, d_se = effective_dimension(ev.traces["U"], ev.beta)
    ev.summary["effective_dimension"] = {"value": d_eff, "se": d_se}
    return [Check("effective_dimension", "info", d_eff, "-", f"2 beta^2 Var(U), +- {d_se:.2g}")]


CHECKS: tuple[Callable[[Evidence], list[Check]], ...] = (
    check_effective_sample_size, check_geweke, check_split_rhat, check_virial_temperature, check_kinetic_temperature,
    check_noise_ratio,
    check_config_temperature, check_step_size, check_mean_force, check_gauge, info_poincare,
    info_effective_dimension,
)


def stationarity_report(traces: Mapping[str, Any] | None = None, *,
                        checks: Sequence[Callable[[Evidence], list[Check]]] = CHECKS,
                        **evidence: Any) -> StationarityReport:
    r"""Judge whether a chain samples :math:`\pi_\beta`, check by check, with reasons and remedies.

    ``traces`` and the keyword arguments are the fields of :class:`Evidence` (traces, live
    estimates, thresholds); ``checks`` the functions run, in order (default :data:`CHECKS`).
    """
    unknown = sorted(set(evidence) - set(Evidence.__dataclass_fields__) - {"summary"})
    if unknown:
        raise ValueError(f"Invalid argument {unknown[0]!r} of stationarity_report (expected one of "
                         f"{', '.join(f for f in Evidence.__dataclass_fields__ if f != 'summary')})")
    ev = Evidence(traces=dict(traces or {}), **evidence)
    return StationarityReport(checks=[c for check in checks for c in check(ev)], summary=ev.summary,
                              traces=ev.traces)
