"""Smoke test of benchmarks/bench_sampler.py and the shared benchmark helpers (benchmarks/_common.py).

The benchmark's numbers are not asserted here (speed claims live in the script's printed ratios);
this checks that ``--smoke`` runs end to end, prints its table with every sampler row, that the
posteriors conversion holds to round-off when posteriors is installed, and that the helpers are
right: ESS and autocorrelation time of an AR(1) trace (the package's own chain statistics, no second
implementation), results appended (never rewritten).
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
    results = bench.main(["--smoke", "--targets", "quadratic", "lora-rank1", "--append-results",
                          "--results", str(results_file)])
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
    tau = common.integrated_autocorr_time(np.stack([x, 2 * x], axis=-1))
    assert tau.shape == (2,) and abs(tau[0] / 9.0 - 1) < 0.15 and tau[1] == tau[0]
    # one implementation: the package's own chain statistics, column by column
    from langevin_lora.diagnostics import effective_sample_size, integrated_autocorr_time
    assert ess == effective_sample_size(x) and tau[0] == integrated_autocorr_time(x)
    assert not hasattr(common, "_geyer_ess") and "import_module" not in (ROOT / "benchmarks" / "_common.py").read_text()
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


def test_bench_gauge_minilm_smoke(monkeypatch, capsys, tmp_path, one_thread):
    """The MiniLM target of benchmarks/bench_gauge.py end to end through lightning.Trainer + LangevinLoRA
    (tiny sizes; the configuration exercising the most code: balanced burn-in + gauge moves): every
    chain takes exactly ``--steps`` Langevin steps (checked inside ``run_minilm``), traces are finite
    with one record per step and chain, ESS per gradient is in (0, 1], the GL moves accept some but not
    all proposals, and the section is appended to the results file."""
    monkeypatch.syspath_prepend(str(ROOT))
    bench = importlib.import_module("benchmarks.bench_gauge")
    results_file = tmp_path / "RESULTS.md"
    steps, chains = 8, 2
    results = bench.main(["--target", "minilm", "--chains", str(chains), "--warmup", "2", "--steps", str(steps),
                          "--num-train", "16", "--num-probe", "2", "--batch-size", "4", "--max-length", "16",
                          "--prior-std", "0.5", "--configs", "balanced warm-up + moves",
                          "--append-results", "--results", str(results_file)])
    out = capsys.readouterr().out
    assert set(results) == {"balanced warm-up + moves"}
    assert "| balanced warm-up + moves |" in out
    for name, r in results.items():
        assert set(r["traces"]) >= {"logodds0", "logodds1", "D", "probe_nll"}
        for k, tr in r["traces"].items():
            assert tr.shape == (steps, chains) and np.isfinite(tr).all(), k
        assert all(0 < v <= 1 for v in r["ess_per_grad"].values())
        assert r["wall_per_step"] > 0 and 0 < r["eta_lam_Gmax"] < 1
    assert 0 < results["balanced warm-up + moves"]["gl_acceptance"] < 1
    text = results_file.read_text()
    assert "balancing warm-up and gauge moves, MiniLM LoRA recipe" in text and "| balanced warm-up + moves |" in text


def test_benchmarks_package_runner_and_one_results_flag(monkeypatch, capsys):
    """benchmarks/ is a package run from the repository root (no sys.path shims); every bench_* script takes the
    one results flag of _common.add_results_arguments and appends through its locked append only; the runner
    ``python -m benchmarks <name>`` lists the scripts, refuses an unknown name and runs a script as its module."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT))
    runner = importlib.import_module("benchmarks.__main__")
    names = runner.scripts()
    files = sorted((ROOT / "benchmarks").glob("*.py"))
    assert set(names.values()) == {p.stem for p in files if not p.stem.startswith("_")}
    for p in files:
        src = p.read_text()
        assert "sys.path" not in src, p.name
        if p.stem.startswith("bench_"):
            assert "add_results_arguments(" in src and "--no-append" not in src and "--no-record" not in src, p.name
            assert '.open("a")' not in src and 'open(path, "a"' not in src, p.name   # the locked append only
    assert runner.main([]) == 0 and "sampler" in capsys.readouterr().out
    assert runner.main(["nope"]) == 2 and "Invalid benchmark: 'nope'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exc:
        runner.main(["attention_quadrature", "--help"])
    assert exc.value.code == 0 and "--out" in capsys.readouterr().out
