"""The sampling engine under its front-ends: the optimizers and the callback give the same chain,
foreach kernels are grouped by (device, dtype), and the per-tensor state round-trips by key."""
from __future__ import annotations

import pytest
import torch

from langevin_lora import LangevinEngine, LangevinLoRA, LangevinSGD
from callback_helpers import N, SEED, STEPS, WD, LoraOnly, given_G, loader, trainable_tensors, trainer

pytestmark = pytest.mark.usefixtures("quiet_lightning")

@pytest.mark.filterwarnings("ignore:.*no Adam second moment")
@pytest.mark.parametrize("preconditioned", [False, True])
def test_optimizer_and_callback_give_bitwise_identical_chains(preconditioned):
    """Same model, data order, seed, step size, prior and G: LangevinSGD (G = 1) or LangevinAdam after
    its freeze (a given G) as the optimizer, and the callback over torch SGD, run one engine and must
    produce the same chain bit for bit."""
    G = given_G() if preconditioned else None
    opt_mod = LoraOnly("langevin_adam" if preconditioned else "langevin_sgd", precond=G)
    start = trainable_tensors(opt_mod)
    trainer([], STEPS).fit(opt_mod, loader())

    cb = LangevinLoRA(num_data=N, weight_decay=WD, seed=SEED, burn_in_steps=0, precondition=preconditioned,
                      step_size="optimizer", diagnostics=False)
    if preconditioned:
        def inject(tr, pl, c):   # the callback froze no G (SGD has no second moment): give it the same one
            if c.langevin_steps == 0:
                c.engine.freeze([], fixed={n: G[n].clone() for n in G})
        cb.step_observers.append(inject)
    cb_mod = LoraOnly("sgd")
    trainer([cb], STEPS).fit(cb_mod, loader())

    assert cb.langevin_steps == STEPS
    a, b = trainable_tensors(opt_mod), trainable_tensors(cb_mod)
    assert a.keys() == b.keys() == start.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
        assert not torch.equal(a[n], start[n]), n
    if preconditioned:
        assert all(torch.equal(P, G[n]) for n, P in zip(G, cb.engine.preconditioners(list(G))))


def test_foreach_grouped_by_dtype_matches_single_tensor():
    """A group mixing float32 and float64 tensors: the foreach path (one kernel per (device, dtype))
    and the loop agree bitwise, and each tensor keeps its dtype."""
    def run(foreach):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=dt)) for dt in
              (torch.float32, torch.float64, torch.float32, torch.float64)]
        opt = LangevinSGD(ps, lr=1e-2, beta=50.0, weight_decay=0.1, seed=1, foreach=foreach)
        for t in range(5):
            g = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
        return ps

    for a, b in zip(run(True), run(False)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_engine_state_round_trips_by_key_and_refuses_unknown_names():
    eng = LangevinEngine(seed=4, owner="Test")
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    master = eng.work_tensor("w", p)
    assert master.dtype == torch.float32 and eng.work_tensor("w", p) is master
    ref = eng.freeze([("w", torch.tensor([1.0, 4.0, 100.0]), (0.5, 2.0))])
    assert ref == 4.0 and torch.equal(eng.state["w"]["precond"], torch.tensor([2.0, 4.0, 8.0]))
    state = eng.state_dict()
    assert "precond_sqrt" not in state["state"]["w"]   # derived, recomputed on bind
    other = LangevinEngine(seed=0)
    other.load_state_dict(state)
    other.bind({"w": p})
    assert torch.equal(other.state["w"]["precond_sqrt"], eng.state["w"]["precond_sqrt"])
    assert torch.equal(other.masters()["w"], master)
    with pytest.raises(ValueError, match="'v'"):
        other.load_state_dict({**state, "state": {"v": {"master": master}}})
        other.bind({"w": p})
    other.reset()
    assert not other.state and other.generators.seed == 0 and other.skipped_steps == 0


def test_callback_loads_the_state_written_before_the_engine():
    """A version-1 callback state (per-kind dicts of tensors by name) is converted on load."""
    from langevin_lora.core.rng import NoiseGenerators
    from langevin_lora.posterior.bank import SampleBank

    G = torch.rand(3) + 0.5
    v1 = {"version": 1, "sampling": True, "langevin_steps": 4, "skipped_steps": 1, "num_data": None,
          "generators": NoiseGenerators(5).state_dict(), "precond": {"w": G}, "adapt_sq": {},
          "precond_reference": 2.0, "masters": {"w": 2 * G}, "sample_bank": SampleBank(0).state_dict(),
          "balance": None, "gauge_moves": None}
    cb = LangevinLoRA(burn_in_steps=0, num_samples=0, beta=1.0)   # the settings the v1 checkpoint was written with
    cb.load_state_dict(v1)
    cb.engine.bind({"w": torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))})
    assert cb.sampling and cb.langevin_steps == 4 and cb.skipped_steps == 1 and cb.generators.seed == 5
    slot = cb.engine.state["w"]
    assert torch.equal(slot["precond"], G) and torch.equal(slot["precond_sqrt"], G.sqrt())
    assert torch.equal(cb.engine.masters()["w"], 2 * G) and cb._precond_reference == 2.0
