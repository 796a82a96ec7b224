r"""Contract tests of the Langevin optimizers (no statistics of targets here: see the
stationarity tests for moments of the solvable targets).

Contracts checked:

1. the foreach and single-tensor paths agree bitwise (float64, same seed);
2. ``temperature=0`` is :class:`torch.optim.SGD` / :class:`torch.optim.Adam` with coupled decay;
3. one step with zero gradient moves a coordinate by :math:`\sqrt{2\eta/\beta}\,\xi`, with
   :math:`\beta = \beta_0/T` per group and no noise at :math:`T = 0`;
4. the noise follows the group's *current* lr under a scheduler;
5. invalid arguments raise ``ValueError`` naming the argument and its range;
6. non-finite gradients are skipped (nothing changes, the generator included) or raise;
7. fp16/bf16 parameters keep an fp32 master copy so sub-resolution noise accumulates;
8. a ``state_dict`` round trip mid-run resumes bitwise;
9. LangevinAdam's switch to sampling and its frozen preconditioner;
10. parameters without gradient, sparse gradients;
11. the ``langevin_groups()`` view.

Variance checks use a z-score against the exact standard error of a mean of squares of
Gaussians (:math:`\operatorname{Var}(\xi^2) = 2\sigma^4`), with the suite-wide bound
:math:`|z| \le 4.5`.
"""
from __future__ import annotations

import copy
import io
import math
import re
import warnings

import pytest
import torch
from pinned import adam_pre19  # LangevinAdam with its pre-issue-19 defaults

from langevin_lora import (
    LangevinAdam,
    LangevinSGD,
    NonFiniteGradientWarning,
    frozen_preconditioner,
    langevin_step_,
)
from langevin_lora.functional import adam_inverse_scale, adapted_preconditioner, median_scale
from langevin_lora._rng import NoiseGenerators, draw_standard_normal
from langevin_lora.view import LangevinGroupView, LangevinSampler

