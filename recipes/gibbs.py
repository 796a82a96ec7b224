r"""The seed paper's objects, sampled as many chains at once: watch the law relax to Gibbs.

    python -m recipes.gibbs fit --config recipes/configs/gibbs_attention.yaml
    python -m recipes.gibbs fit --config recipes/configs/gibbs_digits.yaml

Two targets :math:`\pi_\beta \propto e^{-\beta U}`, :math:`U = \hat L + \tfrac{\lambda}{2}\lVert\theta\rVert^2`,
each run as ``num_chains`` independent chains batched along a leading tensor dimension (one
optimizer steps all of them; the summed loss gives each chain the gradient of its own
:math:`\hat L`):

- ``attention``: regression with a single attention layer (THEORY §5(iii)): scalar tokens
  :math:`x_{ij}`, query = last token, :math:`\theta = (q, k, v)`,
  :math:`f(x) = v\sum_j \operatorname{softmax}_j(q k\, x_{in} x_{ij})\, x_{ij}`, data from
  :math:`qk = 2, v = 1` with noise sd 0.1, :math:`N = 20` sequences of 4 tokens.
- ``digits``: LoRA (rank ``lora_r`` on both layers) of a depth-2 ReLU network
  64→``hidden``→10 on scikit-learn's digits; the base network is pre-trained briefly on
  ``pretrain_examples`` examples (frozen), the adapters are then sampled on the training split
  with the mean cross-entropy, :math:`\beta = N/T`.

Full-batch gradients (no minibatch noise), so the centred virial temperature must read
:math:`\beta T_{\mathrm{vir}} = 1` up to the step bias. The chains are kinetic (``friction``, BAOAB,
THEORY §2b) by default: both targets have slow directions set by the prior alone (curvature
:math:`\lambda`: along :math:`qk = \text{const}` for the attention layer, the directions the data do
not pin down for the LoRA), which the overdamped chain relaxes at :math:`\eta\lambda` per step
(~500 and ~2000 steps per e-fold at the configs' steps) and the kinetic one at
:math:`\approx h\sqrt\lambda` (~6 and ~28).

**Verdict.** ``pass`` when the rank-normalised split-:math:`\hat R` (arviz-stats, the larger of bulk and
folded) of :math:`U` and of the observable over the second half is below 1.01, ArviZ's threshold
(Vehtari et al. 2021; the classic split-:math:`\hat R` < 1.05 before issue 20), and the virial
temperature is within :math:`\max(0.1, 4.5\,\mathrm{se})` of 1. Two facts about these checks, measured
on the attention target with the classic split-:math:`\hat R` (``benchmarks/RESULTS.md``):

- split-:math:`\hat R` of *stationary* chains exceeds 1 by about :math:`1/(2\,\mathrm{ESS})`, ESS the
  effective sample size of one split half-chain: 64 overdamped chains started *from the posterior
  itself* read 1.07–1.08 for :math:`qk` after 8000 steps (:math:`\tau_{int} \approx 300`). A failing
  :math:`\hat R` with a small ``ess_per_split_chain`` therefore says "too few effective samples per
  chain to judge", not "not stationary"; the summary says so (``note``).
- the virial is centred on the mean of :math:`\theta` over all chains and the second half (a constant
  :math:`c` keeps :math:`\mathbb E[(\theta - c)\cdot\nabla U] = d/\beta`). Centring each chain on its own
  mean biases it low by about :math:`\tau/n` (the chain mean correlates with each step): 0.87 and
  0.77 instead of 1.00 on the digits LoRA at :math:`\tau \approx 70` and 120, :math:`n = 750`.

At the end of ``fit`` the module writes into ``trainer.default_root_dir``: ``gibbs_summary.json``
(split-:math:`\hat R`, effective sample sizes, Geweke z, virial temperature, the fitted relaxation
rates) and ``gibbs_relaxation.png``
(the across-chain mean of each observable against time, and
:math:`|\bar f_t - f_\infty|` on a log scale with its exponential fit, :math:`f_\infty` the
average over the second half of all chains).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from langevin_lora.core.functional import check_friction

__all__ = ["GibbsData", "GibbsChains", "attention_data", "relaxation_fit", "main"]

TASKS = ("attention", "digits")


def attention_data(num_sequences: int = 20, seq_len: int = 4, qk: float = 2.0, v: float = 1.0,
                   noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Tokens ``x (N, n)`` (standard normal) and targets ``y (N,)`` of the attention regression."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_sequences, seq_len, generator=g, dtype=torch.float64)
    y = attention_forward(torch.tensor([[qk, 1.0, v]], dtype=torch.float64), x)[0]
    return x, y + noise * torch.randn(num_sequences, generator=g, dtype=torch.float64)


def attention_forward(theta: Tensor, x: Tensor) -> Tensor:
    r""":math:`f_c(x_i) = v_c \sum_j \operatorname{softmax}_j(q_c k_c x_{i,n} x_{ij}) x_{ij}` for
    chains ``theta (C, 3)`` and tokens ``x (N, n)``; returns ``(C, N)``."""
    q, k, v = theta[:, 0, None, None], theta[:, 1, None, None], theta[:, 2, None]
    scores = q * k * x[None, :, -1:] * x[None]
    return v * (torch.softmax(scores, -1) * x[None]).sum(-1)


class _Repeat(IterableDataset):
    """Yields the full batch forever (the Trainer stops at ``max_steps``)."""

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self.tensors = tensors

    def __iter__(self):
        while True:
            yield self.tensors


class GibbsData(LightningDataModule):
    """Full-batch data of the two targets.

    Args:
        task: ``attention`` or ``digits``.
        num_train: digits training examples (the rest of the 1,797 is held out).
        pretrain_examples: digits examples used to pre-train the frozen base network.
        seed: data seed (the attention data and the digits split).
    """

    def __init__(self, task: str = "attention", num_train: int = 1000, pretrain_examples: int = 300,
                 seed: int = 0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"Invalid task: {task!r} (expected one of {', '.join(TASKS)})")
        self.save_hyperparameters()
        self.train: tuple[Tensor, Tensor] | None = None
        self.pretrain: tuple[Tensor, Tensor] | None = None
        self.test: tuple[Tensor, Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if self.hparams.task == "attention":
            self.train = attention_data(seed=self.hparams.seed)
            return
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
        n, p = self.hparams.num_train, self.hparams.pretrain_examples
        if n + p >= len(y):
            raise ValueError(f"Invalid num_train/pretrain_examples: {n} + {p} must be < {len(y)}")
        self.pretrain = (x[perm[:p]], y[perm[:p]])
        self.train = (x[perm[p:p + n]], y[perm[p:p + n]])
        self.test = (x[perm[p + n:]], y[perm[p + n:]])

    @property
    def num_train_examples(self) -> int:
        self.setup()
        return len(self.train[1])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_Repeat(self.train), batch_size=None)


def relaxation_fit(mean_trace: np.ndarray, tail_fraction: float = 0.5) -> dict[str, float]:
    r"""Exponential approach :math:`|\bar f_t - f_\infty| \approx C e^{-\gamma t}` of an
    across-chain mean trace: :math:`f_\infty` is the mean of the last ``tail_fraction``; the fit
    is least squares of :math:`\log|\bar f_t - f_\infty|` on :math:`t` over the steps before the
    gap first falls below 3 tail standard deviations (the noise floor)."""
    x = np.asarray(mean_trace, dtype=float)
    tail = x[int(len(x) * (1 - tail_fraction)):]
    f_inf, floor = float(tail.mean()), 3.0 * float(tail.std()) + 1e-12
    gap = np.abs(x - f_inf)
    below = np.flatnonzero(gap < floor)
    end = int(below[0]) if below.size else len(x)
    if end < 3:
        return {"f_inf": f_inf, "rate": math.nan, "initial_gap": float(gap[0]), "fit_steps": end}
    t = np.arange(end)
    slope, intercept = np.polyfit(t, np.log(gap[:end]), 1)
    return {"f_inf": f_inf, "rate": float(-slope), "initial_gap": float(gap[0]), "fit_steps": end,
            "fit_intercept": float(intercept)}


class GibbsChains(LightningModule):
    r"""``num_chains`` Langevin chains on one of the two targets.

    Args:
        task: ``attention`` or ``digits`` (must match the data).
        num_chains: chains batched along the leading dimension.
        sampler: ``sgld`` (:class:`~langevin_lora.LangevinSGD`) or ``adam``
            (:class:`~langevin_lora.LangevinAdam`: ``burn_in_steps`` of Adam, then frozen-preconditioner
            Langevin).
        lr: step size: :math:`\eta` (overdamped) or the time step :math:`h` (kinetic; stable for
            :math:`h\sqrt{\lambda_{\max}} < 2`, the configs use :math:`0.5/\sqrt{\lambda_{\max}}`).
        friction: ``None`` (overdamped Langevin), :math:`\gamma > 0` or ``"auto"`` (kinetic Langevin,
            BAOAB; the configs use :math:`\gamma = 2\sqrt\lambda`, critical damping of the prior-dominated modes).
        beta: :math:`\beta_0` for ``attention`` (the seed paper's direct form); ``None`` uses
            ``num_data`` (:math:`\beta = N/T`, the digits posterior).
        temperature: :math:`T`.
        weight_decay: :math:`\lambda`, the Gaussian prior.
        burn_in_steps: Adam steps before sampling (``adam`` only).
        init_scale: the attention chains start at :math:`\theta_0 \sim N(\mu_0, s^2 I)`, :math:`\mu_0` = ``init_mean``;
            digits chains start with :math:`B = 0` and :math:`A \sim N(0, s^2)`, as LoRA does.
        lora_r, lora_alpha, hidden, pretrain_steps: the digits network.
        seed: seed of the chains' initialisation and of the noise.
    """

    def __init__(self, task: str = "attention", num_chains: int = 64, sampler: str = "sgld", lr: float = 0.02,
                 beta: float | None = 50.0, temperature: float = 1.0, weight_decay: float = 0.1,
                 burn_in_steps: int = 0, init_scale: float = 0.5, init_mean: tuple[float, float, float] = (1.0, 1.0, 0.0), lora_r: int = 2, lora_alpha: float = 2.0,
                 hidden: int = 32, pretrain_steps: int = 150, seed: int = 0,
                 friction: float | str | None = None) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"Invalid task: {task!r} (expected one of {', '.join(TASKS)})")
        if sampler not in ("sgld", "adam"):
            raise ValueError(f"Invalid sampler: {sampler!r} (expected sgld or adam)")
        if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 2:
            raise ValueError(f"Invalid num_chains: {num_chains!r} (expected an integer >= 2)")
        check_friction(friction)
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(seed)
        C = num_chains
        if task == "attention":
            init = torch.tensor(list(init_mean), dtype=torch.float64) + init_scale * torch.randn(C, 3, generator=g,
                                                                                               dtype=torch.float64)
            self.theta = nn.Parameter(init)
        else:
            r = lora_r
            self.A1 = nn.Parameter(init_scale * torch.randn(C, r, 64, generator=g) / 8.0)
            self.B1 = nn.Parameter(torch.zeros(C, hidden, r))
            self.A2 = nn.Parameter(init_scale * torch.randn(C, r, hidden, generator=g) / math.sqrt(hidden))
            self.B2 = nn.Parameter(torch.zeros(C, 10, r))
            self.base = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
            self.base.requires_grad_(False)
        self.traces: dict[str, list[np.ndarray]] = {"U": [], "obs": []}
        self._vir: dict[str, Any] | None = None
        self.num_data: int | None = None
        self.summary: dict[str, Any] = {}

    # -- model -----------------------------------------------------------------------------------
    def lora_tensors(self) -> list[Tensor]:
        return [self.theta] if self.hparams.task == "attention" else [self.A1, self.B1, self.A2, self.B2]

    def per_chain_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean training loss :math:`\\hat L_c` of every chain, shape ``(C,)``."""
        if self.hparams.task == "attention":
            return 0.5 * ((attention_forward(self.theta, x) - y[None]) ** 2).mean(-1)
        return nn.functional.cross_entropy(self.digits_logits(x).transpose(1, 2), y[None].expand(len(self.A1), -1),
                                           reduction="none").mean(-1)

    def digits_logits(self, x: Tensor) -> Tensor:
        s = self.hparams.lora_alpha / self.hparams.lora_r
        l1, l2 = self.base[0], self.base[2]
        w1 = l1.weight[None] + s * self.B1 @ self.A1
        w2 = l2.weight[None] + s * self.B2 @ self.A2
        h = torch.relu(torch.einsum("nd,chd->cnh", x, w1) + l1.bias)
        return torch.einsum("cnh,coh->cno", h, w2) + l2.bias

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm.hparams.task != self.hparams.task:
            raise ValueError(f"Invalid task: model task {self.hparams.task!r} but data task {dm.hparams.task!r}")
        dm.setup()
        self.num_data = dm.num_train_examples
        if self.hparams.task == "digits" and not getattr(self, "_pretrained", False):
            self._pretrain(*dm.pretrain)
            self._pretrained = True

    def _pretrain(self, x: Tensor, y: Tensor) -> None:
        """A few full-batch Adam steps of the base network on a disjoint pre-training set."""
        torch.manual_seed(self.hparams.seed)
        for m in self.base:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        params = list(self.base.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(self.hparams.pretrain_steps):
            opt.zero_grad()
            nn.functional.cross_entropy(self.base(x), y).backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    @property
    def beta(self) -> float:
        base = self.hparams.beta if self.hparams.beta is not None else self.num_data
        return math.inf if self.hparams.temperature == 0 else base / self.hparams.temperature

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = self.per_chain_loss(x, y)
        with torch.no_grad():
            sq = sum((t.double() ** 2).flatten(1).sum(1) for t in self.lora_tensors())
            u = losses.double() + 0.5 * self.hparams.weight_decay * sq
            self.traces["U"].append(u.cpu().numpy())
            self.traces["obs"].append(self._observable().cpu().numpy())
        self.log("train/U_mean", u.mean(), prog_bar=True)
        return losses.sum()

    def _observable(self) -> Tensor:
        if self.hparams.task == "attention":
            return self.theta[:, 0] * self.theta[:, 1]  # q·k
        return sum((t.double() ** 2).flatten(1).sum(1) for t in self.lora_tensors())  # |θ|²

    @torch.no_grad()
    def on_before_optimizer_step(self, optimizer) -> None:
        r"""Accumulate, over the second half of the run, per chain: :math:`\sum_t \theta_t\cdot F_t`,
        :math:`\sum_t F_t` and :math:`\sum_t\theta_t` with :math:`F = g + \lambda\theta`, so that the
        virial can be centred afterwards on the mean :math:`c` of all chains over that segment:
        :math:`\sum_t (\theta_t - c)\cdot F_t = \sum_t \theta_t\cdot F_t - c\cdot\sum_t F_t`.
        (A chain's own mean, or a short moving window, correlates with its steps and biases the
        virial low by about :math:`\tau/n` for the slow directions, e.g. along :math:`qk = \text{const}`;
        the mean over :math:`C` chains divides that by :math:`C`.)"""
        inner = getattr(optimizer, "optimizer", optimizer)
        if not getattr(inner, "sampling", True) or self.trainer.global_step < self.trainer.max_steps // 2:
            return
        theta = torch.cat([p.detach().double().flatten(1) for p in self.lora_tensors()], 1)
        force = torch.cat([p.grad.double().flatten(1) for p in self.lora_tensors()], 1) + self.hparams.weight_decay * theta
        if self._vir is None:
            self._vir = {"tf": torch.zeros(len(theta), dtype=torch.float64, device=theta.device),
                         "f": torch.zeros_like(theta), "t": torch.zeros_like(theta), "n": 0}
        v = self._vir
        v["tf"] += (theta * force).sum(1)
        v["f"] += force
        v["t"] += theta
        v["n"] += 1

    def virial_per_chain(self) -> np.ndarray:
        """:math:`\beta T_{\mathrm{vir}}` of every chain over the second half (1 at stationarity), centred
        on the mean of :math:`\theta` over all chains and steps of that half."""
        v = self._vir
        n, d = v["n"], v["t"].shape[1]
        centre = v["t"].sum(0) / (n * len(v["t"]))
        centred = v["tf"] - (centre[None] * v["f"]).sum(1)
        return (centred / (n * d) * self.beta).cpu().numpy()

    def configure_optimizers(self):
        from langevin_lora import LangevinAdam, LangevinSGD

        hp = self.hparams
        kw = dict(lr=hp.lr, temperature=hp.temperature, weight_decay=hp.weight_decay, seed=hp.seed,
                  friction=hp.friction)
        kw.update(beta=hp.beta) if hp.beta is not None else kw.update(num_data=self.num_data)
        params = self.lora_tensors()
        if hp.sampler == "sgld":
            return LangevinSGD(params, **kw)
        # the recipe's measured behaviour (before issue 19's defaults): lr is the step, prior centred at 0
        return LangevinAdam(params, burn_in_steps=hp.burn_in_steps, prior_centre=None, step_size="lr", **kw)

    # -- summary ---------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        from langevin_lora.diagnostics import effective_sample_size, geweke_z, split_rhat

        U = np.stack(self.traces["U"], 1)      # (C, steps)
        obs = np.stack(self.traces["obs"], 1)
        half = U.shape[1] // 2
        s: dict[str, Any] = {"task": self.hparams.task, "num_chains": U.shape[0], "steps": U.shape[1],
                             "beta": self.beta, "lr": self.hparams.lr, "weight_decay": self.hparams.weight_decay,
                             "friction": self.hparams.friction}
        # R-hat needs 4 draws per chain in the second half, and no more chains than draws
        enough = U.shape[1] - half >= max(4, U.shape[0])
        s["split_rhat_U"] = split_rhat(U[:, half:]) if enough else math.nan
        s["split_rhat_obs"] = split_rhat(obs[:, half:]) if enough else math.nan
        if not enough:
            s["note"] = (f"{U.shape[1]} steps are too few to judge stationarity (R-hat needs >= 8, and a second half "
                         "at least as long as the number of chains)")
        else:   # effective draws per split half-chain: split-R-hat of stationary chains is ~ 1 + 1/(2 ESS)
            for key, tr in (("U", U), ("obs", obs)):
                s[f"ess_per_split_chain_{key}"] = effective_sample_size(tr[:, half:]) / (2 * U.shape[0])
        s["geweke_z_mean_U"] = geweke_z(U.mean(0)[half // 2:]) if U.shape[1] >= 80 else math.nan
        if self._vir is not None and self._vir["n"] > 1:
            per_chain = self.virial_per_chain()
            s["beta_virial"] = float(per_chain.mean())
            s["beta_virial_se"] = float(per_chain.std(ddof=1) / math.sqrt(len(per_chain)))
        s["relaxation_U"] = relaxation_fit(U.mean(0))
        s["relaxation_obs"] = relaxation_fit(obs.mean(0))
        if self.hparams.task == "digits":
            s["test_accuracy_bma"] = self._digits_test_accuracy()
        rhat_ok = s["split_rhat_U"] < 1.01 and s["split_rhat_obs"] < 1.01
        vir_ok = "beta_virial" in s and abs(s["beta_virial"] - 1) <= max(0.1, 4.5 * s["beta_virial_se"])
        s["verdict"] = "pass" if rhat_ok and vir_ok else "fail"
        ess = min(s.get("ess_per_split_chain_U", math.inf), s.get("ess_per_split_chain_obs", math.inf))
        if enough and not rhat_ok and ess < 50:
            s["note"] = (f"split-R-hat fails with only {ess:.3g} effective draws per split half-chain: stationary chains "
                         f"read about 1 + 1/(2 ESS) = {1 + 0.5 / ess:.3g}, so this says too few effective samples per "
                         "chain to judge, not necessarily non-stationarity; run longer or use kinetic chains "
                         "(model.friction)")
        self.summary = s
        out = Path(self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gibbs_summary.json").write_text(json.dumps(s, indent=2))
        self._plot(out / "gibbs_relaxation.png", U, obs)
        print(json.dumps(s, indent=2))

    @torch.no_grad()
    def _digits_test_accuracy(self) -> float:
        x, y = self.trainer.datamodule.test
        probs = torch.softmax(self.digits_logits(x.to(self.device)), -1).mean(0)  # average over chains
        return float((probs.argmax(-1).cpu() == y).float().mean())

    def _plot(self, path: Path, U: np.ndarray, obs: np.ndarray) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        name = "q·k" if self.hparams.task == "attention" else "|θ|²"
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, tr, label in ((axes[0], U, "U"), (axes[1], obs, name)):
            m = tr.mean(0)
            se = tr.std(0, ddof=1) / math.sqrt(tr.shape[0])
            ax.plot(m, lw=1, label="mean over chains")
            ax.fill_between(np.arange(len(m)), m - 2 * se, m + 2 * se, alpha=0.3)
            ax.axhline(relaxation_fit(m)["f_inf"], color="k", ls="--", lw=1, label="Gibbs value (tail mean)")
            ax.set(title=f"E_t[{label}]", xlabel="step")
            ax.legend(fontsize=7)
        for tr, label in ((U, "U"), (obs, name)):
            m = tr.mean(0)
            fit = relaxation_fit(m)
            gap = np.abs(m - fit["f_inf"]) + 1e-16
            axes[2].semilogy(gap, lw=0.8, label=f"|E_t[{label}] − Gibbs|")
            if math.isfinite(fit["rate"]):
                t = np.arange(fit["fit_steps"])
                axes[2].semilogy(t, np.exp(fit["fit_intercept"] - fit["rate"] * t), "--",
                                 label=f"{label}: rate {fit['rate']:.3g}/step")
        axes[2].set(title="approach to the Gibbs value", xlabel="step")
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def main(args: list[str] | None = None, run: bool = True):
    from recipes.cli import RecipeCLI

    return RecipeCLI(GibbsChains, GibbsData, args=args, run=run, save_config_kwargs={"overwrite": True},
                     prog="python -m recipes.gibbs")


if __name__ == "__main__":
    main()
