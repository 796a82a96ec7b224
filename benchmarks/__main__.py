"""Run one benchmark by name: ``python -m benchmarks <name> [its arguments ...]`` from the repository root.

``<name>`` is a script of this folder with or without its ``bench_`` prefix (``sampler``,
``bench_sampler``, ``attention_quadrature``); ``python -m benchmarks`` lists them, and
``python -m benchmarks <name> --help`` shows that script's options. The script runs exactly as
``python -m benchmarks.<module> [arguments ...]`` would. Results: every ``bench_*`` script takes
``--append-results`` (append its tables to ``benchmarks/RESULTS.md``, off by default) and
``--results PATH``; ``attention_quadrature`` writes ``tests/data/attention_ground_truth.json``.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def scripts() -> dict[str, str]:
    """Short name -> module name of every runnable script (``bench_*.py`` and ``attention_quadrature.py``)."""
    found = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
    return {name.removeprefix("bench_"): name for name in found}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    table = scripts()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.strip() + "\n\nBenchmarks:\n" + "\n".join(f"  {short:24s} benchmarks/{mod}.py"
                                                                for short, mod in table.items()))
        return 0
    name, rest = argv[0], argv[1:]
    module = table.get(name.removeprefix("bench_").removesuffix(".py"))
    if module is None:
        print(f"Invalid benchmark: {name!r} (expected one of {', '.join(table)})", file=sys.stderr)
        return 2
    sys.argv = [f"python -m benchmarks {name}", *rest]
    runpy.run_module(f"benchmarks.{module}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
