"""A PyTorch BN layer (torch.nn or bnlib.nn BatchNorm1d/2d/3d) to Keras 3's BatchNormalization
or Flax's linen.BatchNorm, and back, with its hyper-parameters and its state.

What is carried over, and how (measured in bnlib.conventions):
  - momentum: torch's m is the weight of the new batch, Keras's and Flax's momentum the weight of
    the old value, so each gets 1 - m (computed in decimal, so that 0.1 -> 0.9 -> 0.1 exactly);
  - eps -> epsilon, the same value (Keras's default is 1e-3, torch's 1e-5: it is always passed);
  - weight, bias -> Keras gamma, beta / Flax params scale, bias; running_mean, running_var ->
    Keras moving_mean, moving_variance / Flax batch_stats mean, var; affine=False -> Keras
    center=scale=False / Flax use_bias=use_scale=False; torch's bias=False -> center/use_bias False;
  - the channel axis: torch's is 1. The converted layer takes the same arrays as the torch layer
    (axis=1, channels first) unless `axis` says otherwise: pass axis=-1 for a channels-last model
    (NHWC); the per-channel values are the same, only the data's layout differs;
  - Flax: use_running_average = not layer.training (Flax refuses it again at call time: for the
    other mode, module.clone(use_running_average=...)), and the two-pass variance
    (use_fast_variance=False), as torch computes it.
num_batches_tracked is not carried (it only matters for momentum=None); initializers,
regularizers and constraints of a Keras layer are not either: they are not BN conventions.

Keras 3.15's layer computes in float32 even when its dtype is float64 (its state stays float64).
The stored variances are carried as they are, so eval outputs agree (to float rounding). The
frameworks differ in what they store while training: torch the unbiased batch variance
(m/(m-1) times the biased one), Keras and Flax the biased one. Training continued after a
conversion therefore moves the stored variance towards the new framework's convention: this
affects training continuation, not eval of the converted state.

A layer whose convention cannot be carried over exactly raises ConventionError (a ValueError):
torch momentum=None (a cumulative average: Keras and Flax keep only an exponential one);
track_running_stats=False (eval then normalizes with the batch's own statistics: Keras has no
such mode, and Flax's use_running_average=False would still update batch_stats); a shift
without a scale (Keras center=True, scale=False; Flax use_bias=True, use_scale=False: torch's
affine layer always has a weight); Keras renorm=True (Batch Renormalization) or synchronized=True
and Flax axis_name (cross-device statistics): torch's plain BN layers do neither.
Book: book/experiments/variance_correction.ipynb
"""
from decimal import Decimal

import numpy as np
import torch

from bnlib.conventions import import_jax, import_keras, keras_numpy

_TORCH_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_NDIM = {torch.nn.BatchNorm1d: 2, torch.nn.BatchNorm2d: 4, torch.nn.BatchNorm3d: 5}


class ConventionError(ValueError):
    """A BN layer whose convention has no exact counterpart in the target framework."""


def complement(momentum):
    """1 - momentum, in decimal arithmetic: torch's weight of the new batch <-> the weight of the
    old value (Keras, Flax), so that a round trip returns the float it started from."""
    return float(Decimal(1) - Decimal(repr(float(momentum))))


def _check_torch(bn):
    if not isinstance(bn, _TORCH_BN):
        raise TypeError(f"bn must be a torch.nn (or bnlib.nn) BatchNorm1d, BatchNorm2d or "
                        f"BatchNorm3d, got {type(bn).__name__}")
    if bn.momentum is None:
        raise ConventionError("bn.momentum is None (a cumulative average of the batches): Keras "
                              "and Flax keep only an exponential average; set a float momentum")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ConventionError("bn.track_running_stats is False: torch then normalizes with the "
                              "batch's own statistics in eval too, which Keras and Flax do not "
                              "carry; expected a layer that tracks running statistics")


def _numpy(t):
    return None if t is None else t.detach().cpu().numpy().copy()


def _torch_class(bn_class):
    return next(c for c in _NDIM if issubclass(bn_class, c))


def _shape(ndim, axis, channels):
    shape = [None] * ndim
    shape[axis] = channels
    return tuple(shape)


def to_keras(bn, axis=1, ndim=None):
    """A built keras.layers.BatchNormalization holding bn's hyper-parameters and state.

    axis: the channel axis of the Keras layer's input (1: the torch layer's layout; -1: channels
    last). ndim: the input's rank the layer is built for (default 2 for BatchNorm1d, 4 for
    BatchNorm2d, 5 for BatchNorm3d; 3 for a BatchNorm1d over (N, C, L))."""
    _check_torch(bn)
    keras = import_keras()
    ndim = _NDIM[_torch_class(type(bn))] if ndim is None else int(ndim)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [-{ndim}, {ndim}) for ndim={ndim}, got {axis}")
    layer = keras.layers.BatchNormalization(
        axis=axis, momentum=complement(bn.momentum), epsilon=bn.eps, center=bn.bias is not None,
        scale=bn.weight is not None, dtype=str(bn.running_mean.dtype).removeprefix("torch."))
    layer.build(_shape(ndim, axis, bn.num_features))
    for var, t in ((layer.gamma, bn.weight), (layer.beta, bn.bias),
                   (layer.moving_mean, bn.running_mean), (layer.moving_variance, bn.running_var)):
        if t is not None:
            var.assign(_numpy(t))
    return layer


