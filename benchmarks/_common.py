"""Shared helpers for the benchmark scripts in ``benchmarks/``.

* :func:`machine_record` / :func:`machine_markdown`: what ran the benchmark (CPU, threads, Python,
  torch and friends, git commit), so every figure in ``RESULTS.md`` carries its machine.
* :func:`add_results_arguments`: the one results flag every script takes, ``--append-results``
  (off by default: a run prints its tables; with the flag it also appends them), and
  ``--results PATH`` (default ``benchmarks/RESULTS.md``).
* :func:`append_results` / :func:`append_section`: append one dated section (or a section a script
  formatted itself) to ``benchmarks/RESULTS.md``. Several scripts may append at the same time, so
  the file is only ever opened in append mode, under an exclusive ``flock``, and each section is
  written in one call.
* :func:`time_per_call` / :func:`median_chunk_time`: wall time as the median of repeats after a
  warm-up (robust to other processes sharing the machine). Report *ratios* measured in one run.
* :func:`effective_sample_size` / :func:`integrated_autocorr_time`: the package's own chain
  statistics (:mod:`langevin_lora.diagnostics`, Geyer's initial monotone sequence, chains combined
  as in Stan) applied column by column to a ``(chains, n, k)`` trace. There is one implementation,
  the package's: a benchmark measures ESS exactly as the diagnostics report does.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from langevin_lora.diagnostics import effective_sample_size as _ess
from langevin_lora.diagnostics import integrated_autocorr_time as _tau

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"

__all__ = ["BENCH_DIR", "RESULTS_PATH", "ESS_BACKEND", "machine_record", "machine_markdown",
           "add_results_arguments", "append_results", "append_section", "time_per_call", "median_chunk_time",
           "effective_sample_size",
           "integrated_autocorr_time", "markdown_table"]
ESS_BACKEND = "langevin_lora.diagnostics.effective_sample_size"


# -- machine and versions -------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_record() -> dict:
    """Machine and software versions as a flat dict (``None`` for what is not installed)."""
    import torch

    rec = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
    }
    for dist in ("torch", "numpy", "langevin-lora", "posteriors", "tensordict", "lightning", "peft",
                 "scikit-learn", "scipy"):
        rec[dist] = _version(dist)
    return rec


def machine_markdown(rec: dict | None = None) -> str:
    """One markdown line summarising :func:`machine_record` (``key: value`` pairs, absent ones dropped)."""
    rec = machine_record() if rec is None else rec
    return "Machine: " + "; ".join(f"{k} {v}" for k, v in rec.items() if v is not None)


# -- results file ---------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def add_results_arguments(parser) -> None:
    """Add the results options every benchmark takes to an ``argparse`` parser: ``--append-results``
    (append the tables to the results file; off by default) and ``--results PATH`` (default
    ``benchmarks/RESULTS.md``). Read them as ``args.append_results`` and ``args.results``."""
    parser.add_argument("--append-results", action="store_true",
                        help="append the tables to the results file (default: print them only)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file for --append-results (default benchmarks/RESULTS.md)")


def add_size_arguments(parser, quick_help: str) -> None:
    """The run sizes of the sampler benchmarks: ``--quick`` (``quick_help``) or ``--smoke`` (seconds, for the
    test suite), exclusive; plus ``--seed``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=quick_help)
    mode.add_argument("--smoke", action="store_true", help="tiny run for the test suite (seconds)")
    parser.add_argument("--seed", type=int, default=0)


def append_section(text: str, path: Path | str | None = None) -> Path:
    """Append ``text`` (one whole markdown section) to ``path`` (default ``benchmarks/RESULTS.md``, created
    if absent) under an exclusive lock, in a single write: concurrent benchmark scripts interleave whole
    sections only, and the file is never rewritten. A new file starts with the results header."""
    path = Path(path) if path is not None else RESULTS_PATH
    with open(path, "a", encoding="utf-8") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # non-POSIX: append mode alone still never rewrites
            pass
        if fh.tell() == 0:
            text = "# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last.\n" + text
        fh.write(text)
        fh.flush()
    return path


def append_results(section_title: str, markdown_table: str, command: str, *, notes: str = "",
                   machine: dict | None = None, path: Path | str | None = None) -> Path:
    """Append a dated section ``## <title> (<date>)`` with the command, machine line, table and
    notes to ``benchmarks/RESULTS.md`` (or ``path``) through :func:`append_section`."""
    machine = machine_record() if machine is None else machine
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"\n## {section_title} ({stamp})\n", f"Command: `{command}`\n", machine_markdown(machine) + "\n",
             markdown_table.rstrip() + "\n"]
    if notes:
        parts.append(notes.rstrip() + "\n")
    return append_section("\n".join(parts), path)


# -- timing ---------------------------------------------------------------------------------------
def time_per_call(fn: Callable[[], object], *, number: int = 10, repeats: int = 5, warmup: int = 2) -> float:
    """Median over ``repeats`` of the mean wall time (s) of ``number`` calls, after ``warmup`` calls."""
    if number < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"Invalid number/repeats/warmup: {number}/{repeats}/{warmup} (need >= 1, >= 1, >= 0)")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return float(np.median(times))


def median_chunk_time(chunk_seconds: list[float], chunk_steps: list[int], skip_first: bool = True) -> float:
    """Seconds per step as the median over chunks of (chunk time / chunk steps); the first chunk
    is a warm-up and skipped when there are at least three."""
    pairs = list(zip(chunk_seconds, chunk_steps))
    if skip_first and len(pairs) >= 3:
        pairs = pairs[1:]
    return float(np.median([t / n for t, n in pairs if n > 0]))


# -- effective sample size ------------------------------------------------------------------------
def _columns(x) -> np.ndarray:
    """A trace as ``(chains, n, k)`` float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"Invalid trace shape {x.shape}: expected (chains, n) or (chains, n, k)")
    return x


def effective_sample_size(x) -> np.ndarray:
    """Total ESS over all chains of each column of a trace ``x`` shaped (chains, n) or (chains, n, k):
    :func:`langevin_lora.diagnostics.effective_sample_size` of every ``(chains, n)`` column. Returns (k,)."""
    x = _columns(x)
    return np.array([float(_ess(np.ascontiguousarray(x[:, :, j]))) for j in range(x.shape[2])])


def integrated_autocorr_time(x) -> np.ndarray:
    """:math:`\\tau_{int}` in draws of each column of a trace shaped (chains, n) or (chains, n, k):
    :func:`langevin_lora.diagnostics.integrated_autocorr_time` of every column. Returns (k,)."""
    x = _columns(x)
    return np.array([float(_tau(np.ascontiguousarray(x[:, :, j]))) for j in range(x.shape[2])])
