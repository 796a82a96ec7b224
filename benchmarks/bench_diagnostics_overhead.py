"""Overhead of GibbsDiagnostics at its default cadence on the MiniLM + LoRA recipe (SMS spam).

Default cadence: cheap statistics every step, one Hutchinson HVP every ``hvp_every_n_steps``
(400) and a 10-product power iteration every ``lambda_max_every_n_steps`` (4000). Running
thousands of steps per arm is too slow on a CPU, so one run measures, with interleaved repeats,
the median training-step time of four arms:

- ``plain``: LangevinSGD, no diagnostics;
- ``cheap``: GibbsDiagnostics with the HVP diagnostics off (the every-step part + logging);
- ``hvp``: a Hutchinson probe at every step;
- ``power``: a power iteration at every step;

and prints the amortised overhead at the default cadence,

    (cheap - plain)/plain + (hvp - cheap)/(400 plain) + (power - cheap)/(4000 plain),

next to the machine it ran on. On a shared machine differences of step times are noisy, so the
time spent inside the diagnostics (its hooks, its HVP events) is also timed directly, and the
overhead is printed both ways. Usage, from the repository root:
``python -m benchmarks.bench_diagnostics_overhead [--repeats 4] [--steps 12] [--batch-size 32]
[--max-length 64] [--device cpu|cuda] [--append-results]``.

``--every-step`` instead times :meth:`GibbsRecorder.record <langevin_lora.diagnostics.GibbsRecorder.record>`
alone (the every-step estimators, one flush per 10 steps) on PEFT LoRA adapters of two sizes with
synthetic gradients: no forward pass, so it is quick and little disturbed by a loaded machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks._common import add_results_arguments, append_results, markdown_table  # noqa: E402
from langevin_lora import LangevinSGD, lora_param_groups  # noqa: E402
from langevin_lora.diagnostics import GibbsDiagnostics  # noqa: E402


class StepTimer(Callback):
    """Wall time from on_train_batch_start to on_train_batch_end (forward, backward, step, hooks)."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self.times.append(time.perf_counter() - self._t)