Z_MAX = 4.5
SHAPES = [(5, 3), (7,), (2, 4, 3), (1,), (16, 2)]
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def make_params(dtype=F64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def set_grads(params, t, scale=1.0):
    """A deterministic gradient that depends on the current parameters (so any divergence of two
    runs propagates) and on the step index (so steps differ)."""
    gen = torch.Generator().manual_seed(10_000 + t)
    for p in params:
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = (0.3 * p.detach().double() + scale * noise).to(p.dtype)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def assert_all_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype
        assert torch.equal(x, y), (x - y).abs().max()


def variance_z(x: torch.Tensor, var: float) -> float:
    """z-score of the mean of ``x**2`` (``x`` centred at 0, i.i.d. normal) against ``var``."""
    n = x.numel()
    s2 = float(x.double().pow(2).mean())
    return (s2 - var) / (var * math.sqrt(2.0 / n))


def mean_z(x: torch.Tensor, var: float) -> float:
    return float(x.double().mean()) / math.sqrt(var / x.numel())


def gen_state(opt):
    return {k: v.clone() for k, v in opt.generators.state_dict()["states"].items()}


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------------------------------------
# 1. foreach == single tensor
# ---------------------------------------------------------------------------------------------
def _run(opt_cls, foreach, steps, **kw):
    params = make_params()
    opt = opt_cls(params, foreach=foreach, seed=123, **kw)
    for t in range(steps):
        set_grads(params, t)
        opt.step()
    return params, opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_foreach_matches_single_tensor(weight_decay):
    a, _ = _run(LangevinSGD, True, 12, lr=1e-2, beta=50.0, weight_decay=weight_decay)
    b, _ = _run(LangevinSGD, False, 12, lr=1e-2, beta=50.0, weight_decay=weight_decay)
    assert_all_equal(a, b)
    ref = make_params()
    assert not torch.equal(a[0], ref[0])  # the run did move


def test_adam_foreach_matches_single_tensor_both_phases():
    kw = dict(lr=1e-2, num_data=200, temperature=0.5, weight_decay=0.03, warmup_steps=5,
              precond_clamp=(0.05, 20.0))
    a, oa = _run(LangevinAdam, True, 12, **kw)
    b, ob = _run(LangevinAdam, False, 12, **kw)
    assert oa.sampling and ob.sampling
    assert_all_equal(a, b)
    assert_all_equal([oa.state[p]["precond"] for p in a], [ob.state[p]["precond"] for p in b])


@pytest.mark.parametrize("with_precond", [False, True])
def test_functional_langevin_step_foreach_matches_loop_and_formula(with_precond):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    grads = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    noise = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    G = [torch.rand(s, generator=gen, dtype=F64) + 0.5 for s in SHAPES] if with_precond else None
    Gs = [g.sqrt() for g in G] if with_precond else None
    lr, std, wd = 0.01, 0.3, 0.1
    runs = []
    for foreach in (True, False):
        ps = [p.clone() for p in params]
        langevin_step_(ps, grads, [n.clone() for n in noise], lr=lr, noise_std=std, weight_decay=wd,
                       precond=G, precond_sqrt=Gs, foreach=foreach)
        runs.append(ps)
    assert_all_equal(runs[0], runs[1])
    for i, (p, g, xi) in enumerate(zip(params, grads, noise)):
        Gi = G[i] if with_precond else torch.ones_like(p)
        expected = p - lr * Gi * (g + wd * p) + std * Gi.sqrt() * xi
        torch.testing.assert_close(runs[0][i], expected, rtol=1e-13, atol=1e-15)
    # gradients are never modified
    gen2 = torch.Generator().manual_seed(7)
    [torch.randn(s, generator=gen2, dtype=F64) for s in SHAPES]
    assert_all_equal(grads, [torch.randn(s, generator=gen2, dtype=F64) for s in SHAPES])


def test_functional_langevin_step_noise_free_needs_no_noise_and_requires_it_otherwise():
    p = [torch.ones(3, dtype=F64)]
    langevin_step_(p, [torch.ones(3, dtype=F64)], None, lr=0.5, noise_std=0.0, weight_decay=1.0)
    assert torch.equal(p[0], torch.zeros(3, dtype=F64))  # 1 - 0.5 * (1 + 1)
    with pytest.raises(ValueError, match="noise must be given"):
        langevin_step_(p, [torch.ones(3, dtype=F64)], None, lr=0.5, noise_std=0.1)


def test_draw_standard_normal_same_stream_for_any_split():
    """The foreach and loop paths see the same noise because draws are bucketed then split."""
    ts = [torch.empty(s, dtype=F64) for s in SHAPES]
    a = draw_standard_normal(ts, NoiseGenerators(5))
    flat = torch.randn(sum(t.numel() for t in ts), generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(torch.cat([x.reshape(-1) for x in a]), flat)


def test_large_cpu_draws_use_fixed_streams_whatever_the_thread_count():
    """A large CPU draw is split into CPU_STREAMS chunks, each from its own generator, filled in
    parallel: the result depends on the seed and the size only, never on the thread count; the
    chunks are standard normal and mutually uncorrelated (|z| <= 4.5 against exact SEs); every
    stream's state round-trips through state_dict."""
    from langevin_lora import _rng

    n = 4 * _rng.PARALLEL_MIN_NUMEL + 13      # uneven chunks
    ts = [torch.empty(n // 3), torch.empty(n - n // 3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = torch.cat([x.reshape(-1) for x in draw_standard_normal(ts, NoiseGenerators(11))])
        torch.set_num_threads(2)
        gens = NoiseGenerators(11)
        parallel = torch.cat([x.reshape(-1) for x in draw_standard_normal(ts, gens)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)
    x = parallel.double()
    assert abs(float(x.mean())) * math.sqrt(n) <= Z_MAX                       # Var(mean) = 1/n
    assert abs(float(x.square().mean()) - 1) / math.sqrt(2 / n) <= Z_MAX       # Var(xi^2) = 2
    chunks = torch.tensor_split(x, _rng.CPU_STREAMS)
    m = min(c.numel() for c in chunks)
    for a, b in zip(chunks[:-1], chunks[1:]):                               # neighbouring streams
        assert abs(float((a[:m] * b[:m]).mean())) * math.sqrt(m) <= Z_MAX     # Var(a b) = 1
    assert not torch.equal(chunks[0][:m], chunks[1][:m])
    # the state of every stream is saved: a restored copy continues identically
    state = copy.deepcopy(gens.state_dict())
    assert len(state["states"]) == _rng.CPU_STREAMS
    restored = NoiseGenerators()
    restored.load_state_dict(state)
    nxt = [torch.cat([x.reshape(-1) for x in draw_standard_normal(ts, g)]) for g in (gens, restored)]
    assert torch.equal(nxt[0], nxt[1]) and not torch.equal(nxt[0], parallel)


# ---------------------------------------------------------------------------------------------
# 2. temperature 0 == torch optimizers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_temperature_zero_is_torch_sgd_bitwise(foreach):
    a, b = make_params(), make_params()
    ours = LangevinSGD(a, lr=0.02, beta=1.0, temperature=0.0, weight_decay=0.07, foreach=foreach, seed=0)
    ref = torch.optim.SGD(b, lr=0.02, weight_decay=0.07, foreach=foreach)
    for t in range(200):
        set_grads(a, t)
        set_grads(b, t)
        ours.step()
        ref.step()
    assert_all_equal(a, b)
    assert not torch.equal(a[0], make_params()[0])


def test_adam_warmup_at_temperature_zero_is_torch_adam_with_coupled_decay():
    a, b = make_params(), make_params()
    kw = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.04)
    ours = adam_pre19(a, beta=1.0, temperature=0.0, warmup_steps=None, seed=0, **kw)
    ref = torch.optim.Adam(b, foreach=True, **kw)
    for t in range(150):
        set_grads(a, t)
        set_grads(b, t)
        ours.step()
        ref.step()
        assert not ours.sampling
    # LangevinAdam's warm-up is the same sequence of foreach kernels as torch's foreach Adam
    # (lerp, mul, addcmul, sqrt, div by sqrt(1-b2^t), add eps, addcdiv by -lr/(1-b1^t)).
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)
    assert_all_equal(a, b)
    for x, y in zip(a, b):
        assert torch.equal(ours.state[x]["exp_avg_sq"], ref.state[y]["exp_avg_sq"])

def test_adam_moments_restarted_mid_run_get_fresh_bias_correction():
    """Clearing a tensor's state (what ``balance_lora_(moments="reset")`` does) restarts its
    moments; their bias correction must count from that restart, like a fresh torch Adam, while
    the other tensors keep their own count, and the frozen preconditioner uses the same count."""
    a, twin = make_params(), make_params()
    kw = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.04)
    ours = adam_pre19(a, beta=1.0, temperature=0.0, warmup_steps=None, seed=0, precond_clamp=(1e-12, 1e12), **kw)
    ref_rest = adam_pre19(twin, beta=1.0, temperature=0.0, warmup_steps=None, seed=0, **kw)
    for t in range(20):
        set_grads(a, t)
        for x, y in zip(twin, a):
            x.grad = y.grad.clone()
        ours.step()
        ref_rest.step()
    ours.state[a[0]].clear()
    fresh = [torch.nn.Parameter(a[0].detach().clone())]
    ref_fresh = torch.optim.Adam(fresh, foreach=True, **kw)
    for t in range(20, 26):
        set_grads(a, t)
        fresh[0].grad = a[0].grad.clone()
        for x, y in zip(twin, a):
            x.grad = y.grad.clone()
        ours.step()
        ref_fresh.step()
        ref_rest.step()
        assert ours.state[a[0]]["step"] == t - 19 and ours.state[a[1]]["step"] == t + 1
        assert_all_equal([a[0]], fresh)
        assert_all_equal(a[1:], twin[1:])
    ours.start_sampling()
    expected = adam_inverse_scale(ref_fresh.state[fresh[0]]["exp_avg_sq"], 6, 0.99, 1e-7)
    assert torch.equal(ours.state[a[0]]["precond"], expected)


# ---------------------------------------------------------------------------------------------
# 3. noise calibration
# ---------------------------------------------------------------------------------------------
N_COORD = 100_000


def _one_noise_step(opt_factory, groups_sizes):
    params = [torch.nn.Parameter(torch.zeros(n, dtype=F64)) for n in groups_sizes]
    opt = opt_factory(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("kw, beta", [
    (dict(beta=50.0), 50.0),
    (dict(beta=50.0, temperature=4.0), 12.5),
    (dict(num_data=1000), 1000.0),
    (dict(num_data=1000, temperature=0.25), 4000.0),
])
def test_one_step_noise_variance_is_2lr_over_beta(kw, beta):
    lr = 1e-3
    (delta,) = _one_noise_step(lambda ps: LangevinSGD(ps, lr=lr, seed=11, **kw), [N_COORD])
    var = 2 * lr / beta
    assert abs(variance_z(delta, var)) <= Z_MAX
    assert abs(mean_z(delta, var)) <= Z_MAX
    # a wrong beta convention (e.g. beta0 * T, or sqrt(lr/beta)) is far outside the bound
    assert abs(variance_z(delta, var / 2)) > 50


def test_per_group_temperature_override_and_noise_free_head():
    lr, n_data = 2e-3, 500

    def factory(ps):
        groups = [{"params": [ps[0]]},                              # default T = 1
                  {"params": [ps[1]], "temperature": 0.2},          # colder group
                  {"params": [ps[2]], "temperature": 0.0, "name": "head"}]
        return LangevinSGD(groups, lr=lr, num_data=n_data, seed=3)

    d_default, d_cold, d_head = _one_noise_step(factory, [N_COORD, N_COORD, 1000])
    assert abs(variance_z(d_default, 2 * lr / n_data)) <= Z_MAX
    assert abs(variance_z(d_cold, 2 * lr * 0.2 / n_data)) <= Z_MAX
    assert torch.equal(d_head, torch.zeros_like(d_head))
    # the groups draw independent noise
    r = float((d_default * d_cold).mean() / (d_default.std() * d_cold.std()))
    assert abs(r) * math.sqrt(N_COORD) <= Z_MAX


def test_adam_sampling_noise_scaled_by_frozen_preconditioner():
    """Sampling with a frozen G: one zero-gradient step has variance 2*lr*G/beta per coordinate."""
    lr, beta = 1e-3, 20.0
    p = torch.nn.Parameter(torch.zeros(N_COORD, dtype=F64))
    opt = adam_pre19([p], lr=lr, beta=beta, warmup_steps=None, precond_clamp=(0.1, 10.0), seed=2)
    # one Adam step with a gradient of two magnitudes gives two preconditioner levels
    g = torch.ones(N_COORD, dtype=F64)
    g[: N_COORD // 2] = 4.0
    p.grad = g
    opt.step()
    opt.start_sampling()
    G = opt.state[p]["precond"]
    start = p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    delta = p.detach() - start
    z = (delta / G.sqrt())
    assert abs(variance_z(z, 2 * lr / beta)) <= Z_MAX
    assert G[0] != G[-1]


# ---------------------------------------------------------------------------------------------
# 4. LR scheduler
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_noise_follows_scheduled_lr(opt_name):
    beta, lr0, gamma = 10.0, 1e-2, 0.25
    p = torch.nn.Parameter(torch.zeros(N_COORD, dtype=F64))
    if opt_name == "sgd":
        opt = LangevinSGD([p], lr=lr0, beta=beta, seed=4)
    else:
        opt = adam_pre19([p], lr=lr0, beta=beta, warmup_steps=None, seed=4)
        with pytest.warns(UserWarning, match="no burn-in step"):
            opt.start_sampling()  # G = 1
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    deltas = []
    for _ in range(2):
        start = p.detach().clone()
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
        deltas.append(p.detach() - start)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * gamma ** 2)
    assert abs(variance_z(deltas[0], 2 * lr0 / beta)) <= Z_MAX
    assert abs(variance_z(deltas[1], 2 * lr0 * gamma / beta)) <= Z_MAX
    # the old lr's variance is rejected after the change
    assert abs(variance_z(deltas[1], 2 * lr0 / beta)) > 50


# ---------------------------------------------------------------------------------------------
# 5. invalid arguments
# ---------------------------------------------------------------------------------------------
def _p():
    return [torch.nn.Parameter(torch.zeros(2))]


BASE = dict(lr=1e-3, beta=1.0)
INVALID_COMMON = [
    (dict(lr=0.0), r"Invalid lr: 0\.0 \(allowed range \(0, inf\)\)"),
    (dict(lr=-1e-3), r"Invalid lr: -0\.001 \(allowed range \(0, inf\)\)"),
    (dict(lr=float("nan")), r"Invalid lr: nan \(expected a real number in \(0, inf\)\)"),
    (dict(lr=float("inf")), r"Invalid lr: inf \(expected a finite number"),
    (dict(lr="0.1"), r"Invalid lr: '0\.1'"),
    (dict(beta=0.0), r"Invalid beta: 0\.0 \(allowed range \(0, inf\)\)"),
    (dict(beta=-2.0), r"Invalid beta: -2\.0 \(allowed range \(0, inf\)\)"),
    (dict(beta=float("nan")), r"Invalid beta: nan \(expected a real number in \(0, inf\)\)"),
    (dict(temperature=-0.5), r"Invalid temperature: -0\.5 \(allowed range \[0, inf\)\)"),
    (dict(temperature=float("nan")), r"Invalid temperature: nan"),
    (dict(weight_decay=-1e-4), r"Invalid weight_decay: -0\.0001 \(allowed range \[0, inf\)\)"),
    (dict(num_data=100), r"Invalid num_data/beta: pass exactly one of them"),
    (dict(beta=None), r"Invalid num_data/beta: pass exactly one of them"),
    (dict(beta=None, num_data=0), r"Invalid num_data: 0 \(expected an integer >= 1\)"),
    (dict(beta=None, num_data=10.5), r"Invalid num_data: 10\.5 \(expected an integer >= 1\)"),
    (dict(beta=None, num_data=True), r"Invalid num_data: True \(expected an integer >= 1\)"),
    (dict(nonfinite="ignore"), r"Invalid nonfinite: 'ignore' \(expected one of 'skip', 'raise'\)"),
    (dict(seed=-1), r"Invalid seed: -1 \(expected an integer >= 0\)"),
    (dict(seed=1.5), r"Invalid seed: 1\.5 \(expected an integer >= 0\)"),
    (dict(foreach="yes"), r"Invalid foreach: 'yes' \(expected True, False or None\)"),
]
INVALID_ADAM = [
    (dict(betas=(1.0, 0.999)), r"Invalid betas\[0\]: 1\.0 \(allowed range \[0, 1\)\)"),
    (dict(betas=(0.9, 1.0)), r"Invalid betas\[1\]: 1\.0 \(allowed range \[0, 1\)\)"),
    (dict(betas=(-0.1, 0.999)), r"Invalid betas\[0\]: -0\.1 \(allowed range \[0, 1\)\)"),
    (dict(betas=(0.9,)), r"Invalid betas: \(0\.9,\) \(expected a pair \(beta1, beta2\), each in \[0, 1\)\)"),
    (dict(betas=(0.9, 0.99, 0.999)), r"Invalid betas: .*expected a pair"),
    (dict(eps=0.0), r"Invalid eps: 0\.0 \(allowed range \(0, inf\)\)"),
    (dict(eps=-1e-8), r"Invalid eps: -1e-08"),
    (dict(precond_clamp=(1.5, 10.0)), r"Invalid precond_clamp\[0\]: 1\.5 \(allowed range \(0, 1\]\)"),
    (dict(precond_clamp=(0.0, 10.0)), r"Invalid precond_clamp\[0\]: 0\.0 \(allowed range \(0, 1\]\)"),
    (dict(precond_clamp=(-0.1, 10.0)), r"Invalid precond_clamp\[0\]: -0\.1 \(allowed range \(0, 1\]\)"),
    (dict(precond_clamp=(0.1, 0.5)), r"Invalid precond_clamp\[1\]: 0\.5 \(allowed range \[1, inf\)\)"),
    (dict(precond_clamp=0.1), r"Invalid precond_clamp: 0\.1 \(expected a pair \(lo, hi\) with 0 < lo <= 1 <= hi\)"),
    (dict(precond_clamp=(0.1, 1.0, 10.0)), r"Invalid precond_clamp: .*expected a pair"),
    (dict(burn_in_steps=-1), r"Invalid burn_in_steps: -1 \(expected an integer >= 0\)"),
    (dict(burn_in_steps=2.5), r"Invalid burn_in_steps: 2\.5 \(expected an integer >= 0\)"),
    (dict(precond_adapt_steps=-3), r"Invalid precond_adapt_steps: -3 \(expected an integer >= 0\)"),
]


@pytest.mark.parametrize("opt_cls", [LangevinSGD, LangevinAdam])
@pytest.mark.parametrize("override, match", INVALID_COMMON)
def test_invalid_arguments_raise_value_error(opt_cls, override, match):
    with pytest.raises(ValueError, match=match):
        opt_cls(_p(), **{**BASE, **override})


@pytest.mark.parametrize("override, match", INVALID_ADAM)
def test_invalid_adam_arguments_raise_value_error(override, match):
    with pytest.raises(ValueError, match=match):
        adam_pre19(_p(), **{**BASE, **override})


@pytest.mark.parametrize("opt_cls", [LangevinSGD, adam_pre19])
@pytest.mark.parametrize("override, match", [
    (dict(lr=-1), r"Invalid lr: -1\.0 \(allowed range \(0, inf\)\)"),   # issue 19: inf is not allowed
    (dict(temperature=-1.0), r"Invalid temperature: -1\.0"),
    (dict(weight_decay=float("nan")), r"Invalid weight_decay: nan"),
])
def test_invalid_per_group_overrides(opt_cls, override, match):
    # in the constructor ...
    with pytest.raises(ValueError, match=match):
        opt_cls([{"params": _p()}, {"params": _p(), **override}], **BASE)
    # ... and through add_param_group
    opt = opt_cls(_p(), **BASE)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": _p(), **override})


def test_invalid_adam_group_override():
    opt = adam_pre19(_p(), **BASE)
    with pytest.raises(ValueError, match=r"Invalid precond_clamp\[1\]: 0\.9"):
        opt.add_param_group({"params": _p(), "precond_clamp": (0.5, 0.9)})
    with pytest.raises(ValueError, match=r"Invalid betas\[1\]: 1\.5"):
        opt.add_param_group({"params": _p(), "betas": (0.9, 1.5)})


def test_rejected_param_group_leaves_optimizer_unchanged():
    opt = LangevinSGD(_p(), **BASE)
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": _p(), "lr": -1.0})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------------------------------------
# 6. non-finite gradients
# ---------------------------------------------------------------------------------------------
OPT_FACTORIES = {
    "sgd": lambda ps, **kw: LangevinSGD(ps, lr=1e-2, beta=20.0, weight_decay=0.01, seed=9, **kw),
    "adam_warmup": lambda ps, **kw: adam_pre19(ps, lr=1e-2, beta=20.0, weight_decay=0.01, warmup_steps=50,
                                                 seed=9, **kw),
    "adam_sampling": lambda ps, **kw: adam_pre19(ps, lr=1e-2, beta=20.0, weight_decay=0.01, warmup_steps=2,
                                                   seed=9, **kw),
}


def _snapshot(params, opt):
    return ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()))


def _assert_same_snapshot(a, b):
    assert_all_equal(a[0], b[0])
    sa, sb = a[1], b[1]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["langevin"]["skipped_steps"] == sb["langevin"]["skipped_steps"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, key
    for dev, st in sa["langevin"]["generators"]["states"].items():
        assert torch.equal(st, sb["langevin"]["generators"]["states"][dev])


def _bad_grads(params, kind):
    set_grads(params, 99)
    p = params[2]
    g = p.grad.clone()
    g.view(-1)[3] = float("nan") if kind == "nan" else -float("inf")
    p.grad = g


@pytest.mark.parametrize("name", list(OPT_FACTORIES))
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_skip_changes_nothing_and_continues_as_if_unseen(name, kind):
    make = OPT_FACTORIES[name]
    a, b = make_params(), make_params()
    oa, ob = make(a, nonfinite="skip"), make(b)
    for t in range(4):
        set_grads(a, t)
        set_grads(b, t)
        oa.step()
        ob.step()
    before = _snapshot(a, oa)
    _bad_grads(a, kind)
    with pytest.warns(NonFiniteGradientWarning, match="non-finite gradient"):
        oa.step()
    assert oa.skipped_steps == 1
    after = _snapshot(a, oa)
    after[1]["langevin"]["skipped_steps"] = 0
    _assert_same_snapshot(before, after)
    for t in range(4, 8):
        set_grads(a, t)
        set_grads(b, t)
        oa.step()
        ob.step()
    assert_all_equal(a, b)
    assert oa.skipped_steps == 1 and ob.skipped_steps == 0


@pytest.mark.parametrize("name", list(OPT_FACTORIES))
def test_nonfinite_raise_changes_nothing(name):
    a = make_params()
    opt = OPT_FACTORIES[name](a, nonfinite="raise")
    for t in range(4):
        set_grads(a, t)
        opt.step()
    before = _snapshot(a, opt)
    _bad_grads(a, "nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(a, opt))
    assert opt.skipped_steps == 0


def test_large_finite_fp16_gradient_is_not_mistaken_for_inf():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    opt = LangevinSGD([p], lr=1e-6, beta=1.0, temperature=0.0, nonfinite="raise")
    p.grad = torch.full((4,), 60000.0, dtype=torch.float16)
    opt.step()
    assert torch.equal(opt.state[p]["master"], torch.full((4,), -0.06, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# 7. low precision: fp32 master copies
# ---------------------------------------------------------------------------------------------
# std per step far below half the rounding step of the dtype near 1.0 (bf16: 2^-9 ~ 2.0e-3,
# fp16: 2^-12 ~ 2.4e-4, the spacing below 1.0 being half the spacing above), but the random walk
# sd sqrt(steps)*std (bf16: 5e-3, fp16: 1e-3) exceeds the spacing (bf16 3.9e-3/7.8e-3, fp16
# 4.9e-4/9.8e-4), so most coordinates must leave 1.0.
LOWP = [(torch.bfloat16, 2.5e-4, 400), (torch.float16, 2.5e-5, 1600)]


@pytest.mark.parametrize("dtype, std, steps", LOWP)
def test_low_precision_noise_accumulates_in_master_copy(dtype, std, steps):
    n, lr = 20_000, 1e-3
    beta = 2 * lr / std ** 2
    p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
    opt = LangevinSGD([p], lr=lr, beta=beta, seed=21)
    zero = torch.zeros(n, dtype=dtype)
    for _ in range(steps):
        p.grad = zero
        opt.step()
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32
    # the fp32 master is a random walk with variance steps * std^2 ...
    assert abs(variance_z(master - 1.0, steps * std ** 2)) <= Z_MAX
    # ... and the low-precision parameter is its rounding
    assert torch.equal(p.detach(), master.to(dtype))
    moved = float((p.detach() != 1.0).float().mean())
    assert moved > 0.3, moved
    # a naive low-precision update loses every increment
    naive = torch.ones(n, dtype=dtype)
    gen = torch.Generator().manual_seed(21)
    for _ in range(steps):
        naive.add_(torch.randn(n, generator=gen, dtype=dtype), alpha=std)
    assert torch.equal(naive, torch.ones(n, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_master_copy_survives_state_dict_in_fp32(dtype, opt_name):
    def make(p):
        if opt_name == "sgd":
            return LangevinSGD([p], lr=1e-3, beta=1e6, seed=0)
        return adam_pre19([p], lr=1e-3, beta=1e6, warmup_steps=3, seed=0)

    p = torch.nn.Parameter(torch.ones(64, dtype=dtype))
    opt = make(p)
    for t in range(5):
        p.grad = torch.full((64,), 1e-3 * (t + 1), dtype=dtype)
        opt.step()
    saved = roundtrip(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = make(q)
    opt2.load_state_dict(saved)
    for key, v in opt.state[p].items():
        if torch.is_tensor(v) and key != "step":
            assert opt2.state[q][key].dtype == v.dtype, key
            assert torch.equal(opt2.state[q][key], v), key
    assert opt2.state[q]["master"].dtype == torch.float32
    assert not torch.equal(opt2.state[q]["master"], opt2.state[q]["master"].to(dtype).float())
    for o, x in ((opt, p), (opt2, q)):
        x.grad = torch.full((64,), 2e-3, dtype=dtype)
        o.step()
    assert torch.equal(opt.state[p]["master"], opt2.state[q]["master"])
    assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# 8. state_dict round trip mid-run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, n_before, n_after", [
    ("sgd", 5, 6),
    ("adam", 3, 6),   # saved during warm-up, resumed across the switch to sampling (warmup 5)
    ("adam", 7, 4),   # saved after sampling started
    ("adam_adapt", 7, 6),   # saved inside the adaptation window (steps 6-9), resumed across the re-freeze
])
def test_state_dict_round_trip_resumes_bitwise(name, n_before, n_after):
    def make(ps, seed):
        groups = [{"params": ps[:3], "name": "lora"}, {"params": ps[3:], "name": "head", "temperature": 0.5}]
        if name == "sgd":
            return LangevinSGD(groups, lr=1e-2, num_data=100, weight_decay=0.01, seed=seed)
        return adam_pre19(groups, lr=1e-2, num_data=100, weight_decay=0.01, warmup_steps=5, seed=seed,
                            adapt_steps=4 if name == "adam_adapt" else 0)

    params = make_params()
    opt = make(params, seed=1)
    for t in range(n_before):
        set_grads(params, t)
        opt.step()
    saved_state = roundtrip(opt.state_dict())
    saved_params = roundtrip([p.detach().clone() for p in params])
    for t in range(n_before, n_before + n_after):
        set_grads(params, t)
        opt.step()

    resumed = [torch.nn.Parameter(x) for x in saved_params]
    opt2 = make(resumed, seed=12345)  # a different seed: the saved generator state must win
    opt2.load_state_dict(saved_state)
    for t in range(n_before, n_before + n_after):
        set_grads(resumed, t)
        opt2.step()
    assert_all_equal(params, resumed)
    if name.startswith("adam"):
        assert opt.sampling and opt2.sampling and not opt2.adapting


# ---------------------------------------------------------------------------------------------
# 9. LangevinAdam: warm-up, switch, frozen preconditioner
# ---------------------------------------------------------------------------------------------
def test_adam_adaptation_refreezes_G_from_mean_squared_gradient_of_U():
    """adapt_steps: after the warm-up freeze, the next k sampling steps use the warm-up G while
    averaging (g + lam theta)^2 at each pre-step point; then G is re-frozen jointly over the groups
    frozen together, with the warm-up's median scale (adapted_preconditioner)."""
    params = make_params()
    lam, warm, k = 0.03, 6, 5
    groups = [{"params": params[:2]}, {"params": params[2:], "temperature": 0.5}]
    opt = adam_pre19(groups, lr=1e-3, num_data=50, weight_decay=lam, warmup_steps=warm, adapt_steps=k, seed=4)
    for t in range(warm):
        set_grads(params, t)
        opt.step()
    assert opt.sampling and opt.adapting
    warm_G = [opt.state[p]["precond"].clone() for p in params]
    reference = opt.param_groups[0]["precond_reference"]
    assert reference == opt.param_groups[1]["precond_reference"] == median_scale(
        [adam_inverse_scale(opt.state[p]["exp_avg_sq"], warm, 0.999, 1e-8) for p in params])
    acc = [torch.zeros_like(p) for p in params]
    for t in range(warm, warm + k):
        assert opt.adapting
        set_grads(params, t)
        for a, p in zip(acc, params):
            a.addcmul_(p.grad + lam * p.detach(), p.grad + lam * p.detach())
        before = [p.detach().clone() for p in params]
        opt.step()
        if t < warm + k - 1:   # the window's steps use the warm-up G
            for p, G in zip(params, warm_G):
                assert torch.equal(opt.state[p]["precond"], G)
        assert not any(torch.equal(b, p) for b, p in zip(before, params))
    assert not opt.adapting and opt.sampling
    expected = adapted_preconditioner([a / k for a in acc], reference, 1e-8, (0.01, 100.0))
    for p, G in zip(params, expected):
        torch.testing.assert_close(opt.state[p]["precond"], G, rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.state[p]["precond_sqrt"], G.sqrt(), rtol=1e-12, atol=0)
        assert "adapt_sq" not in opt.state[p]
    flat = torch.cat([G.reshape(-1) for G in expected])
    assert float(flat.median()) == pytest.approx(reference, rel=1e-12)   # the step-size scale is kept
    assert not any(torch.equal(opt.state[p]["precond"], G) for p, G in zip(params, warm_G))
    frozen = [opt.state[p]["precond"].clone() for p in params]
    for t in range(3):   # and G stays frozen from then on
        set_grads(params, 100 + t)
        opt.step()
    for p, G in zip(params, frozen):
        assert torch.equal(opt.state[p]["precond"], G)


def test_adapted_preconditioner_is_a_curvature_scale_at_stationarity():
    """On a diagonal quadratic U = sum_i h_i theta_i^2 / 2 sampled exactly (theta_i ~ N(0, 1/(beta h_i))),
    E[(dU/dtheta_i)^2] = h_i / beta, so the adapted G is proportional to h_i^(-1/2) (clamp permitting):
    checked with the exact SE of the mean square over many draws."""
    beta, n = 50.0, 20_000
    h = torch.tensor([0.5, 2.0, 8.0, 32.0], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(n, 4, generator=gen, dtype=F64) / (beta * h).sqrt()
    v = (h * theta).square().mean(0)              # mean of (dU)^2 over the window
    # each (dU_i)^2 = (h_i / beta) * chi^2_1: mean h_i/beta, SE sqrt(2/n) h_i/beta
    z = (v - h / beta) / (math.sqrt(2 / n) * h / beta)
    assert z.abs().max() <= Z_MAX
    (G,) = adapted_preconditioner([v], reference=1.0)
    ratio = G * h.sqrt()                            # constant up to the estimation error of v
    half = Z_MAX * math.sqrt(2 / n) / 2            # |relative error| of sqrt(v) at |z| <= Z_MAX
    assert float(ratio.max() / ratio.min()) < (1 + half) / (1 - half)
    assert float(G.median()) == pytest.approx(1.0)


def test_adam_switches_exactly_after_warmup_steps():
    params = make_params()
    opt = adam_pre19(params, lr=1e-2, beta=100.0, warmup_steps=4, seed=0)
    for t in range(4):
        assert not opt.sampling and opt.param_groups[0]["step"] == t
        assert "precond" not in opt.state[params[0]]
        set_grads(params, t)
        opt.step()
    assert opt.sampling
    assert all("precond" in opt.state[p] and "exp_avg" not in opt.state[p] for p in params)
    G = [opt.state[p]["precond"].clone() for p in params]
    for t in range(4, 7):
        set_grads(params, t)
        opt.step()
    assert opt.param_groups[0]["step"] == 4  # no Adam step after the switch
    assert_all_equal(G, [opt.state[p]["precond"] for p in params])  # G stays frozen


def test_adam_warmup_zero_samples_from_the_first_step():
    p = torch.nn.Parameter(torch.zeros(10, dtype=F64))
    opt = adam_pre19([p], lr=1e-2, beta=10.0, warmup_steps=0, seed=0)
    p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert opt.param_groups[0]["step"] == 0
    assert torch.equal(opt.state[p]["precond"], torch.ones_like(p))


def _heterogeneous_grads(params, t):
    """Gradient scales spanning 1e-6 .. 1e3 inside every tensor, so the clamp binds."""
    gen = torch.Generator().manual_seed(500 + t)
    for p in params:
        scale = torch.logspace(-6, 3, p.numel(), dtype=F64).view(p.shape)
        p.grad = scale * torch.randn(p.shape, generator=gen, dtype=F64)


@pytest.mark.parametrize("clamp", [(0.01, 100.0), (0.2, 5.0)])
def test_frozen_preconditioner_matches_moments_before_switch(clamp):
    kw = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, beta=100.0, precond_clamp=clamp, seed=0)
    shapes = [(40, 3), (100,), (7, 8)]
    a, b = make_params(shapes=shapes), make_params(shapes=shapes)
    auto = adam_pre19(a, warmup_steps=6, **kw)
    manual = adam_pre19(b, warmup_steps=None, **kw)
    for t in range(6):
        _heterogeneous_grads(a, t)
        _heterogeneous_grads(b, t)
        auto.step()
        manual.step()
    assert auto.sampling and not manual.sampling
    v = [manual.state[p]["exp_avg_sq"].clone() for p in b]
    manual.start_sampling()
    assert manual.sampling
    # The clamp's reference scale is the median of the unclamped G over ALL tensors frozen together.
    raw = [adam_inverse_scale(vi, 6, 0.99, 1e-8) for vi in v]
    med = median_scale(raw)
    assert med == float(torch.cat([r.reshape(-1) for r in raw]).median())
    Gs = []
    for pa, pb, vi in zip(a, b, v):
        expected = frozen_preconditioner(vi, 6, 0.99, 1e-8, clamp, reference=med)
        G = manual.state[pb]["precond"]
        Gs.append(G)
        assert torch.equal(G, expected)
        assert torch.equal(auto.state[pa]["precond"], expected)
        assert torch.equal(manual.state[pb]["precond_sqrt"], expected.sqrt())
        assert float(G.max() / G.min()) <= clamp[1] / clamp[0] * (1 + 1e-12)
    # the clamp binds at both ends of the joint range and caps the condition number at hi / lo
    assert max(float(G.max()) for G in Gs) == clamp[1] * med
    assert min(float(G.min()) for G in Gs) == clamp[0] * med
    # calling start_sampling again changes nothing
    G_before = [manual.state[p]["precond"].clone() for p in b]
    manual.start_sampling()
    assert_all_equal(G_before, [manual.state[p]["precond"] for p in b])


def test_manual_start_sampling_and_no_step_warning():
    params = make_params()
    opt = adam_pre19(params, lr=1e-2, beta=100.0, warmup_steps=None, seed=0)
    with pytest.warns(UserWarning, match="no burn-in step taken, the preconditioner is the identity"):
        opt.start_sampling()
    assert opt.sampling
    for p in params:
        assert torch.equal(opt.state[p]["precond"], torch.ones_like(p))
    # with G = 1 LangevinAdam is LangevinSGD (same noise stream)
    ref = make_params()
    sgd = LangevinSGD(ref, lr=1e-2, beta=100.0, seed=0)
    for t in range(3):
        set_grads(params, t)
        set_grads(ref, t)
        opt.step()
        sgd.step()
    for x, y in zip(params, ref):  # same noise; the kernels may round differently (FMA), not more
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
    # warmup_steps=None never switches by itself
    other = adam_pre19(make_params(), lr=1e-2, beta=1.0, warmup_steps=None)
    for t in range(20):
        set_grads(other.param_groups[0]["params"], t)
        other.step()
    assert not other.sampling


@pytest.mark.parametrize("foreach", [True, False])
def test_adam_sampling_step_is_langevin_step_with_frozen_G(foreach):
    lr, beta, lam = 5e-3, 40.0, 0.02
    params = make_params()
    opt = adam_pre19(params, lr=lr, beta=beta, weight_decay=lam, warmup_steps=3, foreach=foreach, seed=8)
    for t in range(5):
        set_grads(params, t)
        opt.step()
    assert opt.sampling
    set_grads(params, 5)
    G = [opt.state[p]["precond"] for p in params]
    work = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    gens = NoiseGenerators()
    gens.load_state_dict(opt.generators.state_dict())
    noise = draw_standard_normal(work, gens)
    xi = [n.clone() for n in noise]
    std = math.sqrt(2 * lr / beta)
    langevin_step_(work, grads, noise, lr=lr, noise_std=std, weight_decay=lam, precond=G,
                   precond_sqrt=[g.sqrt() for g in G], foreach=foreach)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert_all_equal([p.detach() for p in params], work)
    for p0, p1, g, Gi, x in zip(before, params, grads, G, xi):
        expected = p0 - lr * Gi * (g + lam * p0) + std * Gi.sqrt() * x
        torch.testing.assert_close(p1.detach(), expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 10. gradients that are None or sparse
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_cls", [LangevinSGD, LangevinAdam])
def test_params_without_grad_are_untouched(opt_cls):
    params = make_params()
    frozen = params[1]
    start = frozen.detach().clone()
    kw = dict(warmup_steps=2) if opt_cls is LangevinAdam else {}
    opt = opt_cls(params, lr=1e-2, beta=10.0, weight_decay=0.1, seed=0, **kw)
    for t in range(5):
        set_grads(params, t)
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, start)
    assert not torch.equal(params[0], make_params()[0])
    if opt_cls is LangevinAdam:
        assert "exp_avg_sq" not in opt.state[frozen]


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    for opt in (LangevinSGD(emb.parameters(), lr=1e-2, beta=1.0),
                adam_pre19(emb.parameters(), lr=1e-2, beta=1.0)):
        before = emb.weight.detach().clone()
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            opt.step()
        assert torch.equal(emb.weight, before)


# ---------------------------------------------------------------------------------------------
# 11. langevin_groups() view
# ---------------------------------------------------------------------------------------------
def test_langevin_groups_view_sgd():
    ps = make_params()
    groups = [{"params": ps[:2], "name": "lora_A/default"},
              {"params": ps[2:4], "name": "head", "temperature": 0.0, "weight_decay": 0.0},
              {"params": ps[4:], "temperature": 0.5, "lr": 3e-3}]
    opt = LangevinSGD(groups, lr=1e-2, num_data=1000, weight_decay=0.1, seed=0)
    assert isinstance(opt, LangevinSampler)
    views = opt.langevin_groups()
    assert all(isinstance(v, LangevinGroupView) for v in views)
    assert [v.name for v in views] == ["lora_A/default", "head", "group2"]
    assert [v.lr for v in views] == [1e-2, 1e-2, 3e-3]
    assert [v.beta for v in views] == [1000.0, math.inf, 2000.0]
    assert [v.weight_decay for v in views] == [0.1, 0.0, 0.1]
    assert all(v.sampling and v.precond is None for v in views)
    assert all(a is b for a, b in zip(views[0].params, ps[:2]))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    set_grads(ps, 0)
    opt.step()
    sched.step()
    assert [v.lr for v in opt.langevin_groups()] == [5e-3, 5e-3, 1.5e-3]  # the current lr, not the initial one


def test_langevin_groups_view_adam_phases():
    ps = make_params()
    opt = adam_pre19([{"params": ps, "name": "lora"}], lr=1e-2, beta=50.0, warmup_steps=2, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    (v,) = opt.langevin_groups()
    assert v.name == "lora" and v.beta == 50.0 and not v.sampling and v.precond is None
    for t in range(2):
        set_grads(ps, t)
        opt.step()
        sched.step()
    (v,) = opt.langevin_groups()
    assert v.sampling and v.lr == pytest.approx(2.5e-3)
    assert v.precond is not None and all(G is opt.state[p]["precond"] for G, p in zip(v.precond, ps))


def test_all_finite_exact_for_large_finite_and_nonfinite_values():
    from langevin_lora.functional import all_finite

    big16 = torch.full((1000,), 6e4, dtype=torch.float16)  # finite, but its 2-norm overflows fp16
    assert all_finite([big16, torch.ones(3)])
    assert all_finite([torch.full((10,), 1e30), torch.full((10,), 3e38)])
    assert all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(50)
        t[17] = bad
        assert not all_finite([big16, t])
        assert not all_finite([big16.clone().index_fill_(0, torch.tensor([3]), bad)])


def test_all_finite_float64_beyond_float32_range():
    from langevin_lora.functional import all_finite

    assert all_finite([torch.full((10,), 1e300, dtype=F64)])


@pytest.mark.parametrize("opt_cls", [LangevinSGD, LangevinAdam])
def test_numpy_numbers_are_accepted(opt_cls):
    import numpy as np

    extra = dict(betas=(np.float64(0.9), np.float32(0.99)), eps=np.float32(1e-7), warmup_steps=np.int64(2),
                 adapt_steps=np.int32(1), precond_clamp=(np.float32(0.1), np.int64(10))) if opt_cls is LangevinAdam else {}
    params = make_params()
    opt = opt_cls(params, lr=np.float32(1e-3), num_data=np.int64(100), temperature=np.float64(0.5),
                  weight_decay=np.float32(0.01), seed=np.int64(3), **extra)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    assert opt.langevin_groups()[0].beta == 200.0
    assert all(torch.isfinite(p).all() for p in params)


def test_noise_buffer_reuses_storage_and_draws_the_same_numbers():
    """A NoiseBuffer refills the same per-tensor views in place; its numbers equal fresh draws from the
    same generator states (CPU streams included), and another tensor list gets its own plan."""
    from langevin_lora._rng import PARALLEL_MIN_NUMEL, NoiseBuffer

    ts = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64), torch.zeros(PARALLEL_MIN_NUMEL + 7), torch.zeros(2)]
    buf = NoiseBuffer()
    g_fresh, g_buf = NoiseGenerators(3), NoiseGenerators(3)
    ptrs = None
    for _ in range(3):
        fresh = draw_standard_normal(ts, g_fresh)
        drawn = draw_standard_normal(ts, g_buf, buffer=buf)
        ptrs = ptrs or [x.data_ptr() for x in drawn]
        assert [x.data_ptr() for x in drawn] == ptrs            # storage reused
        assert all(torch.equal(a, b) and b.shape == t.shape and b.dtype == t.dtype for a, b, t in zip(fresh, drawn, ts))
    ts2 = [torch.zeros(4, 3), torch.zeros(6)]
    fresh, drawn = draw_standard_normal(ts2, g_fresh), draw_standard_normal(ts2, g_buf, buffer=buf)
    assert [x.shape for x in drawn] == [t.shape for t in ts2]
    assert all(torch.equal(a, b) for a, b in zip(fresh, drawn))


def test_release_01_names_still_work_with_a_deprecation_warning():
    """Issue 22's one vocabulary: warmup_steps/adapt_steps/prior_centre="start" of release 0.1 are burn_in_steps/
    precond_adapt_steps/"burn_in", in keywords, in param groups and in saved state dicts, each with a warning."""
    with pytest.warns(DeprecationWarning, match="'warmup_steps' is now called 'burn_in_steps'"):
        old = adam_pre19(_p(), lr=1e-2, num_data=10, warmup_steps=7, adapt_steps=2)
    new = adam_pre19(_p(), lr=1e-2, num_data=10, burn_in_steps=7, precond_adapt_steps=2)
    assert [{k: v for k, v in g.items() if k != "params"} for g in old.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups]
    with pytest.warns(DeprecationWarning, match="prior_centre='start' is now spelled 'burn_in'"):
        sgd = LangevinSGD(_p(), lr=1e-2, num_data=10, prior_centre="start")
    assert sgd.param_groups[0]["prior_centre"] == "burn_in"
    assert LangevinSGD(_p(), lr=1e-2, num_data=10, prior_centre=None).param_groups[0]["prior_centre"] == "zero"
    with pytest.warns(DeprecationWarning, match="'adapt_steps' is now called 'precond_adapt_steps'"):
        new.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "adapt_steps": 3})
    assert new.param_groups[-1]["precond_adapt_steps"] == 3 and "adapt_steps" not in new.param_groups[-1]
    with pytest.raises(ValueError, match="both 'warmup_steps' and 'burn_in_steps' given"):
        new.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "warmup_steps": 3, "burn_in_steps": 3})
    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup'"):
        LangevinAdam(_p(), lr=1e-2, num_data=10, weight_decay=0.1, warmup=3)
    # a state dict saved by release 0.1: its group keys and centre spelling are translated on load
    saved = new.state_dict()
    for g in saved["param_groups"]:
        g["warmup_steps"], g["adapt_steps"], g["prior_centre"] = g.pop("burn_in_steps"), g.pop("precond_adapt_steps"), "start"
    fresh = adam_pre19(_p(), lr=1e-2, num_data=10)
    fresh.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    fresh.load_state_dict(saved)
    assert [(g["burn_in_steps"], g["precond_adapt_steps"], g["prior_centre"]) for g in fresh.param_groups] == \
        [(7, 2, "burn_in"), (7, 3, "burn_in")]


def test_release_01_name_warnings_point_at_the_users_line():
    """The DeprecationWarning of an old keyword names the caller's file and line, not torch.optim's or ours."""
    import inspect

    with pytest.warns(DeprecationWarning) as record:
        line = inspect.currentframe().f_lineno + 1
        LangevinAdam(_p(), lr=1e-2, num_data=10, weight_decay=0.1, warmup_steps=7)
    w = next(r for r in record if "warmup_steps" in str(r.message))
    assert (w.filename, w.lineno) == (__file__, line)
