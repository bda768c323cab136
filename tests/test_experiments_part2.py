"""Experiments part 2 (inference statistics, m/(m-1), gradients): metrics on hand-checkable cases
and a tiny run of each experiment through run_experiment."""
import json
import math

import numpy as np
import pytest
import sympy as sp
import torch
from torch import nn

from bnlib import reference
from bnlib.experiments import run_experiment
from bnlib.experiments import gradients as gr
from bnlib.experiments import inference_stats as ist
from bnlib.experiments import variance_correction as vc
from bnlib.experiments.models import bn_layers, hidden_linears, mlp
from bnlib.experiments.train import train
from bnlib.nn import BatchNorm1d


# --- inference statistics ---------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.5, 0.1, 0.01])
def test_ema_lag_matches_an_ema_fed_a_ramp(p):
    # The EMA of r_t = t settles at t - (1 - p)/p; after 40/p steps the transient (1-p)^t is < e^-40.
    running = 0.0
    steps = int(40 / p)
    for t in range(1, steps + 1):
        running = reference.ema_update(running, float(t), p)
    assert steps - running == pytest.approx(ist.ema_lag(p), rel=1e-9)


def test_ema_lag_rejects_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        ist.ema_lag(0.0)


def test_stat_error_by_hand():
    # mean off by one std in channel 0, var 50 % high in channel 1: (1 + 0)/2 + (0 + 0.5)/2 = 0.75
    assert ist.stat_error([2.0, 0.0], [4.0, 3.0], [0.0, 0.0], [4.0, 2.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="ref_var"):
        ist.stat_error([0.0], [1.0], [0.0], [0.0])


def test_relative_gap_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 5.0], [1.0, 0.0]])   # row gaps: sqrt(9 + 1)/5 and 0
    assert ist.relative_gap(a, b) == pytest.approx(math.sqrt(10) / 5 / 2)
    with pytest.raises(ValueError, match="same shape"):
        ist.relative_gap(a, b[:1])


def _bn_only(c=3):
    return nn.Sequential(BatchNorm1d(c))


def test_precise_stats_is_the_average_of_batch_statistics_with_m_over_m_minus_1():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(2.0, 3.0, size=(12, 3)))
    model = _bn_only().double()
    (mean, var), = ist.precise_stats(model, x, batch_size=4)
    xs = x.numpy().reshape(3, 4, 3)
    assert np.allclose(mean, xs.mean(axis=(0, 1)))
    assert np.allclose(var, xs.var(axis=1).mean(axis=0) * 4 / 3)
    (_, var_b), = ist.precise_stats(model, x, batch_size=4, unbiased_var=False)
    assert np.allclose(var_b, xs.var(axis=1).mean(axis=0))
    # the running buffers are left as they were (zeros, ones, no batches counted)
    bn = model[0]
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert int(bn.num_batches_tracked) == 0


