"""Smoke test of benchmarks/bench_kinetic.py: ``--smoke`` runs end to end on one target, prints its table
with every sampler row, appends its section, and the numbers it reports are well formed. The
stationarity verdict it uses is checked on a case where the answer is known: kinetic chains on the
quadratic pass within a few thousand gradients, and a window whose chains disagree fails."""
import importlib
import math

import numpy as np
import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.bench_kinetic")


def test_bench_kinetic_smoke(bench, capsys, tmp_path, one_thread):
    results_file = tmp_path / "RESULTS.md"
    out = bench.main(["--smoke", "--targets", "lora-rank1", "--no-sweep", "--append-results", "--results",
                      str(results_file)])
    text = capsys.readouterr().out
    assert "| target | sampler | step | gamma | gradients to pass |" in text
    labels = {r["label"] for r in out["rows"]}
    assert labels == {"overdamped", "kinetic c=0.5", "kinetic c=1.0", "kinetic c=0.5, friction='auto'"}
    for r in out["rows"]:
        assert set(r["ess_per_grad"]) == {"U", "W=ba", "a^2-b^2"}
        assert all(0 < v <= 1.5 for v in r["ess_per_grad"].values())
        assert np.isfinite(r["z"]).all() and r["us_per_step"] > 0
        assert r["grads_to_pass"] is None or r["grads_to_pass"] <= r["cap"]
    assert "Kinetic vs overdamped Langevin (bench_kinetic.py, smoke)" in results_file.read_text()


def test_bench_kinetic_verdict_on_known_cases(bench):
    """The verdict on exact draws: i.i.d. samples of the quadratic's Gibbs law pass (split-R-hat ~1, virial ~1);
    the same draws with one chain shifted by 3 sd fail on split-R-hat; the curvature helper finds K's spectrum."""
    import torch

    t, names, obs, truth = bench.quadratic()
    t.info.update(obs_names=names, truth=truth)
    lam_min, lam_max = bench.curvature(t)
    assert math.isclose(lam_min, 1.0, rel_tol=1e-9) and math.isclose(lam_max, 100.0, rel_tol=1e-9)
    C, n, d = 16, 2000, 6
    g = torch.Generator().manual_seed(0)
    K = torch.func.hessian(lambda x: t.potential([x[None]])[0])(t.mode[0])
    L = torch.linalg.cholesky(torch.linalg.inv(t.beta * K))
    theta = t.mode[0] + torch.randn(C, n, d, generator=g, dtype=torch.float64) @ L.T

    def verdict_of(th):
        force = torch.stack([torch.func.grad(lambda x: t.potential([x[None]])[0])(x) for x in th.reshape(-1, d)])
        force = force.reshape(C, n, d)
        buf = np.concatenate([t.potential([th.reshape(-1, d)]).reshape(C, n, 1).numpy(),
                              obs([th.reshape(-1, d)]).reshape(C, n, -1).numpy()], -1)
        marks = {m: ((th[:, :m] * force[:, :m]).sum((1, 2)), [force[:, :m].sum(1)], [th[:, :m].sum(1)])
                 for m in (n // 2, n)}
        return bench.verdict(t, buf, np.arange(n), marks, n, C)

    ok = verdict_of(theta)
    assert ok["pass"] and abs(ok["virial"] - 1) < 0.05, ok
    shifted = theta.clone()
    shifted[0] += 3 * L @ torch.ones(d, dtype=torch.float64)
    bad = verdict_of(shifted)
    assert not bad["pass"] and max(bad["rhat"].values()) > 1.01


def test_bench_kinetic_reports_a_runaway_chain_instead_of_crashing(bench, one_thread):
    """A kinetic step beyond BAOAB's stability limit (h sqrt(lambda_max) = 3 > 2) runs away: the run stops at the
    first non-finite loss and is reported as diverged (the full benchmark once crashed there on lora-rank1)."""
    t, names, obs, truth = bench.quadratic()
    t.info.update(obs_names=names, truth=truth)
    r = bench.run(t, obs, lr=3.0 / math.sqrt(100.0), friction=2.0, chains=4, max_steps=4096, first=64, seed=0)
    assert r["diverged_at"] is not None and r["grads_to_pass"] is None
    assert bench._fmt_grads(dict(r, cap=4096)).startswith("diverged")
    stable = bench.run(t, obs, lr=0.5 / math.sqrt(100.0), friction=2.0, chains=4, max_steps=128, first=64, seed=0)
    assert stable.get("diverged_at") is None
