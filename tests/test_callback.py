"""LangevinLoRA inside a real lightning.Trainer: contract, law, accumulation, AMP, resume, errors."""
from __future__ import annotations

import math
import types
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from langevin_lora import LangevinSGD, NonFiniteGradientWarning
from langevin_lora.core.rng import NoiseGenerators, draw_standard_normal
from langevin_lora.lightning.callback import LangevinLoRA
from langevin_lora.diagnostics import StepSizeWarning
from langevin_lora.core.functional import adam_inverse_scale, adapted_preconditioner, frozen_preconditioner, median_scale
from langevin_lora.lora.param_groups import lora_modules
from callback_helpers import IN, OUT, N, R, Tiny, all_tensors, data, loader, lora_tensors, trainer

pytestmark = pytest.mark.usefixtures("quiet_lightning")


# -- argument validation --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(burn_in_steps=-1), "burn_in_steps"),
    (dict(sample_every=0), "sample_every"),
    (dict(num_samples=-2), "num_samples"),
    (dict(temperature=-1.0), "temperature"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(num_data=0), "num_data"),
    (dict(num_data=10, beta=3.0), "exactly one"),
    (dict(beta=0.0), "beta"),
    (dict(head_temperature=-1.0), "head_temperature"),
    (dict(precond_clamp=(2.0, 3.0)), r"precond_clamp\[0\]"),
    (dict(precond_adapt_steps=-1), r"Invalid precond_adapt_steps: -1 \(expected an integer >= 0\)"),
    (dict(sample_dir="x", num_samples=0), "sample_dir"),
    (dict(nonfinite="ignore"), "nonfinite"),
    (dict(seed=-3), "seed"),
    (dict(foreach="yes"), r"Invalid foreach: 'yes' \(expected True, False or None\)"),
    (dict(adapter_name=""), r"Invalid adapter_name: '' \(expected None or a non-empty str"),
    (dict(adapter_name=3), r"Invalid adapter_name: 3 \(expected None or a non-empty str"),
    (dict(precondition=1), r"Invalid precondition: 1 \(expected True or False\)"),
    (dict(sample_dir=3, num_samples=1), r"Invalid sample_dir: 3 \(expected a folder path"),
    (dict(diagnostics=object), r"Invalid diagnostics: .*expected True, False or a lightning Callback"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LangevinLoRA(**kwargs)


# -- Trainer-dependent errors ----------------------------------------------------------------------
class NoLora(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, OUT)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_no_lora_adapters_says_what_was_searched():
    with pytest.raises(MisconfigurationException, match="searched for peft.tuners.lora.LoraLayer"):
        trainer([LangevinLoRA(burn_in_steps=0, num_data=N)], 2).fit(NoLora(), loader())


class Manual(Tiny):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class AlreadyLangevin(Tiny):
    def configure_optimizers(self):
        return LangevinSGD(self.parameters(), lr=1e-3, num_data=N)


class Unsized(IterableDataset):
    def __iter__(self):
        yield from data()


@pytest.mark.parametrize("module, dl, cb_kwargs, match", [
    (Manual, None, {}, "automatic optimization"),
    (AlreadyLangevin, None, {}, "added twice"),
    (Tiny, "iterable", {}, "could not infer num_data.*Pass"),
])
def test_unsupported_setups_are_refused(module, dl, cb_kwargs, match):
    dl = DataLoader(Unsized(), batch_size=8) if dl == "iterable" else loader()
    with pytest.raises(MisconfigurationException, match=match):
        trainer([LangevinLoRA(**cb_kwargs)], 2).fit(module(), dl)


def test_several_optimizers_refused():
    # Lightning already refuses several optimizers under automatic optimization; the callback
    # checks again in case a strategy or plugin lets them through.
    mod = Tiny()
    opts = [torch.optim.SGD(mod.model.parameters(), lr=0.1), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)]
    with pytest.raises(MisconfigurationException, match="exactly one optimizer; configure_optimizers returned 2"):
        LangevinLoRA(burn_in_steps=0, num_data=N).on_train_start(types.SimpleNamespace(optimizers=opts), mod)


