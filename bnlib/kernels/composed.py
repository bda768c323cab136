"""The composed backend: the derived forward and compact backward built from ATen operators,
with one full-size buffer per direction, for float32/float64 inputs on any device.

The formulas are bnlib.functional's (batch_stats, compact_backward); what this module adds is
how to run them with few passes over memory, borrowing two of torch's own batch-norm kernels
as fused per-channel reductions and affine maps. The Performance chapter counts the passes.
Book: book/performance.ipynb
"""
import torch

from bnlib.checks import per_channel, reduce_axes, values_per_channel

# Channel-innermost tensors at least this large are summed by a matrix-vector product.
MV_MIN_NUMEL = 1 << 16


def takes(x, *tensors):
    """True for float32/float64 x whose other tensors (None allowed) share its dtype."""
    return (x.dtype in (torch.float32, torch.float64)
            and all(t is None or t.dtype == x.dtype for t in tensors))


def channel_sum(t):
    """Per-channel sum over every axis but 1. Large channel-innermost tensors (2D, channels-last)
    go through a matrix-vector product, which reads (M, C) memory in order instead of striding
    down columns; small ones through sum, which has less per-call overhead."""
    c = t.shape[1]
    if t.numel() >= MV_MIN_NUMEL and t.dtype in (torch.float32, torch.float64):
        tl = t.movedim(1, -1)
        if tl.is_contiguous():
            flat = tl.reshape(-1, c)
            return torch.mv(flat.t(), flat.new_ones(flat.shape[0]))
    return t.sum(reduce_axes(t.ndim))


def channel_sums(p, q, center, scale):
    """Per-channel sum(p) and sum(p * (q - center)) * scale, in one fused pass with no temporary.

    torch has no public fused two-sum reduction, but the kernel behind its own batch-norm
    gradient is one: aten.native_batch_norm_backward, asked only for the weight and bias
    gradients (output_mask (False, True, True)) with `center` as the mean and `scale` as the
    inverse std, returns exactly these two sums. q - center is formed per element, so a large
    common offset is subtracted before anything is summed.
    """
    _, s_pq, s_p = torch.ops.aten.native_batch_norm_backward(
        p, q, None, None, None, center, scale, True, 0.0, [False, True, True])
    return s_p, s_pq


def channel_affine(x, scale, shift):
    """x * scale + shift per channel, in one pass into a new tensor.

    On (N, C, *) inputs with spatial axes, torch's inference-mode batch-norm kernel with mean 0,
    variance 1 and eps 0 computes exactly this (its inverse std is 1/sqrt(1) = 1), faster than
    addcmul with two broadcast operands; on (N, C) addcmul is as fast and has less overhead.
    """
    if x.ndim == 2:
        return torch.addcmul(shift, x, scale)
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    return torch.batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0, False)


def update_running_stats(running_mean, running_var, mean, var, m, momentum):
    """r <- (1 - momentum) r + momentum * batch statistic, with the unbiased m/(m-1) variance."""
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)


def forward(x, weight, bias, running_mean, running_var, momentum, eps):
    """Two-pass statistics and y with one full-size buffer (the future y): (y, mean, invstd).

    A first mean, then the deviations d = x - mean in the buffer; one fused pass sums d and d^2:
    the mean of d corrects the first mean (float32 sums of values near a large offset round;
    sums of d barely do), and the squares give the variance (no E[x^2] - E[x]^2). Then
    y = scale * d + shift per channel, written over the same buffer.
    """
    nd, m = x.ndim, values_per_channel(x.shape)
    mean0 = channel_sum(x).div_(m)
    buf = torch.sub(x, per_channel(mean0, nd))
    # sum(d) and sum(d^2) in one sweep over the buffer alone (centre 0, scale 1).
    sum_d, sum_dd = channel_sums(buf, buf, torch.zeros_like(mean0), torch.ones_like(mean0))
    shift_mean = sum_d.div_(m)                              # mean(d): the first mean's error
    var = sum_dd.div_(m).addcmul_(shift_mean, shift_mean, value=-1)
    mean = mean0.add_(shift_mean)
    invstd = var.add(eps).rsqrt_()
    scale = invstd if weight is None else invstd * weight
    # y = scale (d - mean(d)) + bias
    shift = (torch.mul(shift_mean, scale).neg_() if bias is None
             else torch.addcmul(bias, shift_mean, scale, value=-1))
    y = torch.addcmul(per_channel(shift, nd), buf, per_channel(scale, nd), out=buf)
    update_running_stats(running_mean, running_var, mean, var, m, momentum)
    return y, mean, invstd


def backward(dy, x, weight, mean, invstd, need_dx=True):
    """The compact backward: one fused sweep for both reductions, then dx in two passes.

    The reductions sum(dy) and sum(dy x_hat) come from one pass over (dy, x), with x - mean
    formed per element. Per channel dx = a dy + b x_hat + c (the book's coefficients), written
    as a dy + (b invstd) x + (c - b invstd mean) so that x_hat is never stored: two elementwise
    passes into dx's own buffer. Folding the mean into the constant rounds at |x|'s scale; the
    saved mean carries that rounding already, so this costs no accuracy (tests/test_parity.py
    measures both paths against float64).
    """
    if dy.stride() != x.stride():
        # torch's batch-norm gradient kernel (behind channel_sums) can misread a dy laid out
        # unlike x, e.g. for a single HWC image permuted to (1, C, H, W): copy dy into x's layout.
        dy = torch.empty_like(x).copy_(dy)
    nd, m = x.ndim, values_per_channel(x.shape)
    sum_dy, sum_dy_xhat = channel_sums(dy, x, mean, invstd)  # dl/dbeta, dl/dgamma
    dx = None
    if need_dx:
        a = invstd if weight is None else invstd * weight
        b_invstd = (a * invstd).mul_(sum_dy_xhat).mul_(-1.0 / m)
        const = torch.mul(a, sum_dy).mul_(-1.0 / m).sub_(b_invstd * mean)  # c - b invstd mean
        dx = channel_affine(x, b_invstd, const)
        dx.addcmul_(dy, per_channel(a, nd))
    return dx, sum_dy_xhat, sum_dy
