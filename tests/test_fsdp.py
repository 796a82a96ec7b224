"""FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard`` in ``configure_model``) with 2 CPU processes
(gloo): the chain does not depend on the sharding.

With the same seed and the same batches on every rank (tests/fsdp_helpers.py says why), the adapters and
heads after 5 burn-in + 55 sampling steps are bitwise those of 1 process and of DDP, for the callback and
both optimizers, overdamped and kinetic, and for bf16 parameters (fp32 master shards); so is the zero-config
drop-in (validation watch, best-point restore, ladder of prior scales); a chain resumed from a sharded or a
full checkpoint continues bitwise, the callback's and the optimizers'; the sample bank holds full tensors
(rank 0 writes the PEFT folders) and ``bma_predict_proba`` on the sharded module gives the single-device
probabilities. ``step_size="auto"`` (callback and both optimizers, overdamped and kinetic, bf16, re-measured
warm every 20 steps) measures on the shards the single-device lambda_max bitwise (finite differences on both
sides: FSDP2 has no double backward), and the guard's measured stable step cuts alike. The live Gibbs
diagnostics (|theta|^2, virial and kinetic temperatures, gauge gap, Hutchinson Laplacian, eta*lambda_max,
noise ratio from half-batches and from micro-batches) run on full copies of the shards and trace the
single-device values bitwise. Unsupported strategies and layouts are refused with one line. Two launches of
2 processes in all (one FSDP, one DDP), each running several fits.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from fsdp_helpers import FSDP_ONLY, RUNS, Module, bank_and_bma, dataset, dropin_run, run
from langevin_lora.core.rng import NoiseGenerators, draw_standard_normal
from langevin_lora.lightning.callback import LangevinLoRA
from langevin_lora.core.sharding import ShardSpec, mark

HERE = Path(__file__).resolve().parent


def _launch(out: Path, mode: str, *names: str) -> None:
    """Two processes of tests/fsdp_worker.py, as Lightning's own launcher would start them."""
    port = str(find_free_network_port())   # a random port collided now and then (rank 1 aborted in init)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(HERE / "fsdp_worker.py"), str(out), mode, *names],
                              env=dict(env, LOCAL_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-device references (in this process), then the FSDP2 and DDP launches."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fsdp")
    single = {name: run(name, "auto", 1, False) for name in RUNS}
    single["bank"] = bank_and_bma("auto", 1, False, str(out / "single_samples"))
    single["dropin"] = dropin_run("auto", 1, False)
    _launch(out, "fsdp", *RUNS)
    _launch(out, "ddp", *[n for n in RUNS if n not in FSDP_ONLY])
    return types.SimpleNamespace(out=out, single=single, fsdp=torch.load(out / "fsdp.pt", weights_only=False),
                                 ddp=torch.load(out / "ddp.pt", weights_only=False),
                                 extra=torch.load(out / "extra.pt", weights_only=False))


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what}: {n} differs by {(a[n] - b[n]).abs().max():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp_chain_is_the_single_device_and_ddp_chain(runs, name):
    single, fsdp = runs.single[name], runs.fsdp[name]
    ddp = single if name in FSDP_ONLY else runs.ddp[name]
    assert single["global_step"] == fsdp["global_step"] == ddp["global_step"] == 60
    start = Module(*RUNS[name], sharded=False)
    moved = {n: p.detach() for n, p in start.named_parameters() if p.requires_grad}
    for n, p in single["params"].items():   # the chain moved every tensor: equality below is not trivial
        assert not torch.equal(p, moved[n]), n
    _assert_same(single["params"], fsdp["params"], f"{name} FSDP2 vs 1 process")
    _assert_same(single["params"], ddp["params"], f"{name} DDP vs 1 process")
    # step_size="auto" (measured at sampling start, then every 20 steps warm-started) and the guard's
    # stable step: lambda_max measured on the shards is the single-device one bitwise (finite differences
    # of gradients that are equal bitwise, every other operation on full tensors), hence the equal chains
    assert (single["lambda_max"], single["measurements"], single["step_cuts"]) == \
        (fsdp["lambda_max"], fsdp["measurements"], fsdp["step_cuts"])
    if "auto" in name:
        assert single["measurements"] == (3 if RUNS[name][1].get("step_size_every_n_steps") == 20 else 1)
    if "guard" in name:
        assert single["step_cuts"] == 1 and single["measurements"] == 1   # cut straight to the measured step
    if "diagnostics" in single:   # the live Gibbs diagnostics: every traced value, probe and logged mean
        a, b = single["diagnostics"], fsdp["diagnostics"]
        assert a["steps"] == b["steps"] == (55 if name.startswith("callback") else 60)
        assert {"theta_sq", "virial_temperature", "kinetic_temperature", "gauge_gap/lin", "rho"} <= set(a["traces"])
        assert a["traces"].keys() == b["traces"].keys()
        for key, trace in a["traces"].items():
            assert len(trace) == a["steps"] and np.array_equal(trace, b["traces"][key], equal_nan=True), key
        assert len(a["laplacians"]) == 3 and a["laplacians"] == b["laplacians"]   # Hutchinson on the shards
        assert a["eta_lambda_max"] == b["eta_lambda_max"] and a["chi2"] == b["chi2"]
        assert a["noise_ratio"] is not None and a["noise_ratio"] == b["noise_ratio"]   # half / micro-batches
        assert a["logged"] and a["logged"] == b["logged"]
    if "bank" in single:   # the callback: same steps, samples, and its guard's |theta_0|^2 reduced over ranks
        assert single["langevin_steps"] == fsdp["langevin_steps"] == 55
        assert single["bank_steps"] == fsdp["bank_steps"] == [24, 44]
        for a, b in zip(single["bank"], fsdp["bank"]):
            _assert_same(a, b, f"{name} sample")
        # a sum over shards then ranks: equal up to the order of the float64 additions
        assert fsdp["theta_scale"] == pytest.approx(single["theta_scale"], rel=1e-9)


@pytest.mark.slow
def test_fsdp_resume_from_sharded_and_full_checkpoints_is_bitwise(runs):
    ref = runs.single["callback_kinetic"]["params"]
    for kind in ("sharded", "full"):
        assert (runs.out / kind / "step=32.ckpt").exists()
        _assert_same(ref, runs.extra["resume"][f"{kind}_straight"], f"FSDP2 run writing {kind} checkpoints")
        _assert_same(ref, runs.extra["resume"][kind], f"FSDP2 run resumed from a {kind} checkpoint")
    assert (runs.out / "sharded" / "step=32.ckpt").is_dir()   # the distributed checkpoint: one file per rank


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd_kinetic", "adam_kinetic"])
def test_fsdp_optimizer_resume_from_sharded_and_full_checkpoints_is_bitwise(runs, name):
    """LangevinSGD / LangevinAdam: their per-tensor state (momenta, G, Adam moments, counters) travels
    unsharded through torch's distributed-checkpoint state dicts (LangevinOptimizer._sharded_state_dict),
    and the chain killed at step 32 and resumed equals the uninterrupted one and the 1-process one."""
    ref = runs.single[name]["params"]
    for kind in ("sharded", "full"):
        assert (runs.out / f"{name}_{kind}" / "step=32.ckpt").exists()
        got = runs.extra["optimizer_resume"]
        _assert_same(ref, got[f"{name}_{kind}_straight"], f"{name} writing {kind} checkpoints")
        _assert_same(ref, got[f"{name}_{kind}_resumed"], f"{name} resumed from {kind}")
    assert (runs.out / f"{name}_sharded" / "step=32.ckpt").is_dir()


@pytest.mark.slow
def test_fsdp_sample_bank_writes_full_adapters_and_bma_runs_sharded(runs):
    from safetensors.torch import load_file

    single, fsdp = runs.single["bank"], runs.extra["bank"]
    assert len(single["bank"]) == len(fsdp["bank"]) == 2
    for a, b in zip(single["bank"], fsdp["bank"]):
        _assert_same(a, b, "PEFT folder sample")
        assert a["model.base_model.model.lin.lora_B.default.weight"].shape == (5, 3)   # unsharded
    folders = sorted((runs.out / "samples").glob("sample-*"))
    assert [f.name for f in folders] == ["sample-00000024", "sample-00000044"]
    written = load_file(str(folders[-1] / "adapter_model.safetensors"))
    ref = load_file(str(runs.out / "single_samples" / "sample-00000044" / "adapter_model.safetensors"))
    _assert_same(ref, written, "adapter_model.safetensors")
    assert torch.equal(single["probs"], fsdp["probs"])
    assert single["probs"].shape == (len(dataset()), 3)


@pytest.mark.slow
def test_fsdp_dropin_is_the_single_device_dropin(runs):
    """The default mode: the validation watch, the best point restored into the shards (FSDP2 leaves the
    root unsharded after validation: the callback reshards first), G's clamp by the median over every
    shard, kinetic with sampled heads and the ladder of prior scales, decided alike on every rank."""
    single, fsdp = runs.single["dropin"], runs.extra["dropin"]
    assert single["langevin_steps"] > 50 and single["bank_steps"]
    assert single["chain"] == fsdp["chain"] and single["bank_steps"] == fsdp["bank_steps"]
    _assert_same(single["params"], fsdp["params"], "drop-in FSDP2 vs 1 process")


# -- no process needed ------------------------------------------------------------------------------
def test_a_shard_draws_its_slice_of_the_unsharded_noise():
    """The noise path itself: local shards (uneven rows of one tensor, columns of another) receive the
    slices of the draw one device makes for the full tensors, whatever the split."""
    full = [torch.empty(5, 6), torch.empty(3, 4)]
    ref = [x.clone() for x in draw_standard_normal(full, NoiseGenerators(11))]
    for rows, cols in (((0, 3), (0, 2)), ((3, 5), (2, 4)), ((5, 5), (0, 4))):   # the last: an empty shard
        a = mark(torch.empty(rows[1] - rows[0], 6), ShardSpec(torch.Size((5, 6)), (rows, (0, 6)), None, (), None))
        b = mark(torch.empty(3, cols[1] - cols[0]), ShardSpec(torch.Size((3, 4)), ((0, 3), cols), None, (), None))
        got = draw_standard_normal([a, b], NoiseGenerators(11))
        assert torch.equal(got[0], ref[0][rows[0]:rows[1]])
        assert torch.equal(got[1], ref[1][:, cols[0]:cols[1]])


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_unsupported_strategies_refused_with_the_alternative(strategy):
    import lightning.pytorch.strategies as S

    fake = types.SimpleNamespace(strategy=object.__new__(getattr(S, strategy)), max_steps=-1)
    with pytest.raises(MisconfigurationException) as info:
        LangevinLoRA(burn_in_steps=0, num_data=8).setup(fake, None, "fit")
    message = str(info.value)
    assert "\n" not in message and f"sharded strategy {strategy}" in message
    assert "ModelParallelStrategy() with torch.distributed.fsdp.fully_shard" in message


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group in this process (removed after the test)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_layouts_refused(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from langevin_lora.core.sharding import UnsupportedSharding, check_sharded_params, shard_spec

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    fsdp_like = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0), Shard(0)])
    with pytest.raises(UnsupportedSharding, match=r"Unsupported sharding of parameter 'w'.*tensor parallelism"):
        check_sharded_params([("w", fsdp_like)])
    flat = init_device_mesh("cpu", (1,))
    partial = DTensor.from_local(torch.randn(4, 3), flat, [Partial()])   # pending sums: tensor parallelism
    with pytest.raises(UnsupportedSharding, match="Partial"):
        shard_spec(partial, "p")
    ok = distribute_tensor(torch.randn(4, 3), flat, [Shard(0)])
    spec = shard_spec(ok, "ok")
    assert spec.global_shape == (4, 3) and spec.index == ((0, 4), (0, 3))


