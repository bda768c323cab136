"""bnlib.experiments.regularisation: the 2x2 grid's networks, the gaps' definition and sign,
ghost batches, determinism and the figure parts, on tiny configurations."""
import pytest
import torch
from torch import nn

from bnlib.experiments import regularisation as exp
from bnlib.experiments import run_experiment
from bnlib.experiments.data import load_dataset
from bnlib.experiments.sync_bn import GhostBatchNorm1d
from bnlib.nn import BatchNorm1d

# digits (ships with scikit-learn: nothing generated), a narrow net, a few epochs.
TINY = dict(dataset="digits", n_train=64, width=16, seeds=2, epochs=2, batch_size=16,
            ghost_sizes=[4, 16], batch_sizes=[8, 16])


def kinds(model):
    return [type(m) for m in model]


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_grid_networks_have_bn_and_dropout_exactly_where_asked(bn, dropout):
    model = exp.regularised_mlp(10, 8, 2, 3, bn, dropout)
    k = kinds(model)
    assert k.count(BatchNorm1d) == (2 if bn else 0)
    assert k.count(nn.Dropout) == (2 if dropout else 0)
    assert all(m.p == dropout for m in model if isinstance(m, nn.Dropout))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    # a Linear feeding BN has no bias (BN's mean subtraction would cancel it); the read-out has one
    assert [lin.bias is not None for lin in linears] == [not bn, not bn, True]
    x = torch.randn(32, 10)
    model.train()
    twice = model(x), model(x)
    # dropout draws a new mask per call in training: outputs differ exactly when it is present
    assert torch.equal(*twice) == (not dropout)
    model.eval()
    assert torch.equal(model(x), model(x))  # eval: no dropout, running statistics


def test_ghost_network_and_argument_errors():
    model = exp.regularised_mlp(10, 8, 2, 3, True, 0.0, ghost=4)
    assert [m.group for m in model if isinstance(m, GhostBatchNorm1d)] == [4, 4]
    with pytest.raises(ValueError, match="dropout"):
        exp.regularised_mlp(10, 8, 2, 3, False, 1.0)
    with pytest.raises(ValueError, match="ghost"):
        exp.regularised_mlp(10, 8, 2, 3, False, 0.0, ghost=4)
    with pytest.raises(ValueError, match="ghost_sizes"):
        run_experiment("regularisation", profile="quick", device="cpu",
                       **{**TINY, "ghost_sizes": [3]})
    with pytest.raises(ValueError, match="batch_sizes"):
        run_experiment("regularisation", profile="quick", device="cpu",
                       **{**TINY, "batch_sizes": [128]})
    with pytest.raises(ValueError, match="n_train"):
        run_experiment("regularisation", profile="quick", device="cpu", **{**TINY, "n_train": 10**6})


def _digits(n):
    x, y, xt, yt = load_dataset("digits", seed=0)
    return x[:n], y[:n], xt, yt


def test_gaps_are_train_minus_test_and_vanish_when_test_is_train():
    x, y, _, _ = _digits(64)
    cfg = {**exp.PROFILES["quick"], **TINY}
    same = exp.fit((x, y, x, y), cfg, True, True, seed=0)
    assert same["acc_gap"] == 0.0 and same["loss_gap"] == 0.0  # the same set, in eval mode
    # Test labels shifted by one class: the net, fitted to the true labels, is worse on them.
    wrong = exp.fit((x, y, x, (y + 1) % 10), {**cfg, "epochs": 20}, True, False, seed=0)
    assert wrong["acc_gap"] == wrong["train_acc"] - wrong["test_acc"] > 0.3
    assert wrong["loss_gap"] == wrong["test_loss"] - wrong["train_loss"] > 0
    assert wrong["steps"] == 20 * (64 // 16)


def test_ghost_of_the_whole_batch_is_plain_bn():
    data = _digits(64)
    cfg = {**exp.PROFILES["quick"], **TINY}
    plain, ghost = exp.fit(data, cfg, True, False, 0), exp.fit(data, cfg, True, False, 0, ghost=16)
    # the same arithmetic through another layer: equal to float32 rounding over 8 steps
    assert ghost["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)
    small = exp.fit(data, cfg, True, False, 0, ghost=4)
    assert small["test_loss"] != pytest.approx(plain["test_loss"], rel=1e-4)


def test_tiny_run_is_deterministic_and_draws_its_parts():
    a = run_experiment("regularisation", profile="quick", device="cpu", seed=3, **TINY)
    b = run_experiment("regularisation", profile="quick", device="cpu", seed=3, **TINY)
    assert a["metrics"] == b["metrics"]
    m = a["metrics"]
    assert [r["variant"] for r in m["grid"]] == ["no_bn", "no_bn+dropout", "bn", "bn+dropout"]
    assert [r["ghost"] for r in m["ghost"]] == [4, 16]
    for r in m["grid"] + m["ghost"]:
        assert len(r["test_acc_seeds"]) == 2 and 0 <= r["test_acc"] <= 1
        assert r["acc_gap"] == pytest.approx(r["train_acc"] - r["test_acc"], abs=1e-12)
    sweep = {r["batch_size"]: r for r in m["sweep"]}
    assert [r["batch_size"] for r in m["sweep"]] == [8, 16]
    assert sweep[8]["lr"] == pytest.approx(a["config"]["lr"] / 2)  # lr scaled with the batch
    assert sweep[8]["no_bn"]["steps"] == 2 * (64 // 8)              # same epochs, more steps
    grid = {r["variant"]: r for r in m["grid"]}
    for norm in ("no_bn", "bn"):  # the sweep's B = batch_size is the grid's run
        assert sweep[16][norm]["test_acc_seeds"] == grid[norm]["test_acc_seeds"]
    assert sweep[8]["bn_effect"] == sweep[8]["bn"]["test_acc"] - sweep[8]["no_bn"]["test_acc"]
    figs = exp.figures(a)
    assert set(figs) == {"accuracy", "gap", "test_loss", "batch_size", "ghost"}
    import matplotlib.pyplot as plt
    for f in figs.values():
        plt.close(f)
