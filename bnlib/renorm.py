"""BatchRenorm1d and BatchRenorm2d: Batch Renormalization (Ioffe, 2017), and the paper's ramp of its limits.

In training the layer normalizes with the batch statistics corrected toward the running ones,
x_hat = (x - mu_B) / sigma_B * r + d, with r = clip(sigma_B / sigma, 1/r_max, r_max) and
d = clip((mu_B - mu) / sigma, -d_max, d_max), sigma_B = sqrt(var_B + eps) from the biased batch
variance and sigma = sqrt(running_var + eps), both r and d constants for the gradient (the
backward is bnlib.renorm_function's derived closed form, not autograd through the forward).
In eval it is BN's eval with the running statistics.

The running statistics are kept exactly as torch.nn.BatchNorm keeps them: running_mean and the
unbiased running_var, momentum the weight of the new batch (momentum=None: a cumulative
average), num_batches_tracked counted. (The paper averages sigma, not the variance; here the
variance is averaged so that the state is torch's.) The classes subclass
torch.nn.modules.batchnorm._BatchNorm, so parameters, buffers, reset methods and state_dict are
torch's: the state_dict loads into torch.nn.BatchNorm1d/2d (and back) and eval outputs agree.
r_max and d_max are plain attributes, not in the state_dict: after loading a checkpoint, set
them again (ramp_limits with the saved step).

isinstance(layer, _BatchNorm) holds, so torch's tools that look for BN layers by that test see
these layers as BN. Folding into the previous Linear/Conv for inference (torch.nn.utils.fusion,
bnlib's fold) is correct, since eval is BN's eval; tools that match exact types
(torch.fx.experimental.optimization.fuse, torch.ao fuse_modules) leave them alone.
torch.nn.SyncBatchNorm.convert_sync_batchnorm, however, replaces them with plain SyncBatchNorm
(training becomes plain BN): do not convert a model that has BatchRenorm layers.
Book: book/derivations/batch_renorm.ipynb
"""
import math

from torch.nn.modules.batchnorm import _BatchNorm

from bnlib import functional
from bnlib.checks import _real, check_args, check_input_dims, check_num_features, count_batch
from bnlib.renorm_function import BatchRenormFunction


def check_r_max(r_max):
    """r_max as a float >= 1 (r is clipped to [1/r_max, r_max]; inf: no clipping)."""
    value = _real(r_max, "r_max", "a float >= 1")
    if not value >= 1.0:  # also refuses NaN
        raise ValueError(f"r_max must be a float >= 1 (r is clipped to [1/r_max, r_max]), "
                         f"got {r_max!r}")
    return value


def check_d_max(d_max):
    """d_max as a float >= 0 (d is clipped to [-d_max, d_max]; inf: no clipping)."""
    value = _real(d_max, "d_max", "a float >= 0")
    if not value >= 0.0:
        raise ValueError(f"d_max must be a float >= 0 (d is clipped to [-d_max, d_max]), "
                         f"got {d_max!r}")
    return value


