"""Write the comparison's outputs: ``results.json``, ``report.md`` and PNG plots.

``results.json`` holds ``{"config": ..., "machine": ..., "columns": REPORT_COLUMNS,
"runs": [row, ...], "summary": [row, ...], "convergence": {seed: ...}}``; every run row has the keys
of :data:`REPORT_COLUMNS`, every summary row (one per method, mean and standard deviation over
seeds) the keys ``method``, ``seeds`` and ``<metric>_mean`` / ``<metric>_std`` for the numeric
columns; ``convergence`` is :func:`recipes.convergence.sample_convergence` per seed.
"""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from recipes.convergence import convergence_sentence

__all__ = ["REPORT_COLUMNS", "NUMERIC_COLUMNS", "summarize", "format_table", "write_report", "machine_info",
           "reliability_curve"]

REPORT_COLUMNS = ("method", "seed", "accuracy", "ece", "nll", "brier", "grad_evals", "val_passes", "wall_time_s",
                  "peak_memory_mb", "num_samples", "beta_virial", "stationarity")
NUMERIC_COLUMNS = ("accuracy", "ece", "nll", "brier", "grad_evals", "val_passes", "wall_time_s", "peak_memory_mb",
                   "beta_virial")
_FORMAT = {"accuracy": "{:.4f}", "ece": "{:.4f}", "nll": "{:.4f}", "brier": "{:.4f}", "grad_evals": "{:.0f}",
           "val_passes": "{:.0f}", "wall_time_s": "{:.1f}", "peak_memory_mb": "{:.0f}", "beta_virial": "{:.2f}"}


