"""The automatic Langevin step size (issue 13 item 1): the measurement, the step it gives, its bias bound,
the callback's use of it (schedule factor, logging, no leak of the replays, guard in the loop)."""
from __future__ import annotations

import importlib
import logging
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from langevin_lora.lightning.callback import LangevinLoRA
from langevin_lora.core.curvature import top_eigenvalue
from langevin_lora.core.guard import DivergenceError, DivergenceWarning
from langevin_lora.core.step_size import (
    KINETIC_SAFETY,
    OVERDAMPED_SAFETY,
    AutoStepSize,
    auto_step_size,
    prior_curvature,
    step_from_lambda_max,
)
from callback_helpers import N, Tiny, loader, lora_tensors, trainer

pytestmark = pytest.mark.usefixtures("quiet_lightning")

ROOT = Path(__file__).resolve().parents[1]


# -- the measurement ---------------------------------------------------------------------------------
def _quadratic(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.5, 20.0, d, dtype=torch.float64)) @ Q.T
    G = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    return A, G, theta


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_auto_step_size_is_safety_over_the_exact_top_eigenvalue(method):
    """lambda_max(G^1/2 (A + lam I) G^1/2) of a quadratic loss, exactly (eigvalsh), gives eta = 0.1/lambda_max
    and, with friction, h = 0.5/sqrt(lambda_max); the cost is counted in gradient evaluations."""
    A, G, theta = _quadratic()
    lam = 0.3
    exact = float(torch.linalg.eigvalsh(G.sqrt()[:, None] * (A + lam * torch.eye(6, dtype=A.dtype)) * G.sqrt()).max())
    est = auto_step_size(lambda: 0.5 * theta @ A @ theta, [theta], precond=[G], weight_decay=lam, num_iters=300,
                         rtol=None, method=method, generator=torch.Generator().manual_seed(1))
    assert est.lambda_max == pytest.approx(exact, rel=1e-6)
    assert est.step_size == pytest.approx(OVERDAMPED_SAFETY / exact, rel=1e-6)
    assert est.method == method and est.products == 300
    assert est.grad_evals == (2 * 300 if method == "finite_difference" else 1 + 300)
    kin = auto_step_size(lambda: 0.5 * theta @ A @ theta, [theta], precond=[G], weight_decay=lam, friction=2.0,
                         init=est.vector, num_iters=3)
    assert kin.step_size == pytest.approx(KINETIC_SAFETY / math.sqrt(exact), rel=1e-4)
    assert kin.products <= 3


def test_the_auto_step_bounds_the_discretisation_bias():
    """THEORY §3/§5: full-batch ULA on U = theta^T K theta / 2 samples N(0, beta^-1 [K (I - eta K/2)]^-1), so
    beta*T_conf = beta E|K theta|^2 / tr K = sum_i k_i/(1 - eta k_i/2) / sum_i k_i <= 1/(1 - c/2): at the auto
    step the bias is at most 5.3% (c = 0.1) for any spectrum, and (eta/2) tr(K^2)/tr(K) to first order."""
    for spectrum in (torch.linspace(1, 1000, 50), torch.tensor([1000.0] + [1.0] * 49), torch.full((50,), 3.0)):
        K = spectrum.double()
        theta = torch.nn.Parameter(torch.ones(50, dtype=torch.float64))
        est = auto_step_size(lambda: 0.5 * (K * theta.square()).sum(), [theta], num_iters=200, rtol=1e-9)
        eta = est.step_size
        t_conf = float((K / (1.0 - eta * K / 2)).sum() / K.sum())
        assert 1.0 < t_conf <= 1.0 / (1.0 - OVERDAMPED_SAFETY / 2) + 1e-9
        first_order = 1.0 + eta / 2 * float((K ** 2).sum() / K.sum())
        assert first_order <= t_conf == pytest.approx(first_order, rel=3e-3)


