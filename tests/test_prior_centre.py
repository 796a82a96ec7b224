r"""A prior centred away from 0 (a local posterior, THEORY §6): :math:`U = \hat L + \tfrac\lambda2\lVert\theta - \theta_0\rVert^2`.

On the quadratic target (i) the centre only moves the mean: :math:`K = S + \lambda I`,
:math:`b_0 = b + \lambda\theta_0`, Gibbs law :math:`N(K^{-1}b_0, (\beta K)^{-1})`, exact ULA law with the
same mean and covariance :math:`\beta^{-1}[K(I - \eta K/2)]^{-1}`. Both samplers are z-tested with no
bias allowance, and the same chains must reject the uncentred mean. Then: where each front-end takes
:math:`\theta_0`, that it is saved, that gauge moves and balancing refuse it, and that the live
diagnostics use the centred force (and report the kinetic temperature of a kinetic chain).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from pinned import adam_pre19  # LangevinAdam with its pre-issue-19 defaults

from langevin_lora import BalanceSchedule, GaugeMoves, LangevinAdam, LangevinLoRA, LangevinSGD, balance_lora_
from langevin_lora.diagnostics import GibbsRecorder, stationarity_report
from langevin_lora.diagnostics.chains import batch_means_se
from langevin_lora.testing import Quadratic, run_chains, zscores
from callback_helpers import N, Tiny, loader, lora_tensors, trainer

Z_MAX = 4.5
DT = torch.float64
BETA, LAM = 10.0, 1.0
START = [2.0, -1.5, 1.0]

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_lightning")


def _target() -> Quadratic:
    rng = np.random.default_rng(31)
    X = rng.standard_normal((64, 3)) * np.array([1.0, 2.0, 3.0])
    y = X @ np.array([0.5, -0.5, 0.2]) + 0.5 * rng.standard_normal(64)
    return Quadratic(X, y, LAM)


def _centred_mean(target: Quadratic, centre) -> np.ndarray:
    return np.linalg.solve(target.K, target.b + LAM * np.asarray(centre))


def _upper(x):
    i, j = np.triu_indices(x.shape[-1])
    return x[..., i, j]


def _moments(theta, mean):
    def stats():
        c = theta.detach() - torch.from_numpy(mean)
        return {"mean": theta.detach().clone(), "cov": _upper(c[:, :, None] * c[:, None, :])}
    return stats


@pytest.mark.parametrize("kinetic", [False, True])
def test_centred_prior_exact_gaussian_law(kinetic):
    """LangevinSGD(prior_centre="burn_in"), every chain starting at theta_s (so theta_0 = theta_s): overdamped,
    the exact ULA law; kinetic (h sqrt(lambda_max) = 1), the exact Gibbs law. The uncentred mean K^-1 b is rejected."""
    target, C = _target(), 512
    ev = np.linalg.eigvalsh(target.K)
    mean = _centred_mean(target, START)
    theta = torch.nn.Parameter(torch.tensor([START], dtype=DT).repeat(C, 1))
    if kinetic:
        h = 1.0 / math.sqrt(ev.max())
        opt = LangevinSGD([theta], lr=h, beta=BETA, weight_decay=LAM, seed=41, friction=2 * math.sqrt(ev.min()),
                          prior_centre="burn_in")
        cov, rate = target.gibbs_cov(BETA), h * math.sqrt(ev.min())
    else:
        eta = 0.1 / ev.max()
        opt = LangevinSGD([theta], lr=eta, beta=BETA, weight_decay=LAM, seed=42, prior_centre="burn_in")
        cov, rate = target.ula_cov(eta, BETA), eta * ev.min()

    def set_grads():
        theta.grad = target.grad(theta.detach())

    avg = run_chains(opt, set_grads, _moments(theta, mean), n_steps=round(150 / rate), burn_in=round(15 / rate),
                     every=2)
    assert torch.equal(opt.state[theta]["prior_centre"], torch.tensor([START], dtype=DT).repeat(C, 1))
    z = {"mean": zscores(avg["mean"], mean), "cov": zscores(avg["cov"], _upper(cov))}
    zmax = max(float(np.abs(v).max()) for v in z.values())
    z_wrong = float(np.abs(zscores(avg["mean"], target.mean)).max())
    print(f"\n[centred prior, kinetic={kinetic}] max|z| = {zmax:.2f}; vs the uncentred mean: {z_wrong:.0f}")
    assert zmax <= Z_MAX and z_wrong > 10


def test_adam_centre_is_the_freeze_point_and_is_saved():
    target = _target()
    theta = torch.nn.Parameter(torch.zeros(8, 3, dtype=DT))
    opt = adam_pre19([theta], lr=0.05, beta=BETA, weight_decay=LAM, burn_in_steps=5, seed=0, prior_centre="burn_in")
    for _ in range(5):
        theta.grad = target.grad(theta.detach())
        opt.step()
    frozen_at = theta.detach().clone()
    assert "prior_centre" not in opt.state[theta]
    for _ in range(3):
        theta.grad = target.grad(theta.detach())
        opt.step()
    assert torch.equal(opt.state[theta]["prior_centre"], frozen_at)
    assert torch.equal(opt.state_dict()["state"][0]["prior_centre"], frozen_at)
    assert opt.langevin_groups()[0].prior_centre[0] is opt.state[theta]["prior_centre"]
    with pytest.raises(ValueError, match=r"Invalid prior_centre: 'middle' \(expected one of 'zero', 'burn_in'\)"):
        adam_pre19([theta], lr=0.1, beta=1.0, prior_centre="middle")


def test_callback_burn_in_centre_gauge_refusals():
    """LangevinLoRA(prior_centre="burn_in"): theta_0 = the LoRA tensors when sampling starts, in the checkpoint;
    gauge moves are refused at construction, GaugeMoves and balance_lora_ refuse a centred sampler."""

    with pytest.raises(ValueError, match="gauge_moves.*prior_centre"):
        LangevinLoRA(beta=1.0, prior_centre="burn_in", gauge_moves=GaugeMoves())
    with pytest.raises(ValueError, match="prior_centre"):
        LangevinLoRA(beta=1.0, prior_centre="start")
    snap = {}
    cb = LangevinLoRA(num_data=N, burn_in_steps=3, weight_decay=0.1, seed=0, prior_centre="burn_in",
                      balance=BalanceSchedule(every_n_steps=1), diagnostics=False)
    cb.step_observers.append(lambda tr, pl, c: snap.setdefault("start", lora_tensors(pl)) if c.langevin_steps == 0
                             else None)
    mod = Tiny()
    trainer([cb], 8).fit(mod, loader())
    state = cb.state_dict()["engine"]["state"]
    assert set(snap["start"]) == set(state)
    for n, t in snap["start"].items():
        assert torch.equal(state[n]["prior_centre"], t), n
    assert all(v.prior_centre is not None for v in cb.langevin_groups())
    with pytest.raises(ValueError, match="centred away from 0"):
        GaugeMoves()([], beta=1.0, weight_decay=0.1, sampler=cb)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = LangevinSGD([p], lr=0.1, beta=1.0, prior_centre="burn_in", seed=0)
    p.grad = torch.zeros(3)
    opt.step()
    with pytest.raises(ValueError, match="centred away from 0"):
        GaugeMoves()([], beta=1.0, weight_decay=0.1, sampler=opt)
    opt_mod = Tiny()
    lora = [q for n, q in opt_mod.named_parameters() if "lora_" in n]
    opt2 = LangevinSGD(lora, lr=0.1, beta=1.0, prior_centre="burn_in", seed=0)
    for q in lora:
        q.grad = torch.zeros_like(q)
    opt2.step()
    with pytest.raises(ValueError, match="prior centred at 0"):
        balance_lora_(opt_mod.model, optimizer=opt2)


def test_recorder_uses_the_centred_force_and_reports_the_kinetic_temperature():
    r"""A kinetic chain on the centred quadratic (exact Gibbs law): the recorder's virial temperature, computed
    with the centred force g + lambda (theta - theta_0), and its kinetic temperature beta p^T G^-1 p/d are 1
    within their standard errors; the mean force passes; the stationarity report has a passing
    kinetic_temperature check. Built to fail: the uncentred force g + lambda theta on the same states has a
    mean far from 0 (a centred virial cannot see a constant force offset; the mean force does)."""
    target, C = _target(), 256
    ev = np.linalg.eigvalsh(target.K)
    h = 1.0 / math.sqrt(ev.max())
    mean = _centred_mean(target, START)
    theta = torch.nn.Parameter(torch.from_numpy(mean)[None].repeat(C, 1).clone())
    opt = LangevinSGD([theta], lr=h, beta=BETA, weight_decay=LAM, seed=43, friction=2 * math.sqrt(ev.min()))
    with torch.no_grad():   # centre every chain at START (set by hand: the engine slot any front-end fills)
        opt.engine.set_prior_centre([theta], [torch.tensor([START], dtype=DT).repeat(C, 1)])
    rec = GibbsRecorder(center_window=100)
    wrong, burn = 0.0, round(10 / (h * math.sqrt(ev.min())))
    for t in range(burn + 3000):
        theta.grad = target.grad(theta.detach())
        if t >= burn:
            rec.record(opt.langevin_groups(), loss=0.0)
            wrong = wrong + (theta.grad + LAM * theta.detach()) / 3000   # per-chain time average
        opt.step()
    out = rec.flush()
    assert "kinetic_temperature" in out and "gauge_gap" not in out
    vir, kin = np.asarray(rec.traces["virial_temperature"]), np.asarray(rec.traces["kinetic_temperature"])
    z_vir = (vir[100:].mean() - 1) / batch_means_se(vir[100:])
    z_kin = (kin.mean() - 1) / batch_means_se(kin)
    z_wrong = float(np.abs(zscores(wrong, np.zeros(3))).max())
    print(f"\n    virial {vir[100:].mean():.4f} (z {z_vir:.2f}), kinetic {kin.mean():.4f} (z {z_kin:.2f}), "
          f"uncentred mean force max|z| {z_wrong:.0f}")
    assert abs(z_vir) <= Z_MAX and abs(z_kin) <= Z_MAX
    assert z_wrong > 10
    prior = np.asarray(rec.traces["U"])   # loss 0: U is the centred prior, (lambda/2)|theta - theta_0|^2 summed
    assert np.all(prior > 0) and abs(prior.mean() / (0.5 * LAM * C * np.trace(target.gibbs_cov(BETA)) +
                                                     0.5 * LAM * C * np.sum((mean - START) ** 2)) - 1) < 0.05
    rep = stationarity_report(**rec.report_arguments())
    checks = {c.name: c for c in rep.checks}
    assert checks["kinetic_temperature"].status == "pass" and checks["mean_force_chi2"].status == "pass"
    assert checks["virial_temperature"].status == "pass"


def test_kinetic_temperature_check_fails_on_a_hot_momentum():
    """The report's kinetic_temperature check is not vacuous: a trace at 1.3 fails it."""
    rng = np.random.default_rng(0)
    rep = stationarity_report({"kinetic_temperature": 1.3 + 0.01 * rng.standard_normal(2000)})
    (check,) = [c for c in rep.checks if c.name == "kinetic_temperature"]
    assert check.status == "fail"
    assert not [c for c in stationarity_report({"U": rng.standard_normal(100)}).checks
                if c.name == "kinetic_temperature"]


def test_gauge_columns_skipped_only_for_centred_modules():
    """The gauge identity needs a prior centred at 0: a LoRA module whose tensors have a centre gets no gauge gap."""
    from langevin_lora.diagnostics.layout import LoraModule, build_layout
    from langevin_lora.core.view import LangevinGroupView

    A, B = torch.zeros(2, 5), torch.zeros(4, 2)
    view = dict(name="g", params=[A, B], lr=0.1, beta=1.0, weight_decay=0.1, precond=None, sampling=True)
    plain = build_layout([LangevinGroupView(**view)], [LoraModule("m", A, B)])
    centred = build_layout([LangevinGroupView(**view, prior_centre=[A.clone(), B.clone()])], [LoraModule("m", A, B)])
    assert "gauge_gap/m" in plain.columns and "gauge_gap/m" not in centred.columns and centred.centred
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "kinetic_temperature" in build_layout([LangevinGroupView(**view, friction=1.0)], []).columns
