"""The zero-config drop-in: ``Trainer(callbacks=[LangevinLoRA()])`` on a module that logs
``val_loss`` goes through every phase (watch, restore the best point, the prior-scale ladder, stop),
warns and falls back without ``val_loss``, and resumes bitwise in the middle of each phase."""

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from dropin_helpers import TinyClassifier, blobs, loaders, trainer
from langevin_lora import LangevinLoRA, bma_predict_proba


pytestmark = pytest.mark.usefixtures("quiet_lightning")


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_zero_argument_dropin_goes_through_every_phase():
    L.seed_everything(0, verbose=False)
    module, cb = TinyClassifier(), LangevinLoRA()
    snapshots = {}

    class Spy(L.Callback):   # the weights at every validation check
        def on_validation_end(self, trainer, pl_module):
            snapshots[trainer.global_step] = _trainable(pl_module)

    train, val = loaders()
    t = trainer([cb, Spy()], max_epochs=100)
    t.fit(module, train, val)
    chain = cb.chain
    planned = 100 * len(train)
    # watched, restored the best point, sampled a ladder, stopped before the budget's end
    assert chain.phase == "done" and chain.start_step is not None and chain.best_step in snapshots
    assert "did not improve for 2 validation checks" in chain.start_reason
    assert t.global_step < planned and t.should_stop
    assert len(chain.stages) >= 2 and chain.best_stage is not None
    assert chain.stop_reason
    # the prior is centred at the restored best point (LoRA A, B and the sampled head)
    restored = snapshots[chain.best_step]
    centres = {n: c for g in cb._groups for n, c in zip(g.names, cb.engine.prior_centres(g.names, g.params))}
    assert any("head" in n for n in centres) and any("lora_A" in n for n in centres)
    for n, c in centres.items():
        assert torch.equal(c, restored[n]), n
    # defaults of the measured target: kinetic, head sampled, G clamped, num_samples per stage
    assert cb.friction == "auto" and cb.head_temperature == 1.0 and cb.precond_clamp == (0.1, 10.0)
    assert cb.prior_centre == "burn_in" and not cb.dropout
    best = chain.stages[chain.best_stage]
    final = chain.stages[-1]
    assert final.final and final.prior_std == best.prior_std == cb.prior_std   # the final stage samples σ*
    # the bank: the final stage's samples, and the best scoring stage's when the final one went back to it
    assert len(cb.sample_bank) == final.samples + (0 if final is best else best.samples)
    assert cb.num_samples <= len(cb.sample_bank) <= 3 * cb.num_samples
    # the cost stays within the budget, curvature probes counted
    assert t.global_step + cb.probe_steps() <= planned
    probs = bma_predict_proba(module, cb.sample_bank, val)
    assert probs.shape == (len(val.dataset), 3) and torch.allclose(probs.sum(-1), torch.ones(len(probs)))
    # the report judges the stretch the samples came from
    spans = cb.diagnostics.report_span
    assert spans[0][0] == best.start + best.relax and spans[-1] == (final.start + final.relax, cb.langevin_steps)
    assert cb.diagnostics.last_report is not None


def test_the_ladder_keeps_the_stage_with_the_best_validation_average():
    L.seed_everything(0, verbose=False)
    module, cb = TinyClassifier(), LangevinLoRA(prior_std=[0.005, 0.01, 0.02, 0.04, 0.08], num_samples=4)
    train, val = loaders()
    trainer([cb], max_epochs=80).fit(module, train, val)
    stages = cb.chain.stages
    best = stages[cb.chain.best_stage]
    for st in stages[1:cb.chain.best_stage + 1]:   # each stage that took over won by the rule
        wider = st.prior_std > stages[0].prior_std
        assert st.delta < (st.se if wider else -st.se)
    for st in stages[cb.chain.best_stage + 1:]:
        if not st.final:   # the one after the best lost by the rule
            assert st.delta >= (st.se if st.prior_std > best.prior_std else -st.se)


def test_without_val_loss_one_warning_and_the_fallback():
    L.seed_everything(0, verbose=False)
    module, cb = TinyClassifier(log_val=False), LangevinLoRA(max_burn_in_fraction=0.5)   # no val_loss logged
    train, val = loaders()
    with pytest.warns(UserWarning, match=r"no 'val_loss' was logged by step 90 .*max_burn_in_fraction=0.5") as rec:
        trainer([cb], max_epochs=30).fit(module, train, val)
    assert sum("was logged" in str(w.message) for w in rec) == 1
    assert cb.chain.start_step == 90 and len(cb.sample_bank) > 0


