"""PyTorch's own test samples for batch norm, run against bnlib (issue 13).

torch ships, in torch.testing._internal, the samples its own suite runs: the OpInfo of
nn.functional.batch_norm (sample inputs, and which autograd modes it supports) and the
ModuleInfos of BatchNorm1d/2d/3d (constructor and forward inputs, error inputs). Here every one
of them runs through bnlib in training and eval, on the compiled CPU kernel, the composed path
and the formula, and is compared with torch; a torch release that adds a sample adds a case
here. The same module samples, without num_features, also run through bnlib's and torch's
LazyBatchNorm1d/2d/3d (torch has no lazy BN ModuleInfo; if one comes, it runs too). The only samples bnlib may refuse are its listed deliberate strictness (STRICTER below,
also in the README's drop-in policy), each of which is tested as such.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import parity
from bnlib import functional as BF
from bnlib import nn as bnn

pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

OP = next(op for op in op_db if op.name == "nn.functional.batch_norm" and op.variant_test_name == "")
MODULES = [m for m in module_db if m.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
                                                     torch.nn.BatchNorm3d)]
OURS = {torch.nn.BatchNorm1d: bnn.BatchNorm1d, torch.nn.BatchNorm2d: bnn.BatchNorm2d,
        torch.nn.BatchNorm3d: bnn.BatchNorm3d}
# The lazy classes: torch (2.13) has no ModuleInfo of its own for them, so each BatchNorm sample
# runs through the lazy pair with num_features dropped from its constructor (the lazy layer reads
# it from the input); a torch release that adds lazy ModuleInfos has them run as well.
LAZY = {torch.nn.BatchNorm1d: (bnn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d),
        torch.nn.BatchNorm2d: (bnn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d),
        torch.nn.BatchNorm3d: (bnn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d)}
LAZY_OURS = {theirs: ours for ours, theirs in LAZY.values()}
LAZY_MODULES = [m for m in module_db if m.module_cls in LAZY_OURS]
BACKENDS = ["cpu", "composed", "formula"]
# The compiled kernel and the composed path take float32/float64; half types take the formula.
DTYPES = {"cpu": (torch.float64, torch.float32), "composed": (torch.float64, torch.float32),
          "formula": (torch.float64, torch.float32, torch.bfloat16)}

# bnlib's deliberate strictness: what torch accepts and bnlib refuses, each because torch's
# answer is garbage given silently. (call, error bnlib raises, message, reason.)
STRICTER = [
    (dict(eps=math.nan), ValueError, "eps must be a finite float",
     "torch returns NaN everywhere"),
    (dict(eps=math.inf, training=False), ValueError, "eps must be a finite float",
     "torch returns y = bias: every input maps to the same value"),
    (dict(momentum=math.nan), ValueError, "momentum must be a finite float in training",
     "torch writes NaN into the running statistics"),
    (dict(momentum=math.inf), ValueError, "momentum must be a finite float in training",
     "torch writes inf or NaN into the running statistics"),
]


def test_torch_declares_what_bnlib_now_supports():
    """The modes the OpInfo declares are the ones the tests below exercise on bnlib."""
    assert OP.supports_autograd and OP.supports_forward_ad and OP.supports_fwgrad_bwgrad
    assert len(MODULES) == 3
    assert all(m.is_lazy for m in LAZY_MODULES)  # none in torch 2.13; run below when they come


def _samples(dtype):
    return list(OP.sample_inputs("cpu", dtype, requires_grad=True))


def _call(fn, sample, clones=True):
    """fn(input, running_mean, running_var, weight, bias, **kwargs) on copies of the sample's
    tensors (running statistics cloned, since both calls update them)."""
    args = [a.detach().clone() if isinstance(a, torch.Tensor) and clones and not a.requires_grad
            else a for a in sample.args]
    return fn(sample.input, *args, **sample.kwargs), args


def _compare(got, want, x, scale=0.0):
    """Within parity's tolerance for the dtype (the reference is torch in float64), relative to
    the largest entry of want or to `scale`, the size of the terms want is a difference of."""
    assert got.shape == want.shape and got.dtype == x.dtype
    if got.numel() == 0:
        return
    tol = parity.tolerance(got.dtype, x)
    err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(scale)
           .clamp_min(1e-300)).item()
    assert err <= tol, (err, tol)


def _as_double(sample):
    """The sample's tensors in float64, as leaves (the reference computation)."""
    def up(t):
        if not isinstance(t, torch.Tensor):
            return t
        d = t.detach().double().clone()  # a copy even in float64: torch updates it in place
        return d.requires_grad_() if t.requires_grad else d
    return up(sample.input), [up(a) for a in sample.args]


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_samples_forward_backward_and_running_stats(backend):
    with parity.on(backend):
        for dtype in DTYPES[backend]:
            for sample in _samples(dtype):
                x64, args64 = _as_double(sample)
                want = F.batch_norm(x64, *args64, **sample.kwargs)
                y, args = _call(BF.batch_norm, sample)
                _compare(y, want.detach(), sample.input)
                for ours, theirs in zip(args[:2], args64[:2]):  # running statistics
                    if ours is not None and ours.dtype == sample.input.dtype:
                        _compare(ours, theirs, sample.input)
                names = [n for n, t in zip(("x", "weight", "bias"),
                                           [sample.input] + list(sample.args[2:]))
                         if isinstance(t, torch.Tensor) and t.requires_grad]
                leaves = [t for t in [sample.input] + list(sample.args[2:])
                          if isinstance(t, torch.Tensor) and t.requires_grad]
                leaves64 = [t for t in [x64] + args64[2:]
                            if isinstance(t, torch.Tensor) and t.requires_grad]
                if y.numel() == 0 or not y.requires_grad:
                    continue
                dy = torch.randn(y.shape, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(0))
                got = torch.autograd.grad(y, leaves, dy.to(y.dtype))
                ref = torch.autograd.grad(want, leaves64, dy)
                scales = _cancellation_scales(x64, args64[2], dy, sample.kwargs)
                for name, g, r in zip(names, got, ref):
                    if g.dtype == sample.input.dtype:
                        _compare(g, r, sample.input, scales[name])