def test_inconsistent_steps_refused():
    cb = LangevinLoRA(num_data=N, burn_in_steps=10, sample_every=5, num_samples=3)
    with pytest.raises(MisconfigurationException, match="leave room for no sample"):
        trainer([cb], 12).fit(Tiny(), loader())


# ModelParallelStrategy (FSDP2's fully_shard) is supported since issue 21: tests/test_fsdp.py
@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_refused(strategy):
    import lightning.pytorch.strategies as S

    fake_trainer = types.SimpleNamespace(strategy=object.__new__(getattr(S, strategy)), max_steps=-1)
    with pytest.raises(MisconfigurationException, match=f"sharded strategy {strategy}"):
        LangevinLoRA(burn_in_steps=0, num_data=N).setup(fake_trainer, Tiny(), "fit")

    class Custom(getattr(S, strategy)):  # subclasses are refused too, naming the subclass
        pass

    fake_trainer.strategy = object.__new__(Custom)
    with pytest.raises(MisconfigurationException, match="sharded strategy Custom"):
        LangevinLoRA(burn_in_steps=0, num_data=N).setup(fake_trainer, Tiny(), "fit")


# -- the contract ----------------------------------------------------------------------------------
def test_burn_in_leaves_user_optimizer_untouched():
    ref = Tiny()
    trainer([], 5).fit(ref, loader())
    mod = Tiny()
    cb = LangevinLoRA(num_data=N, burn_in_steps=5, seed=3)
    trainer([cb], 5).fit(mod, loader())
    assert not cb.sampling and cb.langevin_steps == 0
    for (n, a), b in zip(all_tensors(ref).items(), all_tensors(mod).values()):
        assert torch.equal(a, b), n
    # the step wrapper is removed at teardown (the LR scheduler's own patch remains)
    assert cb._wrapper is None and not isinstance(mod.trainer.optimizers[0].__dict__.get("step"), types.MethodType)


def test_sampling_step_is_the_frozen_preconditioner_langevin_step():
    """Every sampling step equals, by hand: G frozen from AdamW's v at the switch, current scheduled
    lr, coupled decay, sqrt(2 lr / beta) sqrt(G) xi with xi from an independent generator of the
    same seed; heads follow AdamW; the user's AdamW state of LoRA tensors stays frozen; grads intact."""
    burn, seed, lam, temp = 4, 11, 0.3, 0.5
    cb = LangevinLoRA(temperature=temp, weight_decay=lam, burn_in_steps=burn, seed=seed, precond_clamp=(0.2, 5.0),
                      step_size="optimizer")
    mod = Tiny()
    ref_gen = NoiseGenerators(seed)
    log = {"checked": 0}

    def before(tr, pl, c):
        opt = tr.optimizers[0]
        views = {v.name: v for v in c.langevin_groups()}
        assert set(views) == {"lora_A/default", "lora_B/default"}
        assert all(v.sampling and v.beta == N / temp and v.weight_decay == lam for v in views.values())
        lr = opt.param_groups[0]["lr"]
        assert views["lora_A/default"].lr == lr
        params = [p for v in views.values() for p in v.params]
        if "G" not in log:  # frozen from AdamW's second moment at the switch
            # the clamp's reference scale is the median of the unclamped G over all Langevin tensors
            raw = [adam_inverse_scale(opt.state[p]["exp_avg_sq"], float(opt.state[p]["step"]), 0.999, 1e-8)
                   for p in params]
            ref = median_scale(raw)
            log["G"] = [frozen_preconditioner(opt.state[p]["exp_avg_sq"], float(opt.state[p]["step"]), 0.999, 1e-8,
                                              (0.2, 5.0), reference=ref) for p in params]
            log["adam_state"] = [opt.state[p]["exp_avg_sq"].clone() for p in params]
        assert all(torch.equal(G, P) for G, P in zip(log["G"], [P for v in views.values() for P in v.precond]))
        xi = draw_standard_normal(params, ref_gen)
        sigma = math.sqrt(2 * lr / (N / temp))
        log["expect"] = [p - lr * G * (p.grad + lam * p) + sigma * G.sqrt() * x
                         for p, G, x in zip(params, log["G"], xi)]
        log["grads"] = [p.grad.clone() for p in params]
        log["params"] = params
        log["head_before"] = {n: p.detach().clone() for n, p in pl.named_parameters() if "modules_to_save" in n}

    def after(tr, pl, c):
        for p, e, g in zip(log["params"], log["expect"], log["grads"]):
            torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
            assert torch.equal(p.grad, g)  # the user sees its gradients unchanged
        opt = tr.optimizers[0]
        for p, v in zip(log["params"], log["adam_state"]):
            assert torch.equal(opt.state[p]["exp_avg_sq"], v)  # AdamW no longer touches LoRA tensors
        moved = [not torch.equal(p, log["head_before"][n]) for n, p in pl.named_parameters() if "modules_to_save" in n]
        assert any(moved)  # the head keeps its optimizer
        log["checked"] += 1

    cb.step_observers.append(before)
    cb.post_step_observers.append(after)
    trainer([cb], burn + 6).fit(mod, loader())
    assert cb.sampling and log["checked"] == 6 == cb.langevin_steps
    assert cb.num_data == N and cb.beta == N / temp


