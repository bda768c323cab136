"""Batch Renormalization's training step (Ioffe, 2017) as a torch.autograd.Function.

Per channel, with sigma_B = sqrt(var_B + eps) (biased batch variance) and
sigma = sqrt(running_var + eps):

    r = clip(sigma_B / sigma, 1/r_max, r_max),  d = clip((mu_B - mu) / sigma, -d_max, d_max),
    x_hat = (x - mu_B) / sigma_B * r + d,        y = gamma x_hat + beta.

r and d are constants for the gradient. The backward is the derived closed form: dx is BN's
compact backward with gamma r in place of gamma, dgamma = r sum(dy xbn) + d sum(dy), dbeta =
sum(dy), where xbn = (x - mu_B) / sigma_B is BN's own x_hat. The running statistics are read
(r and d use them as they were before this batch) and then updated in place as torch's BN
updates them.
"""
import torch
from torch.autograd.function import once_differentiable

from bnlib.checks import per_channel, values_per_channel
from bnlib.functional import batch_stats, compact_backward
from bnlib.kernels.composed import update_running_stats


def correction(mean, var, running_mean, running_var, eps, r_max, d_max):
    """(r, d, invstd) per channel in the statistics' dtype: Batch Renorm's clipped correction of
    the batch statistics (mean, biased var) toward the running ones, and 1 / sigma_B.
    Book: book/derivations/batch_renorm.ipynb
    """
    cdt = mean.dtype
    invstd = torch.rsqrt(var + eps)
    sigma = torch.sqrt(running_var.to(cdt) + eps)
    r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / r_max, r_max)
    d = ((mean - running_mean.to(cdt)) / sigma).clamp(-d_max, d_max)
    return r, d, invstd


def renorm_forward(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """Training-mode forward without touching the running statistics: (y, mean, var, invstd, r, d).

    y = x * scale + shift per channel with scale = gamma r / sigma_B and
    shift = beta + gamma d - mu_B scale, computed in the compute dtype (float32 for half inputs)
    and returned in x's dtype. With r = 1 and d = 0 every operation is the one
    bnlib.functional.formula_forward does, so the result is BN's to the last bit.
    Book: book/derivations/batch_renorm.ipynb
    """
    mean, var = batch_stats(x)
    r, d, invstd = correction(mean, var, running_mean, running_var, eps, r_max, d_max)
    scale = invstd * r
    shift = d
    if weight is not None:
        w = weight.to(scale.dtype)
        scale = scale * w
        shift = shift * w
    if bias is not None:
        shift = bias.to(scale.dtype) + shift
    shift = shift - mean * scale
    nd = x.ndim
    y = torch.addcmul(per_channel(shift, nd), x, per_channel(scale, nd)).to(x.dtype)
    return y, mean, var, invstd, r, d


def renorm_backward(dy, x, weight, mean, invstd, r, d, needs_input_grad=(True, True, True)):
    """The derived backward with r and d held constant: (dx or None, dgamma, dbeta).

    dx = r * (BN's compact backward), i.e. compact_backward with weight gamma r;
    dgamma = sum(dy x_hat) = r sum(dy xbn) + d sum(dy); dbeta = sum(dy).
    Book: book/derivations/batch_renorm.ipynb
    """
    a = r if weight is None else r * weight.to(r.dtype)
    dx, sum_dy_xbn, sum_dy = compact_backward(dy, x, a, mean, invstd, needs_input_grad)
    return dx, r * sum_dy_xbn + d * sum_dy, sum_dy


class BatchRenormFunction(torch.autograd.Function):
    """Training-mode Batch Renorm: forward as renorm_forward (then the running statistics are
    updated in place with momentum, unbiased variance, as torch's BN does); backward as
    renorm_backward. Differentiable once: create_graph=True through it raises."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, r_max, d_max):
        y, mean, var, invstd, r, d = renorm_forward(x, weight, bias, running_mean, running_var,
                                                    eps, r_max, d_max)
        update_running_stats(running_mean, running_var, mean, var,
                             values_per_channel(x.shape), momentum)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, invstd, r, d)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dweight, dbias = renorm_backward(dy, x, weight, mean, invstd, r, d, need)
        return (None if dx is None else dx.to(x.dtype),
                dweight.to(weight.dtype) if weight is not None and need[1] else None,
                dbias.to(ctx.bias_dtype) if need[2] else None,
                None, None, None, None, None, None)
