"""SampleBank (count, thinning, checkpoint state, PEFT disk round trip) and Bayesian model averaging."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from langevin_lora.lightning.callback import LangevinLoRA
from langevin_lora.lora.param_groups import lora_modules
from langevin_lora import SampleBank, bma_predict_proba

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


# -- regression tests of issue 11 (items 2, 3, 6, 10) and issue 13 (non-finite BMA) -------------------
class _Kill(RuntimeError):
    pass


def _disk_run(cb, steps, callbacks=(), ckpt_path=None, module=None):
    mod = module or Clf()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        L.Trainer(max_steps=steps, callbacks=[cb, *callbacks], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=True, accelerator="cpu", max_epochs=-1).fit(
            mod, DataLoader(dataset(), batch_size=6), ckpt_path=ckpt_path)
    return mod


def test_disk_samples_survive_a_kill_between_checkpoints_and_resume(tmp_path):
    """Checkpoints every 8 steps, 3 samples kept (one per step), killed at step 12: the step-8
    checkpoint lists samples 5, 6, 7 that later steps evicted. Resuming from it must find every one
    of them (their deletion waits until no saved state lists them), and so must every later read."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    bank_dir, cap = tmp_path / "bank", 3

    def make():
        return LangevinLoRA(num_data=N, burn_in_steps=2, sample_every=1, num_samples=cap, seed=0, sample_dir=bank_dir)

    at_checkpoint = {}

    class Killer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 8:  # what the step-8 checkpoint holds, read while it is written
                at_checkpoint.update(steps=list(first.sample_bank.steps),
                                     samples=[{n: t.clone() for n, t in s.items()} for s in first.sample_bank])
            if trainer.global_step == 12:
                raise _Kill("killed between checkpoints")

    first = make()
    with pytest.raises(_Kill):
        _disk_run(first, 16, [Killer(), ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=8, save_top_k=-1,
                                                         filename="{step}")])
    assert at_checkpoint["steps"] == [5, 6, 7] and first.sample_bank.steps == [9, 10, 11]

    read_on_resume = {}

    class Reader(L.Callback):
        def on_train_start(self, trainer, pl_module):  # after LangevinLoRA restored and bound the bank
            read_on_resume.update(steps=list(resumed.sample_bank.steps), samples=list(resumed.sample_bank))

    resumed = make()
    _disk_run(resumed, 16, [Reader(), ModelCheckpoint(dirpath=tmp_path / "ck2", every_n_train_steps=8, save_top_k=-1,
                                                       filename="{step}")],
              ckpt_path=tmp_path / "ck" / "step=8.ckpt")
    assert read_on_resume["steps"] == at_checkpoint["steps"]
    for got, want in zip(read_on_resume["samples"], at_checkpoint["samples"]):
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    bank = resumed.sample_bank
    assert bank.steps == [13, 14, 15]
    assert all(len(sample) == len(want) for sample in bank)  # every sample of the finished run reads back
    # the newest checkpoint's samples are on disk, and eviction keeps disk use bounded
    state = torch.load(tmp_path / "ck2" / "step=16.ckpt", weights_only=False)["callbacks"]
    paths = next(v["sample_bank"]["paths"] for v in state.values() if "sample_bank" in v)
    assert paths and all((Path(p) / "adapter_model.safetensors").is_file() for p in paths)
    assert len([p for p in bank_dir.iterdir() if p.name.startswith("sample-")]) <= 3 * cap


def test_eviction_waits_for_the_last_two_saved_states(tmp_path):
    """Unit form of the rule: a folder evicted while a saved state lists it stays until two later
    state_dict() calls no longer list it; without any saved state it goes at once."""
    model = peft_model()
    bank = SampleBank(num_samples=1, directory=tmp_path)
    names = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    bank.add(model, 0)
    bank.add(model, 1)
    assert names() == ["sample-00000001"]  # nothing saved: evicted at once
    bank.state_dict()  # a checkpoint lists sample 1
    bank.add(model, 2)
    bank.add(model, 3)
    assert names() == ["sample-00000001", "sample-00000003"]  # 1 kept for the checkpoint, 2 was never saved
    bank.state_dict()  # lists 3; the earlier state (1) may be the last complete checkpoint
    bank.add(model, 4)
    assert names() == ["sample-00000001", "sample-00000003", "sample-00000004"]
    bank.state_dict()  # lists 4: no saved state of the last two lists 1 any more
    assert names() == ["sample-00000003", "sample-00000004"]
    restored = SampleBank(num_samples=1, directory=tmp_path)
    restored.load_state_dict(bank.state_dict())
    restored.add(model, 5)  # the checkpoint it was restored from lists 4: kept
    assert "sample-00000004" in names() and torch.equal(restored[0][next(iter(restored[0]))],
                                                        bank[0][next(iter(bank[0]))])


