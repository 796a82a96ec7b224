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
``langevin`` (see :class:`~recipes.compare_config.LangevinSettings`).

Configuration mistakes (an unknown key, a value of the wrong type, a value a constructor refuses)
end in one line ``python -m recipes.compare: error: ...`` that names the key, and exit status 2
(:mod:`recipes.compare_config`, :mod:`recipes.config_check`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from recipes.compare_config import TASKS, LangevinSettings, load_config, validate_config
from recipes.config_check import ConfigError, exit_on_config_error

__all__ = ["LangevinSettings", "run_comparison", "load_config", "validate_config", "main", "TASKS"]


@contextlib.contextmanager
def _building(section: str) -> Iterator[None]:
    """Turn a constructor's refusal of a config value (``ValueError``/``TypeError``) into a
    :class:`~recipes.config_check.ConfigError` that names the section."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        kind = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
        raise ConfigError(f"{section}: {kind}{exc}") from exc


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
    if trainer_cfg.get("max_epochs") is None:
        raise ConfigError("Invalid trainer: set trainer.max_epochs or trainer.max_steps (the comparison plans "
                          "burn-in and sampling from a known budget)")
    return per_epoch * int(trainer_cfg["max_epochs"])


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
    with _building("model"):
        module = Module(**model_cfg)
    callbacks: list[Any] = []
    loss_trace = _LossTrace()
    callbacks.append(loss_trace)
    lcb = diag = None
    run_dir = out_dir / f"seed{seed}" / method
    if method == "langevin":
        from langevin_lora.callback import LangevinLoRA
        from langevin_lora.diagnostics import GibbsDiagnostics

        with _building("langevin"):
            lcb = LangevinLoRA(num_data=n, temperature=settings.temperature, weight_decay=plan["weight_decay"],
                               burn_in_steps=plan["burn_in_steps"], sample_every=plan["sample_every"],
                               num_samples=plan["num_samples"], seed=seed,
                               head_temperature=settings.head_temperature, precond_clamp=settings.precond_clamp)
        with _building("langevin.diagnostics"):
            diag = GibbsDiagnostics(log_every_n_steps=10, center_window=max(5, plan["sampling_steps"] // 10),
                                    report_dir=str(run_dir), plots=True, seed=seed, **settings.diagnostics)
        callbacks += [lcb, diag]
    tcfg = {"logger": False, "enable_model_summary": False, "enable_checkpointing": True,
            "default_root_dir": str(run_dir)} | trainer_cfg
    if tcfg.get("logger") is True or tcfg.get("logger") == "csv":
        tcfg["logger"] = pl.loggers.CSVLogger(str(run_dir), name="logs")
    with _building("trainer"):
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
        row.update({f"plan_{k}": v for k, v in plan.items()}, temperature=settings.temperature, num_data=n)
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
    if seeds is not None:
        cfg["seeds"] = list(seeds)
    if methods:
        cfg["methods"] = list(methods)
    settings = validate_config(cfg)
    task = cfg.get("task", "text")
    seeds, methods = list(cfg.get("seeds", [0])), list(cfg.get("methods", ["adamw", "langevin"]))
    out_dir = Path(output_dir or cfg.get("output_dir", "outputs/compare"))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    Data, _, _ = TASKS[task]()
    with _building("data"):
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
    command = "python -m recipes.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        cfg = load_config(args.config, args.overrides)
        return run_comparison(cfg, seeds=args.seeds, output_dir=args.output_dir, methods=args.methods,
                              command=command)
    except ConfigError as exc:  # one line, exit status 2, no traceback
        exit_on_config_error(parser.prog, exc)


if __name__ == "__main__":
    main()