def test_cpu_offload_refused(one_rank_group):
    """FSDP2's CPU offload needs an accelerator to build, so the real param group is given the policy."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from langevin_lora.core.sharding import UnsupportedSharding, check_sharded_params

    m = nn.Linear(4, 3)
    fully_shard(m, mesh=init_device_mesh("cpu", (1,)))
    assert check_sharded_params(list(m.named_parameters()), m, "cpu")   # sharded, supported
    state = m._get_fsdp_state()
    for group in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]:
        group.offload_policy = CPUOffloadPolicy()
    with pytest.raises(UnsupportedSharding, match=r"^CPU offload .* is not supported"):
        check_sharded_params(list(m.named_parameters()), m, "cuda:0")


def test_fsdp_recipe_config_parses():
    """recipes/configs/causal_lm_fsdp_7b.yaml (a 7B model on GPUs: not run here) against the recipe's
    signatures; its strategy and callback are built from it."""
    import importlib
    import inspect

    import yaml

    from recipes.causal_lm import ChoiceData, LoRAChoiceLM

    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "causal_lm_fsdp_7b.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert not set(cfg["data"]) - set(inspect.signature(ChoiceData).parameters)
    assert not set(cfg["model"]) - set(inspect.signature(LoRAChoiceLM).parameters)
    assert callable(getattr(LoRAChoiceLM, "configure_model"))

    def build(spec):
        module, name = spec["class_path"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**spec["init_args"])

    strategy = build(cfg["trainer"]["strategy"])
    assert type(strategy).__name__ == "ModelParallelStrategy"
    (callback,) = [build(c) for c in cfg["trainer"]["callbacks"]]
    assert isinstance(callback, LangevinLoRA) and callback.step_size == "auto"
    assert callback.diagnostics is True


def test_options_that_need_unsharded_tensors_are_refused(one_rank_group):
    """On sharded parameters: the callback refuses balance and gauge_moves at the start of training (and
    accepts step_size='auto' since issue 21's second pass); the optimizers refuse an unsupported layout
    when built."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from langevin_lora import BalanceSchedule, LangevinSGD
    from langevin_lora.core.sharding import UnsupportedSharding

    mesh = init_device_mesh("cpu", (1,))
    w = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    fake = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cpu")))
    for kwargs, match in ((dict(step_size=1e-3, balance=BalanceSchedule(at_sampling_start=True)),
                           "balance=.* is not supported with sharded"),):
        cb = LangevinLoRA(burn_in_steps=1, num_data=8, **kwargs)
        cb._groups = [types.SimpleNamespace(names=["w"], params=[w])]
        with pytest.raises(MisconfigurationException, match=match):
            cb._check_sharded(fake, nn.Module())
    for step_size in (1e-3, "auto"):   # a float or the measured step: accepted, the shard tracked
        cb = LangevinLoRA(burn_in_steps=1, num_data=8, step_size=step_size)
        cb._groups = [types.SimpleNamespace(names=["w"], params=[w])]
        cb._check_sharded(fake, nn.Module())
        assert list(cb.engine.shards) == ["w"]
    mesh2 = init_device_mesh("cpu", (1, 1))
    tp = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh2, [Shard(0), Shard(1)]))
    with pytest.raises(UnsupportedSharding, match="Unsupported sharding"):
        LangevinSGD([tp], lr=1e-3, num_data=8, weight_decay=1e-2)


