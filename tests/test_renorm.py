"""bnlib.renorm: Batch Renormalization against its formula written out directly, in float64."""
import math

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from bnlib import functional
from bnlib.renorm import BatchRenorm1d, BatchRenorm2d, ramp, ramp_limits
from bnlib.renorm_function import BatchRenormFunction
from bn_cases import DEVICES

F64 = torch.float64
CASES = [(BatchRenorm1d, torch.nn.BatchNorm1d, (8, 3)),
         (BatchRenorm1d, torch.nn.BatchNorm1d, (6, 3, 5)),
         (BatchRenorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5))]
# float64 values of order 1: two evaluations of the same formula in a different order differ by a
# few roundings (2^-52 = 2.2e-16) per term of sums over at most 100 values, far below 1e-12; a
# wrong formula (a missing r, d, or a gradient through them) is off by order 1e-1.
TOL = dict(rtol=1e-12, atol=1e-12)


def reference(x, weight, bias, running_mean, running_var, eps, r_max, d_max, detach=True):
    """The paper's training step written out: x_hat = (x - mu_B)/sigma_B r + d, y = gamma x_hat +
    beta; r and d are detached (constants for the gradient) unless detach=False."""
    dims = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(dims)
    sigma_b = (((x - mu.reshape(shape)) ** 2).mean(dims) + eps).sqrt()
    sigma = (running_var + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max)
    d = ((mu - running_mean) / sigma).clamp(-d_max, d_max)
    if detach:
        r, d = r.detach(), d.detach()
    x_hat = (x - mu.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    return weight.reshape(shape) * x_hat + bias.reshape(shape)


def make(cls, shape, device="cpu", seed=0, **kw):
    """A layer with non-trivial gamma, beta and running statistics, and an input batch."""
    gen = torch.Generator().manual_seed(seed)
    layer = cls(shape[1], dtype=F64, device=device, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 4.0]))
    x = (1 + 2 * torch.randn(shape, generator=gen, dtype=F64)).to(device).requires_grad_()
    return layer, x


def args_of(layer):
    return (layer.weight, layer.bias, layer.running_mean.clone(), layer.running_var.clone(),
            layer.eps)


def regime(name):
    """(r_max, d_max): both clipped somewhere in make()'s batches, or neither clipped."""
    return {"clipped": (1.2, 0.3), "unclipped": (math.inf, math.inf), "bn": (1.0, 0.0)}[name]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["clipped", "unclipped", "bn"])
