"""End-to-end training-step throughput: AdamW LoRA vs the LangevinLoRA callback (issue 7).

Arms, all inside a real ``lightning.Trainer`` on the same model, data and batch:

- ``adamw``: plain AdamW LoRA (the baseline);
- ``langevin, diagnostics off``: the callback's Langevin step, ``diagnostics=False``;
- ``langevin, default diagnostics``: the callback with its default GibbsDiagnostics cadence;
- ``langevin, diagnostics every step``: every estimator, HVP ones included, at every step.

Each arm runs ``--warmup`` untimed steps (the first is burn-in, so timed steps are sampling
steps), then ``--steps`` timed optimizer steps (from ``on_train_batch_start`` to
``on_train_batch_end``, so Trainer start-up is excluded). Arms are interleaved over ``--repeats``
rounds and the median step time per arm is reported; throughput ratios are baseline time / arm
time, all measured in one run. Goals (issue 7): >= 0.99 with diagnostics off, >= 0.97 at default.

    python -m benchmarks.bench_train_step [--models minilm smollm2] [--quick] [--append-results]
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks._common import add_results_arguments, append_results, machine_markdown, markdown_table  # noqa: E402
from langevin_lora import LangevinLoRA  # noqa: E402
from langevin_lora.diagnostics import GibbsDiagnostics  # noqa: E402


class _Clf(L.LightningModule):
    """A PEFT LoRA model whose loss is the mean cross-entropy of ``logits_fn(model, batch)``."""

    def __init__(self, model, logits_fn, lr: float = 2e-4):
        super().__init__()
        self.model, self.logits_fn, self.lr = model, logits_fn, lr

    def training_step(self, batch, batch_idx):
        *inputs, labels = batch
        return torch.nn.functional.cross_entropy(self.logits_fn(self.model, inputs), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)


def _sms_texts(n: int) -> tuple[list[str], torch.Tensor]:
    from recipes.assets import read_sms_spam

    df = read_sms_spam().head(n)
    return list(df["text"]), torch.tensor((df["label"] == "spam").astype(int).values)


def minilm_setup(batch: int, length: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes.assets import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    texts, labels = _sms_texts(batch)
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    data = TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    def build():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                lora_dropout=0.0, modules_to_save=["classifier"]))
        return _Clf(model.train(), lambda m, x: m(input_ids=x[0], attention_mask=x[1]).logits)

    return build, data


def smollm2_setup(batch: int, length: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.causal_lm import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    texts, labels = _sms_texts(batch)
    prompts = [f"Message: {t}\nIs this spam? Answer:" for t in texts]
    enc = tok(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    choice_ids = [tok(" no").input_ids[-1], tok(" yes").input_ids[-1]]
    data = TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    def logits(m, x):
        out = m(input_ids=x[0], attention_mask=x[1]).logits  # (batch, length, vocab)
        last = x[1].sum(1) - 1 if tok.padding_side == "right" else torch.full_like(x[1][:, 0], x[1].shape[1] - 1)
        return out[torch.arange(out.shape[0]), last][:, choice_ids]

    def build():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0))
        return _Clf(model.train(), logits)

    return build, data


def bert_random_setup(batch: int, length: int, hidden: int = 768, layers: int = 12):
    """A BERT-base-sized encoder with random weights (nothing to download: GPU timing runs on machines
    without the packaged checkpoint) and random token ids; LoRA r=8 on query/value, as for MiniLM."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    data = TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (batch,), generator=g))

    def build():
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         intermediate_size=4 * hidden, num_labels=2)
        model = get_peft_model(BertForSequenceClassification(cfg), LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, modules_to_save=["classifier"]))
        return _Clf(model.train(), lambda m, x: m(input_ids=x[0], attention_mask=x[1]).logits)

    return build, data


class _StepTimer(L.Callback):
    def __init__(self, skip: int):
        self.skip, self.times, self._t0 = skip, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.skip:  # global_step counts the step just taken
            self.times.append(time.perf_counter() - self._t0)


