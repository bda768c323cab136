"""SyncBatchNorm: one BN layer whose batch is split over processes (torch.distributed, any backend).

Each rank holds a shard of the batch. In training the layer normalizes with the statistics of
the whole batch, and what crosses the network is what the book derives:

- forward: per rank a header (channels, dtype, count, input ok: four int64) and, per channel,
  the shard's mean and M2 (sum of squared deviations) in float64, merged with Chan et al.'s
  formula, so no E[x^2] - E[x]^2 cancellation; one all-gather of 4 int64 and one of 2C float64
  per rank (the count is the same for every channel, so "three numbers per channel" is 2C + 1);
- backward: the two per-channel sums of the compact form, sum dy and sum dy x_hat, in one
  all-reduce of 2C values; then each rank's dx = a dy + b x_hat + c with the global sums and
  the global count. dgamma and dbeta stay per rank (DDP sums them with every other gradient).

The header gather is the check that ranks agree on channels and dtype: without it a mismatch
makes gloo abort the receiving process (SIGABRT, "Received data size doesn't match expected
size"), with it every rank raises the same clear error. Eval sends nothing; without an
initialised process group, or in a group of one, the layer is plain bnlib BN.
Book: book/experiments/sync_bn.ipynb
"""
import inspect

import torch
import torch.distributed as dist
from torch import nn

from bnlib import functional
from bnlib.checks import (check_num_features, count_batch, per_channel, reduce_axes,
                          values_per_channel)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HAS_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


def exchange_header(x, group, world_size, local_error=None):
    """All-gather (channels, dtype, count, input ok) from every rank: a (world, 4) int64 tensor.
    Every rank raises when any rank's input failed its local check (local_error, re-raised on
    that rank) or when channels or dtypes differ, so no rank is left waiting in a collective and
    the stats gather that follows never sees mismatched sizes. Costs one all-gather of 32 bytes
    per rank."""
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    mine = torch.tensor([x.shape[1], code, values_per_channel(x.shape), local_error is None],
                        dtype=torch.int64, device=x.device)
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu()
    if local_error is not None:
        raise local_error
    failed = [r for r, ok in enumerate(table[:, 3].tolist()) if not ok]
    if failed:
        raise ValueError(f"the input of rank(s) {failed} of the process group failed its check "
                         "(their error says why); this rank stops too rather than wait for them")
    channels, codes = table[:, 0].tolist(), table[:, 1].tolist()
    if len(set(channels)) > 1:
        raise ValueError(f"input has {x.shape[1]} channels on this rank but the ranks of the "
                         f"process group have {channels} (rank order): every rank's input must "
                         "have the same number of channels on axis 1")
    if len(set(codes)) > 1:
        names = [str(_DTYPES[c]) if c < len(_DTYPES) else "other" for c in codes]
        raise TypeError(f"input is {x.dtype} on this rank but the ranks of the process group "
                        f"have {names} (rank order): every rank's input must have one dtype")
    return table


def merge_stats(counts, means, m2s):
    """Chan et al.'s merge of per-rank (count, mean, M2) into the whole batch's (n, mean, M2).

    counts (R,), means and m2s (R, C). mean = sum_r n_r mean_r / n and
    M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2: every term is non-negative, so nothing cancels.
    Ranks with n_r = 0 contribute nothing.
    Book: book/experiments/sync_bn.ipynb
    """
    n = counts.sum()
    w = counts.to(means.dtype)[:, None]
    mean = (w * means).sum(0) / n
    m2 = m2s.sum(0) + (w * (means - mean) ** 2).sum(0)
    return n, mean, m2


def global_stats(x, counts, group, world_size):
    """This rank's shard statistics sent, the whole batch's returned: (mean, M2) per channel in
    float64, from one all-gather of 2C float64 values per rank (empty shards send zeros).

    The shard's mean is computed in the compute dtype and corrected by the mean of x - mean
    (small numbers, so accurate), then sent in float64: a float32 mean of values near 1e4 is off
    by up to half an ulp, 5e-4, which the merge would carry into every y."""
    c = x.shape[1]
    if x.numel() > 0:
        xc = x.to(functional.compute_dtype(x.dtype))
        dims = reduce_axes(x.ndim)
        var, mean = torch.var_mean(xc, dim=dims, correction=0)
        fix = (xc - per_channel(mean, x.ndim)).mean(dims)
        mean = mean.double() + fix.double()
        mine = torch.cat([mean, var.double() * values_per_channel(x.shape)])
    else:
        mine = torch.zeros(2 * c, dtype=torch.float64, device=x.device)
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine, group=group)
    stats = torch.stack(parts)
    _, mean, m2 = merge_stats(counts.to(x.device), stats[:, :c], stats[:, c:])
    return mean, m2


def split_mean(mean, dtype):
    """mean (float64) as hi + lo in dtype, so x - hi - lo keeps the digits a float32 hi drops."""
    return mean.to(dtype), (mean - mean.to(dtype).double()).to(dtype)


def centred(x, hi, lo):
    """x - mean per channel in hi's dtype, the mean given as hi + lo (see split_mean)."""
    nd = x.ndim
    return x.to(hi.dtype) - per_channel(hi, nd) - per_channel(lo, nd)