@pytest.mark.parametrize("cls,torch_cls,shape", CASES)
def test_output_and_gradients_match_the_formula_with_r_d_detached(cls, torch_cls, shape, name,
                                                                  device):
    r_max, d_max = regime(name)
    layer, x = make(cls, shape, device, r_max=r_max, d_max=d_max)
    ref_args = args_of(layer)
    y = layer(x)
    want = reference(x, *ref_args, r_max, d_max)
    torch.testing.assert_close(y, want, **TOL)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    expected = torch.autograd.grad(want, (x, layer.weight, layer.bias), dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_clipping_is_active_in_the_clipped_regime():
    """Guards the test above: in 'clipped' some r and some d sit at their bounds."""
    layer, x = make(BatchRenorm1d, (8, 3), r_max=1.2, d_max=0.3)
    mean, var = functional.batch_stats(x.detach())
    sigma = (layer.running_var + layer.eps).sqrt()
    r = (var + layer.eps).sqrt() / sigma
    d = (mean - layer.running_mean) / sigma
    assert ((r > 1.2) | (r < 1 / 1.2)).any() and (d.abs() > 0.3).any()


@pytest.mark.parametrize("cls,torch_cls,shape", CASES)
def test_gradcheck_where_r_and_d_sit_at_their_bounds(cls, torch_cls, shape):
    """Where r and d are clipped they are locally constant, so finite differences of the whole
    map see exactly the stop-gradient derivative (elsewhere they see d r/dx, d d/dx too)."""
    layer, x = make(cls, shape)
    w, b = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    rm = torch.tensor([10.0, -5.0, 30.0], dtype=F64)  # |mu_B - mu| / sigma: 0.9, 60, 1.45 > d_max
    rv = torch.tensor([100.0, 0.01, 400.0], dtype=F64)  # sigma_B / sigma beyond [1/2, 2]

    def f(x, w, b):  # momentum 0: the running statistics stay as they are between calls
        return BatchRenormFunction.apply(x, w, b, rm, rv, 1e-5, 0.0, 2.0, 0.5)

    assert torch.autograd.gradcheck(f, (x.detach().requires_grad_(), w, b))


@pytest.mark.parametrize("cls,torch_cls,shape", CASES)
def test_r_max_1_d_max_0_is_batch_norm(cls, torch_cls, shape):
    """Over several steps (so the running statistics move): output and every gradient equal
    bnlib's formula path bit for bit, and torch's BN to rounding; the buffers equal torch's."""
    layer, _ = make(cls, shape, r_max=1.0, d_max=0.0)
    bn = torch_cls(3, dtype=F64)
    bn.load_state_dict(layer.state_dict())
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = (3 * torch.randn(shape, generator=gen, dtype=F64) - 1).requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=F64)
        y = layer(x)
        y_bn = bn(x)
        y_formula, mean, _, invstd = functional.formula_forward(x.detach(), layer.weight.detach(),
                                                                layer.bias.detach(), layer.eps)
        assert torch.equal(y.detach(), y_formula)
        torch.testing.assert_close(y, y_bn, **TOL)
        ours = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        theirs = torch.autograd.grad(y_bn, (x, bn.weight, bn.bias), dy)
        formula = functional.compact_backward(dy, x.detach(), layer.weight.detach(), mean, invstd)
        for o, t, f in zip(ours, theirs, formula):
            assert torch.equal(o, f)
            torch.testing.assert_close(o, t, **TOL)
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(getattr(layer, name), buf, **TOL)


@pytest.mark.parametrize("cls,torch_cls,shape", CASES)
def test_unclipped_training_output_is_the_eval_output_before_the_update(cls, torch_cls, shape):
    layer, x = make(cls, shape, r_max=math.inf, d_max=math.inf)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    torch.testing.assert_close(y_train, y_eval, **TOL)
    layer.eval()  # the update happened: eval now differs
    assert not torch.allclose(layer(x), y_eval, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("momentum", [0.1, None, 0.5])
@pytest.mark.parametrize("cls,torch_cls,shape", CASES)
def test_running_statistics_and_state_dict_are_torchs(cls, torch_cls, shape, momentum):
    layer = cls(3, momentum=momentum, dtype=F64)
    bn = torch_cls(3, momentum=momentum, dtype=F64)
    assert list(layer.state_dict()) == list(bn.state_dict())
    assert isinstance(layer, _BatchNorm)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = 2 + 3 * torch.randn(shape, generator=gen, dtype=F64)
        layer(x), bn(x)
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(getattr(layer, name), buf, **TOL)
    fresh = torch_cls(3, dtype=F64)
    fresh.load_state_dict(layer.state_dict())
    back = cls(3, dtype=F64)
    back.load_state_dict(fresh.state_dict())
    x = torch.randn(shape, generator=gen, dtype=F64)
    for m in (layer, fresh, back):
        m.eval()
    torch.testing.assert_close(layer(x), fresh(x), **TOL)
    torch.testing.assert_close(back(x), fresh(x), **TOL)


def test_limits_are_settable_and_ramped():
    layer = BatchRenorm1d(3)
    assert (layer.r_max, layer.d_max) == (3.0, 5.0)
    layer.r_max, layer.d_max = 2, 1
    assert (layer.r_max, layer.d_max) == (2.0, 1.0) and type(layer.r_max) is float
    assert "r_max=2.0, d_max=1.0" in repr(layer)
    # The paper's Inception schedule: BN for 5000 steps, r_max 3 at 40k, d_max 5 at 25k.
    schedule = dict(warmup=5000, full=40000, d_full=25000)
    assert ramp(0, **schedule) == (1.0, 0.0)
    assert ramp(5000, **schedule) == (1.0, 0.0)
    r, d = ramp(15000, **schedule)
    assert math.isclose(r, 1 + 2 * 10000 / 35000) and math.isclose(d, 5 * 10000 / 20000)
    assert ramp(25000, **schedule)[1] == 5.0
    assert ramp(40000, **schedule) == (3.0, 5.0) == ramp(10 ** 6, **schedule)
    assert ramp(7, 10, 10) == (1.0, 0.0) and ramp(10, 10, 10) == (3.0, 5.0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), BatchRenorm1d(3),
                                torch.nn.Sequential(BatchRenorm2d(3)), torch.nn.BatchNorm1d(3))
    assert ramp_limits(model, 15000, **schedule) == (r, d)
    assert [(m.r_max, m.d_max) for m in (model[1], model[2][0])] == [(r, d), (r, d)]


