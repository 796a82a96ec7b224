r"""Ground truth for the tiny attention target of THEORY §5(iii), by quadrature.

Model: ``N`` sequences of ``n`` scalar tokens :math:`x_{ij}`, the query is the last token
:math:`x_{in}`, parameters :math:`\theta = (q, k, v)` and

.. math::
    f_i(\theta) = v \sum_j \operatorname{softmax}_j(q k\, x_{in} x_{ij})\, x_{ij}, \qquad
    U(\theta) = \frac{1}{N}\sum_i \tfrac12 (f_i - y_i)^2 + \tfrac{\lambda}{2}\lVert\theta\rVert^2,

data drawn from :math:`qk = 2`, :math:`v = 1`, noise sd 0.1; :math:`\lambda = 0.1`,
:math:`\beta = 50`. The script computes moments of :math:`\pi_\beta \propto e^{-\beta U}` on a
symmetric 3-D grid (rectangle rule; the integrand is smooth and decays like a Gaussian, so the
rule converges spectrally), checks grid convergence by halving the spacing, and cross-checks
with an independent semi-analytic quadrature: :math:`U` is quadratic in :math:`v`,

.. math::
    U = \tfrac12 P(s) v^2 - B(s) v + \tfrac12 \overline{y^2} + \tfrac{\lambda}{2}(q^2 + k^2),
    \quad s = qk,\ P = \overline{h^2} + \lambda,\ B = \overline{h y},\
    h_i(s) = \sum_j \operatorname{softmax}_j(s\, x_{in} x_{ij}) x_{ij},

so :math:`v \mid (q,k)` is exactly :math:`N(B/P, 1/(\beta P))` and only a 2-D grid is needed.

The posterior is invariant under :math:`(q,k) \to (-q,-k)` and :math:`q \leftrightarrow k`, and
it is bimodal: the modes near :math:`\pm(0.9, 0.9)` are separated by a barrier of about 11.5 in
units of :math:`1/\beta` at :math:`q = k = 0` (printed below), so Langevin chains started in one
mode stay there; the grid covers both modes and the region :math:`qk < 0` (negligible mass).

Run ``python -m benchmarks.attention_quadrature`` from the repository root to regenerate
``tests/data/attention_ground_truth.json`` (about a minute on one core); the data ``x, y`` are
stored in the JSON so the test uses exactly the same numbers. The quadratures themselves live in
:mod:`langevin_lora.testing` (``attention_quadrature_3d``, ``attention_quadrature_2d``,
``attention_barrier``), whose ``ATTENTION_X``, ``ATTENTION_Y`` and ``ATTENTION_MOMENTS`` carry the
JSON's numbers for tests, benchmarks and users.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from langevin_lora.testing import (ATTENTION_MOMENT_NAMES, ATTENTION_PARAMS, attention_barrier, attention_data,
                                   attention_quadrature_2d, attention_quadrature_3d)

# Symmetric grid [-half_width, half_width]^3 (0 is a node, so both sign modes are sampled alike).
GRID = dict(half_width=4.0, spacings=[0.04, 0.02, 0.01])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests" / "data" / "attention_ground_truth.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    x, y = attention_data(**ATTENTION_PARAMS)
    lam, beta = ATTENTION_PARAMS["weight_decay"], ATTENTION_PARAMS["beta"]
    runs = []
    for h in GRID["spacings"]:
        r = attention_quadrature_3d(x, y, lam, beta, GRID["half_width"], h)
        runs.append(r)
        print(f"3-D grid h={h:<5} ({r['points_per_axis']}^3 nodes), boundary density/peak "
              f"{r['boundary_rel_density']:.1e}")
    check = attention_quadrature_2d(x, y, lam, beta, GRID["half_width"], GRID["spacings"][-1])
    final = runs[-1]["moments"]
    halving = {name: abs(runs[-1]["moments"][name] - runs[-2]["moments"][name]) for name in ATTENTION_MOMENT_NAMES}
    vs_2d = {name: abs(final[name] - check["moments"][name]) for name in ATTENTION_MOMENT_NAMES}
    bar = attention_barrier(x, y, lam, beta)
    print(f"{'moment':>8} {'h=' + str(GRID['spacings'][-1]):>12} {'|halving diff|':>15} {'|3-D - 2-D|':>12}")
    for name in ATTENTION_MOMENT_NAMES:
        print(f"{name:>8} {final[name]:12.6f} {halving[name]:15.2e} {vs_2d[name]:12.2e}")
    print(f"mass with qk < 0: {check['mass_qk_negative']:.2e}; barrier between the sign modes "
          f"beta*dU = {bar['beta_delta_U']:.2f} (mode at q = k = {bar['mode_q_eq_k']:.3f})")
    out = dict(
        description="Moments of exp(-beta U) for the tiny attention target of THEORY 5(iii); "
                    "written by benchmarks/attention_quadrature.py",
        params=ATTENTION_PARAMS, grid=GRID, x=x.tolist(), y=y.tolist(), moments=final,
        convergence=dict(max_abs_halving_diff=max(halving.values()), halving_diff=halving,
                         max_abs_diff_vs_semi_analytic_2d=max(vs_2d.values()), diff_vs_semi_analytic_2d=vs_2d),
        grids=runs, semi_analytic_2d=check, barrier=bar,
        machine=dict(python=platform.python_version(), numpy=np.__version__, platform=platform.platform()),
        seconds=round(time.perf_counter() - t0, 1),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()
