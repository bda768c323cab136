"""Batch Normalization in torch, on any device, with the derived compact backward.

`batch_norm` has the signature and semantics of `torch.nn.functional.batch_norm`. In training
it runs `BatchNormFunction`, a `torch.autograd.Function` whose backward is the closed form
derived in the book (two per-channel reductions, then one elementwise pass), not autograd
through the forward. It saves only x and the per-channel mean and inverse std, as the native
kernel does. float16/bfloat16 inputs have their statistics accumulated in float32.
This module holds the formula (batch_stats, compact_backward) and the autograd Function; which
backend runs a call (compiled CPU, Triton, composed ATen, or this formula) is bnlib.kernels'.
"""
import torch
import torch.autograd.forward_ad as _forward_ad

from bnlib import kernels
from bnlib.checks import check_args, per_channel, reduce_axes, values_per_channel


def _as(t, dtype):
    """t in dtype; t itself when it already is (a no-op .to still costs a dispatch, a few
    microseconds, which matters to the smallest inputs: see the Performance chapter)."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(dtype):
    """Statistics and per-channel coefficients: float32 for half types, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batch_stats(x):
    """Per-channel mean and biased variance of x, in the compute dtype (float32 for half types).

    Two-pass (mean first, then the mean of squared deviations, via torch.var_mean), so a large
    common offset does not cancel the way E[x^2] - E[x]^2 does.
    """
    xc = x.to(compute_dtype(x.dtype))
    var, mean = torch.var_mean(xc, dim=reduce_axes(x.ndim), correction=0)
    return mean, var


def compact_backward(dy, x, weight, mean, invstd, needs_input_grad=(True, True, True)):
    """The derived closed form: dl/dbeta = sum(dy), dl/dgamma = sum(dy x_hat) and, per channel,
    dx = a dy + b x_hat + c with a = gamma invstd, b = -a sum(dy x_hat) / m, c = -a sum(dy) / m:
    two per-channel reductions and one elementwise pass. Returns (dx, dgamma, dbeta) in the
    compute dtype (dx None unless needs_input_grad[0]).
    Book: book/derivations/backward.ipynb
    """
    nd, dims, m = x.ndim, reduce_axes(x.ndim), values_per_channel(x.shape)
    cdt = mean.dtype
    dyc = dy.to(cdt)
    sum_dy = dyc.sum(dims)
    x_hat = (x.to(cdt) - per_channel(mean, nd)) * per_channel(invstd, nd)
    sum_dy_xhat = (dyc * x_hat).sum(dims)
    dx = None
    if needs_input_grad[0]:
        a = invstd if weight is None else invstd * weight.to(cdt)
        b = -a * sum_dy_xhat / m
        c = -a * sum_dy / m
        dx = torch.addcmul(per_channel(c, nd), x_hat, per_channel(b, nd))
        dx = torch.addcmul(dx, dyc, per_channel(a, nd))
    return dx, sum_dy_xhat, sum_dy


def formula_forward(x, weight, bias, eps):
    """Algorithm 1 in the compute dtype: (y, mean, biased var, invstd), y in x's dtype."""
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    nd = x.ndim
    y = torch.addcmul(per_channel(shift, nd), x, per_channel(scale, nd)).to(x.dtype)
    return y, mean, var, invstd


def path_for(x, weight=None, bias=None, running_mean=None, running_var=None):
    """Which backend a training-mode call on these tensors runs on: 'cpu', 'triton', 'composed'
    or 'formula' (see bnlib.kernels)."""
    return kernels.select(x, weight, bias, running_mean, running_var)


def _compiling():
    return False


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or _compiling
# True for a tensor wrapped by a torch.func transform (vmap's batched, grad's tracking tensors).
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


_transforms_active = torch._C._are_functorch_transforms_active


def transformed(x):
    """True under a torch.func transform (x is wrapped) or while torch.compile traces: there only
    the formula runs, since the compiled backends have no batching rule or fake implementation."""
    return _is_compiling() or _is_wrapped(x)


def layout_like_torch(y, x):
    """y laid out as torch lays out its output for x: channels-last where x is, else contiguous
    (a transposed or sliced x gives a contiguous y, so y.view(-1) works as it does on torch's)."""
    if y.is_contiguous():
        return y
    for fmt, nd in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.ndim == nd and x.is_contiguous(memory_format=fmt):
            return y.contiguous(memory_format=fmt)
    return y.contiguous()


