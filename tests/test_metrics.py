"""bnlib.experiments.metrics on small cases checked by hand."""
import math

import numpy as np
import pytest
import torch

from bnlib import reference
from bnlib.experiments import metrics as M


def test_percentiles_hand_checked():
    x = torch.arange(101, dtype=torch.float64)  # 0..100: the q-th percentile is q
    assert M.percentiles(x).tolist() == [15.0, 50.0, 85.0]
    y = torch.tensor([0.0, 10.0])  # linear interpolation: q-th percentile of {0, 10} is q/10
    assert torch.allclose(M.percentiles(y, (15, 50, 85)), torch.tensor([1.5, 5.0, 8.5]))
    z = torch.randn(37, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.allclose(M.percentiles(z, (15, 50, 85), dim=0).numpy(),
                       np.percentile(z.numpy(), [15, 50, 85], axis=0))
    with pytest.raises(ValueError, match="qs"):
        M.percentiles(x, (101,))


def test_relative_drift_and_band_width_hand_checked():
    # Two units, 4 records after the (empty, start_fraction=0) warm-up. Unit 0: median goes
    # 0 -> 2, width always 4: drift 2 / 4. Unit 1: constant median, width 1: drift 0.
    pct = torch.tensor([[[-2.0, -1.0], [0.0, 0.0], [2.0, 0.0]],
                        [[-1.0, -1.0], [1.0, 0.0], [3.0, 0.0]],
                        [[0.0, -1.0], [2.0, 0.0], [4.0, 0.0]],
                        [[-1.0, -1.0], [1.0, 0.0], [3.0, 0.0]]])
    assert M.relative_drift(pct, start_fraction=0.0).tolist() == [0.5, 0.0]
    assert M.band_width(pct, start_fraction=0.0).tolist() == [4.0, 1.0]
    # start_fraction 0.5 keeps the last two records; unit 0's median still moves 2 -> 1 there.
    assert M.relative_drift(pct, start_fraction=0.5).tolist() == [0.25, 0.0]


def test_gradient_change_hand_checked():
    d, c = M.gradient_change(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert math.isclose(d.item(), math.sqrt(2), rel_tol=1e-6) and abs(c.item()) < 1e-7
    d, c = M.gradient_change(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
    assert math.isclose(d.item(), math.sqrt(5), rel_tol=1e-6)
    assert math.isclose(c.item(), 1.0, rel_tol=1e-6)
    # Lists of tensors are flattened and concatenated: ([3], [4]) vs ([0], [0]).
    d, c = M.gradient_change([torch.tensor([3.0]), torch.tensor([[4.0]])],
                             [torch.zeros(1), torch.zeros(1, 1)])
    assert math.isclose(d.item(), 5.0, rel_tol=1e-6) and c.item() == 0.0
    with pytest.raises(ValueError, match="g0 and g1"):
        M.gradient_change(torch.ones(2), torch.ones(3))


def test_steps_to_reach():
    assert M.steps_to_reach([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
    assert M.steps_to_reach([0, 10, 20], [0.1, 0.5, 0.9], 0.95) is None
    with pytest.raises(ValueError, match="same length"):
        M.steps_to_reach([0], [0.1, 0.2], 0.5)


@pytest.mark.parametrize("p", [0.5, 0.1, 0.01])
def test_ema_lag_matches_an_ema_fed_a_ramp(p):
    # The EMA of r_t = t settles at t - (1 - p)/p; after 40/p steps the transient (1-p)^t is < e^-40.
    running = 0.0
    steps = int(40 / p)
    for t in range(1, steps + 1):
        running = reference.ema_update(running, float(t), p)
    assert steps - running == pytest.approx(M.ema_lag(p), rel=1e-9)
    with pytest.raises(ValueError, match="momentum"):
        M.ema_lag(0.0)


def test_stat_error_and_mean_error_by_hand():
    # mean off by one std in channel 0, var 50 % high in channel 1: (1 + 0)/2 + (0 + 0.5)/2 = 0.75
    assert M.stat_error([2.0, 0.0], [4.0, 3.0], [0.0, 0.0], [4.0, 2.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="ref_var"):
        M.stat_error([0.0], [1.0], [0.0], [0.0])
    # Two layers, errors 0.75 and 0: their mean.
    layers = [([2.0, 0.0], [4.0, 3.0]), ([1.0], [1.0])]
    ref = [([0.0, 0.0], [4.0, 2.0]), ([1.0], [1.0])]
    assert M.mean_error(layers, ref) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="per layer"):
        M.mean_error(layers, ref[:1])


def test_relative_gap_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 5.0], [1.0, 0.0]])   # row gaps: sqrt(9 + 1)/5 and 0
    assert M.relative_gap(a, b) == pytest.approx(math.sqrt(10) / 5 / 2)
    with pytest.raises(ValueError, match="same shape"):
        M.relative_gap(a, b[:1])


def test_growth_factor_of_a_geometric_sequence():
    norms = 5.0 * 1.5 ** -np.arange(10)    # grows by 1.5 per layer towards the input
    assert M.growth_factor(norms) == pytest.approx(1.5)
    spoiled = norms.copy()
    spoiled[0] *= 100   # a boundary layer, left out by skip=1
    assert M.growth_factor(spoiled, skip=1) == pytest.approx(1.5)
    assert M.growth_factor(spoiled) != pytest.approx(1.5)
    with pytest.raises(ValueError, match="positive"):
        M.growth_factor([1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        M.growth_factor([1.0, 2.0, 3.0], skip=1)


def test_log_slope_of_power_laws():
    x = np.array([0.5, 1.0, 2.0, 4.0])
    assert M.log_slope(x, 3 * x ** -2) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="positive"):
        M.log_slope([1.0, -1.0], [1.0, 1.0])
