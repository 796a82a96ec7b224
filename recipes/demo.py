"""``make demo``: AdamW LoRA, its cheap fixes and Langevin LoRA where calibration matters, offline, on CPU.

    python -m recipes.demo [--config recipes/configs/compare_sms_spam.yaml] [--output_dir outputs/demo]
        [--threads 2] [--seeds 0 1 2] [--full] [--set section.key=value ...]

Runs :mod:`recipes.compare` with ``recipes/configs/compare_twitter.yaml`` by default: the packaged
all-MiniLM-L6-v2 with LoRA (r=8, query/value) on its top layer (the frozen layers below computed
once per tweet), Twitter sentiment (3 classes; the packaged CrowdFlower aggregate, whose licence is
not stated), N = 2000 tweets and 15 epochs (:data:`DEMO_SIZES`; ``--full``: the config's 30), the
regime where AdamW's final weights are over-confident. One AdamW run per seed gives ``adamw`` (final
weights), ``adamw_best`` (best validation NLL) and ``adamw_ts`` (temperature scaling on validation);
``langevin`` is the same Trainer with ``callbacks=[LangevinLoRA()]`` and no argument (the module
logs ``val_loss``), predicting with the posterior average of its sample bank. Prints held-out accuracy, ECE, NLL, Brier, gradient evaluations and wall time per
arm, the measured temperature and stationarity verdict of the chain, whether the posterior average
has enough samples, and writes the report folder. ``--config`` picks another comparison config (the
UCI SMS Spam Collection, CC BY 4.0: ``recipes/configs/compare_sms_spam.yaml``); ``--set`` overrides
as in :mod:`recipes.compare`; a mistake ends in one line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

CONFIG = Path(__file__).resolve().parent / "configs" / "compare_twitter.yaml"
#: The demo's sizes on top of ``compare_twitter.yaml`` (one seed; ``--full`` drops them): the same
#: N = 2000 tweets, 30 epochs and 1000 validation tweets, 2000 of the 9,311 test tweets, so that
#: ``make demo`` ends within 5 minutes on 2 CPU cores. The 3-seed comparison on the full config is
#: ``benchmarks/bench_quality.py``.
DEMO_SIZES = ["data.num_test=2000"]


def main(argv: list[str] | None = None) -> dict:
    import warnings

    from recipes.compare import load_config, run_comparison
    from recipes.config_check import ConfigError, exit_on_config_error
    from recipes.convergence import convergence_sentence

    parser = argparse.ArgumentParser(prog="python -m recipes.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="comparison config (default: Twitter sentiment)")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the config's `threads`; the demo targets 2 cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--full", action="store_true",
                        help="run the config as written (the default config: 30 epochs, 2400 sampling steps, "
                             "32 samples, 1000 validation and all 9,311 test tweets) instead of the demo's sizes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LOAD REPORT.*")
    t0 = time.perf_counter()
    try:
        threads = [] if args.threads is None else [f"threads={args.threads}"]
        sizes = DEMO_SIZES if Path(args.config).resolve() == CONFIG and not args.full else []
        cfg = load_config(args.config, [*sizes, *threads, *args.overrides])
        result = run_comparison(cfg, seeds=args.seeds, output_dir=args.output_dir,
                                command="python -m recipes.demo " + " ".join(argv or []))
    except ConfigError as exc:  # one line, exit status 2, no traceback
        exit_on_config_error(parser.prog, exc)
    wall = time.perf_counter() - t0
    for row in result["rows"]:
        if row["method"] == "langevin":
            bv = row.get("beta_virial")
            txt = "n/a" if bv is None else f"beta*T_virial = {bv:.2f} (1 at the target temperature)"
            print(f"[demo] seed {row['seed']}: measured temperature {txt}; stationarity where the samples were kept: "
                  f"{row['stationarity']}")
            if row.get("ladder") and row.get("prior_std") is not None:
                print(f"[demo] seed {row['seed']}: LangevinLoRA() ended burn-in at step {row['plan_burn_in_steps']} "
                      f"({row['start_reason']}), chose prior_std {row['prior_std']:g} on validation and stopped at "
                      f"step {row['optimizer_steps']} ({row['stop_reason']}): {row['grad_evals']:.0f} gradient "
                      f"evaluations, AdamW's run {shared_steps(result)}")
            elif row.get("ladder") is not None:
                print(f"[demo] seed {row['seed']}: LangevinLoRA() did not sample ({row['stop_reason']})")
            diag = row.get("diagnostics") or {}
            rh = {k.split("/", 1)[1]: c["value"] for k, c in diag.items() if k.startswith("split_rhat/") and c["value"]}
            ess = (diag.get("effective_sample_size") or {}).get("value")
            if rh or ess is not None:
                print(f"[demo] seed {row['seed']}: where the samples were kept (arviz-stats; ArviZ asks R-hat < 1.01, "
                      "ESS > 400): R-hat "
                      + ", ".join(f"{k} {v:.3f}" for k, v in rh.items())
                      + ("" if ess is None else f"; min(bulk, tail) ESS {ess:.0f}"))
            conv = result.get("convergence", {}).get(row["seed"])
            if conv is not None:
                print(f"[demo] seed {row['seed']}: {convergence_sentence(conv)}")
    print(f"[demo] total wall time {wall:.0f} s; report: {Path(args.output_dir) / 'report.md'}")
    return result


def shared_steps(result: dict) -> str:
    """AdamW's gradient evaluations, for the cost comparison line."""
    rows = [r for r in result["rows"] if r["method"] == "adamw"]
    return f"{rows[0]['grad_evals']:.0f}" if rows else "n/a"


if __name__ == "__main__":
    main()
