"""The batch across devices: ghost BN vs SyncBN accuracy, and SyncBN's traffic and time on gloo.

Accuracy: a fixed global batch split into shards of g examples. Without synchronisation each
rank normalises with its shard's statistics ("ghost" BN, g values a channel) and, under DDP,
evaluates with rank 0's running statistics (DDP broadcasts rank 0's buffers). That arithmetic
is simulated in one process (GhostBatchNorm1d), which is exact and lets g run from 2 to the
whole batch; with synchronisation every rank normalises with the whole batch, which is plain BN
on the whole batch (tests/test_sync_bn.py shows the two agree with real processes).
Traffic and time: real processes on gloo (bnlib.processes.run_ranks): payload bytes handed to
the collectives per training step by SyncBatchNorm and by DDP's gradient all-reduce, and the
time of one SyncBN layer's forward and backward against unsynchronised bnlib BN.
Book: book/experiments/sync_bn.ipynb
"""
import statistics
import time

import numpy as np
import torch
from torch import nn

from bnlib import functional, plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.training import batch_indices

NAME = "sync_bn"
DESCRIPTION = "ghost BN vs SyncBN over a fixed global batch; SyncBN's bytes and time on gloo"

PROFILES = {
    "quick": dict(dataset="digits", global_batch=64, per_rank=[2, 4, 8, 16, 32, 64], seeds=2,
                  width=64, steps=300, lr=0.05, world_sizes=[2, 4], time_channels=[64, 512],
                  time_batch=32, reps=20),
    "full": dict(dataset="digits", global_batch=128, per_rank=[2, 4, 8, 16, 32, 64, 128],
                 seeds=5, width=128, steps=1500, lr=0.05, world_sizes=[2, 3, 4],
                 time_channels=[64, 512, 2048], time_batch=32, reps=50),
}


class GhostBatchNorm1d(nn.Module):
    """BN over (B, C) with statistics per group of `group` consecutive examples (what each rank
    of a data-parallel run computes without SyncBN); running statistics from the first group
    only (rank 0's, which DDP broadcasts). group >= B is plain BN over the whole batch."""

    def __init__(self, num_features, group, momentum=0.1, eps=1e-5):
        super().__init__()
        self.group, self.momentum, self.eps = group, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        if not self.training:
            return functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                         self.bias, False, 0.0, self.eps)
        b, c = x.shape
        g = min(self.group, b)
        if b % g:
            raise ValueError(f"batch of {b} does not split into groups of {g}")
        k = b // g
        with torch.no_grad():  # rank 0's running statistics
            var, mean = torch.var_mean(x[:g], dim=0, correction=1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        xg = x.reshape(k, g, c).transpose(0, 1).reshape(g, k * c)  # column j*c + ch
        y = functional.batch_norm(xg, None, None, self.weight.repeat(k), self.bias.repeat(k),
                                  True, 0.0, self.eps)
        return y.reshape(g, k, c).transpose(0, 1).reshape(b, c)


def ghost_mlp(in_features, width, out_features, group):
    return nn.Sequential(nn.Linear(in_features, width), GhostBatchNorm1d(width, group), nn.ReLU(),
                         nn.Linear(width, width), GhostBatchNorm1d(width, group), nn.ReLU(),
                         nn.Linear(width, out_features))


def train_ghost(data, cfg, group, seed):
    """Train ghost_mlp with shards of `group` examples; test accuracy in eval mode (running
    statistics) and in train mode (each test batch normalised by its own shards)."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = ghost_mlp(x.shape[1], cfg["width"], int(y.max()) + 1, group)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    for idx in batch_indices(len(x), cfg["global_batch"], cfg["steps"], seed):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        model.eval()
        acc_eval = (model(xt).argmax(1) == yt).float().mean().item()
        model.train()
        n = len(xt) // cfg["global_batch"] * cfg["global_batch"]
        acc_train = np.mean([(model(xt[i:i + cfg["global_batch"]]).argmax(1)
                              == yt[i:i + cfg["global_batch"]]).float().mean().item()
                             for i in range(0, n, cfg["global_batch"])])
    return acc_eval, float(acc_train)


class _Payload:
    """Counts the bytes each call to torch.distributed.all_gather / all_reduce is handed (the
    tensors this rank contributes), while active. A measuring instrument: the calls run."""

    def __init__(self):
        self.bytes, self.calls = 0, 0

    def __enter__(self):
        import torch.distributed as dist
        self._saved = dist.all_gather, dist.all_reduce

        def gather(out, t, *a, **k):
            self.bytes, self.calls = self.bytes + t.numel() * t.element_size(), self.calls + 1
            return self._saved[0](out, t, *a, **k)

        def reduce(t, *a, **k):
            self.bytes, self.calls = self.bytes + t.numel() * t.element_size(), self.calls + 1
            return self._saved[1](t, *a, **k)
        dist.all_gather, dist.all_reduce = gather, reduce
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        dist.all_gather, dist.all_reduce = self._saved


def _median_ms(fn, reps):
    import torch.distributed as dist
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure_rank(rank, world, cfg):
    """On each rank: bytes per DDP step of the experiment's MLP with SyncBN, and per-layer times."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP
    import bnlib.nn
    from bnlib.sync import SyncBatchNorm, exchange_header
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, cfg["width"]), bnlib.nn.BatchNorm1d(cfg["width"]), nn.ReLU(),
                        nn.Linear(cfg["width"], cfg["width"]), bnlib.nn.BatchNorm1d(cfg["width"]),
                        nn.ReLU(), nn.Linear(cfg["width"], 10))
    model = DDP(SyncBatchNorm.convert_sync_batchnorm(net))
    buckets = []

    def hook(state, bucket):
        buf = bucket.buffer()
        state.append(buf.numel() * buf.element_size())
        return allreduce_hook(None, bucket)
    model.register_comm_hook(buckets, hook)
    x = torch.randn(cfg["global_batch"] // world, 64)
    labels = torch.randint(0, 10, (len(x),))
    for step in range(2):  # the second step is counted (the first builds DDP's buckets)
        buckets.clear()
        with _Payload() as sync:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), labels).backward()
    # DDP's allreduce_hook goes through dist.all_reduce too: its buckets are taken off.
    out = dict(world=world, syncbn_bytes=sync.bytes - sum(buckets),
               syncbn_calls=sync.calls - len(buckets),
               ddp_bytes=sum(buckets), ddp_buckets=len(buckets),
               parameters=sum(p.numel() for p in net.parameters()), timings=[])
    for c in cfg["time_channels"]:
        xs = torch.randn(cfg["time_batch"], c, requires_grad=True)
        dy = torch.randn_like(xs)
        layers = {"sync": SyncBatchNorm(c), "local": bnlib.nn.BatchNorm1d(c)}
        row = dict(channels=c)
        for name, layer in layers.items():
            def step(layer=layer):
                layer(xs).backward(dy)
            step()
            row[f"{name}_ms"] = _median_ms(step, cfg["reps"])
        row["header_ms"] = _median_ms(lambda: exchange_header(xs, None, world), cfg["reps"])
        out["timings"].append(row)
    return out


