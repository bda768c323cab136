"""BN in a small convolutional network: with and without BatchNorm2d, over a learning-rate sweep,
and with BN before vs after the nonlinearity.

The data are scikit-learn's digits as 1x8x8 images (each pixel standardised over the training
set, as bnlib.experiments.data does). The network is three 3x3 convolutions (the second followed
by 2x2 average pooling), global average pooling and a linear read-out. Variants:
"none" (conv -> ReLU, no BN), "before" (conv -> BN -> ReLU, the paper's placement; the conv has
no bias, BN's beta replaces it) and "after" (conv -> ReLU -> BN). Each (variant, learning rate,
seed) is trained with momentum SGD by the shared loop; its eval-mode test accuracy is recorded,
and test-accuracy curves are kept at one learning rate.
Book: book/experiments/convnet.ipynb
"""
import math

import numpy as np
import torch
from torch import nn

from bnlib import plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.training import accuracy, stack_list, train_sgd
from bnlib.nn import BatchNorm2d

NAME = "convnet"
DESCRIPTION = ("small conv net on 8x8 digits: with/without BatchNorm2d over a learning-rate "
               "sweep, BN before vs after the ReLU")

VARIANTS = ("none", "before", "after")
LABELS = {"none": "no BN", "before": "BN before ReLU", "after": "BN after ReLU"}
COLORS = {"none": plotting.COLORS["no_bn"], "before": plotting.COLORS["bn"],
          "after": plotting.PALETTE[3]}

PROFILES = {
    "quick": dict(dataset="digits", channels=[8, 16, 16], lrs=[0.01, 0.1, 0.5, 2.0], seeds=2,
                  steps=150, batch_size=64, momentum=0.9, curve_lr=0.1, eval_every=15),
    "full": dict(dataset="digits", channels=[16, 32, 32],
                 lrs=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0], seeds=5, steps=400, batch_size=64,
                 momentum=0.9, curve_lr=0.1, eval_every=20),
}


class ConvNet(nn.Module):
    """Three 3x3 convolutions (padding 1; 2x2 average pooling after the second), global average
    pooling, a linear read-out. bn is "none", "before" (conv -> BN -> ReLU) or "after"
    (conv -> ReLU -> BN). padding_mode is Conv2d's ("zeros", "circular", ...)."""

    def __init__(self, in_channels=1, channels=(16, 32, 32), classes=10, bn="before",
                 padding_mode="zeros"):
        super().__init__()
        if bn not in VARIANTS:
            raise ValueError(f"bn must be one of {VARIANTS}, got {bn!r}")
        if len(channels) != 3 or any(int(c) != c or c < 1 for c in channels):
            raise ValueError(f"channels must be three positive ints, got {list(channels)!r}")
        self.bn = bn
        layers, prev = [], in_channels
        for k, c in enumerate(channels):
            # BN right after the conv subtracts the mean: a conv bias there is cancelled.
            conv = nn.Conv2d(prev, c, 3, padding=1, bias=bn != "before",
                             padding_mode=padding_mode)
            block = {"none": [conv, nn.ReLU()], "before": [conv, BatchNorm2d(c), nn.ReLU()],
                     "after": [conv, nn.ReLU(), BatchNorm2d(c)]}[bn]
            layers += block + ([nn.AvgPool2d(2)] if k == 1 else [])
            prev = c
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(prev, classes)

    def forward(self, x):
        return self.out(self.features(x).mean((2, 3)))


def images(x):
    """(N, 64) digits features -> (N, 1, 8, 8) images."""
    return x.reshape(len(x), 1, 8, 8)


