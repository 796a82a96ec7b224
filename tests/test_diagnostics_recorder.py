"""GibbsRecorder without a Trainer: its traces equal the functional estimators recomputed on the
same chain, its micro-batch moments equal minibatch_noise_trace / gradient_square, and a recorder
loaded from a state dict mid-run continues exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from langevin_lora import LangevinSGD
from langevin_lora.diagnostics import (
    GibbsRecorder,
    WindowCenter,
    gradient_square,
    mean_force_chi2,
    noise_ratio,
    virial_temperature,
)
from langevin_lora.core.view import LangevinGroupView
from diag_helpers import Quadratic


def _quadratic_run(recorder, q, theta, opt, steps, split_at=None):
    """Record ``steps`` SGLD steps on the quadratic; returns the recorder in use at the end (a fresh
    one loaded from the state dict at ``split_at``, as a resumed process would)."""
    for t in range(steps):
        if t == split_at:
            state = recorder.state_dict()
            recorder = GibbsRecorder(center_window=5, center_mode="previous", block_size=4)
            recorder.load_state_dict(state)
        opt.zero_grad()
        loss = q.loss(theta)
        loss.backward()
        recorder.record(opt.langevin_groups(), loss=loss)
        opt.step()
        if recorder.pending >= 7:
            recorder.flush()
    recorder.flush()
    return recorder


def test_recorder_without_trainer_matches_the_functional_forms_and_resumes():
    q = Quadratic.make()
    runs = []
    for split in (None, 23):
        theta = torch.nn.Parameter(q.stationary_draw(1, 0.02, seed=0)[0].clone())
        opt = LangevinSGD([theta], lr=0.02, beta=q.beta, weight_decay=q.lam, seed=1)
        runs.append((_quadratic_run(GibbsRecorder(center_window=5, center_mode="previous", block_size=4),
                                    q, theta, opt, 40, split_at=split), theta))
    (rec, _), (rec_resumed, _) = runs
    for name in rec.traces:
        np.testing.assert_array_equal(rec_resumed.traces[name], rec.traces[name], err_msg=name)
    assert rec_resumed.mean_force_chi2() == rec.mean_force_chi2()

    # The same chain recomputed with the functional estimators.
    theta = torch.nn.Parameter(q.stationary_draw(1, 0.02, seed=0)[0].clone())
    opt = LangevinSGD([theta], lr=0.02, beta=q.beta, weight_decay=q.lam, seed=1)
    center = WindowCenter(5, "previous")
    virial, U, forces = [], [], []
    for _ in range(40):
        with torch.no_grad():
            g = q.grad(theta)
            virial.append(float(virial_temperature([theta], [g], center([theta]), weight_decay=q.lam, beta=q.beta)))
            U.append(float(q.loss(theta) + q.lam / 2 * theta.square().sum()))
            forces.append(g + q.lam * theta)
        theta.grad = g.clone()
        opt.step()
    np.testing.assert_allclose(rec.traces["virial_temperature"], virial, rtol=1e-10)
    np.testing.assert_allclose(rec.traces["U"], U, rtol=1e-10)
    blocks = torch.stack(forces).reshape(10, 4, 3).mean(1)
    chi2, expected = mean_force_chi2(blocks)
    assert rec.mean_force_chi2() == (pytest.approx(float(chi2), rel=1e-9), pytest.approx(expected))


def test_micro_batch_moments_equal_the_functional_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    G = [torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 for shape in ((3, 4), (5,))]
    lr, beta, lam = 0.01, 50.0, 0.2
    views = [LangevinGroupView("all", [a, b], lr, beta, lam, G, True)]
    micro = [[torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
             for _ in range(3)]
    rec = GibbsRecorder()
    for m in micro:
        rec.observe_micro_batch(views, m, nominal=3)
    mean = [sum(m[i] for m in micro) / 3 for i in range(2)]
    rec.record(views, grads=mean, loss=1.0)
    rec.flush()
    assert rec.noise_ratio == pytest.approx(float(noise_ratio(micro, lr=lr, beta=beta, precond=G)), rel=1e-10)
    assert rec.config_temperature() is None  # no Laplacian yet
    rec.add_laplacian(2.0)
    expected = beta * float(gradient_square([a.detach(), b.detach()], micro, weight_decay=lam)) / 2.0
    assert rec.config_temperature() == pytest.approx(expected, rel=1e-10)
    assert rec.gradient_square_unbiased
    # The same from explicit half-batch estimates (the split_batch route).
    rec2 = GibbsRecorder()
    rec2.record(views, grads=mean, micro_grads=micro)
    rec2.flush()
    assert rec2.noise_ratio == pytest.approx(rec.noise_ratio, rel=1e-10)