def test_add_checks_names_and_shapes_and_clear_forgets_the_binding():
    bank = SampleBank(num_samples=3)
    small = nn.Linear(3, 2)
    bank.add(small, 0)
    with torch.no_grad():
        small.weight.data = torch.zeros(4, 3)  # same names, another shape
    with pytest.raises(ValueError, match=r"'weight' has shape \(4, 3\) but the banked samples hold shape \(2, 3\)"):
        bank.add(small, 1)
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"trainable tensors differ.*missing 'weight'.*bank.clear\(\)"):
        bank.add(other, 1)
    assert bank.steps == [0]
    bank.clear()
    assert len(bank) == 0
    bank.add(other, 7)  # a clean bank: names, shapes and root are those of the new model
    assert bank.steps == [7] and set(bank[0]) == {"0.weight", "0.bias"}
    # the binding survives a checkpoint round trip, so a resumed bank refuses another model too
    restored = SampleBank(num_samples=3)
    restored.load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="has shape"):
        restored.add(nn.Sequential(nn.Linear(3, 5)), 8)


def test_bma_accepts_the_peft_model_inside_the_lightning_module(tmp_path):
    mod = Clf()
    g = torch.Generator().manual_seed(5)
    for bank in (SampleBank(num_samples=2), SampleBank(num_samples=2, directory=tmp_path)):
        for step in range(2):
            with torch.no_grad():
                for p in mod.parameters():
                    if p.requires_grad:
                        p.add_(0.3 * torch.randn(p.shape, generator=g))
            bank.add(mod, step)  # names of the LightningModule: model.base_model.model...
        x = torch.randn(7, IN, generator=g)
        via_module = bma_predict_proba(mod, bank, [x], forward_fn=lambda m, b: m(b))
        via_peft = bma_predict_proba(mod.model, bank, [x], forward_fn=lambda m, b: m(b))
        torch.testing.assert_close(via_peft, via_module, rtol=0, atol=0)
        # a separate PEFT model (no shared tensors) takes the samples by the PEFT prefix
        fresh = peft_model(seed=0)  # the same frozen base; its own adapters differ from every sample
        torch.testing.assert_close(bma_predict_proba(fresh, bank, [x]), via_module, rtol=1e-6, atol=1e-6)
        # and the reverse: samples of the PEFT model into the LightningModule that holds it
        rev = SampleBank(num_samples=1)
        rev.add(fresh, 0)
        rev.load_into(mod, 0)
        assert torch.equal(mod.model.base_model.model.lin.lora_A["default"].weight,
                           fresh.base_model.model.lin.lora_A["default"].weight)
    with pytest.raises(ValueError, match="has no parameter for the banked tensor .*pass that module"):
        bma_predict_proba(nn.Linear(IN, K), bank, [x])


def test_bank_arguments_are_checked_and_named(tmp_path):
    import numpy as np

    for device in ("gpux", 3, "meta"):
        with pytest.raises(ValueError, match="Invalid device"):
            SampleBank(num_samples=1, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"Invalid device: 'cuda' \(this machine has 0 CUDA devices\)"):
            SampleBank(num_samples=1, device="cuda")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for directory in (3, "", afile):
        with pytest.raises(ValueError, match="Invalid directory"):
            SampleBank(num_samples=1, directory=directory)
    bank = SampleBank(num_samples=np.int64(2), directory=str(tmp_path / "new"))
    assert bank.num_samples == 2 and type(bank.num_samples) is int and bank.directory == tmp_path / "new"


def test_bma_raises_on_a_sample_with_non_finite_probabilities():
    model = peft_model()
    bank = SampleBank(num_samples=3)
    for step in (10, 11, 12):
        with torch.no_grad():
            if step == 11:
                lora_modules(model)[0].A.fill_(float("nan"))
            else:
                lora_modules(model)[0].A.normal_()
        bank.add(model, step)
    x = torch.randn(4, IN)
    with pytest.raises(FloatingPointError, match=r"sample 1 \(optimizer step 11\) gives non-finite probabilities "
                                                 r"for 4 of 4 examples"):
        bma_predict_proba(model, bank, [x])
    with pytest.raises(FloatingPointError, match=r"sample 1 \(optimizer step 11\)"):
        with bank.averaging(model) as bma:
            bma.predict_proba(x)
    assert torch.isfinite(lora_modules(model)[0].A).all()  # the model's own tensors are restored


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_banks_of_a_cuda_model_agree_on_every_storage(tmp_path):
    """A model on the GPU banked in GPU memory, CPU memory and on disk: the samples keep their
    values wherever they are stored, BMA of the CUDA model gives the same probabilities from all
    three, and a checkpoint restored into a GPU bank puts its samples on the GPU."""
    model = peft_model().cuda()
    banks = {"cuda": SampleBank(num_samples=2, device="cuda:0"), "cpu": SampleBank(num_samples=2),
             "disk": SampleBank(num_samples=2, directory=tmp_path)}
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, device="cuda", generator=g))
        for bank in banks.values():
            bank.add(model, step)
    name = next(iter(banks["cuda"][0]))
    assert banks["cuda"][0][name].device.type == "cuda" and banks["cpu"][0][name].device.type == "cpu"
    x = torch.randn(9, IN, device="cuda", generator=g)
    probs = {k: bma_predict_proba(model, b, [x], forward_fn=lambda m, b: m(b)) for k, b in banks.items()}
    for k in ("cpu", "disk"):
        torch.testing.assert_close(probs[k], probs["cuda"], rtol=0, atol=0)
    restored = SampleBank(num_samples=2, device="cuda")
    restored.load_state_dict(banks["cpu"].state_dict())
    assert restored[1][name].device.type == "cuda" and torch.equal(restored[1][name].cpu(), banks["cpu"][1][name])