def _check_step(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (a training step), got {value!r}")


def ramp(step, warmup, full, r_max=3.0, d_max=5.0, d_full=None):
    """The limits (r_max_t, d_max_t) at training step `step`: 1 and 0 (plain BN) up to `warmup`,
    then linear up to r_max at step `full` and d_max at step `d_full` (default: `full`), constant
    after. Ioffe (2017) trains with BN alone for the first steps and then relaxes the limits
    gradually (on Inception: r_max = 1, d_max = 0 for 5000 steps, reaching r_max = 3 at 40k and
    d_max = 5 at 25k: ramp(step, 5000, 40000, d_full=25000)); the paper does not give the shape
    of the relaxation, this ramp is linear.
    Book: book/derivations/batch_renorm.ipynb
    """
    d_full = full if d_full is None else d_full
    for value, name in ((step, "step"), (warmup, "warmup"), (full, "full"), (d_full, "d_full")):
        _check_step(value, name)
    for value, name in ((full, "full"), (d_full, "d_full")):
        if value < warmup:
            raise ValueError(f"{name} must be >= warmup ({warmup}), got {value}")
    r_max, d_max = check_r_max(r_max), check_d_max(d_max)
    if not (math.isfinite(r_max) and math.isfinite(d_max)):
        raise ValueError(f"r_max and d_max must be finite to ramp toward, got {r_max}, {d_max}")

    def progress(end):
        if step >= end:
            return 1.0
        if step <= warmup:
            return 0.0
        return (step - warmup) / (end - warmup)

    return 1.0 + progress(full) * (r_max - 1.0), progress(d_full) * d_max


def ramp_limits(model, step, warmup, full, r_max=3.0, d_max=5.0, d_full=None):
    """Set every BatchRenorm layer of model (model itself included) to ramp(...)'s limits at
    `step`; returns (r_max_t, d_max_t). Call it once per training step, before the forward.
    Book: book/derivations/batch_renorm.ipynb
    """
    r_t, d_t = ramp(step, warmup, full, r_max, d_max, d_full)
    for module in model.modules():
        if isinstance(module, _BatchRenorm):
            module.set_limits(r_t, d_t)
    return r_t, d_t


class _BatchRenorm(_BatchNorm):
    """Batch Renorm over torch's _BatchNorm state; subclasses give the accepted input ranks."""
    _expected_dims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, r_max=3.0, d_max=5.0,
                 device=None, dtype=None):
        check_num_features(num_features)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.set_limits(r_max, d_max)

    @property
    def r_max(self):
        """r is clipped to [1/r_max, r_max]; settable at any time (a float >= 1)."""
        return self._r_max

    @r_max.setter
    def r_max(self, value):
        self._r_max = check_r_max(value)

    @property
    def d_max(self):
        """d is clipped to [-d_max, d_max]; settable at any time (a float >= 0)."""
        return self._d_max

    @d_max.setter
    def d_max(self, value):
        self._d_max = check_d_max(value)

    def set_limits(self, r_max, d_max):
        """Set both limits (checked first, so a bad pair changes neither)."""
        r_max, d_max = check_r_max(r_max), check_d_max(d_max)
        self._r_max, self._d_max = r_max, d_max

    def extra_repr(self):
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def _check_input_dim(self, input):
        check_input_dims(input, self._expected_dims, type(self).__name__)

    def forward(self, input):
        self._check_input_dim(input)
        if self.running_mean is None or self.running_var is None:
            raise ValueError(f"{type(self).__name__} needs running_mean and running_var (r and d "
                             "are taken against them); this layer has none")
        if not self.training:
            return functional.batch_norm(input, self.running_mean, self.running_var,
                                         self.weight, self.bias, False, 0.0, self.eps)
        # Validate first, so that a failing call changes nothing (not even the counter).
        _, eps = check_args(input, self.running_mean, self.running_var, self.weight, self.bias,
                            True, 0.0 if self.momentum is None else self.momentum, self.eps)
        momentum = float(count_batch(self))
        if input.numel() == 0:  # torch's answer: an empty output, running statistics untouched
            return functional.batch_norm(input, self.running_mean, self.running_var,
                                         self.weight, self.bias, True, momentum, eps)
        return BatchRenormFunction.apply(input, self.weight, self.bias, self.running_mean,
                                         self.running_var, eps, momentum, self.r_max, self.d_max)


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm over (N, C) or (N, C, L) input; statistics per channel over N (and L).
    Book: book/derivations/batch_renorm.ipynb
    """
    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm over (N, C, H, W) input; statistics per channel over N, H and W.
    Book: book/derivations/batch_renorm.ipynb
    """
    _expected_dims = (4,)


__all__ = ["BatchRenorm1d", "BatchRenorm2d", "ramp", "ramp_limits"]
