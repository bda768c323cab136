"""bnlib.experiments.gradients: scale invariance of a BN layer's gradient, and tiny runs."""
import json

import pytest
import torch

from bnlib.experiments import gradients as gr
from bnlib.experiments import run_experiment
from bnlib.experiments.models import hidden_linears, mlp

TINY = dict(dataset="digits", init_depth=6, init_width=16, init_batch=16, init_seeds=1,
            fit_skip=1, sweep_depth=3, sweep_width=16, sweep_steps=5, lr_factors=[1, 30],
            init_scales=[1.0], scales=[0.5, 1.0, 2.0], norm_steps=5)


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


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_tiny_run_writes_json_and_figures(profile, tmp_path):
    r = run_experiment("gradients", profile=profile, device="cpu", out_dir=tmp_path, **TINY)
    data = json.loads((tmp_path / f"gradients-{profile}.json").read_text())
    e = data["metrics"]["effective_lr"]
    assert len(e["weight_norms"]) == TINY["norm_steps"] + 1   # before training, then every step
    assert len(data["metrics"]["lr_sweep"]) == 4               # 2 factors, with and without BN
    assert [p.split("/")[-1] for p in r["figures"]] == [
        f"gradients-{profile}-{part}.png"
        for part in ("at_init", "lr_sweep", "lr_weight_norms", "init_sweep", "rescale", "weight_norm")]
    for row in data["metrics"]["lr_sweep"]:
        # every hidden layer's weight norm before training and every NORM_EVERY steps after
        assert len(row["weight_norms"]) == TINY["sweep_steps"] // gr.NORM_EVERY + 1
        assert all(len(w) == TINY["sweep_depth"] for w in row["weight_norms"])


def _row(bn, lr, acc, diverged):
    return {"bn": bn, "lr": lr, "test_accuracy": acc, "diverged": diverged}


def test_a_diverged_run_is_a_cross_above_the_scale_not_a_point_at_zero():
    import matplotlib.pyplot as plt
    rows = [_row(True, 0.01, 0.98, False), _row(True, 0.3, 0.97, False),
            _row(False, 0.01, 0.97, False), _row(False, 0.3, None, True)]
    fig = gr._sweep_figure(rows, "lr", "learning rate", "t")
    ax = fig.axes[0]
    drawn = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    assert list(drawn["no BN"][1:]) != list(drawn["no BN"][1:])    # nan: no accuracy point
    assert list(drawn["no BN: diverged"]) == [gr.DIVERGED_Y] and gr.DIVERGED_Y > 100
    assert list(drawn["chance (10 classes)"]) == [10, 10]
    assert all(y >= 0 for ys in drawn.values() for y in ys if y == y)
    plt.close(fig)


def test_recorded_figures_are_single_panels_of_the_column_width():
    # One panel per figure, each beside its paragraph: readable on a 390-px phone (plotting.py).
    import matplotlib.pyplot as plt
    from bnlib import plotting
    from bnlib.chapter import recorded_run
    from bnlib.experiments.runner import draw
    for part, fig in draw(recorded_run("gradients", start="book/experiments")).items():
        assert len(fig.axes) == 1, part
        assert fig.get_size_inches()[0] == pytest.approx(plotting.WIDTH), part
        plt.close(fig)
