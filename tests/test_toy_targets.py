"""langevin_lora.testing carries the ground truth the sampler tests and benchmarks are judged against:
its embedded attention numbers are the quadrature's JSON record, bit for bit, and agree with an
independent quadrature; its LoRA grid reproduces THEORY's exact identity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from langevin_lora.testing import (ATTENTION_MOMENT_NAMES, ATTENTION_MOMENTS, ATTENTION_PARAMS, ATTENTION_X,
                                   ATTENTION_Y, attention_data, attention_ground_truth, attention_quadrature_2d,
                                   lora_posterior_grid)

JSON = Path(__file__).resolve().parent / "data" / "attention_ground_truth.json"


def test_attention_numbers_are_the_quadrature_record():
    rec = json.loads(JSON.read_text())
    assert ATTENTION_PARAMS == rec["params"] and ATTENTION_MOMENTS == rec["moments"]
    assert ATTENTION_MOMENT_NAMES == list(rec["moments"])
    assert ATTENTION_X == rec["x"] and ATTENTION_Y == rec["y"]
    gt = attention_ground_truth()
    assert gt["x"].tolist() == rec["x"] and gt["y"].tolist() == rec["y"]
    # the generator reproduces the data up to the last bit of numpy's exp
    x, y = attention_data(**ATTENTION_PARAMS)
    np.testing.assert_allclose(x, rec["x"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(y, rec["y"], rtol=0, atol=1e-14)


def test_attention_moments_agree_with_the_semi_analytic_quadrature():
    """v integrated exactly, a coarse (q, k) grid (h = 0.04, four times the record's): the rectangle rule on this
    Gaussian-tailed integrand converges spectrally, so even this grid agrees to ~4e-9."""
    x, y = np.array(ATTENTION_X), np.array(ATTENTION_Y)
    r = attention_quadrature_2d(x, y, ATTENTION_PARAMS["weight_decay"], ATTENTION_PARAMS["beta"], 4.0, 0.04)
    for name in ATTENTION_MOMENT_NAMES:
        assert abs(r["moments"][name] - ATTENTION_MOMENTS[name]) < 1e-8, name


def test_lora_grid_reproduces_the_exact_gauge_mean():
    """THEORY §3: E[|a|^2 - b^2] = (in - out)/(beta lam) exactly, here 1/(4 * 0.5) for A 1x2, B 1x1."""
    a, b, U, p = lora_posterior_grid([1.0, 0.5], 0.5, 4.0, np.linspace(-5.5, 5.5, 161))
    assert abs(float((p * (a[0] ** 2 + a[1] ** 2 - b ** 2)).sum()) - 0.5) < 1e-9
    assert abs(p.sum() - 1) < 1e-12 and U.min() >= 0
