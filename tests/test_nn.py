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


# --- FrozenBatchNorm2d (bnlib/frozen.py) -----------------------------------------------------

def _trained_bn2d(c=3, **kw):
    """A torch BatchNorm2d in float64 with non-trivial weight, bias and running statistics."""
    bn = torch.nn.BatchNorm2d(c, dtype=torch.float64, **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    for _ in range(3):
        bn(3 + 2 * torch.randn(4, c, 3, 3, generator=gen, dtype=torch.float64))
    return bn.eval()


def test_frozen_state_dict_keys_and_defaults():
    frozen = bnn.FrozenBatchNorm2d(4)
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(frozen.parameters()) == [] and frozen.eps == 1e-5
    for name, fill in [("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)]:
        assert torch.equal(getattr(frozen, name), torch.full((4,), fill)), name
    assert repr(frozen) == "FrozenBatchNorm2d(4, eps=1e-05)"
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    # Defaults are BN's identity up to eps: x / sqrt(1 + eps).
    torch.testing.assert_close(frozen.double()(x), x / (1 + 1e-5) ** 0.5, **TOL)


BN_KINDS = [{}, dict(affine=False), dict(bias=False), dict(momentum=None)]
# A state_dict without weight or bias (affine=False, bias=False) does not load strictly: the
# frozen layer has those keys; from_batchnorm and freeze supply 1 and 0.
FROZEN_BUILDS = ([("from_batchnorm", kw) for kw in BN_KINDS] + [("freeze", kw) for kw in BN_KINDS]
                 + [("state_dict", {}), ("state_dict", dict(momentum=None))])


@pytest.mark.parametrize("build,kw", FROZEN_BUILDS)
def test_frozen_equals_torch_bn_in_eval_with_input_gradient(build, kw):
    bn = _trained_bn2d(**kw)
    if build == "from_batchnorm":
        frozen = bnn.FrozenBatchNorm2d.from_batchnorm(bn)
    elif build == "freeze":
        frozen = bnn.freeze(torch.nn.Sequential(bn))[0]
    else:
        frozen = bnn.FrozenBatchNorm2d(3).double()
        frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is dropped
    assert isinstance(frozen, bnn.FrozenBatchNorm2d) and frozen.running_var.dtype == torch.float64
    x = (torch.randn(5, 3, 4, 2, dtype=torch.float64) * 2 + 3).requires_grad_()
    y, want = frozen(x), bn(x)
    torch.testing.assert_close(y, want, **TOL)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    (want_gx,) = torch.autograd.grad(want, x, dy)
    torch.testing.assert_close(gx, want_gx, **TOL)
    assert not any(b.requires_grad for b in frozen.buffers())


def test_frozen_has_nothing_to_train_and_train_mode_changes_nothing():
    frozen = bnn.FrozenBatchNorm2d.from_batchnorm(_trained_bn2d())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y_eval = frozen(x)
    frozen.train()
    y_train = frozen(x)
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)  # the same map in both modes
    y_train.sum().backward()
    assert x.grad is not None and list(frozen.parameters()) == []
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_errors():
    frozen = bnn.FrozenBatchNorm2d(3)
    for shape in [(4, 3), (4, 3, 5), (2, 3, 2, 2, 2)]:
        with pytest.raises(ValueError, match=rf"input must be 4D \(N, C, H, W\) for "
                                             rf"FrozenBatchNorm2d, got {len(shape)}D"):
            frozen(torch.randn(shape))
    with pytest.raises(ValueError, match="input has 4 channels .* num_features=3"):
        frozen(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnn.FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bnn.FrozenBatchNorm2d(3, eps=-1e-5)
    with pytest.raises(TypeError, match="bn must be a BatchNorm2d or SyncBatchNorm, got BatchNorm1d"):
        bnn.FrozenBatchNorm2d.from_batchnorm(torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="no running statistics"):
        bnn.FrozenBatchNorm2d.from_batchnorm(torch.nn.BatchNorm2d(3, track_running_stats=False))
    state = torch.nn.BatchNorm2d(3, affine=False).state_dict()
    with pytest.raises(RuntimeError, match='Missing key.*"weight", "bias"'):
        frozen.load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch for running_mean"):
        frozen.load_state_dict(torch.nn.BatchNorm2d(4).state_dict())


def test_freeze_replaces_every_bn2d_in_place_and_keeps_eval_outputs():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnn.BatchNorm2d(3))
            self.shared = torch.nn.BatchNorm2d(3)
            self.block = torch.nn.ModuleList([torch.nn.ReLU(), self.shared])
            self.head = torch.nn.BatchNorm1d(3)  # not 2d: left as it is

        def forward(self, x):
            h = self.block[1](self.block[0](self.stem(x)))
            return self.head(self.shared(h).mean((2, 3)))

    net = Net().double()
    for _ in range(3):
        net(torch.randn(4, 2, 6, 6, dtype=torch.float64) + 1)
    net.eval()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    want = net(x)
    assert bnn.freeze(net) is net
    assert isinstance(net.stem[1], bnn.FrozenBatchNorm2d)
    assert net.shared is net.block[1] and isinstance(net.shared, bnn.FrozenBatchNorm2d)
    assert type(net.head) is torch.nn.BatchNorm1d
    torch.testing.assert_close(net(x), want, **TOL)
    bn = torch.nn.BatchNorm2d(3)
    assert isinstance(bnn.freeze(bn), bnn.FrozenBatchNorm2d)


def test_freeze_refuses_before_changing_anything():
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3),
                              torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="1 .BatchNorm2d. has no running statistics"):
        bnn.freeze(net)
    assert type(net[0]) is torch.nn.BatchNorm2d
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bnn.freeze("resnet")
    lazy = torch.nn.Sequential(torch.nn.BatchNorm2d(3), bnn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="1: a LazyBatchNorm2d that has not seen an input"):
        bnn.freeze(lazy)
    assert type(lazy[0]) is torch.nn.BatchNorm2d
    with pytest.raises(ValueError, match="LazyBatchNorm2d that has not seen an input"):
        bnn.FrozenBatchNorm2d.from_batchnorm(torch.nn.LazyBatchNorm2d())
    lazy(torch.randn(2, 3, 2, 2))  # once materialised it is a BatchNorm2d, and freezes
    assert isinstance(bnn.freeze(lazy)[1], bnn.FrozenBatchNorm2d)


