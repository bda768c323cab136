"""bnlib.deploy: fold_into against bn(layer(x)) and torch.nn.utils.fusion in float64, its errors,
and fold_model on small nets (which pairs it folds, and which it must leave alone)."""
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnlib.nn as bnn
from bnlib.deploy import fold_into, fold_model, foldable_pairs, folded_weights

# Float64 tolerance: the folded and unfolded layers sum the same <= 200 products (fan-in) in a
# different order and scale them once more; each rounding is at most 2^-53 relative, so the two
# differ by about 200 * 1.1e-16 * (size of the summed terms, <= 10 here) ~ 2e-13. 1e-10 leaves
# margin, while a wrong fold (scale on the wrong axis, mean not subtracted) is off by O(1).
TOL = dict(rtol=1e-10, atol=1e-10)


def randomise(bn, gen):
    """Random running statistics (variances from 1e-3 to 3) and affine, so nothing is trivially 1/0."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 2)
        bn.running_var.copy_(10 ** (torch.rand(c, generator=gen, dtype=torch.float64) * 3.5 - 3))
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 2 - 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    return bn.eval()


LAYERS = {  # (layer, BN class, input shape): stride, dilation, groups, padding modes
    "linear": (lambda b: nn.Linear(7, 6, bias=b), nn.BatchNorm1d, (5, 7)),
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, bias=b),
               nn.BatchNorm1d, (3, 4, 17)),
    "conv2d": (lambda b: nn.Conv2d(4, 6, 3, stride=(2, 1), groups=2, padding=1,
                                   padding_mode="circular", bias=b), nn.BatchNorm2d, (3, 4, 9, 8)),
    "conv2d_depthwise": (lambda b: nn.Conv2d(6, 6, 5, groups=6, padding="same", dilation=2,
                                             bias=b), bnn.BatchNorm2d, (2, 6, 11, 11)),
    "conv3d": (lambda b: nn.Conv3d(4, 6, (2, 3, 1), stride=2, groups=2, padding=(1, 0, 1),
                                   bias=b), nn.BatchNorm3d, (2, 4, 5, 6, 4)),
}


def pair(kind, bias, affine, bn_cls=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make, cls, shape = LAYERS[kind]
    torch.manual_seed(seed)
    layer = make(bias).double()
    bn = randomise((bn_cls or cls)(6, affine=affine).double(), gen)
    return layer, bn, torch.randn(shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("kind,bias,affine", list(itertools.product(LAYERS, [True, False], [True, False])))
def test_fold_equals_bn_of_layer_in_float64(kind, bias, affine):
    layer, bn, x = pair(kind, bias, affine)
    folded = fold_into(layer, bn)
    torch.testing.assert_close(folded(x), bn(layer(x)), **TOL)
    assert type(folded) is type(layer) and folded.bias is not None and folded is not layer
    for name in ("stride", "padding", "dilation", "groups", "padding_mode", "in_features"):
        assert getattr(folded, name, None) == getattr(layer, name, None)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_bnlib_bn_classes_fold_as_torch_ones(kind):
    cls = {"conv1d": bnn.BatchNorm1d, "conv2d": bnn.BatchNorm2d}[kind]
    layer, bn, x = pair(kind, True, True, bn_cls=cls)
    torch.testing.assert_close(fold_into(layer, bn)(x), bn(layer(x)), **TOL)


@pytest.mark.parametrize("kind,bias,affine", list(itertools.product(LAYERS, [True, False], [True, False])))
def test_fold_matches_torch_fusion_in_float64(kind, bias, affine):
    layer, bn, _ = pair(kind, bias, affine, seed=1)
    layer.eval()
    ours = fold_into(layer, bn)
    if kind == "linear" and not affine:
        # torch 2.x's fuse_linear_bn_weights multiplies by bn.weight without a None check: it
        # fails on an affine=False BN. Compare with it on the same map written as gamma=1, beta=0.
        with pytest.raises(TypeError):
            fuse_linear_bn_eval(layer, bn)
        same = nn.BatchNorm1d(6).double().eval()
        same.load_state_dict({**bn.state_dict(), "weight": torch.ones(6), "bias": torch.zeros(6)})
        bn = same
    theirs = (fuse_linear_bn_eval if kind == "linear" else fuse_conv_bn_eval)(layer, bn)
    torch.testing.assert_close(ours.weight, theirs.weight, **TOL)
    torch.testing.assert_close(ours.bias, theirs.bias, **TOL)


def test_folded_weights_algebra_per_channel():
    """Channel c's slice is scaled by gamma_c / sqrt(var_c + eps); the bias shifted by -mu_c."""
    w = torch.arange(12.0, dtype=torch.float64).reshape(3, 2, 2)
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 8.0])
    gamma, beta = torch.tensor([2.0, 1.0, 6.0]), torch.tensor([0.5, 0.0, -1.0])
    nw, nb = folded_weights(w, None, mean, var, 1.0, gamma, beta)   # eps = 1: sigma = 2, 1, 3
    scale = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(nw, w * scale[:, None, None], rtol=0, atol=0)
    torch.testing.assert_close(nb, torch.tensor([-0.5, -2.0, -7.0]), rtol=0, atol=0)