def test_auto_step_on_shards_is_the_unsharded_measurement(one_rank_group):
    """step_size='auto' on a DTensor parameter: the finite differences on the shard with a full probe vector
    give the unsharded finite-difference lambda_max and vector bitwise (1-rank mesh: no process; the
    2-process runs above check 2 shards), through auto_step_size and through LangevinAdam's closure."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from langevin_lora import LangevinAdam, auto_step_size

    mesh = init_device_mesh("cpu", (1,))
    g = torch.Generator().manual_seed(0)
    x, w0, G = torch.randn(8, 4, generator=g), torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g) + 0.5
    plain = nn.Parameter(w0.clone())
    shard = nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))

    def loss(w):
        full = w.full_tensor() if hasattr(w, "full_tensor") else w
        return torch.tanh(x @ full.T).pow(2).mean()

    kw = dict(precond=[G], weight_decay=1e-2, num_iters=6, generator=None)
    ref = auto_step_size(lambda: loss(plain), [plain], method="finite_difference",
                         **dict(kw, generator=torch.Generator().manual_seed(3)))
    got = auto_step_size(lambda: loss(shard), [shard], **dict(kw, generator=torch.Generator().manual_seed(3)))
    assert got.method == "finite_difference" and got.lambda_max == ref.lambda_max and got.grad_evals == ref.grad_evals
    assert torch.equal(got.vector[0], ref.vector[0])
    assert shard.grad is not None and torch.equal(shard.detach().full_tensor(), w0)   # the shard restored bitwise
    with pytest.raises(ValueError, match="'double_backward' with sharded"):
        auto_step_size(lambda: loss(shard), [shard], method="double_backward", **kw)

    out = []
    for p in (plain, shard):
        opt = LangevinAdam([p], lr=1e-2, num_data=8, weight_decay=1e-2, burn_in_steps=1, step_size="auto", seed=1)

        def closure(p=p, opt=opt):
            opt.zero_grad()
            value = loss(p)
            value.backward()
            return value

        for _ in range(4):
            opt.step(closure)
        out.append((opt.auto_step.lambda_max, p.detach().full_tensor() if p is shard else p.detach().clone()))
    assert out[0][0] == out[1][0] and torch.equal(out[0][1], out[1][1])


def test_sharded_optimizer_state_dict_round_trip(one_rank_group):
    """A sharded LangevinSGD's state_dict carries everything in one bytes value (torch's distributed
    checkpoint keeps only state and param_groups; state holds placeholders); loaded into a fresh optimizer
    the chain continues bitwise; torch's zero-lr state-creating step is a no-op."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from langevin_lora import LangevinSGD

    mesh = init_device_mesh("cpu", (1,))
    w0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def make():
        p = nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
        return p, LangevinSGD([p], lr=1e-2, num_data=8, weight_decay=1e-2, friction=2.0, seed=4)

    def steps(p, opt, n):
        for _ in range(n):
            opt.zero_grad()
            p.full_tensor().pow(2).sum().backward()
            opt.step()

    p, opt = make()
    steps(p, opt, 6)
    ref = p.detach().full_tensor().clone()
    q, fresh = make()
    steps(q, fresh, 3)
    saved = fresh.state_dict()
    assert set(saved) == {"state", "param_groups"} and isinstance(saved["param_groups"][0]["langevin_state"], bytes)
    assert list(saved["state"][0]) == ["langevin_state_device"]
    r, resumed = make()
    for g in resumed.param_groups:   # what torch.distributed.checkpoint does before loading
        g["lr"] = 0.0
    r.grad = torch.zeros_like(r)
    resumed.step()
    assert not resumed.state and resumed.engine.generators.state_dict() == make()[1].engine.generators.state_dict()
    with torch.no_grad():
        r.copy_(q.detach())
    resumed.load_state_dict(saved)
    assert "langevin_state" not in resumed.param_groups[0] and resumed.param_groups[0]["lr"] == 1e-2
    steps(r, resumed, 3)
    assert torch.equal(r.detach().full_tensor(), ref)
