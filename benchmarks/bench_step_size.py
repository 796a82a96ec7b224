"""Benchmark: do the README quick starts (callback and optimizer) survive any user learning rate? (issues 13, 19)

For each model and each learning rate of the user's AdamW, two Lightning runs from the same
initialisation, data order and step budget:

- **AdamW alone** (the user's script without the callback): held-out accuracy at the end;
- **the README quick start as written**: the same script plus
  ``LangevinLoRA(burn_in_steps=40, weight_decay=1e-2, temperature=1.0, sample_every=5, num_samples=4)``
  (every other argument at its default: ``step_size="auto"``, the divergence guard, the default diagnostics), accuracy of the softmax averaged
  over the 4 samples (``bma_predict_proba``).

Recorded per run: the measured :math:`\\lambda_{\\max}(G^{1/2}\\nabla^2 U G^{1/2})`, the chosen step and
its ratio to the user's lr, the measurement's cost (gradient evaluations of the probe set, seconds,
and seconds of one training step for scale), :math:`\\lVert\\theta\\rVert^2` at sampling start and at the
end against the prior's :math:`d/(\\beta\\lambda)`, the diagnostics' :math:`\\beta T_{\\mathrm{virial}}`
(mean of the last logged windows), the guard's cuts (0: never diverged) and whether everything stayed
finite. ``--contrast`` adds the old behaviour (``step_size="optimizer"``: the AdamW lr is the Langevin
step) with the guard on, to show what the guard has to rescue. ``--spread`` measures how the
:math:`\\lambda_{\\max}` estimate varies with the probe size on MiniLM (3 disjoint probes per size).

- **the README optimizer quick start** (issue 19, ``--front-ends optimizer``): ``LangevinAdam`` in a plain
  loop with ``opt.step(closure)`` (:func:`run_optimizer`), samples into a ``SampleBank``, averaged.

Models: ``minilm`` (packaged all-MiniLM-L6-v2), ``tiny-bert`` and ``tiny-gpt2`` (random, built from
configs: no download), ``smollm2`` (packaged SmolLM2-135M as a sequence classifier). Data: the UCI SMS
Spam Collection (stratified, fixed seed): 64 training and 128 held-out messages by default (``--size``).

Usage: ``python -m benchmarks.bench_step_size [--models ...] [--lrs ...] [--size small|full|quick]
[--top-layers N] [--contrast] [--spread] [--threads 1]`` (default: sizes :data:`SMALL`, LoRA on the top 2
layers, ~10 min on one core for the four models and four lrs; ``--quick``: tiny sizes for a smoke test).
``--append-results`` appends the table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import add_results_arguments, append_results, machine_record, markdown_table
from langevin_lora import LangevinLoRA, bma_predict_proba
from langevin_lora.core.guard import DivergenceWarning

MODELS = ("minilm", "tiny-bert", "tiny-gpt2", "smollm2")
LRS = (1e-5, 1e-4, 1e-3, 1e-2)
FULL = dict(n_train=500, n_test=500, batch_size=16, max_length=64, burn_in_steps=40, sample_every=5, num_samples=4)
#: The README quick start's other arguments (``LangevinLoRA(burn_in_steps=..., weight_decay=1e-2,
#: temperature=1.0, sample_every=..., num_samples=...)``); everything else is the default.
QUICK_START = dict(weight_decay=1e-2, temperature=1.0)
QUICK = dict(n_train=64, n_test=64, batch_size=8, max_length=16, burn_in_steps=10, sample_every=2, num_samples=4)
#: The default of the script (the MiniLM quick-start test's sizes): small enough for ~10 min over four models
#: and four learning rates on one core (LoRA on the top 2 layers), with a burn-in long enough for AdamW to
#: arrive (a shorter one compares a chain started before AdamW learnt with AdamW after it).
SMALL = dict(n_train=64, n_test=128, batch_size=8, max_length=16, burn_in_steps=16, sample_every=1, num_samples=4)
SIZES = {"quick": QUICK, "small": SMALL, "full": FULL}


# -- data and models --------------------------------------------------------------------------------
def sms_texts(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[int], list[str], list[int]]:
    from recipes.assets import read_sms_spam
    from recipes.data import stratified_split

    df = read_sms_spam()
    labels = (df["label"] == "spam").astype(int).to_numpy()
    fr = [n_train / len(df), n_test / len(df)]
    tr, te = stratified_split(labels, [*fr, 1.0 - sum(fr)], seed)[:2]
    texts = df["text"].tolist()
    return [texts[i] for i in tr], labels[tr].tolist(), [texts[i] for i in te], labels[te].tolist()


def build_model(kind: str, top_layers: int | None = None) -> tuple[nn.Module, Any]:
    """A PEFT LoRA (r=8, the README's) sequence classifier and its tokenizer; ``top_layers``: LoRA on the
    last that many transformer layers only (a cheaper backward pass, for tests)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes.assets import minilm_dir

    targets, head, extra = ["query", "value"], ["classifier"], {}
    if kind == "smollm2":
        from recipes.causal_lm import smollm2_path

        path = smollm2_path()
        tok = AutoTokenizer.from_pretrained(path)
        tok.pad_token = tok.pad_token or tok.eos_token
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        base.config.pad_token_id = tok.pad_token_id
        targets, head = ["q_proj", "v_proj"], ["score"]
    else:
        tok = AutoTokenizer.from_pretrained(minilm_dir())
        if kind == "minilm":
            base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        elif kind == "tiny-bert":
            from transformers import BertConfig, BertForSequenceClassification

            base = BertForSequenceClassification(BertConfig(
                vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, max_position_embeddings=128, num_labels=2))
        elif kind == "tiny-gpt2":
            from transformers import GPT2Config, GPT2ForSequenceClassification

            base = GPT2ForSequenceClassification(GPT2Config(
                vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=2, n_positions=128, num_labels=2,
                pad_token_id=tok.pad_token_id))
            targets, head, extra = ["c_attn"], ["score"], {"fan_in_fan_out": True}
        else:
            raise ValueError(f"Invalid model: {kind!r} (expected one of {', '.join(MODELS)})")
    if top_layers is not None:
        n_layers = base.config.num_hidden_layers
        extra["layers_to_transform"] = list(range(n_layers - top_layers, n_layers))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=head,
                                            lora_dropout=0.0, **extra))
    model.train()
    return model, tok