def test_prior_curvature_is_a_floor_where_the_loss_is_flat():
    """A loss that ignores one coordinate whose G is 1000 times the others': lambda * max G is that
    coordinate's exact curvature, used even when a one-product power iteration has not found it."""
    theta = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    G = torch.tensor([1.0, 1.0, 1.0, 1000.0], dtype=torch.float64)
    lam = 0.5
    assert prior_curvature([theta], [G], lam) == 500.0
    est = auto_step_size(lambda: theta[:3].square().sum(), [theta], precond=[G], weight_decay=lam, num_iters=1,
                         init=[torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)])
    assert est.lambda_max == 500.0 and est.step_size == pytest.approx(0.1 / 500.0)


def test_flat_potential_has_no_auto_step_and_arguments_are_checked():
    theta = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"Invalid lambda_max: measured 0.0 .*pass a float step size"):
        auto_step_size(lambda: (theta * 0.0).sum(), [theta], num_iters=2)
    assert step_from_lambda_max(50.0) == pytest.approx(0.002)
    assert step_from_lambda_max(100.0, friction=1.0) == pytest.approx(0.05)   # c_k = 0.5 (unchanged by issue 19)
    assert step_from_lambda_max(100.0, safety=0.5) == pytest.approx(0.005)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="Invalid lambda_max"):
            step_from_lambda_max(bad)
    with pytest.raises(ValueError, match="Invalid friction"):
        auto_step_size(lambda: theta.square().sum(), [theta], friction=0.0)
    for kwargs, match in [(dict(every_n_steps=-1), "step_size_every_n_steps"), (dict(safety=0.0), "step_safety"),
                          (dict(method="newton"), "method"), (dict(warm_iters=0), "warm_iters")]:
        with pytest.raises(ValueError, match=f"Invalid {match}"):
            AutoStepSize(**kwargs)


# -- inside the callback -------------------------------------------------------------------------------
class Recording(Logger):
    """A logger that keeps what ``log_metrics`` received."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_callback_auto_step_follows_lambda_max_and_the_schedule():
    """step_size="auto": at sampling start eta = 0.1/lambda_max, lambda_max the top eigenvalue of
    G^1/2 Hess U G^1/2 on the probe batches (checked against an independent, longer power iteration at
    the same point); every later step eta_t = eta_auto * lr_t / lr_t0 (the user's LambdaLR); the views
    and the logged langevin/step_size report eta_t; langevin/lambda_max and the cost reach the logger."""
    burn = 4
    cb = LangevinLoRA(num_data=N, burn_in_steps=burn, weight_decay=0.2, seed=0, diagnostics=False)
    seen = []

    def before(tr, pl, c):
        opt = tr.optimizers[0]
        views = c.langevin_groups()
        if not seen:   # first Langevin step: the parameters are where lambda_max was measured
            params = [p for v in views for p in v.params]
            G = [P for v in views for P in v.precond]
            with c._probe_loss() as closure:
                ref = top_eigenvalue(closure, params, scale=G, weight_decay=0.2, num_iters=200, rtol=1e-8)
            seen.append(float(ref.eigenvalue))
            seen.append(opt.param_groups[0]["lr"])
        seen.append((views[0].lr, opt.param_groups[0]["lr"]))

    cb.step_observers.append(before)
    logger = Recording()
    L.Trainer(max_steps=burn + 6, callbacks=[cb], logger=logger, log_every_n_steps=1, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1).fit(Tiny(), loader())
    lam_ref, lr0 = seen[0], seen[1]
    assert cb.auto_step.lambda_max == pytest.approx(lam_ref, rel=0.02)
    eta0 = OVERDAMPED_SAFETY / cb.auto_step.lambda_max
    for eta, lr in seen[2:]:
        assert eta == pytest.approx(eta0 * lr / lr0, rel=1e-12)
    assert len({lr for _, lr in seen[2:]}) == 6   # the schedule did change the step
    logged = {k for _, m in logger.rows for k in m}
    assert {"langevin/step_size", "langevin/lambda_max", "langevin/step_size_grad_evals"} <= logged
    last = [m["langevin/step_size"] for _, m in logger.rows if "langevin/step_size" in m][-1]
    assert last == pytest.approx(seen[-1][0], rel=1e-12)
    assert cb.auto_step.grad_evals > 0 and cb.auto_step.measurements == 1


def test_callback_float_step_size_and_remeasure_cadence():
    """A float is eta at sampling start (times the schedule's relative factor); "auto" re-measures every
    step_size_every_n_steps Langevin steps, warm-started."""
    cb = LangevinLoRA(num_data=N, burn_in_steps=2, weight_decay=0.2, step_size=3e-3, diagnostics=False)
    trainer([cb], 6).fit(Tiny(schedule=False), loader())
    assert [v.lr for v in cb.langevin_groups()] == [3e-3, 3e-3] and cb.auto_step.measurements == 0
    cb = LangevinLoRA(num_data=N, burn_in_steps=2, weight_decay=0.2, step_size_every_n_steps=3, diagnostics=False)
    trainer([cb], 2 + 7).fit(Tiny(schedule=False), loader())
    assert cb.auto_step.measurements == 1 + 2   # at start, after 3 and 6 Langevin steps
    assert cb.langevin_groups()[0].lr == pytest.approx(OVERDAMPED_SAFETY / cb.auto_step.lambda_max)


def test_probe_replays_leave_no_trace_in_logs_or_metrics():
    """The training step logs an epoch mean and updates a torchmetrics metric: after a fit with the auto step
    (many replays of the training step) the metric counted exactly the real batches and the logged
    epoch mean equals the mean over the real steps' losses."""
    import torchmetrics

    class Logged(Tiny):
        def __init__(self):
            super().__init__(schedule=False)
            self.count = torchmetrics.SumMetric()
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.count.update(torch.tensor(float(len(batch[0]))))
            self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[0]))
            return loss

        def on_before_backward(self, loss):
            self.losses.append(float(loss))

    mod = Logged()
    cb = LangevinLoRA(num_data=N, burn_in_steps=3, weight_decay=0.2, diagnostics=False, step_size_every_n_steps=1)
    t = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, accelerator="cpu", devices=1)
    t.fit(mod, loader())
    assert cb.auto_step.measurements >= 2   # the replays did happen
    assert float(mod.count.compute()) == 4 * 8
    assert float(t.callback_metrics["train_loss"]) == pytest.approx(sum(mod.losses) / len(mod.losses), rel=1e-6)


