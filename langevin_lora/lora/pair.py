r"""A LoRA pair :math:`(A, B)` as matrices: shape checks, matrix views and the working precision.

Shared by the gauge moves (:mod:`langevin_lora.lora.gauge`) and balancing
(:mod:`langevin_lora.lora.balance`), which both act on :math:`BA` through :math:`GL(r)`.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_pair", "matrix_views", "work_dtype"]


def check_pair(A: Tensor, B: Tensor) -> tuple[int, int, int]:
    """``A`` is ``(..., r, in)``, ``B`` is ``(..., out, r)`` with equal leading (chain) dims."""
    if not (torch.is_tensor(A) and torch.is_tensor(B)):
        raise ValueError(f"Invalid A/B: expected tensors, got {type(A).__name__}/{type(B).__name__}")
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"Invalid A/B: A must be (..., r, in) and B (..., out, r); got shapes "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"Invalid A/B: A must be (..., r, in) and B (..., out, r) with the same r and "
                         f"leading dims; got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise ValueError(f"Invalid A/B: expected real floating tensors, got {A.dtype}/{B.dtype}")
    return A.shape[-2], A.shape[-1], B.shape[-2]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The gauge algebra runs in float64 (cheap: O(r^2 (in + out))) unless already wider."""
    return torch.float64 if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else dtype


def matrix_views(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, in)`` and ``(out, r)`` views of PEFT factors (conv LoRA stores ``(r, in, *k)`` and
    ``(out, r, 1, ...)``; linear and embedding factors are already matrices)."""
    r = A.shape[0]
    A2 = A.reshape(r, -1)
    if B.dim() > 2:
        if any(s != 1 for s in B.shape[2:]):
            raise ValueError("Invalid lora_B: expected a 1x1 kernel for a conv LoRA factor, got shape "
                             f"{tuple(B.shape)}")
        B2 = B.reshape(B.shape[0], B.shape[1])
    else:
        B2 = B
    if A2.data_ptr() != A.data_ptr() or B2.data_ptr() != B.data_ptr():  # pragma: no cover - reshape copied
        raise ValueError("LoRA factors must be contiguous to be updated in place")
    return A2, B2
