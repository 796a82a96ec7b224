r"""PNG figures of a :class:`~langevin_lora.diagnostics.StationarityReport`, readable at their saved size.

- ``traces``: one panel per scalar trace (the :math:`\beta T_{\mathrm{vir}}` panel with its target 1);
- ``autocorrelation``: one panel per trace, so traces with the same autocorrelation (e.g.
  ``virial_temperature`` and ``virial_temperature_raw``, equal up to the factor :math:`\beta`) stay
  visible;
- ``temperatures``: :math:`\beta T_{\mathrm{vir}}` per group/module as horizontal bars, one row per
  name;
- ``gauge``: the gauge gap of every LoRA module along the chain, and its mean :math:`\pm 2` standard
  errors per module, named on the axis (no legend to squint at).

Every text is at least :data:`MIN_FONT` points, and figures grow with the number of panels or names.
Only :class:`matplotlib.figure.Figure` is used (no pyplot): any backend, no global state.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from langevin_lora.diagnostics.chains import autocorrelation, batch_means_se

__all__ = ["trace_figure", "autocorrelation_figure", "temperature_figure", "gauge_figure", "save_figures",
           "MIN_FONT", "DPI"]

MIN_FONT = 9
DPI = 100
_STYLE = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": MIN_FONT,
          "ytick.labelsize": MIN_FONT, "legend.fontsize": MIN_FONT}


def _figure(width: float, height: float) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height))
    return fig


def _style(fig: Any) -> Any:
    """Apply the minimum font size to every text of ``fig`` (ticks included) and lay it out."""
    for ax in fig.axes:
        for label in ax.get_xticklabels() + ax.get_yticklabels():
            label.set_fontsize(max(label.get_fontsize(), MIN_FONT))
        ax.title.set_fontsize(max(ax.title.get_fontsize(), MIN_FONT + 1))
        for axis_label in (ax.xaxis.label, ax.yaxis.label):
            axis_label.set_fontsize(max(axis_label.get_fontsize(), MIN_FONT + 1))
    fig.tight_layout()
    return fig


def _scalar_traces(traces: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=float) for k, v in traces.items() if "/" not in k and np.asarray(v).size >= 2}


def trace_figure(traces: Mapping[str, Any]) -> Any | None:
    main = _scalar_traces(traces)
    if not main:
        return None
    fig = _figure(8, 1.9 * len(main) + 0.6)
    for i, (k, v) in enumerate(main.items()):
        ax = fig.add_subplot(len(main), 1, i + 1)
        ax.plot(v, lw=0.7)
        if k == "virial_temperature":
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_title(k, loc="left")
    fig.axes[-1].set_xlabel("recorded sampling step")
    return _style(fig)


def autocorrelation_figure(traces: Mapping[str, Any], max_lag: int = 200) -> Any | None:
    main = {k: v for k, v in _scalar_traces(traces).items() if v.size >= 8 and np.all(np.isfinite(v)) and v.std() > 0}
    if not main:
        return None
    cols = 2 if len(main) > 1 else 1
    rows = math.ceil(len(main) / cols)
    fig = _figure(4.2 * cols, 2.3 * rows + 0.4)
    for i, (k, v) in enumerate(main.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(autocorrelation(v, max_lag=min(v.size - 1, max_lag)), lw=0.9, color=f"C{i % 10}")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_ylim(-0.5, 1.05)
        ax.set_title(k, loc="left")
        ax.set_xlabel("lag (recorded steps)")
    return _style(fig)


def _barh(ax: Any, names: list[str], values: list[float], errors: list[float] | None = None) -> None:
    y = np.arange(len(names))
    ax.barh(y, values, xerr=errors, color=[f"C{i % 10}" for i in range(len(names))], capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.invert_yaxis()


def _name_width(names: list[str]) -> float:
    """Inches the longest name takes at the tick font size (about 0.6 em per character)."""
    return 0.6 * MIN_FONT / 72 * max(len(n) for n in names)


def temperature_figure(temps: Mapping[str, float]) -> Any | None:
    if not temps:
        return None
    names = list(temps)
    fig = _figure(4.5 + _name_width(names), 0.32 * len(names) + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    _barh(ax, names, [temps[n] for n in names])
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("beta * T_virial (1 at stationarity)")
    return _style(fig)


def gauge_figure(traces: Mapping[str, Any]) -> Any | None:
    gauge = {k.split("/", 1)[1]: np.asarray(v, dtype=float) for k, v in traces.items() if k.startswith("gauge_gap/")}
    gauge = {k: v[np.isfinite(v)] for k, v in gauge.items() if np.isfinite(v).sum() >= 2}
    if not gauge:
        return None
    names = list(gauge)
    fig = _figure(8.5 + _name_width(names), max(3.5, 0.32 * len(names) + 1.2))
    left = fig.add_subplot(1, 2, 1)
    for i, v in enumerate(gauge.values()):
        left.plot(v, lw=0.6, color=f"C{i % 10}")
    left.axhline(0.0, color="k", ls="--", lw=0.8)
    left.set_ylabel("tr(D_beta)/r - (in - out)")
    left.set_xlabel("recorded sampling step")
    right = fig.add_subplot(1, 2, 2)
    means = [float(v.mean()) for v in gauge.values()]
    errs = [2 * batch_means_se(v) if v.size >= 16 else 0.0 for v in gauge.values()]
    _barh(right, names, means, errs)
    right.axvline(0.0, color="k", ls="--", lw=0.8)
    right.set_xlabel("mean gap +- 2 se (0 at stationarity)")
    return _style(fig)


def save_figures(report: Any, directory: str | Path, *, stem: str = "stationarity_report") -> dict[str, Path]:
    """Write the figures of ``report`` that have data as ``<stem>_<kind>.png``; returns their paths."""
    d = Path(directory)
    figures = {"traces_png": trace_figure(report.traces), "autocorrelation_png": autocorrelation_figure(report.traces),
               "temperatures_png": temperature_figure(report.summary.get("group_temperatures") or {}),
               "gauge_png": gauge_figure(report.traces)}
    out = {}
    for key, fig in figures.items():
        if fig is not None:
            out[key] = d / f"{stem}_{key[:-4]}.png"
            fig.savefig(out[key], dpi=DPI)
    return out
