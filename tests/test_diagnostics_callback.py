"""GibbsDiagnostics inside a Trainer: keys reach a CSV logger (MiniLM + LoRA on SMS messages),
the report is written, the sampler is found (or a clear error raised), micro-batch noise ratio."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from langevin_lora import LangevinSGD, lora_param_groups
from langevin_lora.diagnostics import GibbsDiagnostics
from langevin_lora.core.view import LangevinGroupView
from diag_helpers import Regression, regression_loader

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _trainer(tmp_path, callbacks, *, max_steps, accumulate=1, logger=False):
    return Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=callbacks, logger=logger,
                   default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)


class SmsClassifier(LightningModule):
    def __init__(self, model, lr=1e-4, num_data=1000, weight_decay=1e-2):
        super().__init__()
        self.model = model
        self.lr, self.num_data, self.weight_decay = lr, num_data, weight_decay
        self.step_calls = 0

    def training_step(self, batch, batch_idx):
        self.step_calls += 1
        input_ids, attention_mask, labels = batch
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        self.log("train_loss", out.loss)
        # Summed over the epoch by Lightning: how many training_step calls reached the user's logs.
        self.log("logged_steps", 1.0, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)
        return out.loss

    def configure_optimizers(self):
        groups = lora_param_groups(self.model)
        return LangevinSGD(groups, lr=self.lr, num_data=self.num_data, weight_decay=self.weight_decay, seed=0)


@pytest.fixture(scope="module")
def sms_loader(minilm_lora_factory):
    from recipes.assets import read_sms_spam

    _, tok = minilm_lora_factory()
    df = read_sms_spam().iloc[:64]
    enc = tok(list(df.text), padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor((df.label == "spam").astype(int).values)
    return DataLoader(TensorDataset(enc["input_ids"], enc["attention_mask"], labels), batch_size=4, shuffle=False)


def test_minilm_keys_reach_csv_logger_and_report_is_written(tmp_path, minilm_lora_factory, sms_loader):
    model, _ = minilm_lora_factory()
    module = SmsClassifier(model)
    diag = GibbsDiagnostics(log_every_n_steps=2, hvp_every_n_steps=3, lambda_max_every_n_steps=4, power_iters=2,
                            center_window=2, block_size=1, report_dir=tmp_path / "report")
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [diag], max_steps=8, accumulate=2, logger=logger)
    trainer.fit(module, train_dataloaders=sms_loader)
    assert diag.sampling_steps == 8

    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = set(rows[0])
    module_name = "bert.encoder.layer.0.attention.self.query"
    expected = {
        "langevin/virial_temperature", "langevin/virial_temperature_raw", "langevin/theta_sq", "langevin/U",
        "langevin/lora_A/default/virial_temperature", "langevin/lora_B/default/virial_temperature",
        f"langevin/{module_name}/virial_temperature", f"langevin/{module_name}/gauge_gap", "langevin/gauge_gap",
        "langevin/noise_ratio", "langevin/noise_temperature", "langevin/mean_force_chi2",
        "langevin/config_temperature", "langevin/eta_lambda_max", "langevin/sampling_steps",
    }
    assert expected <= keys, sorted(expected - keys)
    # 8 steps / log_every 2 = 4 rows with the virial temperature, all finite.
    vals = [float(r["langevin/virial_temperature"]) for r in rows if r["langevin/virial_temperature"]]
    assert len(vals) == 4 and all(math.isfinite(v) for v in vals)
    rhos = [float(r["langevin/noise_ratio"]) for r in rows if r["langevin/noise_ratio"]]
    assert rhos and all(v > 0 for v in rhos)
    # The Hessian-vector-product replays re-ran training_step, but what it logged there was discarded:
    # the user's epoch sum counts the 16 real training steps only.
    assert module.step_calls > 16 and float(trainer.callback_metrics["logged_steps"]) == 16

    # The report: printed, and saved as JSON, Markdown and PNGs.
    rep = json.loads((tmp_path / "report" / "stationarity_report.json").read_text())
    names = {c["name"] for c in rep["checks"]}
    assert {"effective_sample_size", "virial_temperature", "noise_ratio", "config_temperature",
            "eta_lambda_max", "mean_force_chi2", f"gauge/{module_name}"} <= names
    assert (tmp_path / "report" / "stationarity_report.md").read_text().startswith("# Gibbs stationarity report")
    for png in ("traces", "autocorrelation", "temperatures", "gauge"):
        assert (tmp_path / "report" / f"stationarity_report_{png}.png").stat().st_size > 1000
    # Eight steps are far too few to judge: the report says so rather than passing.
    assert rep["verdict"] == "fail"
    ess = next(c for c in rep["checks"] if c["name"] == "effective_sample_size")
    assert ess["status"] == "fail" and "run about" in ess["remedy"]


def test_missing_sampler_raises(tmp_path):
    trainer = _trainer(tmp_path, [GibbsDiagnostics()], max_steps=2)
    with pytest.raises(MisconfigurationException, match="add the langevin_lora.LangevinLoRA callback"):
        trainer.fit(Regression("sgd"), train_dataloaders=regression_loader())


def test_noise_ratio_from_micro_batches(tmp_path):
    # Identical micro-batches: no gradient noise at all, rho = 0 (up to rounding).
    diag = GibbsDiagnostics(log_every_n_steps=1, hvp_every_n_steps=0, lambda_max_every_n_steps=0, report=False)
    _trainer(tmp_path, [diag], max_steps=4, accumulate=2).fit(Regression(), regression_loader(duplicate=True))
    assert diag.noise_ratio == pytest.approx(0.0, abs=1e-6)  # float32 rounding of the differences
    # Distinct micro-batches: rho matches a direct computation from the two gradients.
    diag = GibbsDiagnostics(log_every_n_steps=1, hvp_every_n_steps=0, lambda_max_every_n_steps=0, report=False)
    module = Regression()
    loader = regression_loader()
    x1, y1 = next(iter(loader))
    it = iter(loader)
    b1, b2 = next(it), next(it)
    lin = torch.nn.Linear(3, 1)
    lin.load_state_dict(module.lin.state_dict())
    grads = []
    for xb, yb in (b1, b2):
        loss = torch.nn.functional.mse_loss(lin(xb).squeeze(-1), yb)
        grads.append(torch.autograd.grad(loss, list(lin.parameters())))
    tr = sum(((ga - gb) ** 2).sum() for ga, gb in zip(*grads)) / 4
    expected = float(1e-2 * 100.0 * tr / (2 * 4))
    _trainer(tmp_path, [diag], max_steps=1, accumulate=2).fit(module, loader)
    assert diag.noise_ratio == pytest.approx(expected, rel=1e-4)


def test_noise_ratio_unavailable_without_accumulation(tmp_path):
    diag = GibbsDiagnostics(log_every_n_steps=1, hvp_every_n_steps=1, lambda_max_every_n_steps=2, power_iters=3,
                            center_window=4, report_dir=tmp_path / "rep", plots=False)
    _trainer(tmp_path, [diag], max_steps=6).fit(Regression(), regression_loader())
    check = diag.last_report.by_name("noise_ratio")
    assert check.status == "unavailable" and "accumulate_grad_batches >= 2" in check.reason
    assert "biased upward" in diag.last_report.by_name("config_temperature").reason
    assert (tmp_path / "rep" / "stationarity_report.json").exists()
    # The power iteration on a linear model is exact: eta * lambda_max of the MSE Hessian + lambda.
    assert diag.eta_lambda_max is not None and diag.eta_lambda_max > 0


class FakeSamplerCallback:
    """Stands in for langevin_lora.LangevinLoRA: exposes langevin_groups() and step_observers."""

    def __init__(self, module, lr=1e-2, beta=100.0, weight_decay=0.1, sampling_from=2):
        self.module, self.lr, self.beta, self.wd = module, lr, beta, weight_decay
        self.step_observers, self.post_step_observers = [], []
        self.steps = 0
        self.sampling_from = sampling_from

    def langevin_groups(self):
        return [LangevinGroupView(name="all", params=list(self.module.parameters()), lr=self.lr, beta=self.beta,
                                  weight_decay=self.wd, precond=None, sampling=self.steps >= self.sampling_from)]


def test_observer_mode_with_sampler_callback_and_burn_in(tmp_path):
    from lightning.pytorch import Callback

    class Sampler(FakeSamplerCallback, Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for fn in self.step_observers:
                fn(trainer, pl_module, self)
            self.steps += 1

    module = Regression("sgd")
    sampler = Sampler(module)
    diag = GibbsDiagnostics(log_every_n_steps=1, hvp_every_n_steps=0, lambda_max_every_n_steps=0, report=False)
    _trainer(tmp_path, [sampler, diag], max_steps=5).fit(module, regression_loader())
    assert diag.sampler is sampler
    assert diag.burn_in_steps == 2 and diag.sampling_steps == 3  # counted once per step, burn-in skipped
    assert sampler.step_observers == []  # deregistered at the end of fit


def test_constructor_validation():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GibbsDiagnostics(log_every_n_steps=0)
    with pytest.raises(ValueError, match="hvp_method"):
        GibbsDiagnostics(hvp_method="exact")
    with pytest.raises(ValueError, match="split_batch"):
        GibbsDiagnostics(split_batch=3)


def test_with_langevin_lora_callback(tmp_path, minilm_lora_factory, sms_loader):
    """The real sampler callback: diagnostics attach as a step observer and see its groups."""
    pytest.importorskip("langevin_lora.lightning.callback")
    from langevin_lora.lightning.callback import LangevinLoRA

    class AdamW(SmsClassifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    model, _ = minilm_lora_factory()
    sampler = LangevinLoRA(num_data=1000, weight_decay=1e-2, burn_in_steps=2, seed=0)
    diag = GibbsDiagnostics(log_every_n_steps=2, hvp_every_n_steps=2, lambda_max_every_n_steps=0, center_window=2,
                            block_size=1, report=False)
    _trainer(tmp_path, [sampler, diag], max_steps=5).fit(AdamW(model), sms_loader)
    assert diag.sampler is sampler and diag._mode == "observer"
    assert diag.sampling_steps == 3
    assert diag.last_logged["langevin/sampling_steps"] == 3
    assert math.isfinite(diag.last_logged["langevin/virial_temperature"])
    assert "langevin/bert.encoder.layer.0.attention.self.query/gauge_gap" in diag.last_logged
    assert math.isfinite(diag.last_logged["langevin/config_temperature"])


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_power_iteration_in_callback_is_exact_and_warns(tmp_path, method):
    from langevin_lora.diagnostics import StepSizeWarning

    lr, lam = 0.1, 0.1
    loader = regression_loader()
    x, _ = next(iter(loader))
    xa = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    # MSE Hessian of batch 0; its top two eigenvalues are 3.43 and 3.55, hence many iterations.
    exact = lr * float(torch.linalg.eigvalsh(2 * xa.T @ xa / len(x)).max() + lam)
    diag = GibbsDiagnostics(log_every_n_steps=1, hvp_every_n_steps=0, lambda_max_every_n_steps=100, power_iters=300,
                            hvp_method=method, report=False)
    with pytest.warns(StepSizeWarning, match="eta\\*lambda_max"):
        _trainer(tmp_path, [diag], max_steps=2).fit(Regression(lr=lr, weight_decay=lam), loader)
    assert diag.eta_lambda_max == pytest.approx(exact, rel=1e-3)


def test_report_arguments_are_checked(tmp_path):
    """Issue 11 item 10: report/plots/report_dir are checked at construction, naming the argument;
    numpy integers and reals are accepted."""
    import numpy as np

    for kwargs, name in (({"report": "yes"}, "report"), ({"plots": 1}, "plots"), ({"report_dir": 3}, "report_dir"),
                         ({"report_dir": ""}, "report_dir"), ({"seed": -1}, "seed"),
                         ({"center_mode": "window"}, "center_mode"), ({"loss_fn": "f"}, "loss_fn"),
                         ({"fd_eps": 2.0}, "fd_eps"), ({"step_size_warning": 0}, "step_size_warning")):
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            GibbsDiagnostics(**kwargs)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="Invalid report_dir: .* is not a folder"):
        GibbsDiagnostics(report_dir=a_file)
    diag = GibbsDiagnostics(log_every_n_steps=np.int64(5), hvp_every_n_steps=np.int32(0), fd_eps=np.float32(1e-3),
                            step_size_warning=np.float64(0.2), seed=np.int64(3), report_dir=tmp_path / "new" / "dir")
    assert diag.log_every_n_steps == 5 and diag.probes.seed == 3 and diag.report_dir == tmp_path / "new" / "dir"


class Counting(Regression):
    """Logs per step and per epoch, and updates a torchmetrics metric inside training_step."""

    def __init__(self):
        super().__init__()
        from torchmetrics import SumMetric

        self.examples = SumMetric()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.examples.update(torch.tensor(float(len(batch[0]))))
        self.log("examples", self.examples, on_step=False, on_epoch=True)
        self.log("steps_logged", 1.0, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)
        self.log("step_loss", loss)
        return loss


def test_replayed_training_step_leaves_no_trace(tmp_path):
    """The probes replay training_step (here with finite differences, at theta +- eps v) at every
    step: nothing it logs reaches callback_metrics, its Metric updates are undone, and the run
    (parameters, logged values, global RNG) is the one without probes."""
    def run(**probes):
        torch.manual_seed(5)
        module = Counting()
        diag = GibbsDiagnostics(log_every_n_steps=1, power_iters=3, hvp_method="finite_difference", report=False,
                                **probes)
        t = _trainer(tmp_path, [diag], max_steps=8)  # 64 examples, batches of 8: one epoch
        t.fit(module, regression_loader())
        return module, t, torch.rand(3)

    probed, t_probed, rng_after = run(hvp_every_n_steps=1, lambda_max_every_n_steps=2)
    plain, t_plain, rng_plain = run(hvp_every_n_steps=0, lambda_max_every_n_steps=0)
    metrics = t_probed.callback_metrics
    assert float(metrics["steps_logged"]) == 8 and float(metrics["examples"]) == 64
    assert float(metrics["step_loss"]) == float(t_plain.callback_metrics["step_loss"])
    for a, b in zip(probed.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(rng_after, rng_plain)
    assert "langevin/config_temperature" in metrics  # the diagnostics' own values do arrive


def test_a_second_fit_starts_clean_diagnostics(tmp_path):
    """A fit that does not resume a checkpoint starts a new chain: the diagnostics start clean
    (a resumed fit continues them: test_diagnostics_resume.py)."""
    diag = GibbsDiagnostics(log_every_n_steps=1, hvp_every_n_steps=2, lambda_max_every_n_steps=0, report=False)
    _trainer(tmp_path, [diag], max_steps=5).fit(Regression(), regression_loader())
    first = {k: list(v) for k, v in diag.traces.items()}
    _trainer(tmp_path, [diag], max_steps=3).fit(Regression(), regression_loader())
    assert diag.sampling_steps == 3 and len(diag.traces["virial_temperature"]) == 3
    assert diag.traces["virial_temperature"] == first["virial_temperature"][:3]  # same seed, same start
    assert len(diag.recorder.laplacians) == 2
