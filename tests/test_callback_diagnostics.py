"""LangevinLoRA attaches the live Gibbs diagnostics by default; they log through the Trainer's loggers."""
from __future__ import annotations

import csv

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from langevin_lora import LangevinLoRA
from langevin_lora.diagnostics import GibbsDiagnostics
from callback_helpers import Tiny, loader, trainer


pytestmark = pytest.mark.filterwarnings("ignore")


def test_default_diagnostics_log_the_virial_temperature(tmp_path):
    cb = LangevinLoRA(weight_decay=0.1, burn_in_steps=2, seed=0)
    logger = CSVLogger(tmp_path, name="d")
    L.Trainer(max_steps=30, callbacks=[cb], logger=logger, log_every_n_steps=1, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
              max_epochs=-1).fit(Tiny(lr=1e-3), loader())
    diag = [c for c in cb._trainer.callbacks if isinstance(c, GibbsDiagnostics)]
    assert len(diag) == 1 and diag[0] is cb.diagnostics and diag[0].sampling_steps == 28
    with open(logger.log_dir + "/metrics.csv") as fh:
        keys = set(csv.DictReader(fh).fieldnames)
    assert {"langevin/virial_temperature", "langevin/gauge_gap", "langevin/U"} <= keys  # chi2 needs >= 4 blocks
    assert any(k.startswith("langevin/lora_A/default/") for k in keys)
    assert diag[0].report_paths  # the stationarity report was saved next to the logs


def test_diagnostics_off_or_user_supplied():
    cb = LangevinLoRA(burn_in_steps=0, weight_decay=0.1, seed=0, diagnostics=False)
    trainer([cb], max_steps=3).fit(Tiny(), loader())
    assert not any(isinstance(c, GibbsDiagnostics) for c in cb._trainer.callbacks)
    mine = GibbsDiagnostics(log_every_n_steps=1, report=False)
    cb = LangevinLoRA(burn_in_steps=0, weight_decay=0.1, seed=0)
    trainer([cb, mine], max_steps=3).fit(Tiny(), loader())
    assert [c for c in cb._trainer.callbacks if isinstance(c, GibbsDiagnostics)] == [mine]
    assert mine.sampling_steps == 3
    with pytest.raises(ValueError, match="diagnostics"):
        LangevinLoRA(diagnostics="yes")


def test_first_recorded_U_is_the_loss_at_that_step(tmp_path):
    """Issue 11 item 5: the U trace starts at the loss of the first sampling step plus the prior,
    not at the sum of every burn-in loss (the burn-in steps are not shown to the observers)."""
    from lightning.pytorch import Callback

    losses = {}

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step - 1] = float(outputs["loss"])

    burn, lam = 4, 0.1
    cb = LangevinLoRA(weight_decay=lam, burn_in_steps=burn, seed=0, diagnostics=False)
    diag = GibbsDiagnostics(log_every_n_steps=2, hvp_every_n_steps=0, lambda_max_every_n_steps=0, report=False)
    trainer([cb, diag, Losses()], max_steps=10).fit(Tiny(), loader())
    U, theta_sq = diag.traces["U"], diag.traces["theta_sq"]
    assert len(U) == 10 - burn and diag.burn_in_steps == burn and diag.sampling_steps == 10 - burn
    for i, u in enumerate(U):  # U = L + (lambda/2)|theta|^2 over the sampled LoRA tensors
        assert u == pytest.approx(losses[burn + i] + lam / 2 * theta_sq[i], rel=1e-6), i
