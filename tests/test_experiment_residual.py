"""bnlib.experiments.residual: the blocks' properties the chapter's argument rests on (zero gamma
starts as the identity, the branch is scale invariant), the probes, and a tiny run."""
import math

import matplotlib.pyplot as plt
import pytest
import torch

from bnlib.experiments import residual as exp
from bnlib.experiments import run_experiment

TINY = dict(dataset="digits", width=32, init_depths=[2, 8], init_batch=64, init_seeds=1,
            train_depths=[2], train_seeds=1, steps=5, batch_size=32)


def _model(variant, depth=4, width=16, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return exp.ResMLP(12, width, depth, 3, variant).to(dtype).train()


def test_zero_gamma_block_is_the_identity_on_its_inputs_at_init():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(32, 16, dtype=torch.float64))  # a block's input is a ReLU output
    block = exp.Block(16, skip=True, zero_gamma=True).to(torch.float64).train()
    assert torch.equal(block(x), x)  # f(x) = 0 * x_hat + 0 exactly, relu(x) = x for x >= 0
    # gamma = 1 (the default): the same block changes its input.
    other = exp.Block(16, skip=True, zero_gamma=False).to(torch.float64).train()
    assert (other(x) - x).abs().max() > 0.1
    # The whole zero-gamma network: every block passes the stem's output through unchanged.
    net = _model("zero_gamma")
    inp = torch.randn(32, 12, dtype=torch.float64)
    h = net.stem(inp)
    out = h
    for b in net.blocks:
        out = b(out)
    assert torch.equal(out, h)


def test_branch_is_scale_invariant_in_its_input():
    # f(c x) = f(x): the first Linear has no bias and BN1 divides out the scale; only eps sees c.
    # With eps = 1e-12 instead of 1e-5 its effect (~ eps / variance relative, the pre-BN
    # variances being ~0.1-1 here) is ~1e-11, and float64 rounding through the two BNs ~1e-14:
    # 1e-9 bounds both. (At eps = 1e-5 the same check is off by ~1e-4 for the smallest units.)
    torch.manual_seed(1)
    block = exp.Block(16).to(torch.float64).train()
    block.bn1.eps = block.bn2.eps = 1e-12
    x = torch.relu(torch.randn(64, 16, dtype=torch.float64))
    for c in (0.5, 4.0):
        torch.testing.assert_close(block.branch(c * x), block.branch(x), rtol=1e-9, atol=1e-9)
    # ... so its Jacobian shrinks as 1/c: the vector-Jacobian product at 4x is a quarter of x's.
    u = torch.randn_like(x)

    def vjp(inp):
        inp = inp.clone().requires_grad_()
        return torch.autograd.grad(block.branch(inp), inp, u)[0]
    torch.testing.assert_close(4 * vjp(4 * x), vjp(x), rtol=1e-9, atol=1e-9)


def test_plain_model_is_the_bn_stack_and_checks_its_arguments():
    net = _model("plain", depth=3)
    assert len(net.linears()) == 2 * 3 + 2 and all(not b.skip for b in net.blocks)
    assert all(b.skip for b in _model("residual").blocks)
    with pytest.raises(ValueError, match="variant must be one of"):
        exp.ResMLP(12, 16, 2, 3, "pre_act")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="depth must be a positive int"):
            exp.ResMLP(12, 16, bad, 3)


def test_probes_zero_gamma_keeps_the_gradient_and_zeroes_the_block_weight_gradients():
    torch.manual_seed(2)
    x, y = torch.randn(48, 12, dtype=torch.float64), torch.randint(0, 3, (48,))
    p = exp.probe_init(_model("zero_gamma", depth=6), x, y)
    assert len(p["sum_sq"]) == 7 and len(p["weight_sq"]) == 1 + 2 * 6
    # dl/ds_l is the same tensor for every l (each ReLU mask equals the one before it), so the
    # squared norms agree to rounding of the float64 sum (16 x 48 terms: ~1e-13 relative).
    assert max(p["sum_sq"]) / min(p["sum_sq"]) - 1 < 1e-12
    assert all(w == 0.0 for w in p["weight_sq"][1:]) and p["weight_sq"][0] > 0
    # With gamma = 1 the blocks' weights do get gradients.
    q = exp.probe_init(_model("residual", depth=6), x, y)
    assert all(w > 0 for w in q["weight_sq"])


def test_skip_connections_stop_the_exponential_growth():
    torch.manual_seed(3)
    x, y = torch.randn(128, 12, dtype=torch.float64), torch.randint(0, 3, (128,))
    ratio = {}
    for v in ("plain", "residual"):
        p = exp.probe_init(_model(v, depth=12, width=64, seed=4), x, y)
        ratio[v] = p["sum_sq"][0] / p["sum_sq"][-1]
    # Plain: about (pi/(pi-1))^2 ~ 2.15 per block, 2.15^12 ~ 1e4; a factor 10 of room for one
    # seed at width 64 (measured: 1.3e4). Residual: polynomial in depth (the chapter measures ~D^2;
    # measured here: 175);
    # finite, above 1 (q_l > 0), and far below the plain stack's.
    assert ratio["plain"] > 1e3
    assert math.isfinite(ratio["residual"]) and 1 < ratio["residual"] < ratio["plain"] / 10


def test_tiny_run_is_deterministic_and_draws_every_part():
    a = run_experiment("residual", profile="quick", device="cpu", **TINY)
    b = run_experiment("residual", profile="quick", device="cpu", **TINY)
    assert a["metrics"] == b["metrics"]
    init = a["metrics"]["at_init"]
    assert [r["depth"] for r in init["plain"]["rows"]] == [2, 8]
    assert all(r["ratio"] == pytest.approx(1.0, rel=1e-5) for r in init["zero_gamma"]["rows"])
    summary = exp.training_summary(a)
    assert [(r["variant"], r["depth"]) for r in summary] == [(v, 2) for v in exp.VARIANTS]
    assert all(0 <= r["test_accuracy"] <= 1 and r["diverged"] == 0 for r in summary)
    figs = exp.figures(a)
    assert set(figs) == {"growth", "layers", "variance", "excess", "training"}
    for f in figs.values():
        plt.close(f)


def test_training_summary_averages_seeds_and_counts_divergence():
    rows = [dict(variant=v, depth=4, diverged=False, final_loss=l, train_accuracy=0.5,
                 test_accuracy=t) for v in exp.VARIANTS for l, t in ((0.1, 0.8), (0.3, 0.6))]
    rows[0] = dict(rows[0], diverged=True, final_loss=None, test_accuracy=None)
    s = exp.training_summary({"config": {"train_depths": [4]}, "metrics": {"training": rows}})
    plain, res = s[0], s[1]
    assert plain["diverged"] == 1 and plain["final_loss"] == pytest.approx(0.3)
    assert res["final_loss"] == pytest.approx(0.2) and res["test_accuracy"] == pytest.approx(0.7)
