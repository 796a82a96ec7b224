r"""The comparison users run: AdamW LoRA, its cheap fixes, and Langevin LoRA, on the same data,
seeds, initialisation and data order.

    python -m recipes.compare --config recipes/configs/compare_twitter.yaml [--seeds 0 1 2]
        [--methods adamw langevin] [--output_dir DIR] [--data.num_train 500 --trainer.max_epochs 2 ...]
        [--set data.num_train=500 ...] [--print_config]

For every seed (the same LoRA initialisation and minibatch order for all arms):

- ``adamw``: AdamW on the LoRA tensors and the head for the full budget; its final weights;
- ``adamw_best``: the same run's weights with the best validation NLL (evaluated every epoch, or
  every ``selection.every_n_steps`` steps): early stopping;
- ``adamw_ts``: ``adamw`` with temperature scaling fitted on the validation split;
- ``langevin``: burn-in, then Langevin sampling of the LoRA tensors by
  :class:`~langevin_lora.LangevinLoRA` (its arguments come from the ``langevin`` section), predicting
  with the posterior average :math:`\bar p = \frac1S\sum_s p_{\theta_s}`. ``burn_in: best``
  resumes the AdamW run at its best-validation checkpoint (weights *and* AdamW state), a fraction
  or count at the checkpoint of that step;
- ``langevin_ts``: ``langevin`` with temperature scaling fitted on the validation split.

The test split is never used for any choice (selection, temperatures and the convergence check
read the validation split). One AdamW run serves the three AdamW arms and the burn-in
(:mod:`recipes.arms`).

It writes ``report.md`` (table of mean ± sd over seeds with gradient evaluations and wall time per
arm; whether the posterior average has enough samples), ``results.json``, ``reliability.png`` (one
diagram per arm), ``convergence.png`` and ``diagnostics.png`` into the output folder and prints the
table. Config sections: ``seeds``, ``output_dir``, ``task`` (``text``; ``choice`` for causal-LM
multiple choice), ``methods``, ``threads``, ``data`` (data-module arguments), ``model`` (module
arguments), ``trainer`` (Lightning Trainer arguments, passed unchanged), ``selection``
(:class:`~recipes.compare_config.SelectionSettings`) and ``langevin``
(:class:`~recipes.compare_config.LangevinSettings`: the recipe's keys plus any LangevinLoRA argument).

The command line is a jsonargparse parser of the config (:func:`~recipes.compare_config.compare_parser`):
every key can be set as ``--section.key value`` (or ``--set section.key=value``; the value is parsed
as YAML) and ``--print_config`` prints the config as given. Configuration mistakes (an unknown key,
a value of the wrong type, a value a constructor refuses) end in one line
``python -m recipes.compare: error: ...`` that names the key, and exit status 2
(:mod:`recipes.compare_config`, :mod:`recipes.config_check`).
"""
from __future__ import annotations

import copy
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from recipes.arms import Shared, adamw_rows, building, run_adamw, run_dropin, run_langevin
from recipes.compare_config import (METHODS, PROG, TASKS, LangevinSettings, SelectionSettings, load_config,
                                    parse_args, validate_config)
from recipes.config_check import ConfigError, exit_on_config_error

__all__ = ["LangevinSettings", "run_comparison", "load_config", "validate_config", "main", "TASKS", "METHODS"]

LANGEVIN_METHODS = ("langevin", "langevin_ts")


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


def _shared(cfg: dict[str, Any], settings: LangevinSettings, out_dir: Path) -> Shared:
    Data, Module, forward_fn = TASKS[cfg.get("task", "text")]()
    with building("data"):
        datamodule = Data(**(cfg.get("data") or {}))
        datamodule.setup("fit")
    val = list(datamodule.val_dataloader())
    test = list(datamodule.test_dataloader())
    trainer_cfg = dict(cfg.get("trainer") or {})
    bs = datamodule.hparams.batch_size
    return Shared(cfg=cfg, settings=settings, selection=SelectionSettings(**(cfg.get("selection") or {})),
                  module_cls=Module, forward_fn=forward_fn, datamodule=datamodule, out_dir=out_dir, val_batches=val,
                  test_batches=test, val_labels=torch.cat([b["labels"] for b in val]),
                  test_labels=torch.cat([b["labels"] for b in test]),
                  total_steps=_total_steps(trainer_cfg, datamodule.num_train_examples, bs), batch_size=bs,
                  accumulate=int(trainer_cfg.get("accumulate_grad_batches", 1)))


