"""Diagnostics survive kill-and-resume: a run resumed from a checkpoint ends with the same traces and
statistics as the uninterrupted run (issue 11 item 7), under the sampler callback (observer mode)
and under a Langevin optimizer (hook mode), and the Trainer-free recorder does the same."""
from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callback import Tiny, loader, trainer

from langevin_lora import LangevinLoRA, LangevinSGD
from langevin_lora.diagnostics import GibbsDiagnostics, GibbsRecorder, mean_force_chi2
from tests.diag_helpers import Quadratic
from tests.test_diagnostics_callback import Regression, _regression_loader


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _diagnostics():
    # Windows, blocks, logging and the probes all straddle the checkpoint: pending rows, a virial
    # centre and a mean-force block half-way, a warm-started power-iteration vector, the probe RNG.
    return GibbsDiagnostics(log_every_n_steps=3, hvp_every_n_steps=2, lambda_max_every_n_steps=3, power_iters=2,
                            center_window=3, block_size=3, report=False)


def _summary(diag):
    rec = diag.recorder
    return {"sampling_steps": diag.sampling_steps, "burn_in_steps": diag.burn_in_steps,
            "laplacians": list(rec.laplacians), "eta_lambda_max": diag.eta_lambda_max,
            "chi2": rec.mean_force_chi2(), "config_temperature": rec.config_temperature(),
            "noise_ratio": diag.noise_ratio}


def _assert_same(full, resumed):
    assert full.traces.keys() == resumed.traces.keys()
    for name in full.traces:
        np.testing.assert_array_equal(np.asarray(resumed.traces[name]), np.asarray(full.traces[name]), err_msg=name)
    assert _summary(resumed) == _summary(full)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_kill_and_resume_under_the_sampler_callback(tmp_path, accumulate):
    k, burn = 8, 3  # k: an epoch boundary (Lightning restarts a plain DataLoader at its first batch)
    bs = 8 // accumulate

    def sampler():
        return LangevinLoRA(num_data=32, burn_in_steps=burn, weight_decay=0.1, seed=4, diagnostics=False)

    L.seed_everything(0, verbose=False)
    full, diag_full = Tiny(), _diagnostics()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    trainer([sampler(), diag_full, ckpt], 2 * k, accumulate_grad_batches=accumulate,
            enable_checkpointing=True).fit(full, loader(bs))

    L.seed_everything(123, verbose=False)
    resumed, diag_res = Tiny(), _diagnostics()
    trainer([sampler(), diag_res], 2 * k, accumulate_grad_batches=accumulate).fit(
        resumed, loader(bs), ckpt_path=tmp_path / f"step={k}.ckpt")

    assert diag_full.sampling_steps == 2 * k - burn and diag_full.burn_in_steps == burn
    assert len(diag_full.traces["U"]) == 2 * k - burn and diag_full.recorder.laplacians
    _assert_same(diag_full, diag_res)
    if accumulate == 2:
        assert diag_full.noise_ratio is not None


def test_kill_and_resume_under_a_langevin_optimizer(tmp_path):
    k = 8  # 4 optimizer steps per epoch (64 examples, batches of 8, accumulation 2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    diag_full = _diagnostics()
    L.Trainer(max_steps=2 * k, accumulate_grad_batches=2, callbacks=[diag_full, ckpt], logger=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
              max_epochs=-1).fit(Regression(), _regression_loader())
    diag_res = _diagnostics()
    L.Trainer(max_steps=2 * k, accumulate_grad_batches=2, callbacks=[diag_res], logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", devices=1, max_epochs=-1).fit(Regression(), _regression_loader(),
                                                               ckpt_path=tmp_path / f"step={k}.ckpt")
    assert diag_full.sampling_steps == 2 * k
    _assert_same(diag_full, diag_res)


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
    from langevin_lora.diagnostics import WindowCenter, virial_temperature

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
