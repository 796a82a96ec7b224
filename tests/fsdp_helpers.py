"""Runs shared by tests/test_fsdp.py and tests/fsdp_worker.py: one tiny PEFT LoRA model, sampled by the
callback or the optimizers, overdamped and kinetic, on one process, under DDP or under FSDP2
(Lightning's ModelParallelStrategy, ``fully_shard`` in ``configure_model``).

Every rank sees the same batches (``use_distributed_sampler=False``): the all-reduce (DDP) or
reduce-scatter (FSDP2) of two identical gradients is that gradient exactly (sums and halvings of
floats are exact), so the gradients of 1 and 2 processes agree bitwise and any difference left
would come from the noise or the sharded state. (With different data per rank the mean over 2×4
examples and the mean over 8 round differently: equality would then hold to a reduction-order
tolerance only, which would not test what the sharding does.)
"""
from __future__ import annotations

import os
import warnings

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from langevin_lora import AutoStepSize, DivergenceWarning, LangevinAdam, LangevinSGD
from langevin_lora.lightning.callback import LangevinLoRA
from langevin_lora.core.sharding import full_tensor

STEPS, BURN = 60, 5   # burn-in + 55 sampling steps
N = 64

#: name -> (front-end, options): the callback and both optimizers, overdamped and kinetic.
RUNS = {
    # a tight clamp: G's median scale (over every shard) decides which entries are clamped
    "callback_overdamped": ("callback", dict(friction=None, step_size=2e-3, head_temperature=0.0,
                                             precond_clamp=(0.5, 2.0))),
    "callback_kinetic": ("callback", dict(friction="auto", step_size=2e-2, head_temperature=1.0,
                                          prior_centre="burn_in")),
    "sgd_overdamped": ("sgd", dict(lr=2e-3, friction=None)),
    "sgd_kinetic": ("sgd", dict(lr=2e-2, friction=2.0)),
    "adam_overdamped": ("adam", dict(lr=1e-2, friction=None, step_size=2e-3)),
    "adam_kinetic": ("adam", dict(lr=1e-2, friction="auto", step_size=2e-2, precond_clamp=(0.5, 2.0))),
    # bf16 parameters: the fp32 masters are shards beside them, the parameters receive their rounding
    "sgd_bf16_kinetic": ("sgd", dict(lr=2e-2, friction=2.0, dtype=torch.bfloat16)),
    # step_size="auto": the curvature measured on the shards (finite differences, full probe vectors), at
    # sampling start and warm-started every 20 steps; the callback's single-device reference measures by
    # finite differences too (its default there is double backward, which FSDP2 cannot run)
    "callback_auto_kinetic": ("callback", dict(friction="auto", step_size="auto", head_temperature=1.0,
                                               step_size_every_n_steps=20)),
    "callback_auto_overdamped": ("callback", dict(friction=None, step_size="auto", head_temperature=0.0,
                                                  step_size_every_n_steps=20)),
    "sgd_auto_overdamped": ("sgd", dict(lr=1.0, friction=None, step_size="auto", step_size_every_n_steps=20)),
    "adam_auto_kinetic": ("adam", dict(lr=1e-2, friction="auto", step_size="auto", step_size_every_n_steps=20)),
    "sgd_bf16_auto_kinetic": ("sgd", dict(lr=1.0, friction=2.0, step_size="auto", dtype=torch.bfloat16)),
    # a fixed step far too long: the divergence guard restores and cuts straight to the stable step it
    # measures at the restored point (on the shards)
    "callback_guard": ("callback", dict(friction=None, step_size=5.0, head_temperature=0.0,
                                        step_method="finite_difference")),
    "sgd_guard": ("sgd", dict(lr=5.0, friction=None)),
    # the live Gibbs diagnostics (diag=True: GibbsDiagnostics, make_diagnostics): on full copies of the
    # shards, so every traced value is the single-device one; the callback's with half-batch gradients
    # (split_batch), the optimizer's with gradient accumulation (micro-batch gradients)
    "callback_diag_kinetic": ("callback", dict(friction="auto", step_size=2e-2, head_temperature=1.0, diag=True)),
    "sgd_diag_kinetic": ("sgd", dict(lr=2e-2, friction=2.0, diag=True, accumulate=2)),
}
#: Runs compared with 1 process only (the DDP launch skips them: DDP is not what they exercise).
FSDP_ONLY = ("callback_auto_kinetic", "callback_auto_overdamped", "sgd_auto_overdamped", "adam_auto_kinetic",
             "sgd_bf16_auto_kinetic", "callback_guard", "sgd_guard", "callback_diag_kinetic", "sgd_diag_kinetic")


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)   # 5 output rows over 2 ranks: uneven shards (3 + 2)
        self.cls = nn.Linear(5, 3)

    def forward(self, x):
        return self.cls(torch.tanh(self.lin(x)))


