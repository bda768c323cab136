"""BN as a regulariser (Ioffe & Szegedy 2015, Section 3.4): on 512 MNIST-1D signals, the
train/test gap of an MLP trained to near-zero training loss, with and without BN, with and
without dropout; and how BN's effect changes with the noise of its batch statistics.

The batch-size sweep trains plain and BN networks (no dropout) with minibatches of 4 to 256
for the same number of epochs, the learning rate scaled with the batch size (lr * B /
batch_size: the linear scaling rule of Goyal et al. 2017, which keeps SGD's own noise, set by
lr / B, about the same), so that every run fits its training set; BN's effect is BN minus no BN
at each batch size. The ghost sweep keeps everything of the training fixed (minibatches of batch_size, learning
rate, epochs, seeds) and changes only how many examples each BN statistic is taken over: ghost
batches of g examples (bnlib.experiments.sync_bn.GhostBatchNorm1d), g = batch_size being plain
BN. Changing the batch size itself would also change the SGD noise and the number of steps,
with or without BN.
Book: book/experiments/regularisation.ipynb
"""
import numpy as np
import torch
from torch import nn

from bnlib import plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.sync_bn import GhostBatchNorm1d
from bnlib.experiments.training import accuracy, train_sgd
from bnlib.experiments.training import progress as progress_bar
from bnlib.nn import BatchNorm1d

NAME = "regularisation"
DESCRIPTION = "BN vs dropout on a small training set: train/test gap, and BN's effect vs batch size"
VARIANTS = (("no_bn", False), ("no_bn", True), ("bn", False), ("bn", True))  # (norm, dropout)

_COMMON = dict(dataset="mnist1d", num_samples=4000, n_train=512, width=256, depth=2,
               dropout=0.5, lr=0.02, momentum=0.9, batch_size=64)
PROFILES = {
    "quick": dict(_COMMON, seeds=2, epochs=100, ghost_sizes=[2, 8, 64], batch_sizes=[16, 64, 256]),
    "full": dict(_COMMON, seeds=6, epochs=150, ghost_sizes=[2, 4, 8, 16, 32, 64],
                 batch_sizes=[4, 8, 16, 32, 64, 128, 256]),
}


def variant_name(norm, dropout):
    """'bn', 'bn+dropout', 'no_bn', 'no_bn+dropout'."""
    return norm + ("+dropout" if dropout else "")


