"""Step time of the Langevin optimizers relative to their torch counterparts on LoRA-shaped
parameter sets.

Ratios printed (all measured in one run, interleaved round-robin so that load on a shared
machine hits every optimizer alike; the median over repeats after warm-up):

- LangevinSGD (temperature 1: drift + Gaussian noise)      / torch SGD(foreach=True)
- LangevinSGD (temperature 0: drift only)                   / torch SGD(foreach=True)
- LangevinAdam, warm-up phase (Adam with coupled decay)     / torch AdamW(foreach=True)
- LangevinAdam, sampling phase (frozen G, noise)            / torch AdamW(foreach=True)
- torch.randn of all adapter coordinates alone (the Gaussian draw), for reference, and this
  package's draw (``_rng.draw_standard_normal``: on CPU, 8 fixed streams filled on up to
  ``torch.get_num_threads()`` threads), relative to it.

On ``--device cuda`` the Adam reference is AdamW(fused=True) and the timings synchronise.

Parameter sets: rank-16 adapters on q, k, v, o of (a) a 12-layer 768-wide model
(1.2M adapter parameters, 96 tensors) and (b) a 32-layer 4096-wide model (16.8M, 256 tensors).

    python -m benchmarks.bench_optimizer_step [--quick] [--device cuda] [--threads N] [--append-results]
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from benchmarks._common import add_results_arguments, append_results, machine_markdown
from langevin_lora import LangevinAdam, LangevinSGD
from langevin_lora.core.rng import NoiseGenerators, draw_standard_normal

SHAPES = {
    "12x768 (BERT-base-like)": (12, 768),
    "32x4096 (7B-like)": (32, 4096),
}
RANK = 16
LR, WD = 1e-4, 1e-2


def lora_params(n_layers: int, width: int, device: str, rank: int = RANK) -> list[torch.nn.Parameter]:
    """A (r x width) and B (width x r) for q, k, v, o of every layer, with a fixed gradient."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for _ in range(n_layers):
        for _ in range(4):
            for shape in ((rank, width), (width, rank)):
                p = torch.nn.Parameter((0.01 * torch.randn(shape, generator=gen)).to(device))
                p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(device)
                params.append(p)
    return params


def make_contenders(n_layers: int, width: int, device: str) -> dict[str, callable]:
    """name -> zero-argument callable performing one step (each on its own copy of the params)."""
    cuda = device.startswith("cuda")
    out = {}

    p = lora_params(n_layers, width, device)
    opt = torch.optim.SGD(p, lr=LR, weight_decay=WD, foreach=True)
    out["torch SGD"] = opt.step

    p = lora_params(n_layers, width, device)
    opt = LangevinSGD(p, lr=LR, num_data=10_000, weight_decay=WD, foreach=True, seed=0, guard=False)
    out["LangevinSGD T=1"] = opt.step

    p = lora_params(n_layers, width, device)
    opt = LangevinSGD(p, lr=LR, num_data=10_000, temperature=0.0, weight_decay=WD, foreach=True, seed=0, guard=False)
    out["LangevinSGD T=0"] = opt.step

    p = lora_params(n_layers, width, device)
    opt = torch.optim.AdamW(p, lr=LR, weight_decay=WD, **({"fused": True} if cuda else {"foreach": True}))
    out["torch AdamW" + (" fused" if cuda else "")] = opt.step

    p = lora_params(n_layers, width, device)
    opt = LangevinAdam(p, lr=LR, num_data=10_000, weight_decay=WD, burn_in_steps=None, foreach=True, seed=0,
                       friction=None, prior_centre=None, step_size="lr", guard=False)   # the step as measured before
    out["LangevinAdam warm-up"] = opt.step

    p = lora_params(n_layers, width, device)
    opt = LangevinAdam(p, lr=LR, num_data=10_000, weight_decay=WD, burn_in_steps=1, foreach=True, seed=0,
                       friction=None, prior_centre=None, step_size="lr", guard=False)
    opt.step()  # one Adam step, then the preconditioner is frozen
    assert opt.sampling
    out["LangevinAdam sampling"] = opt.step

    numel = sum(x.numel() for x in p)
    gen = torch.Generator(device=device).manual_seed(0)
    out["torch.randn alone"] = lambda: torch.randn(numel, generator=gen, device=device)
    gens = NoiseGenerators(0)
    out["noise draw (ours)"] = lambda: draw_standard_normal(p, gens)   # 8 CPU streams, threaded
    return out


