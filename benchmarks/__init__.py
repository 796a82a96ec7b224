"""The benchmark scripts of langevin-lora (not part of the installed package).

Run them from the repository root as modules, ``python -m benchmarks.bench_sampler --quick``, or
through the runner, ``python -m benchmarks sampler --quick`` (``python -m benchmarks`` lists them).
Every ``bench_*`` script prints its tables; ``--append-results`` also appends them to ``benchmarks/RESULTS.md``
(``--results PATH`` for another file) through the locked append of :mod:`benchmarks._common`.
"""
