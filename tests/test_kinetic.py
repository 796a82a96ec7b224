r"""Kinetic (underdamped) Langevin, BAOAB (THEORY §2b): the functional core, its exact law on Gaussian
targets, the kick schedule, state, resume and the front-ends.

Exactness: for a Gaussian target, BAOAB's stationary :math:`\theta`-law is exactly the Gibbs law
:math:`N(K^{-1}b, (\beta K)^{-1})` at every stable :math:`h` (:math:`h\sqrt{\lambda_{\max}} < 2`) and
every :math:`\gamma`, and the stored momentum (before the closing half kick) is exactly
:math:`N(0, G/\beta)`: both are z-tested with no bias allowance at :math:`h\sqrt{\lambda_{\max}} = 1`
and 1.5, where the overdamped chain's bias would be enormous. A chain whose O-step noise is 10% too
large must fail the same test.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from pinned import adam_pre19  # LangevinAdam with its pre-issue-19 defaults

from langevin_lora import LangevinAdam, LangevinLoRA, LangevinSGD
from langevin_lora.core.functional import auto_friction, kinetic_coefficients, kinetic_step_, langevin_step_
from langevin_lora.testing import Quadratic, run_chains, zscores
from callback_helpers import (LR, N, SEED, STEPS, WD, LoraOnly, Tiny, all_tensors, given_G, loader, trainable_tensors,
                              trainer)

Z_MAX = 4.5
DT = torch.float64
BETA, LAM = 10.0, 0.1

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_lightning")


def _upper(x):
    i, j = np.triu_indices(x.shape[-1])
    return x[..., i, j]


def _ill_conditioned() -> Quadratic:
    """d = 4, columns scaled 1 .. 10: eigenvalues of K from ~0.6 to ~100 (condition ~170)."""
    rng = np.random.default_rng(21)
    X = rng.standard_normal((64, 4)) * np.array([1.0, 2.0, 5.0, 10.0])
    y = X @ np.array([1.0, -0.5, 0.3, 0.1]) + 0.5 * rng.standard_normal(64)
    return Quadratic(X, y, LAM)


def _stats(theta, opt, mean):
    def stats():
        c = theta.detach() - torch.from_numpy(mean)
        p = opt.state[theta]["momentum"]
        return {"mean": theta.detach().clone(), "cov": _upper(c[:, :, None] * c[:, None, :]),
                "p_cov": _upper(p[:, :, None] * p[:, None, :])}
    return stats


def _z(avg, mean, cov, p_cov):
    return {"mean": zscores(avg["mean"], mean), "cov": zscores(avg["cov"], _upper(cov)),
            "p_cov": zscores(avg["p_cov"], _upper(p_cov))}


def _zmax(label, z):
    out = max(float(np.abs(v).max()) for v in z.values())
    print(f"\n[{label}] max|z| = {out:.2f} (" + ", ".join(f"{k} {np.abs(v).max():.2f}" for k, v in z.items()) + ")")
    return out


# -- the functional core -------------------------------------------------------------------------------
def _lists(seed, n=3, centre=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (2, 2, 2)][:n]

    def r(scale=1.0, shift=0.0):
        return [shift + scale * torch.randn(s, generator=g, dtype=DT) for s in shapes]

    G = r(0.3, 1.0)
    return dict(params=r(), grads=r(), momenta=r(), noise=r(), precond=[x.abs() for x in G],
                prior_centre=r() if centre else None)


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("precond", [False, True])
def test_kinetic_step_foreach_equals_single_tensor_bitwise(precond, centre):
    """Float64: the foreach and per-tensor paths of kinetic_step_ (and of langevin_step_ with a prior centre)
    agree bit for bit, with one kick per tensor (two distinct values) and a preconditioner."""
    outs = []
    for foreach in (True, False):
        L = _lists(0, centre=centre)
        G = L["precond"] if precond else None
        kinetic_step_(L["params"], L["grads"], L["momenta"], L["noise"], lr=0.3, kick=[0.15, 0.3, 0.3],
                      damping=0.7, noise_std=0.2, weight_decay=0.1, precond=G,
                      precond_sqrt=None if G is None else [x.sqrt() for x in G], prior_centre=L["prior_centre"],
                      foreach=foreach)
        M = _lists(1, centre=centre)
        langevin_step_(M["params"], M["grads"], M["noise"], lr=0.3, noise_std=0.2, weight_decay=0.1,
                       precond=M["precond"] if precond else None,
                       precond_sqrt=[x.sqrt() for x in M["precond"]] if precond else None,
                       prior_centre=M["prior_centre"], foreach=foreach)
        outs.append(L["params"] + L["momenta"] + M["params"])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_kinetic_step_is_baoab_by_hand():
    """One step against the formulas written out: kick k G (g + lam (theta - theta0)), A, O, A."""
    L = _lists(2, n=1)
    th, g, p, xi, G, c = (L[k][0].clone() for k in ("params", "grads", "momenta", "noise", "precond", "prior_centre"))
    h, k, damp, std, lam = 0.4, 0.3, 0.8, 0.25, 0.2
    kinetic_step_(L["params"], L["grads"], L["momenta"], L["noise"], lr=h, kick=k, damping=damp, noise_std=std,
                  weight_decay=lam, precond=L["precond"], precond_sqrt=[L["precond"][0].sqrt()],
                  prior_centre=L["prior_centre"])
    p = p - k * G * (g + lam * (th - c))
    th = th + h / 2 * p
    p = damp * p + std * G.sqrt() * xi
    th = th + h / 2 * p
    torch.testing.assert_close(L["params"][0], th, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(L["momenta"][0], p, rtol=1e-14, atol=1e-14)
    d, s = kinetic_coefficients(0.5, 2.0, 4.0)
    assert math.isclose(d, math.exp(-1.0)) and math.isclose(s, math.sqrt((1 - math.exp(-2.0)) / 4.0))
    assert kinetic_coefficients(0.5, 2.0, math.inf)[1] == 0.0


# -- exactness on Gaussian targets -----------------------------------------------------------------------
@pytest.mark.parametrize("c", [1.0, 1.5])
def test_kinetic_sgd_gaussian_law_is_exact_at_large_steps(c):
    r"""LangevinSGD(friction): theta ~ N(K^-1 b, (beta K)^-1) and the stored momentum ~ N(0, I/beta) exactly,
    at h sqrt(lambda_max) = c in {1, 1.5}, gamma = 2 sqrt(lambda_min) (critical damping of the slowest mode):
    no bias allowance. The overdamped chain at the same eta = h would be unstable (eta lambda_max = c
    sqrt(lambda_max) ~ 10-15)."""
    target, C = _ill_conditioned(), 1024
    ev = np.linalg.eigvalsh(target.K)
    h, gamma = c / math.sqrt(ev.max()), 2 * math.sqrt(ev.min())
    theta = torch.nn.Parameter(torch.zeros(C, 4, dtype=DT))
    opt = LangevinSGD([theta], lr=h, beta=BETA, weight_decay=LAM, seed=11, friction=gamma)

    def set_grads():
        theta.grad = target.grad(theta.detach())

    burn = int(15 / (h * math.sqrt(ev.min())))  # the slowest mode relaxes at ~h sqrt(lambda_min) per step
    avg = run_chains(opt, set_grads, _stats(theta, opt, target.mean), n_steps=3000, burn_in=burn, every=2)
    z = _z(avg, target.mean, target.gibbs_cov(BETA), np.eye(4) / BETA)
    assert _zmax(f"kinetic SGD, h sqrt(lam_max) = {c}", z) <= Z_MAX


def test_kinetic_adam_frozen_preconditioner_gaussian_law_is_exact():
    r"""LangevinAdam after an Adam warm-up (G frozen, anisotropic), then BAOAB with mass G^-1 at
    h sqrt(lambda_max(G^1/2 K G^1/2)) = 1.2: theta ~ N(K^-1 b, (beta K)^-1) and p ~ N(0, G/beta), exactly."""
    target, C = _ill_conditioned(), 1024
    theta = torch.nn.Parameter(torch.tensor([[2.0, -1.0, 0.5, 0.2]], dtype=DT).repeat(C, 1))
    opt = adam_pre19([theta], lr=0.05, beta=BETA, weight_decay=LAM, burn_in_steps=200, seed=12, friction=1.0)
    for _ in range(200):
        theta.grad = target.grad(theta.detach())
        opt.step()
    assert opt.sampling
    G = opt.state[theta]["precond"][0].numpy().copy()
    assert G.max() / G.min() > 3
    sq = np.sqrt(G)
    ev = np.linalg.eigvalsh(sq[:, None] * target.K * sq[None, :])
    h = 1.2 / math.sqrt(ev.max())
    opt.param_groups[0]["lr"] = h
    opt.param_groups[0]["friction"] = 2 * math.sqrt(ev.min())

    def set_grads():
        theta.grad = target.grad(theta.detach())

    burn = int(15 / (h * math.sqrt(ev.min())))
    avg = run_chains(opt, set_grads, _stats(theta, opt, target.mean), n_steps=3000, burn_in=burn, every=2)
    z = _z(avg, target.mean, target.gibbs_cov(BETA), np.diag(G) / BETA)
    print(f"    G = {np.array2string(G, precision=3)}, eig(G^1/2 K G^1/2) = {np.array2string(ev, precision=3)}")
    assert _zmax("kinetic LangevinAdam, frozen G, h sqrt(lam_max) = 1.2", z) <= Z_MAX


def test_wrong_o_step_noise_is_detected():
    """Built to fail: the same BAOAB chain with its O-step noise 10% too large (written by hand around the
    project's kinetic_step_) samples a visibly hotter law: the Gibbs z-test rejects it (|z| > 10), while
    it matches its own exact law (discrete Lyapunov equation of the linear chain)."""
    target, C = _ill_conditioned(), 1024
    ev = np.linalg.eigvalsh(target.K)
    h, gamma = 1.0 / math.sqrt(ev.max()), 2 * math.sqrt(ev.min())
    damping, std = kinetic_coefficients(h, gamma, BETA)
    theta, p = torch.zeros(C, 4, dtype=DT), torch.zeros(C, 4, dtype=DT)
    gen = torch.Generator().manual_seed(13)
    burn, steps = int(15 / (h * math.sqrt(ev.min()))), 3000
    sums, count = {"mean": 0.0, "cov": 0.0}, 0
    for t in range(burn + steps):
        kinetic_step_([theta], [target.grad(theta)], [p], [torch.randn(C, 4, generator=gen, dtype=DT)], lr=h,
                      kick=h, damping=damping, noise_std=1.1 * std, weight_decay=LAM)
        if t >= burn and t % 2 == 0:
            c = theta - torch.from_numpy(target.mean)
            sums["mean"] = sums["mean"] + theta
            sums["cov"] = sums["cov"] + _upper(c[:, :, None] * c[:, None, :])
            count += 1
    avg = {k: v / count for k, v in sums.items()}
    z_gibbs = {"mean": zscores(avg["mean"], target.mean), "cov": zscores(avg["cov"], _upper(target.gibbs_cov(BETA)))}
    assert _zmax("kinetic with 10% too much O-noise vs Gibbs: must FAIL", z_gibbs) > 10
    # its own law: state (theta, p) -> linear map; the O noise enters p and then theta through the last A
    d, I, K = 4, np.eye(4), target.K
    B = np.block([[I, 0 * I], [-h * K, I]])
    A = np.block([[I, h / 2 * I], [0 * I, I]])
    O = np.block([[I, 0 * I], [0 * I, damping * I]])
    M = A @ O @ A @ B
    E = A @ np.vstack([0 * I, I])
    Q = (1.1 * std) ** 2 * E @ E.T
    cov = scipy.linalg.solve_discrete_lyapunov(M, Q)[:d, :d]
    z_own = {"cov": zscores(avg["cov"], _upper(0.5 * (cov + cov.T)))}
    assert _zmax("the same chains vs their own (wrong) exact law", z_own) <= Z_MAX


# -- the kick schedule, temperature 0, init, state ----------------------------------------------------------
def _baoab_reference(theta0, grad, lrs, gamma, lam, G):
    """Full BAOAB (both half kicks in every step, so two gradients per step), noise-free, p0 = 0."""
    th, p, out = theta0.clone(), torch.zeros_like(theta0), []
    for h in lrs:
        p = p - h / 2 * G * (grad(th) + lam * th)
        th = th + h / 2 * p
        p = math.exp(-gamma * h) * p
        th = th + h / 2 * p
        p = p - h / 2 * G * (grad(th) + lam * th)
        out.append(th.clone())
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_temperature_zero_is_damped_dynamics_with_consistent_kicks_under_a_schedule(optimizer):
    r"""T = 0: deterministic damped dynamics, no generator used. Under a changing step size the one-gradient
    scheme (kick (h_{t-1} + h_t)/2, h/2 at the first step) equals full BAOAB with each step's own h/2 kicks."""
    target = _ill_conditioned()
    th0 = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=DT)
    theta = torch.nn.Parameter(th0.clone())
    lrs = [0.02 * (1 + 0.5 * math.sin(t)) for t in range(40)]
    if optimizer == "sgd":
        opt = LangevinSGD([theta], lr=lrs[0], beta=BETA, temperature=0.0, weight_decay=LAM, friction=1.5, seed=0)
        G = torch.ones(4, dtype=DT)
    else:
        opt = adam_pre19([theta], lr=lrs[0], beta=BETA, temperature=0.0, weight_decay=LAM, friction=1.5,
                           burn_in_steps=None, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.start_sampling()
        G = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DT)
        opt.engine.freeze([], fixed={theta: G.clone().expand(1, 4).contiguous()})
    gen_before = copy.deepcopy(opt.generators.state_dict())
    ours = []
    for h in lrs:
        opt.param_groups[0]["lr"] = h
        theta.grad = target.grad(theta.detach())
        opt.step()
        ours.append(theta.detach().clone())
    ref = _baoab_reference(th0, target.grad, lrs, 1.5, LAM, G)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours[0], ours[-1])
    assert opt.generators.state_dict() == gen_before   # nothing drawn (lazy generators: none built)
    assert opt.engine.kinetic_lr == {"0": lrs[-1]}