def _torch_layer(cls, channels, momentum, eps, weight, bias, dtype):
    """A torch BN layer of class cls with these hyper-parameters (weight, bias: present or not)."""
    if weight is None and bias is not None:
        raise ConventionError("a shift without a scale (center/use_bias without scale/use_scale): "
                              "torch's affine BN layer always has a weight; expected both or none")
    kw = {} if weight is None or bias is not None else {"bias": False}
    bn = cls(channels, eps=eps, momentum=momentum, affine=weight is not None, dtype=dtype, **kw)
    if weight is not None and bias is None and bn.bias is not None:
        raise ConventionError(f"{cls.__name__} has no bias=False here (torch < 2.6): a scale "
                              "without a shift cannot be carried over")
    return bn


def _load(bn, weight, bias, mean, var):
    with torch.no_grad():
        for t, v in ((bn.weight, weight), (bn.bias, bias), (bn.running_mean, mean),
                     (bn.running_var, var)):
            if t is not None:
                t.copy_(torch.from_numpy(np.array(v)))
    return bn


def from_keras(layer, cls=None):
    """A torch BN layer (class cls, default torch.nn.BatchNorm1d/2d/3d by the rank the Keras layer
    was built for) holding a built Keras BatchNormalization's hyper-parameters and state. Its
    channel axis is 1: data of a channels-last Keras model must be moved to channels first."""
    keras = import_keras()
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise TypeError(f"layer must be a keras.layers.BatchNormalization, got {type(layer).__name__}")
    if not layer.built:
        raise ValueError("layer must be built (called once, or layer.build(input_shape)) so that "
                         "it has its weights")
    for flag in ("renorm", "synchronized"):
        if getattr(layer, flag, False):
            raise ConventionError(f"layer.{flag} is True: torch's BN layers have no counterpart; "
                                  f"expected {flag}=False")
    ndim = layer.input_spec.ndim if layer.input_spec is not None else 2
    cls = cls or {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                  5: torch.nn.BatchNorm3d}.get(ndim)
    if cls is None or not issubclass(cls, _TORCH_BN):
        raise TypeError(f"cls must be a torch.nn (or bnlib.nn) BatchNorm1d/2d/3d class, got {cls}"
                        f" (Keras layer built for {ndim}-D input)")
    get = keras_numpy
    weight = get(layer.gamma) if layer.scale else None
    bias = get(layer.beta) if layer.center else None
    mean, var = get(layer.moving_mean), get(layer.moving_variance)
    bn = _torch_layer(cls, mean.shape[0], complement(layer.momentum), layer.epsilon, weight, bias,
                      getattr(torch, str(mean.dtype)))
    return _load(bn, weight, bias, mean, var).eval()


def to_flax(bn, axis=1):
    """(module, variables): a flax.linen.BatchNorm with bn's hyper-parameters, and its variables
    {"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}} holding bn's state ("params"
    only where bn is affine). axis as in to_keras. A float64 layer needs JAX's x64 mode."""
    _check_torch(bn)
    jax = import_jax()
    from flax import linen
    dtype = str(bn.running_mean.dtype).removeprefix("torch.")
    if dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError("bn is float64 but JAX runs without x64 (its arrays would be float32): "
                         "jax.config.update('jax_enable_x64', True) first, or convert bn.float()")
    module = linen.BatchNorm(use_running_average=not bn.training, axis=axis,
                             momentum=complement(bn.momentum), epsilon=bn.eps,
                             use_bias=bn.bias is not None, use_scale=bn.weight is not None,
                             dtype=dtype, param_dtype=dtype, use_fast_variance=False)
    params = {k: jax.numpy.asarray(_numpy(t)) for k, t in (("scale", bn.weight), ("bias", bn.bias))
              if t is not None}
    stats = {"mean": jax.numpy.asarray(_numpy(bn.running_mean)),
             "var": jax.numpy.asarray(_numpy(bn.running_var))}
    return module, ({"params": params} if params else {}) | {"batch_stats": stats}


def from_flax(module, variables, cls=torch.nn.BatchNorm1d):
    """A torch BN layer of class cls (channel axis 1) holding a flax.linen.BatchNorm's
    hyper-parameters and its variables; in training mode where use_running_average is False."""
    import_jax()
    from flax import linen
    if not isinstance(module, linen.BatchNorm):
        raise TypeError(f"module must be a flax.linen.BatchNorm, got {type(module).__name__}")
    if module.axis_name is not None:
        raise ConventionError(f"module.axis_name is {module.axis_name!r} (statistics across "
                              "devices): torch's plain BN layers have none; expected None")
    if not issubclass(cls, _TORCH_BN):
        raise TypeError(f"cls must be a torch.nn (or bnlib.nn) BatchNorm1d/2d/3d class, got {cls}")
    params, stats = variables.get("params", {}), variables["batch_stats"]
    weight = np.asarray(params["scale"]) if module.use_scale else None
    bias = np.asarray(params["bias"]) if module.use_bias else None
    mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
    bn = _torch_layer(cls, mean.shape[0], complement(module.momentum), module.epsilon, weight,
                      bias, getattr(torch, str(mean.dtype)))
    return _load(bn, weight, bias, mean, var).train(module.use_running_average is False)
