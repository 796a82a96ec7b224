"""Quality benchmark: Langevin LoRA vs AdamW LoRA over >= 3 seeds on packaged sets.

    python benchmarks/bench_quality.py [--configs compare_sms_spam compare_twitter] [--seeds 0 1 2]
        [--output_dir outputs/bench_quality] [--threads 2] [--set section.key=value ...]

Goal (recorded, not asserted): Langevin LoRA accuracy within 0.5 points of AdamW LoRA, ECE at
most 0.6x AdamW's, NLL lower, on the offline default (SMS spam) and on Twitter sentiment
(3 classes). The test split is fixed by ``split_seed`` in the configs and is never tuned on.
Prints the table per config with the three verdicts and writes ``summary.md`` into the output
folder, ready to paste into ``benchmarks/RESULTS.md`` with the machine line.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def verdicts(summary: list[dict]) -> dict[str, tuple[bool, str]]:
    """The three goal checks from the per-method means."""
    s = {r["method"]: r for r in summary}
    a, lg = s["adamw"], s["langevin"]
    dacc = 100 * (lg["accuracy_mean"] - a["accuracy_mean"])
    ece_ratio = lg["ece_mean"] / a["ece_mean"] if a["ece_mean"] > 0 else float("inf")
    dnll = lg["nll_mean"] - a["nll_mean"]
    return {"accuracy within 0.5 points": (dacc >= -0.5, f"{dacc:+.2f} points"),
            "ECE <= 0.6x AdamW": (ece_ratio <= 0.6, f"ratio {ece_ratio:.2f}"),
            "NLL lower": (dnll < 0, f"{dnll:+.4f}")}


def prior_lines(rows: list[dict]) -> list[str]:
    """The Gaussian prior the Langevin runs sampled, in both conventions (σ_p and λ = 1/(Nσ_p²))."""
    from langevin_lora.temperature import prior_std_from_weight_decay

    priors = dict.fromkeys((r["plan_weight_decay"], r["num_data"], r["plan_beta"]) for r in rows
                           if r["method"] == "langevin" and r.get("plan_weight_decay"))
    return [f"- prior: N(0, σ_p²) with σ_p = {prior_std_from_weight_decay(lam, n):.3g}, i.e. λ = 1/(N σ_p²) = "
            f"{lam:.3g} for N = {n}; β = N/T = {beta:.0f}" for lam, n, beta in priors]


def main(argv: list[str] | None = None) -> None:
    import torch

    from recipes.compare import load_config, run_comparison
    from recipes.config_check import ConfigError, exit_on_config_error
    from recipes.report import format_table, machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["compare_sms_spam", "compare_twitter"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", default="outputs/bench_quality")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--record", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    m = machine_info()
    lines = [f"Command: `{command}`", "",
             f"Machine: {m['processor']}, {m.get('gpu', 'no GPU')}, {args.threads} torch threads, torch {m['torch']}, "
             f"{time.strftime('%Y-%m-%d')}.", ""]
    out_root = Path(args.output_dir)
    for name in args.configs:
        path = CONFIGS / (name if name.endswith(".yaml") else name + ".yaml")
        t0 = time.perf_counter()
        try:
            cfg = load_config(path, [f"threads={args.threads}", *args.overrides])
            res = run_comparison(cfg, seeds=args.seeds, output_dir=str(out_root / path.stem), command=command)
        except ConfigError as exc:  # one line, exit status 2, no traceback
            exit_on_config_error(p.prog, exc)
        wall = time.perf_counter() - t0
        checks = verdicts(res["summary"])
        lines += [f"### {path.stem} ({cfg['data']['dataset']}, seeds {args.seeds}, {wall:.0f} s)", "",
                  format_table(res["summary"]), ""]
        lines += [f"- {k}: **{'met' if ok else 'missed'}** ({v})" for k, (ok, v) in checks.items()]
        lines += prior_lines(res["rows"])
        lines.append("")
        print("\n".join(lines[-5:]), flush=True)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.record:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        with results.open("a") as f:
            f.write(f"\n## Quality: AdamW LoRA vs Langevin LoRA (bench_quality.py) ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n")
            f.write("Goal: Langevin accuracy within 0.5 points of AdamW, ECE <= 0.6x AdamW's, NLL lower.\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
