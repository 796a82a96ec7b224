"""Per-rank sampler state of sharded adapters (FSDP2), and the cost of drawing the unsharded noise.

Runs ``LangevinAdam`` (kinetic, prior centred at the start: fp32 ``precond``, ``momentum`` and
``prior_centre`` per tensor once sampling) on a stack of LoRA linear layers, on 1 process and on
``--world`` processes (gloo, CPU) with ``fully_shard``, and reports the bytes of the per-tensor state
each rank holds for the adapters (:class:`~langevin_lora.core.engine.LangevinEngine` state: the optimizer's
``state``) and the unsharded numbers, plus the time of one noise draw for the full adapters (what
every rank draws, keeping its slice) against one for a 1/world share.

Usage, from the repository root:
``python -m benchmarks.bench_fsdp_memory [--world 2] [--layers 4] [--width 512] [--rank 16] [--append-results]``
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from torch import nn

from benchmarks._common import add_results_arguments, append_section


def build(layers: int, width: int, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=[str(i) for i in range(layers)]))


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def worker(args, out: str) -> None:
    import torch.distributed as dist

    from langevin_lora import LangevinAdam

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build(args.layers, args.width, args.rank)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = LangevinAdam(params, lr=1e-3, num_data=1000, weight_decay=1e-2, burn_in_steps=2, step_size=1e-4, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, args.width, generator=g)
    for _ in range(4):   # 2 Adam warm-up steps, then sampling: the state is G, momenta, prior centres
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    rank = dist.get_rank() if world > 1 else 0
    numel = sum(p.numel() for p in params)
    torch.save({"state_bytes": state_bytes(opt), "adapter_numel": numel}, os.path.join(out, f"r{rank}_w{world}.pt"))
    if world > 1:
        dist.destroy_process_group()


def launch(args, world: int, out: str) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_network_port()),
               WORLD_SIZE=str(world))
    cmd = [sys.executable, "-m", "benchmarks.bench_fsdp_memory", "--worker", out, "--layers", str(args.layers),
           "--width", str(args.width), "--rank", str(args.rank)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the package is run from the root
    procs = [subprocess.Popen(cmd, cwd=root, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)]
    assert all(p.wait() == 0 for p in procs)


def draw_cost(numel: int, world: int, repeats: int = 200) -> tuple[float, float]:
    from langevin_lora.core.rng import NoiseBuffer, NoiseGenerators, draw_standard_normal

    def timed(n: int) -> float:   # the best of 5 means of `repeats` draws (a shared machine is noisy)
        t, gens, buf = [torch.empty(n)], NoiseGenerators(0), NoiseBuffer()
        draw_standard_normal(t, gens, buffer=buf)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                draw_standard_normal(t, gens, buffer=buf)
            best = min(best, (time.perf_counter() - start) / repeats * 1e3)
        return best

    return timed(numel), timed(numel // world)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--worker", default=None)
    add_results_arguments(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args, args.worker)
        return
    with tempfile.TemporaryDirectory() as out:
        launch(args, 1, out)
        launch(args, args.world, out)
        one = torch.load(os.path.join(out, "r0_w1.pt"))
        ranks = [torch.load(os.path.join(out, f"r{r}_w{args.world}.pt")) for r in range(args.world)]
    full_ms, share_ms = draw_cost(one["adapter_numel"], args.world)
    rows = [f"| 1 process | {one['state_bytes'] / 2**20:.3f} | 1.000 |"]
    rows += [f"| FSDP2 rank {r} of {args.world} | {x['state_bytes'] / 2**20:.3f} | "
             f"{x['state_bytes'] / one['state_bytes']:.3f} |" for r, x in enumerate(ranks)]
    table = "\n".join([
        f"### FSDP2: per-rank sampler state of the adapters (bench_fsdp_memory.py, torch {torch.__version__}, CPU)",
        "",
        f"LangevinAdam, kinetic, prior centred at the start, {args.layers} LoRA layers {args.width}x{args.width} "
        f"r={args.rank} ({one['adapter_numel']:,} adapter numbers); state = every tensor of the optimizer's state (G and its square root, momenta, prior centres, Adam's second moment; fp32).",
        "",
        "| run | state MiB | / unsharded |",
        "|---|---|---|",
        *rows,
        "",
        f"Noise: every rank draws the unsharded adapters ({one['adapter_numel']:,} numbers) and keeps its slice: "
        f"{full_ms:.3f} ms per draw, against {share_ms:.3f} ms for a 1/{args.world} share (1 CPU thread).",
    ])
    print(table)
    if args.append_results:
        append_section("\n" + table + "\n", args.results)


if __name__ == "__main__":
    main()