class Classifier(L.LightningModule):
    """The user's module: cross-entropy on a PEFT classifier, AdamW at ``lr`` (no schedule)."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        return nn.functional.cross_entropy(self.model(input_ids=ids, attention_mask=mask).logits, y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def _loaders(tok, sizes: dict, seed: int = 0):
    tr_x, tr_y, te_x, te_y = sms_texts(sizes["n_train"], sizes["n_test"], seed)

    def encode(texts, labels):
        enc = tok(texts, padding="max_length", truncation=True, max_length=sizes["max_length"], return_tensors="pt")
        return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))

    g = torch.Generator().manual_seed(seed)
    train = DataLoader(encode(tr_x, tr_y), batch_size=sizes["batch_size"], shuffle=True, generator=g)
    test = DataLoader(encode(te_x, te_y), batch_size=64, shuffle=False)
    return train, test, torch.tensor(te_y)


def _forward(model, batch):
    ids, mask, _ = batch
    return model(input_ids=ids, attention_mask=mask).logits


def _lora_sq(module: nn.Module) -> float:
    return sum(float(p.detach().float().square().sum()) for n, p in module.named_parameters() if "lora_" in n)


# -- one run ----------------------------------------------------------------------------------------
def run_one(kind: str, lr: float, *, quick: bool = False, langevin: bool = True, step_size: str = "auto",
            seed: int = 0, top_layers: int | None = None, sizes: dict | None = None) -> dict[str, Any]:
    """AdamW at ``lr`` on ``kind`` with (``langevin``) or without the quick-start callback; the measurements
    of the module docstring. ``sizes``: a dict overriding entries of :data:`QUICK` (``quick``) or :data:`FULL`."""
    sizes = dict(QUICK if quick else FULL, **(sizes or {}))
    steps = sizes["burn_in_steps"] + sizes["sample_every"] * sizes["num_samples"]
    L.seed_everything(seed, verbose=False)
    model, tok = build_model(kind, top_layers)
    train, test, y_test = _loaders(tok, sizes, seed)
    module = Classifier(model, lr)
    callbacks, rec, cb = [], {"sq": []}, None
    if langevin:
        kwargs = dict(QUICK_START) if step_size == "auto" else dict(QUICK_START, step_size=step_size)
        cb = LangevinLoRA(burn_in_steps=sizes["burn_in_steps"], sample_every=sizes["sample_every"],
                          num_samples=sizes["num_samples"], **kwargs)
        cb.step_observers.append(lambda tr, pl, c: rec["sq"].append(_lora_sq(pl)))
        callbacks.append(cb)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DivergenceWarning)
        trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                            default_root_dir=root, max_epochs=-1)
        trainer.fit(module, train)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"model": kind, "lr": lr, "mode": step_size if langevin else "AdamW alone", "wall": wall,
                           "steps": steps, "divergence_warnings": sum(issubclass(w.category, DivergenceWarning)
                                                                      for w in caught)}
    module.eval()
    try:
        if cb is not None:
            probs = bma_predict_proba(module.model, cb.sample_bank, test, forward_fn=_forward)
        else:
            with torch.no_grad():
                probs = torch.cat([torch.softmax(_forward(module.model, b).float(), -1) for b in test])
        out["acc"] = float((probs.argmax(-1) == y_test).float().mean())
        out["finite_probs"] = True
    except FloatingPointError:
        out["acc"], out["finite_probs"] = math.nan, False
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    out["finite"] = all(bool(torch.isfinite(p).all()) for p in params) and out["finite_probs"]
    if cb is None:
        return out
    d = sum(p.numel() for p in params)
    out.update(num_samples=sizes["num_samples"], samples=len(cb.sample_bank), cuts=cb.guard.cuts,
               lambda_max=cb.auto_step.lambda_max or math.nan, grad_evals=cb.auto_step.grad_evals,
               measure_seconds=cb.auto_step.seconds, step_size=cb._base_step or lr,
               theta_sq_start=rec["sq"][0] if rec["sq"] else math.nan, theta_sq_end=_lora_sq(module),
               prior_spread=d / (cb.beta * cb.weight_decay), langevin_steps=cb.langevin_steps,
               weight_decay=cb.weight_decay)
    out["sec_per_step"] = (wall - out["measure_seconds"]) / steps
    diag = cb.diagnostics if not isinstance(cb.diagnostics, bool) else None
    virial = diag.traces.get("virial_temperature", []) if diag is not None else []
    out["virial"] = float(np.mean(virial[-max(1, len(virial) // 3):])) if virial else math.nan
    return out


def spread(sizes=(8, 32, 128), reps: int = 3, lr: float = 2e-4, seed: int = 0) -> list[dict[str, Any]]:
    """lambda_max on disjoint probes of each size after 40 AdamW steps on MiniLM (G frozen as the callback
    freezes it, the default prior), the way LangevinLoRA measures it (first, cold measurement)."""
    from langevin_lora.core.curvature import RngSnapshot
    from langevin_lora.core.engine import LangevinEngine
    from langevin_lora.core.functional import adam_inverse_scale
    from langevin_lora.core.step_size import auto_step_size
    from langevin_lora.core.temperature import DEFAULT_PRIOR_STD, weight_decay_from_prior_std

    L.seed_everything(seed, verbose=False)
    model, tok = build_model("minilm")
    n_probe = sum(sizes) * reps
    train, _, _ = _loaders(tok, dict(FULL, n_test=n_probe), seed)
    probe_x, probe_m, probe_y = _loaders(tok, dict(FULL, n_test=n_probe), seed)[1].dataset.tensors
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    it = iter(train)
    for _ in range(FULL["burn_in_steps"]):
        ids, mask, y = next(it)
        opt.zero_grad()
        nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).backward()
        opt.step()
    eng = LangevinEngine()
    raw = [(i, adam_inverse_scale(opt.state[p]["exp_avg_sq"], float(opt.state[p]["step"]), 0.999, 1e-8),
            (0.01, 100.0)) for i, p in enumerate(params)]
    eng.freeze(raw)
    G = eng.preconditioners(range(len(params)))
    lam = weight_decay_from_prior_std(DEFAULT_PRIOR_STD, FULL["n_train"])
    rows, start = [], 0
    snapshot = RngSnapshot([])
    for size in sizes:
        values, evals, secs = [], [], []
        for r in range(reps):
            sl = slice(start, start + size)
            start += size

            def closure(sl=sl):
                out = []
                for a in range(sl.start, sl.stop, 32):
                    b = min(a + 32, sl.stop)
                    logits = model(input_ids=probe_x[a:b], attention_mask=probe_m[a:b]).logits
                    out.append(nn.functional.cross_entropy(logits, probe_y[a:b], reduction="sum"))
                return sum(out) / size

            t = time.perf_counter()
            with snapshot.replaying() as wrap:
                est = auto_step_size(wrap(closure), params, precond=G, weight_decay=lam,
                                     generator=torch.Generator().manual_seed(r))
            secs.append(time.perf_counter() - t)
            values.append(est.lambda_max)
            evals.append(est.grad_evals)
        rows.append({"size": size, "mean": float(np.mean(values)), "rel_sd": float(np.std(values, ddof=1) / np.mean(values)),
                     "values": values, "grad_evals": float(np.mean(evals)), "seconds": float(np.mean(secs)),
                     "prior_floor": lam * max(float(g.max()) for g in G)})
    return rows


# -- main -------------------------------------------------------------------------------------------
#: LangevinAdam's behaviour before issue 19 (``--contrast``): ``lr`` is the Langevin step, overdamped, prior at 0,
#: no guard.
PRE19_ADAM = dict(step_size="lr", friction=None, prior_centre=None, guard=False)


def run_optimizer(kind: str, lr: float, *, seed: int = 0, top_layers: int | None = None,
                  sizes: dict | None = None, legacy: bool = False) -> dict[str, Any]:
    """The README *optimizer* quick start as written, in a plain loop: ``LangevinAdam(lora_param_groups(model),
    lr=lr, num_data=N, weight_decay=weight_decay_from_prior_std(0.1, N), burn_in_steps=burn_in_steps, seed=0)``
    stepped with ``opt.step(closure)`` (every other argument at its default: measured step, kinetic
    ``friction="auto"``, prior centred where sampling starts, guard on); a sample every ``sample_every``
    sampling steps into a :class:`~langevin_lora.posterior.bank.SampleBank`, accuracy of the averaged softmax."""
    from langevin_lora import LangevinAdam, lora_param_groups, weight_decay_from_prior_std
    from langevin_lora.posterior.bank import SampleBank

    sizes = dict(FULL, **(sizes or {}))
    steps = sizes["burn_in_steps"] + sizes["sample_every"] * sizes["num_samples"]
    L.seed_everything(seed, verbose=False)
    model, tok = build_model(kind, top_layers)
    train, test, y_test = _loaders(tok, sizes, seed)
    n = sizes["n_train"]
    opt = LangevinAdam(lora_param_groups(model), lr=lr, num_data=n, weight_decay=weight_decay_from_prior_std(0.1, n),
                       burn_in_steps=sizes["burn_in_steps"], seed=0, **(PRE19_ADAM if legacy else {}))
    bank = SampleBank(num_samples=sizes["num_samples"])
    sq, t, sampled = [], 0, 0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DivergenceWarning)
        while t < steps:
            for batch in train:
                def closure(batch=batch):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(_forward(model, batch), batch[2])
                    loss.backward()
                    return loss
                if opt.sampling and not sq:
                    sq.append(_lora_sq(model))
                opt.step(closure)
                t += 1
                if opt.sampling and t > sizes["burn_in_steps"]:
                    sampled += 1
                    if sampled % sizes["sample_every"] == 0:
                        bank.add(model, t)
                if t >= steps:
                    break
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"model": kind, "lr": lr, "mode": "optimizer: lr (before 19)" if legacy else "optimizer: auto",
                           "wall": wall, "steps": steps,
                           "divergence_warnings": sum(issubclass(w.category, DivergenceWarning) for w in caught)}
    model.eval()
    try:
        probs = bma_predict_proba(model, bank, test, forward_fn=_forward)
        out["acc"], out["finite_probs"] = float((probs.argmax(-1) == y_test).float().mean()), True
    except (FloatingPointError, ValueError):
        out["acc"], out["finite_probs"] = math.nan, False
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    out["finite"] = all(bool(torch.isfinite(p).all()) for p in params) and out["finite_probs"]
    lora = opt.param_groups[0]
    d = sum(p.numel() for p in params)
    out.update(num_samples=sizes["num_samples"], samples=len(bank), cuts=opt.guard.cuts if opt.guard else 0,
               lambda_max=opt.auto_step.lambda_max or math.nan, grad_evals=opt.auto_step.grad_evals,
               measure_seconds=opt.auto_step.seconds, step_size=opt.group_step(lora),
               theta_sq_start=sq[0] if sq else math.nan, theta_sq_end=_lora_sq(model),
               prior_spread=d / (opt.group_beta(lora) * lora["weight_decay"]), langevin_steps=sampled,
               weight_decay=lora["weight_decay"], virial=math.nan)
    out["sec_per_step"] = (wall - out["measure_seconds"]) / steps
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def _notes(sizes: dict, top_layers: int | None) -> str:
    steps = sizes["burn_in_steps"] + sizes["sample_every"] * sizes["num_samples"]
    return (f"Quick start as written: LangevinLoRA(burn_in_steps={sizes['burn_in_steps']}, weight_decay=1e-2, "
            f"temperature=1.0, sample_every={sizes['sample_every']}, num_samples={sizes['num_samples']}) + the "
            f"user's AdamW, {steps} steps, batch {sizes['batch_size']}, length {sizes['max_length']}, "
            f"{sizes['n_train']} SMS messages (held-out {sizes['n_test']}), LoRA r=8 on "
            f"{'all' if top_layers is None else f'the top {top_layers}'} layers. `acc AdamW`: the same script "
            "without the callback. `cost`: gradient evaluations of the probe set (64 examples) spent measuring "
            "λ_max (all measurements), and their wall time; `s per step`: one training step, for scale. "
            "`guard cuts` 0 = never diverged; β·T_virial: the live diagnostics' last windows (1 at stationarity; "
            "these runs are far too short to get there). `optimizer: auto` rows: the README optimizer quick start, "
            f"LangevinAdam(lora_param_groups(model), lr=<user lr>, num_data={sizes['n_train']}, "
            "weight_decay=weight_decay_from_prior_std(0.1, N), burn_in_steps=<burn-in>) stepped with "
            "opt.step(closure) in a plain loop (measured kinetic step, prior centred where sampling starts, guard "
            "on); η is its time step h, λ_max measured by finite differences of the closure's gradients.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    ap.add_argument("--contrast", action="store_true", help="also run the old behaviour: step_size='optimizer' (callback), LangevinAdam with lr as the step and no guard (optimizer)")
    ap.add_argument("--spread", action="store_true", help="lambda_max spread vs probe size on MiniLM")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="data and step sizes (default small)")
    ap.add_argument("--quick", action="store_true", help="--size quick (smoke test)")
    ap.add_argument("--top-layers", type=int, default=2, help="LoRA on the last N transformer layers only "
                                                              "(0: all layers; default 2)")
    ap.add_argument("--threads", type=int, default=1)
    add_results_arguments(ap)
    ap.add_argument("--front-ends", nargs="+", default=["callback", "optimizer"], choices=["callback", "optimizer"],
                    help="the README's callback quick start, its optimizer quick start (LangevinAdam in a plain "
                         "loop), or both (default)")
    ap.add_argument("--sample-every", type=int, default=None, help="override the size's sample_every (more "
                                                                   "sampling steps per run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = dict(SIZES["quick" if args.quick else args.size])
    if args.sample_every:
        sizes["sample_every"] = args.sample_every
    top_layers = args.top_layers or None
    rows, results = [], {"runs": [], "spread": []}
    for kind in args.models:
        for lr in args.lrs:
            one = dict(sizes=sizes, top_layers=top_layers)
            base = run_one(kind, lr, langevin=False, **one)
            runs = [run_one(kind, lr, **one)] if "callback" in args.front_ends else []
            if args.contrast and "callback" in args.front_ends:
                runs.append(run_one(kind, lr, step_size="optimizer", **one))
            if "optimizer" in args.front_ends:
                runs.append(run_optimizer(kind, lr, **one))
                if args.contrast:
                    runs.append(run_optimizer(kind, lr, legacy=True, **one))
            for r in runs:
                r["acc_adamw"] = base["acc"]
                results["runs"].append(r)
                row = [kind, _fmt(lr), r["mode"], _fmt(base["acc"]), _fmt(r["acc"]), _fmt(r["lambda_max"]),
                       _fmt(r["step_size"]), _fmt(lr / r["step_size"]), f"{r['grad_evals']} / {r['measure_seconds']:.0f} s",
                       _fmt(r["sec_per_step"]), f"{r['theta_sq_start']:.3g} → {r['theta_sq_end']:.3g}",
                       _fmt(r["prior_spread"]), _fmt(r["virial"]), str(r["cuts"]), "yes" if r["finite"] else "NO"]
                rows.append(row)
                print("| " + " | ".join(row) + " |", flush=True)
    header = ["model", "user lr", "step_size", "acc AdamW", "acc quick start (BMA)", "λ_max", "η", "lr/η",
              "cost: grad evals / s", "s per step", "|θ|² start → end", "d/(βλ)", "β·T_virial", "guard cuts",
              "finite"]
    table = markdown_table(header, rows) if rows else ""
    if args.spread:
        srows = []
        for r in spread():
            results["spread"].append(r)
            srows.append([str(r["size"]), _fmt(r["mean"]), f"{100 * r['rel_sd']:.1f}%",
                          ", ".join(f"{v:.4g}" for v in r["values"]), _fmt(r["grad_evals"]), f"{r['seconds']:.0f}",
                          _fmt(r["prior_floor"])])
            print(srows[-1], flush=True)
        table += "\n\nλ_max vs probe size (MiniLM after 40 AdamW steps at lr 2e-4, 3 disjoint probes each):\n\n"
        table += markdown_table(["probe examples", "mean λ_max", "rel. sd", "values", "grad evals", "s",
                                 "prior floor λ·max G"], srows)
    print(table)
    if args.append_results and table:
        cmd = "python -m benchmarks.bench_step_size " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results("Automatic step size and divergence guard: the README quick start at any user lr "
                       "(bench_step_size.py)", table, cmd.strip(), machine=machine_record(),
                       path=args.results,
                       notes=_notes(sizes, top_layers))
    return results


if __name__ == "__main__":
    main()
