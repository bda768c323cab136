"""Argument checks and the channel-axis conventions shared by the NumPy and torch paths.

Each error names the argument. The channel axis is 1; statistics are taken over every other axis.
The torch-side checks (check_args, which batch_norm and the modules run first, and its parts)
accept what torch.nn.functional.batch_norm accepts and reject what it rejects; the few places
where they are stricter are listed, with torch's behaviour beside each, in the README ("bnlib and torch: the
drop-in policy").
"""
import math

import torch

HALF = (torch.float16, torch.bfloat16)


def check_num_features(num_features):
    """A BN layer's channel count: a positive int (torch builds a layer of 0 and fails later)."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")


def check_input_dims(input, expected, layer):
    """A layer's input rank: one of `expected` (e.g. (2, 3)); the error names the layer."""
    if input.dim() not in expected:
        dims = " or ".join(f"{d}D" for d in expected)
        raise ValueError(f"input must be {dims} for {layer}, "
                         f"got {input.dim()}D (shape {tuple(input.shape)})")


def count_batch(layer):
    """Count one training batch in a BN layer's num_batches_tracked (where it keeps one) and
    return the momentum this batch's update uses: layer.momentum, or, for momentum=None, 1/n for
    the n-th counted batch (a cumulative average; 0.0 where nothing is counted). Call it after
    the checks, so that a failing call changes nothing."""
    counter = layer.num_batches_tracked
    if counter is not None:
        counter.add_(1)
    if layer.momentum is not None:
        return layer.momentum
    return 0.0 if counter is None else 1.0 / float(counter)


def reduce_axes(ndim):
    """The axes a channel's statistics are taken over: every axis but 1."""
    return (0,) + tuple(range(2, ndim))


def per_channel(v, ndim):
    """A (C,) vector shaped to broadcast against an (N, C, *) array or tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _real(value, name, expected):
    """value as a Python float: ints, floats, bools and one-element tensors, as torch takes them."""
    if type(value) is float:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def check_eps(eps):
    """For the NumPy reference: eps a positive finite float."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def check_eps_for(eps, training):
    """As torch: eps > 0 in training, eps >= 0 in eval. Stricter: NaN and inf are refused (torch
    returns NaN, or y = bias with a zero gradient, without a word). Returns eps as a float."""
    value = _real(eps, "eps", "a float")
    if not math.isfinite(value):
        raise ValueError(f"eps must be a finite float, got {eps!r}")
    if training and value <= 0:
        raise ValueError(f"eps must be positive during training, got {eps!r}")
    if value < 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")
    return value


def check_momentum_for(momentum, training):
    """As torch: any float (None is a TypeError, as in torch.nn.functional.batch_norm; the modules
    turn None into a cumulative average first). Only used in training, where it must be finite
    (stricter: torch writes NaN or inf into the running statistics)."""
    value = _real(momentum, "momentum", "a float")
    if training and not math.isfinite(value):
        raise ValueError(f"momentum must be a finite float in training, got {momentum!r}")
    return value


def check_momentum(momentum, allow_none=False):
    """For the NumPy reference: momentum in [0, 1] (or None where allowed)."""
    if momentum is None and allow_none:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        expected = "a float in [0, 1] or None" if allow_none else "a float in [0, 1]"
        raise TypeError(f"momentum must be {expected}, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")


def check_input_shape(shape, name="x"):
    """The input must have a channel axis 1 and a batch axis 0: (N, C, ...)."""
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have shape (N, C) or (N, C, *spatial), got {tuple(shape)}")


def values_per_channel(shape):
    """m in the paper: how many values one channel's statistics are taken over."""
    m = shape[0]
    for s in shape[2:]:
        m *= s
    return m


def check_batch_for_training(shape, name="x"):
    m = values_per_channel(shape)
    if m < 2:
        raise ValueError(
            f"{name} has {m} value per channel (shape {tuple(shape)}); batch statistics "
            "in training need more than 1 value per channel")


def check_channel_param(param, num_channels, name, any_shape=False):
    """A per-channel parameter (gamma, beta, mean, var) must have shape (C,); with any_shape
    (torch's rule for weight and bias), any shape of C elements."""
    if param is None:
        return
    shape = tuple(param.shape)
    if shape != (num_channels,) and not (any_shape and param.numel() == num_channels):
        what = f"{num_channels} elements" if any_shape else f"shape ({num_channels},)"
        raise ValueError(
            f"{name} must have {what} to match the {num_channels} channels on axis 1, got {shape}")


def check_param_dtypes(input, tensors):
    """As torch on CPU: the per-channel tensors share one dtype, the input's, or float32 when the
    input is float16/bfloat16. tensors: (name, tensor or None) pairs."""
    dtype = input.dtype
    for _, t in tensors:  # the common case first: every one has the input's dtype
        if t is not None and t.dtype != dtype:
            break
    else:
        return
    given = [(n, t) for n, t in tensors if t is not None]
    dtype = given[0][1].dtype
    allowed = (input.dtype, torch.float32) if input.dtype in HALF else (input.dtype,)
    for name, t in given:
        if t.dtype != dtype or dtype not in allowed:
            also = " (or all float32)" if input.dtype in HALF else ""
            raise TypeError(
                f"{name} has dtype {t.dtype} but input is {input.dtype}: weight, bias, "
                f"running_mean and running_var must all have the input's dtype{also}")


def _check_tensor(t, name, device):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}; "
                         "move them to the same device")


def _plain_params(input, tensors, c):
    """The common case, in one cheap sweep: each of tensors is None or a (C,) tensor with the
    input's dtype and device (every check below passes then; anything else takes the full checks)."""
    dtype, device, shape = input.dtype, input.device, (c,)
    for t in tensors:
        if t is not None and not (type(t) is torch.Tensor or isinstance(t, torch.Tensor)):
            return False
        if t is not None and (t.dtype != dtype or t.shape != shape or t.device != device):
            return False
    return True


def check_args(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Every check batch_norm makes, before anything is computed or mutated: what torch accepts
    passes, what it rejects fails (with an error naming the argument). Returns (momentum, eps)
    as floats."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must have a floating dtype, got {input.dtype}")
    if type(training) is not bool:
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not (input.ndim == 1 and input.numel() == 0):  # torch takes an empty (0,) input (C = 0)
        check_input_shape(input.shape, "input")
    eps = check_eps_for(eps, training)
    momentum = check_momentum_for(momentum, training)
    c = input.shape[1] if input.ndim > 1 else 0
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be "
                         f"None, got running_mean={_kind(running_mean)}, "
                         f"running_var={_kind(running_var)}")
    params = (("running_mean", running_mean), ("running_var", running_var),
              ("weight", weight), ("bias", bias))
    if not _plain_params(input, (running_mean, running_var, weight, bias), c):
        for name, t in params:
            _check_tensor(t, name, input.device)
            check_channel_param(t, c, name, any_shape=name in ("weight", "bias"))
        check_param_dtypes(input, params)
    if training:
        if input.numel() > 0:
            check_batch_for_training(input.shape, "input")
    elif running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    return momentum, eps


def _kind(t):
    return "None" if t is None else "a tensor"