def _jvp_formula(x, weight, mean, invstd, dx, dweight, dbias):
    """Forward mode, the book's Jacobian applied to a tangent: per channel
    dy = gamma invstd (dx - mean(dx) - x_hat mean(dx x_hat)) + dgamma x_hat + dbeta
    (from d x_hat = invstd (dx - d mu) + (x - mu) d invstd, d mu = mean(dx) and
    d invstd = -invstd^3 mean((x - mu) dx)). Tangents may be None (zero)."""
    nd, dims, cdt = x.ndim, reduce_axes(x.ndim), mean.dtype
    x_hat = (x.to(cdt) - per_channel(mean, nd)) * per_channel(invstd, nd)
    dy = torch.zeros_like(x_hat)
    if dx is not None:
        dxc = dx.to(cdt)
        centred = dxc - dxc.mean(dims, keepdim=True) - x_hat * (dxc * x_hat).mean(dims, keepdim=True)
        a = invstd if weight is None else invstd * weight.to(cdt)
        dy = dy + centred * per_channel(a, nd)
    if dweight is not None:
        dy = dy + x_hat * per_channel(dweight.to(cdt), nd)
    if dbias is not None:
        dy = dy + per_channel(dbias.to(cdt), nd)
    return dy.to(x.dtype)


def _save(ctx, x, weight, bias, eps, backend, saved):
    """What backward and jvp read: the backend's name, eps, bias dtype and tensors (both styles)."""
    ctx.backend, ctx.eps = backend, eps
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, *saved)
    ctx.save_for_forward(x, weight, *saved[:2])


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: forward normalizes with batch statistics; backward is the compact form.

    bnlib.kernels picks the backend (its name is kept as grad_fn.backend); where none takes the
    tensors, or under torch.func transforms, the formula above runs in the compute dtype
    (torch.compile's dynamo does not trace a Function with a custom jvp: it breaks the graph at
    the call, which then runs eagerly as outside it). Only x, the weight and the per-channel mean and inverse std are saved (on the
    Triton backend also the mean's float32 rounding error); the running statistics, if given,
    are updated in place. apply returns (y, mean, invstd, extra, backend); all but y are
    non-differentiable.
    Double backward: under create_graph=True the backward recomputes the batch statistics from x
    with autograd on, so the compact form can itself be differentiated. Forward mode: `jvp`
    (_jvp_formula). torch.func.vmap: a generated rule (every op of the formula path has one).
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1):
        if transformed(x):
            y, mean, var, invstd = formula_forward(x, weight, bias, eps)
            kernels.composed.update_running_stats(running_mean, running_var, mean, var,
                                         values_per_channel(x.shape), momentum)
            name, saved = "formula", (mean, invstd)
        else:
            name, y, saved = kernels.forward(x, weight, bias, running_mean, running_var,
                                             momentum, eps, formula_forward)
            y = layout_like_torch(y, x)
        extra = saved[2] if len(saved) > 2 else None
        return y, saved[0], saved[1], extra, name

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs[:4]
        _, mean, invstd, extra, backend = output
        saved = (mean, invstd) if extra is None else (mean, invstd, extra)
        ctx.mark_non_differentiable(*saved)
        _save(ctx, x, weight, bias, eps, backend, saved)

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled() or transformed(dy):  # create_graph=True, or torch.func
            mean, var = batch_stats(x)
            invstd = torch.rsqrt(var + ctx.eps)
            dx, dweight, dbias = compact_backward(dy, x, weight, mean, invstd, need)
        else:
            try:
                dx, dweight, dbias = kernels.backward(
                    ctx.backend, dy, x, weight, saved, need[0],
                    lambda *args: compact_backward(*args, needs_input_grad=need))
            except RuntimeError as err:
                # torch's legacy vmap (gradcheck's batched-gradient check) wraps dy in a way no
                # public call detects, and refuses the backends' in-place steps on it; the
                # formula has none (and backward changes nothing before it fails).
                if "vmap" not in str(err):
                    raise
                dx, dweight, dbias = compact_backward(dy, x, weight, saved[0], saved[1], need)
        return (None if dx is None else _as(dx, x.dtype),
                _as(dweight, weight.dtype) if weight is not None and need[1] else None,
                _as(dbias, ctx.bias_dtype) if need[2] else None,
                None, None, None, None)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight, mean, invstd = ctx.saved_tensors[:4]
        return _jvp_formula(x, weight, mean, invstd, dx, dweight, dbias), None, None, None, None


