r"""Kinetic (BAOAB) vs overdamped Langevin: gradients to stationarity and ESS per gradient.

Both samplers are :class:`langevin_lora.LangevinSGD` (``friction=None`` and ``friction=γ``), one
gradient per step, each at its step from the exact :math:`\lambda_{\max}` of :math:`\nabla^2 U` at the
mode: :math:`\eta = 0.1/\lambda_{\max}` (overdamped, THEORY §2's stability rule) and
:math:`h = c/\sqrt{\lambda_{\max}}`, :math:`c = 0.5` (and 1.0), kinetic, with
:math:`\gamma = 2\sqrt{\lambda_{\min}}` (critical damping of the slowest mode at the mode). Targets
(THEORY §5), all vectorised over ``C`` chains started from one common point away from the bulk:

1. ``quadratic``: :math:`U = \tfrac12\theta^\top K\theta - b^\top\theta`, d = 6, eigenvalues of
   :math:`K` log-spaced over [1, 100] (condition number 100), prior :math:`\lambda = 1` (the smallest
   eigenvalue: a prior-dominated direction), :math:`\beta = 10`. Observables: :math:`\theta\cdot v_{\min}`,
   :math:`\theta\cdot v_{\max}` (the slowest and fastest eigen-directions), :math:`U`.
2. ``lora-rank1``: :math:`U = (1 - ba)^2 + \tfrac\lambda2(a^2+b^2)`, :math:`\lambda = 0.5`, :math:`\beta = 4`
   (quadrature moments, THEORY §5(ii)); start :math:`A = 0.5, B = 0` as LoRA. Observables: :math:`W = ba`,
   the gauge :math:`a^2 - b^2`, :math:`U`.
3. ``attention``: the single attention layer of THEORY §5(iii) with the data and quadrature of
   :func:`langevin_lora.testing.attention_ground_truth`, :math:`\lambda = 0.1`, :math:`\beta = 50`; start
   :math:`(0.5, 0.5, 0.5) + 0.1\xi` (the recipe's). Observables: :math:`qk`, :math:`v`, :math:`U`.

**Gradients to stationarity**: the smallest :math:`n` on the grid :math:`n_0 2^k` at which the window
:math:`[n/2, n)` of the chains passes the package's stationarity checks: split-:math:`\hat R < 1.01` over
the ``C`` chains (THEORY §3, more than 4 chains) for :math:`U` and every observable, and the virial
temperature (centred on the window's mean over all chains) within :math:`1 \pm 0.1`. ESS per gradient:
multi-chain ESS (:func:`langevin_lora.diagnostics.effective_sample_size`) of each observable over the
last half of the run, divided by the chains' gradients in that half. Moments: per-chain time averages
of the observables over that half, z-tested across chains against the exact/quadrature values
(``max |z|``; the overdamped chain carries its :math:`O(\eta)` bias, BAOAB is exact on the quadratic).

A friction sweep (:math:`\gamma/2\sqrt{\lambda_{\min}} \in \{0.25, 0.5, 1, 2, 4\}`) on the quadratic and
the attention layer backs the rule behind ``friction="auto"``.

Run ``python -m benchmarks.bench_kinetic`` from the repository root (a few minutes on one core),
``--quick``, or ``--smoke`` (the test suite); ``--append-results`` appends its tables to
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import Tensor

from benchmarks._common import (add_results_arguments, add_size_arguments, append_results, machine_markdown,
                                machine_record, markdown_table)
from benchmarks.bench_sampler import DTYPE, Target, lora_target
from langevin_lora import LangevinSGD
from langevin_lora.diagnostics import effective_sample_size, split_rhat
from langevin_lora.testing import attention_ground_truth, attention_loss

RHAT_MAX, VIRIAL_TOL, BUFFER = 1.01, 0.1, 4096


# ---------------------------------------------------------------------------------------------
# targets: (Target, observables(params) -> (C, k) with names, exact means of the observables)
# ---------------------------------------------------------------------------------------------
def quadratic() -> tuple[Target, list[str], callable, np.ndarray]:
    d, lam, beta = 6, 1.0, 10.0
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    ev = torch.logspace(0, 2, d, dtype=DTYPE)
    K = Q @ torch.diag(ev) @ Q.T
    S = K - lam * torch.eye(d, dtype=DTYPE)            # Hessian of the loss; the prior adds lam I
    b = torch.randn(d, generator=g, dtype=DTYPE)
    mu = torch.linalg.solve(K, b)
    v_min, v_max = Q[:, 0], Q[:, -1]

    def loss_fn(params):
        (th,) = params
        return 0.5 * ((th @ S) * th).sum(1) - th @ b

    def obs(params):
        (th,) = params
        return torch.stack([th @ v_min, th @ v_max], 1)

    truth = np.array([float(mu @ v_min), float(mu @ v_max)])
    t = Target(name="quadratic", shapes=[(d,)], loss_fn=loss_fn, lam=lam, beta=beta, h=0.1,
               init=[mu + 4.0 / math.sqrt(beta * float(ev[0])) * v_min], mode=[mu], moment_names=[], moment_fn=obs,
               ref=truth, ref_se=np.zeros(2), warm_lr=0.0, warm_steps=0, chains=0, trace_chains=0, n_burn=0,
               n_keep=0, note=f"d={d}, eig(K) log-spaced in [1, 100], lambda={lam}, beta={beta}; start: the mean + "
                              "4 sd along the slowest direction")
    return t, ["theta.v_min", "theta.v_max"], obs, truth


def lora_rank1() -> tuple[Target, list[str], callable, np.ndarray]:
    t = lora_target(1, 1.0)
    ref = dict(zip(t.moment_names, t.ref))

    def obs(params):
        A, B = params
        a, b = A[:, 0, 0], B[:, 0, 0]
        return torch.stack([a * b, a * a - b * b], 1)

    t.note = "w=1, lambda=0.5, beta=4 (THEORY §5(ii)); start A=0.5, B=0"
    return t, ["W=ba", "a^2-b^2"], obs, np.array([ref["E ab"], 0.0])


def attention() -> tuple[Target, list[str], callable, np.ndarray]:
    gt = attention_ground_truth(DTYPE)
    lam, beta = gt["params"]["weight_decay"], gt["params"]["beta"]
    x, y = gt["x"], gt["y"]

    def loss_fn(params):
        (th,) = params
        return attention_loss(th, x, y)

    def obs(params):
        (th,) = params
        return torch.stack([th[:, 0] * th[:, 1], th[:, 2]], 1)

    g = torch.Generator().manual_seed(0)
    m = gt["moments"]
    qk = math.sqrt(max(m["qk"], 1e-3))
    t = Target(name="attention", shapes=[(3,)], loss_fn=loss_fn, lam=lam, beta=beta, h=0.1,
               init=[torch.tensor([0.5, 0.5, 0.5], dtype=DTYPE)], mode=[torch.tensor([qk, qk, m["v"]], dtype=DTYPE)],
               moment_names=[], moment_fn=obs, ref=np.array([m["qk"], m["v"]]), ref_se=np.zeros(2), warm_lr=0.0,
               warm_steps=0, chains=0, trace_chains=0, n_burn=0, n_keep=0,
               note=f"THEORY §5(iii), data and quadrature of tests/data/attention_ground_truth.json, lambda={lam}, "
                    f"beta={beta}; start (0.5, 0.5, 0.5) + 0.1 N(0, I)")
    t.info["init_noise"] = (0.1, g)
    return t, ["qk", "v"], obs, np.array([m["qk"], m["v"]])


TARGETS = {"quadratic": quadratic, "lora-rank1": lora_rank1, "attention": attention}


def curvature(t: Target) -> tuple[float, float]:
    """:math:`\\lambda_{\\min}, \\lambda_{\\max}` of :math:`\\nabla^2 U` at the mode (the mode refined by Newton)."""
    x = t.flat([m.unsqueeze(0) for m in t.mode])[0].clone()

    def U(z):
        return t.potential(t.unflat(z.unsqueeze(0)))[0]

    for _ in range(50):
        gr = torch.func.grad(U)(x)
        H = torch.func.hessian(U)(x)
        x = x - torch.linalg.solve(H, gr)
    t.mode = t.unflat(x.unsqueeze(0))
    t.mode = [m[0] for m in t.mode]
    ev = torch.linalg.eigvalsh(torch.func.hessian(U)(x))
    return float(ev.min()), float(ev.max())


# ---------------------------------------------------------------------------------------------
# one run: traces (adaptively thinned), virial sums at the checkpoints, the stationarity verdicts
# ---------------------------------------------------------------------------------------------
def run(t: Target, obs_fn, *, lr: float, friction: float | None, chains: int, max_steps: int, first: int,
        seed: int) -> dict:
    init = [x.unsqueeze(0).repeat(chains, *([1] * x.dim())).clone() for x in t.init]
    if "init_noise" in t.info:
        scale, _ = t.info["init_noise"]
        g = torch.Generator().manual_seed(seed + 1000)
        init = [x + scale * torch.randn(x.shape, generator=g, dtype=DTYPE) for x in init]
    params = [torch.nn.Parameter(x) for x in init]
    opt = LangevinSGD(params, lr=lr, beta=t.beta, weight_decay=t.lam, seed=seed, friction=friction,
                      guard=False)   # the benchmark measures the bare sampler (and reports runaways itself)
    k = 1 + obs_fn(params).shape[1]
    buf, steps_at = np.zeros((chains, BUFFER, k)), np.zeros(BUFFER, dtype=np.int64)
    used, thin = 0, 1
    tf = torch.zeros(chains, dtype=DTYPE)
    F_sum = [torch.zeros_like(p) for p in params]
    th_sum = [torch.zeros_like(p) for p in params]
    marks, checkpoints, verdicts = {}, [first * 2 ** j for j in range(64) if first * 2 ** j <= max_steps], []
    start = time.perf_counter()
    passed_at = None
    for step in range(max_steps):
        for p in params:
            p.grad = None
        loss = t.loss_fn(params)
        if not bool(torch.isfinite(loss).all()):   # a run-away chain: report it, do not judge it
            return _diverged(t, step, chains, time.perf_counter() - start)
        loss.sum().backward()
        with torch.no_grad():
            if step % thin == 0:
                if used == BUFFER:   # keep every other record: memory stays bounded, the thin doubles
                    buf[:, :BUFFER // 2] = buf[:, ::2]
                    steps_at[:BUFFER // 2] = steps_at[::2]
                    used, thin = BUFFER // 2, thin * 2
                if step % thin == 0:
                    reg = sum(p.reshape(chains, -1).square().sum(1) for p in params)
                    buf[:, used, 0] = (loss + 0.5 * t.lam * reg).numpy()
                    buf[:, used, 1:] = obs_fn(params).numpy()
                    steps_at[used] = step
                    used += 1
            for p, fs, ts in zip(params, F_sum, th_sum):
                force = p.grad + t.lam * p
                tf += (p * force).reshape(chains, -1).sum(1)
                fs += force
                ts += p
        opt.step()
        n = step + 1
        if n in checkpoints:
            marks[n] = (tf.clone(), [f.clone() for f in F_sum], [x.clone() for x in th_sum])
            if n // 2 in marks and n // 2 >= first // 2:
                v = verdict(t, buf[:, :used], steps_at[:used], marks, n, chains)
                verdicts.append(v)
                if passed_at is None and v["pass"]:
                    passed_at = n
    seconds = time.perf_counter() - start
    half = steps_at[:used] >= max_steps // 2
    tail = buf[:, :used][:, half]
    grads_in_tail = chains * (max_steps - max_steps // 2)
    ess = {name: effective_sample_size(tail[:, :, j]) / grads_in_tail
           for j, name in enumerate(["U"] + t.info["obs_names"])}
    per_chain = tail[:, :, 1:].mean(1)
    se = per_chain.std(0, ddof=1) / math.sqrt(chains)
    z = (per_chain.mean(0) - t.info["truth"]) / se
    return dict(grads_to_pass=passed_at, ess_per_grad=ess, thin=thin, verdicts=verdicts, z=z,
                estimate=per_chain.mean(0), us_per_step=1e6 * seconds / max_steps)


def _diverged(t: Target, step: int, chains: int, seconds: float) -> dict:
    nan = {name: math.nan for name in ["U"] + t.info["obs_names"]}
    return dict(grads_to_pass=None, diverged_at=step, ess_per_grad=nan, thin=1, verdicts=[],
                z=np.full(len(t.info["obs_names"]), math.nan), estimate=None, us_per_step=1e6 * seconds / max(step, 1))


def verdict(t: Target, buf: np.ndarray, steps_at: np.ndarray, marks: dict, n: int, chains: int) -> dict:
    window = (steps_at >= n // 2) & (steps_at < n)
    rh = {name: split_rhat(buf[:, window, j], many_chains=True) for j, name in enumerate(["U"] + t.info["obs_names"])}
    (tf1, F1, T1), (tf0, F0, T0) = marks[n], marks[n // 2]
    m = n - n // 2
    dtf = tf1 - tf0
    dF = [a - b for a, b in zip(F1, F0)]
    dT = [a - b for a, b in zip(T1, T0)]
    centre = [x.sum(0, keepdim=True) / (m * chains) for x in dT]
    centred = dtf - sum((c * f).reshape(chains, -1).sum(1) for c, f in zip(centre, dF))
    d = sum(x[0].numel() for x in dT)
    vir = float(centred.sum()) / (m * d * chains) * t.beta
    ok = all(r < RHAT_MAX for r in rh.values()) and abs(vir - 1) <= VIRIAL_TOL
    return {"n": n, "rhat": rh, "virial": vir, "pass": ok}


# ---------------------------------------------------------------------------------------------
def bench(name: str, *, chains: int, cap_overdamped: int, cap_kinetic: int, seed: int, sweep: bool,
          log=print) -> tuple[list[dict], list[dict], str]:
    t, names, obs_fn, truth = TARGETS[name]()
    t.info.update(obs_names=names, truth=truth)
    lam_min, lam_max = curvature(t)
    gamma0 = 2 * math.sqrt(lam_min)
    note = f"{name}: {t.note}; at the mode lambda_min = {lam_min:.4g}, lambda_max = {lam_max:.4g}, " \
           f"condition {lam_max / lam_min:.3g}"
    log(note)
    configs = [("overdamped", 0.1 / lam_max, None, cap_overdamped),
               ("kinetic c=0.5", 0.5 / math.sqrt(lam_max), gamma0, cap_kinetic),
               ("kinetic c=1.0", 1.0 / math.sqrt(lam_max), gamma0, cap_kinetic)]
    if t.lam > 0:
        configs.append(("kinetic c=0.5, friction='auto'", 0.5 / math.sqrt(lam_max), 2 * math.sqrt(t.lam), cap_kinetic))
    rows = []
    for label, lr, gamma, cap in configs:
        r = run(t, obs_fn, lr=lr, friction=gamma, chains=chains, max_steps=cap, first=64, seed=seed)
        r.update(target=name, label=label, lr=lr, friction=gamma, cap=cap)
        rows.append(r)
        log(f"  {label}: lr {lr:.4g} gamma {gamma} -> grads to pass {r['grads_to_pass']} "
            f"ESS/grad {json.dumps({k: round(v, 5) for k, v in r['ess_per_grad'].items()})} "
            f"max|z| {np.abs(r['z']).max():.2f} ({r['us_per_step']:.0f} us/step)")
    sweep_rows = []
    if sweep:
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            r = run(t, obs_fn, lr=0.5 / math.sqrt(lam_max), friction=f * gamma0, chains=chains, max_steps=cap_kinetic,
                    first=64, seed=seed + 7)
            r.update(target=name, factor=f, friction=f * gamma0)
            sweep_rows.append(r)
            log(f"  sweep gamma = {f} x 2 sqrt(lambda_min) = {f * gamma0:.3g}: grads to pass {r['grads_to_pass']} "
                f"min ESS/grad {min(r['ess_per_grad'].values()):.5f}")
    return rows, sweep_rows, note


def _fmt_grads(r: dict) -> str:
    if r.get("diverged_at") is not None:
        return f"diverged (step {r['diverged_at']})"
    return f"> {r['cap']}" if r["grads_to_pass"] is None else str(r["grads_to_pass"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(ap, quick_help="fewer chains, shorter caps")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument("--no-sweep", action="store_true", help="skip the friction sweep")
    add_results_arguments(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        chains, cap_o, cap_k = 8, 256, 256
    elif args.quick:
        chains, cap_o, cap_k = 64, 2 ** 17, 2 ** 14
    else:
        chains, cap_o, cap_k = 128, 2 ** 19, 2 ** 15
    t0 = time.perf_counter()
    machine = machine_record()
    print(machine_markdown(machine))
    rows, sweeps, notes = [], [], []
    for name in args.targets:
        r, s, note = bench(name, chains=chains, cap_overdamped=cap_o, cap_kinetic=cap_k, seed=args.seed,
                           sweep=not args.no_sweep and name in ("quadratic", "attention"))
        rows += r
        sweeps += s
        notes.append(note)
    header = ["target", "sampler", "step", "gamma", "gradients to pass", "speed-up", "ESS/grad (U, observables)",
              "min ESS/grad ratio", "max |z| vs truth", "us/step"]
    table = []
    for name in args.targets:
        base = next(r for r in rows if r["target"] == name and r["label"] == "overdamped")
        for r in (r for r in rows if r["target"] == name):
            speed = ("-" if r is base else "?" if r["grads_to_pass"] is None or base["grads_to_pass"] is None
                     else f"{base['grads_to_pass'] / r['grads_to_pass']:.3g}x")
            if r is not base and base["grads_to_pass"] is None and r["grads_to_pass"] is not None:
                speed = f"> {base['cap'] / r['grads_to_pass']:.3g}x"
            ratio = min(r["ess_per_grad"].values()) / min(base["ess_per_grad"].values())
            table.append([name, r["label"], f"{r['lr']:.4g}", "-" if r["friction"] is None else f"{r['friction']:.3g}",
                          _fmt_grads(r), speed, ", ".join(f"{v:.3g}" for v in r["ess_per_grad"].values()),
                          f"{ratio:.3g}", f"{np.abs(r['z']).max():.2f}", f"{r['us_per_step']:.0f}"])
    text = markdown_table(header, table)
    sweep_text = ""
    if sweeps:
        sweep_text = markdown_table(
            ["target", "gamma / 2 sqrt(lambda_min)", "gamma", "gradients to pass", "min ESS/grad"],
            [[s["target"], f"{s['factor']:g}", f"{s['friction']:.3g}",
              _fmt_grads(dict(s, cap=cap_k)),
              f"{min(s['ess_per_grad'].values()):.4g}"] for s in sweeps])
    total = time.perf_counter() - t0
    print("\n" + text + ("\n\n" + sweep_text if sweep_text else ""))
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    notes_text = "\n\n".join([
        (f"Mode {mode_name}: {chains} chains per run, caps {cap_o} (overdamped) / {cap_k} (kinetic) steps, "
         f"total {total:.0f} s, 1 torch thread. 'gradients to pass': the first n in 64 * 2^k whose window "
         f"[n/2, n) has split-R-hat < {RHAT_MAX} for U and every observable and the virial temperature within "
         f"1 +- {VIRIAL_TOL}. ESS/grad over the second half of the run. Steps: eta = 0.1/lambda_max (overdamped), "
         "h = c/sqrt(lambda_max) (kinetic), gamma = 2 sqrt(lambda_min) unless 'auto' (2 sqrt(weight_decay)); "
         "lambda at the mode."),
        *notes,
    ] + ([("Friction sweep (kinetic, c = 0.5):\n\n" + sweep_text)] if sweep_text else []))
    if args.append_results:
        append_results(f"Kinetic vs overdamped Langevin (bench_kinetic.py, {mode_name})", text,
                       "python -m benchmarks.bench_kinetic" + {"smoke": " --smoke", "quick": " --quick",
                                                                "full": ""}[mode_name],
                       notes=notes_text, machine=machine, path=args.results)
    return {"rows": rows, "sweeps": sweeps, "table": text}


if __name__ == "__main__":
    main()
