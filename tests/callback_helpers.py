"""The tiny LoRA Lightning setups shared by the callback, engine, kinetic, prior and step-size tests.

``Tiny`` (LoRA r=2 on a linear layer plus a trainable head, AdamW + an LR schedule), ``LoraOnly`` (the
same adapter, nothing else trainable, the optimizer chosen by ``mode``), their regression data, a
CPU ``trainer`` and tensor snapshots. Plain helpers, not fixtures: test modules import them (no test
module imports another).
"""
from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from pinned import adam_pre19  # LangevinAdam with its pre-issue-19 defaults
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from langevin_lora import LangevinAdam, LangevinSGD, lora_param_groups
from langevin_lora.lora.param_groups import lora_modules

IN, OUT, R, N = 6, 3, 2, 32


class Base(nn.Module):
    def __init__(self, d_in=IN, d_out=OUT):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.head = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.head(self.lin(x))


class Tiny(L.LightningModule):
    """A LoRA r=2 adapter on ``lin`` plus a trainable head (PEFT modules_to_save), AdamW + LR schedule."""

    def __init__(self, lr=1e-2, optimizer="adamw", schedule=True, zero_loss=False, inf_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.model = get_peft_model(Base(), LoraConfig(r=R, lora_alpha=R, target_modules=["lin"],
                                                       modules_to_save=["head"], lora_dropout=0.0))
        with torch.no_grad():  # start away from B = 0 so both factors get gradients at once
            for f in lora_modules(self.model):
                f.B.normal_(0.0, 0.3)
        self.lr, self.optimizer_name, self.schedule = lr, optimizer, schedule
        self.zero_loss, self.inf_at = zero_loss, inf_at

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).sum(-1).mean() / 2
        if self.zero_loss:
            loss = loss * 0.0
        if self.inf_at is not None and self.global_step == self.inf_at:
            loss = loss * math.inf
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        if not self.schedule:
            return opt
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.05 * k))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}


def data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = x @ torch.randn(IN, OUT, generator=g) + 0.1 * torch.randn(n, OUT, generator=g)
    return TensorDataset(x, y)


def loader(batch_size=8, n=N):
    return DataLoader(data(n), batch_size=batch_size, shuffle=False)


def trainer(callbacks, max_steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, max_epochs=-1, **kw)


def lora_tensors(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def all_tensors(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# -- LoRA-only module: the optimizer and the callback front-ends on one chain --------------------------
LR, WD, SEED, STEPS = 1e-2, 0.1, 7, 10


class LoraOnly(L.LightningModule):
    """LoRA r=2 on ``lin``, nothing else trainable (no modules_to_save); the optimizer is chosen by ``mode``."""

    def __init__(self, mode: str, precond=None):
        super().__init__()
        torch.manual_seed(0)
        self.model = get_peft_model(Base(), LoraConfig(r=R, lora_alpha=R, target_modules=["lin"], lora_dropout=0.0))
        with torch.no_grad():
            for f in lora_modules(self.model):
                f.B.normal_(0.0, 0.3)
        self.mode, self.precond = mode, precond

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.model(x) - y) ** 2).sum(-1).mean() / 2

    def configure_optimizers(self):
        groups = lora_param_groups(self.model)
        if self.mode == "sgd":
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)
        if self.mode == "langevin_sgd":
            return LangevinSGD(groups, lr=LR, num_data=N, weight_decay=WD, seed=SEED)
        return adam_pre19(groups, lr=LR, num_data=N, weight_decay=WD, seed=SEED, burn_in_steps=None)

    def on_train_start(self):
        opt = self.trainer.optimizers[0]
        if isinstance(opt, LangevinAdam):   # sampling from the first step, with the given G
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.start_sampling()
            named = dict(self.named_parameters())
            opt.engine.freeze([], fixed={named[n]: G.clone() for n, G in self.precond.items()})


def given_G():
    gen = torch.Generator().manual_seed(3)
    mod = LoraOnly("sgd")
    return {n: 0.5 + torch.rand(p.shape, generator=gen) for n, p in mod.named_parameters() if p.requires_grad}


def trainable_tensors(mod):
    return {n: p.detach().clone() for n, p in mod.named_parameters() if p.requires_grad}
