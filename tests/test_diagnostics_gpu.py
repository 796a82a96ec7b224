"""The diagnostics' CUDA paths: probes on CUDA generators, dropout replayed from the CUDA RNG, bf16-mixed,
and kill-and-resume with CUDA state in the checkpoint.

Skipped without a CUDA device (CI has none); run them on a GPU machine with
``pytest -m gpu tests/test_diagnostics_gpu.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore")]


def test_rng_snapshot_replays_cuda_dropout():
    from langevin_lora.core.curvature import RngSnapshot

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 1)).cuda()
    x = torch.randn(32, 5, device="cuda")
    snap = RngSnapshot([torch.cuda.current_device()])
    real = net(x).sum()
    with snap.replaying() as deterministic:
        replay = deterministic(lambda: net(x).sum())
        assert torch.equal(replay(), real) and torch.equal(replay(), real)


def _gpu_trainer(callbacks, max_steps, **kw):
    import lightning as L

    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="gpu", devices=1, max_epochs=-1, **kw)


def test_diagnostics_under_bf16_mixed_on_gpu():
    from callback_helpers import Tiny, loader

    from langevin_lora import LangevinLoRA
    from langevin_lora.diagnostics import GibbsDiagnostics

    diag = GibbsDiagnostics(log_every_n_steps=2, hvp_every_n_steps=1, lambda_max_every_n_steps=2, power_iters=3,
                            center_window=2, block_size=1, report=False)
    cb = LangevinLoRA(weight_decay=0.1, burn_in_steps=2, seed=0, diagnostics=False)
    _gpu_trainer([cb, diag], 12, precision="bf16-mixed", accumulate_grad_batches=2).fit(Tiny(), loader(4))
    assert diag.sampling_steps == 10 and diag.burn_in_steps == 2
    assert all(math.isfinite(v) for v in diag.traces["virial_temperature"])
    assert all(math.isfinite(v) for v in diag.traces["U"])
    assert diag.eta_lambda_max is not None and math.isfinite(diag.eta_lambda_max)
    assert diag.noise_ratio is not None and math.isfinite(diag.noise_ratio)
    assert diag.probes.state_dict()["generator"] is not None
    assert math.isfinite(diag.build_report().by_name("virial_temperature").value)


def test_diagnostics_kill_and_resume_on_gpu(tmp_path):
    import lightning as L
    import numpy as np
    from lightning.pytorch.callbacks import ModelCheckpoint
    from callback_helpers import Tiny, loader

    from langevin_lora import LangevinLoRA
    from langevin_lora.diagnostics import GibbsDiagnostics

    def make():
        return (LangevinLoRA(num_data=32, burn_in_steps=3, weight_decay=0.1, seed=4, diagnostics=False),
                GibbsDiagnostics(log_every_n_steps=3, hvp_every_n_steps=2, lambda_max_every_n_steps=3, power_iters=2,
                                 center_window=3, block_size=3, report=False))

    k = 8
    L.seed_everything(0, verbose=False)
    sampler, full = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    _gpu_trainer([sampler, full, ckpt], 2 * k, enable_checkpointing=True).fit(Tiny(), loader(8))
    L.seed_everything(123, verbose=False)
    sampler, resumed = make()
    _gpu_trainer([sampler, resumed], 2 * k).fit(Tiny(), loader(8), ckpt_path=tmp_path / f"step={k}.ckpt")
    for name in full.traces:
        np.testing.assert_array_equal(np.asarray(resumed.traces[name]), np.asarray(full.traces[name]), err_msg=name)
    assert resumed.recorder.laplacians == full.recorder.laplacians
    assert resumed.eta_lambda_max == full.eta_lambda_max
