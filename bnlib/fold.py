"""Folding one BN layer into the Linear/Conv before it: the algebra and its checks (fold_into).

In eval a BN layer is the per-channel affine map of the paper's Algorithm 2,
y = gamma (z - mu) / sqrt(var + eps) + beta = s z + (beta - s mu), with s = gamma / sqrt(var + eps).
When z = W x + b comes from a Linear or a convolution, s multiplies output channel c's slice of
the weight and the bias becomes s (b - mu) + beta: one layer computes both.
Book: book/derivations/deployment.ipynb
"""
import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.parameter import is_lazy

# The layers a BN can be folded into, and the number of dimensions of their (batched) output.
OUTPUT_DIMS = {nn.Linear: 2, nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}
STAT_NAMES = ("running_mean", "running_var", "weight", "bias")


def folded_weights(weight, bias, running_mean, running_var, eps, gamma=None, beta=None):
    """(W', b') with W' x + b' = gamma (W x + b - mu) / sqrt(var + eps) + beta per output channel.

    weight has the output channels on axis 0 (Linear (C, in), Conv (C, in / groups, *kernel)); bias,
    gamma or beta None mean 0, 1 and 0. Computed in the dtype given (fold_into passes float64).
    Book: book/derivations/deployment.ipynb
    """
    c = weight.shape[0]
    bias = torch.zeros_like(running_mean) if bias is None else bias
    gamma = torch.ones_like(running_mean) if gamma is None else gamma
    beta = torch.zeros_like(running_mean) if beta is None else beta
    scale = gamma / torch.sqrt(running_var + eps)                  # s_c = gamma_c / sigma_c
    new_weight = weight * scale.reshape((c,) + (1,) * (weight.dim() - 1))
    new_bias = scale * (bias - running_mean) + beta
    return new_weight, new_bias


def bn_stats(bn):
    """BN's (running_mean, running_var, gamma, beta, eps), gamma and beta None where absent.

    Any module with BN's attribute names works (torch's and bnlib's BN classes, bnlib's and
    torchvision's FrozenBatchNorm2d). Refuses what has no statistics to fold or is still training.
    """
    if not all(hasattr(bn, name) for name in STAT_NAMES + ("eps",)):
        raise TypeError(f"bn must be a batch-norm layer (attributes {', '.join(STAT_NAMES)}, "
                        f"eps), got {type(bn).__name__}")
    if any(is_lazy(getattr(bn, n)) for n in STAT_NAMES if getattr(bn, n) is not None):
        raise ValueError(f"bn ({type(bn).__name__}) is not initialised yet: run one forward "
                         "pass so that its parameters and buffers get their shapes")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"bn ({type(bn).__name__}) has no running statistics "
                         "(track_running_stats=False): in eval it normalises with each batch's "
                         "statistics, which no fixed layer reproduces, so there is nothing to fold")
    # A frozen BN (not a _BatchNorm) computes the same affine map in train and eval alike.
    if isinstance(bn, _BatchNorm) and bn.training:
        raise ValueError(f"bn ({type(bn).__name__}) is in training mode: its output uses batch "
                         "statistics, which no fixed layer reproduces; call bn.eval() first")
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps)


def check_layer(layer):
    """The number of dimensions of layer's output; refuses layers BN cannot be folded into."""
    if isinstance(layer, _ConvTransposeNd):
        raise TypeError(f"layer must be a Linear or Conv1d/2d/3d, got {type(layer).__name__}: "
                        "transposed convolutions are not supported (their weight holds the output "
                        "channels on axis 1)")
    kinds = [k for k in OUTPUT_DIMS if isinstance(layer, k)]
    if not kinds:
        raise TypeError(f"layer must be a torch.nn.Linear, Conv1d, Conv2d or Conv3d, "
                        f"got {type(layer).__name__}")
    if is_lazy(layer.weight):
        raise ValueError(f"layer ({type(layer).__name__}) is not initialised yet: run one "
                         "forward pass so that its weight gets its shape")
    if nn.utils.parametrize.is_parametrized(layer):
        raise ValueError(f"layer ({type(layer).__name__}) has parametrizations (its weight is "
                         "computed at each call): remove them first "
                         "(torch.nn.utils.parametrize.remove_parametrizations)")
    if not layer.weight.is_floating_point():
        raise TypeError(f"layer.weight must be floating point, got {layer.weight.dtype}")
    return OUTPUT_DIMS[kinds[0]]


