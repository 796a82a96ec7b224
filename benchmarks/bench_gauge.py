"""Benchmark: balancing warm-up and exact gauge moves (THEORY §4), with and without.

For each target and configuration, vectorised chains start from LoRA's initialisation
(B = 0, A Kaiming-uniform), take noise-free warm-up steps (optionally balanced every
``--balance-every`` steps and once when sampling starts), then sample with LangevinSGD (optionally
with orthogonal + GL gauge moves every ``--move-every`` steps). Reported:

- **steps to stationarity**: the smallest sampling length n on a doubling grid at which the window
  [n/2, n] passes the checks of THEORY §3 for every traced observable: split-R-hat < 1.01 over
  the chains and |Geweke z| < 3 (first 10% vs last 50% of the window, chain-averaged trace,
  batch-means variance);
- **ESS per gradient evaluation** of W-observables (the entries of W = BA and W_sqnorm = |W|^2): per-chain
  integrated autocorrelation time (Geyer's initial positive sequence) on the second half of the
  run, ESS/grad = 1/tau (gauge moves need no gradient); the gauge statistic D is shown for context;
- wall time per step relative to plain SGLD (moves cost O(r^2 (in + out)) per module).

Targets are classes with the small interface of :class:`MatrixVariant` (``init``, ``grads``,
``factors``, ``observables``, hyperparameters); a MiniLM LoRA target can be added to ``TARGETS``
with the same interface (observables: e.g. logits on a fixed probe batch as W-observables).
Results are appended to benchmarks/RESULTS.md.

Usage: ``python benchmarks/bench_gauge.py [--chains 256] [--steps 12000] [--no-record]``
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from langevin_lora import LangevinSGD
from langevin_lora.gauge import GaugeMoves, balance_factors

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class MatrixVariant:
    """THEORY §5(ii), matrix variant: U = |w - bA|^2 + (lam/2)(|A|^2 + b^2), A 1x2, b scalar,
    w = (1, 0.5), lam = 0.5, beta = 4; E[|A|^2 - b^2] = 1/(beta lam) = 0.5."""

    name = "matrix variant of THEORY §5(ii) (A 1x2, b scalar, w=(1,0.5), lam=0.5, beta=4)"
    beta, weight_decay, lr = 4.0, 0.5, 0.005
    w_observables = ("W0", "W1", "W_sqnorm")
    exact_mean_D = 0.5   # (in - out)/(beta lam), THEORY §3

    def __init__(self) -> None:
        self.w = torch.tensor([1.0, 0.5], dtype=torch.float64).view(1, 1, 2)

    def init(self, chains: int, gen: torch.Generator) -> list[torch.nn.Parameter]:
        bound = 1 / math.sqrt(2)   # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in), as PEFT's lora_A
        A = (torch.rand(chains, 1, 2, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        B = torch.zeros(chains, 1, 1, dtype=torch.float64)
        return [torch.nn.Parameter(A), torch.nn.Parameter(B)]

    def grads(self, params) -> None:
        A, B = params
        with torch.no_grad():
            R = self.w - B @ A
            A.grad = -2 * B.mT @ R
            B.grad = -2 * R @ A.mT

    def factors(self, params):
        return [(params[0], params[1])]

    def observables(self, params) -> dict[str, torch.Tensor]:
        A, B = params
        W = (B @ A)[:, 0, :]
        a2, b2 = A.square().sum((-2, -1)), B.square().sum((-2, -1))
        return {"W0": W[:, 0], "W1": W[:, 1], "W_sqnorm": W.square().sum(-1), "D": a2 - b2,
                "U": (self.w[:, 0] - W).square().sum(-1) + self.weight_decay / 2 * (a2 + b2)}


TARGETS = {"matrix-variant": MatrixVariant}


# -- diagnostics (THEORY §3), on traces of shape (steps, chains) ----------------------------------
def split_rhat(x: np.ndarray) -> float:
    n = x.shape[0] // 2
    halves = np.concatenate([x[:n], x[n:2 * n]], axis=1)
    means, variances = halves.mean(0), halves.var(0, ddof=1)
    W, B = variances.mean(), n * means.var(ddof=1)
    return float(np.sqrt(((n - 1) / n * W + B / n) / W))


def geweke_z(x: np.ndarray, batches: int = 20) -> float:
    m = x.mean(1)                          # chain-averaged trace
    n = m.size
    first, last = m[: n // 10], m[n // 2:]

    def bm_var(y):
        k = max(1, y.size // batches)
        yb = y[: k * (y.size // k)].reshape(-1, k).mean(1)
        return yb.var(ddof=1) / yb.size
    return float((first.mean() - last.mean()) / math.sqrt(bm_var(first) + bm_var(last)))


def tau_int(x: np.ndarray) -> np.ndarray:
    """Per-chain integrated autocorrelation time (Geyer's initial positive sequence)."""
    n, c = x.shape
    y = x - x.mean(0)
    f = np.fft.rfft(y, n=2 * n, axis=0)
    acov = np.fft.irfft(f * np.conj(f), axis=0)[:n] / n
    rho = acov / acov[0]
    taus = np.empty(c)
    for j in range(c):
        pairs = rho[: 2 * (n // 2), j].reshape(-1, 2).sum(1)
        k = np.argmax(pairs <= 0) if np.any(pairs <= 0) else pairs.size
        taus[j] = max(1.0, -1 + 2 * pairs[:k].sum())
    return taus


def steps_to_exact_gauge_mean(d: np.ndarray, exact: float, block: int = 20) -> int | None:
    """Step (block-averaged) after which the ensemble mean of D stays within 4.5 standard errors
    of its exact value (in - out)/(beta lam): the relaxation of the gauge, known for any data."""
    n = (d.shape[0] // block) * block
    blocks = d[:n].reshape(-1, block, d.shape[1]).mean(1)          # (n_blocks, chains)
    se = blocks.std(1, ddof=1) / math.sqrt(d.shape[1])
    out = np.nonzero(np.abs(blocks.mean(1) - exact) >= 4.5 * se)[0]
    if out.size and out[-1] == blocks.shape[0] - 1:
        return None
    return int((out[-1] + 1) * block) if out.size else 0


def steps_to_stationarity(traces: dict[str, np.ndarray], start: int = 125) -> int | None:
    n = start
    total = next(iter(traces.values())).shape[0]
    while n <= total:
        ok = all(split_rhat(t[n // 2:n]) < 1.01 and abs(geweke_z(t[n // 2:n])) < 3 for t in traces.values())
        if ok:
            return n
        n *= 2
    return None


# -- one configuration -------------------------------------------------------------------------
def run(target, *, chains: int, warmup: int, steps: int, balance_every: int | None, balance_at_start: bool,
        moves: GaugeMoves | None, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    params = target.init(chains, gen)
    warm = LangevinSGD(params, lr=target.lr, beta=target.beta, temperature=0.0, weight_decay=target.weight_decay)
    for t in range(1, warmup + 1):                        # noise-free warm-up (GD on U)
        target.grads(params)
        warm.step()
        if balance_every and t % balance_every == 0:
            _balance(target, params)
    if balance_at_start:
        _balance(target, params)
    opt = LangevinSGD(params, lr=target.lr, beta=target.beta, weight_decay=target.weight_decay, seed=seed + 1)
    traces: dict[str, list] = {}
    t0 = time.perf_counter()
    for _ in range(steps):
        target.grads(params)
        opt.step()
        if moves is not None:
            moves(target.factors(params), target.beta, target.weight_decay)
        with torch.no_grad():
            for k, v in target.observables(params).items():
                traces.setdefault(k, []).append(v.to(torch.float32))
    wall = time.perf_counter() - t0
    tr = {k: torch.stack(v).numpy().astype(np.float64) for k, v in traces.items()}
    second = {k: v[steps // 2:] for k, v in tr.items()}
    ess_per_grad = {k: float(np.mean(1.0 / tau_int(v))) for k, v in second.items()}
    return {"steps_to_stationarity": steps_to_stationarity(tr), "ess_per_grad": ess_per_grad,
            "steps_to_gauge_mean": steps_to_exact_gauge_mean(tr["D"], target.exact_mean_D),
            "wall_per_step": wall / steps, "mean_D": float(second["D"].mean()),
            "gl_acceptance": moves.acceptance_rate if moves is not None else math.nan}


@torch.no_grad()
def _balance(target, params) -> None:
    for A, B in target.factors(params):
        A_bal, B_bal = balance_factors(A, B)
        A.copy_(A_bal)
        B.copy_(B_bal)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="matrix-variant", choices=sorted(TARGETS))
    p.add_argument("--chains", type=int, default=256)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--balance-every", type=int, default=50)
    p.add_argument("--move-every", type=int, default=10)
    p.add_argument("--gl-step", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    target = TARGETS[args.target]()
    configs = {
        "plain": dict(balance_every=None, balance_at_start=False, moves=False),
        "balanced warm-up": dict(balance_every=args.balance_every, balance_at_start=True, moves=False),
        "gauge moves": dict(balance_every=None, balance_at_start=False, moves=True),
        "balanced warm-up + moves": dict(balance_every=args.balance_every, balance_at_start=True, moves=True),
    }
    results = {}
    for name, cfg in configs.items():
        mv = GaugeMoves(every_n_steps=args.move_every, gl_step=args.gl_step, seed=args.seed + 7) if cfg["moves"] else None
        results[name] = run(target, chains=args.chains, warmup=args.warmup, steps=args.steps,
                            balance_every=cfg["balance_every"], balance_at_start=cfg["balance_at_start"],
                            moves=mv, seed=args.seed)
        print(name, results[name], flush=True)
    base = results["plain"]
    obs = list(target.w_observables) + ["D"]
    head = "| configuration | steps to stationarity (R-hat, Geweke) | steps until E[D] stays within 4.5 SE | " + " | ".join(f"ESS/grad {k}" for k in obs) + \
        " | ESS/grad W (ratio to plain) | wall/step (ratio, noisy) | GL acceptance | mean D (2nd half) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        w_mean = np.mean([r["ess_per_grad"][k] for k in target.w_observables])
        w_base = np.mean([base["ess_per_grad"][k] for k in target.w_observables])
        sts = r["steps_to_stationarity"]
        sgm = r["steps_to_gauge_mean"]
        lines.append(f"| {name} | {sts if sts is not None else f'> {args.steps}'} | "
                     f"{sgm if sgm is not None else f'> {args.steps}'} | "
                     + " | ".join(f"{r['ess_per_grad'][k]:.4f}" for k in obs)
                     + f" | {w_mean / w_base:.2f} | {r['wall_per_step'] / base['wall_per_step']:.2f} | "
                     + (f"{r['gl_acceptance']:.2f}" if not math.isnan(r["gl_acceptance"]) else "-")
                     + f" | {r['mean_D']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        section = (f"\n## bench_gauge.py: balancing warm-up and gauge moves, {target.name}\n\n"
                   f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''}, "
                   f"torch {torch.__version__}, 1 thread (shared machine: compare ratios within this table only). "
                   f"{args.chains} chains, {args.warmup} noise-free warm-up steps from LoRA init (B = 0), "
                   f"{args.steps} SGLD steps (eta = {target.lr}); balancing every {args.balance_every} warm-up "
                   f"steps and at sampling start; moves = orthogonal + GL (gl_step {args.gl_step}) every "
                   f"{args.move_every} steps. ESS on the second half; stationarity: split-R-hat < 1.01 and "
                   f"|Geweke z| < 3 on [n/2, n] for W0, W1, W_sqnorm = |W|^2, D, U. Exact E[D] = 0.5.\n\n{table}\n")
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n\nEach script appends a section; ratios are measured within one run.\n")
        with RESULTS.open("a") as fh:
            fh.write(section)


if __name__ == "__main__":
    main()
