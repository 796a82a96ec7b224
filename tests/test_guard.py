"""The divergence guard (issue 13 item 2): a runaway is caught, restored and cut; a chain that cannot be
stabilised raises; a stable chain never triggers it; the engine's snapshots cover every slot."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from pinned import adam_pre19  # LangevinAdam with its pre-issue-19 defaults

from langevin_lora import LangevinAdam, LangevinSGD
from langevin_lora.core.engine import LangevinEngine
from langevin_lora.core.guard import Divergence, DivergenceError, DivergenceGuard, DivergenceWarning

BETA, LAM = 10.0, 0.1
K = torch.tensor([1.0, 2.0, 5.0, 10.0], dtype=torch.float64)   # loss Hessian; U's is K + LAM
H = K + LAM


def quadratic_loss(theta):
    """Sum over chains (rows) of each chain's mean loss 0.5 theta^T K theta."""
    return 0.5 * (theta.square() * K).sum()


def run_chain(theta, opt, guard, steps, loss_fn=quadratic_loss, noise=None, record_from=None):
    """A custom loop with the guard's custom-loop API; returns the per-chain sums of theta^2 after
    ``record_from`` and the number of recorded steps."""
    acc, n = torch.zeros_like(theta), 0
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        if noise is not None:
            theta.grad.add_(noise())
        guard.before_step(opt, loss.detach())
        opt.step()
        guard.after_step(opt)
        if record_from is not None and t >= record_from:
            acc += theta.detach().square()
            n += 1
    return acc, n


def test_forced_unstable_chain_is_caught_cut_and_then_samples_its_target():
    """eta*lambda_max = 4 (a factor 3 growth per step along the top mode): the guard sees the runaway,
    restores the start, cuts the step to eta*lambda_max = 1 (stable) with a DivergenceWarning giving
    the numbers; afterwards the chains stay finite and their variances match the exact ULA law at the
    cut step, beta^-1 [H (1 - eta H / 2)]^-1 (THEORY §5 (i)), by a z-test across 256 chains."""
    C = 256
    gen = torch.Generator().manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(C, 4, generator=gen, dtype=torch.float64) * 0.3)
    eta = 4.0 / float(H.max())
    opt = LangevinSGD([theta], lr=eta, beta=BETA, weight_decay=LAM, seed=1, guard=False)
    guard = DivergenceGuard()
    with pytest.warns(DivergenceWarning, match=r"diverged: .*threshold.*cut the step by 0.25 \(cut 1 of 5"):
        acc, n = run_chain(theta, opt, guard, 3000, record_from=500)
    assert guard.cuts == 1 and guard.scale == 0.25 and len(guard.events) == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(eta / 4)
    assert torch.isfinite(theta).all()
    final_eta = opt.param_groups[0]["lr"]
    exact = 1.0 / (BETA * H * (1.0 - final_eta * H / 2))   # per-coordinate ULA variance (mean 0)
    per_chain = acc / n                                    # (C, 4)
    z = (per_chain.mean(0) - exact) / (per_chain.std(0) / math.sqrt(C))
    assert z.abs().max() <= 4.5, (per_chain.mean(0), exact, z)