def sync_backward(dy, x, weight, hi, lo, invstd, m, group, need_dx):
    """The compact backward with global sums: (dx or None, dgamma, dbeta) on this rank.

    dgamma = sum dy x_hat and dbeta = sum dy over this shard; dx = a dy + b x_hat + c with
    a = gamma invstd, b = -a (sum over all ranks of dy x_hat) / m, c = -a (sum over all of dy) / m,
    m the global count: one all-reduce of the 2C local sums. The mean is hi + lo (split_mean).
    Book: book/experiments/sync_bn.ipynb
    """
    cdt, nd, c = hi.dtype, x.ndim, x.shape[1]
    if x.numel() > 0:
        dims = reduce_axes(nd)
        dyc = dy.to(cdt)
        x_hat = centred(x, hi, lo) * per_channel(invstd, nd)
        local = torch.cat([dyc.sum(dims), (dyc * x_hat).sum(dims)])
    else:
        local = torch.zeros(2 * c, dtype=cdt, device=x.device)
    dbeta, dgamma = local[:c].clone(), local[c:].clone()
    if not need_dx:
        return None, dgamma, dbeta
    dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    if x.numel() == 0:
        return torch.zeros_like(x), dgamma, dbeta
    a = invstd if weight is None else invstd * weight.to(cdt)
    b = -a * local[c:] / m
    cc = -a * local[:c] / m
    dx = torch.addcmul(per_channel(cc, nd), x_hat, per_channel(b, nd))
    return torch.addcmul(dx, dyc, per_channel(a, nd)), dgamma, dbeta


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN over the whole process group; backward is sync_backward (derived, not
    autograd through the collectives). apply(x, weight, bias, eps, running_mean, running_var,
    momentum, group, world_size, table) -> y, table being exchange_header's result."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running_mean, running_var, momentum, group,
                world_size, table):
        counts = table[:, 2]
        n = int(counts.sum())
        mean, m2 = global_stats(x, counts, group, world_size)
        cdt = functional.compute_dtype(x.dtype)
        invstd = torch.rsqrt(m2 / n + eps).to(cdt)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = (m2 / (n - 1)).to(running_var.dtype)
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        hi, lo = split_mean(mean, cdt)
        ctx.save_for_backward(x, weight, hi, lo, invstd)
        ctx.group, ctx.m = group, n
        ctx.bias_dtype = None if bias is None else bias.dtype
        if x.numel() == 0:
            return torch.empty_like(x)
        # (x - mean) first: folding it into one shift, -mean * scale, would cancel at a large
        # offset (at 1e4 in float32, an error of ulp(1e4) = 1e-3 in y).
        nd = x.ndim
        scale = invstd if weight is None else invstd * weight.to(cdt)
        y = centred(x, hi, lo) * per_channel(scale, nd)
        if bias is not None:
            y = y + per_channel(bias.to(cdt), nd)
        return functional.layout_like_torch(y.to(x.dtype), x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, hi, lo, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dgamma, dbeta = sync_backward(dy, x, weight, hi, lo, invstd, ctx.m, ctx.group,
                                          need[0])
        return (None if dx is None else dx.to(x.dtype),
                dgamma.to(weight.dtype) if weight is not None and need[1] else None,
                dbeta.to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None,
                None, None, None, None, None, None, None)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm (same arguments, defaults, state_dict keys and
    fallbacks) that runs on every torch.distributed backend, gloo on CPU included.

    Input (N, C, *); shards may differ in size and may be empty. Training in a process group of
    two or more: whole-batch statistics (see the module docstring); the running statistics take
    the unbiased variance with the global count, and are the same on every rank. Eval, no
    initialised group, or a group of one: plain bnlib BN, nothing sent.
    It is a torch BN layer (a _BatchNorm) but not a torch.nn.SyncBatchNorm: DDP refuses those
    on CPU ("SyncBatchNorm layers only work with GPU modules"), whatever their forward.
    Book: book/experiments/sync_bn.ipynb
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True):
        check_num_features(num_features)
        kw = {"bias": bias} if _HAS_BIAS else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kw)
        if not bias and not _HAS_BIAS and affine:  # torch < 2.6 has no bias argument
            self.register_parameter("bias", None)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _group(self):
        """(group, world size) when this forward must synchronize, else None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None  # eval sends nothing
        group = self.process_group or dist.group.WORLD
        world = dist.get_world_size(group)
        return (group, world) if world > 1 else None

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        synced = self._group()
        if synced is None:  # plain BN, as torch falls back to F.batch_norm
            return self._plain(input)
        group, world = synced
        update = self.track_running_stats
        try:  # the local checks; the shard's batch size is checked over the group, below
            functional.check_args(input.narrow(0, 0, 0), self.running_mean if update else None,
                                  self.running_var if update else None, self.weight, self.bias,
                                  True, 0.0, self.eps)
            error = None
        except (TypeError, ValueError) as err:
            error = err
        table = exchange_header(input, group, world, error)
        total = int(table[:, 2].sum())
        if total == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {total} over the {world} ranks of the process group")
        momentum = 0.0 if self.momentum is None else self.momentum
        if update:
            momentum = count_batch(self)
        if total == 0:  # every shard empty: an empty output, statistics untouched
            return input.clone()
        return SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.running_mean if update else None,
            self.running_var if update else None, momentum, group, world, table)

    def _plain(self, input):
        use_batch = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if update:
            functional.check_args(input, self.running_mean, self.running_var, self.weight,
                                  self.bias, True, momentum, self.eps)
            momentum = count_batch(self)
        keep = not self.training or update
        return functional.batch_norm(input, self.running_mean if keep else None,
                                     self.running_var if keep else None, self.weight, self.bias,
                                     use_batch, momentum, self.eps)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every BN layer in module (torch.nn's BatchNorm*d and SyncBatchNorm, bnlib.nn's) as a
        bnlib SyncBatchNorm sharing its parameters, running statistics and training flag; a BN
        layer itself is returned converted. As torch's convert_sync_batchnorm."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            kw = {"bias": module.bias is not None} if _HAS_BIAS else {}
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, **kw)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