class Module(L.LightningModule):
    def __init__(self, kind: str, options: dict, sharded: bool):
        super().__init__()
        torch.manual_seed(0)
        self.model = get_peft_model(Base(), LoraConfig(r=3, lora_alpha=3, target_modules=["lin"],
                                                       modules_to_save=["cls"]))
        options = dict(options)
        dtype = options.pop("dtype", None)
        if dtype is not None:
            self.model.to(dtype)
        self.dtype_ = dtype or torch.float32
        self.kind, self.options, self.sharded = kind, options, sharded

    def configure_model(self):
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x.to(self.dtype_)).float(), y)

    def validation_step(self, batch, batch_idx):   # the drop-in's monitor (not synced: the callback reduces)
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opts = dict(self.options)
        if self.kind == "callback":
            return torch.optim.AdamW(params, lr=1e-2)
        if self.kind == "sgd":
            return LangevinSGD(params, num_data=N, weight_decay=1e-2, seed=7, **opts)
        return LangevinAdam(params, num_data=N, weight_decay=1e-2, seed=7, burn_in_steps=BURN, **opts)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))


def make_trainer(strategy, devices: int, callbacks=(), max_steps: int = STEPS, **kwargs) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=max_steps, max_epochs=-1,
                     callbacks=list(callbacks), logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=saving, use_distributed_sampler=False, **kwargs)


def make_callback(options: dict, **kwargs) -> LangevinLoRA:
    options = dict(options, **kwargs)
    method = options.pop("step_method", None)
    if options.get("step_size") == "auto":   # finite differences on one process too (the comment in RUNS)
        options["step_size"] = AutoStepSize(method="finite_difference", seed=7,
                                            every_n_steps=options.pop("step_size_every_n_steps", 1000))
    options.setdefault("diagnostics", False)
    cb = LangevinLoRA(burn_in_steps=BURN, weight_decay=1e-2, seed=7, num_samples=2, sample_every=20, **options)
    if method is not None:   # the guard's measurement of the stable step
        cb.auto_step.method = method
    return cb


def loader() -> DataLoader:
    return DataLoader(dataset(), batch_size=4)


