"""bnlib.nn modules as drop-ins for torch.nn.BatchNorm1d/2d/3d."""
import inspect

import pytest
import torch

from bnlib import nn as bnn
from bn_cases import DEVICES

PAIRS = [(bnn.BatchNorm1d, torch.nn.BatchNorm1d, (8, 3)),
         (bnn.BatchNorm1d, torch.nn.BatchNorm1d, (8, 3, 5)),
         (bnn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5))]
TOL = dict(rtol=1e-9, atol=1e-9)  # float64, see tests/test_reference.py


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_defaults_and_state_dict_keys_match_torch(ours_cls, theirs_cls, shape):
    ours, theirs = ours_cls(3), theirs_cls(3)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == \
           (theirs.eps, theirs.momentum, theirs.affine, theirs.track_running_stats)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # Every argument torch's constructor takes, ours takes with the same default.
    ours_sig = inspect.signature(ours_cls.__init__).parameters
    for name, param in inspect.signature(theirs_cls.__init__).parameters.items():
        assert name in ours_sig and ours_sig[name].default == param.default, name


def test_bias_false_matches_torch():
    ours = bnn.BatchNorm1d(3, bias=False, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(3, bias=False, dtype=torch.float64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_training_then_eval_matches_torch(ours_cls, theirs_cls, shape, momentum, device):
    kw = dict(momentum=momentum, dtype=torch.float64, device=device)
    ours, theirs = ours_cls(3, **kw), theirs_cls(3, **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    for _ in range(5):
        x = (1 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    for name, buf in theirs.named_buffers():
        torch.testing.assert_close(getattr(ours, name), buf, **TOL)
    ours.eval(), theirs.eval()
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_state_dict_round_trip_both_ways(ours_cls, theirs_cls, shape):
    ours, theirs = ours_cls(3), theirs_cls(3)
    x = torch.randn(shape)
    for _ in range(3):
        ours(x * 2 + 1)
    theirs.load_state_dict(ours.state_dict())
    back = ours_cls(3)
    back.load_state_dict(theirs.state_dict())
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], value)
        assert torch.equal(back.state_dict()[name], value)
    assert int(back.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_old_state_dict_without_counter_loads_as_in_torch():
    """A state dict saved before num_batches_tracked existed (version < 2) loads with the counter
    at 0; a current one without the key is refused, as torch refuses it (bnlib used to accept)."""
    for cls in (bnn.BatchNorm1d, torch.nn.BatchNorm1d):
        state = cls(3).state_dict()
        del state["num_batches_tracked"]
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(3).load_state_dict(state)
        state._metadata[""]["version"] = 1
        m = cls(3)
        m.num_batches_tracked.fill_(5)
        m.load_state_dict(state)
        assert int(m.num_batches_tracked) == 5  # kept, as torch keeps it


@pytest.mark.parametrize("cls,torch_cls", [(bnn.BatchNorm1d, torch.nn.BatchNorm1d),
                                           (bnn.BatchNorm2d, torch.nn.BatchNorm2d),
                                           (bnn.BatchNorm3d, torch.nn.BatchNorm3d)])
def test_layers_are_torch_bn_layers(cls, torch_cls):
    """torch's tools find BN layers by class: ours are torch's subclasses, with torch's repr."""
    layer = cls(3, bias=False)
    assert isinstance(layer, torch_cls) and isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    assert repr(layer) == repr(torch_cls(3, bias=False)).replace(torch_cls.__name__, cls.__name__)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(cls(3)))
    assert isinstance(synced[0], torch.nn.SyncBatchNorm)
    assert type(layer).forward is not torch_cls.forward  # bnlib's own forward runs


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (5, 3, 0)])
def test_empty_batch_is_counted_and_leaves_running_stats(shape):
    """As torch: an empty batch gives an empty output, counts as a batch and leaves the running
    statistics as they are (a short last shard in data-parallel training, detection heads)."""
    ours, theirs = bnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    ours(torch.randn(4, 3)), theirs(torch.randn(4, 3))
    before = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.randn(shape, requires_grad=True)
    y = ours(x)
    assert y.shape == theirs(x).shape == x.shape
    y.sum().backward()
    assert torch.equal(ours.weight.grad, torch.zeros(3)) and torch.equal(ours.bias.grad, torch.zeros(3))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])


def test_batchnorm3d_matches_torch():
    ours, theirs = (cls(3, dtype=torch.float64) for cls in (bnn.BatchNorm3d, torch.nn.BatchNorm3d))
    x = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile(backend):
    """torch.compile (inductor on CPU included; 20 s to a minute to compile here): dynamo does not
    trace autograd.Functions with a custom jvp, so it breaks the graph around bnlib's call, which
    then runs eagerly on its usual backend; results, gradients and running statistics as torch's."""
    ours = bnn.BatchNorm2d(3, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    compiled = torch.compile(ours, backend=backend)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y, want_y = compiled(x), theirs(x)
    torch.testing.assert_close(y, want_y, **TOL)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    (want,) = torch.autograd.grad(want_y.pow(2).sum(), x)
    torch.testing.assert_close(gx, want, **TOL)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)


def test_affine_false_and_no_running_stats_match_torch():
    ours = bnn.BatchNorm1d(3, affine=False, track_running_stats=False, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False, dtype=torch.float64)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []
    x = torch.randn(6, 3, dtype=torch.float64)
    ours.eval(), theirs.eval()  # no running stats: batch statistics even in eval
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_cumulative_momentum_none_is_the_average_of_batch_stats():
    m = bnn.BatchNorm1d(2, momentum=None, dtype=torch.float64)
    xs = [torch.randn(10, 2, dtype=torch.float64) * (k + 1) + k for k in range(4)]
    for x in xs:
        m(x)
    torch.testing.assert_close(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0), **TOL)
    torch.testing.assert_close(m.running_var, torch.stack([x.var(0) for x in xs]).mean(0), **TOL)


@pytest.mark.parametrize("cls,bad_shape", [(bnn.BatchNorm1d, (2, 3, 4, 5)), (bnn.BatchNorm1d, (3,)),
                                           (bnn.BatchNorm2d, (2, 3, 4))])
def test_wrong_input_rank_is_named(cls, bad_shape):
    with pytest.raises(ValueError, match=r"input must be .*D for " + cls.__name__):
        cls(3)(torch.randn(bad_shape))


def test_failed_call_changes_nothing():
    m = bnn.BatchNorm1d(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3))
    with pytest.raises(ValueError, match="weight"):
        m.weight = torch.nn.Parameter(torch.ones(4))
        m(torch.randn(5, 3))
    for k, v in m.state_dict().items():
        if k != "weight":
            assert torch.equal(v, before[k]), k