def check_pair(layer, bn, dims):
    """Refuse a BN that would not take the layer's output: channel count or dimensions."""
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    channels = bn.running_mean.numel()
    if out != channels:
        what = "out_features" if isinstance(layer, nn.Linear) else "out_channels"
        raise ValueError(f"channel mismatch: layer has {what}={out} but bn normalises "
                         f"{channels} channels (num_features={channels})")
    for name in STAT_NAMES:
        t = getattr(bn, name)
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"bn.{name} must have shape ({channels},), got {tuple(t.shape)}")
    # BN's own input check decides whether it takes the layer's output (e.g. BatchNorm2d refuses
    # a Conv1d's 3D output). A Linear's output must be 2D (N, C): only then is BN's channel
    # axis 1 the Linear's feature axis.
    probe = torch.empty((2, channels) + (1,) * (dims - 2), device="meta")
    check = getattr(bn, "_check_input_dim", None)
    try:
        if check is not None:
            check(probe)
        else:   # a frozen BN without the method: ask its forward, on a tiny input
            with torch.no_grad():
                bn(torch.zeros(probe.shape, dtype=bn.running_mean.dtype,
                               device=bn.running_mean.device))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"bn ({type(bn).__name__}) does not take the {dims}D output of "
                         f"{type(layer).__name__}: {err}") from err


def fold_into(layer, bn):
    """A new layer of layer's class and settings computing bn(layer(x)) with bn in eval mode.

    layer: torch.nn.Linear (2D output (N, C)), Conv1d, Conv2d or Conv3d (any stride, padding,
    padding_mode, dilation, groups; with or without bias). bn: any BN with running statistics in
    eval mode (torch.nn's and bnlib.nn's classes, affine or not, SyncBatchNorm, BatchRenorm) or a
    frozen BN (bnlib.nn.FrozenBatchNorm2d; train or eval alike). The new layer always has a bias;
    its parameters are new tensors on layer's device and dtype, layer and bn are left unchanged.
    Errors: bn in training mode (call bn.eval()), bn without running statistics, channel
    mismatch (naming both sizes), a BN that would not take the layer's output, transposed
    convolutions and other layers.
    Book: book/derivations/deployment.ipynb
    """
    dims = check_layer(layer)
    mean, var, gamma, beta, eps = bn_stats(bn)
    check_pair(layer, bn, dims)
    device, dtype = layer.weight.device, layer.weight.dtype
    bias_dtype = dtype if layer.bias is None else layer.bias.dtype

    # Fold in float64, round once at the end. The folded layer then differs from the exact fold
    # by one rounding of each weight and bias (relative 2^-24 in float32, 2^-8 in bfloat16);
    # folding in the layer's own dtype would add the roundings of var + eps, the square root,
    # gamma / sigma and b - mu (torch.nn.utils.fusion computes in the BN's dtype).
    def f64(t):
        return None if t is None else t.detach().to(device=device, dtype=torch.float64)

    with torch.no_grad():
        w, b = folded_weights(f64(layer.weight), f64(layer.bias), f64(mean), f64(var), eps,
                              f64(gamma), f64(beta))
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(w.to(dtype), requires_grad=layer.weight.requires_grad)
    new.bias = nn.Parameter(b.to(bias_dtype), requires_grad=layer.weight.requires_grad
                            if layer.bias is None else layer.bias.requires_grad)
    return new
