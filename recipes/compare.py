r"""AdamW LoRA vs Langevin LoRA on the same data, seeds and budget.

    python -m recipes.compare --config recipes/configs/compare_sms_spam.yaml [--seeds 0 1 2]
        [--output_dir DIR] [--set data.num_train=500 --set trainer.max_epochs=2 ...]

For every seed, both methods start from the same pretrained model, the same LoRA initialisation
and the same minibatch order, and take the same number of optimizer steps:

- ``adamw``: AdamW on the LoRA tensors and the head; predicts with the final weights.
- ``langevin``: the same AdamW for ``burn_in`` steps, then Langevin sampling of the LoRA tensors
  (frozen Adam preconditioner, coupled decay :math:`\lambda`, inverse temperature
  :math:`\beta = N/T`, :math:`N` the number of training examples); every ``sample_every`` steps a
  posterior sample is kept, and it predicts with the average of the softmax over the samples.

It writes ``report.md``, ``results.json``, ``reliability.png`` and ``diagnostics.png`` into the
output folder and prints the table. The config (YAML) has the sections

``seeds``, ``output_dir``, ``task`` (``text``; ``choice`` for causal-LM multiple choice),
``data`` (data-module arguments), ``model`` (module arguments), ``trainer`` (Lightning Trainer
arguments: ``accelerator``, ``devices``, ``precision``, ``strategy``,
``accumulate_grad_batches``, ``max_epochs``/``max_steps`` ... passed unchanged), and
``langevin`` (see :class:`LangevinSettings`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = ["LangevinSettings", "run_comparison", "load_config", "main", "TASKS"]


@dataclasses.dataclass
class LangevinSettings:
    r"""Hyperparameters of the Langevin run (the AdamW run ignores them).

    Attributes:
        temperature: :math:`T`; :math:`\beta = N/T` (1 = the Bayesian posterior of the mean-NLL
            loss with the Gaussian prior below; < 1 "cold").
        prior_std: :math:`\sigma_p` of the Gaussian prior on every LoRA coordinate; the coupled
            decay is :math:`\lambda = 1/(N\sigma_p^2)` unless ``weight_decay`` is given.
        weight_decay: :math:`\lambda` directly (overrides ``prior_std``).
        burn_in: AdamW steps before sampling, as a fraction of the total steps (< 1) or a count.
        num_samples: posterior samples kept; ``sample_every`` is chosen so they span the
            sampling phase, unless given.
        sample_every: optimizer steps between kept samples (``None``: automatic).
        precond_clamp: clamp of the frozen preconditioner relative to its median.
        head_temperature: temperature of the non-LoRA trainable tensors (0: noise-free).
    """

    temperature: float = 1.0
    prior_std: float = 0.1
    weight_decay: float | None = None
    burn_in: float = 0.5
    num_samples: int = 16
    sample_every: int | None = None
    precond_clamp: tuple[float, float] = (0.01, 100.0)
    head_temperature: float = 0.0
    lr_scale: float = 0.01
    diagnostics: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("temperature", "prior_std", "head_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (name == "prior_std" and v == 0):
                raise ValueError(f"Invalid langevin.{name}: {v!r} (expected a real number "
                                 f"{'> 0' if name == 'prior_std' else '>= 0'})")
        if self.weight_decay is not None and (not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0):
            raise ValueError(f"Invalid langevin.weight_decay: {self.weight_decay!r} (expected a real number >= 0)")
        if not isinstance(self.diagnostics, dict):
            raise ValueError(f"Invalid langevin.diagnostics: {self.diagnostics!r} (expected a mapping of "
                             "GibbsDiagnostics arguments)")
        if not isinstance(self.burn_in, (int, float)) or self.burn_in < 0:
            raise ValueError(f"Invalid langevin.burn_in: {self.burn_in!r} (expected a fraction in [0, 1) "
                             "or a step count >= 1)")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"Invalid langevin.num_samples: {self.num_samples!r} (expected an integer >= 1)")
        if self.sample_every is not None and (not isinstance(self.sample_every, int) or self.sample_every < 1):
            raise ValueError(f"Invalid langevin.sample_every: {self.sample_every!r} (expected an integer >= 1)")
        if not isinstance(self.lr_scale, (int, float)) or not 0 < self.lr_scale <= 1:
            raise ValueError(f"Invalid langevin.lr_scale: {self.lr_scale!r} (expected a real number in (0, 1])")
        self.precond_clamp = tuple(self.precond_clamp)

    def plan(self, total_steps: int, num_data: int) -> dict[str, Any]:
        """Burn-in, sampling interval and decay for a run of ``total_steps`` optimizer steps."""
        if total_steps < 2:
            raise ValueError(f"Invalid budget: {total_steps} optimizer steps; need at least 2")
        burn = int(round(self.burn_in * total_steps)) if self.burn_in < 1 else int(self.burn_in)
        if burn >= total_steps:
            raise ValueError(f"Invalid langevin.burn_in: {self.burn_in!r} leaves no sampling step out of {total_steps}")
        sampling = total_steps - burn
        every = self.sample_every or max(1, sampling // self.num_samples)
        lam = self.weight_decay if self.weight_decay is not None else 1.0 / (num_data * self.prior_std ** 2)
        return {"burn_in_steps": burn, "sampling_steps": sampling, "sample_every": every,
                "num_samples": min(self.num_samples, sampling // every), "weight_decay": float(lam),
                "beta": math.inf if self.temperature == 0 else num_data / self.temperature}


# -- tasks ------------------------------------------------------------------------------------------
def _text_task():
    from recipes.data import TextClassificationData
    from recipes.models import LoRAClassifier, forward_logits
    return TextClassificationData, LoRAClassifier, forward_logits


def _choice_task():
    from recipes.causal_lm import ChoiceData, LoRAChoiceLM, forward_choice_logits
    return ChoiceData, LoRAChoiceLM, forward_choice_logits


TASKS = {"text": _text_task, "choice": _choice_task}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    cfg: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"Invalid config: {str(p)!r} does not exist")
        cfg = yaml.safe_load(p.read_text()) or {}
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Invalid override: {item!r} (expected section.key=value)")
        key, value = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    known = {"seeds", "output_dir", "task", "data", "model", "trainer", "langevin", "methods", "threads"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"Invalid config: unknown sections {sorted(unknown)} (expected {sorted(known)})")
    return cfg


class _PeakMemory:
    """Peak memory of one run: CUDA max allocated when on GPU, else peak process RSS sampled
    every 50 ms (MB)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss_mb())

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss_mb())