def time_round_robin(fns: dict[str, callable], repeats: int, inner: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function; calls interleaved across contenders."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


RATIOS = [
    ("LangevinSGD T=1 / torch SGD", "LangevinSGD T=1", "torch SGD"),
    ("LangevinSGD T=0 / torch SGD", "LangevinSGD T=0", "torch SGD"),
    ("LangevinAdam warm-up / AdamW", "LangevinAdam warm-up", "AdamW"),
    ("LangevinAdam sampling / AdamW", "LangevinAdam sampling", "AdamW"),
    ("randn alone / torch SGD", "torch.randn alone", "torch SGD"),
    ("randn alone / AdamW", "torch.randn alone", "AdamW"),
    ("noise draw (ours) / randn alone", "noise draw (ours)", "torch.randn alone"),
]


def machine_line(device: str) -> str:
    line = (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if device.startswith("cuda"):
        line += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return line


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier ratios)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--only", choices=list(SHAPES), action="append", help="run only these parameter sets")
    add_results_arguments(ap)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    repeats, inner, warmup = (5, 2, 2) if args.quick else (11, 3, 3)

    machine = machine_line(args.device)
    print(f"machine: {machine}")
    print(machine_markdown())
    print(f"device: {args.device}; LoRA rank {RANK} on q,k,v,o; repeats {repeats} x {inner} steps; median")
    rows = []
    for label in args.only or list(SHAPES):
        n_layers, width = SHAPES[label]
        fns = make_contenders(n_layers, width, args.device)
        n_params = 2 * 4 * n_layers * RANK * width
        t = time_round_robin(fns, repeats, inner, warmup, args.device)
        adam_ref = next(k for k in t if k.startswith("torch AdamW"))
        print(f"\n{label}: {n_params / 1e6:.1f}M adapter params, {8 * n_layers} tensors")
        for name, sec in t.items():
            print(f"  {name:24s} {sec * 1e3:9.3f} ms/step")
        ratios = {}
        for rname, num, den in RATIOS:
            den = adam_ref if den == "AdamW" else den
            ratios[rname] = t[num] / t[den]
        rows.append((label, n_params, t, ratios))

    header = "| parameter set | " + " | ".join(r for r, _, _ in RATIOS) + " |"
    sep = "|" + "---|" * (len(RATIOS) + 1)
    lines = [header, sep]
    for label, _, _, ratios in rows:
        lines.append(f"| {label} | " + " | ".join(f"{ratios[r]:.2f}" for r, _, _ in RATIOS) + " |")
    ms_header = "| parameter set | " + " | ".join(rows[0][2]) + " |"
    ms_lines = [ms_header, "|" + "---|" * (len(rows[0][2]) + 1)]
    for label, _, t, _ in rows:
        ms_lines.append(f"| {label} | " + " | ".join(f"{v * 1e3:.3f}" for v in t.values()) + " |")
    table = "\n".join(lines)
    ms_table = "\n".join(ms_lines)
    print("\nstep-time ratios (AdamW reference: " + ("fused" if args.device.startswith("cuda") else "foreach") + ")")
    print(table)
    print("\nms per step")
    print(ms_table)

    if args.append_results:
        mode = "quick" if args.quick else "full"
        out = append_results(
            f"bench_optimizer_step.py: optimizer step time ({mode}, {args.device})",
            f"Step-time ratios (median of {repeats} x {inner} steps, interleaved):\n\n{table}\n\n"
            f"ms per step:\n\n{ms_table}",
            command=shlex.join(["python", "-m", "benchmarks.bench_optimizer_step",
                                *(argv if argv is not None else sys.argv[1:])]),
            notes=f"{machine}. Reference for Adam: AdamW({'fused' if args.device.startswith('cuda') else 'foreach'}=True).",
            path=args.results)
        print(f"\nappended to {out}")
    return table


if __name__ == "__main__":
    main()