class TimedDiagnostics(GibbsDiagnostics):
    """GibbsDiagnostics that accumulates the wall time spent in its own hooks and HVP events."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_time = 0.0
        self.hvp_time = 0.0
        self.hvp_events = 0

    def _timed(self, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t

    def on_before_backward(self, *args):
        self.hook_time += self._timed(super().on_before_backward, *args)[1]

    def on_after_backward(self, *args):
        self.hook_time += self._timed(super().on_after_backward, *args)[1]

    def on_before_optimizer_step(self, *args):
        self.hook_time += self._timed(super().on_before_optimizer_step, *args)[1]

    def on_train_batch_start(self, *args):
        self.hook_time += self._timed(super().on_train_batch_start, *args)[1]

    def on_train_batch_end(self, *args):
        self.hook_time += self._timed(super().on_train_batch_end, *args)[1]

    def _run_probes(self, *args):
        _, dt = self._timed(super()._run_probes, *args)
        self.hvp_time += dt
        self.hook_time -= dt  # counted separately
        self.hvp_events += 1


class Classifier(LightningModule):
    def __init__(self, model, num_data):
        super().__init__()
        self.model, self.num_data = model, num_data

    def training_step(self, batch, batch_idx):
        ids, mask, labels = batch
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def configure_optimizers(self):
        return LangevinSGD(lora_param_groups(self.model), lr=1e-4, num_data=self.num_data, weight_decay=1e-2, seed=0,
                           guard=False)   # the overhead measured is the diagnostics', as before issue 19


def build(batch_size, max_length, n_batches):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes.assets import minilm_dir, read_sms_spam

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0,
                                            modules_to_save=["classifier"]))
    model.train()
    df = read_sms_spam().iloc[: batch_size * n_batches]
    enc = tok(list(df.text), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    labels = torch.tensor((df.label == "spam").astype(int).values)
    loader = DataLoader(TensorDataset(enc["input_ids"], enc["attention_mask"], labels), batch_size=batch_size)
    return model, loader, len(df)


def every_step_cost(layers: int, width: int, r: int, steps: int, device: torch.device) -> tuple[int, float]:
    """(LoRA parameters, median seconds of one ``record`` + amortised flush) on a PEFT model of
    ``layers`` x (query, value) linear layers of ``width``, adapters of rank ``r``."""
    from peft import LoraConfig, get_peft_model

    from langevin_lora.diagnostics import GibbsRecorder, LoraModule
    from langevin_lora.lora.param_groups import lora_modules
    from langevin_lora.core.view import LangevinGroupView

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"query": torch.nn.Linear(width, width),
                                                                   "value": torch.nn.Linear(width, width)})
                                              for _ in range(layers))

    torch.manual_seed(0)
    model = get_peft_model(Base(), LoraConfig(r=r, lora_alpha=r, target_modules=["query", "value"])).to(device)
    tensors = {role: [p for n, p in model.named_parameters() if f"lora_{role}" in n] for role in "AB"}
    for p in tensors["A"] + tensors["B"]:
        p.data.normal_(0.0, 0.1)
        p.grad = torch.randn_like(p)
    views = [LangevinGroupView(f"lora_{role}/default", ps, 1e-4, 1e3, 1e-2, None, True) for role, ps in tensors.items()]
    modules = [LoraModule(m.name, m.A, m.B) for m in lora_modules(model)]
    rec, times = GibbsRecorder(center_window=200), []
    for t in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rec.record(views, loss=torch.tensor(1.0), modules=lambda: modules)
        if rec.pending >= 10:
            rec.flush()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(p.numel() for p in tensors["A"] + tensors["B"]), statistics.median(times[10:])


def main_every_step(args, device):
    rows = []
    for layers, width, r in ((6, 384, 8), (32, 4096, 16)):
        n, sec = every_step_cost(layers, width, r, args.steps_every, device)
        rows.append([f"{layers} x (query, value), width {width}, r {r}", f"{n:,}", f"{1000 * sec:.2f}"])
        print(f"{rows[-1][0]}: {n} LoRA parameters, {1000 * sec:.2f} ms per step (median of {args.steps_every - 10})")
    if args.append_results:
        append_results("Every-step cost of GibbsRecorder.record (bench_diagnostics_overhead.py --every-step)",
                       markdown_table(["adapters", "LoRA parameters", "ms per step"], rows),
                       "python -m benchmarks.bench_diagnostics_overhead " + shlex.join(sys.argv[1:]),
                       notes=f"device {device}; synthetic gradients, no forward pass; flush every 10 steps "
                             "amortised in the median.", path=args.results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every-step", action="store_true", help="time GibbsRecorder.record alone (no forward pass)")
    ap.add_argument("--steps-every", type=int, default=110, help="record calls per size with --every-step")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="steps per arm per repeat (the first is warm-up)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    defaults = GibbsDiagnostics()
    add_results_arguments(ap)
    ap.add_argument("--hvp-every", type=int, default=defaults.hvp_every_n_steps)
    ap.add_argument("--lambda-max-every", type=int, default=defaults.lambda_max_every_n_steps)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.every_step:
        return main_every_step(args, device)
    model, loader, n = build(args.batch_size, args.max_length, args.steps)
    module = Classifier(model, n)
    arms = {
        "plain": lambda: [],
        "cheap": lambda: [TimedDiagnostics(hvp_every_n_steps=0, lambda_max_every_n_steps=0, report=False)],
        "hvp": lambda: [TimedDiagnostics(hvp_every_n_steps=1, lambda_max_every_n_steps=0, report=False)],
        "power": lambda: [TimedDiagnostics(hvp_every_n_steps=0, lambda_max_every_n_steps=1, report=False)],
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    inside = {"cheap": [], "hvp": [], "power": []}  # seconds per step / per event, measured inside
    for rep in range(args.repeats):
        order = list(arms) if rep % 2 == 0 else list(reversed(arms))
        for arm in order:
            timer = StepTimer(device)
            trainer = Trainer(max_steps=args.steps, callbacks=arms[arm]() + [timer], logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                              accelerator="gpu" if device.type == "cuda" else "cpu", devices=1)
            cbs = trainer.callbacks
            trainer.fit(module, loader)
            times[arm].extend(timer.times[1:])  # drop the first step of each fit (warm-up)
            diag = next((c for c in cbs if isinstance(c, TimedDiagnostics)), None)
            if diag is not None:
                inside[arm].append(diag.hvp_time / diag.hvp_events if arm != "cheap" else diag.hook_time / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    plain = med["plain"]
    cheap = (med["cheap"] - plain) / plain
    hvp = (med["hvp"] - med["cheap"]) / (args.hvp_every * plain)
    power = (med["power"] - med["cheap"]) / (args.lambda_max_every * plain)
    total = cheap + hvp + power
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"MiniLM + LoRA r=8 (query, value), batch {args.batch_size} x {args.max_length} tokens, "
          f"{args.repeats} interleaved repeats x {args.steps - 1} timed steps per arm")
    for k, v in med.items():
        print(f"  median step time {k:>5}: {1000 * v:8.1f} ms  (n={len(times[k])})")
    print(f"  one Hutchinson HVP event  = {(med['hvp'] - med['cheap']) / plain:.2f} plain steps")
    print(f"  one power iteration event = {(med['power'] - med['cheap']) / plain:.2f} plain steps")
    print(f"overhead at default cadence (every-step part {100 * cheap:.2f}% + HVP/{args.hvp_every} "
          f"{100 * hvp:.2f}% + power/{args.lambda_max_every} {100 * power:.2f}%): {100 * total:.2f}%")
    step_in = statistics.median(inside["cheap"])
    hvp_in, pow_in = statistics.median(inside["hvp"]), statistics.median(inside["power"])
    direct = (step_in + hvp_in / args.hvp_every + pow_in / args.lambda_max_every) / plain
    print(f"timed inside the callback: {1000 * step_in:.2f} ms per step, {hvp_in:.2f} s per HVP event, "
          f"{pow_in:.2f} s per power iteration")
    print(f"overhead at default cadence, timed inside (every-step {100 * step_in / plain:.2f}% + "
          f"HVP {100 * hvp_in / (args.hvp_every * plain):.2f}% + power {100 * pow_in / (args.lambda_max_every * plain):.2f}%): "
          f"{100 * direct:.2f}%")
    print(f"ratio (with diagnostics / without), from step-time differences: {1 + total:.4f}; "
          f"timed inside: {1 + direct:.4f}")
    if args.append_results:
        rows = [["every-step estimators", f"{100 * cheap:.2f}%", f"{100 * step_in / plain:.2f}%"],
                [f"Hutchinson HVP / {args.hvp_every} steps", f"{100 * hvp:.2f}%",
                 f"{100 * hvp_in / (args.hvp_every * plain):.2f}%"],
                [f"power iteration / {args.lambda_max_every} steps", f"{100 * power:.2f}%",
                 f"{100 * pow_in / (args.lambda_max_every * plain):.2f}%"],
                ["total (goal <= 3%)", f"{100 * total:.2f}%", f"{100 * direct:.2f}%"]]
        table = markdown_table(["part", "from step-time differences", "timed inside the callback"], rows)
        append_results("Diagnostics overhead on the MiniLM step (bench_diagnostics_overhead.py)", table,
                       "python -m benchmarks.bench_diagnostics_overhead " + shlex.join(sys.argv[1:]),
                       notes=f"plain step {1000 * plain:.1f} ms; batch {args.batch_size} x {args.max_length} tokens; "
                             f"{args.repeats} interleaved repeats x {args.steps - 1} timed steps per arm.",
                       path=args.results)


if __name__ == "__main__":
    main()
