"""BN in residual networks: gradient norms at init vs depth with and without skip connections,
and zero-initialised gamma in each block's last BN (Goyal et al. 2017) against gamma = 1.

Book: book/experiments/residual.ipynb
"""
import math

import numpy as np
import torch
from torch import nn

from bnlib import plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.gradients import YANG_RELU_FACTOR, layer_grad_norms
from bnlib.experiments.metrics import growth_factor, log_slope
from bnlib.experiments.training import accuracy, train_sgd
from bnlib.nn import BatchNorm1d

NAME = "residual"
DESCRIPTION = ("gradient norms at init vs depth, plain BN stack vs residual BN blocks; "
               "zero-init gamma (Goyal et al.) vs gamma = 1, trainability at depth")

# plain: no skip; residual: skip, gamma = 1 everywhere; zero_gamma: skip, the last BN's gamma = 0.
VARIANTS = ("plain", "residual", "zero_gamma")
LABELS = {"plain": "plain (no skip)", "residual": "residual, gamma = 1",
          "zero_gamma": "residual, last gamma = 0"}
COLORS = {"plain": plotting.COLORS["no_bn"], "residual": plotting.COLORS["bn"],
          "zero_gamma": plotting.PALETTE[2]}

PROFILES = {
    "quick": dict(dataset="digits", width=128, init_depths=[2, 4, 8, 16, 32], init_batch=128,
                  init_seeds=3, train_depths=[2, 8, 32], train_seeds=2, steps=150,
                  batch_size=64, lr=0.05),
    # Full: wider, deeper (64 blocks = 129 hidden layers), more seeds, a longer budget.
    "full": dict(dataset="digits", width=192, init_depths=[2, 4, 8, 16, 32, 64], init_batch=256,
                 init_seeds=5, train_depths=[2, 8, 32, 64], train_seeds=3, steps=300,
                 batch_size=64, lr=0.05),
}


class Block(nn.Module):
    """Linear -> BN -> ReLU -> Linear -> BN, plus the input when skip, then ReLU: a ResNet
    basic block {He et al. 2016} with Linear layers. zero_gamma sets the last BN's gamma to 0,
    so that with skip the block starts as the identity on its (non-negative) inputs."""

    def __init__(self, width, skip=True, zero_gamma=False):
        super().__init__()
        self.skip = skip
        self.lin1, self.bn1 = nn.Linear(width, width, bias=False), BatchNorm1d(width)
        self.lin2, self.bn2 = nn.Linear(width, width, bias=False), BatchNorm1d(width)
        self.act = nn.ReLU()   # after the sum: its input is what the probes record
        for lin in (self.lin1, self.lin2):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")  # He: N(0, 2 / fan_in)
        if zero_gamma:
            nn.init.zeros_(self.bn2.weight)

    def branch(self, x):
        """The residual branch f(x)."""
        return self.bn2(self.lin2(torch.relu(self.bn1(self.lin1(x)))))

    def forward(self, x):
        return self.act(x + self.branch(x) if self.skip else self.branch(x))