def full_params(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every trainable tensor, unsharded (a collective under FSDP: every rank calls it)."""
    return {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters() if p.requires_grad}


def halves(batch):
    x, y = batch
    return (x[:2], y[:2]), (x[2:], y[2:])


def make_diagnostics(kind: str):
    """Every probe at a cadence the 55 sampling steps reach; finite differences (FSDP2's only way)."""
    from langevin_lora.diagnostics import GibbsDiagnostics

    return GibbsDiagnostics(log_every_n_steps=10, hvp_every_n_steps=20, lambda_max_every_n_steps=20,
                            hvp_method="finite_difference", center_window=10, report=False, seed=1,
                            split_batch=halves if kind == "callback" else None, noise_every_n_steps=5)


def run(name: str, strategy, devices: int, sharded: bool) -> dict:
    """One run of RUNS[name]; returns the unsharded adapters and heads and what the front-end kept."""
    kind, options = RUNS[name]
    options = dict(options)
    diag = make_diagnostics(kind) if options.pop("diag", False) else None
    accumulate = options.pop("accumulate", 1)
    module = Module(kind, options, sharded)
    callbacks = [make_callback(options, **({"diagnostics": diag} if diag is not None else {}))] \
        if kind == "callback" else []
    if diag is not None and kind != "callback":
        callbacks.append(diag)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")   # the drop-in's validation_step
        if "guard" in name:   # the runaway it is made for (the test checks the cut)
            warnings.filterwarnings("ignore", category=DivergenceWarning)
        trainer = make_trainer(strategy, devices, callbacks, accumulate_grad_batches=accumulate)
        trainer.fit(module, loader())
    out = {"params": full_params(module), "global_step": trainer.global_step}
    if diag is not None:
        rec = diag.recorder
        out["diagnostics"] = dict(traces=rec.traces, laplacians=rec.laplacians, eta_lambda_max=rec.eta_lambda_max,
                                  logged=diag.last_logged, steps=rec.sampling_steps, chi2=rec.mean_force_chi2(),
                                  noise_ratio=rec.noise_ratio)
    sampler = callbacks[0] if kind == "callback" else trainer.optimizers[0]
    out.update(lambda_max=sampler.auto_step.lambda_max, measurements=sampler.auto_step.measurements,
               step_cuts=sampler.guard.cuts)
    if kind == "callback":
        cb = callbacks[0]
        out.update(langevin_steps=cb.langevin_steps, bank=[dict(s) for s in cb.sample_bank],
                   bank_steps=list(cb.sample_bank.steps), theta_scale=cb.guard.theta_scale)
    return out


def worker_main(out_dir: str, mode: str, names: list[str]) -> None:
    """In each of 2 processes launched with LOCAL_RANK/WORLD_SIZE set: the runs ``names`` under
    ``mode`` ("fsdp" or "ddp"); rank 0 saves the results."""
    torch.set_num_threads(1)
    if mode == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        def strategy():
            return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        def strategy():
            return "ddp"
    results = {n: run(n, strategy(), 2, mode == "fsdp") for n in names}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(results, os.path.join(out_dir, f"{mode}.pt"))


RESUME_AT = 32   # an epoch boundary (16 batches of 4 per epoch): a plain DataLoader restarts there


def _callback_fit(strategy, devices: int, sharded: bool, max_steps: int, ckpt_path=None, save_dir=None,
                  sample_dir=None) -> tuple[Module, LangevinLoRA]:
    """The kinetic callback chain; ``save_dir``: checkpoint at step RESUME_AT there (``step=32.ckpt``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kind, options = RUNS["callback_kinetic"]
    module = Module(kind, options, sharded)
    cb = make_callback(options, sample_dir=sample_dir) if sample_dir is not None else make_callback(options)
    callbacks = [cb]
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, every_n_train_steps=RESUME_AT, save_top_k=-1,
                                         filename="{step}"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")   # the drop-in's validation_step
        trainer = make_trainer(strategy, devices, callbacks, max_steps=max_steps)
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, cb


def resume_runs(strategy, out_dir: str) -> dict:
    """The kinetic callback chain under FSDP2 interrupted at RESUME_AT and resumed to STEPS, from a
    sharded (distributed) checkpoint and from a full one (``save_distributed_checkpoint=False``)."""
    out = {}
    for kind, distributed in (("sharded", True), ("full", False)):
        folder = os.path.join(out_dir, kind)
        module, cb = _callback_fit(strategy(distributed), 2, True, STEPS, save_dir=folder)
        out[f"{kind}_straight"] = full_params(module)
        module, cb = _callback_fit(strategy(distributed), 2, True, STEPS,
                                   ckpt_path=os.path.join(folder, f"step={RESUME_AT}.ckpt"))
        out[kind] = full_params(module)
        out[f"{kind}_bank"] = [dict(s) for s in cb.sample_bank]
    return out


def bank_and_bma(strategy, devices: int, sharded: bool, sample_dir: str) -> dict:
    """The kinetic callback chain with its samples written as PEFT folders (rank 0), then
    ``bma_predict_proba`` of the (sharded) module on the training inputs."""
    from langevin_lora import bma_predict_proba

    module, cb = _callback_fit(strategy, devices, sharded, STEPS, sample_dir=sample_dir)
    x = dataset().tensors[0]
    probs = bma_predict_proba(module, cb.sample_bank, [x[:32], x[32:]], forward_fn=lambda m, b: m(b))
    return {"probs": probs, "bank": [dict(s) for s in cb.sample_bank], "params": full_params(module)}


def val_loader() -> DataLoader:
    """Random labels: validation stops improving early, so the drop-in samples (its ladder of stages)."""
    g = torch.Generator().manual_seed(5)
    return DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)),
                      batch_size=16)


def dropin_run(strategy, devices: int, sharded: bool) -> dict:
    """The zero-config drop-in (``burn_in_steps="auto"``: validation watch, best-point restore, clamp
    (0.1, 10), kinetic, sampled heads, the ladder of prior scales) with a float step."""
    module = Module("callback", {}, sharded)
    cb = LangevinLoRA(step_size=1e-2, diagnostics=False, seed=3, num_samples=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_epochs=16, callbacks=[cb],
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, use_distributed_sampler=False, num_sanity_val_steps=0)
        trainer.fit(module, loader(), val_loader())
    return {"params": full_params(module), "chain": cb.chain.state_dict(), "bank_steps": list(cb.sample_bank.steps),
            "langevin_steps": cb.langevin_steps}


def worker_extra(out_dir: str) -> None:
    """FSDP2, 2 processes: resume of the callback and of the optimizers (sharded and full checkpoints), sample
    folders and BMA."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)

    def strategy(distributed: bool = True):
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed)

    results = {"resume": resume_runs(strategy, out_dir), "optimizer_resume": optimizer_resume_runs(strategy, out_dir),
               "bank": bank_and_bma(strategy(), 2, True, os.path.join(out_dir, "samples")),
               "dropin": dropin_run(strategy(), 2, True)}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(results, os.path.join(out_dir, "extra.pt"))


def optimizer_resume_runs(strategy, out_dir: str, names=("sgd_kinetic", "adam_kinetic")) -> dict:
    """The optimizers' kinetic chains under FSDP2 interrupted at RESUME_AT and resumed to STEPS, from a
    sharded (distributed) and from a full checkpoint: their per-tensor state (momenta, G, moments) is
    local shards in ``Optimizer.state``, saved through torch's distributed checkpoint state dicts."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = {}
    for name in names:
        kind, options = RUNS[name]
        for ckpt, distributed in (("sharded", True), ("full", False)):
            folder = os.path.join(out_dir, f"{name}_{ckpt}")
            for resume in (False, True):
                module = Module(kind, options, True)
                callbacks = [] if resume else [ModelCheckpoint(dirpath=folder, every_n_train_steps=RESUME_AT,
                                                               save_top_k=-1, filename="{step}")]
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", ".*does not have many workers.*")
                    warnings.filterwarnings("ignore", ".*LeafSpec.*")
                    trainer = make_trainer(strategy(distributed), 2, callbacks)
                    trainer.fit(module, loader(),
                                ckpt_path=os.path.join(folder, f"step={RESUME_AT}.ckpt") if resume else None)
                out[f"{name}_{ckpt}_{'resumed' if resume else 'straight'}"] = full_params(module)
    return out