# --- LazyBatchNorm1d/2d/3d --------------------------------------------------------------------

LAZY = [(bnn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d, bnn.BatchNorm1d, (6, 3)),
        (bnn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d, bnn.BatchNorm1d, (6, 3, 4)),
        (bnn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d, bnn.BatchNorm2d, (4, 3, 3, 2)),
        (bnn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d, bnn.BatchNorm3d, (2, 3, 2, 3, 2))]
LAZY_IDS = [f"{c.__name__}-{len(s)}D" for c, _, _, s in LAZY]
LAZY_KINDS = [{}, dict(momentum=None, eps=1e-3), dict(affine=False), dict(bias=False),
              dict(track_running_stats=False)]


@pytest.mark.parametrize("ours_cls,theirs_cls,becomes,shape", LAZY, ids=LAZY_IDS)
def test_lazy_signature_state_dict_and_repr_match_torch_before_the_first_call(
        ours_cls, theirs_cls, becomes, shape):
    ours_sig = inspect.signature(ours_cls.__init__).parameters
    theirs_sig = inspect.signature(theirs_cls.__init__).parameters
    assert list(ours_sig) == list(theirs_sig)
    for name, param in theirs_sig.items():
        assert ours_sig[name].default == param.default, name
    for kw in LAZY_KINDS:
        ours, theirs = ours_cls(**kw), theirs_cls(**kw)
        assert isinstance(ours, theirs_cls) and ours.has_uninitialized_params() == \
            theirs.has_uninitialized_params()
        assert list(ours.state_dict()) == list(theirs.state_dict()), kw
        assert repr(ours) == repr(theirs), kw  # torch's Lazy name: ours is torch's class


@pytest.mark.parametrize("kw", LAZY_KINDS)
@pytest.mark.parametrize("ours_cls,theirs_cls,becomes,shape", LAZY, ids=LAZY_IDS)
def test_lazy_first_call_becomes_bnlib_bn_and_matches_torch(ours_cls, theirs_cls, becomes, shape,
                                                            kw):
    ours = ours_cls(dtype=torch.float64, **kw)
    theirs = theirs_cls(dtype=torch.float64, **kw)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        x = (1 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
        y, want = ours(x), theirs(x)
        if step == 0:  # the first call turned each into its class_to_become
            assert type(ours) is becomes and type(theirs) is theirs_cls.cls_to_become
            assert ours.num_features == theirs.num_features
            assert type(ours).forward is not type(theirs).forward  # bnlib's forward runs
        torch.testing.assert_close(y, want, **TOL)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(y, [x] + list(ours.parameters()), dy)
        ref = torch.autograd.grad(want, [x] + list(theirs.parameters()), dy)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, **TOL)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    assert repr(ours) == repr(theirs)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("ours_cls,theirs_cls,becomes,shape", LAZY, ids=LAZY_IDS)
