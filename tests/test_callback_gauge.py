"""Gauge options of the LangevinLoRA callback: balancing in burn-in only, exact gauge moves while
sampling (THEORY §4), wired to the real adapter tensors inside a lightning.Trainer."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from langevin_lora import BalanceSchedule, GaugeMoves, LangevinLoRA
from langevin_lora.lora.gauge import gauge_imbalance
from langevin_lora.lora.param_groups import lora_modules
from callback_helpers import Tiny, loader, trainer


pytestmark = [pytest.mark.usefixtures("quiet_lightning"),
              pytest.mark.filterwarnings("ignore:.*preconditioner is the identity")]


def _factors_at_first_langevin_step(cb: LangevinLoRA, module: Tiny, steps: int):
    seen = {}

    def first(tr, pl, c):
        if not seen:
            f = lora_modules(pl.model)[0]
            seen["BA"] = (f.B @ f.A).detach().clone()
            seen["D"] = gauge_imbalance(f.A.detach(), f.B.detach()).clone()

    cb.step_observers.append(first)
    trainer([cb], max_steps=steps).fit(module, loader())
    return seen


def test_balancing_at_end_of_burn_in_keeps_BA_and_zeroes_the_imbalance():
    plain = _factors_at_first_langevin_step(LangevinLoRA(burn_in_steps=3, weight_decay=0.1, seed=0), Tiny(), 4)
    cb = LangevinLoRA(burn_in_steps=3, weight_decay=0.1, seed=0, balance=BalanceSchedule(at_sampling_start=True))
    balanced = _factors_at_first_langevin_step(cb, Tiny(), 4)
    assert cb.balance.num_balanced == 1
    # same burn-in trajectory, then a pure gauge change: the product BA is unchanged ...
    torch.testing.assert_close(balanced["BA"], plain["BA"], rtol=1e-5, atol=1e-6)
    # ... while the factors went from unbalanced to balanced (D = AA^T - B^T B = 0)
    assert plain["D"].abs().max() > 1e-2
    assert balanced["D"].abs().max() < 1e-5


def test_periodic_balancing_counts_burn_in_steps_only():
    cb = LangevinLoRA(burn_in_steps=6, weight_decay=0.1, seed=0,
                      balance=BalanceSchedule(every_n_steps=2, at_sampling_start=False))
    trainer([cb], max_steps=10).fit(Tiny(), loader())
    assert cb.balance.num_balanced == 3  # after burn-in steps 2, 4, 6; none of the 4 sampling steps


def test_balancing_during_sampling_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"balance.*during sampling.*law"):
        LangevinLoRA(burn_in_steps=0, balance=BalanceSchedule(every_n_steps=5))
    with pytest.raises(ValueError, match="gauge_moves"):
        LangevinLoRA(gauge_moves="orthogonal")


def _BA_trajectory(gauge_moves):
    """Noise-free (T = 0) identity-preconditioned descent with coupled decay, recording BA and A."""
    cb = LangevinLoRA(burn_in_steps=0, temperature=0.0, weight_decay=0.2, precondition=False, seed=0, gauge_moves=gauge_moves)
    trace = []
    cb.post_step_observers.append(lambda tr, pl, c: trace.append(
        [(f.B @ f.A).detach().clone() for f in lora_modules(pl.model)] + [lora_modules(pl.model)[0].A.detach().clone()]))
    trainer([cb], max_steps=12).fit(Tiny(optimizer="sgd", schedule=False), loader())
    return trace


def test_orthogonal_moves_act_on_the_real_factors_and_preserve_BA():
    """Descent on L(BA) + lambda/2 (|A|^2 + |B|^2) is equivariant under (A, B) -> (OA, BO^T), so with
    orthogonal moves after every step the product BA follows the same path while A does not."""
    plain = _BA_trajectory(None)
    moved = _BA_trajectory(GaugeMoves(every_n_steps=1, orthogonal=True, seed=3))
    assert len(plain) == len(moved) == 12
    for a, b in zip(plain, moved):
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain[-1][-1], moved[-1][-1], atol=1e-3)


def test_gl_acceptance_is_logged_and_gauge_state_resumes(tmp_path):
    moves = GaugeMoves(every_n_steps=2, orthogonal=True, gl_step=0.5, seed=1)
    cb = LangevinLoRA(weight_decay=0.1, burn_in_steps=2, seed=0, gauge_moves=moves)
    logger = CSVLogger(tmp_path, name="g")
    L.Trainer(max_steps=12, callbacks=[cb], logger=logger, log_every_n_steps=1, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
              max_epochs=-1).fit(Tiny(), loader())
    with open(logger.log_dir + "/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    acc = [float(r["langevin/gauge/gl_acceptance"]) for r in rows if r.get("langevin/gauge/gl_acceptance")]
    assert acc and all(0.0 <= a <= 1.0 for a in acc)
    state = cb.state_dict()  # 10 Langevin steps, a move on every 2nd: 5 GL proposals (one module)
    assert state["gauge_moves"]["calls"] == 10 and state["gauge_moves"]["gl_proposed"] == 5
    fresh = LangevinLoRA(weight_decay=0.1, burn_in_steps=2, seed=0,
                         gauge_moves=GaugeMoves(every_n_steps=2, gl_step=0.5, seed=99))
    fresh.load_state_dict(state)
    assert fresh.gauge_moves.calls == 10
    assert fresh.gauge_moves.generators.state_dict()["seed"] == 1


def test_gauge_moves_on_bf16_adapters_keep_fp32_precision():
    """bf16 adapters are sampled through fp32 master copies; a gauge move under the callback must move
    those masters (the parameters receive their rounding), not the rounded bf16 parameters, which the
    next step would copy back into the masters and so discard the fp32 digits."""
    cb = LangevinLoRA(num_data=32, burn_in_steps=2, weight_decay=0.1, seed=0, diagnostics=False,
                      gauge_moves=GaugeMoves(every_n_steps=1, orthogonal=True, seed=1))
    checked = []

    def after(tr, pl, c):
        for f in lora_modules(pl.model):
            for p in (f.A, f.B):
                w = c.work_tensor(p)
                assert p.dtype == torch.bfloat16 and w.dtype == torch.float32
                assert torch.equal(p, w.to(p.dtype))            # the parameter is the moved master's rounding
                assert not torch.equal(w, w.to(p.dtype).float())  # and the master keeps its fp32 digits
        checked.append(tr.global_step)

    cb.post_step_observers.append(after)
    trainer([cb], max_steps=8, precision="bf16-true").fit(Tiny(optimizer="sgd", schedule=False), loader())
    assert checked == [2, 3, 4, 5, 6, 7] and cb.gauge_moves.calls == 6
