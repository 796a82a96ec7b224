"""Diagnostics survive kill-and-resume: a run resumed from a checkpoint ends with the same traces and
statistics as the uninterrupted run (issue 11 item 7), under the sampler callback (observer mode)
and under a Langevin optimizer (hook mode). The Trainer-free recorder: test_diagnostics_recorder.py."""
from __future__ import annotations


import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from langevin_lora import LangevinLoRA
from langevin_lora.diagnostics import GibbsDiagnostics
from callback_helpers import Tiny, loader, trainer
from diag_helpers import Regression, regression_loader


pytestmark = pytest.mark.filterwarnings("ignore")


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
              max_epochs=-1).fit(Regression(), regression_loader())
    diag_res = _diagnostics()
    L.Trainer(max_steps=2 * k, accumulate_grad_batches=2, callbacks=[diag_res], logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", devices=1, max_epochs=-1).fit(Regression(), regression_loader(),
                                                               ckpt_path=tmp_path / f"step={k}.ckpt")
    assert diag_full.sampling_steps == 2 * k
    _assert_same(diag_full, diag_res)