def test_lazy_state_dict_round_trip_both_ways(ours_cls, theirs_cls, becomes, shape):
    """A trained bnlib layer's state loads into a torch lazy layer (materialising it) and a
    trained torch layer's into a bnlib lazy one; both then compute as the original."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    trained_ours, trained_theirs = ours_cls(dtype=torch.float64), theirs_cls(dtype=torch.float64)
    for _ in range(3):
        trained_ours(x), trained_theirs(x * 3 - 1)
    for source, target_cls in ((trained_ours, theirs_cls), (trained_theirs, ours_cls)):
        target = target_cls(dtype=torch.float64)
        target.load_state_dict(source.state_dict())
        assert not target.has_uninitialized_params()
        for name, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], value), name
        source.eval(), target.eval()
        torch.testing.assert_close(target(x), source(x), **TOL)
        assert isinstance(target, theirs_cls.cls_to_become)  # a BatchNorm{1,2,3}d after a call
        source.train()


@pytest.mark.parametrize("ours_cls,theirs_cls,becomes,shape", LAZY, ids=LAZY_IDS)
def test_lazy_wrong_first_input_is_named_and_leaves_the_layer_lazy(ours_cls, theirs_cls, becomes,
                                                                   shape):
    wrong = (3,) + (2,) * max(becomes._expected_dims)  # one axis too many
    for bad in [(5,), wrong]:
        layer = ours_cls()
        dims = " or ".join(f"{d}D" for d in becomes._expected_dims)
        with pytest.raises(ValueError, match=f"input must be {dims} for {ours_cls.__name__}, "
                                             f"got {len(bad)}D"):
            layer(torch.randn(bad))
        assert type(layer) is ours_cls and layer.has_uninitialized_params()
    layer = ours_cls()
    with pytest.raises(ValueError, match="input has 0 channels on axis 1"):
        layer(torch.randn((shape[0], 0) + shape[2:]))
    with pytest.raises(IndexError):  # torch: an error from inside its own code, for the same input
        theirs_cls()(torch.randn((shape[0], 0) + shape[2:]))
    y = layer(torch.randn(shape))  # still usable: the failed calls materialised nothing
    assert type(layer) is becomes and y.shape == shape


def test_lazy_layers_are_found_by_torch_tools_and_keep_device_and_dtype():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), bnn.LazyBatchNorm2d(dtype=torch.float64))
    net[0].double()
    net(torch.randn(3, 2, 2, 2, dtype=torch.float64))
    assert type(net[1]) is bnn.BatchNorm2d and net[1].running_var.dtype == torch.float64
    assert net[1].weight.shape == (4,)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_from_sync_bn_on_its_device_and_independent_of_it(device):
    """A SyncBatchNorm (eval needs no process group) freezes to the same map, on bn's device;
    the copy does not follow later changes to bn."""
    bn = _trained_bn2d().to(device)
    sync = torch.nn.SyncBatchNorm(3, dtype=torch.float64).to(device)
    sync.load_state_dict(bn.state_dict())
    frozen = bnn.FrozenBatchNorm2d.from_batchnorm(sync.eval())
    assert frozen.running_mean.device.type == device
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device)
    torch.testing.assert_close(frozen(x), bn(x), **TOL)
    with torch.no_grad():
        sync.running_mean.add_(1.0), sync.weight.mul_(2.0)
    torch.testing.assert_close(frozen(x), bn(x), **TOL)


def test_frozen_half_input_computes_in_float32_as_bn_does():
    """float16 input with float32 buffers, as torch BN takes it: the affine in float32, the
    output float16; both round once to float16 (half an ulp, 2**-11 relative, each). Near y = 0
    the two float32 formulas differ by ~1e-7 of the terms (|x scale|, |shift| < 10): well under
    float16's smallest normal, 2**-14, the absolute tolerance."""
    bn = _trained_bn2d().float()
    frozen = bnn.FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3)).half()
    y, want = frozen(x), bn(x)
    assert y.dtype == want.dtype == torch.float16
    torch.testing.assert_close(y, want, rtol=2 * 2**-11, atol=2**-14)
