"""CUDA paths: device generators, bf16 master copies, foreach kernels, the callback under bf16-mixed.

Skipped without a CUDA device (CI has none); run them on a GPU machine with
``pytest -m gpu tests/test_gpu.py``.
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch

from langevin_lora import LangevinAdam, LangevinSGD

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _params(dtype, shapes=((64, 16), (16, 128), (7,))):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32).to(CUDA, dtype)) for s in shapes]


def _grads(params, t):
    g = torch.Generator(device="cpu").manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32).to(CUDA, p.dtype)


@pytest.mark.parametrize("opt_cls", [LangevinSGD, LangevinAdam])
def test_foreach_equals_single_tensor_on_cuda_float64(opt_cls):
    kw = dict(lr=1e-3, beta=100.0, weight_decay=0.1, seed=3)
    if opt_cls is LangevinAdam:
        kw["burn_in_steps"] = 3
    a, b = _params(torch.float64), _params(torch.float64)
    oa, ob = opt_cls(a, foreach=True, **kw), opt_cls(b, foreach=False, **kw)
    for t in range(8):
        _grads(a, t)
        _grads(b, t)
        oa.step()
        ob.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cuda_generator_state_resumes_bitwise():
    params = _params(torch.float32)
    opt = LangevinSGD(params, lr=1e-3, num_data=1000, seed=5)
    for t in range(3):
        _grads(params, t)
        opt.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": [p.detach().clone() for p in params]}, buf)
    assert "cuda:0" in opt.state_dict()["langevin"]["generators"]["states"]
    for t in range(3, 6):
        _grads(params, t)
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    again = [torch.nn.Parameter(p.clone()) for p in saved["p"]]
    opt2 = LangevinSGD(again, lr=1e-3, num_data=1000, seed=999)
    opt2.load_state_dict(saved["opt"])
    for t in range(3, 6):
        _grads(again, t)
        opt2.step()
    assert all(torch.equal(x, y) for x, y in zip(params, again))


def test_bf16_noise_accumulates_through_the_fp32_master_on_cuda():
    p = torch.nn.Parameter(torch.ones(200_000, device=CUDA, dtype=torch.bfloat16))
    std, steps = 2.5e-4, 400
    beta = 2 * 1.0 / std**2  # lr = 1: std = sqrt(2 lr / beta)
    opt = LangevinSGD([p], lr=1.0, beta=beta, seed=0)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32 and master.device.type == "cuda"
    var = float((master.double() - 1).var())
    expected = steps * std**2
    se = expected * (2 / p.numel()) ** 0.5
    assert abs(var - expected) / se < 4.5
    assert (p != 1).float().mean() > 0.3  # the bf16 parameter moved


def test_callback_under_bf16_mixed_on_gpu():
    import lightning as L
    from callback_helpers import Tiny, loader

    from langevin_lora import LangevinLoRA

    cb = LangevinLoRA(weight_decay=0.1, burn_in_steps=2, seed=0, num_samples=2, sample_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_steps=8, callbacks=[cb], logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=-1).fit(Tiny(), loader())
    assert cb.langevin_steps == 6 and len(cb.sample_bank) == 2
    assert "cuda:0" in cb.generators.state_dict()["states"]
    assert all(torch.isfinite(p).all() for n, p in cb._module.named_parameters() if "lora_" in n)
