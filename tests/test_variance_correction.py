"""bnlib.experiments.variance_correction: the symbolic expectation, the simulation, torch's
conventions measured, and tiny runs."""
import json

import pytest
import sympy as sp

from bnlib.experiments import run_experiment
from bnlib.experiments import variance_correction as vc

TINY = dict(dataset="digits", sim_batch_sizes=[2, 4], sim_trials=100, batch_sizes=[2, 4],
            width=8, depth=2, steps=5)


def test_symbolic_expectation_general_m():
    expr, (m, mu, sigma) = vc.expected_batch_variance()
    assert sp.simplify(expr - (m - 1) / m * sigma**2) == 0


@pytest.mark.parametrize("m", [2, 3])
def test_symbolic_expectation_over_normal_symbols(m):
    expr, (mu, sigma) = vc.expected_batch_variance_normal(m)
    assert sp.simplify(expr - sp.Rational(m - 1, m) * sigma**2) == 0
    with pytest.raises(ValueError, match="positive integer"):
        vc.expected_batch_variance_normal(0)


def test_simulation_matches_the_expectations():
    rows = vc.simulate([2, 5], trials=20000, seed=1, sigma2=3.0)
    for r in rows:
        m = r["m"]
        # 5 standard errors: a false failure has probability below 1e-6
        assert abs(r["biased_mean"] - (m - 1) / m) < 5 * r["biased_se"]
        assert abs(r["unbiased_mean"] - 1.0) < 5 * r["unbiased_se"]
    # m = 2: m sigma_B^2 / sigma^2 ~ chi2(1), so P(sigma_B^2 < sigma^2 / 2) = P(chi2_1 < 1) = 0.6827
    assert rows[0]["prob_below_half"] == pytest.approx(0.6827, abs=0.02)   # SE 0.0033, 6 SE
    with pytest.raises(ValueError, match="at least 2"):
        vc.simulate([1], 10)


def test_torch_conventions_measured():
    c = vc.torch_conventions()
    assert c["default momentum"] == 0.1 and c["default eps"] == 1e-5
    assert c["momentum is the weight of"] == "the new batch"
    assert c["training normalizes with"] == "biased variance (divide by m)"
    assert c["running_var receives"] == "unbiased variance (m/(m-1))"
    assert c["momentum=None means"] == "cumulative average"


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_tiny_run_writes_json_and_figures(profile, tmp_path):
    r = run_experiment("variance_correction", profile=profile, device="cpu", out_dir=tmp_path,
                       **TINY)
    data = json.loads((tmp_path / f"variance_correction-{profile}.json").read_text())
    assert [row["m"] for row in data["metrics"]["trained"]] == [2, 4]
    for row in data["metrics"]["trained"]:
        # Layer 1 sees the same input with either stored variance: the eval-mode second moments
        # differ by the ratio of the variances, m/(m-1), up to eps (1e-3 relative covers it).
        ratio = row["second_moment_biased"][0] / row["second_moment_unbiased"][0]
        assert ratio == pytest.approx(row["m"] / (row["m"] - 1), rel=1e-3)
    assert [p.split("/")[-1] for p in r["figures"]] == [
        f"variance_correction-{profile}-{part}.png" for part in ("simulation", "second_moment", "accuracy")]