@pytest.mark.parametrize("value,error,match", [
    (0.5, ValueError, "r_max must be a float >= 1"), (math.nan, ValueError, "r_max"),
    ("3", TypeError, "r_max must be a float >= 1, got str")])
def test_bad_r_max_is_refused(value, error, match):
    with pytest.raises(error, match=match):
        BatchRenorm1d(3, r_max=value)
    layer = BatchRenorm1d(3)
    with pytest.raises(error, match=match):
        layer.r_max = value
    with pytest.raises(error, match=match):
        layer.set_limits(value, 1.0)
    assert layer.r_max == 3.0


def test_bad_d_max_and_a_failed_set_limits_changes_nothing():
    layer = BatchRenorm1d(3)
    with pytest.raises(ValueError, match="d_max must be a float >= 0"):
        layer.set_limits(2.0, -1.0)
    assert (layer.r_max, layer.d_max) == (3.0, 5.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(step=-1, warmup=0, full=1), "step must be a non-negative int"),
    (dict(step=1.5, warmup=0, full=1), "step must be a non-negative int"),
    (dict(step=0, warmup=10, full=5), r"full must be >= warmup \(10\)"),
    (dict(step=0, warmup=0, full=5, d_full=-2), "d_full must be a non-negative int"),
    (dict(step=0, warmup=0, full=5, r_max=math.inf), "must be finite"),
    (dict(step=0, warmup=0, full=5, r_max=0.9), "r_max must be a float >= 1")])
def test_ramp_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ramp(**kwargs)


def test_input_errors_name_the_argument_and_change_nothing():
    layer = BatchRenorm1d(3, dtype=F64)
    with pytest.raises(ValueError, match="input must be 2D or 3D for BatchRenorm1d, got 4D"):
        layer(torch.randn(2, 3, 4, 4, dtype=F64))
    with pytest.raises(ValueError, match="input must be 4D for BatchRenorm2d"):
        BatchRenorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, dtype=F64))
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        layer(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(5,\) to match the 5 channels"):
        layer(torch.randn(4, 5, dtype=F64))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        BatchRenorm2d(0)
    layer.eps = 0.0
    with pytest.raises(ValueError, match="eps must be positive during training"):
        layer(torch.randn(4, 3, dtype=F64))


def test_backward_is_differentiable_once():
    layer, x = make(BatchRenorm1d, (8, 3))
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_half_input_uses_float32_statistics():
    layer = BatchRenorm2d(3)                       # float32 parameters and buffers
    x = 2 + torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    ref = BatchRenorm2d(3, dtype=F64)
    y_half = layer(x.to(torch.bfloat16))
    assert y_half.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits: its own rounding of x and y is 2^-8 relative, on |y| up to ~4.
    torch.testing.assert_close(y_half.double(), ref(x.double()), rtol=2 ** -7, atol=4 * 2 ** -7)


def test_empty_batch_gives_an_empty_output_and_keeps_the_statistics():
    layer = BatchRenorm1d(3, dtype=F64)
    y = layer(torch.empty(0, 3, dtype=F64))
    assert y.shape == (0, 3) and torch.equal(layer.running_var, torch.ones(3, dtype=F64))


def test_sync_conversion_replaces_it_with_plain_sync_bn():
    """Documented caveat: torch's converter sees a _BatchNorm and makes it plain SyncBatchNorm."""
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(BatchRenorm1d(3)))
    assert type(converted[0]) is torch.nn.SyncBatchNorm