def test_precond_adaptation_refreezes_G_from_mean_squared_gradient_of_U():
    """precond_adapt_steps=k: the first k Langevin steps use the burn-in G while averaging
    (g + lam theta)^2 at each pre-step point; then G = adapted_preconditioner(mean, median of the
    burn-in G) over all Langevin tensors; no sample is kept during adaptation."""
    burn, k, lam = 3, 4, 0.2
    cb = LangevinLoRA(weight_decay=lam, burn_in_steps=burn, seed=2, precond_adapt_steps=k, num_samples=10,
                      diagnostics=False)
    log = {"sq": None, "steps": 0}

    def before(tr, pl, c):
        views = c.langevin_groups()
        params = [p for v in views for p in v.params]
        if log["sq"] is None:
            log["G0"] = [G.clone() for v in views for G in v.precond]
            log["sq"] = [torch.zeros_like(p) for p in params]
            log["params"] = params
        if c.langevin_steps < k:
            assert c.adapting
            assert all(torch.equal(G, P) for G, P in zip(log["G0"], [P for v in views for P in v.precond]))
            for acc, p in zip(log["sq"], params):
                d = p.grad + lam * p.detach()
                acc.addcmul_(d, d)
        else:
            assert not c.adapting
        log["steps"] += 1

    cb.step_observers.append(before)
    trainer([cb], burn + k + 3).fit(Tiny(), loader())
    assert log["steps"] == k + 3 and cb.langevin_steps == k + 3
    reference = median_scale(log["G0"])   # the clamp (lo <= 1 <= hi) keeps the median of the burn-in G
    assert reference == pytest.approx(cb._precond_reference, rel=1e-6)
    expected = adapted_preconditioner([a / k for a in log["sq"]], reference, clamp=cb.precond_clamp)
    got = [P for v in cb.langevin_groups() for P in v.precond]
    for G, E in zip(got, expected):
        torch.testing.assert_close(G, E, rtol=1e-5, atol=0)
    assert not all(torch.equal(G, G0) for G, G0 in zip(got, log["G0"]))
    assert float(torch.cat([G.reshape(-1) for G in got]).median()) == pytest.approx(reference, rel=1e-6)
    assert cb.sample_bank.steps == [burn + k, burn + k + 1, burn + k + 2]   # none during adaptation