def test_callback_guard_catches_a_step_far_too_large():
    """A float step 2000 times the automatic one: the chain overflows, the guard warns, restores and cuts
    once, to the automatic step it measures at the restored point; the fit ends with finite adapters whose |theta|^2 is of the order of a chain run at
    the automatic step (where the runaway reached inf), and the cuts are in the checkpoint state."""
    def run(step_size):
        cb = LangevinLoRA(num_data=N, burn_in_steps=4, weight_decay=0.2, step_size=step_size, diagnostics=False, seed=0)
        mod = Tiny(schedule=False)
        trainer([cb], 4 + 150).fit(mod, loader())
        return cb, sum(float(t.square().sum()) for t in lora_tensors(mod).values())

    # issue 19 defect 5: the cut goes straight to the stable step measured at the restored point (on main:
    # quarterings 20 -> 5 -> 1.25 -> ..., four of them here, refused after five while 0.011 was measurable)
    with pytest.warns(DivergenceWarning, match=r"diverged: .* the stable step measured at the restored point") as rec:
        cb, sq = run(20.0)
    assert cb.guard.cuts == 1 and sum("diverged" in str(w.message) for w in rec) == 1
    assert cb.state_dict()["step_size"]["guard"]["cuts"] == 1
    assert cb.langevin_groups()[0].lr == pytest.approx(cb.auto_step.step_size)
    assert cb.auto_step.step_size == pytest.approx(OVERDAMPED_SAFETY / cb.auto_step.lambda_max)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        auto, sq_auto = run("auto")
    assert auto.guard.cuts == 0 and math.isfinite(sq) and sq < 4 * sq_auto, (sq, sq_auto)