def _module(shared: Shared, seed: int, previous: Any = None):
    """The LightningModule of one seed (its LoRA initialisation follows the seed); the frozen lower
    layers' cache is shared with the previous seed's module."""
    import lightning.pytorch as pl

    model_cfg = dict(shared.cfg.get("model") or {})
    model_cfg.setdefault("num_labels", shared.datamodule.num_labels)
    pl.seed_everything(seed, workers=True, verbose=False)
    with building("model"):
        module = shared.module_cls(**model_cfg)
    if previous is not None and hasattr(module, "share_lower_cache"):
        module.share_lower_cache(previous)
    elif hasattr(module, "fill_lower_cache") and hasattr(shared.datamodule, "eval_dataloader"):
        # every split once, length-sorted (less padding than the shuffled training batches)
        module.fill_lower_cache([*shared.datamodule.eval_dataloader("train"), *shared.val_batches,
                                 *shared.test_batches])
    return module


def run_comparison(cfg: dict[str, Any], *, seeds: list[int] | None = None, output_dir: str | None = None,
                   methods: list[str] | None = None, command: str | None = None, quiet: bool = False
                   ) -> dict[str, Any]:
    """Run every arm for every seed, write the report and return ``{"rows", "summary", "paths",
    "convergence"}`` (``convergence``: :func:`~recipes.convergence.sample_convergence` per seed)
    (``threads`` of the config applies inside; the previous torch thread count is restored)."""
    cfg = copy.deepcopy(cfg)
    if seeds is not None:
        cfg["seeds"] = list(seeds)
    if methods:
        cfg["methods"] = list(methods)
    settings = validate_config(cfg)
    seeds, methods = list(cfg.get("seeds", [0])), list(cfg.get("methods", list(METHODS)))
    methods = [m for m in METHODS if m in methods]
    out_dir = Path(output_dir or cfg.get("output_dir", "outputs/compare"))
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run(cfg, settings, seeds, methods, out_dir, command, quiet)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: dict[str, Any], settings: LangevinSettings, seeds: list[int], methods: list[str], out_dir: Path,
         command: str | None, quiet: bool) -> dict[str, Any]:
    from recipes.report import format_table, summarize, write_report

    shared = _shared(cfg, settings, out_dir)
    sampling = any(m in methods for m in LANGEVIN_METHODS)
    dropin = sampling and settings.burn_in == "auto"
    fixed = sampling and settings.burn_in not in ("best", "auto")
    snapshot = settings.plan(shared.total_steps, shared.num_train)["burn_in_steps"] if fixed else None
    select = "adamw_best" in methods or (sampling and settings.burn_in == "best")
    rows, predictions, traces, extras = [], {}, {}, {}
    module = None
    for seed in seeds:
        if not quiet:
            print(f"[compare] seed {seed}: AdamW run ({shared.total_steps} steps)", flush=True)
        module = _module(shared, seed, module)
        run = run_adamw(shared, seed, module, select=select, snapshot_step=snapshot)
        seed_rows, seed_probs = adamw_rows(shared, run, methods) if run.final is not None else ([], {})
        seed_traces = {"adamw": {"train_loss": run.loss}}
        if sampling:
            if not quiet:
                print(f"[compare] seed {seed}: Langevin run", flush=True)
            if dropin:   # a fresh module: the same initialisation and data order as the AdamW run
                lrows, lprobs, lextra = run_dropin(shared, seed, _module(shared, seed, module), run, methods)
            else:
                lrows, lprobs, lextra = run_langevin(shared, seed, module, run, methods)
            seed_rows, seed_probs = seed_rows + lrows, seed_probs | lprobs
            if lextra:
                extras[seed] = lextra | {"adamw_trace": run.selection.trace}
                head = [] if dropin else run.loss[:lextra["plan"]["burn_in_steps"]]
                seed_traces["langevin"] = {"train_loss": head + lextra["loss"], "virial": lextra["virial"]}
        rows += seed_rows
        if seed == seeds[0]:
            predictions = {m: (p, shared.test_labels) for m, p in seed_probs.items()}
            traces = seed_traces
    if not rows:
        return {"rows": [], "summary": [], "paths": {}, "convergence": {}}
    cfg_out = cfg | {"seeds": seeds, "methods": methods, "langevin": settings.as_dict()}
    paths = write_report(out_dir, rows, config=cfg_out, predictions=predictions, traces=traces,
                         convergence={s: e["convergence"] for s, e in extras.items()}, command=command,
                         notes=_notes(shared, settings, rows, extras))
    summary = summarize(rows)
    if not quiet:
        print(format_table(summary))
        print(f"[compare] wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "summary": summary, "paths": paths,
            "convergence": {s: e["convergence"] for s, e in extras.items()}}


