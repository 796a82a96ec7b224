r"""The stationarity report: one :class:`Check` per verdict, with the reason and the remedy.

:func:`~langevin_lora.diagnostics.checks.stationarity_report` (a list of small check functions)
turns traces recorded along a chain (by
:class:`~langevin_lora.diagnostics.GibbsDiagnostics` or by hand) and live estimates into a
:class:`StationarityReport`, printable, and savable as JSON, Markdown and PNG plots
(:mod:`langevin_lora.diagnostics.plots`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["Check", "StationarityReport", "STATUSES", "NOISE_HOW_TO"]

STATUSES = ("pass", "warn", "fail", "unavailable", "info")
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
        v = "-" if self.value is None else fmt(self.value)
        out = f"[{self.status.upper():>11}] {self.name}: {v} (expected {self.expected}). {self.reason}"
        return out + (f" Remedy: {self.remedy}" if self.remedy else "")


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


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
            cells = [c.name, c.status, fmt(c.value), c.expected, c.reason, c.remedy]
            lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
        stats = self.summary.get("chain_statistics")
        if stats:
            lines += ["", f"## Chain statistics ({stats['source']})", "",
                      "R-hat: rank-normalised split-R-hat, the larger of bulk and folded (ArviZ: < 1.01); ESS: "
                      "bulk and "
                      f"tail (quantiles {stats['tail_prob'][0]:g}, {stats['tail_prob'][1]:g}), all chains together "
                      "(ArviZ: > 100 per chain); MCSE: Monte Carlo standard error. One run is cut into segments that "
                      "serve as chains.", ""]
            lines += ["| quantity | chains x draws | R-hat | R-hat bulk | R-hat folded | ESS bulk | ESS tail "
                      "| mean +- MCSE | sd +- MCSE |", "|---|---|---|---|---|---|---|---|---|"]
            for name, st in stats["quantities"].items():
                if "constant" in st:
                    lines.append(f"| {name} | {st['source']} | constant {fmt(st['constant'])}: cannot judge "
                                 "| | | | | | |")
                    continue
                kind = "segments" if st["segmented"] else "chains"
                lines.append(f"| {name} | {st['chains']} {kind} x {st['draws']} | {st['rhat']:.4f} | "
                             f"{st['rhat_bulk']:.4f} | {st['rhat_folded']:.4f} | {st['ess_bulk']:.0f} | "
                             f"{st['ess_tail']:.0f} | {fmt(st['mean'])} +- {fmt(st['mcse_mean'])} | "
                             f"{fmt(st['sd'])} +- {fmt(st['mcse_sd'])} |")
        rest = {k: v for k, v in self.summary.items() if k != "chain_statistics"}
        if rest:
            lines += ["", "## Summary", ""]
            for k, v in _jsonable(rest).items():
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
        """PNG figures (:func:`~langevin_lora.diagnostics.plots.save_figures`): traces,
        autocorrelations, per-group/module temperatures, gauge gaps."""
        from langevin_lora.diagnostics.plots import save_figures

        return save_figures(self, directory, stem=stem)