def test_fold_is_computed_in_float64_then_rounded_once():
    layer, bn, _ = pair("conv2d", True, True, seed=2)
    exact = fold_into(layer, bn)
    small = fold_into(layer.float(), bn.float())
    assert small.weight.dtype == small.bias.dtype == torch.float32
    # bn.float() rounded the statistics: fold the same rounded values in float64 and compare.
    ref = fold_into(layer.double(), bn.double())
    assert torch.equal(small.weight, ref.weight.float()) and torch.equal(small.bias, ref.bias.float())
    assert exact.weight.dtype == torch.float64
    half = fold_into(nn.Linear(3, 4).to(torch.bfloat16), nn.BatchNorm1d(4).eval())
    assert half.weight.dtype == half.bias.dtype == torch.bfloat16


def test_fold_leaves_its_inputs_unchanged():
    layer, bn, x = pair("conv2d", False, True)
    before = [t.clone() for t in (*layer.parameters(), *bn.parameters(), *bn.buffers())]
    fold_into(layer, bn)
    after = [*layer.parameters(), *bn.parameters(), *bn.buffers()]
    assert layer.bias is None and all(torch.equal(a, b) for a, b in zip(before, after))


def test_frozen_batchnorm_folds_in_train_and_eval():
    frozen_cls = getattr(bnn, "FrozenBatchNorm2d", None)
    if frozen_cls is None:
        pytest.skip("bnlib.nn.FrozenBatchNorm2d does not exist yet")
    layer, bn, x = pair("conv2d", True, True)
    frozen = frozen_cls.from_batchnorm(bn)
    frozen.train()    # a frozen BN computes the same map in train mode: no eval() needed
    torch.testing.assert_close(fold_into(layer, frozen)(x), bn(layer(x)), **TOL)


def test_errors_name_the_problem():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="training mode.*bn.eval"):
        fold_into(conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="no running statistics"):
        fold_into(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="out_channels=4.*5 channels"):
        fold_into(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match="out_features=4.*3 channels"):
        fold_into(nn.Linear(2, 4), nn.BatchNorm1d(3).eval())
    with pytest.raises(ValueError, match="does not take the 3D output of Conv1d"):
        fold_into(nn.Conv1d(3, 4, 3), nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match="does not take the 2D output of Linear"):
        fold_into(nn.Linear(3, 4), nn.BatchNorm2d(4).eval())
    with pytest.raises(TypeError, match="transposed convolutions are not supported"):
        fold_into(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4).eval())
    with pytest.raises(TypeError, match="layer must be a torch.nn.Linear, Conv1d.*ReLU"):
        fold_into(nn.ReLU(), nn.BatchNorm2d(4).eval())
    with pytest.raises(TypeError, match="bn must be a batch-norm layer.*Linear"):
        fold_into(conv, nn.Linear(4, 4))
    with pytest.raises(ValueError, match="layer .*not initialised"):
        fold_into(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match="bn .*not initialised"):
        fold_into(conv, nn.LazyBatchNorm2d().eval())
    with pytest.raises(ValueError, match="parametrizations"):
        fold_into(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4).eval())


# --- fold_model ---------------------------------------------------------------------------------

