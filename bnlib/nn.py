"""BatchNorm1d and BatchNorm2d modules: drop-ins for torch.nn's, backed by bnlib.functional.

Same constructor arguments and defaults (torch 2.13's keyword-only bias=True included), same
parameters and buffers (weight, bias, running_mean, running_var, num_batches_tracked), so
state_dicts load both ways.
momentum=None makes the running statistics a cumulative average over the batches seen.
Book: book/derivations/transform.ipynb
"""
import torch
from torch import nn

from bnlib import functional
from bnlib.checks import check_eps, check_momentum


class _BatchNorm(nn.Module):
    _version = 2  # torch's _BatchNorm state_dict version: num_batches_tracked is present
    _expected_dims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        check_eps(eps)
        check_momentum(momentum, allow_none=True)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input):
        if input.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"input must be {dims} for {type(self).__name__}, "
                             f"got {input.dim()}D (shape {tuple(input.shape)})")

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
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: weight 1/n for the n-th batch
                momentum = 1.0 / float(self.num_batches_tracked)
        return functional.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                     use_batch_stats, momentum, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # State dicts saved before num_batches_tracked existed (torch < 0.4.1) lack it.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self):
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__))


class BatchNorm1d(_BatchNorm):
    """Over (N, C) or (N, C, L) input; statistics per channel over N (and L)."""
    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Over (N, C, H, W) input; statistics per channel over N, H and W (m' = N H W)."""
    _expected_dims = (4,)
