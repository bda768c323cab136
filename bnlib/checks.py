"""Argument checks and the channel-axis conventions shared by the NumPy and torch paths.

Each error names the argument. The channel axis is 1; statistics are taken over every other axis.
"""
import math


def reduce_axes(ndim):
    """The axes a channel's statistics are taken over: every axis but 1."""
    return (0,) + tuple(range(2, ndim))


def per_channel(v, ndim):
    """A (C,) vector shaped to broadcast against an (N, C, *) array or tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def check_momentum(momentum, allow_none=False):
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


def check_channel_param(param, num_channels, name):
    """A per-channel parameter (gamma, beta, mean, var) must have shape (C,)."""
    if param is None:
        return
    shape = tuple(param.shape)
    if shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},) to match the {num_channels} "
            f"channels on axis 1, got {shape}")