def randomised(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model.double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            randomise(m, gen)
    return model.eval()


class Block(nn.Module):
    """A ResNet basic block: conv-bn-relu, conv-bn, plus the input, relu."""

    def __init__(self, c, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class Edges(nn.Module):
    """Pairs that must not fold: BN after ReLU, a shared conv, a conv output used twice, BN before
    conv, and one that may: the conv -> bn at the end."""

    def __init__(self):
        super().__init__()
        self.shared, self.bn_s1, self.bn_s2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.skip_conv, self.bn_skip = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pre_bn, self.after = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.relu_conv, self.bn_relu = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.last, self.bn_last = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_s1(self.shared(x)) + self.bn_s2(self.shared(x * 2))   # conv called twice
        z = self.skip_conv(a)
        b = self.bn_skip(z) + z                                            # z used twice
        c = self.after(self.pre_bn(b))                                     # BN before the conv
        d = self.bn_relu(torch.relu(self.relu_conv(c)))                    # BN after a ReLU
        return self.bn_last(self.last(d))


def _eval_equal(model, x):
    folded = fold_model(model)
    torch.testing.assert_close(folded(x), model(x), **TOL)
    return folded


def test_sequential_stacks_fold_every_pair():
    model = randomised(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=4, bias=False), bnn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5), nn.BatchNorm1d(5, affine=False)))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert foldable_pairs(model) == [("0", "1"), ("3", "4"), ("7", "8")]
    folded = _eval_equal(model, x)
    assert type(folded) is nn.Sequential
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert isinstance(model[1], nn.BatchNorm2d)   # the original still has its BN layers


def test_resnet_block_folds_through_fx():
    model = randomised(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                     Block(6), Block(6, bnn.BatchNorm2d)))
    assert foldable_pairs(model) == [("0", "1"), ("3.conv1", "3.bn1"), ("3.conv2", "3.bn2"),
                                     ("4.conv1", "4.bn1"), ("4.conv2", "4.bn2")]
    folded = _eval_equal(model, torch.randn(2, 3, 9, 9, dtype=torch.float64))
    assert type(folded[3]) is Block and isinstance(folded[3].bn2, nn.Identity)


def test_edges_are_left_alone():
    model = randomised(Edges())
    assert foldable_pairs(model) == [("last", "bn_last")]
    _eval_equal(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_tied_hooked_and_statless_pairs_are_left_alone():
    model = randomised(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4),
                                     nn.BatchNorm1d(4), nn.Linear(4, 4),
                                     nn.BatchNorm1d(4, track_running_stats=False)))
    model[2].weight = model[0].weight                    # tied weights: folding one changes both
    model[3].register_forward_hook(lambda m, i, o: None)  # a hook would see another tensor
    assert foldable_pairs(model) == []
    _eval_equal(model, torch.randn(6, 4, dtype=torch.float64))


def test_fold_model_refuses_training_and_untraceable_models():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"0 -> 1: .*training mode.*model.eval\(\)"):
        fold_model(model)

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x   # data-dependent branch

    with pytest.raises(TypeError, match="cannot trace Dynamic"):
        fold_model(Dynamic().eval())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fold_model("resnet")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fold_on_cuda_matches_cpu():
    layer, bn, x = pair("conv2d", True, True, seed=3)
    cpu = fold_into(layer.float(), bn.float())
    gpu = fold_into(layer.cuda(), bn.cuda())
    assert gpu.weight.device.type == "cuda" and gpu.weight.dtype == torch.float32
    # Both fold in float64 and round once: the same float32 numbers, bit for bit.
    assert torch.equal(gpu.weight.cpu(), cpu.weight) and torch.equal(gpu.bias.cpu(), cpu.bias)
    model = fold_model(nn.Sequential(layer, bn).cuda())
    # float32 convolutions on a GPU may run in TF32 (torch's cuDNN default, 10-bit mantissa):
    # outputs of size ~10 then agree to ~1e-2 relative; 1e-3 absolute would be too tight, so
    # rtol = atol = 3e-2; a wrong fold is off by O(1).
    torch.testing.assert_close(model(x.float().cuda()), bn(layer(x.float().cuda())),
                               rtol=3e-2, atol=3e-2)


def test_frozen_and_renorm_layers_fold_in_a_model():
    frozen = randomised(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    bnn.freeze(frozen)            # BatchNorm2d -> FrozenBatchNorm2d, in place
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert foldable_pairs(frozen) == [("0", "1"), ("3", "4")]
    _eval_equal(frozen.train(), x)    # frozen layers fold in train mode too
    renorm = randomised(nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchRenorm2d(4)))
    assert foldable_pairs(renorm) == [("0", "1")]
    _eval_equal(renorm, x)


class ReadsWeight(nn.Module):
    """A forward that also reads the conv's weight directly (weight decay term, tying...)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def test_a_layer_read_elsewhere_is_left_alone():
    model = randomised(ReadsWeight())
    assert foldable_pairs(model) == []
    _eval_equal(model, torch.randn(2, 3, 4, 4, dtype=torch.float64))
