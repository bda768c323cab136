"""Batch Normalization in torch, on any device, with the derived compact backward.

`batch_norm` has the signature and semantics of `torch.nn.functional.batch_norm`. In training
it runs `BatchNormFunction`, a `torch.autograd.Function` whose backward is the closed form
derived in the book (two per-channel reductions, then one elementwise pass), not autograd
through the forward. It saves only x and the per-channel mean and inverse std, as the native
kernel does. float16/bfloat16 inputs have their statistics accumulated in float32.
"""
import torch

from bnlib import _cpu_kernel, _triton_kernel
from bnlib._checks import (check_batch_for_training, check_channel_param, check_eps,
                           check_input_shape, check_momentum, values_per_channel)


def _as(t, dtype):
    """t in dtype; t itself when it already is (a no-op .to still costs a dispatch, a few
    microseconds, which matters to the smallest inputs: see the Performance chapter)."""
    return t if t.dtype == dtype else t.to(dtype)


def _reduce_dims(ndim):
    return [0] + list(range(2, ndim))


def _per_channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _compute_dtype(dtype):
    """Statistics and per-channel coefficients: float32 for half types, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batch_stats(x):
    """Per-channel mean and biased variance of x, in the compute dtype (float32 for half types).

    Two-pass (mean first, then the mean of squared deviations, via torch.var_mean), so a large
    common offset does not cancel the way E[x^2] - E[x]^2 does.
    """
    xc = x.to(_compute_dtype(x.dtype))
    var, mean = torch.var_mean(xc, dim=_reduce_dims(x.ndim), correction=0)
    return mean, var


def compact_backward(dy, x, weight, mean, invstd, needs_input_grad=(True, True, True)):
    """The derived closed form: dl/dbeta = sum(dy), dl/dgamma = sum(dy x_hat) and
    dx = gamma*invstd/m * (m dy - sum(dy) - x_hat sum(dy x_hat)), computed as two per-channel
    reductions and one elementwise pass. Returns (dx, dgamma, dbeta) in the compute dtype.
    """
    nd, dims, m = x.ndim, _reduce_dims(x.ndim), values_per_channel(x.shape)
    cdt = mean.dtype
    dyc = dy.to(cdt)
    sum_dy = dyc.sum(dims)
    x_hat = (x.to(cdt) - _per_channel(mean, nd)) * _per_channel(invstd, nd)
    sum_dy_xhat = (dyc * x_hat).sum(dims)
    dx = None
    if needs_input_grad[0]:
        # Per channel this is one fused affine map of (dy, x_hat): dx = g dy + b x_hat + c.
        g = invstd if weight is None else invstd * weight.to(cdt)
        b = -g * sum_dy_xhat / m
        c = -g * sum_dy / m
        dx = torch.addcmul(_per_channel(c, nd), x_hat, _per_channel(b, nd))
        dx = torch.addcmul(dx, dyc, _per_channel(g, nd))
    return dx, sum_dy_xhat, sum_dy


def _channel_sum(t):
    """Per-channel sum over every axis but 1. Large channel-innermost tensors (2D, channels-last)
    go through a matrix-vector product, which reads (M, C) memory in order instead of striding
    down columns; small ones through sum, which has less per-call overhead."""
    c = t.shape[1]
    if t.numel() >= _MV_MIN_NUMEL and t.dtype in (torch.float32, torch.float64):
        tl = t.movedim(1, -1)
        if tl.is_contiguous():
            flat = tl.reshape(-1, c)
            return torch.mv(flat.t(), flat.new_ones(flat.shape[0]))
    return t.sum(_reduce_dims(t.ndim))


_MV_MIN_NUMEL = 1 << 16


def _channel_sums(a, b, center, scale):
    """Per-channel sum(a) and sum(a * (b - center)) * scale, in one fused pass with no temporary.

    torch has no public fused two-sum reduction, but the kernel behind its own batch-norm
    gradient is one: aten.native_batch_norm_backward, asked only for the weight and bias
    gradients (output_mask (False, True, True)) with `center` as the mean and `scale` as the
    inverse std, returns exactly these two sums. b - center is formed per element, so a large
    common offset is subtracted before anything is summed.
    """
    _, s_ab, s_a = torch.ops.aten.native_batch_norm_backward(
        a, b, None, None, None, center, scale, True, 0.0, [False, True, True])
    return s_a, s_ab


def _channel_affine(x, scale, shift):
    """x * scale + shift per channel, in one pass into a new tensor.

    On (N, C, *) inputs with spatial axes, torch's inference-mode batch-norm kernel with mean 0,
    variance 1 and eps 0 computes exactly this (its inverse std is 1/sqrt(1) = 1), faster than
    addcmul with two broadcast operands; on (N, C) addcmul is as fast and has less overhead.
    """
    if x.ndim == 2:
        return torch.addcmul(shift, x, scale)
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    return torch.batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0, False)


def _compact_backward_inplace(dy, x, weight, mean, invstd, needs_input_grad):
    """compact_backward's formula: one fused sweep for both reductions, then dx in two passes.

    The reductions sum(dy) and sum(dy x_hat) come from one pass over (dy, x), with x - mean
    formed per element. dx = g dy + k x + c per channel (x_hat folded into the coefficients, so
    it is never stored), written in two elementwise passes into dx's own buffer. Folding the mean
    into c rounds k x at |x|'s scale; the saved mean itself carries that rounding already, so
    this costs no accuracy (tests/test_functional.py measures both against float64).
    """
    nd, m = x.ndim, values_per_channel(x.shape)
    sum_dy, sum_dy_xhat = _channel_sums(dy, x, mean, invstd)  # dl/dbeta, dl/dgamma
    dx = None
    if needs_input_grad[0]:
        g = invstd if weight is None else invstd * weight
        k = (g * invstd).mul_(sum_dy_xhat).mul_(-1.0 / m)   # coefficient of x - mean
        c = torch.mul(g, sum_dy).mul_(-1.0 / m).sub_(k * mean)
        dx = _channel_affine(x, k, c)
        dx.addcmul_(dy, _per_channel(g, nd))                # dx = g dy + k (x - mean) + c
    return dx, sum_dy_xhat, sum_dy


def _forward_inplace(x, weight, bias, eps):
    """Two-pass statistics and y with one full-size buffer (the future y): (y, mean, var, invstd).

    A first mean, then the deviations d = x - mean in the buffer; one fused pass sums d and d^2:
    the mean of d corrects the first mean (float32 sums of values near a large offset round;
    sums of d barely do), and the squares give the variance (no E[x^2] - E[x]^2). Then
    y = scale * d + shift per channel, written over the same buffer.
    """
    nd, m = x.ndim, values_per_channel(x.shape)
    mean0 = _channel_sum(x).div_(m)
    buf = torch.sub(x, _per_channel(mean0, nd))
    # sum(d) and sum(d^2) in one sweep over the buffer alone (centre 0, scale 1).
    sum_d, sum_dd = _channel_sums(buf, buf, torch.zeros_like(mean0), torch.ones_like(mean0))
    shift_mean = sum_d.div_(m)                              # mean(d): the first mean's error
    var = sum_dd.div_(m).addcmul_(shift_mean, shift_mean, value=-1)
    mean = mean0.add_(shift_mean)
    invstd = var.add(eps).rsqrt_()
    scale = invstd if weight is None else invstd * weight
    # y = scale (d - mean(d)) + bias
    shift = torch.mul(shift_mean, scale).neg_() if bias is None else torch.addcmul(bias, shift_mean, scale, value=-1)
    y = torch.addcmul(_per_channel(shift, nd), buf, _per_channel(scale, nd), out=buf)
    return y, mean, var, invstd


# Marks a tensor as modified in place, so autograd refuses to use a stale saved copy of it.
_increment_version = getattr(torch.autograd.graph, "increment_version", None) or torch._C._increment_version


def _fast_path(x, *tensors):
    """The buffer-reusing paths: float32/float64 input, parameters of the same dtype, no autograd."""
    return (x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled()
            and all(t is None or t.dtype == x.dtype for t in tensors))


def path_for(x, weight=None, bias=None, running_mean=None, running_var=None):
    """Which path a training-mode call on these tensors takes: 'cpu kernel', 'triton' or
    'composed' (see BatchNormFunction)."""
    if _cpu_kernel.usable(x, weight, bias, running_mean, running_var):
        return "cpu kernel"
    if _triton_kernel.usable(x, weight, bias, running_mean, running_var):
        return "triton"
    return "composed"


def _bump_versions(*tensors):
    """Tell autograd that tensors written by a kernel (not by a torch op) have changed."""
    for t in tensors:
        if t is not None:
            _increment_version(t)


def _backward_grads(ctx, dy, x, weight, mean, invstd):
    """(dx, dgamma, dbeta) by the CPU kernel or the composed path (see BatchNormFunction)."""
    if torch.is_grad_enabled():  # create_graph=True: keep the statistics' dependence on x
        mean, var = batch_stats(x)
        invstd = torch.rsqrt(var + ctx.eps)
        return compact_backward(dy, x, weight, mean, invstd, ctx.needs_input_grad)
    if ctx.kernel:
        return torch.ops.bnlib.backward(_as(dy, x.dtype), x, weight, mean, invstd,
                                        ctx.needs_input_grad[0])
    if _fast_path(x, dy, weight):
        if dy.stride() != x.stride():
            # torch's batch-norm gradient kernel (behind _channel_sums) can misread a dy laid
            # out unlike x, e.g. for a single HWC image permuted to (1, C, H, W): copy dy
            # into x's layout first.
            dy = torch.empty_like(x).copy_(dy)
        return _compact_backward_inplace(dy, x, weight, mean, invstd, ctx.needs_input_grad)
    return compact_backward(dy, x, weight, mean, invstd, ctx.needs_input_grad)


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: forward normalizes with batch statistics; backward is the compact form.

    Small float32/float64 CPU inputs go through the compiled kernel (bnlib._cpu_kernel: one call
    per direction, same formulas); with BNLIB_TRITON=1, float32/half CUDA inputs go through the
    Triton kernels (bnlib._triton_kernel: three launches per direction, same formulas; a kernel
    that fails warns once and hands over to the composed path). Otherwise both directions run
    with one full-size buffer each where the dtypes allow (float32/float64 input and
    parameters), else in the compute dtype via batch_stats/compact_backward.
    Only x, the weight and the per-channel mean and inverse std are saved (on the Triton path
    also the mean's float32 rounding error, per channel); the running
    statistics, if given, are updated in place.
    Double backward is supported: under create_graph=True the backward recomputes the batch
    statistics from x with autograd on, so the compact form can itself be differentiated.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1):
        nd = x.ndim
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        path = path_for(x, weight, bias, running_mean, running_var)
        ctx.kernel, ctx.triton = path == "cpu kernel", path == "triton"
        if ctx.triton:
            try:
                y, mean, invstd, mean_lo = _triton_kernel.forward(
                    x, weight, bias, running_mean, running_var, momentum, eps)
            except _triton_kernel.KernelError as err:  # composed path from here on
                _triton_kernel.disable(err)
                ctx.triton = False
                if err.running_updated:  # already done: the composed path must not repeat it
                    running_mean = running_var = None
            else:
                _bump_versions(running_mean, running_var)
                ctx.save_for_backward(x, weight, mean, invstd, mean_lo)
                return y
        if ctx.kernel:  # the kernel updates the running statistics itself
            y, mean, invstd = torch.ops.bnlib.forward(x, weight, bias, running_mean, running_var,
                                                      momentum, eps)
            _bump_versions(running_mean, running_var)  # written in C++, as lerp_ would tell
            ctx.save_for_backward(x, weight, mean, invstd)
            return y
        if _fast_path(x, weight, bias):
            y, mean, var, invstd = _forward_inplace(x, weight, bias, eps)
        else:
            mean, var = batch_stats(x)
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
            y = torch.addcmul(_per_channel(shift, nd), x, _per_channel(scale, nd)).to(x.dtype)
        m = values_per_channel(x.shape)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, *mean_lo = ctx.saved_tensors  # mean_lo: Triton path only
        grads = None
        if ctx.triton and not torch.is_grad_enabled():
            try:
                grads = _triton_kernel.backward(dy, x, weight, mean, invstd, mean_lo[0],
                                                ctx.needs_input_grad[0])
            except _triton_kernel.KernelError as err:  # composed path from here on
                _triton_kernel.disable(err)
        if grads is None:
            grads = _backward_grads(ctx, dy, x, weight, mean, invstd)
        dx, dweight, dbias = grads
        return (None if dx is None else _as(dx, x.dtype),
                _as(dweight, weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None,
                _as(dbias, ctx.bias_dtype) if ctx.needs_input_grad[2] else None,
                None, None, None, None)


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


def check_args(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Every check batch_norm makes, before anything is computed or mutated."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must have a floating dtype, got {input.dtype}")
    check_input_shape(input.shape, "input")
    check_eps(eps)
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_tensor(t, name, input.device)
        check_channel_param(t, c, name)
    if training:
        check_momentum(momentum)
        check_batch_for_training(input.shape, "input")
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Drop-in for torch.nn.functional.batch_norm (same arguments, defaults and semantics).

    training=True: normalize with the batch's mean and biased variance; if running stats are
    given, update them in place: r <- (1 - momentum) r + momentum * batch_stat, with the
    unbiased (m/(m-1)) batch variance. training=False: Algorithm 2 with the running stats.
    """
    check_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    nd = input.ndim
    if not training:
        cdt = _compute_dtype(input.dtype)
        scale = torch.rsqrt(running_var.to(cdt) + eps)
        if weight is not None:
            scale = scale * weight.to(cdt)
        shift = -running_mean.to(cdt) * scale
        if bias is not None:
            shift = shift + bias.to(cdt)
        return torch.addcmul(_per_channel(shift, nd), input, _per_channel(scale, nd)).to(input.dtype)

    return BatchNormFunction.apply(input, weight, bias, eps, running_mean, running_var, momentum)