def _notes(shared: Shared, settings: LangevinSettings, rows: list[dict], extras: dict[int, dict]) -> list[str]:
    dm = shared.datamodule
    notes = [f"N = {dm.num_train_examples} training examples, {len(shared.val_labels)} validation, "
             f"{len(shared.test_labels)} test; labels {dm.label_names}. AdamW budget: {shared.total_steps} optimizer "
             "steps. The test split was used for no choice."]
    sel = {r["seed"]: r["selected_step"] for r in rows if r["method"] == "adamw_best"}
    if sel:
        notes.append("adamw_best: best validation NLL at step " + ", ".join(f"{v} (seed {k})" for k, v in sel.items())
                     + ".")
    for m in ("adamw_ts", "langevin_ts"):
        ts = [f"{r['ts_temperature']:.2f}" for r in rows if r["method"] == m]
        if ts:
            notes.append(f"{m}: temperature fitted on validation T = {', '.join(ts)} (seed order).")
    for seed, e in extras.items():
        p = e["plan"]
        beta = "inf" if not math.isfinite(p["beta"]) else f"{p['beta']:.0f}"
        if p["burn_in_mode"] == "auto":
            ladder = ", ".join(f"σ_p {st['prior_std']:g}: {st['samples']} samples, val NLL "
                               + ("n/a" if st["val_nll"] is None else f"{st['val_nll']:.4f}") for st in e["ladder"])
            started = (f"burn-in ended at step {p['burn_in_steps']} ({e['start_reason']}); prior ladder [{ladder}]; "
                       if p["burn_in_steps"] is not None else "never sampled; ")
            notes.append(f"Langevin drop-in (seed {seed}): LangevinLoRA({settings.dropin_kwargs() or ''}) in the AdamW "
                         f"Trainer; {started}stopped at step {e['stop_step']} ({e['stop_reason']}); "
                         f"{p['num_samples']} samples, T = {settings.temperature}, β = N/T = {beta}"
                         + (f"; h = {e['step_size']:.4g} from λ_max = {e['lambda_max']:.4g}" if e.get("step_size") else "")
                         + ".")
            continue
        notes.append(f"Langevin (seed {seed}): T = {settings.temperature}, β = N/T = {beta}, λ = {p['weight_decay']:.3g}, "
                     f"burn-in {p['burn_in_steps']} AdamW steps ({'best validation' if p['burn_in_mode'] == 'best' else 'fixed'}), "
                     f"{p['sampling_steps']} sampling steps{' (extended beyond the AdamW budget)' if p['extended'] else ''}, "
                     f"a sample every {p['sample_every']} steps ({p['num_samples']} samples); LangevinLoRA arguments "
                     f"{settings.callback_kwargs(dm.num_train_examples)}; "
                     + (f"step h = {e['step_size']:.4g} from λ_max(G^½∇²UG^½) = {e['lambda_max']:.4g}; "
                        if e.get("step_size") else "")
                     + f"lr x {settings.lr_scale} while sampling; dropout {'on' if settings.dropout else 'off'} "
                     "while sampling.")
    return notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m recipes.compare``: parse the command line (:func:`~recipes.compare_config.parse_args`)
    and run the comparison; a configuration mistake prints one line and exits with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"{PROG} " + " ".join(shlex.quote(a) for a in argv)
    try:
        return run_comparison(parse_args(argv), command=command)
    except ConfigError as exc:  # one line, exit status 2, no traceback
        exit_on_config_error(PROG, exc)


if __name__ == "__main__":
    main()
