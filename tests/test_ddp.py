"""DDP with 2 CPU processes (gloo): every replica draws the same noise, adapters stay identical."""
from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from langevin_lora.lightning.callback import LangevinLoRA

STEPS, BURN = 60, 5


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.cls = nn.Linear(3, 3)

    def forward(self, x):
        return self.cls(self.lin(x))


class DDPModule(L.LightningModule):
    def __init__(self, out_dir: str):
        super().__init__()
        torch.manual_seed(0)
        self.model = get_peft_model(Base(), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], modules_to_save=["cls"]))
        self.out_dir = out_dir
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x[0, 0].item())
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def on_train_end(self):
        cb = next(c for c in self.trainer.callbacks if isinstance(c, LangevinLoRA))
        torch.save({"params": {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad},
                    "langevin_steps": cb.langevin_steps, "seen": self.seen, "beta": cb.beta,
                    "bank_steps": cb.sample_bank.steps},
                   os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_adapters(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    ds = TensorDataset(x, torch.randint(0, 3, (64,), generator=g))
    cb = LangevinLoRA(burn_in_steps=BURN, weight_decay=0.01, seed=7, num_samples=2, sample_every=10)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=STEPS, max_epochs=-1,
                            callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False)
        trainer.fit(DDPModule(str(tmp_path)), DataLoader(ds, batch_size=8))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["langevin_steps"] == r1["langevin_steps"] == STEPS - BURN >= 50
    assert r0["beta"] == r1["beta"] == 64.0  # num_data = the full dataset, not one rank's shard
    assert r0["seen"] != r1["seen"]  # the ranks saw different data: equality below is not trivial
    assert r0["bank_steps"] == r1["bank_steps"] == [44, 54]
    start = {n: p.detach() for n, p in DDPModule(str(tmp_path)).named_parameters() if p.requires_grad}
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
        assert not torch.equal(p, start[n]), n