def machine_info() -> dict[str, Any]:
    """CPU/GPU, thread count and library versions, recorded with every report."""
    import lightning
    import peft
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation (ddof=1; 0 for one seed) of the numeric columns per method,
    methods in order of first appearance; ``stationarity`` counts the passing seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        s: dict[str, Any] = {"method": method, "seeds": len(rs)}
        for c in NUMERIC_COLUMNS:
            vals = np.array([r[c] for r in rs if r.get(c) is not None and not _isnan(r[c])], dtype=float)
            s[f"{c}_mean"] = float(vals.mean()) if len(vals) else None
            s[f"{c}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else None)
        verdicts = [r.get("stationarity") for r in rs if r.get("stationarity") not in (None, "n/a")]
        s["stationarity"] = f"{sum(v == 'pass' for v in verdicts)}/{len(verdicts)} pass" if verdicts else "n/a"
        out.append(s)
    return out


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _cell(summary: dict[str, Any], col: str) -> str:
    m, sd = summary.get(f"{col}_mean"), summary.get(f"{col}_std")
    if m is None:
        return "–"
    fmt = _FORMAT[col]
    return fmt.format(m) if not sd else f"{fmt.format(m)} ± {fmt.format(sd)}"


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per method, mean ± sd over seeds."""
    head = ["method", "seeds", "accuracy", "ECE (15 bins)", "NLL", "Brier", "grad evals", "val passes",
            "wall time (s)", "β·T_virial", "stationarity"]
    cols = ["accuracy", "ece", "nll", "brier", "grad_evals", "val_passes", "wall_time_s", "beta_virial"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["method"], str(s["seeds"])] + [_cell(s, c) for c in cols] + [s["stationarity"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reliability_curve(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    """Per-bin (mean confidence, accuracy, count) of the top-class confidence, equal-width bins."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf.double(), edges[1:-1].double(), right=False)
    mids, accs, counts = [], [], []
    for b in range(n_bins):
        m = idx == b
        counts.append(int(m.sum()))
        mids.append(float(conf[m].double().mean()) if m.any() else float((edges[b] + edges[b + 1]) / 2))
        accs.append(float(correct[m].mean()) if m.any() else float("nan"))
    return np.array(mids), np.array(accs), np.array(counts)


def _plot_reliability(path: Path, curves: dict[str, tuple[torch.Tensor, torch.Tensor]], n_bins: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4), squeeze=False)
    for ax, (name, (probs, labels)) in zip(axes[0], curves.items()):
        conf, acc, cnt = reliability_curve(probs, labels, n_bins)
        width = 1.0 / n_bins
        centers = (np.arange(n_bins) + 0.5) * width
        ok = cnt > 0
        ax.bar(centers[ok], acc[ok], width=width * 0.9, alpha=0.7, label="accuracy", edgecolor="k")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(conf[ok], acc[ok], "o", ms=3, color="C3", label="mean confidence")
        ax.set(title=name, xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_traces(path: Path, traces: dict[str, dict[str, list[float]]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, tr in traces.items():
        if tr.get("train_loss"):
            axes[0].plot(tr["train_loss"], lw=0.8, label=name)
        if tr.get("virial"):
            vals = np.asarray(tr["virial"])
            axes[1].plot(vals, lw=0.6, alpha=0.6, label=f"{name} (per step)")
            k = max(1, len(vals) // 20)
            if len(vals) >= k:
                run = np.convolve(vals, np.ones(k) / k, mode="valid")
                axes[1].plot(np.arange(k - 1, len(vals)), run, lw=1.5, label=f"{name} (moving mean, {k})")
    axes[0].set(title="training loss (minibatch)", xlabel="optimizer step", ylabel="cross-entropy", yscale="log")
    axes[1].axhline(1.0, color="k", ls="--", lw=1, label="Gibbs value")
    axes[1].set(title="centred virial temperature × β", xlabel="sampling step", ylabel="β·T_virial")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_convergence(path: Path, convergence: dict[Any, dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for seed, c in convergence.items():
        curve = c["running_val_nll"]
        ax.plot(np.arange(1, len(curve) + 1), curve, "o-", ms=3, lw=1, label=f"seed {seed}")
    ax.set(title="posterior average: validation NLL", xlabel="samples averaged", ylabel="validation NLL")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def convergence_lines(convergence: dict[Any, dict[str, Any]]) -> list[str]:
    """The report's "Enough samples?" section (markdown lines)."""
    if not convergence:
        return []
    lines = ["## Enough samples?", "",
             "Validation NLL of the running posterior average after m samples, the effective sample size of the "
             "per-sample validation log-likelihood, and Δ = NLL(all S samples) − NLL(first S/2) with its standard "
             "error over validation examples: |Δ| > se means the last half of the samples still moved the "
             "predictions (sample longer); otherwise the average has settled at the resolution of the validation "
             "set.", "", "| seed | m=1 | m=S/4 | m=S/2 | m=S | S | ESS | Δ | se | verdict |", "|" + "---|" * 10]
    for seed, c in convergence.items():
        curve, S = c["running_val_nll"], c["num_samples"]
        pick = [curve[max(0, m - 1)] for m in (1, max(1, S // 4), max(1, S // 2), S)]
        fmt = (lambda v, f="{:.4f}": "–" if v is None else f.format(v))
        verdict = {True: "settled", False: "still moving: sample longer", None: "too few samples"}[c["converged"]]
        lines.append(f"| {seed} | " + " | ".join(f"{v:.4f}" for v in pick) + f" | {S} | {fmt(c['ess'], '{:.1f}')} | "
                     f"{fmt(c['delta'], '{:+.5f}')} | {fmt(c['delta_se'], '{:.5f}')} | {verdict} |")
    lines.append("")
    lines += [f"- seed {seed}: {convergence_sentence(c)}" for seed, c in convergence.items()]
    return lines + [""]


def stationarity_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's "Chain statistics" section (markdown lines): per Langevin seed, the whole chain's
    rank-normalised split-R-hat of each trace and its bulk/tail ESS (arviz-stats), from ``row["diagnostics"]``."""
    seen, picked = set(), []
    for r in rows:
        d = r.get("diagnostics")
        if d and r.get("seed") not in seen and str(r.get("method", "")).startswith("langevin"):
            seen.add(r.get("seed"))
            picked.append((r.get("seed"), d))
    if not picked:
        return []
    names = sorted({k for _, d in picked for k in d if k.startswith("split_rhat/")})

    def fmt(c: dict[str, Any] | None, f: str) -> str:
        if not c or c.get("value") is None:
            return "–"
        return f.format(c["value"]) + ("" if c["status"] == "pass" else f" ({c['status']})")

    lines = ["## Chain statistics", "",
             "The whole sampling run's traces, cut into 4 segments that serve as chains (arviz-stats, Vehtari et al. "
             "2021): rank-normalised split-R-hat (the larger of bulk and folded; ArviZ asks < 1.01) and the smaller of "
             "bulk and tail ESS (ArviZ asks > 100 per chain, 400 here). The per-quantity table with MCSEs is in "
             "`seed*/langevin/stationarity_report.md`.", "",
             "| seed | " + " | ".join(f"R-hat {n.split('/', 1)[1]}" for n in names) + " | ESS min(bulk, tail) |",
             "|" + "---|" * (len(names) + 2)]
    for seed, d in picked:
        lines.append(f"| {seed} | " + " | ".join(fmt(d.get(n), "{:.4f}") for n in names)
                     + f" | {fmt(d.get('effective_sample_size'), '{:.0f}')} |")
    return lines + [""]


def write_report(out_dir: str | Path, rows: list[dict[str, Any]], *, config: dict[str, Any],
                 predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 traces: dict[str, dict[str, list[float]]] | None = None,
                 convergence: dict[Any, dict[str, Any]] | None = None, n_bins: int = 15,
                 command: str | None = None, notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``reliability.png`` (one diagram per arm),
    ``diagnostics.png`` and ``convergence.png`` (the PNGs when predictions/traces/convergence are
    given) into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        missing = [c for c in REPORT_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"Invalid rows: missing columns {missing}")
    summary = summarize(rows)
    machine = machine_info()
    paths = {"results": out / "results.json", "report": out / "report.md"}
    payload = {"config": config, "machine": machine, "columns": list(REPORT_COLUMNS),
               "runs": [{c: r[c] for c in REPORT_COLUMNS} | {k: v for k, v in r.items() if k not in REPORT_COLUMNS}
                        for r in rows],
               "summary": summary, "convergence": {str(k): v for k, v in (convergence or {}).items()}}
    paths["results"].write_text(json.dumps(payload, indent=2, default=str))
    if predictions:
        paths["reliability"] = out / "reliability.png"
        _plot_reliability(paths["reliability"], predictions, n_bins)
    if traces:
        paths["diagnostics"] = out / "diagnostics.png"
        _plot_traces(paths["diagnostics"], traces)
    if convergence:
        paths["convergence"] = out / "convergence.png"
        _plot_convergence(paths["convergence"], convergence)
    md = ["# AdamW LoRA, its cheap fixes, and Langevin LoRA", ""]
    if command:
        md += ["Command:", "", f"    {command}", ""]
    md += [f"Machine: {machine['processor']}, {machine.get('gpu', 'no GPU')}, torch {machine['torch']}, "
           f"{machine['torch_threads']} threads.", "",
           f"Held-out test metrics, mean ± sd over seeds (ECE with {n_bins} equal-width bins; NLL and Brier "
           "of the predictive probabilities; Langevin LoRA predicts with the average of the softmax over "
           "its posterior samples). grad evals: minibatch forward+backward passes the arm needed (a validation "
           "pass counts n_val/batch_size); wall time excludes the test predictions.", "", format_table(summary), "",
           *convergence_lines(convergence or {}), *stationarity_lines(rows), "## Per seed", "",
           "| " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * len(REPORT_COLUMNS)]
    for r in rows:
        cells = [(_FORMAT[c].format(r[c]) if c in _FORMAT and isinstance(r[c], (int, float)) else str(r[c]))
                 for c in REPORT_COLUMNS]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "## How to read this", "",
           "- **arms**: `adamw` = final AdamW weights; `adamw_best` = the AdamW checkpoint with the best validation "
           "NLL; `adamw_ts` = `adamw` with a temperature fitted on validation; `langevin` = posterior average of "
           "the Langevin samples; `langevin_ts` = the same with a temperature fitted on validation.",
           "- **accuracy**: higher is better; Langevin LoRA should match AdamW LoRA within noise.",
           "- **ECE**: expected calibration error, |accuracy − confidence| averaged over confidence bins; "
           "lower is better. **NLL** (log loss) and **Brier** are proper scores: lower is better; they "
           "reward calibrated uncertainty and punish confident mistakes.",
           "- **β·T_virial**: centred virial temperature times β = N/T (THEORY §3). At stationarity it is "
           "1, inflated to about 1 + ρ by minibatch-gradient noise. Well below 1: the chain has not yet "
           "heated up to its temperature (sample longer); above 1 + ρ: the step is too large (lower lr).",
           "- **stationarity**: the verdict of the diagnostics on the part of the chain the samples were kept "
           "from (`pass`: R-hat < 1.01 and bulk/tail ESS > 400 over 4 segments, no drift, right temperature); the "
           "whole-chain report is in `seed*/langevin/`.",
           "- Reliability diagrams: bars on the diagonal are calibrated; bars below it are over-confident."]
    if paths.get("reliability"):
        md += ["", "![reliability](reliability.png)"]
    if paths.get("diagnostics"):
        md += ["", "![diagnostics](diagnostics.png)"]
    if paths.get("convergence"):
        md += ["", "![convergence](convergence.png)"]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    paths["report"].write_text("\n".join(md) + "\n")
    return paths