class _EagerBatchNormFunction(torch.autograd.Function):
    """BatchNormFunction in the classic style (forward takes ctx, returns y alone), for calls
    outside torch.func and torch.compile: a setup_context Function costs tens of microseconds
    more per call (torch binds its arguments by signature and handles four more outputs), as long
    as the compiled kernel takes at 100 x 500. Same forward, backward and jvp."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1):
        backend, y, saved = kernels.forward(x, weight, bias, running_mean, running_var,
                                            momentum, eps, formula_forward)
        _save(ctx, x, weight, bias, eps, backend, saved)
        return layout_like_torch(y, x)

    backward = staticmethod(BatchNormFunction.backward)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        return BatchNormFunction.jvp(ctx, dx, dweight, dbias)[0]   # y is the only output here


def _apply(*args):
    """y of BatchNormFunction.apply(*args). Under a torch.func transform, a torch.compile trace
    or with a (dead) functorch wrapper among the differentiable inputs: the setup_context
    Function those need. Otherwise, without forward-mode AD, the compiled CPU backend's own call
    (its autograd node is C++: tens of microseconds less per call) where it takes the tensors,
    else the classic-style Function."""
    if (_is_compiling() or _transforms_active()
            or any(t is not None and _is_wrapped(t) for t in args[:3])):
        return BatchNormFunction.apply(*args)[0]
    if _forward_ad._current_level < 0:  # no forward-mode AD level open
        x, weight, bias, eps, running_mean, running_var, momentum = args
        y = kernels.train(x, weight, bias, running_mean, running_var, momentum, eps)
        if y is not None:
            return y
    return _EagerBatchNormFunction.apply(*args)


def backend_of(y):
    """The backend ('cpu', 'triton', 'composed' or 'formula') of the training-mode call whose
    output is y, read from its autograd node; None if y has none from bnlib."""
    node = y.grad_fn
    if node is None:
        return None
    return getattr(node, "backend", "cpu" if "CpuBatchNorm" in node.name() else None)


def _empty_output(x, weight, bias):
    """torch's answer for an input with no values: an empty output, running statistics untouched.
    It stays connected to x, weight and bias, so their gradients are (empty or) zero."""
    shaped = (lambda t: t) if x.ndim == 1 else (lambda t: per_channel(t, x.ndim))
    y = x.clone()
    if weight is not None:
        y = y * shaped(weight)
    if bias is not None:
        y = y + shaped(bias)
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Drop-in for torch.nn.functional.batch_norm (same arguments, defaults and semantics).

    training=True: normalize with the batch's mean and biased variance; if running stats are
    given, update them in place: r <- (1 - momentum) r + momentum * batch_stat, with the
    unbiased (m/(m-1)) batch variance. training=False: Algorithm 2 with the running stats.
    An input with no values gives an empty output and leaves the running statistics as they are.
    Book: book/derivations/transform.ipynb
    """
    momentum, eps = check_args(input, running_mean, running_var, weight, bias, training,
                               momentum, eps)
    if weight is not None and weight.ndim != 1:
        weight = weight.reshape(-1)
    if bias is not None and bias.ndim != 1:
        bias = bias.reshape(-1)
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    nd = input.ndim
    if not training:
        cdt = compute_dtype(input.dtype)
        scale = torch.rsqrt(running_var.to(cdt) + eps)
        if weight is not None:
            scale = scale * weight.to(cdt)
        shift = -running_mean.to(cdt) * scale
        if bias is not None:
            shift = shift + bias.to(cdt)
        y = torch.addcmul(per_channel(shift, nd), input, per_channel(scale, nd)).to(input.dtype)
        return layout_like_torch(y, input)
    return _apply(input, weight, bias, eps, running_mean, running_var, momentum)