def _arms(num_data: int) -> dict[str, callable]:
    def langevin(diagnostics):
        return [LangevinLoRA(num_data=num_data, weight_decay=0.01, burn_in_steps=1, seed=0, diagnostics=diagnostics)]

    every = dict(log_every_n_steps=1, hvp_every_n_steps=1, lambda_max_every_n_steps=1, noise_every_n_steps=1,
                 report=False)
    return {
        "adamw": lambda: [],
        "langevin, diagnostics off": lambda: langevin(False),
        "langevin, default diagnostics": lambda: langevin(GibbsDiagnostics(report=False)),
        "langevin, diagnostics every step": lambda: langevin(GibbsDiagnostics(**every)),
    }


def run_model(name: str, setup, batch: int, length: int, steps: int, warmup: int, repeats: int,
              only: list[str] | None = None, accelerator: str = "cpu", precision: str = "32-true") -> list[list]:
    build, data = setup(batch, length)
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    arms = {k: v for k, v in _arms(num_data=1000).items() if k == "adamw" or not only or k in only}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for rnd in range(repeats):
        for arm, callbacks in arms.items():
            timer = _StepTimer(skip=warmup)
            trainer = L.Trainer(max_steps=warmup + steps, callbacks=[*callbacks(), timer], logger=False,
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                accelerator=accelerator, devices=1, max_epochs=-1, precision=precision)
            trainer.fit(build(), loader)
            times[arm] += timer.times
            print(f"  {name} round {rnd + 1}/{repeats} {arm}: median {statistics.median(timer.times) * 1e3:.1f} ms/step",
                  flush=True)
    base = statistics.median(times["adamw"])
    rows = []
    for arm, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, arm, f"{med * 1e3:.1f}", f"{base / med:.3f}", str(len(ts))])
    return rows


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm"], choices=["minilm", "smollm2", "bert-random"])
    parser.add_argument("--accelerator", default="cpu", help="cpu (default) or gpu")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help="Langevin arms to run besides adamw: off, default, every (default: all)")
    parser.add_argument("--quick", action="store_true", help="batch 8, length 32, 3 steps, 1 round")
    add_results_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.steps, args.repeats = 8, 32, 3, 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    setups = {"minilm": minilm_setup, "smollm2": smollm2_setup, "bert-random": bert_random_setup}
    labels = {"off": "langevin, diagnostics off", "default": "langevin, default diagnostics",
              "every": "langevin, diagnostics every step"}
    only = None if args.arms is None else [labels[a] for a in args.arms]
    rows = []
    for name in args.models:
        rows += run_model(name, setups[name], args.batch, args.length, args.steps, args.warmup, args.repeats, only,
                          accelerator=args.accelerator, precision=args.precision)
    header = ["model", "arm", "median ms/step", "throughput vs AdamW", "timed steps"]
    table = markdown_table(header, rows)
    print(machine_markdown())
    print(f"batch {args.batch}, length {args.length}, {args.threads} threads, {args.repeats} interleaved rounds, "
          f"{args.accelerator}, precision {args.precision}")
    print(table)
    if args.append_results:
        append_results("End-to-end training step: AdamW LoRA vs LangevinLoRA (bench_train_step.py)", table,
                       "python -m benchmarks.bench_train_step " + shlex.join(argv if argv is not None else sys.argv[1:]),
                       notes=f"{args.accelerator}, precision {args.precision}; "
                             f"batch {args.batch}, length {args.length}, {args.threads} threads, {args.steps} timed "
                             f"steps x {args.repeats} interleaved rounds per arm; goals >= 0.99 (off), >= 0.97 "
                             "(default). The timed steps hold no HVP event (every 400 / 4000 sampling steps at the "
                             "default cadence); bench_diagnostics_overhead.py times those and amortises them.",
                       path=args.results)
    return rows


if __name__ == "__main__":
    main()