def test_unrecoverable_chain_raises_after_the_last_cut():
    """A potential unbounded below (negative curvature 4096 times eta's scale): every cut still runs
    away, and after max_cuts cuts the guard raises DivergenceError naming the statistic."""
    theta = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LangevinSGD([theta], lr=1.0, beta=BETA, weight_decay=LAM, seed=0, guard=False)
    guard = DivergenceGuard(max_cuts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        with pytest.raises(DivergenceError, match=r"ran away again \(.*\) after 3 step cuts .*cannot be stabilised"):
            run_chain(theta, opt, guard, 10_000, loss_fn=lambda th: -2048.0 * th.square().sum())
    assert guard.cuts == 3 and len(guard.events) == 4


def test_a_run_of_bad_batches_is_not_divergence():
    """Issue 19 defect 3: non-finite batches at finite, in-range parameters are skipped, counted, warned about
    once (a constant message Python deduplicates), and are no runaway: nothing is restored or cut, the step
    keeps its size, and the chain goes on when the data recovers. (On main three such batches in a row cut
    the step 4x for the rest of the run.)"""
    from langevin_lora import NonFiniteGradientWarning

    theta = torch.nn.Parameter(torch.ones(3))
    opt = LangevinSGD([theta], lr=1e-2, beta=BETA, weight_decay=LAM, seed=0, guard=False)
    guard = DivergenceGuard(max_cuts=2)
    calls = {"n": 0}

    def loss_fn(th):
        calls["n"] += 1
        bad = 5 < calls["n"] <= 40   # 35 bad batches in a row, then good data again
        return th.square().sum() * (math.nan if bad else 1.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")   # Python's default filter: one line per message and call site
        run_chain(theta, opt, guard, 100, loss_fn=loss_fn)
    assert guard.cuts == 0 and guard.events == [] and guard.scale == 1.0
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.skipped_steps == 35
    assert sum(issubclass(w.category, NonFiniteGradientWarning) for w in caught) == 1
    # max_skips in a row: one warning that the data, not the chain, produces them
    notes = [w for w in caught if issubclass(w.category, DivergenceWarning)]
    assert len(notes) == 1 and "not a divergence" in str(notes[0].message)
    assert torch.isfinite(theta).all() and guard.steps == 65


def test_a_chain_that_runs_away_into_nonfinite_gradients_is_still_caught():
    """Issue 19 defect 3, the other half: a runaway (eta*lambda_max = 40) jumps past the |theta|^2 threshold
    and its next gradients are non-finite (the loss overflows there): the skipped step judges the
    parameters, finds them out of range, and the guard restores and cuts, and raises after its last cut."""
    from langevin_lora import NonFiniteGradientWarning

    theta = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LangevinSGD([theta], lr=40.0 / float(H.max()), beta=BETA, weight_decay=LAM, seed=0, guard=False)
    guard = DivergenceGuard(max_cuts=1)

    def loss_fn(th):   # finite near the start, NaN once |theta|^2 is large (an overflowing loss)
        scale = math.nan if float(th.detach().square().sum()) > 1e4 else 1.0
        return 0.5 * (th.square() * K[:3]).sum() * scale * (1 + 0 * th.sum())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteGradientWarning)
        warnings.simplefilter("ignore", DivergenceWarning)
        with pytest.raises(DivergenceError, match=r"\|theta\|\^2 at a step with non-finite gradients"):
            run_chain(theta, opt, guard, 200, loss_fn=lambda th: 1e6 * loss_fn(th))
    assert guard.cuts == 1 and all("non-finite gradients" in e.reason for e in guard.events)
    assert torch.isfinite(theta).all()


@pytest.mark.parametrize("dim, eta_lam, rho, steps", [(1, 1.0, 0.0, 12_000), (1, 0.1, 0.0, 6000), (4, 0.1, 1.0, 6000),
                                                     (1000, 0.5, 0.3, 3000)])
def test_stable_chains_never_trigger_the_guard(dim, eta_lam, rho, steps, one_thread):
    """False alarms: single chains (small d is the worst case for the window means' tails) at stable
    steps up to eta*lambda_max = 1, with and without minibatch-like gradient noise (ratio rho), started
    3 standard deviations away from the mode, run thousands of steps (hundreds of windows and
    snapshots) without a single event."""
    gen = torch.Generator().manual_seed(dim)
    k = torch.linspace(1.0, 10.0, dim, dtype=torch.float64)
    h = k + LAM
    eta = eta_lam / float(h.max())
    theta = torch.nn.Parameter(3.0 / torch.sqrt(BETA * h))
    opt = LangevinSGD([theta], lr=eta, beta=BETA, weight_decay=LAM, seed=dim)
    guard = DivergenceGuard()
    sigma = math.sqrt(2 * rho / (eta * BETA))   # rho = eta beta tr(Sigma_B) / (2 d)

    def loss_fn(th):
        return 0.5 * (th.square() * k).sum()

    def noise():
        return sigma * torch.randn(dim, generator=gen, dtype=torch.float64)

    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        run_chain(theta, opt, guard, steps, loss_fn=loss_fn, noise=noise if rho else None)
    assert guard.events == [] and guard.cuts == 0 and guard.steps == steps


def test_langevin_adam_warmup_groups_are_not_watched():
    """Custom loop with LangevinAdam: the guard starts with the first sampling step (warm-up groups are
    Adam, not a chain) and a stable chain passes."""
    theta = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = adam_pre19([theta], lr=1e-2, beta=BETA, weight_decay=LAM, burn_in_steps=20, seed=0)
    guard = DivergenceGuard()
    for t in range(60):
        opt.zero_grad()
        loss = quadratic_loss(theta)
        loss.backward()
        guard.before_step(opt, loss)
        assert guard.started == (t >= 20)
        opt.step()
        guard.after_step(opt)
    assert guard.steps == 40 and guard.events == []


def test_engine_snapshot_restores_every_slot_generically():
    """snapshot/restore cover the work tensors (fp32 masters of bf16 parameters included) and any slot
    (a stand-in for kinetic momenta), in place when shapes agree; slots made after the snapshot go."""
    eng = LangevinEngine(seed=0)
    p = torch.nn.Parameter(torch.randn(3, 2).to(torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(4))
    params = {"p": p, "q": q}
    master = eng.work_tensor("p", p)
    eng.state["q"] = {"momentum": torch.ones(4), "count": 3}
    mom = eng.state["q"]["momentum"]
    snap = eng.snapshot(params)
    with torch.no_grad():
        master.add_(1.0)
        p.copy_(master)
        q.mul_(5.0)
        mom.fill_(7.0)
        eng.state["q"]["count"] = 9
        eng.state["p"]["momentum"] = torch.zeros(3, 2)   # made after the snapshot
    eng.restore(snap, params)
    assert torch.equal(eng.state["p"]["master"], snap["works"]["p"]) and "momentum" not in eng.state["p"]
    assert torch.equal(p, snap["works"]["p"].to(torch.bfloat16))
    assert torch.equal(q, snap["works"]["q"])
    assert eng.state["q"]["momentum"] is mom and torch.equal(mom, torch.ones(4)) and eng.state["q"]["count"] == 3


def test_guard_statistics_and_validation():
    assert str(Divergence("U", 12.0, 3.0, 7)) == "U = 12 (threshold 3) at step 7"
    for kwargs, match in [(dict(window=0), "window"), (dict(cut=1.0), "cut"), (dict(virial_limit=1.0), "virial_limit"),
                          (dict(theta_factor=0.5), "theta_factor"), (dict(max_skips=0), "max_skips")]:
        with pytest.raises(ValueError, match=f"Invalid {match}"):
            DivergenceGuard(**kwargs)
    with pytest.raises(RuntimeError, match="observe before start"):
        DivergenceGuard().observe([])