def _cancellation_scales(x64, w, dy, kwargs):
    """The size of the terms each gradient is a difference of; rounding is relative to those,
    not to the result, which can be near zero: dx = a (dy - mean(dy) - x_hat mean(dy x_hat)) with
    terms of size |a| |dy| (a = gamma invstd; for m = 2, sample (2, 1), dx is zero in exact
    arithmetic), dgamma = sum(dy x_hat) and dbeta = sum(dy) sums of terms of either sign."""
    x, nd = x64.detach(), x64.ndim
    dims = (0,) + tuple(range(2, nd))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    invstd = (var + kwargs.get("eps", 1e-5)).rsqrt()
    x_hat = (x - mean) * invstd
    a = invstd.flatten() * (1.0 if w is None else w.detach().abs())
    return {"x": dy.abs().max().item() * a.max().item(),
            "weight": (dy * x_hat).abs().sum(dims).max().item(),
            "bias": dy.abs().sum(dims).max().item()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_samples_gradcheck_every_mode(backend):
    """gradcheck and gradgradcheck with forward AD and batched (vmap) gradients, as torch's
    OpInfo declares them supported, in float64, training and eval samples alike."""
    with parity.on(backend):
        for sample in _samples(torch.float64):
            if sample.input.numel() == 0:
                continue
            rm, rv, w, b = sample.args
            leaves = [t for t in (sample.input, w, b) if t is not None]

            def fn(*ts, rm=rm, rv=rv, w=w, b=b, kw=sample.kwargs):
                it = iter(ts)
                x = next(it)
                w_ = next(it) if w is not None else None
                b_ = next(it) if b is not None else None
                return BF.batch_norm(x, None if rm is None else rm.clone(),
                                     None if rv is None else rv.clone(), w_, b_, **kw)
            assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True,
                                            check_batched_grad=True,
                                            check_batched_forward_grad=True)
            assert torch.autograd.gradgradcheck(fn, leaves)


def _module_inputs(info, training, dtype=torch.float64):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                   training=training)