class ResMLP(nn.Module):
    """A stem (Linear -> BN -> ReLU), `depth` Blocks of width `width`, a Linear read-out.

    Without skips it is the plain BN stack of the gradients chapter with 2 * depth + 1 hidden
    layers. Book: book/experiments/residual.ipynb
    """

    def __init__(self, in_features, width, depth, out_features, variant="residual"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int (number of blocks), got {depth!r}")
        self.variant = variant
        self.stem = nn.Sequential(nn.Linear(in_features, width, bias=False), BatchNorm1d(width),
                                  nn.ReLU())
        nn.init.kaiming_normal_(self.stem[0].weight, nonlinearity="relu")
        self.blocks = nn.ModuleList(Block(width, variant != "plain", variant == "zero_gamma")
                                    for _ in range(depth))
        self.out = nn.Linear(width, out_features)
        nn.init.normal_(self.out.weight, 0.0, 1.0 / math.sqrt(width))
        nn.init.zeros_(self.out.bias)

    def linears(self):
        """The Linear layers, input to output (the stem's, each block's two, the read-out)."""
        return [self.stem[0]] + [l for b in self.blocks for l in (b.lin1, b.lin2)] + [self.out]

    def sums(self):
        """The ReLUs whose inputs s_0 (stem BN output), s_1, ..., s_depth (block sums) are probed."""
        return [self.stem[2]] + [b.act for b in self.blocks]

    def forward(self, x):
        for layer in (self.stem, *self.blocks):
            x = layer(x)
        return self.out(x)


def probe_init(model, x, y):
    """At init, in training mode: the squared norm of dl/ds_l for every sum s_0 ... s_depth (the
    ReLU inputs of sums()), each unit's batch variance of s_l averaged over units, and the
    squared norm of dl/dW for every hidden Linear (gradients.layer_grad_norms)."""
    seen = []

    def keep(module, inputs):
        inputs[0].retain_grad()
        seen.append(inputs[0])
    handles = [m.register_forward_pre_hook(keep) for m in model.sums()]
    try:
        weights = layer_grad_norms(model.train(), x, y)
    finally:
        for h in handles:
            h.remove()
    return {"sum_sq": [float(s.grad.double().square().sum()) for s in seen],
            "sum_var": [float(s.detach().double().var(0, unbiased=False).mean()) for s in seen],
            "weight_sq": weights}


def _geomean(rows):
    return np.exp(np.mean(np.log(np.asarray(rows, np.float64)), 0)).tolist()


def _at_init(cfg, data, device, seed):
    x_tr, y_tr = data[0], data[1]
    out = {}
    for v in VARIANTS:
        rows = []
        for depth in cfg["init_depths"]:
            probes = []
            for s in range(cfg["init_seeds"]):
                torch.manual_seed(seed + s)
                model = ResMLP(x_tr.shape[1], cfg["width"], depth, 10, v).to(device)
                idx = torch.randperm(len(x_tr))[:cfg["init_batch"]].to(x_tr.device)
                probes.append(probe_init(model, x_tr[idx], y_tr[idx]))
            ratios = [p["sum_sq"][0] / p["sum_sq"][-1] for p in probes]
            rows.append({"depth": depth, "ratio": float(np.exp(np.mean(np.log(ratios)))),
                         "ratio_per_seed": ratios,
                         "sum_sq": _geomean([p["sum_sq"] for p in probes]),
                         "sum_var": np.mean([p["sum_var"] for p in probes], 0).tolist(),
                         # zero_gamma: the blocks' weight gradients are exactly 0 (kept as 0)
                         "weight_sq": np.mean([p["weight_sq"] for p in probes], 0).tolist()
                         if v == "zero_gamma" else _geomean([p["weight_sq"] for p in probes])})
        out[v] = {"rows": rows}
    deepest = out["plain"]["rows"][-1]["sum_sq"]
    out["plain"]["factor_per_block"] = growth_factor(deepest, 1)
    out["residual"]["ratio_slope"] = log_slope([r["depth"] for r in out["residual"]["rows"]],
                                               [r["ratio"] for r in out["residual"]["rows"]])
    out["yang_block_factor"] = YANG_RELU_FACTOR ** 2   # two BN-ReLU layers per block
    return out


def _train_one(cfg, data, device, seed, variant, depth, progress=False):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = ResMLP(x_tr.shape[1], cfg["width"], depth, 10, variant).to(device)
    losses = train_sgd(model, x_tr, y_tr, cfg["steps"], cfg["batch_size"], cfg["lr"], seed=seed,
                       show=progress, desc=f"{variant} depth {depth}")
    diverged = not math.isfinite(losses[-1])
    tail = losses[-20:]
    return {"variant": variant, "depth": depth, "seed": seed, "diverged": diverged,
            "final_loss": None if diverged else float(np.mean(tail)),
            "train_accuracy": None if diverged else accuracy(model, x_tr, y_tr).item(),
            "test_accuracy": None if diverged else accuracy(model, x_te, y_te).item(),
            "loss_curve": losses[::5]}


def run(cfg, device, seed, progress):
    """Gradient probes at init over depths, then fixed-budget training over depths and seeds."""
    data = load_dataset(cfg["dataset"], seed=seed, device=device)
    training = [_train_one(cfg, data, device, seed + s, v, d, progress)
                for d in cfg["train_depths"] for v in VARIANTS for s in range(cfg["train_seeds"])]
    return {"at_init": _at_init(cfg, data, device, seed), "training": training}


def training_summary(results):
    """Per (variant, depth): the mean over seeds of the final training loss and the test
    accuracy, and how many seeds diverged: [{variant, depth, final_loss, test_accuracy, ...}]."""
    rows = []
    for d in results["config"]["train_depths"]:
        for v in VARIANTS:
            mine = [r for r in results["metrics"]["training"]
                    if r["variant"] == v and r["depth"] == d]
            ok = [r for r in mine if not r["diverged"]]
            mean = lambda k: float(np.mean([r[k] for r in ok])) if ok else None  # noqa: E731
            rows.append({"variant": v, "depth": d, "seeds": len(mine),
                         "diverged": len(mine) - len(ok), "final_loss": mean("final_loss"),
                         "train_accuracy": mean("train_accuracy"),
                         "test_accuracy": mean("test_accuracy")})
    return rows


def block_excess(row):
    """Per block l of one residual at-init row: (q_l, Var(s_l)), where 1 + q_l is the factor by
    which the block multiplies ||dl/ds||^2 going back from s_{l+1} to s_l. The chapter's argument
    says q_l is about a constant over Var(s_l) (the branch is scale invariant in its input)."""
    sq = np.asarray(row["sum_sq"], np.float64)
    return (sq[:-1] / sq[1:] - 1).tolist(), row["sum_var"][:-1]


def figures(results):
    """Five one-panel parts: growth (gradient growth from output to input vs depth), layers
    (weight-gradient norms per layer at the largest depth), variance (Var(s_l) per block),
    excess (q_l against 1 / Var(s_l)), training (final training loss vs depth)."""
    m, prof = results["metrics"], results["profile"]
    a, figs = m["at_init"], {}
    depths = [r["depth"] for r in a["plain"]["rows"]]

    fig, ax = plotting.subplots(figsize=(plotting.WIDTH, 1.3 * plotting.HEIGHT))  # legend below
    for v in VARIANTS:
        ax.loglog(depths, [r["ratio"] for r in a[v]["rows"]], "o-", color=COLORS[v], label=LABELS[v])
    ax.loglog(depths, [a["yang_block_factor"] ** d for d in depths], "--",
              color=plotting.COLORS["reference"], label="(pi/(pi-1))^2 per block")
    ax.set_ylim(0.3, None)
    plotting.ticks_at(ax, depths)
    fig.legend(loc="outside lower center", ncols=2)
    plotting.label(ax, "blocks D", "||dl/ds_0||^2 / ||dl/ds_D||^2", f"Gradient growth at init ({prof})")
    figs["growth"] = fig

    fig, ax = plotting.subplots(figsize=(plotting.WIDTH, 1.2 * plotting.HEIGHT))
    for v in ("plain", "residual"):
        sq = a[v]["rows"][-1]["weight_sq"]
        ax.semilogy(range(1, len(sq) + 1), sq, "o-", ms=2.5, color=COLORS[v], label=LABELS[v])
    fig.legend(loc="outside lower center", ncols=2)
    plotting.label(ax, "hidden layer", "squared norm of dl/dW",
                   f"Weight gradients, {depths[-1]} blocks ({prof})")
    figs["layers"] = fig

    fig, ax = plotting.subplots()
    for v in VARIANTS:
        var = a[v]["rows"][-1]["sum_var"]
        ax.plot(range(len(var)), var, "o-", ms=2.5, color=COLORS[v], label=LABELS[v])
    ax.legend()
    plotting.label(ax, "block l (0: stem)", "mean unit variance of s_l",
                   f"Scale of the sums, {depths[-1]} blocks ({prof})")
    figs["variance"] = fig

    fig, ax = plotting.subplots()
    q, var = block_excess(a["residual"]["rows"][-1])
    c = float(np.median(np.asarray(q) * np.asarray(var)))
    ax.semilogy(range(len(q)), q, "o", ms=3.5, color=COLORS["residual"], label="q_l measured")
    ax.semilogy(range(len(q)), [c / v for v in var], "--", color=plotting.COLORS["reference"],
                label=f"{c:.2f} / Var(s_l)")
    ax.legend()
    plotting.label(ax, "block l", "q_l = factor - 1", f"Residual, gamma = 1 ({prof})")
    figs["excess"] = fig

    fig, ax = plotting.subplots(figsize=(plotting.WIDTH, 1.3 * plotting.HEIGHT))
    train_depths = results["config"]["train_depths"]
    for v in VARIANTS:
        mine = [r for r in m["training"] if r["variant"] == v]
        ax.loglog([r["depth"] for r in mine if not r["diverged"]],
                  [r["final_loss"] for r in mine if not r["diverged"]], ".", color=COLORS[v],
                  alpha=0.6)
        rows = [r for r in training_summary(results) if r["variant"] == v and r["final_loss"]]
        ax.loglog([r["depth"] for r in rows], [r["final_loss"] for r in rows], "o-",
                  color=COLORS[v], label=LABELS[v])
    ax.axhline(math.log(10), color=plotting.COLORS["reference"], ls=":", lw=1.5,
               label="log 10 (chance)")
    plotting.ticks_at(ax, train_depths)
    fig.legend(loc="outside lower center", ncols=2)
    cfg = results["config"]
    plotting.label(ax, "blocks D", "training loss, last 20 steps",
                   f"After {cfg['steps']} steps, lr {cfg['lr']:g} ({prof})")
    figs["training"] = fig
    return figs
