"""Metrics shared by the experiments: what each chapter measures, as small tested functions.

Percentiles and drift (covariate_shift), gradient change (noisy_bn), steps to a target,
statistics mismatch and output gaps (inference_stats), growth per layer and power-law slopes
(gradients).
"""
import numpy as np
import torch


def percentiles(x, qs=(15, 50, 85), dim=0):
    """The qs-th percentiles of x along dim (linear interpolation, as numpy.percentile)."""
    qs = torch.as_tensor(qs, dtype=x.dtype, device=x.device)
    if qs.numel() == 0 or (qs < 0).any() or (qs > 100).any():
        raise ValueError(f"qs must be percentages in [0, 100], got {qs.tolist()}")
    return torch.quantile(x, qs / 100, dim=dim)


def relative_drift(pct, start_fraction=0.1):
    """How far each unit's median input moves, in units of its own spread, once the first
    start_fraction of training is over: (max - min of the 50th percentile) divided by the mean
    85th-15th percentile width. pct: (records, 3, units) -> (units,)."""
    late = pct[int(start_fraction * len(pct)):]
    median = late[:, 1]
    return (median.max(0).values - median.min(0).values) / band_width(pct, start_fraction)


def band_width(pct, start_fraction=0.1):
    """Each unit's mean 85th-15th percentile width once the first start_fraction of training
    is over (the same records relative_drift divides by). pct: (records, 3, units) -> (units,)."""
    late = pct[int(start_fraction * len(pct)):]
    return (late[:, 2] - late[:, 0]).mean(0)


def gradient_change(g0, g1):
    """(l2 distance, cosine) between two gradients, each a tensor or a list of tensors."""
    a, b = _flat(g0), _flat(g1)
    if a.shape != b.shape:
        raise ValueError(f"g0 and g1 must have the same number of entries, got {a.numel()} "
                         f"and {b.numel()}")
    dist = torch.linalg.vector_norm(a - b)
    cos = torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
                             ).clamp_min(torch.finfo(a.dtype).tiny)
    return dist, cos


def _flat(g):
    if isinstance(g, torch.Tensor):
        return g.reshape(-1)
    return torch.cat([t.reshape(-1) for t in g])


def steps_to_reach(steps, values, target):
    """The first step whose value is >= target, or None if it never gets there."""
    if len(steps) != len(values):
        raise ValueError(f"steps and values must have the same length, got {len(steps)} and "
                         f"{len(values)}")
    for s, v in zip(steps, values):
        if v >= target:
            return s
    return None


def ema_lag(momentum):
    """Steps an EMA of weight `momentum` trails a linear ramp by, once settled: (1 - p) / p."""
    if not 0 < momentum <= 1:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    return (1.0 - momentum) / momentum


def stat_error(mean, var, ref_mean, ref_var):
    """Mismatch of stored statistics vs reference ones, in units of the reference: mean over channels
    of |mean - ref_mean| / ref_std plus |var - ref_var| / ref_var."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    ref_mean, ref_var = np.asarray(ref_mean, np.float64), np.asarray(ref_var, np.float64)
    if np.any(ref_var <= 0):
        raise ValueError("ref_var must be positive")
    return float(np.mean(np.abs(mean - ref_mean) / np.sqrt(ref_var))
                 + np.mean(np.abs(var - ref_var) / ref_var))


def mean_error(stats, ref):
    """stat_error averaged over layers; stats and ref are lists of per-layer (mean, var)."""
    if len(stats) != len(ref):
        raise ValueError(f"stats and ref must have one (mean, var) per layer each, got "
                         f"{len(stats)} and {len(ref)}")
    return float(np.mean([stat_error(m, v, rm, rv) for (m, v), (rm, rv) in zip(stats, ref)]))


def relative_gap(a, b):
    """Mean over rows of ||a_i - b_i|| / ||b_i||: how far outputs a are from outputs b."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).mean())


def growth_factor(norms, skip=0):
    """Per-layer factor r by which norms grow from the last layer back to the first, norms[l] ~ c r^-l.

    A least-squares line through log(norms) against the layer index; `skip` layers at each end are
    left out (boundary effects of the input and the head). Returns exp(-slope).
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 1 or np.any(norms <= 0):
        raise ValueError("norms must be a 1-D array of positive numbers")
    if len(norms) - 2 * skip < 2:
        raise ValueError(f"need at least 2 layers after skipping {skip} at each end, got {len(norms)}")
    idx = np.arange(len(norms))[skip:len(norms) - skip]
    slope = np.polyfit(idx, np.log(norms[skip:len(norms) - skip]), 1)[0]
    return float(np.exp(-slope))


def log_slope(x, y):
    """Slope of log(y) against log(x) (a power law's exponent)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("x and y must be positive")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
