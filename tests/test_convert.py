"""bnlib.convert against the live frameworks: a converted layer's eval output equals the torch
layer's (to float32 rounding), round trips return the same state, and layers whose convention
has no exact counterpart raise ConventionError."""
import importlib.util

import numpy as np
import pytest
import torch

from bnlib import convert
from bnlib import nn as bnn
from bnlib.conventions import import_jax, import_keras, keras_numpy

for _name in ("keras", "flax"):
    if importlib.util.find_spec(_name) is None:
        pytest.skip(f"{_name} is not installed (pip install -e .[test] installs it)",
                    allow_module_level=True)
keras, jax = import_keras(), import_jax()   # Keras on the torch backend, JAX on the CPU
from flax import linen  # noqa: E402

UNIT = 2.0 ** -24   # float32 rounding, relative


def trained(cls=torch.nn.BatchNorm2d, channels=3, seed=0, **kw):
    """A BN layer after a few training batches, with random weight and bias, in eval mode."""
    torch.manual_seed(seed)
    bn = cls(channels, **kw)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
    if bn.bias is not None:
        with torch.no_grad():
            bn.bias.uniform_(-1.0, 1.0)
    shape = (8, channels) + (4, 4) * (cls in (torch.nn.BatchNorm2d, bnn.BatchNorm2d))
    dtype = bn.running_mean.dtype
    for _ in range(5):
        bn(3 + 2 * torch.randn(shape, dtype=dtype))
    return bn.eval(), 3 + 2 * torch.randn(shape, dtype=dtype)


