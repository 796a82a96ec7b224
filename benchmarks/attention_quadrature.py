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

Run ``python benchmarks/attention_quadrature.py`` to regenerate
``tests/data/attention_ground_truth.json`` (about a minute on one core); the data ``x, y`` are
stored in the JSON so the test uses exactly the same numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

PARAMS = dict(num_sequences=20, seq_len=4, data_seed=0, qk_true=2.0, v_true=1.0, noise_sd=0.1,
              weight_decay=0.1, beta=50.0)
# Symmetric grid [-half_width, half_width]^3 (0 is a node, so both sign modes are sampled alike).
GRID = dict(half_width=4.0, spacings=[0.04, 0.02, 0.01])
MOMENT_NAMES = ["q", "k", "v", "q2", "k2", "v2", "qk", "qv", "kv", "abs_q", "abs_k", "U", "P_q_pos"]


def make_data(num_sequences: int, seq_len: int, data_seed: int, qk_true: float, v_true: float,
              noise_sd: float, **_) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``x ~ N(0, 1)`` of shape ``(N, n)`` and targets ``y = f(qk_true, v_true) + noise``."""
    rng = np.random.default_rng(data_seed)
    x = rng.standard_normal((num_sequences, seq_len))
    y = v_true * attention_h(np.array([qk_true]), x)[0] + noise_sd * rng.standard_normal(num_sequences)
    return x, y


def attention_h(s: np.ndarray, x: np.ndarray) -> np.ndarray:
    r""":math:`h_i(s) = \sum_j \operatorname{softmax}_j(s x_{in} x_{ij}) x_{ij}` for every ``s``.

    Returns shape ``(len(s), N)``."""
    logits = s[:, None, None] * (x[:, -1:] * x)[None]
    logits -= logits.max(axis=-1, keepdims=True)
    w = np.exp(logits)
    return (w * x[None]).sum(-1) / w.sum(-1)


def features(s: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """:math:`P(s) = mean(h^2) + lambda` and :math:`B(s) = mean(h y)`, evaluated in chunks of ``s``."""
    P, B = np.empty_like(s), np.empty_like(s)
    flat_s, flat_P, flat_B = s.reshape(-1), P.reshape(-1), B.reshape(-1)
    for i in range(0, flat_s.size, 20000):
        h = attention_h(flat_s[i:i + 20000], x)
        flat_P[i:i + 20000] = (h * h).mean(1) + lam
        flat_B[i:i + 20000] = (h * y).mean(1)
    return P, B


def _grid(x: np.ndarray, y: np.ndarray, lam: float, half_width: float, spacing: float):
    """The (q, k) grid on [-half_width, half_width]^2, mean y^2, and the features P, B of every node."""
    m = int(round(half_width / spacing))
    g = np.arange(-m, m + 1) * spacing
    Q, K = np.meshgrid(g, g, indexing="ij")
    P, B = features(Q * K, x, y, lam)
    return g, float((y * y).mean()), Q, K, P, B


def quadrature_3d(x: np.ndarray, y: np.ndarray, lam: float, beta: float, half_width: float,
                  spacing: float) -> dict:
    """Moments of exp(-beta U) by the rectangle rule on the 3-D grid, one q-slice at a time."""
    g, c0, Q, K, P, B = _grid(x, y, lam, half_width, spacing)
    base = 0.5 * c0 + 0.5 * lam * (Q ** 2 + K ** 2)
    # Shift by the minimum of U over the grid (q, k and v all on nodes) for a stable exponent.
    u_min = np.inf
    for i in range(g.size):
        u = base[i, :, None] + 0.5 * P[i, :, None] * g ** 2 - B[i, :, None] * g
        u_min = min(u_min, float(u.min()))
    acc = {name: 0.0 for name in MOMENT_NAMES}
    z = 0.0
    edge = 0.0  # largest density on the boundary of the box, relative to the peak (peak = 1)
    for i, qi in enumerate(g):
        u = base[i, :, None] + 0.5 * P[i, :, None] * g ** 2 - B[i, :, None] * g  # (k, v)
        w = np.exp(-beta * (u - u_min))
        kk, vv = g[:, None], g[None, :]
        wk, wv = w.sum(1), w.sum(0)
        sw = float(wk.sum())
        z += sw
        acc["q"] += qi * sw
        acc["k"] += float(wk @ g)
        acc["v"] += float(wv @ g)
        acc["q2"] += qi * qi * sw
        acc["k2"] += float(wk @ g ** 2)
        acc["v2"] += float(wv @ g ** 2)
        acc["qk"] += qi * float(wk @ g)
        acc["qv"] += qi * float(wv @ g)
        acc["kv"] += float((w * kk * vv).sum())
        acc["abs_q"] += abs(qi) * sw
        acc["abs_k"] += float(wk @ np.abs(g))
        acc["U"] += float((w * u).sum())
        acc["P_q_pos"] += (1.0 if qi > 0 else 0.5 if qi == 0 else 0.0) * sw
        if i in (0, g.size - 1):
            edge = max(edge, float(w.max()))
        else:
            edge = max(edge, float(w[[0, -1], :].max()), float(w[:, [0, -1]].max()))
    moments = {name: acc[name] / z for name in MOMENT_NAMES}
    return dict(spacing=spacing, points_per_axis=int(g.size), moments=moments, boundary_rel_density=edge)


def quadrature_2d(x: np.ndarray, y: np.ndarray, lam: float, beta: float, half_width: float,
                  spacing: float) -> dict:
    """Independent check: integrate v exactly (v | q, k is Gaussian), rectangle rule in (q, k)."""
    g, c0, Q, K, P, B = _grid(x, y, lam, half_width, spacing)
    mv = B / P
    # -log of the v-marginal weight, up to a constant: beta * (c0/2 + lam/2 (q^2+k^2) - B^2/(2P)) + log(P)/2
    e = beta * (0.5 * c0 + 0.5 * lam * (Q ** 2 + K ** 2) - 0.5 * B ** 2 / P) + 0.5 * np.log(P)
    w = np.exp(-(e - e.min()))
    w /= w.sum()
    ev, ev2 = mv, mv ** 2 + 1.0 / (beta * P)
    # U = P/2 v^2 - B v + c0/2 + lam/2 (q^2+k^2) (P holds the prior on v), so E[U | q, k] =
    # P/2 E[v^2|q,k] - B E[v|q,k] + ... = -B^2/(2P) + 1/(2 beta) + c0/2 + lam/2 (q^2+k^2).
    eu = 0.5 * c0 + 0.5 * lam * (Q ** 2 + K ** 2) - 0.5 * B ** 2 / P + 0.5 / beta
    sign_q = np.where(Q > 0, 1.0, np.where(Q == 0, 0.5, 0.0))
    moments = {
        "q": (w * Q).sum(), "k": (w * K).sum(), "v": (w * ev).sum(),
        "q2": (w * Q ** 2).sum(), "k2": (w * K ** 2).sum(), "v2": (w * ev2).sum(),
        "qk": (w * Q * K).sum(), "qv": (w * Q * ev).sum(), "kv": (w * K * ev).sum(),
        "abs_q": (w * np.abs(Q)).sum(), "abs_k": (w * np.abs(K)).sum(), "U": (w * eu).sum(),
        "P_q_pos": (w * sign_q).sum(),
    }
    return dict(spacing=spacing, points_per_axis=int(g.size), moments={k: float(v) for k, v in moments.items()},
                mass_qk_negative=float(w[Q * K < 0].sum()))


def barrier(x: np.ndarray, y: np.ndarray, lam: float, beta: float) -> dict:
    """beta * (min U at q = k = 0) - beta * (min U over the balanced diagonal q = k > 0)."""
    c0 = float((y * y).mean())
    t = np.linspace(0.0, 3.0, 3001)
    P, B = features(t * t, x, y, lam)
    u = 0.5 * c0 + lam * t ** 2 - 0.5 * B ** 2 / P
    i = int(u.argmin())
    return dict(mode_q_eq_k=float(t[i]), beta_delta_U=float(beta * (u[0] - u[i])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests" / "data" / "attention_ground_truth.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    x, y = make_data(**PARAMS)
    lam, beta = PARAMS["weight_decay"], PARAMS["beta"]
    runs = []
    for h in GRID["spacings"]:
        r = quadrature_3d(x, y, lam, beta, GRID["half_width"], h)
        runs.append(r)
        print(f"3-D grid h={h:<5} ({r['points_per_axis']}^3 nodes), boundary density/peak "
              f"{r['boundary_rel_density']:.1e}")
    check = quadrature_2d(x, y, lam, beta, GRID["half_width"], GRID["spacings"][-1])
    final = runs[-1]["moments"]
    halving = {name: abs(runs[-1]["moments"][name] - runs[-2]["moments"][name]) for name in MOMENT_NAMES}
    vs_2d = {name: abs(final[name] - check["moments"][name]) for name in MOMENT_NAMES}
    bar = barrier(x, y, lam, beta)
    print(f"{'moment':>8} {'h=' + str(GRID['spacings'][-1]):>12} {'|halving diff|':>15} {'|3-D - 2-D|':>12}")
    for name in MOMENT_NAMES:
        print(f"{name:>8} {final[name]:12.6f} {halving[name]:15.2e} {vs_2d[name]:12.2e}")
    print(f"mass with qk < 0: {check['mass_qk_negative']:.2e}; barrier between the sign modes "
          f"beta*dU = {bar['beta_delta_U']:.2f} (mode at q = k = {bar['mode_q_eq_k']:.3f})")
    out = dict(
        description="Moments of exp(-beta U) for the tiny attention target of THEORY 5(iii); "
                    "written by benchmarks/attention_quadrature.py",
        params=PARAMS, grid=GRID, x=x.tolist(), y=y.tolist(), moments=final,
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
