"""Bad input: a clear error naming the argument, and nothing mutated when a call fails."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlib import functional as BF
from bnlib import nn as bnn
from bnlib import reference as R

C = 3


def _torch_args(**changes):
    args = dict(input=torch.randn(4, C, 2), running_mean=torch.zeros(C), running_var=torch.ones(C),
                weight=torch.ones(C), bias=torch.zeros(C), training=True, momentum=0.1, eps=1e-5)
    args.update(changes)
    return args


TORCH_CASES = [
    ("one value per channel", dict(input=torch.randn(1, C)), ValueError, "more than 1 value per channel"),
    ("one value per channel, 4D", dict(input=torch.randn(1, C, 1, 1)), ValueError, "more than 1 value per channel"),
    ("weight size", dict(weight=torch.ones(C + 1)), ValueError, "weight must have 3 elements"),
    ("bias size", dict(bias=torch.ones(C, 2)), ValueError, "bias must have 3 elements"),
    ("running_mean shape", dict(running_mean=torch.zeros(C - 1)), ValueError, r"running_mean must have shape \(3,\)"),
    ("running_mean (3, 1)", dict(running_mean=torch.zeros(C, 1)), ValueError, r"running_mean must have shape \(3,\)"),
    ("running_var shape", dict(running_var=torch.ones(1)), ValueError, r"running_var must have shape \(3,\)"),
    ("running_mean without running_var", dict(running_var=None), ValueError,
     "running_mean and running_var must either both be None or neither"),
    ("running_var without running_mean", dict(running_mean=None), ValueError,
     "running_mean and running_var must either both be None or neither"),
    ("float64 weight, float32 input", dict(weight=torch.ones(C, dtype=torch.float64)), TypeError,
     "weight has dtype torch.float64 but input is torch.float32"),
    ("float64 running stats, float32 input", dict(running_mean=torch.zeros(C, dtype=torch.float64),
     running_var=torch.ones(C, dtype=torch.float64)), TypeError, "running_mean has dtype torch.float64"),
    ("float32 parameters, float64 input", dict(input=torch.randn(4, C, dtype=torch.float64)), TypeError,
     "running_mean has dtype torch.float32 but input is torch.float64"),
    ("half input, float64 weight", dict(input=torch.randn(4, C).half(), running_mean=None, running_var=None,
     weight=torch.ones(C, dtype=torch.float64), bias=None), TypeError, "weight has dtype torch.float64"),
    ("half input, mixed half and float32", dict(input=torch.randn(4, C).half(),
     running_mean=torch.zeros(C).half(), running_var=torch.ones(C).half()), TypeError,
     "weight has dtype torch.float32 but input is torch.float16"),
    ("integer input", dict(input=torch.ones(4, C, dtype=torch.long)), TypeError, "input must have a floating dtype"),
    ("integer weight", dict(weight=torch.ones(C, dtype=torch.int32)), TypeError, "weight must have a floating dtype"),
    ("1-D input", dict(input=torch.randn(5)), ValueError, r"input must have shape \(N, C\)"),
    ("0-D input", dict(input=torch.tensor(1.0)), ValueError, r"input must have shape \(N, C\)"),
    ("not a tensor", dict(input=np.ones((4, C))), TypeError, "input must be a torch.Tensor"),
    ("training not a bool", dict(training=None), TypeError, "training must be a bool"),
    ("training an int", dict(training=1), TypeError, "training must be a bool"),
    ("eps zero in training", dict(eps=0.0), ValueError, "eps must be positive during training"),
    ("eps negative in training", dict(eps=-1e-5), ValueError, "eps must be positive"),
    ("eps negative in eval", dict(eps=-1e-5, training=False), ValueError, "eps must be non-negative"),
    ("eps nan (stricter)", dict(eps=float("nan")), ValueError, "eps must be a finite float"),
    ("eps inf (stricter)", dict(eps=float("inf"), training=False), ValueError, "eps must be a finite float"),
    ("eps string", dict(eps="1e-5"), TypeError, "eps must be a float, got str"),
    ("momentum None in functional", dict(momentum=None), TypeError, "momentum must be a float, got NoneType"),
    ("momentum None in eval", dict(momentum=None, training=False), TypeError, "momentum must be a float"),
    ("momentum nan in training (stricter)", dict(momentum=float("nan")), ValueError,
     "momentum must be a finite float in training"),
    ("eval without running stats", dict(training=False, running_mean=None, running_var=None), ValueError,
     "running_mean and running_var are required"),
    ("weight on another device", dict(weight=torch.ones(C, device="meta")), ValueError,
     "weight is on meta but input is on cpu"),
    ("running_var on another device", dict(running_var=torch.ones(C, device="meta")), ValueError,
     "running_var is on meta but input is on cpu"),
]


@pytest.mark.parametrize("case,changes,error,message", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_functional_rejects_bad_input_and_mutates_nothing(case, changes, error, message):
    args = _torch_args(**changes)
    rm, rv = args["running_mean"], args["running_var"]
    before = [None if t is None else t.clone() for t in (rm, rv)]
    with pytest.raises(error, match=message):
        BF.batch_norm(**args)
    for t, b in zip((rm, rv), before):
        if t is not None and t.device.type != "meta":
            assert torch.equal(t, b)


@pytest.mark.parametrize("case,changes,error,message", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_rejects_the_same(case, changes, error, message):
    """Every rejection above is torch's too, except the ones marked stricter (listed, with
    torch's behaviour, in the README's drop-in policy): there torch returns a result."""
    args = _torch_args(**changes)
    if isinstance(args["input"], np.ndarray) or args["input"].device.type == "meta":
        pytest.skip("torch's message for a non-tensor differs; nothing to compare")
    if "stricter" in case:
        # torch accepts it and answers garbage without a word: NaN in y or in the running
        # statistics, or (eps = inf) y = bias, the same value down every channel.
        y = F.batch_norm(**args)
        garbage = (not torch.isfinite(y).all() or not torch.isfinite(args["running_mean"]).all()
                   or bool((y == y[:1]).all()))
        assert garbage, case
        return
    with pytest.raises((RuntimeError, ValueError, TypeError, NotImplementedError, IndexError)):
        F.batch_norm(**args)


# What torch accepts, bnlib accepts with the same result (each of these was refused before
# issue 13: momentum outside [0, 1], eps 0 in eval, weight and bias of any shape with C elements,
# half input with float32 parameters, a Python int or bool or one-element tensor for a float).
ACCEPTED = [
    ("momentum > 1", dict(momentum=1.5)),
    ("momentum < 0", dict(momentum=-1.0)),
    ("momentum anything in eval", dict(momentum=-1.2, training=False)),
    ("eps 0 in eval", dict(eps=0.0, training=False)),
    ("eps an int", dict(eps=1)),
    ("eps a tensor", dict(eps=torch.tensor(1e-3))),
    ("bias (3, 1)", dict(bias=torch.zeros(C, 1))),
    ("weight (1, 3, 1)", dict(weight=torch.ones(1, C, 1))),
    ("no running stats", dict(running_mean=None, running_var=None)),
]


@pytest.mark.parametrize("case,changes", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_functional_accepts_what_torch_accepts(case, changes):
    gen = torch.Generator().manual_seed(3)
    args = _torch_args(input=torch.randn(4, C, 2, generator=gen, dtype=torch.float64) * 2 + 1,
                       running_mean=torch.rand(C, generator=gen, dtype=torch.float64),
                       running_var=torch.rand(C, generator=gen, dtype=torch.float64) + 0.5,
                       weight=torch.rand(C, generator=gen, dtype=torch.float64) + 0.5,
                       bias=torch.randn(C, generator=gen, dtype=torch.float64))
    args.update({k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in changes.items()})
    theirs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    y = BF.batch_norm(**args)
    want = F.batch_norm(**theirs)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)  # float64: see tests/parity.py
    for name in ("running_mean", "running_var"):
        if args[name] is not None:
            torch.testing.assert_close(args[name], theirs[name], rtol=1e-9, atol=1e-9)


def test_half_input_with_float32_parameters_is_accepted_like_torch():
    x = torch.randn(8, C).half()
    params = [torch.zeros(C), torch.ones(C), torch.ones(C), torch.zeros(C)]
    y = BF.batch_norm(x, *params, training=True)
    want = F.batch_norm(x, *[p.clone() for p in params], training=True)
    assert y.dtype == torch.float16
    # Both round the same float32 result to float16 once: at most one half-ulp apart, 2^-11.
    torch.testing.assert_close(y.float(), want.float(), rtol=2.0**-10, atol=2.0**-10)


def test_module_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnn.BatchNorm1d(0)


@pytest.mark.parametrize("cls,shape", [(bnn.BatchNorm1d, (2, 10)), (bnn.BatchNorm2d, (2, 10, 5, 5)),
                                       (bnn.BatchNorm3d, (2, 10, 4, 4, 4))])
@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_module_eps_is_checked_at_forward_like_torch(cls, shape, eps):
    """torch constructs the layer and raises at forward, "eps must be positive" (its ModuleInfo
    error inputs match that text); before issue 13 bnlib raised at construction."""
    layer = cls(10, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        layer(torch.randn(shape))
    assert int(layer.num_batches_tracked) == 0


def test_module_momentum_outside_unit_interval_is_accepted_like_torch():
    ours, theirs = bnn.BatchNorm1d(C, momentum=2.0), torch.nn.BatchNorm1d(C, momentum=2.0)
    x = torch.randn(6, C)
    torch.testing.assert_close(ours(x), theirs(x))
    # float32, same formula: a few roundings of 2^-24 at |stat| ~ 1.
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="momentum must be a float"):
        bnn.BatchNorm1d(C, momentum="0.1")(x)


def test_float32_module_refuses_float64_input_and_keeps_its_buffers():
    m = bnn.BatchNorm1d(C)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(TypeError, match="but input is torch.float64"):
        m(torch.randn(4, C, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="mixed dtype"):  # torch refuses it too
        torch.nn.BatchNorm1d(C)(torch.randn(4, C, dtype=torch.float64))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_module_failing_in_training_keeps_its_counter_and_stats():
    m = bnn.BatchNorm2d(C)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, C, 1, 1))
    with pytest.raises(TypeError, match="floating dtype"):
        m(torch.ones(2, C, 2, 2, dtype=torch.int64))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


NUMPY_CASES = [
    ("one value per channel", lambda: R.forward(np.ones((1, C)), np.ones(C), np.zeros(C)),
     ValueError, "more than 1 value per channel"),
    ("gamma shape", lambda: R.forward(np.ones((4, C)), np.ones(C + 1), np.zeros(C)),
     ValueError, r"gamma must have shape \(3,\)"),
    ("beta shape", lambda: R.forward(np.ones((4, C)), np.ones(C), np.zeros((C, 1))),
     ValueError, r"beta must have shape \(3,\)"),
    ("integer x", lambda: R.forward(np.ones((4, C), dtype=int), np.ones(C), np.zeros(C)),
     TypeError, "x must have a floating dtype"),
    ("eps", lambda: R.forward(np.ones((4, C)), np.ones(C), np.zeros(C), eps=0),
     ValueError, "eps must be a positive"),
    ("momentum", lambda: R.ema_update(np.zeros(C), np.ones(C), momentum=1.01),
     ValueError, r"momentum must be in \[0, 1\]"),
    ("inference var shape", lambda: R.inference(np.ones((4, C)), np.ones(C), np.zeros(C), np.zeros(C), np.ones(2)),
     ValueError, r"var must have shape \(3,\)"),
    ("negative var", lambda: R.fold(np.ones(C), np.zeros(C), np.zeros(C), -np.ones(C)),
     ValueError, "var must be non-negative"),
    ("dy shape", lambda: R.backward(np.ones((4, C + 1)), R.forward(np.random.rand(4, C), np.ones(C), np.zeros(C))[1]),
     ValueError, "dy must have the shape of x"),
    ("cumulative without count", lambda: R.update_running_stats(np.zeros(C), np.ones(C), np.random.rand(4, C), momentum=None),
     ValueError, "count is required"),
    ("unbiased with m = 1", lambda: R.unbiased(np.ones(C), 1), ValueError, "m must be at least 2"),
]


@pytest.mark.parametrize("case,call,error,message", NUMPY_CASES, ids=[c[0] for c in NUMPY_CASES])
def test_reference_rejects_bad_input(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_reference_running_update_does_not_modify_its_inputs():
    rm, rv = np.zeros(C), np.ones(C)
    R.update_running_stats(rm, rv, np.random.rand(5, C))
    assert np.array_equal(rm, np.zeros(C)) and np.array_equal(rv, np.ones(C))
