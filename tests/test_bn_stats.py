"""bnlib.experiments.bn_stats: probes of BN layers' statistics, against direct computations."""
import numpy as np
import pytest
import torch
from torch import nn

from bnlib.experiments import bn_stats as S
from bnlib.nn import BatchNorm1d


def _bn_only(c=3):
    return nn.Sequential(BatchNorm1d(c))


def test_precise_stats_is_the_average_of_batch_statistics_with_m_over_m_minus_1():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(2.0, 3.0, size=(12, 3)))
    model = _bn_only().double()
    (mean, var), = S.precise_stats(model, x, batch_size=4)
    xs = x.numpy().reshape(3, 4, 3)
    assert np.allclose(mean, xs.mean(axis=(0, 1)))
    assert np.allclose(var, xs.var(axis=1).mean(axis=0) * 4 / 3)
    (_, var_b), = S.precise_stats(model, x, batch_size=4, unbiased_var=False)
    assert np.allclose(var_b, xs.var(axis=1).mean(axis=0))
    # the running buffers are left as they were (zeros, ones, no batches counted)
    bn = model[0]
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert int(bn.num_batches_tracked) == 0


def test_trackers_follow_torch_running_stats():
    # The hook-driven EMA with momentum 0.1 must reproduce what BatchNorm1d itself stores.
    torch.manual_seed(0)
    model = _bn_only().double().train()
    trackers = S.StatTrackers(model, [0.1])
    batches = [torch.randn(5, 3, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    for b in batches:
        model(b)
    trackers.remove()
    rm, rv = trackers.stats["ema 0.1"][0]
    assert np.allclose(rm, model[0].running_mean.numpy()) and np.allclose(rv, model[0].running_var.numpy())
    cm, cv = trackers.stats["cumulative"][0]
    assert np.allclose(cm, np.mean([b.mean(0).numpy() for b in batches], 0))
    assert np.allclose(cv, np.mean([b.var(0).numpy() for b in batches], 0))   # unbiased, as torch


def test_set_running_stats_and_eval_second_moments_by_hand():
    model = _bn_only(2).double()
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    # Stored mean (2, 2) and variance (1, 4): x_hat = (-1, 1) and (-1, 1), E[x_hat^2] = 1 each,
    # up to eps = 1e-5 in the denominator (relative 1e-5 / 1 at most).
    S.set_running_stats(model, [([2.0, 2.0], [1.0, 4.0])])
    assert S.eval_second_moments(model, x) == [pytest.approx(1.0, rel=2e-5)]
    S.set_running_stats(model, [([2.0, 2.0], [0.25, 1.0])])   # half the std: four times the moment
    assert S.eval_second_moments(model, x)[0] == pytest.approx((4.0 + 4.0) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="per BN layer"):
        S.set_running_stats(model, [])


def test_layer_batch_stats_are_biased_and_leave_the_running_stats_alone():
    model = _bn_only(1).double().eval()
    x = torch.tensor([[1.0], [2.0], [6.0]], dtype=torch.float64)
    (mean, var), = S.layer_batch_stats(model, x)
    assert mean.tolist() == [3.0] and var == pytest.approx([14 / 3])   # (4 + 1 + 9) / 3
    assert model[0].running_mean.tolist() == [0.0] and model[0].running_var.tolist() == [1.0]
    assert not model.training                                          # its mode restored


def test_trackers_skip_forward_passes_while_paused():
    # A probe's forward pass in train mode (layer_batch_stats) is no training batch: paused, the
    # trackers neither count it nor move their averages.
    torch.manual_seed(0)
    model = _bn_only().double().train()
    trackers = S.StatTrackers(model, [0.5])
    model(torch.randn(5, 3, dtype=torch.float64))
    before = [a.copy() for a in trackers.stats["ema 0.5"][0]]
    with trackers.paused():
        S.layer_batch_stats(model, torch.randn(50, 3, dtype=torch.float64) + 10)
    assert trackers.count == 1
    assert all(np.array_equal(a, b) for a, b in zip(trackers.stats["ema 0.5"][0], before))
    S.layer_batch_stats(model, torch.randn(50, 3, dtype=torch.float64) + 10)   # not paused
    assert trackers.count == 2
    trackers.remove()
