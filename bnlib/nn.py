"""BatchNorm1d, BatchNorm2d and BatchNorm3d: subclasses of torch.nn's, backed by bnlib.functional.

They are torch's classes (isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) holds, so
torch's tools that look for BN layers, SyncBatchNorm.convert_sync_batchnorm among them, see
them): same constructor arguments and defaults, parameters, buffers, repr and state_dict
loading, inherited. What bnlib replaces is forward: the training-mode normalization and its
backward are bnlib.functional's (the derived compact form).
momentum=None makes the running statistics a cumulative average over the batches seen.
LazyBatchNorm1d/2d/3d are torch's lazy classes in the same way: num_features is read from the
first input's axis 1, and that first call turns the layer into bnlib's BatchNorm1d/2d/3d.
FrozenBatchNorm2d and freeze (fixed statistics, for fine-tuning) live in bnlib/frozen.py.
Book: book/derivations/transform.ipynb
"""
import inspect

from torch import nn

from bnlib import functional
from bnlib.checks import check_input_dims, check_num_features, count_batch


class _BnlibForward:
    """bnlib's forward and input check, put before torch's BN class in the bases."""
    _expected_dims = ()

    def _check_input_dim(self, input):
        check_input_dims(input, self._expected_dims, type(self).__name__)

    def forward(self, input):
        self._check_input_dim(input)
        # Batch statistics in training, and in eval when no running statistics are kept.
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        running_mean = self.running_mean if (not self.training or update) else None
        running_var = self.running_var if (not self.training or update) else None
        momentum = 0.0 if self.momentum is None else self.momentum
        if update:
            # Validate first, so that a failing call changes nothing (not even the counter).
            functional.check_args(input, running_mean, running_var, self.weight, self.bias,
                                  use_batch_stats, momentum, self.eps)
            momentum = count_batch(self)
        return functional.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                     use_batch_stats, momentum, self.eps)


_TORCH_HAS_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters
_LAZY_HAS_BIAS = "bias" in inspect.signature(nn.LazyBatchNorm1d.__init__).parameters


class _BnlibBatchNorm(_BnlibForward):
    """torch's constructor, with num_features checked first (torch builds a layer of 0)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        check_num_features(num_features)
        kw = {"bias": bias} if _TORCH_HAS_BIAS else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kw)
        if not bias and not _TORCH_HAS_BIAS and affine:  # torch < 2.6 has no bias argument
            self.register_parameter("bias", None)


class BatchNorm1d(_BnlibBatchNorm, nn.BatchNorm1d):
    """Over (N, C) or (N, C, L) input; statistics per channel over N (and L)."""
    _expected_dims = (2, 3)


class BatchNorm2d(_BnlibBatchNorm, nn.BatchNorm2d):
    """Over (N, C, H, W) input; statistics per channel over N, H and W (m' = N H W)."""
    _expected_dims = (4,)


class BatchNorm3d(_BnlibBatchNorm, nn.BatchNorm3d):
    """Over (N, C, D, H, W) input; statistics per channel over N, D, H and W."""
    _expected_dims = (5,)


class _BnlibLazy(_BnlibForward):
    """torch's lazy constructor (no num_features); the first input is checked before the layer
    takes its channel count from it, so a wrong input leaves the layer lazy (torch materialises
    first, and for a 1D input or one with 0 channels fails with an IndexError from its own code)."""

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        kw = {"bias": bias} if _LAZY_HAS_BIAS else {}
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, **kw)
        self._drop_bias = not bias and not _LAZY_HAS_BIAS  # torch < 2.6: no bias argument

    def initialize_parameters(self, input):
        if self.has_uninitialized_params():
            self._check_input_dim(input)
            if input.shape[1] == 0:
                raise ValueError(f"input has 0 channels on axis 1 (shape {tuple(input.shape)}); "
                                 f"{type(self).__name__} takes num_features from it and needs "
                                 "at least 1")
        super().initialize_parameters(input)
        if self._drop_bias and self.affine and self.bias is not None:
            self.register_parameter("bias", None)


class LazyBatchNorm1d(_BnlibLazy, nn.LazyBatchNorm1d):
    """BatchNorm1d with num_features taken from the first input; then it is a BatchNorm1d."""
    _expected_dims = (2, 3)
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BnlibLazy, nn.LazyBatchNorm2d):
    """BatchNorm2d with num_features taken from the first input; then it is a BatchNorm2d."""
    _expected_dims = (4,)
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BnlibLazy, nn.LazyBatchNorm3d):
    """BatchNorm3d with num_features taken from the first input; then it is a BatchNorm3d."""
    _expected_dims = (5,)
    cls_to_become = BatchNorm3d


from bnlib.sync import SyncBatchNorm  # noqa: E402,F401  (torch.distributed across ranks: bnlib/sync.py)
from bnlib.frozen import FrozenBatchNorm2d, freeze  # noqa: E402,F401  (fixed statistics: bnlib/frozen.py)
from bnlib.renorm import BatchRenorm1d, BatchRenorm2d  # noqa: E402,F401  (Batch Renormalization: bnlib/renorm.py)