def run(config, device="cpu", seed=0, progress=False):
    from bnlib.processes import run_ranks
    data = load_dataset(config["dataset"], seed=seed, device="cpu")
    rows = []
    for g in config["per_rank"]:
        accs = [train_ghost(data, config, g, seed + s) for s in range(config["seeds"])]
        ev, tr = [a[0] for a in accs], [a[1] for a in accs]
        rows.append(dict(per_rank=g, ranks=config["global_batch"] // g, acc_eval=float(np.mean(ev)),
                         acc_train_mode=float(np.mean(tr)), acc_eval_seeds=ev))
    dist_rows = []
    for world in config["world_sizes"]:
        per_rank = run_ranks(measure_rank, world, args=(config,), timeout_s=300)
        r0 = per_rank[0]
        for key in ("sync_ms", "local_ms", "header_ms"):  # the slowest rank sets the pace
            for j, row in enumerate(r0["timings"]):
                row[key] = max(r["timings"][j][key] for r in per_rank)
        dist_rows.append(r0)
    return dict(accuracy=rows, distributed=dist_rows, device_note="CPU processes on gloo")


def figures(results):
    """Two parts: accuracy (eval-mode test accuracy vs per-rank batch) and gap (train-mode minus
    eval-mode test accuracy)."""
    m, tag = results["metrics"], f"{results['profile']}, {results['device_name']}"
    rows, b = m["accuracy"], results["config"]["global_batch"]
    gs = [r["per_rank"] for r in rows]
    figs = {}
    fig, ax = plotting.subplots()
    for r in rows:
        ax.semilogx([r["per_rank"]] * len(r["acc_eval_seeds"]),
                    [100 * a for a in r["acc_eval_seeds"]], ".", color=plotting.COLORS["no_bn"],
                    alpha=0.5)
    ax.semilogx(gs, [100 * r["acc_eval"] for r in rows], "o-", color=plotting.COLORS["bn"],
                label="ghost BN (mean over seeds)")
    ax.axhline(100 * rows[-1]["acc_eval"], color=plotting.COLORS["reference"], ls="--",
               label=f"SyncBN (= BN over all {b})")
    plotting.ticks_at(ax, gs)
    ax.legend()
    plotting.label(ax, "examples per rank g", "test accuracy, eval mode (%)",
                   f"Global batch {b} ({tag})")
    figs["accuracy"] = fig
    fig, ax = plotting.subplots()
    ax.semilogx(gs, [100 * (r["acc_train_mode"] - r["acc_eval"]) for r in rows], "o-",
                color=plotting.COLORS["bn"])
    ax.axhline(0.0, color=plotting.COLORS["reference"], ls="--")
    plotting.ticks_at(ax, gs)
    plotting.label(ax, "examples per rank g", "train-mode minus eval-mode (points)",
                   f"Train/eval gap on the test set ({tag})")
    figs["gap"] = fig
    return figs