def test_initial_momentum_is_drawn_from_its_stationary_law():
    r"""With no force (zero gradient and decay), p ~ N(0, G/beta) is invariant under the O step, so after
    any number of steps beta p^2/G has mean 1 and variance 2 per coordinate: z-tested over 20,000 coordinates."""
    G = torch.linspace(0.1, 10.0, 20000, dtype=DT)
    theta = torch.nn.Parameter(torch.zeros(20000, dtype=DT))
    opt = adam_pre19([theta], lr=0.1, beta=BETA, friction=0.7, burn_in_steps=None, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.start_sampling()
    opt.engine.freeze([], fixed={theta: G.clone()})
    for steps in (1, 5):
        for _ in range(steps):
            theta.grad = torch.zeros_like(theta)
            opt.step()
        u = BETA * opt.state[theta]["momentum"] ** 2 / G
        z = (float(u.mean()) - 1.0) / math.sqrt(2.0 / u.numel())
        assert abs(z) <= Z_MAX, (steps, z)


def test_freeze_and_refreeze_rescale_momentum_to_the_new_mass():
    r"""A momentum p ~ N(0, G/beta) stays N(0, G'/beta) when G is replaced: p <- p sqrt(G'/G) (p/sqrt(G) kept)."""
    from langevin_lora import LangevinEngine

    eng = LangevinEngine(seed=0)
    eng.freeze([], fixed={"w": torch.full((3,), 4.0, dtype=DT)})
    eng.state["w"]["momentum"] = torch.tensor([1.0, -2.0, 3.0], dtype=DT)
    eng.freeze([], fixed={"w": torch.full((3,), 9.0, dtype=DT)})
    assert torch.allclose(eng.state["w"]["momentum"], torch.tensor([1.5, -3.0, 4.5], dtype=DT))
    eng.state["w"]["adapt_sq"] = torch.tensor([1.0, 4.0, 16.0], dtype=DT)
    before = eng.state["w"]["momentum"] / eng.state["w"]["precond"].sqrt()
    (G,) = eng.refreeze({"w": 1}, reference=2.0)
    assert not torch.equal(G, torch.full((3,), 9.0, dtype=DT))
    torch.testing.assert_close(eng.state["w"]["momentum"] / G.sqrt(), before)
    fresh = LangevinEngine(seed=0)   # no G before: the identity
    fresh.state["v"] = {"momentum": torch.ones(2, dtype=DT)}
    fresh.freeze([], fixed={"v": torch.full((2,), 4.0, dtype=DT)})
    assert torch.equal(fresh.state["v"]["momentum"], torch.full((2,), 2.0, dtype=DT))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bitwise_and_nonfinite_step_changes_nothing(optimizer):
    """state_dict after k steps, loaded into a new optimizer, continues bitwise (momenta, last step size,
    generators); a NaN gradient skips the step without touching parameters, momenta or generators."""
    target = _ill_conditioned()

    def make():
        theta = torch.nn.Parameter(torch.linspace(-1, 1, 32 * 4, dtype=DT).reshape(32, 4))
        if optimizer == "sgd":
            opt = LangevinSGD([theta], lr=0.05, beta=BETA, weight_decay=LAM, friction=2.0, seed=9)
        else:
            opt = adam_pre19([theta], lr=0.05, beta=BETA, weight_decay=LAM, friction=2.0, burn_in_steps=3, seed=9)
        return theta, opt

    def run(theta, opt, steps, start):
        for t in range(start, start + steps):
            opt.param_groups[0]["lr"] = 0.05 / (1 + 0.1 * t)
            theta.grad = target.grad(theta.detach())
            opt.step()

    theta, opt = make()
    run(theta, opt, 6, 0)
    saved = copy.deepcopy(opt.state_dict())
    saved_theta = theta.detach().clone()
    run(theta, opt, 6, 6)

    theta2, opt2 = make()
    with torch.no_grad():
        theta2.copy_(saved_theta)
    opt2.load_state_dict(saved)
    run(theta2, opt2, 6, 6)
    assert torch.equal(theta, theta2)
    assert torch.equal(opt.state[theta]["momentum"], opt2.state[theta2]["momentum"])

    before = (theta.detach().clone(), opt.state[theta]["momentum"].clone(), dict(opt.engine.kinetic_lr),
              copy.deepcopy(opt.generators.state_dict()))
    theta.grad = torch.full_like(theta, math.nan)
    with pytest.warns(Warning, match="non-finite"):
        opt.step()
    assert torch.equal(theta, before[0]) and torch.equal(opt.state[theta]["momentum"], before[1])
    assert opt.engine.kinetic_lr == before[2]
    assert torch.equal(opt.generators.state_dict()["states"]["cpu"], before[3]["states"]["cpu"])


def test_friction_validation_and_auto():
    p = torch.nn.Parameter(torch.zeros(3))
    for bad in (0.0, -1.0, "fast", math.inf, True):
        with pytest.raises(ValueError, match="friction"):
            LangevinSGD([p], lr=0.1, beta=1.0, friction=bad)
    with pytest.raises(ValueError, match="friction"):
        LangevinSGD([{"params": [p], "friction": -2.0}], lr=0.1, beta=1.0)
    with pytest.raises(ValueError, match="friction"):
        LangevinLoRA(beta=1.0, friction=0.0)
    assert math.isclose(auto_friction(0.04, None), 0.4)
    G = [torch.tensor([4.0, 9.0]), torch.tensor([1.0, 16.0])]
    assert math.isclose(auto_friction(0.25, G), 1.0)
    with pytest.raises(ValueError, match="weight_decay > 0"):
        auto_friction(0.0, None)
    opt = LangevinSGD([p], lr=0.1, beta=1.0, weight_decay=0.04, friction="auto", seed=0)
    p.grad = torch.zeros(3)
    opt.step()
    assert math.isclose(opt.langevin_groups()[0].friction, 0.4)


def test_per_group_friction_override():
    """A group's friction overrides the default (read per step): one group overdamped, one kinetic."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = LangevinSGD([{"params": [a]}, {"params": [b], "friction": 1.0}], lr=0.1, beta=1.0, seed=0)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert "momentum" not in opt.state[a] and "momentum" in opt.state[b]
    views = opt.langevin_groups()
    assert views[0].friction is None and views[1].friction == 1.0 and views[1].momentum is not None
    opt.param_groups[1]["friction"] = None   # back to overdamped: the momentum is dropped
    opt.step()
    assert "momentum" not in opt.state[b]


# -- the callback ------------------------------------------------------------------------------------------
class KineticLoraOnly(LoraOnly):
    def __init__(self, mode, precond=None, friction=None):
        super().__init__(mode, precond)
        self.friction = friction

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        for g in getattr(opt, "param_groups", []):
            g["friction"] = self.friction if self.mode != "sgd" else g.get("friction")
        return opt


@pytest.mark.filterwarnings("ignore:.*no Adam second moment")
@pytest.mark.parametrize("preconditioned", [False, True])
def test_callback_and_optimizer_give_the_same_kinetic_chain(preconditioned):
    """The engine under both front-ends: LangevinSGD/adam_pre19(friction) and LangevinLoRA(friction) over
    torch SGD give the same kinetic chain bit for bit (momenta drawn from the same generators)."""

    G = given_G() if preconditioned else None
    opt_mod = KineticLoraOnly("langevin_adam" if preconditioned else "langevin_sgd", precond=G, friction=3.0)
    trainer([], STEPS).fit(opt_mod, loader())
    cb = LangevinLoRA(num_data=N, weight_decay=WD, seed=SEED, burn_in_steps=0, precondition=preconditioned,
                      diagnostics=False, friction=3.0, step_size="optimizer")
    if preconditioned:
        def inject(tr, pl, c):
            if c.langevin_steps == 0:
                c.engine.freeze([], fixed={n: G[n].clone() for n in G})
        cb.step_observers.append(inject)
    cb_mod = KineticLoraOnly("sgd")
    trainer([cb], STEPS).fit(cb_mod, loader())
    assert LR and cb.langevin_steps == STEPS
    a, b = trainable_tensors(opt_mod), trainable_tensors(cb_mod)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert all(v.friction == 3.0 and v.momentum is not None for v in cb.langevin_groups())


def test_callback_kinetic_kill_and_resume_is_bitwise(tmp_path):
    """A kinetic callback chain under an LR schedule, checkpointed at step k and resumed, ends bitwise equal
    (momenta and the last step size travel in the checkpoint)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    k, burn = 8, 3

    def make():
        return LangevinLoRA(num_data=N, burn_in_steps=burn, weight_decay=0.1, seed=4, friction=2.0)

    L.seed_everything(0, verbose=False)
    full, cb_full = Tiny(), make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    trainer([cb_full, ckpt], 2 * k, enable_checkpointing=True).fit(full, loader())
    state = torch.load(tmp_path / f"step={k}.ckpt", weights_only=False)
    cb_state = next(v for key, v in state["callbacks"].items() if "LangevinLoRA" in key)
    assert all("momentum" in s for s in cb_state["engine"]["state"].values()) and cb_state["engine"]["kinetic_lr"]
    L.seed_everything(123, verbose=False)
    resumed, cb_res = Tiny(), make()
    trainer([cb_res], 2 * k).fit(resumed, loader(), ckpt_path=tmp_path / f"step={k}.ckpt")
    for (n, a), b in zip(all_tensors(full).items(), all_tensors(resumed).values()):
        assert torch.equal(a, b), n
    for n, s in cb_full.engine.state.items():
        assert torch.equal(s["momentum"], cb_res.engine.state[n]["momentum"]), n