def train_one(data, cfg, bn, lr, seed, device, curve):
    """Train one network; its final eval-mode test accuracy, losses and (if curve) test curve."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = ConvNet(1, cfg["channels"], int(y.max()) + 1, bn).to(device)
    points = []

    def hook(done, loss):
        points.append((done, accuracy(model, xt, yt)))
    losses = train_sgd(model, x, y, cfg["steps"], cfg["batch_size"], lr, cfg["momentum"],
                       seed=seed, every=cfg["eval_every"] if curve else cfg["steps"],
                       hook=hook if curve else None)
    diverged = not all(math.isfinite(v) for v in losses)
    acc = 0.1 if diverged else float(accuracy(model, xt, yt))  # diverged: chance, not argmax(nan)
    row = dict(bn=bn, lr=lr, seed=seed, acc=acc, diverged=diverged,
               final_loss=float(np.mean(losses[-cfg["eval_every"]:])) if not diverged else None)
    if curve:
        expected = cfg["steps"] // cfg["eval_every"] + 1  # a diverged run stops early: pad
        row["curve_acc"] = stack_list([p[1] for p in points]) + [None] * (expected - len(points))
        row["curve_steps"] = list(range(0, cfg["steps"] + 1, cfg["eval_every"]))[:expected]
        row["losses"] = [None if not math.isfinite(v) else v for v in losses]
    return row


def summarise(rows, lrs):
    """Per (variant, lr): mean, spread (sample std) and range of accuracy over seeds; divergences."""
    out = []
    for bn in VARIANTS:
        for lr in lrs:
            accs = [r["acc"] for r in rows if r["bn"] == bn and r["lr"] == lr]
            if not accs:
                continue
            out.append(dict(bn=bn, lr=lr, mean=float(np.mean(accs)),
                            std=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                            min=float(min(accs)), max=float(max(accs)),
                            diverged=sum(r["diverged"] for r in rows
                                         if r["bn"] == bn and r["lr"] == lr)))
    return out


def best(summary):
    """Per variant, the learning rate with the highest mean accuracy (and that row)."""
    return {bn: max((s for s in summary if s["bn"] == bn), key=lambda s: s["mean"])
            for bn in VARIANTS if any(s["bn"] == bn for s in summary)}


def run(config, device="cpu", seed=0, progress=False):
    x, y, xt, yt = load_dataset(config["dataset"], seed=seed, device=device)
    data = images(x), y, images(xt), yt
    if config["curve_lr"] not in config["lrs"]:
        raise ValueError(f"curve_lr must be one of lrs {config['lrs']}, got {config['curve_lr']!r}")
    rows = []
    for bn in VARIANTS:
        for lr in config["lrs"]:
            for s in range(config["seeds"]):
                rows.append(train_one(data, config, bn, lr, seed + s, device,
                                      curve=lr == config["curve_lr"]))
    summary = summarise(rows, config["lrs"])
    return dict(runs=rows, summary=summary,
                best={bn: dict(lr=b["lr"], mean=b["mean"], std=b["std"])
                      for bn, b in best(summary).items()},
                train_size=len(x), test_size=len(xt))


def _sweep(ax, m, variants):
    for bn in variants:
        ss = [s for s in m["summary"] if s["bn"] == bn]
        for r in m["runs"]:
            if r["bn"] == bn:
                ax.semilogx(r["lr"], 100 * r["acc"], ".", color=COLORS[bn], alpha=0.35)
        ax.errorbar([s["lr"] for s in ss], [100 * s["mean"] for s in ss],
                    yerr=[100 * s["std"] for s in ss], fmt="o-", color=COLORS[bn],
                    capsize=3, label=LABELS[bn])
    ax.set_xscale("log")
    ax.axhline(10.0, color=plotting.COLORS["reference"], ls=":", lw=1)
    plotting.ticks_at(ax, [s["lr"] for s in m["summary"]])
    ax.set_ylim(0, 100)
    ax.legend(loc="center left")


def figures(results):
    """Three parts: lr_sweep (no BN vs BN before ReLU), placement (BN before vs after ReLU), both
    final test accuracy against the learning rate (mean +- std over seeds, dots are seeds, dotted:
    chance); curves (test accuracy during training at curve_lr, mean over seeds)."""
    m, cfg = results["metrics"], results["config"]
    tag = f"{results['profile']}, {results['config']['seeds']} seeds"
    figs = {}
    for part, variants, title in (("lr_sweep", ("none", "before"), "With and without BN"),
                                  ("placement", ("before", "after"), "Where BN goes")):
        fig, ax = plotting.subplots()
        _sweep(ax, m, variants)
        plotting.label(ax, "learning rate", "test accuracy (%)", f"{title} ({tag})")
        figs[part] = fig
    fig, ax = plotting.subplots()
    for bn in VARIANTS:
        rs = [r for r in m["runs"] if r["bn"] == bn and "curve_acc" in r]
        accs = np.array([r["curve_acc"] for r in rs], dtype=float)
        ax.plot(rs[0]["curve_steps"], 100 * np.nanmean(accs, axis=0), "o-", ms=4,
                color=COLORS[bn], label=LABELS[bn])
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    plotting.label(ax, "training step", "test accuracy (%)",
                   f"During training, lr = {cfg['curve_lr']:g} ({tag})")
    figs["curves"] = fig
    return figs