@pytest.mark.slow
def test_gibbs_law_gauge_identity_inside_trainer():
    r"""16 chains (16 independent LoRA r=2 modules, in=16, out=2) sampled by one Trainer with AdamW
    burn-in, a step LR schedule and the frozen Adam preconditioner. THEORY §3:
    E[A A^T - B^T B] = (in - out)/(beta lambda) I, loss-independent. Per-chain time averages after
    a discard, z-test across chains."""
    C, d_in, d_out, n = 16, 16, 2, 16
    burn, steps, lam, temp = 100, 1100, 1.0, 0.8

    class Chains(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(C))

        def forward(self, x):
            return torch.stack([layer(x) for layer in self.layers])

    class Multi(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            base = Chains().requires_grad_(False)
            self.model = get_peft_model(base, LoraConfig(r=R, lora_alpha=R, target_modules=r"layers\.\d+"))

        def training_step(self, batch, batch_idx):  # sum over chains of each chain's mean loss
            x, y = batch
            return ((self.model(x) - y) ** 2).sum(-1).mean(-1).sum() / 2

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.0)
            sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < burn else 0.2)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g)
    y = x @ torch.randn(d_in, d_out, generator=g) + 0.1 * torch.randn(n, d_out, generator=g)
    cb = LangevinLoRA(temperature=temp, weight_decay=lam, burn_in_steps=burn, seed=0, precond_clamp=(0.5, 2.0))
    rec, factors = [], []

    def record(tr, pl, c):
        if not factors:
            factors.extend(lora_modules(pl))
        rec.append(torch.stack([f.A @ f.A.T - f.B.T @ f.B for f in factors]).clone())

    cb.post_step_observers.append(record)
    torch.set_num_threads(1)
    trainer([cb], steps).fit(Multi(), DataLoader(TensorDataset(x, y), batch_size=n))
    assert cb.num_data == n and cb.beta == n / temp  # inferred from the dataset
    D = torch.stack(rec)[200:].double()  # (time, chain, r, r), discard ~8 relaxation times
    per_chain = D.mean(0)
    target = (d_in - d_out) / (cb.beta * lam)
    tr = per_chain.diagonal(dim1=-2, dim2=-1).sum(-1)
    z_trace = (tr.mean() - R * target) / (tr.std() / C ** 0.5)
    off = per_chain[:, 0, 1]
    z_off = off.mean() / (off.std() / C ** 0.5)
    assert abs(z_trace) <= 4.5 and abs(z_off) <= 4.5, (tr.mean().item(), R * target, z_trace, z_off)
    # the statistic has power: at twice the temperature the identity would be violated
    assert abs((tr.mean() - 2 * R * target) / (tr.std() / C ** 0.5)) > 4.5


def test_gradient_accumulation_draws_one_noise_per_optimizer_step():
    # zero loss: the trajectory is pure noise, so k = 1 and k = 2 must agree bitwise
    seed, steps = 5, 6
    res = {}
    for k, bs in ((1, 8), (2, 4)):
        # weight_decay=1e-12: a proper prior whose decay (lr * 1e-12 * theta) is below fp32 rounding
        cb = LangevinLoRA(burn_in_steps=0, num_data=N, seed=seed, precondition=False, step_size="optimizer", weight_decay=1e-12)
        mod = Tiny(optimizer="sgd", schedule=False, zero_loss=True)
        start = lora_tensors(mod)
        trainer([cb], steps, accumulate_grad_batches=k).fit(mod, loader(batch_size=bs))
        assert cb.langevin_steps == steps
        res[k] = (start, lora_tensors(mod), cb.generators.state_dict()["states"]["cpu"])
    (s1, e1, g1), (s2, e2, g2) = res[1], res[2]
    assert all(torch.equal(e1[n], e2[n]) for n in e1) and torch.equal(g1, g2)
    # and equal to theta_0 + sigma * sum of `steps` reference draws
    ref = NoiseGenerators(seed)
    sigma = math.sqrt(2 * 1e-2 / N)
    names = list(s1)
    total = [torch.zeros_like(s1[n]) for n in names]
    for _ in range(steps):
        for t, xi in zip(total, draw_standard_normal([s1[n] for n in names], ref)):
            t.add_(xi)
    for n, t in zip(names, total):
        torch.testing.assert_close(e1[n], s1[n] + sigma * t, rtol=1e-5, atol=1e-6)

    # real gradients: the accumulated mean gradient drives the same noise (equal up to rounding)
    out = {}
    for k, bs in ((1, 8), (2, 4)):
        cb = LangevinLoRA(num_data=N, seed=seed, burn_in_steps=2)
        mod = Tiny()
        trainer([cb], steps, accumulate_grad_batches=k).fit(mod, loader(batch_size=bs))
        out[k] = lora_tensors(mod)
    for n in out[1]:
        torch.testing.assert_close(out[1][n], out[2][n], rtol=1e-4, atol=1e-5)


