r"""The stationarity report: one verdict per check, with the reason and the remedy.

:func:`stationarity_report` turns traces recorded along a chain (by
:class:`~langevin_lora.diagnostics.GibbsDiagnostics` or by hand) and live estimates into a
:class:`StationarityReport`, printable, and savable as JSON, Markdown and PNG plots.

Order of judgement (THEORY §3): effective sample size first (nothing else is meaningful below
about 100), then stationarity of the traces (Geweke, split-:math:`\hat R`), then the Gibbs
identities (virial and configurational temperatures at :math:`1/\beta`, mean force 0, gauge
identity), whose deviations are explained by the known biases where they apply (minibatch noise
:math:`1+\rho`, step size :math:`\eta\lambda_{\max}`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from langevin_lora._validation import check_positive, check_real
from langevin_lora.diagnostics.chains import (
    autocorrelation,
    batch_means_se,
    effective_dimension,
    effective_sample_size,
    geweke_z,
    integrated_autocorr_time,
    poincare_lower_bounds,
    split_rhat,
)

__all__ = ["Check", "StationarityReport", "stationarity_report", "STATIONARITY_TRACES"]

STATUSES = ("pass", "warn", "fail", "unavailable", "info")
# Scalar traces whose drift (Geweke) means non-stationarity, in order of preference for the ESS.
STATIONARITY_TRACES = ("virial_temperature", "U", "theta_sq", "gauge_gap")
NOISE_HOW_TO = ("rho needs two independent gradient estimates: train with accumulate_grad_batches >= 2 "
                "or pass split_batch=... to GibbsDiagnostics")


@dataclass
class Check:
    """One verdict: ``status`` is ``pass``, ``warn``, ``fail``, ``unavailable`` or ``info``."""

    name: str
    status: str
    value: float | None
    expected: str
    reason: str
    remedy: str = ""

    def line(self) -> str:
        v = "-" if self.value is None else _fmt(self.value)
        out = f"[{self.status.upper():>11}] {self.name}: {v} (expected {self.expected}). {self.reason}"
        return out + (f" Remedy: {self.remedy}" if self.remedy else "")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(float(x))


@dataclass
class StationarityReport:
    """Verdicts plus the numbers behind them. ``verdict`` is the worst status among the checks."""

    checks: list[Check]
    summary: dict[str, Any] = field(default_factory=dict)
    traces: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def verdict(self) -> str:
        statuses = {c.status for c in self.checks}
        for s in ("fail", "warn"):
            if s in statuses:
                return s
        return "pass"

    def by_name(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; have {[c.name for c in self.checks]}")

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "checks": [asdict(c) for c in self.checks],
                "summary": _jsonable(self.summary)}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, **kwargs)

    def to_markdown(self) -> str:
        lines = ["# Gibbs stationarity report", "", f"**Verdict: {self.verdict.upper()}**", "",
                 "| check | status | value | expected | reason | remedy |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            cells = [c.name, c.status, _fmt(c.value), c.expected, c.reason, c.remedy]
            lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
        if self.summary:
            lines += ["", "## Summary", ""]
            for k, v in _jsonable(self.summary).items():
                lines.append(f"- `{k}`: {json.dumps(v) if not isinstance(v, str) else v}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        head = f"Gibbs stationarity report: {self.verdict.upper()}"
        return "\n".join([head, "-" * len(head)] + [c.line() for c in self.checks])

    def save(self, directory: str | Path, *, stem: str = "stationarity_report", plots: bool = True) -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and (with ``plots``) PNG figures into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {"json": d / f"{stem}.json", "markdown": d / f"{stem}.md"}
        paths["json"].write_text(self.to_json())
        paths["markdown"].write_text(self.to_markdown())
        if plots:
            paths.update(self.plot(d, stem=stem))
        return paths

    def plot(self, directory: str | Path, *, stem: str = "stationarity_report") -> dict[str, Path]:
        """PNG figures: traces, autocorrelations, per-group/module temperatures, gauge gaps."""
        from matplotlib.figure import Figure  # no pyplot: works under any backend, no global state

        d = Path(directory)
        out: dict[str, Path] = {}
        main = {k: v for k, v in self.traces.items() if "/" not in k and np.asarray(v).size >= 2}
        if main:
            fig = Figure(figsize=(8, 2.2 * len(main)))
            for i, (k, v) in enumerate(main.items()):
                ax = fig.add_subplot(len(main), 1, i + 1)
                ax.plot(np.asarray(v), lw=0.7)
                if k == "virial_temperature":
                    ax.axhline(1.0, color="k", ls="--", lw=0.8)
                ax.set_ylabel(k)
            fig.axes[-1].set_xlabel("recorded sampling step")
            fig.tight_layout()
            out["traces_png"] = d / f"{stem}_traces.png"
            fig.savefig(out["traces_png"], dpi=90)

            fig = Figure(figsize=(7, 4))
            ax = fig.add_subplot(1, 1, 1)
            for k, v in main.items():
                v = np.asarray(v, dtype=float)
                if v.size >= 8 and np.all(np.isfinite(v)) and v.std() > 0:
                    rho = autocorrelation(v, max_lag=min(v.size - 1, 200))
                    ax.plot(rho, label=k)
            ax.axhline(0.0, color="k", lw=0.6)
            ax.set_xlabel("lag (recorded steps)")
            ax.set_ylabel("autocorrelation")
            ax.legend(fontsize=7)
            fig.tight_layout()
            out["autocorrelation_png"] = d / f"{stem}_autocorrelation.png"
            fig.savefig(out["autocorrelation_png"], dpi=90)

        temps = self.summary.get("group_temperatures") or {}
        if temps:
            names = list(temps)
            fig = Figure(figsize=(max(5, 0.45 * len(names) + 2), 4))
            ax = fig.add_subplot(1, 1, 1)
            ax.bar(range(len(names)), [temps[n] for n in names])
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=70, fontsize=6)
            ax.set_ylabel("beta * T_virial")
            fig.tight_layout()
            out["temperatures_png"] = d / f"{stem}_temperatures.png"
            fig.savefig(out["temperatures_png"], dpi=90)

        gauge = {k.split("/", 1)[1]: v for k, v in self.traces.items() if k.startswith("gauge_gap/")}
        if gauge:
            fig = Figure(figsize=(8, 4))
            ax = fig.add_subplot(1, 1, 1)
            for k, v in gauge.items():
                ax.plot(np.asarray(v), lw=0.6, label=k)
            ax.axhline(0.0, color="k", ls="--", lw=0.8)
            ax.set_ylabel("tr(D_beta)/r - (in - out)")
            ax.set_xlabel("recorded sampling step")
            if len(gauge) <= 12:
                ax.legend(fontsize=5)
            fig.tight_layout()
            out["gauge_png"] = d / f"{stem}_gauge.png"
            fig.savefig(out["gauge_png"], dpi=90)
        return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _trace_stats(x: np.ndarray) -> tuple[float, float | None]:
    mean = float(x.mean())
    if x.size < 16:
        return mean, None
    return mean, batch_means_se(x)


def stationarity_report(
    traces: Mapping[str, Any] | None = None,
    *,
    chains: Mapping[str, Any] | None = None,
    beta: float | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    virial_temperature: float | None = None,
    virial_temperature_se: float | None = None,
    group_temperatures: Mapping[str, float] | None = None,
    noise_ratio: float | None = None,
    noise_ratio_note: str | None = None,
    config_temperature: float | None = None,
    config_temperature_se: float | None = None,
    config_temperature_note: str | None = None,
    eta_lambda_max: float | None = None,
    mean_force_chi2: tuple[float, float] | None = None,
    gauge_relaxation_steps: Mapping[str, float] | None = None,
    steps: int | None = None,
    thin: int = 1,
    temperature_tol: float = 0.1,
    noise_ratio_max: float = 0.1,
    step_size_max: float = 0.1,
    ess_min: float = 100.0,
    geweke_max: float = 3.0,
    z_max: float = 4.5,
) -> StationarityReport:
    r"""Judge whether a chain samples :math:`\pi_\beta`, check by check, with reasons and remedies.

    Args:
        traces: per-step scalar traces (1-d arrays), recorded while sampling. Recognised names:
            ``virial_temperature`` (:math:`\beta T_{\mathrm{vir}}` per step), ``U`` (potential),
            ``theta_sq`` (:math:`\lVert\theta\rVert^2`), ``gauge_gap`` and ``gauge_gap/<module>``
            (:func:`~langevin_lora.diagnostics.functional.gauge_gap`), ``virial_temperature/<name>``
            per group or module. Others are plotted and Geweke-tested too.
        chains: name -> ``(chains, draws)`` arrays from independent seeds, for split-:math:`\hat R`.
        beta, lr, weight_decay: the (LoRA) group's :math:`\beta`, :math:`\eta`, :math:`\lambda`,
            for the Poincaré bounds and the effective dimension.
        virial_temperature, virial_temperature_se: :math:`\beta T_{\mathrm{vir}}` and its standard
            error (default: from the ``virial_temperature`` trace, batch means).
        group_temperatures: :math:`\beta T_{\mathrm{vir}}` per group/module (default: trace means).
        noise_ratio: :math:`\rho`, or ``None`` when unavailable (``noise_ratio_note`` says why).
        config_temperature, config_temperature_se, config_temperature_note: :math:`\beta T_{\mathrm{conf}}`.
        eta_lambda_max: :math:`\eta\lambda_{\max}` of the (preconditioned) Hessian of :math:`U`.
        mean_force_chi2: ``(chi2_per_dof, expected)`` from
            :func:`~langevin_lora.diagnostics.functional.mean_force_chi2`.
        gauge_relaxation_steps: module -> :math:`1/(2\lambda\eta)`, the data-free gauge relaxation
            time in steps (with ``steps``, the number of sampling steps taken).
        thin: steps between recorded trace entries.
        temperature_tol: accepted :math:`|\beta T - 1|` (default 0.1).
        noise_ratio_max, step_size_max: gates on :math:`\rho` and :math:`\eta\lambda_{\max}` (0.1).
        ess_min, geweke_max, z_max: ESS needed before judging; Geweke :math:`|z|` bound; z bound of
            the identities tested against their standard errors.
    """
    temperature_tol = check_real("temperature_tol", temperature_tol, low=0.0, low_open=True)
    noise_ratio_max = check_positive("noise_ratio_max", noise_ratio_max)
    step_size_max = check_positive("step_size_max", step_size_max)
    ess_min = check_positive("ess_min", ess_min)
    geweke_max = check_positive("geweke_max", geweke_max)
    z_max = check_positive("z_max", z_max)
    tr = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in (traces or {}).items()}
    tr = {k: v[np.isfinite(v)] for k, v in tr.items()}
    checks: list[Check] = []
    summary: dict[str, Any] = {}
    if steps is not None:
        summary["sampling_steps"] = int(steps)

    # 1. Effective sample size of the main trace.
    main_name = next((k for k in STATIONARITY_TRACES if k in tr and tr[k].size >= 8), None)
    ess_ok = True
    if main_name is None:
        checks.append(Check("effective_sample_size", "unavailable", None, f">= {ess_min:g}",
                            "no trace of at least 8 recorded steps", "record more sampling steps"))
        ess_ok = False
    else:
        x = tr[main_name]
        tau = integrated_autocorr_time(x) if x.std() > 0 else 1.0
        ess = x.size / tau
        summary["tau_int"] = {main_name: tau * thin}
        ess_ok = ess >= ess_min
        checks.append(Check(
            "effective_sample_size", "pass" if ess_ok else "fail", ess, f">= {ess_min:g}",
            f"{main_name}: {x.size} recorded steps, integrated autocorrelation time {tau * thin:.3g} steps",
            "" if ess_ok else f"run about {math.ceil(ess_min / max(ess, 1e-9) * x.size * thin)} steps in total "
                              "before judging the other checks"))

    # 2. Stationarity of traces (Geweke).
    drifting: list[str] = []
    for name, x in tr.items():
        if "/" in name or x.size < 40 or x.std() == 0:
            continue
        z = geweke_z(x)
        ok = abs(z) < geweke_max
        if not ok:
            drifting.append(name)
        checks.append(Check(
            f"geweke/{name}", "pass" if ok else "fail", z, f"|z| < {geweke_max:g}",
            f"first 10% vs last 50% of the {name} trace" + ("" if ok else ": it drifts, the chain is still relaxing"),
            "" if ok else "discard the drifting start as burn-in (start sampling later) or run longer"))

    # 3. Between-chain agreement.
    for name, arr in (chains or {}).items():
        a = np.asarray(arr, dtype=np.float64)
        m = a.shape[0] if a.ndim == 2 else 1
        rh = split_rhat(a)
        bound = 1.01 if m > 4 else 1.05
        ok = rh < bound
        status = "pass" if ok else "fail"
        reason = f"{m} chains x {a.shape[-1]} draws"
        if m < 4:
            status = "warn" if ok else "fail"
            reason += " (fewer than 4 chains: weak test)"
        checks.append(Check(f"split_rhat/{name}", status, rh, f"< {bound}", reason,
                            "" if ok else "chains disagree: run longer or start them closer to the bulk of pi"))
        summary.setdefault("ess_multi_chain", {})[name] = effective_sample_size(a)

    # Known biases, used to explain temperature deviations.
    explanations: list[tuple[str, str]] = []
    if _finite(noise_ratio) and noise_ratio > noise_ratio_max:
        explanations.append((f"minibatch noise ratio {noise_ratio:.2f} > {noise_ratio_max:g} "
                             f"(predicts {1 + noise_ratio:.2f}/beta)",
                             "lower the learning rate or raise the batch size"))
    if _finite(eta_lambda_max) and eta_lambda_max > step_size_max:
        explanations.append((f"step size eta*lambda_max = {eta_lambda_max:.2g} > {step_size_max:g}",
                             "lower the learning rate"))
    if drifting or not ess_ok:
        explanations.append(("the traces are not stationary yet" if drifting else "too few effective samples",
                             "run longer / discard more burn-in"))

    def temperature_check(name: str, x: float | None, se: float | None, note: str | None = None) -> None:
        if not _finite(x):
            checks.append(Check(name, "unavailable", None, "1 (units of 1/beta)", note or "not measured", ""))
            return
        dev = abs(x - 1.0)
        label = name.replace("_", " ")
        if dev <= temperature_tol:
            checks.append(Check(name, "pass", x, f"1 +- {temperature_tol:g}",
                                f"{label} {x:.3g}/beta" + (f" (+- {se:.2g})" if _finite(se) else "")
                                + (f"; {note}" if note else "")))
            return
        significant = not _finite(se) or dev > temperature_tol + z_max * se
        if not significant:
            checks.append(Check(name, "warn", x, f"1 +- {temperature_tol:g}",
                                f"{label} {x:.3g}/beta, within {z_max:g} standard errors ({se:.2g}) of the tolerance",
                                "run longer to decide"))
            return
        if explanations:
            reason = f"{label} {x:.3g}/beta; " + "; ".join(e for e, _ in explanations)
            remedy = "; ".join(dict.fromkeys(r for _, r in explanations))
        else:
            reason = f"{label} {x:.3g}/beta, not explained by minibatch noise or step size"
            remedy = ("check that the loss is the mean over the batch and that num_data/beta match the data "
                      "(beta = N/T); run longer")
        if note:
            reason += f"; {note}"
        checks.append(Check(name, "fail", x, f"1 +- {temperature_tol:g}", reason, remedy))

    # 4. Virial temperature, global and per group/module.
    if virial_temperature is None and "virial_temperature" in tr and tr["virial_temperature"].size:
        virial_temperature, virial_temperature_se = _trace_stats(tr["virial_temperature"])
    temperature_check("virial_temperature", virial_temperature, virial_temperature_se)
    temps = dict(group_temperatures or {})
    for k, v in tr.items():
        if k.startswith("virial_temperature/") and v.size:
            temps.setdefault(k.split("/", 1)[1], float(v.mean()))
    if temps:
        summary["group_temperatures"] = temps
        worst = max(temps, key=lambda n: abs(temps[n] - 1))
        summary["hottest_group"] = {"name": worst, "beta_T": temps[worst]}

    # 5. Minibatch noise ratio.
    if noise_ratio is None:
        checks.append(Check("noise_ratio", "unavailable", None, f"<= {noise_ratio_max:g}", noise_ratio_note or NOISE_HOW_TO))
    else:
        ok = noise_ratio <= noise_ratio_max
        summary["noise_temperature"] = 1.0 + noise_ratio
        checks.append(Check(
            "noise_ratio", "pass" if ok else "fail", noise_ratio, f"<= {noise_ratio_max:g}",
            f"gradient noise adds {noise_ratio:.2g} x the Langevin noise: effective temperature "
            f"{1 + noise_ratio:.3g}/beta", "" if ok else "lower the learning rate or raise the batch size"))

    # 6. Configurational temperature.
    temperature_check("config_temperature", config_temperature, config_temperature_se, config_temperature_note)

    # 7. Step size.
    if not _finite(eta_lambda_max):
        checks.append(Check("eta_lambda_max", "unavailable", None, f"<= {step_size_max:g}",
                            "not measured (needs Hessian-vector products of the loss)"))
    else:
        e = eta_lambda_max
        status = "pass" if e <= step_size_max else ("warn" if e <= 1.0 else "fail")
        remedy = ""
        if status != "pass":
            remedy = f"lower the learning rate by a factor of about {e / step_size_max:.2g}"
        checks.append(Check("eta_lambda_max", status, e, f"<= {step_size_max:g}",
                            "largest curvature times step size" + ("" if e <= 1 else
                                                                   ": the discretisation is unstable or heavily biased"),
                            remedy))

    # 8. Mean force.
    if mean_force_chi2 is not None:
        chi2, expected = mean_force_chi2
        ok = _finite(chi2) and chi2 <= 1.5 * expected
        checks.append(Check("mean_force_chi2", "pass" if ok else "fail", chi2, f"~{expected:.3g} (<= {1.5 * expected:.3g})",
                            "per-coordinate batch-means z-scores of E[grad U] = 0" +
                            ("" if ok else ": the mean force is not zero, the chain drifts (or blocks are shorter "
                                           "than the autocorrelation time)"),
                            "" if ok else "run longer / discard more burn-in"))
    else:
        checks.append(Check("mean_force_chi2", "unavailable", None, "~1", "needs at least 4 complete blocks"))

    # 9. Gauge identity per LoRA module.
    relax = dict(gauge_relaxation_steps or {})
    for name, x in tr.items():
        if not name.startswith("gauge_gap/"):
            continue
        module = name.split("/", 1)[1]
        if x.size < 16:
            checks.append(Check(f"gauge/{module}", "unavailable", None, f"|z| <= {z_max:g}",
                                f"only {x.size} recorded steps (need 16 for a standard error)", "run longer"))
            continue
        mean, se = _trace_stats(x)
        z = mean / se if se and se > 0 else (0.0 if mean == 0 else math.inf)
        ok = abs(z) <= z_max
        reason = f"tr(D_beta)/r - (in - out) = {mean:.3g} +- {se:.2g}" if se else f"mean gap {mean:.3g}"
        rs = relax.get(module)
        remedy = ""
        status = "pass" if ok else "fail"
        if rs is not None and _finite(rs):
            reason += f"; data-free relaxation time 1/(2 lambda eta) = {rs:.0f} steps"
            if steps is not None and steps < 3 * rs:
                reason += f" but only {steps} sampling steps were taken"
                if ok:
                    status = "warn"
        if not ok:
            remedy = "the LoRA gauge has not relaxed (rate 2*lambda): run longer or raise weight_decay"
        checks.append(Check(f"gauge/{module}", status, z, f"|z| <= {z_max:g}", reason, remedy))

    # 10. Informational: Poincaré lower bounds and effective dimension.
    if beta is not None and math.isfinite(beta):
        pt = {k: tr[k] for k in STATIONARITY_TRACES if k in tr and tr[k].size >= 8 and tr[k].std() > 0}
        pb = poincare_lower_bounds(beta=beta, lr=lr, traces=pt, weight_decay=weight_decay, thin=thin)
        summary["poincare"] = pb
        if pb["bounds"]:
            msg = ", ".join(f"{k} {_fmt(v)}" for k, v in pb["bounds"].items())
            if "mixing_steps_lower_bound" in pb:
                msg += f"; mixing needs >= {pb['mixing_steps_lower_bound']:.3g} steps"
            checks.append(Check("poincare_lower_bound", "info", pb["max"], "-", msg))
        if "U" in tr and tr["U"].size >= 8:
            d_eff, d_se = effective_dimension(tr["U"], beta)
            summary["effective_dimension"] = {"value": d_eff, "se": d_se}
            checks.append(Check("effective_dimension", "info", d_eff, "-", f"2 beta^2 Var(U), +- {d_se:.2g}"))
    return StationarityReport(checks=checks, summary=summary, traces=tr)