def tolerance(bn, x):
    """Per element: each implementation rounds a handful of times in float32 (x - mean or
    x * a + b with a = gamma / sqrt(var + eps), b = beta - mean * a: at most 4 roundings of 2^-24
    each, relative to the terms |gamma| (|x| + |mean|) / sqrt(var + eps) and |beta|); two
    implementations, so 8 units of those terms."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    one = torch.ones(bn.num_features, dtype=x.dtype)
    g = (bn.weight if bn.weight is not None else one).detach().view(view)
    b = (bn.bias if bn.bias is not None else 0 * one).detach().view(view)
    terms = g.abs() * (x.abs() + bn.running_mean.view(view).abs()) / torch.sqrt(
        bn.running_var.view(view) + bn.eps) + b.abs()
    return (8 * UNIT * terms).numpy()


def keras_eval(layer, x):
    return keras_numpy(layer(x, training=False))


LAYERS = [dict(cls=torch.nn.BatchNorm2d), dict(cls=bnn.BatchNorm2d),
          dict(cls=torch.nn.BatchNorm1d, channels=5), dict(cls=bnn.BatchNorm1d, channels=5),
          dict(cls=torch.nn.BatchNorm2d, momentum=0.3, eps=1e-3), dict(cls=torch.nn.BatchNorm2d, affine=False),
          dict(cls=torch.nn.BatchNorm1d, channels=4, bias=False)]


@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: f"{s['cls'].__module__.split('.')[0]}"
                         f".{s['cls'].__name__}-{sorted(set(s) - {'cls', 'channels'})}")
def test_eval_outputs_equal(spec):
    bn, x = trained(**spec)
    y = bn(x).detach().numpy()
    tol = tolerance(bn, x)
    layer = convert.to_keras(bn)
    assert np.all(np.abs(keras_eval(layer, x.numpy()) - y) <= tol)
    module, variables = convert.to_flax(bn)
    assert np.all(np.abs(np.asarray(module.apply(variables, x.numpy())) - y) <= tol)


def test_channels_last():
    """axis=-1: the same per-channel values over channels-last data (NHWC)."""
    bn, x = trained()
    y = bn(x).detach().permute(0, 2, 3, 1).numpy()
    xl, tol = x.permute(0, 2, 3, 1).numpy(), np.moveaxis(tolerance(bn, x), 1, -1)
    assert np.all(np.abs(keras_eval(convert.to_keras(bn, axis=-1), xl) - y) <= tol)
    module, variables = convert.to_flax(bn, axis=-1)
    assert np.all(np.abs(np.asarray(module.apply(variables, xl)) - y) <= tol)


def test_hyper_parameters():
    bn, _ = trained(momentum=0.1, eps=1e-5)
    layer = convert.to_keras(bn)
    assert (layer.momentum, layer.epsilon, layer.axis) == (0.9, 1e-5, 1)
    module, variables = convert.to_flax(bn)
    assert (module.momentum, module.epsilon, module.use_running_average) == (0.9, 1e-5, True)
    assert set(variables) == {"params", "batch_stats"}
    assert convert.to_flax(bn.train())[0].use_running_average is False


def state(bn):
    return {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}


def same_layer(a, b):
    assert type(a) is type(b) and (a.momentum, a.eps, a.affine) == (b.momentum, b.eps, b.affine)
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.05, 0.3, 0.003])
def test_round_trips_exact(momentum):
    bn, _ = trained(momentum=momentum)
    same_layer(convert.from_keras(convert.to_keras(bn)), bn)
    same_layer(convert.from_flax(*convert.to_flax(bn), cls=torch.nn.BatchNorm2d), bn)
    b1, _ = trained(bnn.BatchNorm1d, channels=4, bias=False, momentum=momentum)
    same_layer(convert.from_keras(convert.to_keras(b1), cls=bnn.BatchNorm1d), b1)
    same_layer(convert.from_flax(*convert.to_flax(b1), cls=bnn.BatchNorm1d), b1)


def test_keras_and_flax_round_trips():
    layer = keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3)
    layer(np.random.default_rng(0).normal(3, 2, (8, 4)).astype("float32"), training=True)
    back = convert.to_keras(convert.from_keras(layer), axis=-1)
    assert (back.momentum, back.epsilon) == (0.99, 1e-3)
    for a, b in zip(layer.weights, back.weights):
        assert np.array_equal(keras_numpy(a), keras_numpy(b))
    module = linen.BatchNorm(use_running_average=False, momentum=0.99)
    x = np.random.default_rng(1).normal(3, 2, (8, 4)).astype("float32")
    variables = module.init(jax.random.key(0), x)
    _, new = module.apply(variables, x, mutable=["batch_stats"])
    variables = {**variables, **new}
    m2, v2 = convert.to_flax(convert.from_flax(module, variables), axis=-1)
    assert (m2.momentum, m2.epsilon, m2.use_running_average) == (0.99, module.epsilon, False)
    for col in ("params", "batch_stats"):
        for k in variables[col]:
            assert np.array_equal(np.asarray(variables[col][k]), np.asarray(v2[col][k]))


def test_keras_layer_shape_picks_the_class():
    layer = keras.layers.BatchNormalization(axis=1)
    layer.build((None, 3, 5, 5))
    assert type(convert.from_keras(layer)) is torch.nn.BatchNorm2d


def test_continued_training_stores_each_frameworks_variance():
    """After conversion the eval outputs agree; one more training batch of m values stores the
    unbiased variance in torch and the biased one in Keras and Flax (the documented difference)."""
    bn, _ = trained(torch.nn.BatchNorm1d, channels=3, momentum=0.1)
    layer, (module, variables) = convert.to_keras(bn), convert.to_flax(bn)
    x = (3 + 2 * torch.randn(4, 3)).numpy()
    v0 = bn.running_var.clone().numpy()
    bn.train()(torch.from_numpy(x))
    layer(x, training=True)
    _, new = module.clone(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    xd = x.astype(np.float64)
    # One EMA step in float32 on values of order 10: 1e-5 absolute is ~20 units of rounding.
    assert np.allclose(bn.running_var.numpy(), 0.9 * v0 + 0.1 * xd.var(0, ddof=1), atol=1e-5)
    for stored in (keras_numpy(layer.moving_variance), np.asarray(new["batch_stats"]["var"])):
        assert np.allclose(stored, 0.9 * v0 + 0.1 * xd.var(0), atol=1e-5)


def test_float64():
    bn, x = trained(torch.nn.BatchNorm1d, channels=3, dtype=torch.float64)
    layer = convert.to_keras(bn)
    # Keras 3.15's BatchNormalization computes in float32 even for a float64 layer (its call takes
    # backend.result_type(input dtype, "float32"), which is float32 for a float64 input), so the
    # output agrees to the float32 tolerance only, and not to float64's 8 units of 2^-53 ...
    diff = np.abs(keras_eval(layer, x.numpy()) - bn(x).detach().numpy())
    assert np.all(diff <= tolerance(bn, x))
    # ... while the float64 state itself travels exactly.
    assert keras_numpy(layer.moving_variance).dtype == np.float64
    same_layer(convert.from_keras(layer), bn)
    with pytest.raises(ValueError, match="x64"):
        convert.to_flax(bn)


def test_errors():
    with pytest.raises(convert.ConventionError, match="momentum is None"):
        convert.to_keras(torch.nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(convert.ConventionError, match="track_running_stats"):
        convert.to_flax(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(TypeError, match="bn must be"):
        convert.to_keras(torch.nn.LayerNorm(3))
    shift_only = keras.layers.BatchNormalization(scale=False)
    shift_only.build((None, 3))
    with pytest.raises(convert.ConventionError, match="shift without a scale"):
        convert.from_keras(shift_only)
    renorm = keras.layers.BatchNormalization(renorm=True)
    renorm.build((None, 3))
    with pytest.raises(convert.ConventionError, match="renorm"):
        convert.from_keras(renorm)
    with pytest.raises(ValueError, match="must be built"):
        convert.from_keras(keras.layers.BatchNormalization())
    stats = {"batch_stats": {"mean": np.zeros(3, "float32"), "var": np.ones(3, "float32")}}
    with pytest.raises(convert.ConventionError, match="axis_name"):
        convert.from_flax(linen.BatchNorm(axis_name="batch"), stats)
    with pytest.raises(convert.ConventionError, match="shift without a scale"):
        convert.from_flax(linen.BatchNorm(use_scale=False),
                          {**stats, "params": {"bias": np.zeros(3, "float32")}})
    with pytest.raises(TypeError, match="cls must be"):
        convert.from_flax(linen.BatchNorm(), {**stats, "params": {
            "scale": np.ones(3, "float32"), "bias": np.zeros(3, "float32")}}, cls=torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="axis must be"):
        convert.to_keras(torch.nn.BatchNorm1d(3), axis=2)


def test_complement():
    for m in (0.1, 0.01, 0.001, 0.05, 0.3, 0.5, 0.0, 1.0):
        assert convert.complement(convert.complement(m)) == m
    assert convert.complement(0.1) == 0.9 and convert.complement(0.99) == 0.01
