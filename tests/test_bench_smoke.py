"""Smoke test of benchmarks/bench_sampler.py and the shared benchmark helpers (benchmarks/_common.py).

The benchmark's numbers are not asserted here (speed claims live in the script's printed ratios);
this checks that ``--smoke`` runs end to end, prints its table with every sampler row, that the
posteriors conversion holds to round-off when posteriors is installed, and that the helpers are
right: ESS of an AR(1) trace, results appended (never rewritten).
"""
import importlib
import math

import numpy as np
import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.bench_sampler")


def test_bench_sampler_smoke(bench, capsys, tmp_path):
    results_file = tmp_path / "RESULTS.md"
    results = bench.main(["--smoke", "--targets", "quadratic", "lora-rank1", "--results", str(results_file)])
    out = capsys.readouterr().out
    assert "| target | sampler | eta |" in out
    labels = {(r["target"], r["label"]) for r in results}
    expected = {("quadratic", "ours SGLD"), ("quadratic", "ours Adam-precond"), ("lora-rank1", "ours SGLD")}
    if bench.GaugeMoves is not None:
        expected |= {("lora-rank1", "ours SGLD + gauge"), ("lora-rank1", "ours Adam + gauge")}
    else:
        assert "gauge moves: not available" in out
    if bench.posteriors_sgld is not None:
        expected |= {("quadratic", "posteriors SGLD"), ("lora-rank1", "posteriors SGLD")}
        # the conversion log p = -U, lr = eta, temperature = 1/beta gives the same chain
        chk = bench.check_posteriors_convention(bench.quadratic_target(0.01), eta=1e-3, steps=20)
        assert chk["noise_free"] < 1e-12 < chk["noise_free_moved"]
        assert chk["same_noise"] < 1e-12 < chk["same_noise_moved"]
    else:
        assert "posteriors: not installed" in out
    assert expected <= labels
    for label in {lab for _, lab in expected}:
        assert f"| {label} |" in out
    for r in results:
        assert r["grads"] > 0 and math.isfinite(r["sec_per_step"]) and r["sec_per_step"] > 0
        assert 0 < r["ess_theta_min"] <= 1.5 and 0 < r["ess_u"] <= 1.5   # ESS per gradient is at most ~1
        assert np.isfinite(r["z"]).all()
    text = results_file.read_text()
    assert text.startswith("# Benchmark results") and "Sampler efficiency (bench_sampler.py)" in text


def test_common_helpers(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    common = importlib.import_module("benchmarks._common")
    # ESS of AR(1), phi = 0.8: tau = (1 + phi)/(1 - phi) = 9
    rng = np.random.default_rng(0)
    C, n, phi = 8, 20000, 0.8
    x = np.zeros((C, n))
    e = rng.standard_normal((C, n))
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    ess = common.effective_sample_size(x)[0]
    assert abs(ess / (C * n / 9.0) - 1) < 0.15
    assert abs(common._geyer_ess(x[:, :, None])[0] / ess - 1) < 1e-6 or common._pkg_ess is None
    with pytest.raises(ValueError, match="trace shape"):
        common.effective_sample_size(np.zeros(5))
    # append, never rewrite
    path = tmp_path / "R.md"
    common.append_results("first", "| a |\n|---|\n| 1 |", "cmd one", path=path)
    first = path.read_text()
    common.append_results("second", "| b |\n|---|\n| 2 |", "cmd two", path=path)
    text = path.read_text()
    assert text.startswith(first) and text.count("# Benchmark results") == 1
    assert "## second" in text and "`cmd two`" in text and "Machine:" in text
    assert common.time_per_call(lambda: None, number=3, repeats=2, warmup=0) >= 0
    with pytest.raises(ValueError, match="number/repeats/warmup"):
        common.time_per_call(lambda: None, number=0)
