"""``make demo``: AdamW LoRA vs Langevin LoRA on SMS spam, offline, on CPU, in a few minutes.

    python -m recipes.demo [--output_dir outputs/demo] [--threads 2]

Runs :mod:`recipes.compare` with ``recipes/configs/compare_sms_spam.yaml`` (packaged
all-MiniLM-L6-v2 + LoRA r=8 on query/value, the packaged UCI SMS Spam Collection), prints held-out
accuracy, ECE, NLL and Brier for both methods, the measured temperature (centred virial
estimate against :math:`1/\\beta`), and writes the report folder. ``--set section.key=value``
overrides the config as in :mod:`recipes.compare`; a mistake ends in one line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

CONFIG = Path(__file__).resolve().parent / "configs" / "compare_sms_spam.yaml"


def main(argv: list[str] | None = None) -> dict:
    import warnings

    import torch

    from recipes.compare import load_config, run_comparison
    from recipes.config_check import ConfigError, exit_on_config_error

    parser = argparse.ArgumentParser(prog="python -m recipes.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the demo targets 2 cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LOAD REPORT.*")
    t0 = time.perf_counter()
    try:
        cfg = load_config(CONFIG, ["threads=%d" % args.threads, *args.overrides])
        result = run_comparison(cfg, seeds=args.seeds, output_dir=args.output_dir,
                                command="python -m recipes.demo " + " ".join(argv or []))
    except ConfigError as exc:  # one line, exit status 2, no traceback
        exit_on_config_error(parser.prog, exc)
    wall = time.perf_counter() - t0
    for row in result["rows"]:
        if row["method"] == "langevin":
            beta = row["plan_beta"]
            bv = row.get("beta_virial")
            txt = "n/a" if bv is None else f"{bv / beta:.3e} (beta*T_virial = {bv:.2f})"
            print(f"[demo] seed {row['seed']}: measured temperature (centred virial) {txt}; "
                  f"target 1/beta = {1 / beta:.3e}; stationarity: {row['stationarity']}")
    print(f"[demo] total wall time {wall:.0f} s; report: {Path(args.output_dir) / 'report.md'}")
    return result


if __name__ == "__main__":
    main()
