"""Small exactly solvable targets (THEORY §5) for the diagnostics tests, as vectorised chains, and the
linear regression module the diagnostics-callback tests train.

Chains are a leading tensor dimension, so one :class:`langevin_lora.LangevinSGD` steps all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset

from langevin_lora import LangevinSGD


@dataclass
class Quadratic:
    r"""THEORY §5 (i): :math:`\hat L = |X\theta - y|^2/(2N)`, :math:`K = X^\top X/N + \lambda I`.

    Columns of ``X`` are scaled so that :math:`K` has well separated eigenvalues (the step-size
    bias is then visible). Exact full-batch ULA law: mean :math:`K^{-1}b`, covariance
    :math:`\beta^{-1}[K(I - \eta K/2)]^{-1}`.
    """

    X: torch.Tensor
    y: torch.Tensor
    lam: float
    beta: float

    @classmethod
    def make(cls, d: int = 3, n: int = 64, lam: float = 0.1, beta: float = 10.0, scales=(1.0, 2.0, 3.2), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(X)  # orthonormal columns: X^T X / N = diag(scales^2) exactly
        X = q * math.sqrt(n) * torch.tensor(scales, dtype=torch.float64)
        theta_star = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:d]
        y = X @ theta_star + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        return cls(X, y, lam, beta)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def KL(self) -> torch.Tensor:
        return self.X.T @ self.X / self.n

    @property
    def K(self) -> torch.Tensor:
        return self.KL + self.lam * torch.eye(self.X.shape[1], dtype=torch.float64)

    @property
    def b(self) -> torch.Tensor:
        return self.X.T @ self.y / self.n

    @property
    def mean(self) -> torch.Tensor:
        return torch.linalg.solve(self.K, self.b)

    def ula_cov(self, lr: float, extra_noise: float = 0.0) -> torch.Tensor:
        """Stationary ULA covariance; ``extra_noise`` = isotropic minibatch-noise variance s."""
        d = self.K.shape[0]
        inner = self.K @ (torch.eye(d, dtype=torch.float64) - lr * self.K / 2)
        return (1.0 + lr * self.beta * extra_noise / 2) * torch.linalg.inv(inner) / self.beta

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """Sum over chains of the per-chain mean loss (the gradient is per chain)."""
        r = theta @ self.X.T - self.y
        return (r * r).sum() / (2 * self.n)

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        return theta @ self.KL - self.b

    def stationary_draw(self, chains: int, lr: float, seed: int, extra_noise: float = 0.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        L = torch.linalg.cholesky(self.ula_cov(lr, extra_noise))
        z = torch.randn(chains, self.K.shape[0], generator=g, dtype=torch.float64)
        return self.mean + z @ L.T


def rank1_loss(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    r"""THEORY §5 (ii) variant, summed over chains: :math:`\hat L = |w - b\,a|^2` with ``a`` (C, 1, 2)
    (an A of shape 1x2) and ``b`` (C, 1, 1) (a B of shape 1x1)."""
    return ((w - (b @ a).squeeze(-2)) ** 2).sum()


def make_sgd(params, lr: float, beta: float, lam: float, seed: int) -> LangevinSGD:
    return LangevinSGD(params, lr=lr, beta=beta, weight_decay=lam, seed=seed)


def zscore(per_chain: np.ndarray, expected: float) -> float:
    per_chain = np.asarray(per_chain, dtype=np.float64)
    se = per_chain.std(ddof=1) / math.sqrt(per_chain.size)
    return float((per_chain.mean() - expected) / se)


def ou_center_bias(a: np.ndarray, window: int) -> np.ndarray:
    """Relative virial bias of the previous-window centre on modes with per-step autocorrelation ``a``."""
    s = (1 - a ** window) / (1 - a)
    return -a * s * s / window ** 2


class Regression(LightningModule):
    """Linear regression with a LangevinSGD optimizer (or a plain torch one)."""

    def __init__(self, optimizer="langevin", lr=1e-2, weight_decay=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)
        self.optimizer, self.lr, self.weight_decay = optimizer, lr, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return LangevinSGD(self.parameters(), lr=self.lr, beta=100.0, weight_decay=self.weight_decay, seed=0)


def regression_loader(n=64, batch_size=8, duplicate=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.3 * torch.randn(n, generator=g)
    if duplicate:  # consecutive micro-batches identical: the micro-batch gradients coincide
        x = x[:batch_size].repeat(n // batch_size, 1)
        y = y[:batch_size].repeat(n // batch_size)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
