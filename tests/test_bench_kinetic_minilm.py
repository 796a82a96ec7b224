"""Smoke test of benchmarks/bench_kinetic_minilm.py (kinetic vs overdamped Langevin on the MiniLM LoRA
recipe): ``--smoke`` runs end to end on a tiny random BERT, prints its table with the three arms and
the verdict line, appends to the results file; the stationarity-window rule is checked on made-up traces.
The benchmark's numbers are not asserted (they live in benchmarks/RESULTS.md)."""
import importlib
import math

import numpy as np
import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.bench_kinetic_minilm")


def test_first_stationary_window(bench):
    # relaxes to 1, then stays within 5%: stationary from window 3
    first, plateau = bench.first_stationary_window(np.array([0.2, 0.6, 0.9, 0.97, 1.02, 0.99, 1.0, 1.01]),
                                                   target=None, tol=0.05)
    assert first == 3 and plateau == pytest.approx(1.005)   # the last third: windows 6 and 7
    # a late excursion resets it; a fixed target (the virial) is an absolute band
    assert bench.first_stationary_window(np.array([1.0, 1.0, 0.8, 1.0, 1.0, 1.0]), target=None, tol=0.05)[0] == 3
    assert bench.first_stationary_window(np.array([0.5, 0.96, 1.04, 1.0]), target=1.0, tol=0.05) == (1, 1.0)
    # never inside the band: None
    assert bench.first_stationary_window(np.array([0.5, 0.6, 0.7]), target=1.0, tol=0.05)[0] is None
    # first passage: the first window inside the band, later excursions do not count
    assert bench.first_passage_window(np.array([1.0, 1.0, 0.8, 1.0, 1.0, 1.0]), target=None, tol=0.05) == 0
    assert bench.first_passage_window(np.array([0.5, 0.8, 0.97, 0.9, 1.0, 1.0]), target=None, tol=0.05) == 2
    assert bench.first_passage_window(np.array([0.5, 0.6, 0.7]), target=1.0, tol=0.05) is None
    # windows of a trace
    assert bench.windows(np.arange(7.0), 3).tolist() == [1.0, 4.0]


def test_bench_kinetic_minilm_smoke(bench, capsys, tmp_path):
    results_file = tmp_path / "RESULTS.md"
    out = bench.main(["--smoke", "--append-results", "--results", str(results_file)])
    printed = capsys.readouterr().out
    assert "| sampler | step | gamma | steps | grads to stationarity, first passage" in printed
    labels = [r["label"] for r in out["rows"]]
    assert labels == ["overdamped", "kinetic, gamma 10", "kinetic, gamma auto"]
    for label in labels:
        assert f"| {label} |" in printed
    assert out["verdict"].startswith("Verdict vs the goal (kinetic >= 10x")
    info = out["info"]
    assert info["lam_max"] > 0 and info["probe_grads"] == 2 * info["products"] * 32 / 32
    kinetic = out["rows"][1]
    assert kinetic["lr"] == pytest.approx(0.5 / math.sqrt(info["lam_max"]))
    assert out["rows"][0]["lr"] == pytest.approx(0.1 / info["lam_max"])
    assert out["rows"][2]["friction"] == pytest.approx(info["gamma_auto"])
    for r in out["rows"]:
        for key in ("U", "virial", "slow"):   # the measurement's cost is in every arm's total
            assert r[f"{key}_grads"] is None or r[f"{key}_grads"] >= info["probe_grads"]
            assert r[f"{key}_passage"] is None or info["probe_grads"] <= r[f"{key}_passage"] <= (
                r[f"{key}_grads"] if r[f"{key}_grads"] is not None else math.inf)
            assert math.isfinite(r[f"{key}_geweke"]) and 0 < r[f"{key}_ess_per_grad"] <= 1.5
        assert 0 < r["W_ess_per_grad_min"] <= r["W_ess_per_grad_median"] <= 1.5
    text = results_file.read_text()
    assert "bench_kinetic_minilm.py, smoke" in text and "Verdict vs the goal" in text
