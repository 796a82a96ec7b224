"""SampleBank (count, thinning, checkpoint state, PEFT disk round trip) and Bayesian model averaging."""
from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from langevin_lora.callback import LangevinLoRA
from langevin_lora.param_groups import lora_modules
from langevin_lora.samples import SampleBank, bma_predict_proba

IN, K, N = 5, 3, 24


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, 4)
        self.cls = nn.Linear(4, K)

    def forward(self, x):
        return self.cls(torch.tanh(self.lin(x)))


def peft_model(seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(Base(), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], modules_to_save=["cls"]))
    with torch.no_grad():
        for f in lora_modules(model):
            f.B.normal_(0.0, 0.5)
    return model


class Clf(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = peft_model()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=g)
    return TensorDataset(x, torch.randint(0, K, (N,), generator=g))


def fit(cb, steps):
    mod = Clf()
    snaps = {}
    cb.post_step_observers.append(
        lambda tr, pl, c: snaps.__setitem__(tr.global_step, {n: p.detach().clone() for n, p in pl.named_parameters()
                                                             if p.requires_grad}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        L.Trainer(max_steps=steps, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, accelerator="cpu", max_epochs=-1).fit(mod, DataLoader(dataset(), batch_size=8))
    return mod, snaps


def test_bank_count_and_thinning_in_trainer():
    burn, every, cap, steps = 3, 4, 3, 25
    cb = LangevinLoRA(num_data=N, burn_in_steps=burn, sample_every=every, num_samples=cap, seed=0)
    mod, snaps = fit(cb, steps)
    # Langevin step j (1-based) runs at global step burn + j - 1; a sample every `every` of them,
    # the most recent `cap` kept
    expected = [burn + j - 1 for j in range(every, steps - burn + 1, every)][-cap:]
    assert cb.sample_bank.steps == expected and len(cb.sample_bank) == cap
    trainable = {n for n, p in mod.named_parameters() if p.requires_grad}
    for s, sample in zip(expected, cb.sample_bank):
        assert set(sample) == trainable  # adapters and the trainable head only, never the frozen base
        assert all(torch.equal(sample[n], snaps[s][n]) and sample[n].device.type == "cpu" for n in sample)
    total = sum(p.numel() for p in mod.parameters())
    assert sum(t.numel() for t in cb.sample_bank[0].values()) < total / 2


def test_bank_validation_and_state_dict_round_trip():
    with pytest.raises(ValueError, match="num_samples"):
        SampleBank(num_samples=-1)
    bank = SampleBank(num_samples=2)
    with pytest.raises(ValueError, match="empty"):
        bma_predict_proba(peft_model(), bank, [torch.zeros(2, IN)])
    model = peft_model()
    for step in range(3):
        with torch.no_grad():
            lora_modules(model)[0].A.add_(1.0)
        bank.add(model, step)
    assert bank.steps == [1, 2] and bank.is_full
    with pytest.raises(IndexError, match="out of range"):
        bank[2]
    other = SampleBank(num_samples=2)
    other.load_state_dict(bank.state_dict())
    assert other.steps == bank.steps
    assert all(torch.equal(a[n], b[n]) for a, b in zip(bank, other) for n in a)
    with pytest.raises(ValueError, match="num_samples=2"):
        SampleBank(num_samples=3).load_state_dict(bank.state_dict())


def test_load_into_is_in_place():
    model = peft_model()
    bank = SampleBank(num_samples=1)
    bank.add(model, 0)
    ids = {n: id(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    bank.load_into(model, 0)
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert all(torch.equal(p, bank[0][n]) for n, p in model.named_parameters() if n in bank[0])


def test_disk_bank_round_trip_through_peft(tmp_path):
    cb = LangevinLoRA(num_data=N, burn_in_steps=2, sample_every=2, num_samples=2, seed=0, sample_dir=tmp_path / "bank")
    mod, snaps = fit(cb, 9)
    bank = cb.sample_bank
    folders = sorted(p.name for p in (tmp_path / "bank").iterdir())
    assert bank.steps == [5, 7]  # Langevin steps 2, 4, 6 ran at global steps 3, 5, 7; the oldest was dropped
    assert folders == ["sample-00000005", "sample-00000007"]  # and its folder deleted
    for s, folder in zip(bank.steps, folders):
        path = tmp_path / "bank" / folder
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}
        loaded = PeftModel.from_pretrained(Base(), path)  # a fresh base: the folder is a complete adapter
        got = dict(loaded.named_parameters())
        for n, t in snaps[s].items():
            key = n.removeprefix("model.")
            assert torch.equal(got[key], t), key
    # a sample read back from disk equals the state at its step, and loads into the live module
    assert all(torch.equal(bank[0][n], snaps[bank.steps[0]][n]) for n in snaps[bank.steps[0]])
    bank.load_into(mod, 0)
    assert all(torch.equal(p, snaps[bank.steps[0]][n]) for n, p in mod.named_parameters() if p.requires_grad)


def test_save_peft_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    model = peft_model()
    bank = SampleBank(num_samples=2)
    bank.add(model, 0)
    target = tmp_path / "s0"
    bank.save_peft(0, target)
    before = (target / "adapter_model.safetensors").read_bytes()
    reloaded = PeftModel.from_pretrained(Base(), target)
    assert torch.equal(lora_modules(reloaded)[0].A, lora_modules(model)[0].A)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        bank.save_peft(0, tmp_path / "s1")  # a new folder: nothing appears
    with pytest.raises(OSError, match="disk full"):
        bank.save_peft(0, target)  # an existing folder: left exactly as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0"]  # no temporary or partial folder
    assert (target / "adapter_model.safetensors").read_bytes() == before


def test_bma_equals_hand_written_average():
    model = peft_model()
    bank = SampleBank(num_samples=3)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
        bank.add(model, step)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.3)  # the model's own state differs from every sample
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    x = torch.randn(10, IN, generator=g)
    dl = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=4)
    probs = bma_predict_proba(model, bank, dl)

    hand = torch.zeros(10, K)
    for sample in bank:  # independent reference: a fresh model per sample, loaded by state dict
        ref = peft_model()
        ref.load_state_dict({**ref.state_dict(), **sample})
        ref.eval()
        with torch.no_grad():
            hand += torch.softmax(ref(x), -1) / len(bank)
    torch.testing.assert_close(probs, hand, rtol=1e-6, atol=1e-6)
    assert probs.shape == (10, K) and torch.allclose(probs.sum(-1), torch.ones(10))
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters()) and model.training  # restored
    # a single model would not give the average (the samples disagree)
    single = torch.softmax(model.eval()(x), -1)
    assert not torch.allclose(single, probs, atol=1e-3)
    with pytest.raises(ValueError, match="shuffle"):
        bma_predict_proba(model, bank, DataLoader(TensorDataset(x), batch_size=4, shuffle=True))
    # one-shot iterators and a custom forward_fn give the same answer
    gen_probs = bma_predict_proba(model, bank, (b for b in [x[:4], x[4:]]), forward_fn=lambda m, b: m(b))
    torch.testing.assert_close(gen_probs, hand, rtol=1e-6, atol=1e-6)


def test_bma_in_lightning_predict_step():
    cb = LangevinLoRA(num_data=N, burn_in_steps=2, sample_every=1, num_samples=3, seed=0)
    mod, _ = fit(cb, 6)

    class Predict(Clf):
        def predict_step(self, batch, batch_idx):
            with cb.sample_bank.averaging(self) as bma:
                return bma.predict_proba(batch)

    pred = Predict()
    pred.load_state_dict(mod.state_dict())
    dl = DataLoader(dataset(), batch_size=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        out = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").predict(pred, dl)
    torch.testing.assert_close(torch.cat(out), bma_predict_proba(mod, cb.sample_bank, dl), rtol=1e-6, atol=1e-6)
