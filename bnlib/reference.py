"""Batch Normalization in NumPy, as in Ioffe & Szegedy (2015): the reference every other path is checked against.

Channel axis is 1; statistics are taken over every other axis, so (N, C), (N, C, L) and
(N, C, H, W) all work and m = N * L or N * H * W values enter each channel's statistics.
Computations run in the input's floating dtype, except that batch statistics of float16 and
float32 inputs are accumulated in float64 (no E[x^2] - E[x]^2 cancellation, no drift in long
sums), then cast back.
"""
from dataclasses import dataclass

import numpy as np

from bnlib.checks import (check_batch_for_training, check_channel_param, check_eps,
                          check_input_shape, check_momentum, per_channel, reduce_axes,
                          values_per_channel)


# --- checks ------------------------------------------------------------------------------

def _as_float_array(a, name):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype (float16/32/64), got {a.dtype}")
    return a


def _check_params(x, gamma, beta, eps):
    x = _as_float_array(x, "x")
    check_input_shape(x.shape, "x")
    check_eps(eps)
    c = x.shape[1]
    gamma = _as_float_array(gamma, "gamma")
    beta = _as_float_array(beta, "beta")
    check_channel_param(gamma, c, "gamma")
    check_channel_param(beta, c, "beta")
    return x, gamma, beta


# --- statistics --------------------------------------------------------------------------

def batch_stats(x):
    """Per-channel mean and biased variance (divide by m), two-pass, accumulated in float64.

    Returns float64 arrays of shape (C,) whatever the input dtype.
    Book: book/derivations/transform.ipynb
    """
    x = _as_float_array(x, "x")
    check_input_shape(x.shape, "x")
    axes = reduce_axes(x.ndim)
    mean = np.mean(x, axis=axes, dtype=np.float64)
    centred = x.astype(np.float64, copy=False) - per_channel(mean, x.ndim)
    var = np.mean(centred * centred, axis=axes)
    return mean, var


def unbiased(var, m):
    """The paper's m/(m-1) correction of a biased (divide-by-m) variance.
    Book: book/derivations/transform.ipynb
    """
    if m < 2:
        raise ValueError(f"m must be at least 2 for the unbiased variance, got {m}")
    return var * (m / (m - 1))


# --- Algorithm 1: training-mode forward ---------------------------------------------------

@dataclass
class Cache:
    """What the backward passes need from the forward pass."""
    x: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray     # mu_B, shape (C,)
    var: np.ndarray      # sigma_B^2 (biased), shape (C,)
    gamma: np.ndarray
    eps: float

    @property
    def m(self):
        return values_per_channel(self.x.shape)

    @property
    def inv_std(self):
        """1 / sqrt(sigma_B^2 + eps), shape (C,)."""
        return 1.0 / np.sqrt(self.var + self.eps)


def forward(x, gamma, beta, eps=1e-5):
    """Algorithm 1: y = gamma * (x - mu_B) / sqrt(sigma_B^2 + eps) + beta. Returns (y, cache).
    Book: book/derivations/transform.ipynb
    """
    x, gamma, beta = _check_params(x, gamma, beta, eps)
    check_batch_for_training(x.shape, "x")
    mean, var = batch_stats(x)
    mean, var = mean.astype(x.dtype), var.astype(x.dtype)
    nd = x.ndim
    x_hat = (x - per_channel(mean, nd)) / np.sqrt(per_channel(var, nd) + x.dtype.type(eps))
    y = per_channel(gamma, nd) * x_hat + per_channel(beta, nd)
    return y.astype(x.dtype, copy=False), Cache(x, x_hat, mean, var, gamma, eps)


# --- backward: compact closed form and the paper's staged chain rule ----------------------