def _classes(info, lazy):
    """(bnlib class, torch class, how many leading constructor arguments to drop) for a
    ModuleInfo; lazy: its BatchNorm samples run through the lazy pair, without num_features."""
    if info.module_cls in LAZY_OURS:  # torch's own lazy ModuleInfo
        return LAZY_OURS[info.module_cls], info.module_cls, 0
    if lazy:
        return LAZY[info.module_cls] + (1,)
    return OURS[info.module_cls], info.module_cls, 0


def _pairs(info, lazy, training):
    """(bnlib layer, torch layer, input) for each of the ModuleInfo's samples, in float64."""
    ours_cls, theirs_cls, drop = _classes(info, lazy)
    for mi in _module_inputs(info, training):
        cargs, ckw = mi.constructor_input.args[drop:], mi.constructor_input.kwargs
        ours = ours_cls(*cargs, **ckw, dtype=torch.float64)
        theirs = theirs_cls(*cargs, **ckw, dtype=torch.float64)
        yield ours, theirs, mi.forward_input.args[0]


CASES = ([(m, False) for m in MODULES] + [(m, True) for m in MODULES]
         + [(m, False) for m in LAZY_MODULES])


def _case_id(case):
    info, lazy = case
    return ("Lazy-from-" if lazy else "") + info.module_cls.__name__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_module_samples_train_then_eval(case, backend):
    with parity.on(backend):
        for training in (True, False):
            for ours, theirs, x in _pairs(*case, training):
                ours.train(training), theirs.train(training)
                for _ in range(2):  # twice: the second call sees updated running statistics
                    y, want = ours(x), theirs(x)
                    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)  # float64
                    # A lazy pair became BatchNorm{1,2,3}d at the first call: ours bnlib's.
                    assert type(ours).__name__ == type(theirs).__name__
                    assert type(ours).forward is not type(theirs).forward
                assert list(ours.state_dict()) == list(theirs.state_dict())
                for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
                    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
                if y.numel():
                    dy = torch.randn_like(y)
                    got = torch.autograd.grad(y, [x] + list(ours.parameters()), dy)
                    ref = torch.autograd.grad(want, [x] + list(theirs.parameters()), dy)
                    for g, r in zip(got, ref):
                        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_module_error_inputs(case):
    """torch's error inputs (eps <= 0): the same error type, message and stage on bnlib."""
    info, lazy = case
    cls, _, drop = _classes(info, lazy)
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                           requires_grad=False, training=True)
    assert errors
    for err in errors:
        mi = err.module_error_input
        cargs, ckw = mi.constructor_input.args[drop:], mi.constructor_input.kwargs
        ctor = lambda: cls(*cargs, **ckw)  # noqa: E731
        if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type, match=err.error_regex):
                ctor()
            continue
        layer = ctor()
        with pytest.raises(err.error_type, match=err.error_regex):
            layer(*mi.forward_input.args, **mi.forward_input.kwargs)


@pytest.mark.parametrize("changes,error,message,reason", STRICTER, ids=[s[3] for s in STRICTER])
def test_deliberate_strictness(changes, error, message, reason):
    """Each listed case: torch accepts it (and its answer is the garbage `reason` names), bnlib
    refuses it with an error naming the argument."""
    kw = dict(training=True, momentum=0.1, eps=1e-5)
    kw.update(changes)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, w, b, **kw)
    garbage = (not torch.isfinite(y).all() or not torch.isfinite(rm).all()
               or bool((y == y[:1]).all()))
    assert garbage, reason
    rm0, rv0 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(error, match=message):
        BF.batch_norm(x, rm0, rv0, w, b, **kw)
    assert torch.equal(rm0, torch.zeros(3, dtype=torch.float64))


def test_num_features_zero_is_refused_where_torch_fails_later():
    """Stricter at construction: torch builds BatchNorm1d(0) and then fails in forward with an
    IndexError from inside its own code; bnlib says so at construction."""
    with pytest.raises(IndexError):
        torch.nn.BatchNorm1d(0)(torch.randn(4, 0))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnn.BatchNorm1d(0)