def test_amp_skipped_step_adds_no_noise():
    from lightning.pytorch.plugins import MixedPrecision

    seed, steps, bad = 2, 6, 3
    cb = LangevinLoRA(burn_in_steps=0, num_data=N, seed=seed)
    mod = Tiny(optimizer="sgd", schedule=False, inf_at=bad)
    snaps = {}
    cb.post_step_observers.append(lambda tr, pl, c: snaps.__setitem__(tr.global_step, lora_tensors(pl)))
    # init_scale=1: no overflow-skips while the scale calibrates, only the injected inf step
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    trainer([cb], steps, plugins=[plugin]).fit(mod, loader())
    assert mod.trainer.global_step == steps and cb.langevin_steps == steps - 1 and bad not in snaps
    ref = NoiseGenerators(seed)
    params = list(lora_tensors(mod).values())
    for _ in range(steps - 1):
        draw_standard_normal(params, ref)
    assert torch.equal(cb.generators.state_dict()["states"]["cpu"], ref.state_dict()["states"]["cpu"])


def test_nonfinite_gradient_without_scaler_skips_langevin_step():
    # the head is sampled too (head_temperature > 0), so no optimizer turns the inf into NaN weights
    cb = LangevinLoRA(burn_in_steps=0, num_data=N, seed=0, head_temperature=1.0)
    mod = Tiny(optimizer="sgd", schedule=False, inf_at=2)
    snaps = {}
    cb.post_step_observers.append(lambda tr, pl, c: snaps.__setitem__(tr.global_step, all_tensors(pl)))
    with pytest.warns(NonFiniteGradientWarning, match="no noise drawn"):
        trainer([cb], 4).fit(mod, loader())
    assert cb.langevin_steps == 3 and cb.skipped_steps == 1 and sorted(snaps) == [0, 1, 3]
    assert all(torch.isfinite(t).all() for t in snaps[3].values())
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer([LangevinLoRA(burn_in_steps=0, num_data=N, nonfinite="raise")], 4).fit(Tiny(optimizer="sgd", inf_at=1), loader())


