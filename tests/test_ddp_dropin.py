"""The zero-config drop-in under DDP (2 CPU processes, gloo): every rank watches the same (reduced)
validation value, scores the ladder on the union of the validation shards and stops at the same
step, so the replicas stay identical and keep the same samples."""
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


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.cls = nn.Linear(8, 3)

    def forward(self, x):
        return self.cls(torch.tanh(self.lin(x)))


class DropInModule(L.LightningModule):
    def __init__(self, out_dir: str):
        super().__init__()
        torch.manual_seed(0)
        self.model = get_peft_model(Base(), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], modules_to_save=["cls"]))
        self.out_dir = out_dir

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))   # not synced: the callback reduces

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-2)

    def on_fit_end(self):
        cb = next(c for c in self.trainer.callbacks if isinstance(c, LangevinLoRA))
        torch.save({"params": {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad},
                    "chain": cb.chain.state_dict(), "bank_steps": cb.sample_bank.steps,
                    "global_step": self.trainer.global_step},
                   os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


def _blobs(n: int, seed: int) -> TensorDataset:
    centres = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(centres[y] + 1.5 * torch.randn(n, 6, generator=g), y)


@pytest.mark.slow
def test_ddp_dropin_replicas_decide_alike(tmp_path):
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=80,
                            callbacks=[LangevinLoRA(seed=3, num_samples=4)], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
        trainer.fit(DropInModule(str(tmp_path)), DataLoader(_blobs(64, 1), batch_size=8),
                    DataLoader(_blobs(64, 2), batch_size=16))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["chain"] == r1["chain"] and r0["chain"]["phase"] == "done" and r0["chain"]["start_step"] is not None
    assert r0["global_step"] == r1["global_step"] and r0["bank_steps"] == r1["bank_steps"] and r0["bank_steps"]
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