def test_still_improving_at_the_end_keeps_the_best_point():
    """The well-fit case: validation never stops improving, so nothing is sampled and the bank's one
    sample is the best point, which is back in the module (no harm against early stopping)."""
    L.seed_everything(0, verbose=False)
    module, cb = TinyClassifier(lr=0.002), LangevinLoRA(patience=50)
    snapshots = {}

    class Spy(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            snapshots[trainer.global_step] = _trainable(pl_module)

    train, val = loaders()
    trainer([cb, Spy()], max_epochs=8).fit(module, train, val)
    chain = cb.chain
    assert chain.phase == "done" and chain.start_step is None and cb.langevin_steps == 0
    assert "still improving when the budget ended" in chain.stop_reason
    assert cb.sample_bank.steps == [chain.best_step] and len(cb.sample_bank) == 1
    for n, p in _trainable(module).items():
        assert torch.equal(p, snapshots[chain.best_step][n]) and torch.equal(cb.sample_bank[0][n], p), n


def test_a_short_budget_warns_with_the_numbers():
    L.seed_everything(0, verbose=False)
    module, cb = TinyClassifier(log_val=False), LangevinLoRA(max_burn_in_fraction=0.8)
    train, val = loaders()
    with pytest.warns(UserWarning, match=r"optimizer steps are left for sampling, but the chain needs \d+ steps"):
        trainer([cb], max_epochs=60).fit(module, train, val)
    assert len(cb.sample_bank) > 0


def test_invalid_dropin_arguments():
    for kwargs, match in ((dict(burn_in_steps="soon"), "Invalid burn_in_steps"), (dict(patience=0), "patience"),
                          (dict(mode="lower"), "Invalid mode"), (dict(monitor=3), "Invalid monitor"),
                          (dict(num_samples=0), r"num_samples: 0 with burn_in_steps='auto'"),
                          (dict(max_burn_in_fraction=0.0), "max_burn_in_fraction"),
                          (dict(prior_std=[0.1, 0.05]), "strictly increasing"),
                          (dict(burn_in_steps=5, prior_std=[0.01, 0.02]), "needs burn_in_steps='auto'"),
                          (dict(dropout="no"), "Invalid dropout"), (dict(forward_fn=3), "Invalid forward_fn")):
        with pytest.raises(ValueError, match=match):
            LangevinLoRA(**kwargs)


@pytest.mark.parametrize("resume_epoch", [3, 12, 40])   # watching / sampling / after the stop
def test_resume_in_every_phase_is_bitwise(tmp_path, resume_epoch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    train = DataLoader(blobs(96, 1), batch_size=16, shuffle=False)
    val = DataLoader(blobs(96, 2), batch_size=48, shuffle=False)

    def run(callbacks, ckpt_path=None, **kw):
        module, cb = TinyClassifier(dropout=0.0), LangevinLoRA(num_samples=4)   # dropout draws from the global RNG
        trainer([cb, *callbacks], max_epochs=50, **kw).fit(module, train, val, ckpt_path=ckpt_path)
        return module, cb

    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    full, cb_full = run([ckpt], enable_checkpointing=True)
    saved = max(int(p.stem.split("=")[1]) for p in tmp_path.glob("epoch=*.ckpt"))
    path = tmp_path / f"epoch={min(resume_epoch, saved)}.ckpt"
    phase = torch.load(path, weights_only=False)["callbacks"]
    assert any(isinstance(v, dict) and "chain" in v for v in phase.values())
    L.seed_everything(123, verbose=False)
    resumed, cb_res = run([], ckpt_path=path)
    assert cb_full.chain.state_dict() == cb_res.chain.state_dict()
    for (n, a), b in zip(_trainable(full).items(), _trainable(resumed).values()):
        assert torch.equal(a, b), n
    assert cb_res.sample_bank.steps == cb_full.sample_bank.steps and len(cb_res.sample_bank) > 0
    for a, b in zip(cb_full.sample_bank, cb_res.sample_bank):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_step_size_and_guard_take_configured_instances():
    from langevin_lora import AutoStepSize, DivergenceGuard

    auto, guard = AutoStepSize(safety=0.3, every_n_steps=50), DivergenceGuard(max_cuts=2)
    cb = LangevinLoRA(step_size=auto, guard=guard)
    assert cb.auto_step is auto and cb.step_size == "auto" and cb.guard is guard
    guard.scale, guard.cuts = 0.25, 1
    other = DivergenceGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.scale, other.cuts) == (0.25, 1)
    with pytest.raises(ValueError, match="Invalid step_size: 'fast'.*AutoStepSize"):
        LangevinLoRA(step_size="fast")