class _LossTrace:
    """Records the minibatch training loss at every optimizer step."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class LossTrace(Callback):
            def __init__(self) -> None:
                self.values: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                if loss is not None:
                    self.values.append(float(loss))

        return LossTrace()


def _total_steps(trainer_cfg: dict[str, Any], n_train: int, batch_size: int) -> int:
    accum = int(trainer_cfg.get("accumulate_grad_batches", 1))
    devices = trainer_cfg.get("devices", 1)
    world = devices if isinstance(devices, int) and devices > 0 else 1
    per_epoch = math.ceil(math.ceil(n_train / (batch_size * world)) / accum)
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    return per_epoch * int(trainer_cfg.get("max_epochs", 1))


def _run_one(method: str, seed: int, cfg: dict[str, Any], settings: LangevinSettings, out_dir: Path,
             datamodule) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor], dict[str, list[float]]]:
    import lightning.pytorch as pl

    from recipes.metrics import classification_metrics

    Data, Module, forward_fn = TASKS[cfg.get("task", "text")]()
    trainer_cfg = dict(cfg.get("trainer") or {})
    model_cfg = dict(cfg.get("model") or {})
    model_cfg.setdefault("num_labels", datamodule.num_labels)
    n = datamodule.num_train_examples
    total = _total_steps(trainer_cfg, n, datamodule.hparams.batch_size)
    plan = settings.plan(total, n)

    pl.seed_everything(seed, workers=True, verbose=False)
    if settings.lr_scale != 1.0:  # same schedule for both methods: same budget
        model_cfg.update(lr_drop_step=plan["burn_in_steps"], lr_drop_factor=settings.lr_scale)
    module = Module(**model_cfg)
    callbacks: list[Any] = []
    loss_trace = _LossTrace()
    callbacks.append(loss_trace)
    lcb = diag = None
    run_dir = out_dir / f"seed{seed}" / method
    if method == "langevin":
        from langevin_lora.callback import LangevinLoRA
        from langevin_lora.diagnostics import GibbsDiagnostics

        lcb = LangevinLoRA(num_data=n, temperature=settings.temperature, weight_decay=plan["weight_decay"],
                           burn_in_steps=plan["burn_in_steps"], sample_every=plan["sample_every"],
                           num_samples=plan["num_samples"], seed=seed,
                           head_temperature=settings.head_temperature, precond_clamp=settings.precond_clamp)
        diag = GibbsDiagnostics(log_every_n_steps=10, center_window=max(5, plan["sampling_steps"] // 10),
                                report_dir=str(run_dir), plots=True, seed=seed, **settings.diagnostics)
        callbacks += [lcb, diag]
    tcfg = {"logger": False, "enable_model_summary": False, "enable_checkpointing": True,
            "default_root_dir": str(run_dir)} | trainer_cfg
    if tcfg.get("logger") is True or tcfg.get("logger") == "csv":
        tcfg["logger"] = pl.loggers.CSVLogger(str(run_dir), name="logs")
    trainer = pl.Trainer(callbacks=callbacks, **tcfg)
    cuda = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
    t0, c0 = time.perf_counter(), time.process_time()
    with _PeakMemory(cuda) as mem:
        trainer.fit(module, datamodule=datamodule)
        if not trainer.is_global_zero:
            return {}, (torch.empty(0), torch.empty(0)), {}
        model = module.to(trainer.strategy.root_device)
        test = list(datamodule.test_dataloader())
        if method == "adamw":
            from recipes.models import predict_proba
            probs, labels = predict_proba(model, test, forward_fn)
            n_samples = 1
        else:
            from langevin_lora.samples import bma_predict_proba
            probs = bma_predict_proba(model, lcb.sample_bank, test, forward_fn=forward_fn)
            labels = torch.cat([b["labels"] for b in test])
            n_samples = len(lcb.sample_bank)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = classification_metrics(probs, labels)
    row: dict[str, Any] = {"method": method, "seed": seed, **metrics, "wall_time_s": wall, "cpu_time_s": cpu,
                           "peak_memory_mb": mem.peak, "num_samples": n_samples,
                           "beta_virial": None, "stationarity": "n/a", "optimizer_steps": trainer.global_step}
    traces = {"train_loss": loss_trace.values}
    if method == "langevin":
        row.update({f"plan_{k}": v for k, v in plan.items()}, temperature=settings.temperature)
        vt = list(diag.traces.get("virial_temperature", []))
        traces["virial"] = [v / plan["beta"] for v in vt]
        report = diag.last_report
        row["beta_virial"] = float(sum(vt) / len(vt)) if vt else None
        if report is not None:
            row["stationarity"] = report.verdict
            row["diagnostics"] = {c.name: {"status": c.status, "value": c.value} for c in report.checks}
    return row, (probs, labels), traces


def run_comparison(cfg: dict[str, Any], *, seeds: list[int] | None = None, output_dir: str | None = None,
                   methods: list[str] | None = None, command: str | None = None, quiet: bool = False
                   ) -> dict[str, Any]:
    """Train every method for every seed, write the report and return ``{"rows", "summary", "paths"}``."""
    from recipes.report import format_table, summarize, write_report

    cfg = copy.deepcopy(cfg)
    task = cfg.get("task", "text")
    if task not in TASKS:
        raise ValueError(f"Invalid task: {task!r} (expected one of {', '.join(TASKS)})")
    seeds = list(seeds if seeds is not None else cfg.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"Invalid seeds: {seeds!r} (expected a non-empty list of integers >= 0)")
    methods = list(methods or cfg.get("methods", ["adamw", "langevin"]))
    bad = [m for m in methods if m not in ("adamw", "langevin")]
    if bad:
        raise ValueError(f"Invalid methods: {bad} (expected adamw and/or langevin)")
    settings = LangevinSettings(**(cfg.get("langevin") or {}))
    out_dir = Path(output_dir or cfg.get("output_dir", "outputs/compare"))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    Data, _, _ = TASKS[task]()
    datamodule = Data(**(cfg.get("data") or {}))
    datamodule.setup("fit")
    rows, predictions, traces, betas = [], {}, {}, {}
    for seed in seeds:
        for method in methods:
            if not quiet:
                print(f"[compare] seed {seed}: {method}", flush=True)
            row, pred, trace = _run_one(method, seed, cfg, settings, out_dir, datamodule)
            if not row:
                continue
            rows.append(row)
            if seed == seeds[0]:
                predictions[method] = pred
                traces[method] = trace
                if method == "langevin" and row.get("plan_beta"):
                    betas[method] = row["plan_beta"]
    if not rows:
        return {"rows": [], "summary": [], "paths": {}}
    cfg_out = cfg | {"seeds": seeds, "methods": methods, "langevin": dataclasses.asdict(settings)}
    notes = [f"N = {datamodule.num_train_examples} training examples, labels {datamodule.label_names}."]
    lrow = next((r for r in rows if r["method"] == "langevin"), None)
    if lrow:
        notes.append(f"Langevin: T = {settings.temperature}, β = N/T = {lrow['plan_beta']:.0f}, "
                     f"λ = {lrow['plan_weight_decay']:.3g}, burn-in {lrow['plan_burn_in_steps']} of "
                     f"{lrow['optimizer_steps']} steps, a sample every {lrow['plan_sample_every']} steps "
                     f"({lrow['num_samples']} samples).")
    paths = write_report(out_dir, rows, config=cfg_out, predictions=predictions, traces=traces,
                         target_beta=betas, command=command, notes=notes)
    summary = summarize(rows)
    if not quiet:
        print(format_table(summary))
        print(f"[compare] wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "summary": summary, "paths": paths}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m recipes.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (recipes/configs/compare_*.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument("--output_dir", help="override the config's output folder")
    parser.add_argument("--methods", nargs="+", choices=["adamw", "langevin"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML-parsed), e.g. --set trainer.precision=bf16-mixed")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    command = "python -m recipes.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return run_comparison(cfg, seeds=args.seeds, output_dir=args.output_dir, methods=args.methods, command=command)


if __name__ == "__main__":
    main()
