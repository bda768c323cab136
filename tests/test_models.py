"""bnlib.experiments.models: the MLP's layout and initializations, and noisy BN."""
import math

import pytest
import torch
from torch import nn

from bnlib.experiments.models import NoisyBatchNorm1d, held_noise, hidden_linears, mlp


def test_mlp_layers_and_errors():
    net = mlp(4, [5, 6], 3, norm="bn", init_std=0.5)
    assert [tuple(lin.weight.shape) for lin in net.linears()] == [(5, 4), (6, 5), (3, 6)]
    assert net.linears()[0].bias is None  # BN cancels the bias
    logits, pre = net(torch.randn(7, 4), keep_preacts=True)
    assert logits.shape == (7, 3) and [p.shape[1] for p in pre] == [5, 6]
    with pytest.raises(ValueError, match="activation"):
        mlp(4, [5], 3, activation="swish")
    with pytest.raises(ValueError, match="norm"):
        mlp(4, [5], 3, norm="ln")
    with pytest.raises(ValueError, match="init_std"):
        mlp(4, [5], 3, init_std=0.0)


def test_mlp_layout_and_bad_arguments():
    model = mlp(5, [7] * 3, 2, "relu", "bn", he_scale=1.0)
    kinds = [type(m).__name__ if isinstance(m, nn.Module) else m.__name__ for m in model.layers()]
    assert kinds == ["Linear", "BatchNorm1d", "relu"] * 3 + ["Linear"]
    assert all(lin.bias is None for lin in hidden_linears(model))   # BN's beta replaces the bias
    assert all(lin.bias is not None for lin in hidden_linears(mlp(5, [7] * 3, 2, "relu", he_scale=1.0)))
    with pytest.raises(ValueError, match="widths"):
        mlp(5, [7, 0], 2, he_scale=1.0)
    with pytest.raises(ValueError, match="he_scale"):
        mlp(5, [7], 2, he_scale=0.0)
    with pytest.raises(ValueError, match="not both"):
        mlp(5, [7], 2, init_std=0.1, he_scale=1.0)


def test_noisy_bn_shifts_in_training_only():
    torch.manual_seed(0)
    layer = NoisyBatchNorm1d(50, shift=1.0, scale=2.0, spread=0.5)
    x = torch.randn(64, 50)
    y = layer(x)
    # Plain BN output has per-unit batch mean 0 and std 1; with noise the unit means spread
    # over [-1, 1] (plus sampling error) and the stds over [0.5, 2.2]: far from (0, 1).
    assert y.mean(0).abs().max() > 0.3
    assert (y.std(0) - 1).abs().max() > 0.2
    with held_noise(layer):
        assert torch.equal(layer(x), layer(x))  # held: the same draw twice
    assert not torch.equal(layer(x), layer(x))   # a new draw every step
    layer.eval()
    assert torch.equal(layer(x), layer.bn(x))    # eval: plain BN
    with pytest.raises(ValueError, match="scale"):
        NoisyBatchNorm1d(3, scale=0.5)


def test_init_std_gives_every_architecture_the_same_weights():
    nets = {}
    for norm in (None, "bn", "noisy_bn"):
        torch.manual_seed(3)
        nets[norm] = mlp(6, [5, 4], 3, norm=norm, init_std=0.1)
    for norm in ("bn", "noisy_bn"):
        for a, b in zip(nets[None].linears(), nets[norm].linears()):
            assert torch.equal(a.weight, b.weight)
    torch.manual_seed(4)
    assert not torch.equal(mlp(6, [5, 4], 3, init_std=0.1).out.weight, nets[None].out.weight)


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