def test_callback_loss_nonfinite_for_good_is_skipped_not_cut():
    """A loss that turns non-finite for good once sampling starts, at finite parameters: every step is
    skipped (one NonFiniteGradientWarning, deduplicated), the guard says once that the data or the loss,
    not the chain, produce them, and nothing is cut or restored (issue 19 defect 3: on main three such
    steps cut the step 4x each, then raised DivergenceError, blaming the chain for the data)."""
    from langevin_lora import NonFiniteGradientWarning

    class Broken(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if self.global_step >= 4 else loss

    cb = LangevinLoRA(num_data=N, burn_in_steps=4, weight_decay=0.2, step_size=1e-3, diagnostics=False)
    mod = Broken(schedule=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        trainer([cb], 60).fit(mod, loader())
    assert cb.guard.cuts == 0 and cb.guard.events == [] and cb.engine.skipped_steps == 56
    assert sum(issubclass(w.category, NonFiniteGradientWarning) for w in caught) == 1
    assert any(issubclass(w.category, DivergenceWarning) and "not a divergence" in str(w.message) for w in caught)
    assert all(torch.isfinite(t).all() for t in lora_tensors(mod).values())
    assert cb._wrapper is None   # the step wrapper was removed


@pytest.mark.parametrize("invalid, match", [
    (dict(step_size="adam"), r"Invalid step_size: 'adam' \(expected 'auto', 'optimizer', a float > 0 or a "
                             r"langevin_lora.AutoStepSize\)"),
    (dict(step_size=0.0), "Invalid step_size"),
    (dict(step_size=True), "Invalid step_size"),
    (dict(probe_examples=0), "Invalid probe_examples"),
    # issue 19: the messages name the public parameters, and step_safety >= 2 (unstable) is refused
    (dict(step_size_every_n_steps=-1), r"Invalid step_size_every_n_steps: -1 \(expected an integer >= 0\)"),
    (dict(step_safety=-1.0), r"Invalid step_safety: -1\.0 \(allowed range \(0, 2\)\)"),
    (dict(step_safety=5.0), r"Invalid step_safety: 5\.0 \(allowed range \(0, 2\)\)"),
    (dict(step_safety=math.inf), r"Invalid step_safety: inf \(expected a finite number in \(0, 2\)\)"),
    (dict(loss_fn=3), "Invalid loss_fn"),
    (dict(guard="yes"), "Invalid guard"),
])
def test_invalid_step_size_arguments(invalid, match):
    with pytest.raises(ValueError, match=match):
        LangevinLoRA(**invalid)


# -- the README quick start on tiny random transformers (benchmarks/bench_step_size.py) ------------------
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_quick_start_never_diverges_at_any_user_lr(model, monkeypatch, one_thread):
    """LangevinLoRA(burn_in_steps=..., sample_every=..., num_samples=...) + the user's AdamW at lr 1e-2 and
    1e-5 on a tiny random BERT / GPT-2 built from configs: no DivergenceWarning, finite adapters and
    samples, |theta|^2 within a factor 2 of its start plus the prior's d/(beta lambda); the old
    behaviour (step_size="optimizer") at lr 1e-2 is what the guard has to rescue."""
    monkeypatch.syspath_prepend(str(ROOT))
    bench = importlib.import_module("benchmarks.bench_step_size")
    for lr in (1e-2, 1e-5):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DivergenceWarning)
            r = bench.run_one(model, lr, quick=True)
        assert r["finite"] and r["cuts"] == 0 and r["samples"] == r["num_samples"], r
        assert r["theta_sq_end"] < 2 * (r["theta_sq_start"] + r["prior_spread"]), r
        assert r["lambda_max"] > 0 and r["grad_evals"] > 0 and r["step_size"] > 0


# -- issue 13 item 1 with the kinetic chain, the old behaviour, the fallback, the resume ----------------
@pytest.mark.parametrize("friction", [None, 2.0, "auto"])
def test_callback_auto_step_honours_friction(friction):
    """step_size="auto": h = 0.5/sqrt(lambda_max) for a kinetic (BAOAB) chain, eta = 0.1/lambda_max for
    the overdamped one; the lambda_max is the same measurement (same probe, same point, same seed)."""
    cb = LangevinLoRA(num_data=N, burn_in_steps=4, weight_decay=0.2, seed=0, diagnostics=False, friction=friction)
    trainer([cb], 4 + 5).fit(Tiny(schedule=False), loader())
    lam = cb.auto_step.lambda_max
    views = cb.langevin_groups()
    expected = OVERDAMPED_SAFETY / lam if friction is None else KINETIC_SAFETY / math.sqrt(lam)
    assert lam > 0 and all(v.lr == pytest.approx(expected, rel=1e-12) for v in views)
    assert all((v.friction is None) == (friction is None) for v in views)
    assert all(torch.isfinite(t).all() for t in lora_tensors(cb._module).values())


def test_optimizer_step_size_is_the_user_learning_rate():
    """step_size="optimizer" (the behaviour before issue 13): every Langevin step uses the param group's
    current lr (the user's schedule included) and no curvature is measured. The probe batches are kept only
    for the divergence guard (issue 19: a runaway is cut to the stable step measured on them); without the
    guard none is kept."""
    for guard in (True, False):
        seen = []
        cb = LangevinLoRA(num_data=N, burn_in_steps=3, weight_decay=0.2, seed=0, diagnostics=False,
                          step_size="optimizer", guard=guard)
        cb.step_observers.append(lambda tr, pl, c: seen.append((c.langevin_groups()[0].lr,
                                                                tr.optimizers[0].param_groups[0]["lr"])))
        trainer([cb], 3 + 5).fit(Tiny(), loader())
        assert len(seen) == 5 and all(a == b for a, b in seen) and len({a for a, _ in seen}) == 5
        assert cb.auto_step.measurements == 0 and cb.auto_step.lambda_max is None
        assert (cb._probe.size > 0) == guard


class _NoDoubleBackward(torch.autograd.Function):
    """x -> x^2 / 2 elementwise with a first derivative only (like fused attention kernels on CPU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.square() / 2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x


def test_auto_step_falls_back_to_finite_differences_without_double_backward(caplog):
    """A loss built on an op without a second derivative: the "auto" method warns once, measures by central
    differences of gradients (exact on this quadratic), and AutoStepSize keeps using them afterwards."""
    K = torch.tensor([1.0, 4.0, 9.0, 30.0], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))

    def closure():
        return (K * _NoDoubleBackward.apply(theta)).sum()

    with pytest.raises(RuntimeError):   # the op really has no double backward
        g, = torch.autograd.grad(closure(), [theta], create_graph=True)
        torch.autograd.grad(g.sum(), [theta])
    auto = AutoStepSize(num_iters=200, rtol=1e-10)
    with caplog.at_level(logging.DEBUG, logger="langevin_lora.core.curvature"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # issue 19: the expected fallback is no warning
        est = auto.measure(closure, [theta], precond=None, weight_decay=[0.0])
    assert "falling back to central finite differences" in caplog.text
    assert est.method == "finite_difference" and auto.fallback
    assert est.lambda_max == pytest.approx(30.0, rel=1e-6) and est.step_size == pytest.approx(0.1 / 30.0, rel=1e-6)
    assert est.grad_evals == 1 + 2 * est.products   # the failed double-backward attempt evaluated the loss once
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no second failed attempt
        again = auto.measure(closure, [theta], precond=None, weight_decay=[0.0])
    assert again.method == "finite_difference" and again.products <= auto.warm_iters
    assert auto.state_dict()["fallback"] is True


@pytest.mark.parametrize("friction", [None, 2.0])
def test_kill_and_resume_with_remeasurements_is_bitwise_identical(tmp_path, friction):
    """The auto step's state (last lambda_max, the power iteration's vector, the cadence counters, the probe
    set, each group's lr at sampling start) is in the checkpoint: a run resumed at step k, whose
    re-measurements fall after k, ends bitwise equal to the uninterrupted run (overdamped and kinetic)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    k, burn = 8, 3

    def make():
        return LangevinLoRA(num_data=N, burn_in_steps=burn, weight_decay=0.1, seed=4, sample_every=2, num_samples=3,
                            step_size_every_n_steps=3, friction=friction, diagnostics=False)

    L.seed_everything(0, verbose=False)
    full, cb_full = Tiny(), make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    trainer([cb_full, ckpt], 2 * k, enable_checkpointing=True).fit(full, loader())
    state = torch.load(tmp_path / f"step={k}.ckpt", weights_only=True)["callbacks"]
    saved = next(v for key, v in state.items() if "LangevinLoRA" in key)["step_size"]
    assert saved["auto"]["measurements"] == 1 + (k - burn) // 3 and saved["auto"]["vector"] is not None
    assert saved["probe"] is not None and saved["lr0"]

    L.seed_everything(123, verbose=False)
    resumed, cb_res = Tiny(), make()
    trainer([cb_res], 2 * k).fit(resumed, loader(), ckpt_path=tmp_path / f"step={k}.ckpt")
    assert cb_res.auto_step.measurements == cb_full.auto_step.measurements == 1 + (2 * k - burn) // 3
    assert cb_res.auto_step.lambda_max == cb_full.auto_step.lambda_max
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(cb_full.sample_bank, cb_res.sample_bank):
        assert all(torch.equal(a[n], b[n]) for n in a)


# -- the README quick start on the packaged MiniLM at the extremes of the user's lr range -----------------
@pytest.mark.slow
def test_readme_quick_start_on_minilm_neither_diverges_nor_loses_accuracy(monkeypatch):
    """Issue 13 "done when": the README callback quick start (LangevinLoRA(burn_in_steps, weight_decay=1e-2,
    temperature=1.0, sample_every, num_samples), every other argument default: step_size="auto", the guard)
    in a Lightning script on the packaged MiniLM (LoRA r=8 on query/value of the top 2 layers, to keep the
    test short), 64 SMS messages, 16 burn-in steps (AdamW has arrived: a shorter burn-in compares a chain
    started before AdamW learnt with AdamW after it), 4 samples one step apart, the user's AdamW at lr 1e-2
    and 1e-5: no DivergenceWarning, finite adapters and posterior probabilities, |theta|^2 bounded by its
    start plus the prior's d/(beta lambda), and the posterior average's held-out accuracy (128 messages) no
    worse than AdamW alone (same script, no callback) beyond 3 binomial sd. About 100 s on 2 shared cores."""
    monkeypatch.syspath_prepend(str(ROOT))
    bench = importlib.import_module("benchmarks.bench_step_size")
    sizes = dict(n_test=128, burn_in_steps=16, sample_every=1, num_samples=4)
    assert bench.QUICK_START == dict(weight_decay=1e-2, temperature=1.0)   # the README's arguments
    for lr in (1e-2, 1e-5):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DivergenceWarning)
            r = bench.run_one("minilm", lr, quick=True, top_layers=2, sizes=sizes)
        alone = bench.run_one("minilm", lr, quick=True, top_layers=2, sizes=sizes, langevin=False)
        assert r["finite"] and r["cuts"] == 0 and r["samples"] == r["num_samples"], r
        assert r["theta_sq_end"] < 2 * (r["theta_sq_start"] + r["prior_spread"]), r
        p = alone["acc"]
        assert r["acc"] >= p - 3 * math.sqrt(max(p * (1 - p), 0.05 * 0.95) / 128), (r, alone)
        assert r["lambda_max"] > 0 and r["grad_evals"] > 0 and r["step_size"] > 0


def test_bench_step_size_smoke(monkeypatch, tmp_path, one_thread):
    """benchmarks/bench_step_size.py end to end at its smallest (tiny random BERT, one lr, --quick): one table
    row per run with the columns the results table promises, appended to the given results file."""
    monkeypatch.syspath_prepend(str(ROOT))
    bench = importlib.import_module("benchmarks.bench_step_size")
    results = tmp_path / "RESULTS.md"
    out = bench.main(["--quick", "--models", "tiny-bert", "--lrs", "1e-3", "--append-results", "--results",
                      str(results)])
    callback, optimizer = out["runs"]   # issue 19: both front-ends by default
    for run in (callback, optimizer):
        assert run["finite"] and run["cuts"] == 0 and run["lambda_max"] > 0 and run["grad_evals"] > 0
    text = results.read_text()
    assert "bench_step_size" in text and "| tiny-bert | 0.001 | auto |" in text and "cost: grad evals" in text
    assert "| tiny-bert | 0.001 | optimizer: auto |" in text and "--lrs 1e-3" in text
