"""Benchmark: balancing warm-up and exact gauge moves (THEORY §4), with and without.

For each target and configuration, chains start from LoRA's initialisation (B = 0, A
Kaiming-uniform), take warm-up steps (noise-free GD for the matrix variant, AdamW for MiniLM;
optionally balanced every ``--balance-every`` steps and once when sampling starts), then sample
(LangevinSGD, resp. the LangevinLoRA callback; optionally with orthogonal + GL gauge moves every
``--move-every`` steps). Reported:

- **steps to stationarity**: the smallest sampling length n on a doubling grid at which the window
  [n/2, n] passes the checks of THEORY §3 for every traced observable: split-R-hat < 1.01 over
  the chains and |Geweke z| < 3 (first 10% vs last 50% of the window, chain-averaged trace,
  batch-means variance);
- **ESS per gradient evaluation** of W-observables (the entries of W = BA and W_sqnorm = |W|^2): per-chain
  integrated autocorrelation time (Geyer's initial positive sequence) on the second half of the
  run, ESS/grad = 1/tau (gauge moves need no gradient); the gauge statistic D is shown for context;
- wall time per step relative to plain SGLD (moves cost O(r^2 (in + out)) per module).

Targets (``--target``):

- ``matrix-variant`` (default): vectorised chains of THEORY §5(ii)'s matrix variant, with the small
  interface of :class:`MatrixVariant` (``init``, ``grads``, ``factors``, ``observables``,
  hyperparameters), run by :func:`run`.
- ``minilm``: the MiniLM LoRA recipe (:class:`MiniLMRecipe`), run the way users run it: a
  ``lightning.Trainer`` with the ``LangevinLoRA`` callback around an AdamW LightningModule
  (:class:`recipes.models.LoRAClassifier`: packaged all-MiniLM-L6-v2, PEFT LoRA r=8 on query/value,
  classifier head). AdamW burn-in (with ``BalanceSchedule`` in the balanced configurations), then
  frozen-Adam-preconditioned Langevin sampling at lr x ``--lr-scale`` (with ``GaugeMoves`` in the
  moves configurations). Independent chains are separate Trainer runs (different seeds: LoRA/head
  init, data order, noise), on the same fixed SMS-spam subset. W-observables: the log-odds of a fixed
  held-out probe batch and ``|s B A|_F^2`` of two LoRA modules; ``D = |A|^2 - |B|^2`` of one module,
  whose exact mean under pi_beta is r (in - out)/(beta lam) = 0 for a square query/value module
  (THEORY §3), is shown for context. Same diagnostics and columns as the matrix variant.

``--append-results`` appends the table to benchmarks/RESULTS.md.

Usage, from the repository root: ``python -m benchmarks.bench_gauge [--chains 256] [--steps 12000] [--append-results]``
       ``python -m benchmarks.bench_gauge --target minilm [--chains 4] [--warmup 32] [--steps 192]``
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import time
import warnings

import numpy as np
import torch

from benchmarks._common import add_results_arguments, append_section
from langevin_lora import LangevinSGD, weight_decay_from_prior_std
from langevin_lora.lora.balance import balance_factors
from langevin_lora.lora.gauge import GaugeMoves



class MatrixVariant:
    """THEORY §5(ii), matrix variant: U = |w - bA|^2 + (lam/2)(|A|^2 + b^2), A 1x2, b scalar,
    w = (1, 0.5), lam = 0.5, beta = 4; E[|A|^2 - b^2] = 1/(beta lam) = 0.5."""

    name = "matrix variant of THEORY §5(ii) (A 1x2, b scalar, w=(1,0.5), lam=0.5, beta=4)"
    defaults = dict(chains=256, warmup=400, steps=12000, balance_every=50, move_every=10, gl_step=1.5)
    beta, weight_decay, lr = 4.0, 0.5, 0.005
    w_observables = ("W0", "W1", "W_sqnorm")
    exact_mean_D = 0.5   # (in - out)/(beta lam), THEORY §3

    def __init__(self) -> None:
        self.w = torch.tensor([1.0, 0.5], dtype=torch.float64).view(1, 1, 2)

    def init(self, chains: int, gen: torch.Generator) -> list[torch.nn.Parameter]:
        bound = 1 / math.sqrt(2)   # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in), as PEFT's lora_A
        A = (torch.rand(chains, 1, 2, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        B = torch.zeros(chains, 1, 1, dtype=torch.float64)
        return [torch.nn.Parameter(A), torch.nn.Parameter(B)]

    def grads(self, params) -> None:
        A, B = params
        with torch.no_grad():
            R = self.w - B @ A
            A.grad = -2 * B.mT @ R
            B.grad = -2 * R @ A.mT

    def factors(self, params):
        return [(params[0], params[1])]

    def observables(self, params) -> dict[str, torch.Tensor]:
        A, B = params
        W = (B @ A)[:, 0, :]
        a2, b2 = A.square().sum((-2, -1)), B.square().sum((-2, -1))
        return {"W0": W[:, 0], "W1": W[:, 1], "W_sqnorm": W.square().sum(-1), "D": a2 - b2,
                "U": (self.w[:, 0] - W).square().sum(-1) + self.weight_decay / 2 * (a2 + b2)}


class MiniLMRecipe:
    r"""The MiniLM LoRA recipe as a benchmark target (run through ``lightning.Trainer`` + ``LangevinLoRA``).

    Model: :class:`recipes.models.LoRAClassifier` (packaged all-MiniLM-L6-v2, PEFT LoRA r=8,
    alpha=16 on query/value, trainable classifier head), dropout set to 0 so that the potential
    :math:`U = \hat L + (\lambda/2)|\theta|^2` is a function of the parameters (the minibatch is the only
    gradient noise). Data: a fixed random subset of ``num_train`` deduplicated SMS-spam messages
    (``recipes.assets.read_sms_spam``), tokenised once to ``max_length``; the probe batch is
    ``num_probe`` held-out messages, half spam. Gibbs target of the LoRA tensors:
    :math:`\beta = N/T` (``num_data = num_train``), prior :math:`N(0, \sigma_p^2 I)`, i.e.
    :math:`\lambda = 1/(N\sigma_p^2)` (the recipes' convention); the classifier head stays on AdamW,
    noise-free, unless ``head_temperature > 0`` (the callback's default, as in the recipes).

    Step size: the frozen preconditioner :math:`G` spans ``precond_clamp`` x its median, and every
    direction relaxes at least at the prior's rate :math:`\eta G\lambda` per step while stability needs
    :math:`\eta\lambda_{\max}(G^{1/2}\nabla^2 U G^{1/2}) \lesssim 0.1` (THEORY §2), which includes
    :math:`\eta\lambda\max G`. With :math:`\eta\lambda\max G \approx 0.1` the slowest prior-dominated
    direction relaxes in about 10 x (clamp ratio) steps: ~100 steps with the default clamp (0.3, 3),
    ~1000 with the recipes' (0.1, 10). The temperature does not change these rates (only the spread),
    so the defaults narrow the clamp and pick :math:`\sigma_p`, ``lr_scale`` so that
    :math:`\eta\lambda\max G \approx 0.1` (reported per run).

    W-observables (functions of :math:`W = sBA` and the head only, so gauge invariant): the log-odds
    :math:`\ell_1 - \ell_0` of each probe example, and :math:`|sBA|_F^2` of the modules in
    ``w_modules``. Gauge statistic: :math:`D = |A|^2 - |B|^2 = \operatorname{tr}(AA^\top - B^\top B)` of
    ``d_module``; :math:`E_\pi D = r(\text{in}-\text{out})/(\beta\lambda)`, 0 here (in = out = 384).
    """

    name = ("MiniLM LoRA recipe (all-MiniLM-L6-v2, LoRA r=8 on query/value + classifier head, "
            "SMS spam, lightning.Trainer + LangevinLoRA)")
    defaults = dict(chains=4, warmup=32, steps=192, balance_every=8, move_every=1, gl_step=0.7)
    w_modules = ("layer.0.attention.self.query", "layer.5.attention.self.value")
    d_module = "layer.0.attention.self.query"

    def __init__(self, *, num_train: int = 256, num_probe: int = 8, batch_size: int = 8, max_length: int = 32,
                 lr: float = 1e-3, lr_scale: float = 0.0005, prior_std: float = 0.03, temperature: float = 1.0,
                 precond_clamp: tuple[float, float] = (0.3, 3.0), head_temperature: float = 0.0,
                 data_seed: int = 0) -> None:
        from transformers import AutoTokenizer

        from recipes.assets import minilm_dir, read_sms_spam

        for k, v in (("num_train", num_train), ("num_probe", num_probe), ("batch_size", batch_size),
                     ("max_length", max_length)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"Invalid {k}: {v!r} (expected an integer >= 1)")
        for k, v in (("lr", lr), ("prior_std", prior_std), ("temperature", temperature)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"Invalid {k}: {v!r} (expected a real number > 0)")
        if not 0 < lr_scale <= 1:
            raise ValueError(f"Invalid lr_scale: {lr_scale!r} (expected a real number in (0, 1])")
        self.num_train, self.num_probe, self.batch_size, self.max_length = num_train, num_probe, batch_size, max_length
        self.lr, self.lr_scale, self.prior_std, self.temperature = lr, lr_scale, prior_std, temperature
        self.precond_clamp = tuple(precond_clamp)
        if not (math.isfinite(head_temperature) and head_temperature >= 0):
            raise ValueError(f"Invalid head_temperature: {head_temperature!r} (expected a real number >= 0)")
        self.head_temperature = head_temperature
        self.beta = num_train / temperature
        self.weight_decay = weight_decay_from_prior_std(prior_std, num_train)
        self.w_observables = tuple(f"logodds{i}" for i in range(num_probe)) + \
            tuple(f"W_sqnorm[{m}]" for m in self.w_modules)

        df = read_sms_spam()
        labels = (df["label"] == "spam").to_numpy().astype(np.int64)
        order = np.random.default_rng(data_seed).permutation(len(df))
        if num_train + num_probe > len(df):
            raise ValueError(f"Invalid num_train + num_probe: {num_train + num_probe} (expected <= {len(df)})")
        train_idx = order[:num_train]
        rest = order[num_train:]
        n_spam = num_probe // 2
        probe_idx = np.concatenate([rest[labels[rest] == 1][:n_spam], rest[labels[rest] == 0][:num_probe - n_spam]])
        tok = AutoTokenizer.from_pretrained(minilm_dir())

        def encode(idx):
            enc = tok([df["text"][int(i)] for i in idx], padding="max_length", truncation=True,
                      max_length=max_length, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.as_tensor(labels[idx])}

        self.train = encode(train_idx)
        self.probe = encode(probe_idx)
        self.train_spam_fraction = float(labels[train_idx].mean())
        self.exact_mean_D: float | None = None   # set from the module's shape by observables()

    def loader(self, seed: int) -> torch.utils.data.DataLoader:
        """Shuffled minibatches of the fixed training subset (order seeded per chain)."""
        rows = [{k: v[i] for k, v in self.train.items()} for i in range(self.num_train)]
        return torch.utils.data.DataLoader(rows, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(seed))

    def build(self, seed: int, burn_in_steps: int):
        """A fresh LoRAClassifier (LoRA and head init seeded), AdamW at ``lr`` dropped to
        ``lr * lr_scale`` when sampling starts (the recipes' step schedule), dropout off."""
        from recipes.models import LoRAClassifier

        torch.manual_seed(seed)
        module = LoRAClassifier(model_name="minilm", lr=self.lr, lr_drop_step=burn_in_steps,
                                lr_drop_factor=self.lr_scale)
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return module

    @torch.no_grad()
    def observables(self, module) -> dict[str, float]:
        from langevin_lora import lora_modules

        logits = module(self.probe).double()
        out = {f"logodds{i}": float(v) for i, v in enumerate(logits[:, 1] - logits[:, 0])}
        out["probe_nll"] = float(torch.nn.functional.cross_entropy(logits, self.probe["labels"]))
        for f in lora_modules(module.model):
            short = f.name.split("encoder.", 1)[-1]
            if short in self.w_modules or short == self.d_module:
                A, B = f.A.double(), f.B.double()
                if short in self.w_modules:   # |sBA|^2 = s^2 tr((B^T B)(A A^T)), O(r^2 (in + out))
                    out[f"W_sqnorm[{short}]"] = float(f.scaling ** 2 * ((B.mT @ B) * (A @ A.mT)).sum())
                if short == self.d_module:
                    out["D"] = float(A.square().sum() - B.square().sum())
                    self.exact_mean_D = f.rank * (f.fan_in - f.fan_out) / (self.beta * self.weight_decay)
        return out


class _Recorder:
    """A post-step observer of ``LangevinLoRA`` (traces every ``every``-th Langevin step) and a
    Lightning callback timing the sampling steps (observer time excluded)."""

    def __init__(self, target: MiniLMRecipe, every: int) -> None:
        import lightning as L

        self.target, self.every = target, every
        self.trace: dict[str, list[float]] = {}
        self.obs_time = 0.0
        self.step_times: list[float] = []
        recorder = self

        class _Timer(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                recorder._t0, recorder._obs0 = time.perf_counter(), recorder.obs_time

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if recorder.sampling_started:
                    recorder.step_times.append(time.perf_counter() - recorder._t0
                                               - (recorder.obs_time - recorder._obs0))

        self.timer = _Timer()
        self.sampling_started = False

    def observe(self, trainer, pl_module, callback) -> None:
        self.sampling_started = True
        if callback.langevin_steps % self.every:
            return
        t0 = time.perf_counter()
        for k, v in self.target.observables(pl_module).items():
            self.trace.setdefault(k, []).append(v)
        self.obs_time += time.perf_counter() - t0


def run_minilm(target: MiniLMRecipe, *, chains: int, warmup: int, steps: int, balance_every: int | None,
               balance_at_start: bool, moves: dict | None, seed: int, record_every: int = 1,
               stationarity_start: int | None = None, precond_adapt_steps: int = 0) -> dict:
    """One configuration: ``chains`` independent Trainer runs (seeds ``seed + c``) of ``warmup`` AdamW
    burn-in steps then ``steps`` Langevin steps; traces every ``record_every`` Langevin steps. The
    stationarity grid starts at ``stationarity_start`` steps (default ``steps // 16``), so it ends at
    ``steps`` when ``steps`` is a power-of-two multiple of it."""
    import lightning as L

    from langevin_lora import BalanceSchedule, LangevinLoRA

    traces: dict[str, list] = {}
    step_times, acc, stiff = [], [], []
    for c in range(chains):
        s = seed + c
        module = target.build(s, warmup)
        balance = (BalanceSchedule(every_n_steps=balance_every, at_sampling_start=balance_at_start)
                   if (balance_every or balance_at_start) else None)
        mv = GaugeMoves(seed=s + 7, **moves) if moves is not None else None
        cb = LangevinLoRA(num_data=target.num_train, temperature=target.temperature,
                          weight_decay=target.weight_decay, burn_in_steps=warmup, balance=balance, gauge_moves=mv,
                          head_temperature=target.head_temperature, precond_clamp=target.precond_clamp,
                          diagnostics=False, seed=s, precond_adapt_steps=precond_adapt_steps)
        rec = _Recorder(target, record_every)
        cb.post_step_observers.append(rec.observe)
        trainer = L.Trainer(max_steps=warmup + steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb, rec.timer])
        trainer.fit(module, train_dataloaders=target.loader(s))
        if cb.langevin_steps != steps:
            raise RuntimeError(f"chain {c}: {cb.langevin_steps} Langevin steps taken, {steps} expected")
        for k, v in rec.trace.items():
            traces.setdefault(k, []).append(v)
        step_times += rec.step_times[1:]   # the first sampling step also freezes G
        acc.append(mv.acceptance_rate if mv is not None else math.nan)
        # eta * lambda * max G: the prior's share of eta * lambda_max(G^1/2 Hess U G^1/2) (keep <~ 0.1)
        stiff.append(max(v.lr * v.weight_decay * max(float(G.max()) for G in v.precond)
                         for v in cb.langevin_groups() if v.precond))
    tr = {k: np.asarray(v, dtype=np.float64).T for k, v in traces.items()}   # (records, chains)
    n = next(iter(tr.values())).shape[0]
    second = {k: v[n // 2:] for k, v in tr.items()}
    ess_per_grad = {k: float(np.mean(1.0 / tau_int(v))) / record_every for k, v in second.items()}
    watched = {k: v for k, v in tr.items() if k in target.w_observables or k == "D"}
    sts = {}
    for rmax in (1.01, 1.05):
        start = steps // 16 if stationarity_start is None else stationarity_start
        with np.errstate(all="ignore"), warnings.catch_warnings():   # tiny smoke windows: NaN fails the check
            warnings.simplefilter("ignore", RuntimeWarning)
            r = steps_to_stationarity(watched, start=max(4, start // record_every), rhat_max=rmax)
        sts[rmax] = None if r is None else r * record_every
    sgm = steps_to_exact_gauge_mean(tr["D"], target.exact_mean_D, block=max(1, 8 // record_every))
    d2 = second["D"].mean(0)
    return {"steps_to_stationarity": sts[1.01], "steps_to_stationarity_105": sts[1.05], "ess_per_grad": ess_per_grad,
            "steps_to_gauge_mean": None if sgm is None else sgm * record_every,
            "wall_per_step": float(np.median(step_times)), "mean_D": float(d2.mean()),
            "mean_D_se": float(d2.std(ddof=1) / math.sqrt(d2.size)) if d2.size > 1 else math.nan,
            "D_start": float(tr["D"][0].mean()), "eta_lam_Gmax": float(np.max(stiff)),
            "probe_nll": float(second["probe_nll"].mean()),
            "gl_acceptance": float(np.nanmean(acc)) if moves is not None else math.nan, "traces": tr}


TARGETS = {"matrix-variant": MatrixVariant, "minilm": MiniLMRecipe}


# -- diagnostics (THEORY §3), on traces of shape (steps, chains) ----------------------------------
def split_rhat(x: np.ndarray) -> float:
    n = x.shape[0] // 2
    halves = np.concatenate([x[:n], x[n:2 * n]], axis=1)
    means, variances = halves.mean(0), halves.var(0, ddof=1)
    W, B = variances.mean(), n * means.var(ddof=1)
    return float(np.sqrt(((n - 1) / n * W + B / n) / W))


def geweke_z(x: np.ndarray, batches: int = 20) -> float:
    m = x.mean(1)                          # chain-averaged trace
    n = m.size
    first, last = m[: n // 10], m[n // 2:]

    def bm_var(y):
        k = max(1, y.size // batches)
        yb = y[: k * (y.size // k)].reshape(-1, k).mean(1)
        return yb.var(ddof=1) / yb.size
    return float((first.mean() - last.mean()) / math.sqrt(bm_var(first) + bm_var(last)))


def tau_int(x: np.ndarray) -> np.ndarray:
    """Per-chain integrated autocorrelation time (Geyer's initial positive sequence)."""
    n, c = x.shape
    y = x - x.mean(0)
    f = np.fft.rfft(y, n=2 * n, axis=0)
    acov = np.fft.irfft(f * np.conj(f), axis=0)[:n] / n
    rho = acov / acov[0]
    taus = np.empty(c)
    for j in range(c):
        pairs = rho[: 2 * (n // 2), j].reshape(-1, 2).sum(1)
        k = np.argmax(pairs <= 0) if np.any(pairs <= 0) else pairs.size
        taus[j] = max(1.0, -1 + 2 * pairs[:k].sum())
    return taus


def steps_to_exact_gauge_mean(d: np.ndarray, exact: float, block: int = 20) -> int | None:
    """Step (block-averaged) after which the ensemble mean of D stays within 4.5 standard errors
    of its exact value (in - out)/(beta lam): the relaxation of the gauge, known for any data."""
    n = (d.shape[0] // block) * block
    blocks = d[:n].reshape(-1, block, d.shape[1]).mean(1)          # (n_blocks, chains)
    se = blocks.std(1, ddof=1) / math.sqrt(d.shape[1])
    out = np.nonzero(np.abs(blocks.mean(1) - exact) >= 4.5 * se)[0]
    if out.size and out[-1] == blocks.shape[0] - 1:
        return None
    return int((out[-1] + 1) * block) if out.size else 0


def steps_to_stationarity(traces: dict[str, np.ndarray], start: int = 125, rhat_max: float = 1.01) -> int | None:
    """Smallest n on the grid start, 2 start, ... at which the window [n/2, n] of every trace passes
    split-R-hat < ``rhat_max`` and |Geweke z| < 3 (``None``: no n up to the trace length)."""
    n = start
    total = next(iter(traces.values())).shape[0]
    while n <= total:
        ok = all(split_rhat(t[n // 2:n]) < rhat_max and abs(geweke_z(t[n // 2:n])) < 3 for t in traces.values())
        if ok:
            return n
        n *= 2
    return None


# -- one configuration -------------------------------------------------------------------------
def run(target, *, chains: int, warmup: int, steps: int, balance_every: int | None, balance_at_start: bool,
        moves: GaugeMoves | None, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    params = target.init(chains, gen)
    warm = LangevinSGD(params, lr=target.lr, beta=target.beta, temperature=0.0, weight_decay=target.weight_decay)
    for t in range(1, warmup + 1):                        # noise-free warm-up (GD on U)
        target.grads(params)
        warm.step()
        if balance_every and t % balance_every == 0:
            _balance(target, params)
    if balance_at_start:
        _balance(target, params)
    opt = LangevinSGD(params, lr=target.lr, beta=target.beta, weight_decay=target.weight_decay, seed=seed + 1, guard=False)
    traces: dict[str, list] = {}
    t0 = time.perf_counter()
    for _ in range(steps):
        target.grads(params)
        opt.step()
        if moves is not None:
            moves(target.factors(params), target.beta, target.weight_decay)
        with torch.no_grad():
            for k, v in target.observables(params).items():
                traces.setdefault(k, []).append(v.to(torch.float32))
    wall = time.perf_counter() - t0
    tr = {k: torch.stack(v).numpy().astype(np.float64) for k, v in traces.items()}
    second = {k: v[steps // 2:] for k, v in tr.items()}
    ess_per_grad = {k: float(np.mean(1.0 / tau_int(v))) for k, v in second.items()}
    return {"steps_to_stationarity": steps_to_stationarity(tr), "ess_per_grad": ess_per_grad,
            "steps_to_gauge_mean": steps_to_exact_gauge_mean(tr["D"], target.exact_mean_D),
            "wall_per_step": wall / steps, "mean_D": float(second["D"].mean()),
            "gl_acceptance": moves.acceptance_rate if moves is not None else math.nan}


@torch.no_grad()
def _balance(target, params) -> None:
    for A, B in target.factors(params):
        A_bal, B_bal = balance_factors(A, B)
        A.copy_(A_bal)
        B.copy_(B_bal)


BASE_CONFIGS = ("plain", "balanced warm-up", "gauge moves", "balanced warm-up + moves")


def _configs(args) -> dict[str, dict]:
    configs = {
        "plain": dict(balance_every=None, balance_at_start=False, moves=False),
        "balanced warm-up": dict(balance_every=args.balance_every, balance_at_start=True, moves=False),
        "gauge moves": dict(balance_every=None, balance_at_start=False, moves=True),
        "balanced warm-up + moves": dict(balance_every=args.balance_every, balance_at_start=True, moves=True),
    }
    if getattr(args, "target", None) == "minilm":
        # the frozen G re-measured after burn-in (precond_adapt_steps): separates the effect of
        # balancing from that of the larger G its transported second moments give
        configs["plain + adapt"] = dict(configs["plain"], adapt=True)
        configs["balanced warm-up + adapt"] = dict(configs["balanced warm-up"], adapt=True)
    return configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="matrix-variant", choices=sorted(TARGETS))
    p.add_argument("--chains", type=int, default=None, help="default: 256 (matrix-variant), 4 (minilm)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up / AdamW burn-in steps; default 400 / 32")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; default 12000 / 192")
    p.add_argument("--balance-every", type=int, default=None, help="default 50 / 8 warm-up steps")
    p.add_argument("--move-every", type=int, default=None, help="default 10 / 1 Langevin steps")
    p.add_argument("--gl-step", type=float, default=None, help="default 1.5 / 0.7")
    p.add_argument("--seed", type=int, default=0)
    add_results_arguments(p)
    m = p.add_argument_group("minilm target")
    m.add_argument("--num-train", type=int, default=256, help="fixed SMS-spam training subset (num_data = N)")
    m.add_argument("--num-probe", type=int, default=8, help="held-out probe examples (half spam)")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--max-length", type=int, default=32)
    m.add_argument("--lr", type=float, default=1e-3, help="AdamW burn-in learning rate")
    m.add_argument("--lr-scale", type=float, default=0.0005, help="sampling step size = lr * lr_scale")
    m.add_argument("--prior-std", type=float, default=0.03, help="sigma_p; weight decay lambda = 1/(N sigma_p^2)")
    m.add_argument("--temperature", type=float, default=1.0, help="T; beta = N / T")
    m.add_argument("--precond-clamp", type=float, nargs=2, default=(0.3, 3.0), help="G within [lo, hi] x median")
    m.add_argument("--head-temperature", type=float, default=0.0, help="0: head on AdamW, noise-free (recipe default)")
    m.add_argument("--record-every", type=int, default=1, help="trace every k Langevin steps")
    m.add_argument("--configs", nargs="+", default=None, choices=list(_configs(argparse.Namespace(balance_every=1, target="minilm"))),
                   help="run only these configurations (default: the four without '+ adapt'; ratios are to "
                        "the first when 'plain' is left out)")
    m.add_argument("--precond-adapt-steps", type=int, default=48,
                   help="precond_adapt_steps of the '+ adapt' configurations (Langevin steps)")
    args = p.parse_args(argv)
    for k, v in TARGETS[args.target].defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.target == "minilm":
        return main_minilm(args)
    return main_matrix(args)


def main_matrix(args) -> dict:
    target = TARGETS[args.target]()
    configs = _configs(args)
    results = {}
    for name, cfg in configs.items():
        mv = GaugeMoves(every_n_steps=args.move_every, gl_step=args.gl_step, seed=args.seed + 7) if cfg["moves"] else None
        results[name] = run(target, chains=args.chains, warmup=args.warmup, steps=args.steps,
                            balance_every=cfg["balance_every"], balance_at_start=cfg["balance_at_start"],
                            moves=mv, seed=args.seed)
        print(name, results[name], flush=True)
    base = results["plain"]
    obs = list(target.w_observables) + ["D"]
    head = "| configuration | steps to stationarity (R-hat, Geweke) | steps until E[D] stays within 4.5 SE | " + " | ".join(f"ESS/grad {k}" for k in obs) + \
        " | ESS/grad W (ratio to plain) | wall/step (ratio, noisy) | GL acceptance | mean D (2nd half) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        w_mean = np.mean([r["ess_per_grad"][k] for k in target.w_observables])
        w_base = np.mean([base["ess_per_grad"][k] for k in target.w_observables])
        sts = r["steps_to_stationarity"]
        sgm = r["steps_to_gauge_mean"]
        lines.append(f"| {name} | {sts if sts is not None else f'> {args.steps}'} | "
                     f"{sgm if sgm is not None else f'> {args.steps}'} | "
                     + " | ".join(f"{r['ess_per_grad'][k]:.4f}" for k in obs)
                     + f" | {w_mean / w_base:.2f} | {r['wall_per_step'] / base['wall_per_step']:.2f} | "
                     + (f"{r['gl_acceptance']:.2f}" if not math.isnan(r["gl_acceptance"]) else "-")
                     + f" | {r['mean_D']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.append_results:
        section = (f"\n## bench_gauge.py: balancing warm-up and gauge moves, {target.name}\n\n"
                   f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''}, "
                   f"torch {torch.__version__}, 1 thread (shared machine: compare ratios within this table only). "
                   f"{args.chains} chains, {args.warmup} noise-free warm-up steps from LoRA init (B = 0), "
                   f"{args.steps} SGLD steps (eta = {target.lr}); balancing every {args.balance_every} warm-up "
                   f"steps and at sampling start; moves = orthogonal + GL (gl_step {args.gl_step}) every "
                   f"{args.move_every} steps. ESS on the second half; stationarity: split-R-hat < 1.01 and "
                   f"|Geweke z| < 3 on [n/2, n] for W0, W1, W_sqnorm = |W|^2, D, U. Exact E[D] = 0.5.\n\n{table}\n")
        append_section(section, args.results)
    return results


def main_minilm(args) -> dict:
    t_start = time.perf_counter()
    target = MiniLMRecipe(num_train=args.num_train, num_probe=args.num_probe, batch_size=args.batch_size,
                          max_length=args.max_length, lr=args.lr, lr_scale=args.lr_scale, prior_std=args.prior_std,
                          temperature=args.temperature, precond_clamp=tuple(args.precond_clamp),
                          head_temperature=args.head_temperature, data_seed=args.seed)
    results = {}
    for name, cfg in _configs(args).items():
        if name not in (args.configs or BASE_CONFIGS):
            continue
        moves = dict(every_n_steps=args.move_every, gl_step=args.gl_step) if cfg["moves"] else None
        results[name] = run_minilm(target, chains=args.chains, warmup=args.warmup, steps=args.steps,
                                   balance_every=cfg["balance_every"], balance_at_start=cfg["balance_at_start"],
                                   moves=moves, seed=args.seed, record_every=args.record_every,
                                   precond_adapt_steps=args.precond_adapt_steps if cfg.get("adapt") else 0)
        print(name, {k: v for k, v in results[name].items() if k != "traces"}, flush=True)
    wall = time.perf_counter() - t_start
    base = results["plain"] if "plain" in results else next(iter(results.values()))
    w_obs = list(target.w_observables)
    logodds = [k for k in w_obs if k.startswith("logodds")]
    sq = [k for k in w_obs if k.startswith("W_sqnorm")]

    def fmt(v):
        return f"> {args.steps}" if v is None else str(v)

    head = ["configuration", "steps to stationarity (R-hat < 1.01, Geweke)", "same, R-hat < 1.05",
            "steps until E[D] stays within 4.5 SE of 0", "ESS/grad log-odds (mean of probes)"] + \
        [f"ESS/grad \\|sBA\\|² {k[9:-1]}" for k in sq] + \
        ["ESS/grad D", "ESS/grad W (ratio to plain)", "wall/step (ratio, noisy)", "GL acceptance", "η λ max G",
         "D at sampling start", "mean D, 2nd half (± SE over chains; exact 0)", "probe NLL, 2nd half"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        e = r["ess_per_grad"]
        w_mean = np.mean([e[k] for k in w_obs])
        w_base = np.mean([base["ess_per_grad"][k] for k in w_obs])
        row = [name, fmt(r["steps_to_stationarity"]), fmt(r["steps_to_stationarity_105"]),
               fmt(r["steps_to_gauge_mean"]), f"{np.mean([e[k] for k in logodds]):.4f}"] + \
            [f"{e[k]:.4f}" for k in sq] + \
            [f"{e['D']:.4f}", f"{w_mean / w_base:.2f}", f"{r['wall_per_step'] / base['wall_per_step']:.2f}",
             "-" if math.isnan(r["gl_acceptance"]) else f"{r['gl_acceptance']:.2f}", f"{r['eta_lam_Gmax']:.3f}",
             f"{r['D_start']:.3f}", f"{r['mean_D']:.3f} ± {r['mean_D_se']:.3f}", f"{r['probe_nll']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"wall time {wall:.0f} s; plain sampling step {base['wall_per_step'] * 1e3:.0f} ms", flush=True)
    if args.append_results:
        section = (
            f"\n## bench_gauge.py: balancing warm-up and gauge moves, {target.name}\n\n"
            f"{datetime.date.today().isoformat()}, {platform.machine()}, torch {torch.__version__}, 1 thread "
            f"(shared machine: compare ratios within this table only); whole run {wall:.0f} s, plain sampling "
            f"step {base['wall_per_step'] * 1e3:.0f} ms (median, probe forward excluded).\n\n"
            f"Command: `python -m benchmarks.bench_gauge --target minilm --chains {args.chains} --warmup {args.warmup} "
            f"--steps {args.steps} --balance-every {args.balance_every} --move-every {args.move_every} "
            f"--gl-step {args.gl_step} --num-train {args.num_train} --num-probe {args.num_probe} "
            f"--batch-size {args.batch_size} --max-length {args.max_length} --lr {args.lr} --lr-scale {args.lr_scale} "
            f"--prior-std {args.prior_std} --temperature {args.temperature} --precond-clamp "
            f"{args.precond_clamp[0]} {args.precond_clamp[1]} --head-temperature {args.head_temperature} --record-every {args.record_every} --seed {args.seed}`\n\n"
            f"Setup: {args.chains} independent chains per configuration (separate Trainer runs, seeds "
            f"{args.seed}..{args.seed + args.chains - 1}: LoRA/head init, data order, noise), the same "
            f"{args.num_train} SMS-spam messages ({100 * target.train_spam_fraction:.0f}% spam), batch "
            f"{args.batch_size}, max_length {args.max_length}, dropout off. {args.warmup} AdamW burn-in steps "
            f"(lr {args.lr}, the recipe's decoupled decay 0.01) from LoRA init (B = 0), then {args.steps} Langevin "
            f"steps of the LoRA tensors{' and the head' if args.head_temperature > 0 else ''} at eta = lr x "
            f"{args.lr_scale} = {args.lr * args.lr_scale:g} with the Adam "
            f"preconditioner frozen and clamped to {tuple(args.precond_clamp)} x median; beta = N/T = "
            f"{target.beta:g} (T = {args.temperature}), lambda = 1/(N sigma_p^2) = {target.weight_decay:.4g} "
            f"(sigma_p = {args.prior_std}), coupled"
            + (f"; head at T = {args.head_temperature}" if args.head_temperature > 0 else
               "; the classifier head stays on AdamW at the same lr, noise-free (the recipe's default), so the "
               "LoRA chain targets pi_beta given the slowly moving head")
            + f". Balancing: BalanceSchedule(every_n_steps="
            f"{args.balance_every}, at_sampling_start=True); moves: GaugeMoves(every_n_steps={args.move_every}, "
            f"gl_step={args.gl_step}) (orthogonal + GL, all 12 LoRA modules). Traces every {args.record_every} "
            f"Langevin step(s): log-odds of {args.num_probe} held-out probe messages (half spam), "
            f"\\|sBA\\|_F² of {', '.join(target.w_modules)}, and D = \\|A\\|² − \\|B\\|² of {target.d_module} "
            f"(exact E_π D = r(in − out)/(βλ) = 0, THEORY §3). ESS/grad = 1/τ_int per chain (Geyer), "
            f"averaged over chains, on the second half of the sampling phase, per Langevin gradient "
            f"(burn-in not counted; gauge moves need none); stationarity: smallest n on the grid "
            f"{max(4 * args.record_every, args.steps // 16)}, x2, ... where [n/2, n] passes split-R-hat and "
            f"|Geweke z| < 3 for every traced W-observable and D.\n\n"
            f"{table}\n")
        append_section(section, args.results)
    return results


if __name__ == "__main__":
    main()
