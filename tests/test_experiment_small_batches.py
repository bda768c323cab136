"""bnlib.experiments.small_batches: microbatch normalisation, non-i.i.d. minibatches, the ramp
hook, and a tiny run through the runner."""
import math

import numpy as np
import pytest
import torch

from bnlib.experiments import run_experiment
from bnlib.experiments import small_batches as exp

TINY = dict(width=8, groups=2, batch=8, micro=[2, 8], classes_per_batch=[2], steps=6, seeds=1)


def test_micro_normalises_each_group_alone_and_one_step_weighs_as_one_update():
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64) * 3 + 1
    layer = torch.nn.BatchNorm1d(5, dtype=torch.float64)
    micro = exp.Micro(layer, group=4, batch=12, momentum=0.1)
    y = micro(x)
    for k in range(3):  # each group of 4 by its own statistics, as F.batch_norm on it alone
        part = x[4 * k:4 * k + 4]
        torch.testing.assert_close(y[4 * k:4 * k + 4],
                                   torch.nn.functional.batch_norm(part, None, None, training=True))
    # three updates of m_g from (0, 1): the mean is sum_k m_g (1 - m_g)^(2-k) mu_k, and the
    # weights add up to 1 - (1 - m_g)^3 = 0.1, the weight of one ordinary update.
    m_g = layer.momentum
    assert math.isclose((1 - m_g) ** 3, 0.9, rel_tol=1e-12)
    means = [x[4 * k:4 * k + 4].mean(0) for k in range(3)]
    expect = sum(m_g * (1 - m_g) ** (2 - k) * means[k] for k in range(3))
    torch.testing.assert_close(layer.running_mean, expect)
    micro.eval()  # eval: the whole input through the running statistics, no split
    torch.testing.assert_close(micro(x), layer(x))
    with pytest.raises(ValueError, match="divide batch=12"):
        exp.Micro(torch.nn.BatchNorm1d(5), group=5, batch=12)


def test_noniid_rows_hold_k_classes_evenly_and_repeat_with_the_seed():
    labels = np.repeat(np.arange(10), 20)
    rows = exp.noniid_indices(labels, k=3, batch=16, steps=50, seed=1)
    assert rows.shape == (50, 16)
    for row in rows.numpy():
        assert len(set(row)) == 16                      # no example twice in a batch
        counts = sorted(np.bincount(labels[row]).tolist(), reverse=True)[:4]
        assert counts == [6, 5, 5, 0]                   # 3 classes, 16 = 6 + 5 + 5
    # the picked classes vary from batch to batch (50 draws of 3 of 10 classes)
    assert len({tuple(sorted(set(labels[r]))) for r in rows.numpy()}) > 10
    assert torch.equal(rows, exp.noniid_indices(labels, 3, 16, 50, seed=1))
    assert not torch.equal(rows, exp.noniid_indices(labels, 3, 16, 50, seed=2))
    with pytest.raises(ValueError, match="k must be in"):
        exp.noniid_indices(labels, 11, 16, 5)
    with pytest.raises(ValueError, match="needs 32 examples a class"):
        exp.noniid_indices(labels, 1, 32, 5)


def test_group_and_layer_norm_have_no_mode_gap_and_do_not_see_g():
    cfg = {**exp.PROFILES["quick"], **TINY}
    for arm in ("gn", "ln"):
        a, b = (exp.build(arm, 6, 3, cfg, g) for g in (2, 8))
        assert not any(isinstance(m, exp.Micro) for m in a.modules())
        x = torch.randn(8, 6)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a.train()(x), a.eval()(x))   # no batch statistics at all
        torch.testing.assert_close(a(x), b(x))


def test_ramp_hook_holds_plain_bn_then_relaxes_to_the_limits():
    pytest.importorskip("bnlib.renorm")
    cfg = {**exp.PROFILES["quick"], **TINY, "steps": 100, "ramp": [0.1, 0.5, 0.3]}
    model = exp.build("renorm", 6, 3, cfg, 2)
    layers = [m.layer for m in model.modules() if isinstance(m, exp.Micro)]
    hook = exp.ramp_hook(model, cfg)
    seen = {}
    for step in (0, 10, 30, 50, 99):
        hook(step, None)
        seen[step] = {(lay.r_max, lay.d_max) for lay in layers}
        assert len(seen[step]) == 1                      # every layer at the same limits
    assert seen[0] == seen[10] == {(1.0, 0.0)}           # warm-up: r = 1, d = 0 is plain BN
    (r30, d30), = seen[30]
    assert 1.0 < r30 < 3.0 and d30 == 5.0                # d_max reached at 30 %, r_max later
    assert seen[50] == seen[99] == {(3.0, 5.0)}


def test_tiny_run_reports_every_arm_and_draws_four_parts():
    pytest.importorskip("bnlib.renorm")
    r = run_experiment("small_batches", profile="quick", device="cpu", **TINY)
    m = r["metrics"]
    assert [(row["arm"], row["group"]) for row in m["micro"]] == [
        (a, g) for g in (2, 8) for a in exp.ARMS]
    assert [(row["arm"], row["classes"]) for row in m["noniid"]] == [(a, 2) for a in exp.ARMS]
    for row in m["micro"] + m["noniid"]:
        assert 0 <= row["acc_eval"] <= 1 and 0 <= row["acc_train_mode"] <= 1
        assert math.isfinite(row["loss"]) and len(row["acc_eval_seeds"]) == 1
        if row["arm"] in ("gn", "ln"):
            assert row["gap"] == 0.0                     # the same function in both modes
    gn2, gn8 = (row for row in m["micro"] if row["arm"] == "gn")
    assert gn2["acc_eval"] == gn8["acc_eval"]            # g does not reach GroupNorm
    figs = exp.figures(r)
    assert set(figs) == {"accuracy", "gap", "noniid", "noniid_gap"}
    with pytest.raises(ValueError, match=r"micro must include batch \(8\)"):
        run_experiment("small_batches", profile="quick", device="cpu", **{**TINY, "micro": [2, 4]})