def _check_dy(dy, cache):
    dy = _as_float_array(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(f"dy must have the shape of x, {cache.x.shape}, got {dy.shape}")
    return dy


def backward(dy, cache):
    """Compact form: per channel dx = a dy + b x_hat + c, with a = gamma / sqrt(var + eps),
    b = -a sum(dy x_hat) / m and c = -a sum(dy) / m.

    Two per-channel reductions (sum dy, sum dy*x_hat) and one elementwise pass.
    Returns (dx, dgamma, dbeta).
    Book: book/derivations/backward.ipynb
    """
    dy = _check_dy(dy, cache)
    axes, nd, m = reduce_axes(dy.ndim), dy.ndim, cache.m
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    a = cache.gamma * cache.inv_std
    b, c = -a * dgamma / m, -a * dbeta / m
    dx = per_channel(a, nd) * dy + per_channel(b, nd) * cache.x_hat + per_channel(c, nd)
    return dx, dgamma, dbeta


STAGES = ("dl_dxhat", "dl_dvar", "dl_dmu", "dl_dx", "dl_dgamma", "dl_dbeta")


def staged_partials(dy, cache):
    """The paper's six partials (section 3), in its order, one named step each.

    Returns a dict with keys STAGES; dl_dvar and dl_dmu are per-channel (C,), the others
    have the shape of x except dl_dgamma and dl_dbeta, which are (C,).
    Book: book/derivations/backward.ipynb
    """
    dy = _check_dy(dy, cache)
    axes, nd, m = reduce_axes(dy.ndim), dy.ndim, cache.m
    centred = cache.x - per_channel(cache.mean, nd)          # x_i - mu_B
    var_eps = per_channel(cache.var, nd) + cache.eps         # sigma_B^2 + eps

    dl_dxhat = dy * per_channel(cache.gamma, nd)
    dl_dvar = (dl_dxhat * centred * -0.5 * var_eps ** -1.5).sum(axis=axes)
    dl_dmu = ((dl_dxhat * -var_eps ** -0.5).sum(axis=axes)
              + dl_dvar * (-2.0 * centred).sum(axis=axes) / m)
    dl_dx = (dl_dxhat * var_eps ** -0.5
             + per_channel(dl_dvar, nd) * 2.0 * centred / m
             + per_channel(dl_dmu, nd) / m)
    dl_dgamma = (dy * cache.x_hat).sum(axis=axes)
    dl_dbeta = dy.sum(axis=axes)
    return dict(zip(STAGES, (dl_dxhat, dl_dvar, dl_dmu, dl_dx, dl_dgamma, dl_dbeta)))


def backward_staged(dy, cache):
    """The paper's chain rule, step by step (see staged_partials). Returns (dx, dgamma, dbeta).
    Book: book/derivations/backward.ipynb
    """
    p = staged_partials(dy, cache)
    return p["dl_dx"], p["dl_dgamma"], p["dl_dbeta"]


# --- Algorithm 2: inference ----------------------------------------------------------------

def fold(gamma, beta, mean, var, eps=1e-5):
    """Algorithm 2, step 11, as one affine map per channel: y = scale * x + shift.
    Book: book/derivations/transform.ipynb
    """
    check_eps(eps)
    gamma, beta = _as_float_array(gamma, "gamma"), _as_float_array(beta, "beta")
    mean, var = _as_float_array(mean, "mean"), _as_float_array(var, "var")
    if gamma.ndim != 1:
        raise ValueError(f"gamma must have shape (C,), got {gamma.shape}")
    for name, v in (("beta", beta), ("mean", mean), ("var", var)):
        check_channel_param(v, gamma.shape[0], name)
    if np.any(var < 0):
        raise ValueError("var must be non-negative")
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def inference(x, gamma, beta, mean, var, eps=1e-5):
    """Algorithm 2: normalize with fixed (population or running) statistics.
    Book: book/derivations/transform.ipynb
    """
    x, gamma, beta = _check_params(x, gamma, beta, eps)
    c = x.shape[1]
    mean, var = _as_float_array(mean, "mean"), _as_float_array(var, "var")
    check_channel_param(mean, c, "mean")
    check_channel_param(var, c, "var")
    scale, shift = fold(gamma, beta, mean, var, eps)
    nd = x.ndim
    return (per_channel(scale, nd) * x + per_channel(shift, nd)).astype(x.dtype, copy=False)


# --- running statistics ----------------------------------------------------------------------

def ema_update(running, batch, momentum=0.1):
    """PyTorch's convention: momentum is the weight of the new batch, (1 - momentum) of the old."""
    check_momentum(momentum)
    return (1.0 - momentum) * np.asarray(running) + momentum * np.asarray(batch)


def cumulative_update(running, batch, count):
    """Running average of `count` batches, this one included (PyTorch's momentum=None)."""
    if int(count) < 1:
        raise ValueError(f"count must be at least 1 (batches seen, this one included), got {count}")
    running, batch = np.asarray(running), np.asarray(batch)
    return running + (batch - running) / count


def update_running_stats(running_mean, running_var, x, momentum=0.1, count=None, unbiased_var=True):
    """One training step's update of the running statistics from batch x, as torch does it.

    momentum=None means a cumulative average; then `count` (batches seen, this one included) is
    required. With unbiased_var=True (PyTorch's choice) the batch variance enters with m/(m-1).
    Returns new (running_mean, running_var); nothing is modified in place.
    Book: book/derivations/transform.ipynb
    """
    check_momentum(momentum, allow_none=True)
    x = _as_float_array(x, "x")
    check_input_shape(x.shape, "x")
    check_batch_for_training(x.shape, "x")
    c = x.shape[1]
    check_channel_param(np.asarray(running_mean), c, "running_mean")
    check_channel_param(np.asarray(running_var), c, "running_var")
    mean, var = batch_stats(x)
    if unbiased_var:
        var = unbiased(var, values_per_channel(x.shape))
    if momentum is None:
        if count is None:
            raise ValueError("count is required when momentum is None (cumulative average)")
        return cumulative_update(running_mean, mean, count), cumulative_update(running_var, var, count)
    return ema_update(running_mean, mean, momentum), ema_update(running_var, var, momentum)


def population_stats(batch_means, batch_vars, m, unbiased_var=True):
    """Algorithm 2, step 10: E[x] = mean of batch means, Var[x] = m/(m-1) * mean of batch variances.

    batch_means, batch_vars: arrays of shape (num_batches, C) of biased per-batch statistics,
    each from m values per channel. unbiased_var=False keeps the plain average (no m/(m-1)).
    """
    batch_means = np.asarray(batch_means, dtype=np.float64)
    batch_vars = np.asarray(batch_vars, dtype=np.float64)
    if batch_means.ndim != 2 or batch_means.shape != batch_vars.shape:
        raise ValueError("batch_means and batch_vars must both have shape (num_batches, C), got "
                         f"{batch_means.shape} and {batch_vars.shape}")
    mean = batch_means.mean(axis=0)
    var = batch_vars.mean(axis=0)
    return mean, (unbiased(var, m) if unbiased_var else var)
