"""Probes of what a network's BN layers see and store: per-layer batch statistics, PreciseBN
population statistics, loading statistics into the running buffers, running estimates tracked
alongside training, and the normalized inputs' second moment in eval mode.

Used by inference_stats and variance_correction; every probe leaves the running statistics
as it found them unless it says otherwise (set_running_stats).
"""
import contextlib

import numpy as np
import torch

from bnlib import reference
from bnlib.experiments.models import bn_layers
from bnlib.experiments.training import frozen_buffers


def reference_stats(x):
    """(mean, biased var) per channel of a (N, C) tensor, in float64."""
    x = x.detach().double()
    return x.mean(0), x.var(0, unbiased=False)


def layer_batch_stats(model, x):
    """Per BN layer, the (mean, biased var) of its input when x is one batch in train mode.

    The running statistics are left as they were.
    """
    stats = []
    hooks = [b.register_forward_pre_hook(lambda mod, inp: stats.append(
        tuple(v.double().cpu().numpy() for v in reference_stats(inp[0]))))
        for b in bn_layers(model)]
    was_training = model.training
    model.train()
    with torch.no_grad(), frozen_buffers(model):
        model(x)
    model.train(was_training)
    for h in hooks:
        h.remove()
    return stats


def precise_stats(model, x, batch_size, unbiased_var=True):
    """PreciseBN: population statistics of the current weights from batches of batch_size (train mode).

    Each layer's batch means and variances are averaged (reference.population_stats, m/(m-1)).
    """
    per_layer = [[] for _ in bn_layers(model)]
    for i in range(0, len(x) - batch_size + 1, batch_size):
        for l, s in enumerate(layer_batch_stats(model, x[i:i + batch_size])):
            per_layer[l].append(s)
    out = []
    for batches in per_layer:
        means, vars_ = np.array([b[0] for b in batches]), np.array([b[1] for b in batches])
        out.append(reference.population_stats(means, vars_, batch_size, unbiased_var=unbiased_var))
    return out


def set_running_stats(model, stats):
    """Load per-layer (mean, var) into the BN layers' running buffers."""
    layers = bn_layers(model)
    if len(stats) != len(layers):
        raise ValueError(f"stats must hold one (mean, var) per BN layer ({len(layers)}), "
                         f"got {len(stats)}")
    for b, (mean, var) in zip(layers, stats):
        b.running_mean.copy_(torch.as_tensor(mean, dtype=b.running_mean.dtype))
        b.running_var.copy_(torch.as_tensor(var, dtype=b.running_var.dtype))


class StatTrackers:
    """EMA (several momenta) and cumulative averages of each BN layer's batch statistics, updated by
    hooks at every forward pass in train mode, except within `paused()` (a probe's forward passes
    are not training batches)."""

    def __init__(self, model, momenta):
        self.layers, self.momenta, self.count = bn_layers(model), list(momenta), 0
        self.active = True
        c = [b.num_features for b in self.layers]
        keys = [f"ema {p:g}" for p in self.momenta] + ["cumulative"]
        self.stats = {k: [(np.zeros(n), np.ones(n)) for n in c] for k in keys}
        self.hooks = [b.register_forward_pre_hook(self._hook(l)) for l, b in enumerate(self.layers)]

    def _hook(self, l):
        def hook(mod, inp):
            if not (mod.training and self.active):
                return
            x = inp[0].detach().double().cpu().numpy()
            if l == 0:
                self.count += 1
            for p in self.momenta:
                rm, rv = self.stats[f"ema {p:g}"][l]
                self.stats[f"ema {p:g}"][l] = reference.update_running_stats(rm, rv, x, momentum=p)
            rm, rv = self.stats["cumulative"][l]
            self.stats["cumulative"][l] = reference.update_running_stats(rm, rv, x, momentum=None,
                                                                         count=self.count)
        return hook

    @contextlib.contextmanager
    def paused(self):
        """Forward passes within the block leave the trackers as they are."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def remove(self):
        for h in self.hooks:
            h.remove()


def eval_second_moments(model, x):
    """Per BN layer, mean over channels of E[x_hat^2] on x in eval mode (x_hat before gamma, beta)."""
    out, hooks = [], []
    for b in bn_layers(model):
        def hook(mod, inp, out_list=out):
            z = (inp[0].double() - mod.running_mean.double()) / torch.sqrt(mod.running_var.double() + mod.eps)
            out_list.append(float((z ** 2).mean()))
        hooks.append(b.register_forward_pre_hook(hook))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out
