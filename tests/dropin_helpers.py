"""A tiny LoRA classifier that logs ``val_loss`` as a user's LightningModule would (the zero-config
drop-in's contract): AdamW on the adapters and a head, a validation loop, over-fitting within a
few epochs on a small, noisy 3-class problem."""
from __future__ import annotations

import lightning.pytorch as L
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

D_IN, HIDDEN, CLASSES = 8, 16, 3


class Base(nn.Module):
    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Linear(D_IN, HIDDEN)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.body(x))))


class TinyClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05, log_val: bool = True, seed: int = 0, dropout: float = 0.1):
        super().__init__()
        torch.manual_seed(seed)
        self.model = get_peft_model(Base(dropout), LoraConfig(r=4, lora_alpha=4, target_modules=["body"],
                                                       modules_to_save=["head"], lora_dropout=0.0))
        self.lr, self.log_val = lr, log_val

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.log_val:
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def blobs(n: int, seed: int, noise: float = 1.5) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(CLASSES, D_IN, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = centres[y] + noise * torch.randn(n, D_IN, generator=g)
    return TensorDataset(x, y)


def loaders(n_train: int = 96, n_val: int = 96, batch_size: int = 16):
    train = DataLoader(blobs(n_train, 1), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(blobs(n_val, 2), batch_size=48, shuffle=False)
    return train, val


def trainer(callbacks, max_epochs: int = 30, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0, **kw)