def regularised_mlp(in_features, width, depth, out_features, bn, dropout, ghost=None):
    """depth hidden blocks Linear -> [BN] -> ReLU -> [Dropout(dropout)], then a Linear read-out.
    The Linear before a BN has no bias (BN's mean subtraction cancels it); dropout=0 means none;
    ghost=g takes BN's training statistics over groups of g examples (GhostBatchNorm1d)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if ghost is not None and not bn:
        raise ValueError("ghost needs bn=True (it sets the group of BN's statistics)")
    layers, prev = [], in_features
    for _ in range(depth):
        layers.append(nn.Linear(prev, width, bias=not bn))
        if bn:
            layers.append(BatchNorm1d(width) if ghost is None else GhostBatchNorm1d(width, ghost))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        prev = width
    layers.append(nn.Linear(prev, out_features))
    return nn.Sequential(*layers)


@torch.no_grad()
def evaluate(model, x, y):
    """(accuracy, mean cross-entropy) of model on (x, y) in eval mode (running statistics, no
    dropout), as floats."""
    was = model.training
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y).item()
    model.train(was)
    return accuracy(model, x, y).item(), loss


def fit(data, cfg, bn, dropout, seed, ghost=None):
    """Train one network for `epochs` epochs of the training set; its train and test accuracy
    and loss (eval mode), and the gaps: accuracy train minus test, loss test minus train."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = regularised_mlp(x.shape[1], cfg["width"], cfg["depth"], int(y.max()) + 1, bn,
                            cfg["dropout"] if dropout else 0.0, ghost).to(x.device)
    steps = cfg["epochs"] * (len(x) // cfg["batch_size"])
    losses = train_sgd(model, x, y, steps, cfg["batch_size"], cfg["lr"], cfg["momentum"],
                       seed=seed)
    train_acc, train_loss = evaluate(model, x, y)
    test_acc, test_loss = evaluate(model, xt, yt)
    return dict(train_acc=train_acc, test_acc=test_acc, train_loss=train_loss,
                test_loss=test_loss, acc_gap=train_acc - test_acc, loss_gap=test_loss - train_loss,
                final_batch_loss=losses[-1], steps=steps)


def _summary(runs):
    keys = [k for k in runs[0] if k != "steps"]
    out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out.update({f"{k}_seeds": [r[k] for r in runs] for k in ("test_acc", "acc_gap", "test_loss")})
    out["test_acc_sd"] = float(np.std([r["test_acc"] for r in runs]))
    out["steps"] = runs[0]["steps"]
    return out


def run(config, device="cpu", seed=0, progress=False):
    x, y, xt, yt = load_dataset(config["dataset"], seed=seed, device=device,
                                num_samples=config["num_samples"])
    n, b = config["n_train"], config["batch_size"]
    if not 1 <= n <= len(x):
        raise ValueError(f"n_train must be in [1, {len(x)}], got {n!r}")
    bad = [g for g in config["ghost_sizes"] if g < 2 or b % g]
    if bad:
        raise ValueError(f"ghost_sizes must divide batch_size={b} and be >= 2, got {bad}")
    data = (x[:n], y[:n], xt, yt)
    seeds = [seed + s for s in range(config["seeds"])]
    if any(not 1 <= bs <= n for bs in config["batch_sizes"]):
        raise ValueError(f"batch_sizes must be in [1, n_train={n}], got {config['batch_sizes']}")
    jobs = len(VARIANTS) + len(config["ghost_sizes"]) + 2 * len(config["batch_sizes"])
    bar = progress_bar(jobs * len(seeds), progress, NAME)
    grid = []
    for norm, dropout in VARIANTS:
        runs = [fit(data, config, norm == "bn", dropout, s) for s in seeds]
        grid.append(dict(variant=variant_name(norm, dropout), bn=norm == "bn", dropout=dropout,
                         **_summary(runs)))
        bar.update(len(seeds))
    ghost = []
    for g in config["ghost_sizes"]:
        ghost.append(dict(ghost=g, **_summary([fit(data, config, True, False, s, g) for s in seeds])))
        bar.update(len(seeds))
    by_variant = {r["variant"]: r for r in grid}
    sweep = []
    for bs in config["batch_sizes"]:
        cfg = dict(config, batch_size=bs, lr=config["lr"] * bs / b)
        row = dict(batch_size=bs, lr=cfg["lr"])
        for norm in ("no_bn", "bn"):
            if bs == b:  # the grid's run, the same configuration
                row[norm] = {k: v for k, v in by_variant[norm].items()
                             if k not in ("variant", "bn", "dropout")}
            else:
                row[norm] = _summary([fit(data, cfg, norm == "bn", False, s) for s in seeds])
            bar.update(len(seeds))
        row["bn_effect"] = row["bn"]["test_acc"] - row["no_bn"]["test_acc"]
        sweep.append(row)
    bar.close()
    return dict(grid=grid, ghost=ghost, sweep=sweep, n_train=n, n_test=len(xt))


LABELS = {"no_bn": "plain", "no_bn+dropout": "dropout", "bn": "BN", "bn+dropout": "BN +\ndropout"}


def _variant_panel(results, key, ylabel, title, scale=100.0):
    """One value per variant of the 2x2 grid: the seeds as dots, their mean as a wide bar mark
    (not a bar from zero: the axis is cut to the values' range)."""
    rows = results["metrics"]["grid"]
    fig, ax = plotting.subplots()
    for i, r in enumerate(rows):
        color = plotting.COLORS["bn" if r["bn"] else "no_bn"]
        seeds = r[f"{key}_seeds"]
        ax.plot([i] * len(seeds), [scale * v for v in seeds], "o", color=color, alpha=0.45,
                mfc="none" if r["dropout"] else color)
        ax.plot([i - 0.28, i + 0.28], [scale * r[key]] * 2, "-", color=color, lw=3)
    ax.set_xticks(range(len(rows)), [LABELS[r["variant"]] for r in rows])
    values = [scale * v for r in rows for v in r[f"{key}_seeds"]]
    span = max(values) - min(values)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(min(values) - 0.15 * span, max(values) + 0.15 * span)
    ax.grid(axis="x", visible=False)
    plotting.label(ax, "", ylabel, title)
    return fig


def figures(results):
    """Parts: accuracy (test accuracy per variant), gap (train minus test accuracy), test_loss
    (per variant), batch_size (plain and BN test accuracy against the batch size), ghost (BN's
    test accuracy against the examples per statistic, g)."""
    m, cfg = results["metrics"], results["config"]
    tag = f"{results['profile']}, {m['n_train']} examples"
    figs = {"accuracy": _variant_panel(results, "test_acc", "test accuracy (%)",
                                       f"Test accuracy ({tag})"),
            "gap": _variant_panel(results, "acc_gap", "train minus test (points)",
                                  f"Accuracy gap ({tag})"),
            "test_loss": _variant_panel(results, "test_loss", "test cross-entropy",
                                        f"Test loss ({tag})", scale=1.0)}
    fig, ax = plotting.subplots()
    bss = [r["batch_size"] for r in m["sweep"]]
    for norm, name in (("no_bn", "no BN"), ("bn", "BN")):
        color = plotting.COLORS[norm]
        for r in m["sweep"]:
            seeds = r[norm]["test_acc_seeds"]
            ax.semilogx([r["batch_size"]] * len(seeds), [100 * v for v in seeds], ".",
                        color=color, alpha=0.4)
        ax.semilogx(bss, [100 * r[norm]["test_acc"] for r in m["sweep"]], "o-", color=color,
                    label=name)
    plotting.ticks_at(ax, bss)
    ax.legend()
    plotting.label(ax, "batch size B (learning rate ∝ B)", "test accuracy (%)",
                   f"{cfg['epochs']} epochs at every B ({results['profile']})")
    figs["batch_size"] = fig
    fig, ax = plotting.subplots()
    gs = [r["ghost"] for r in m["ghost"]]
    for r in m["ghost"]:
        ax.semilogx([r["ghost"]] * len(r["test_acc_seeds"]), [100 * v for v in r["test_acc_seeds"]],
                    ".", color=plotting.COLORS["bn"], alpha=0.4)
    ax.semilogx(gs, [100 * r["test_acc"] for r in m["ghost"]], "o-", color=plotting.COLORS["bn"],
                label="BN, statistics over g")
    grid = {r["variant"]: r for r in m["grid"]}
    ax.axhline(100 * grid["no_bn"]["test_acc"], color=plotting.COLORS["no_bn"], ls="--",
               label="no BN")
    ax.axhline(100 * grid["no_bn+dropout"]["test_acc"], color=plotting.COLORS["no_bn"], ls=":",
               label="no BN, dropout")
    plotting.ticks_at(ax, gs)
    ax.legend()
    plotting.label(ax, "examples per BN statistic g", "test accuracy (%)",
                   f"Batch {cfg['batch_size']}, ghost batches of g ({results['profile']})")
    figs["ghost"] = fig
    return figs