@pytest.mark.parametrize("accumulate, adapt", [(1, 0), (2, 0), (1, 7)])
def test_kill_and_resume_is_bitwise_identical(tmp_path, accumulate, adapt):
    """An uninterrupted run of 2k steps saves a checkpoint at step k (what a run killed after step k
    leaves behind); a fresh process-like setup resumes from it to 2k and must end bitwise equal:
    adapters, head, AdamW and LR schedule, generator state and sample bank. k is an epoch boundary:
    Lightning restarts a plain (non-stateful) DataLoader from its first batch on resume. With
    ``adapt`` the checkpoint falls inside the preconditioner's adaptation window."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    k, burn = 8, 3  # 4 optimizer steps per epoch
    bs = 8 // accumulate

    def make():
        return LangevinLoRA(num_data=N, burn_in_steps=burn, weight_decay=0.1, seed=4, sample_every=2, num_samples=3,
                            precond_adapt_steps=adapt)

    L.seed_everything(0, verbose=False)
    full, cb_full = Tiny(), make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    trainer([cb_full, ckpt], 2 * k, accumulate_grad_batches=accumulate,
            enable_checkpointing=True).fit(full, loader(bs))

    L.seed_everything(123, verbose=False)  # the resumed process does not share the first one's RNG
    resumed, cb_res = Tiny(), make()
    trainer([cb_res], 2 * k, accumulate_grad_batches=accumulate).fit(
        resumed, loader(bs), ckpt_path=tmp_path / f"step={k}.ckpt")

    assert cb_res.langevin_steps == cb_full.langevin_steps == 2 * k - burn
    for (n, a), b in zip(all_tensors(full).items(), all_tensors(resumed).values()):
        assert torch.equal(a, b), n
    assert cb_res.sample_bank.steps == cb_full.sample_bank.steps
    for a, b in zip(cb_full.sample_bank, cb_res.sample_bank):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(cb_full.generators.state_dict()["states"]["cpu"], cb_res.generators.state_dict()["states"]["cpu"])


def test_bf16_adapters_use_fp32_masters_and_resume(tmp_path):
    cb = LangevinLoRA(num_data=N, burn_in_steps=2, seed=1)
    mod = Tiny(optimizer="sgd", schedule=False)
    t = trainer([cb], 5, precision="bf16-true")
    t.fit(mod, loader())
    masters = cb.engine.masters()
    assert masters and all(m.dtype == torch.float32 for m in masters.values())
    params = dict(mod.named_parameters())
    for n, m in masters.items():
        assert params[n].dtype == torch.bfloat16 and torch.equal(params[n], m.to(torch.bfloat16))
        assert cb.work_tensor(params[n]) is m
    state = cb.state_dict()
    fresh = LangevinLoRA(num_data=N, burn_in_steps=2, seed=1)
    fresh.load_state_dict(state)
    fresh.engine.bind(params)
    assert all(torch.equal(fresh.engine.masters()[n], m) for n, m in masters.items())


def test_head_temperature_samples_heads_with_langevin():
    cb = LangevinLoRA(num_data=N, burn_in_steps=2, head_temperature=2.0, head_weight_decay=0.5, seed=0)
    mod = Tiny()
    seen = {}

    def before(tr, pl, c):
        seen.update({v.name: v for v in c.langevin_groups()})
        seen["head_state"] = {id(p): tr.optimizers[0].state[p]["exp_avg_sq"].clone() for p in seen["head"].params}

    cb.step_observers.append(before)
    trainer([cb], 4).fit(mod, loader())
    assert set(seen) == {"lora_A/default", "lora_B/default", "head", "head_state"}
    assert seen["head"].beta == N / 2.0 and seen["head"].weight_decay == 0.5 and seen["lora_A/default"].beta == N
    opt = mod.trainer.optimizers[0]
    for p in seen["head"].params:  # AdamW no longer moves the sampled head
        assert torch.equal(opt.state[p]["exp_avg_sq"], seen["head_state"][id(p)])


def test_lr_scheduler_wrapper_coexists_and_is_removed():
    mod = Tiny()
    cb = LangevinLoRA(num_data=N, burn_in_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "optimizer.step() has been overridden"
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*no Adam second moment.*")
        warnings.filterwarnings("ignore", category=StepSizeWarning)  # the diagnostics judge this lr, rightly
        trainer([cb], 4).fit(mod, loader())
    opt = mod.trainer.optimizers[0]
    assert getattr(opt.step, "_wrapped_by_lr_sched", False)  # the scheduler's patch is back in place
    assert opt._opt_called  # the scheduler saw the optimizer step through our wrapper
    assert mod.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_minilm_lora_takes_langevin_steps(minilm_lora_factory):
    model, tok = minilm_lora_factory(num_labels=2, r=4)
    texts = ["free prize, call now", "see you at lunch", "win cash today", "ok thanks"] * 2
    enc = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0] * 2)
    ds = TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    class Clf(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            ids, mask, y = batch
            return nn.functional.cross_entropy(self.model(input_ids=ids, attention_mask=mask).logits, y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    clf = Clf()
    frozen = {n: p.detach().clone() for n, p in clf.named_parameters() if not p.requires_grad}
    # a fixed step: the automatic one is measured by double backward through the whole MiniLM (~17 HVPs,
    # minutes on 2 CPU cores); tests/test_step_size.py covers it on MiniLM's top layers
    cb = LangevinLoRA(burn_in_steps=2, weight_decay=1e-2, num_samples=2, sample_every=1, seed=0, step_size=1e-5)
    moved = []
    cb.step_observers.append(lambda tr, pl, c: moved.append(lora_tensors(pl)))
    torch.set_num_threads(2)
    trainer([cb], 5).fit(clf, DataLoader(ds, batch_size=4))
    assert cb.num_data == 8 and cb.sampling and cb.langevin_steps == 3
    names = {v.name for v in cb.langevin_groups()}
    assert names == {"lora_A/default", "lora_B/default"}
    after = lora_tensors(clf)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(moved[-1][n], after[n]) for n in after)  # the last Langevin step moved them
    assert all(torch.equal(p, frozen[n]) for n, p in clf.named_parameters() if n in frozen)  # base untouched
    assert len(cb.sample_bank) == 2 and cb.sample_bank.steps == [3, 4]


# -- reliability (issue 11) ------------------------------------------------------------------------
def test_nonfinite_sampling_step_skips_the_whole_optimizer_step():
    """An inf loss at one sampling step with the default nonfinite="skip": the Langevin update *and* the
    user's AdamW step of the head (modules_to_save) are skipped, with a warning; training continues and
    every parameter stays finite (before: the head took a NaN step and every later step was skipped)."""
    steps, burn, bad = 8, 2, 4
    cb = LangevinLoRA(num_data=N, seed=0, burn_in_steps=burn, diagnostics=False)
    mod = Tiny(inf_at=bad)
    seen = []
    cb.step_observers.append(lambda tr, pl, c: seen.append(tr.global_step))
    with pytest.warns(NonFiniteGradientWarning, match="step skipped, nothing updated, no noise drawn"):
        trainer([cb], steps).fit(mod, loader())
    assert cb.skipped_steps == 1 and cb.langevin_steps == steps - burn - 1 and bad not in seen
    assert all(torch.isfinite(p).all() for p in mod.parameters())
    opt = mod.trainer.optimizers[0]
    head = [p for n, p in mod.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert head and all(int(opt.state[p]["step"]) == steps - 1 for p in head)  # AdamW skipped the bad step


def _bank_cb(**kw):
    return LangevinLoRA(num_data=N, burn_in_steps=2, seed=3, num_samples=2, sample_every=1, weight_decay=0.1,
                        diagnostics=False, **kw)


def test_second_fit_starts_a_clean_chain_and_bank():
    """Reusing the callback for another fit (not a resume) gives exactly what a new callback gives:
    counters, generators, preconditioner and bank start over."""
    cb = _bank_cb()
    trainer([cb], 5).fit(Tiny(), loader())
    assert cb.sample_bank.steps == [3, 4]
    reused, fresh, fresh_cb = Tiny(), Tiny(), _bank_cb()
    trainer([cb], 6).fit(reused, loader())
    trainer([fresh_cb], 6).fit(fresh, loader())
    assert cb.langevin_steps == fresh_cb.langevin_steps == 4 and cb.sample_bank.steps == [4, 5]
    for (n, a), b in zip(all_tensors(fresh).items(), all_tensors(reused).values()):
        assert torch.equal(a, b), n
    for a, b in zip(fresh_cb.sample_bank, cb.sample_bank):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(cb.generators.state_dict()["states"]["cpu"], fresh_cb.generators.state_dict()["states"]["cpu"])


def test_sample_dir_of_an_earlier_run_is_refused_unless_resuming(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    bank = tmp_path / "bank"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer([_bank_cb(sample_dir=bank), ckpt], 8, enable_checkpointing=True).fit(Tiny(), loader())
    # the bank holds 6, 7; the step-4 checkpoint's 2, 3 stay on disk while one of the last two saved states lists them
    assert sorted(p.name for p in bank.iterdir()) == ["sample-00000002", "sample-00000003",
                                                      "sample-00000006", "sample-00000007"]
    with pytest.raises(MisconfigurationException, match=r"sample_dir='.*bank' already holds 4 sample folders of "
                                                        r"an earlier run.*does not resume"):
        trainer([_bank_cb(sample_dir=bank)], 8).fit(Tiny(), loader())
    cb = _bank_cb(sample_dir=bank)   # resuming that run is allowed
    trainer([cb], 8).fit(Tiny(), loader(), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert cb.langevin_steps == 6 and cb.sample_bank.steps == [6, 7]


def test_sample_dir_is_validated_at_construction_and_setup(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"Invalid sample_dir: '.*file\.txt' exists and is not a folder"):
        LangevinLoRA(num_samples=1, sample_dir=f)
    with pytest.raises(ValueError, match=r"Invalid sample_dir: '.*bank' is not writable"):
        LangevinLoRA(burn_in_steps=0, num_data=N, num_samples=1, sample_dir=f / "bank")   # below a file: cannot be created
    d = tmp_path / "later"
    cb = LangevinLoRA(burn_in_steps=0, num_data=N, num_samples=1, sample_dir=d / "bank")
    d.write_text("x")                  # turned into a file after construction: found at setup, before training
    with pytest.raises(ValueError, match=r"Invalid sample_dir: '.*bank' is not writable"):
        trainer([cb], 2).fit(Tiny(), loader())


def test_warns_when_sampling_never_starts():
    cb = LangevinLoRA(num_data=N, burn_in_steps=100, diagnostics=False)
    with pytest.warns(UserWarning, match="plans 8 optimizer steps and burn_in_steps=100: sampling never starts") as rec:
        trainer([cb], 8).fit(Tiny(), loader())
    assert any("fit ended without a Langevin step" in str(w.message) for w in rec)
    cb = LangevinLoRA(num_data=N, burn_in_steps=8, diagnostics=False)   # planned by epochs: 2 x 4 steps
    with pytest.warns(UserWarning, match="plans 8 optimizer steps and burn_in_steps=8"):
        L.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, accelerator="cpu", devices=1).fit(Tiny(), loader())
    assert cb.langevin_steps == 0


def test_numpy_numbers_are_accepted():
    import numpy as np

    cb = LangevinLoRA(num_data=np.int64(N), burn_in_steps=np.int64(2), sample_every=np.int32(1),
                      num_samples=np.int64(2), seed=np.int64(1), temperature=np.float32(0.5),
                      weight_decay=np.float64(0.1), precond_clamp=(np.float32(0.1), np.int64(10)),
                      precond_adapt_steps=np.int8(0), diagnostics=False)
    trainer([cb], 4).fit(Tiny(), loader())
    assert type(cb.num_data) is int and cb.num_data == N and cb.beta == 2 * N
    assert cb.langevin_steps == 2 and len(cb.sample_bank) == 2


def test_unknown_adapter_name_refused_at_setup():
    with pytest.raises(MisconfigurationException,
                       match=r"Invalid adapter_name: 'other' \(the model's LoRA adapters are \['default'\]\)"):
        trainer([LangevinLoRA(burn_in_steps=0, num_data=N, adapter_name="other")], 2).fit(Tiny(), loader())