def test_trackers_follow_torch_running_stats():
    # The hook-driven EMA with momentum 0.1 must reproduce what BatchNorm1d itself stores.
    torch.manual_seed(0)
    model = _bn_only().double().train()
    trackers = ist.StatTrackers(model, [0.1])
    batches = [torch.randn(5, 3, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    for b in batches:
        model(b)
    trackers.remove()
    rm, rv = trackers.stats["ema 0.1"][0]
    assert np.allclose(rm, model[0].running_mean.numpy()) and np.allclose(rv, model[0].running_var.numpy())
    cm, cv = trackers.stats["cumulative"][0]
    assert np.allclose(cm, np.mean([b.mean(0).numpy() for b in batches], 0))
    assert np.allclose(cv, np.mean([b.var(0).numpy() for b in batches], 0))   # unbiased, as torch


def test_forward_both_has_no_gap_when_running_stats_equal_the_batch_stats():
    torch.manual_seed(0)
    model = mlp(3, [3, 3], 3, "relu", "bn")
    x = torch.randn(6, 3)
    with torch.no_grad():   # running stats := the batch stats of x, layer by layer (biased)
        h = x
        for mod in model.layers():
            if isinstance(mod, BatchNorm1d):
                mod.running_mean.copy_(h.mean(0)), mod.running_var.copy_(h.var(0, unbiased=False))
                h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + mod.eps)
            else:
                h = mod(h)
    comp, local = ist.forward_both(model, x)
    assert max(comp) < 1e-6 and max(local) < 1e-6   # float32 path, values O(1)
    with torch.no_grad():
        bn_layers(model)[0].running_var.mul_(4.0)   # layer 1 now divides by twice the std: gap 1/2
    comp, local = ist.forward_both(model, x)
    assert local[0] == pytest.approx(0.5, rel=1e-4) and comp[0] == pytest.approx(0.5, rel=1e-4)
    assert local[1] < 1e-6 < comp[1]   # the change only reaches layer 2 through its input


# --- the m/(m-1) correction -------------------------------------------------------------------

def test_symbolic_expectation_general_m():
    expr, (m, mu, sigma) = vc.expected_batch_variance()
    assert sp.simplify(expr - (m - 1) / m * sigma**2) == 0


@pytest.mark.parametrize("m", [2, 3])
def test_symbolic_expectation_over_normal_symbols(m):
    expr, (mu, sigma) = vc.expected_batch_variance_normal(m)
    assert sp.simplify(expr - sp.Rational(m - 1, m) * sigma**2) == 0


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


# --- gradients ----------------------------------------------------------------------------------

def test_growth_factor_of_a_geometric_sequence():
    norms = 5.0 * 1.5 ** -np.arange(10)    # grows by 1.5 per layer towards the input
    assert gr.growth_factor(norms) == pytest.approx(1.5)
    spoiled = norms.copy()
    spoiled[0] *= 100   # a boundary layer, left out by skip=1
    assert gr.growth_factor(spoiled, skip=1) == pytest.approx(1.5)
    assert gr.growth_factor(spoiled) != pytest.approx(1.5)
    with pytest.raises(ValueError, match="positive"):
        gr.growth_factor([1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        gr.growth_factor([1.0, 2.0, 3.0], skip=1)


def test_log_slope_of_power_laws():
    x = np.array([0.5, 1.0, 2.0, 4.0])
    assert gr.log_slope(x, 3 * x ** -2) == pytest.approx(-2.0)


def test_grad_norm_of_a_bn_layer_scales_as_one_over_c():
    # Scale invariance: W -> c W leaves the loss unchanged and divides dL/dW by c (squared norm by c^2).
    torch.manual_seed(0)
    model = mlp(5, [16] * 3, 4, "relu", "bn", he_scale=1.0).double().train()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 4, (32,))
    base = gr.layer_grad_norms(model, x, y)
    with torch.no_grad():
        hidden_linears(model)[1].weight.mul_(3.0)
    scaled = gr.layer_grad_norms(model, x, y)
    assert scaled[1] == pytest.approx(base[1] / 9, rel=1e-4)   # eps = 1e-5 breaks exactness slightly
    assert scaled[0] == pytest.approx(base[0], rel=1e-4)


def test_yang_factor_constant():
    assert gr.YANG_RELU_FACTOR == pytest.approx(1.4669, abs=1e-4)


# --- tiny runs through run_experiment -----------------------------------------------------------

TINY = {
    "inference_stats": dict(width=8, depth=2, steps=20, lr_change_step=10, eval_every=5,
                            batch_size=8, batch_sizes=[2, 8], sweep_steps=5, deep_depth=3,
                            deep_steps=5, deep_eval_batch=4),
    "variance_correction": dict(sim_batch_sizes=[2, 4], sim_trials=100, batch_sizes=[2, 4],
                                width=8, depth=2, steps=5),
    "gradients": dict(init_depth=6, init_width=16, init_batch=16, init_seeds=1, fit_skip=1,
                      sweep_depth=3, sweep_width=16, sweep_steps=5, lr_factors=[1, 30],
                      init_scales=[1.0], scales=[0.5, 1.0, 2.0], norm_steps=5),
}


@pytest.mark.parametrize("profile", ["quick", "full"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_run_writes_json_and_figures(name, profile, tmp_path):
    # full with dataset="digits": the full configuration's code paths, without generating MNIST-1D
    over = dict(TINY[name], dataset="digits")
    r = run_experiment(name, profile=profile, device="cpu", out_dir=tmp_path, **over)
    data = json.loads((tmp_path / f"{name}-{profile}.json").read_text())
    assert data["experiment"] == name and data["profile"] == profile
    assert data["config"]["dataset"] == "digits"
    assert r["figures"] and all((tmp_path / p.split("/")[-1]).stat().st_size > 0 for p in r["figures"])
    assert set(data["metrics"]) == set(r["metrics"])


# --- the small MLP helpers ----------------------------------------------------------------------

def test_mlp_layout_and_bad_arguments():
    model = mlp(5, [7] * 3, 2, "relu", "bn", he_scale=1.0)
    kinds = [type(m).__name__ if isinstance(m, nn.Module) else m.__name__ for m in model.layers()]
    assert kinds == ["Linear", "BatchNorm1d", "relu"] * 3 + ["Linear"]
    assert all(lin.bias is None for lin in hidden_linears(model))   # BN's beta replaces the bias
    assert all(lin.bias is not None for lin in hidden_linears(mlp(5, [7] * 3, 2, "relu", he_scale=1.0)))
    with pytest.raises(ValueError, match="activation"):
        mlp(5, [7], 2, activation="swish", he_scale=1.0)
    with pytest.raises(ValueError, match="widths"):
        mlp(5, [7, 0], 2, he_scale=1.0)
    with pytest.raises(ValueError, match="he_scale"):
        mlp(5, [7], 2, he_scale=0.0)
    with pytest.raises(ValueError, match="not both"):
        mlp(5, [7], 2, init_std=0.1, he_scale=1.0)


def test_he_init_scales():
    # He init: hidden weights N(0, 2 / fan_in) for ReLU, the read-out N(0, 1 / fan_in), biases 0.
    # 256 x 256 = 65,536 draws: the sample std is within 3 / sqrt(2 * 65536) ~ 0.8 % of sigma
    # (the std of a sample std is sigma / sqrt(2n)); 3 % is a safe bound.
    torch.manual_seed(0)
    model = mlp(256, [256, 256], 256, "relu", None, he_scale=1.0)
    for lin in hidden_linears(model):
        assert lin.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)
        assert torch.count_nonzero(lin.bias) == 0
    assert model.out.weight.std().item() == pytest.approx(math.sqrt(1 / 256), rel=0.03)


def test_train_stops_on_divergence():
    torch.manual_seed(0)
    # a linear net (no ReLU to die) at lr 100: the loss overflows within a few steps
    model = mlp(4, [8] * 2, 3, "linear", he_scale=1.0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    losses = train(model, x, y, steps=50, batch_size=8, lr=100.0)
    assert len(losses) == 50 and math.isnan(losses[-1]) and math.isfinite(losses[0])


def test_he_init_draws_each_layer_right_after_building_it():
    # The order of random draws fixes the weights for a seed: each Linear's default init, then at
    # once its He redraw, before the next layer is built. Rebuilt by hand, the weights must match.
    torch.manual_seed(0)
    model = mlp(3, [4, 5], 2, "relu", "bn", he_scale=0.5)
    torch.manual_seed(0)
    expected = []
    for fan_in, fan_out, gain in ((3, 4, math.sqrt(2.0)), (4, 5, math.sqrt(2.0)), (5, 2, 1.0)):
        lin = nn.Linear(fan_in, fan_out, bias=fan_out == 2)   # only the read-out keeps a bias
        nn.init.normal_(lin.weight, std=0.5 * gain / math.sqrt(fan_in))
        expected.append(lin.weight)
    for lin, w in zip(model.linears(), expected):
        assert torch.equal(lin.weight, w)


def test_fixed_network_sweep_reuses_the_batch_size_network_and_needs_it():
    from bnlib.experiments import run_experiment
    res = run_experiment("inference_stats", profile="quick", device="cpu", seed=0,
                         **TINY["inference_stats"])
    m = res["metrics"]
    fixed = {r["batch_size"]: r for r in m["fixed_network_sweep"]}
    trained = {r["batch_size"]: r for r in m["batch_size_sweep"]}
    assert sorted(fixed) == [2, 8]
    # At m = batch_size the fixed network is the network trained at that m, evaluated alike.
    assert fixed[8]["gap"] == trained[8]["gap"]
    assert fixed[8]["disagreement"] == trained[8]["disagreement"]
    with pytest.raises(ValueError, match="batch_size"):
        run_experiment("inference_stats", profile="quick", device="cpu", seed=0,
                       **{**TINY["inference_stats"], "batch_size": 4})

