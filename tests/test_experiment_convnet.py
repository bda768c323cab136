"""bnlib.experiments.convnet: the network's layers per variant, its symmetry under circular
shifts, the summary arithmetic, and a tiny run through the runner (determinism, figures)."""
import math

import pytest
import torch
from torch import nn

from bnlib.experiments import run_experiment
from bnlib.experiments import convnet as exp
from bnlib.experiments.runner import module
from bnlib.nn import BatchNorm2d

TINY = dict(channels=[2, 3, 3], lrs=[0.1, 1.0], seeds=2, steps=6, batch_size=16, curve_lr=0.1,
            eval_every=3)


def kinds(model):
    return [type(m).__name__ for m in model.features]


def test_layers_per_variant():
    assert kinds(exp.ConvNet(bn="none")) == ["Conv2d", "ReLU", "Conv2d", "ReLU", "AvgPool2d",
                                             "Conv2d", "ReLU"]
    assert kinds(exp.ConvNet(bn="before")) == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + [
        "AvgPool2d", "Conv2d", "BatchNorm2d", "ReLU"]
    assert kinds(exp.ConvNet(bn="after")) == ["Conv2d", "ReLU", "BatchNorm2d"] * 2 + [
        "AvgPool2d", "Conv2d", "ReLU", "BatchNorm2d"]
    for bn in exp.VARIANTS:
        model = exp.ConvNet(channels=(4, 5, 6), bn=bn)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == (0 if bn == "none" else 3)
        assert all(type(m) is BatchNorm2d for m in bns)  # bnlib's, not torch's
        assert [m.num_features for m in bns] == ([] if bn == "none" else [4, 5, 6])
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        # A bias right before BN is cancelled by its mean subtraction, so only "before" drops it.
        assert all((c.bias is None) == (bn == "before") for c in convs)
    with pytest.raises(ValueError, match="bn must be one of"):
        exp.ConvNet(bn="middle")
    with pytest.raises(ValueError, match="channels must be three positive ints"):
        exp.ConvNet(channels=(4, 0, 2))


def test_bn_normalises_each_channel_over_batch_and_positions():
    torch.manual_seed(0)
    model = exp.ConvNet(channels=(3, 4, 4), bn="before").double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64) * 3 + 2
    y = model.features[1](model.features[0](x))  # conv -> BN, training mode
    # Per channel over N*H*W = 320 values: mean 0 and biased variance var/(var + eps) ~ 1,
    # to float64 rounding of a 320-term sum (~1e-14).
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=y.dtype), atol=1e-12, rtol=0)
    z = model.features[0](x)
    v = z.var((0, 2, 3), correction=0)
    torch.testing.assert_close(y.var((0, 2, 3), correction=0), v / (v + 1e-5), atol=1e-12, rtol=0)


@pytest.mark.parametrize("bn", exp.VARIANTS)
def test_circular_padding_logits_invariant_to_even_shifts(bn):
    # With circular padding each conv and per-channel BN commute with torch.roll; the 2x2 pool
    # commutes with even shifts, and the global mean is invariant: logits unchanged up to float64
    # rounding (sums of at most ~300 terms of size ~1: 1e-12 is loose). An odd shift is not
    # (the pool's grid moves), which shows the test can fail.
    torch.manual_seed(1)
    model = exp.ConvNet(channels=(3, 4, 4), bn=bn, padding_mode="circular").double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            out = model(x)
            shifted = model(torch.roll(x, shifts=(2, -4), dims=(2, 3)))
            odd = model(torch.roll(x, shifts=(1, 0), dims=(2, 3)))
        torch.testing.assert_close(shifted, out, atol=1e-12, rtol=0)
        assert (odd - out).abs().max() > 1e-6


def test_summarise_and_best():
    rows = [dict(bn="none", lr=0.1, acc=a, diverged=False) for a in (0.5, 0.7)]
    rows += [dict(bn="none", lr=1.0, acc=0.1, diverged=True),
             dict(bn="none", lr=1.0, acc=0.3, diverged=False)]
    summary = exp.summarise(rows, [0.1, 1.0])
    assert [(s["lr"], s["diverged"]) for s in summary] == [(0.1, 0), (1.0, 1)]
    # mean 0.6; sample std of (0.5, 0.7) = sqrt(2 * 0.1**2 / 1)
    assert math.isclose(summary[0]["mean"], 0.6) and math.isclose(summary[0]["std"], 0.02 ** 0.5)
    assert (summary[1]["min"], summary[1]["max"]) == (0.1, 0.3)
    assert exp.best(summary)["none"]["lr"] == 0.1


def test_divergence_is_recorded_as_chance():
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    cfg = dict(exp.PROFILES["quick"], **dict(TINY, steps=4, eval_every=2))
    row = exp.train_one((x, y, x, y), cfg, "none", 1e12, 0, "cpu", curve=True)
    assert row["diverged"] and row["acc"] == 0.1 and row["final_loss"] is None
    assert len(row["curve_acc"]) == len(row["curve_steps"]) == 3 and None in row["curve_acc"]


def test_tiny_run_is_complete_deterministic_and_drawn():
    assert module("convnet") is exp
    r = run_experiment("convnet", profile="quick", device="cpu", **TINY)
    m = r["metrics"]
    assert len(m["runs"]) == 3 * 2 * 2 and len(m["summary"]) == 3 * 2
    assert m["train_size"] + m["test_size"] == 1797
    assert all(0 <= row["acc"] <= 1 for row in m["runs"])
    curves = [row for row in m["runs"] if "curve_acc" in row]
    assert len(curves) == 3 * 2 and all(row["lr"] == 0.1 for row in curves)
    assert all(row["curve_steps"] == [0, 3, 6] and len(row["losses"]) == 6 for row in curves)
    assert set(m["best"]) == set(exp.VARIANTS)
    again = run_experiment("convnet", profile="quick", device="cpu", **TINY)
    assert again["metrics"] == m
    figs = exp.figures(r)
    assert set(figs) == {"lr_sweep", "placement", "curves"}
    with pytest.raises(ValueError, match="curve_lr must be one of lrs"):
        run_experiment("convnet", profile="quick", device="cpu", **dict(TINY, curve_lr=0.5))
