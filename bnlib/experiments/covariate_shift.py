"""Figure 1 of Ioffe & Szegedy (2015): a sigmoid MLP with and without BN, accuracy and one
last-hidden-layer sigmoid input's 15th/50th/85th percentiles over training.

Book: book/experiments/covariate_shift.ipynb
"""
import time

import torch
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from bnlib import plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.metrics import band_width, percentiles, relative_drift, steps_to_reach
from bnlib.experiments.models import mlp
from bnlib.experiments.training import accuracy, batch_indices, stack_list, train

NAME = "covariate_shift"
DESCRIPTION = "paper Figure 1: 3x100 sigmoid MLP with/without BN, accuracy and sigmoid-input percentiles"
VARIANTS = ("no_bn", "bn")
QS = (15, 50, 85)
STYLES = (":", "-", "--")  # line style of each percentile in the figure

# lr 1.0: plain SGD fast enough that the quick profile shows both curves take off.
_COMMON = {"dataset": "mnist1d", "widths": [100, 100, 100], "batch_size": 60, "lr": 1.0,
           "init_std": 0.1, "unit": 0, "target_accuracy": 0.45}
PROFILES = {
    "quick": {**_COMMON, "num_samples": 4000, "steps": 1500, "eval_every": 25},
    "full": {**_COMMON, "num_samples": 70000, "steps": 50000, "eval_every": 250},
}


def train_variant(norm, data, cfg, device, seed, show):
    """Train one variant; test accuracy and the unit's sigmoid-input percentiles over training."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # the same initial weights for both variants
    model = mlp(x_train.shape[1], cfg["widths"], 10, "sigmoid",
                None if norm == "no_bn" else norm, cfg["init_std"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    batches = batch_indices(len(x_train), cfg["batch_size"], cfg["steps"], seed, device)
    acc, pct, steps = [], [], []

    def record(step, loss):
        acc.append(accuracy(model, x_test, y_test))
        model.eval()
        with torch.no_grad():  # every last-hidden-layer unit's input over the test set
            z = model(x_test, keep_preacts=True)[1][-1]
        model.train()
        pct.append(percentiles(z, QS))  # (3, units)
        steps.append(step)

    # Recorded before training and after every eval_every steps: on CUDA each chunk of steps
    # between two records is one graph replay (see training.ChunkRunner).
    train(model, opt, x_train, y_train, batches, every=cfg["eval_every"], hook=record,
          show=show, desc=f"{NAME} {norm}")
    pct = torch.stack(pct)  # (records, 3, units)
    drift = relative_drift(pct)
    width = band_width(pct)
    acc = stack_list(acc)
    return {"test_accuracy": acc, "percentiles": pct[:, :, cfg["unit"]].cpu().tolist(),
            "final_accuracy": acc[-1],
            "steps_to_target": steps_to_reach(steps, acc, cfg["target_accuracy"]),
            "relative_drift_unit": drift[cfg["unit"]].item(),
            "relative_drift_median": drift.median().item(),
            "band_width_unit": width[cfg["unit"]].item(),
            "band_width_median": width.median().item()}, steps


def run(cfg, device, seed, progress=False):
    """Both variants; "seconds" splits the wall time into data (generated or cached) and each
    variant's training with its records (which end in a copy to the host, so GPU work is done)."""
    start = time.perf_counter()
    data = load_dataset(cfg["dataset"], seed=seed, device=device, num_samples=cfg["num_samples"])
    out = {"percentiles_q": list(QS), "n_train": len(data[0]), "n_test": len(data[2]),
           "seconds": {"data": time.perf_counter() - start}}
    for norm in VARIANTS:
        start = time.perf_counter()
        out[norm], out["steps"] = train_variant(norm, data, cfg, device, seed, progress)
        out["seconds"][norm] = time.perf_counter() - start
    return out


def _steps_in_thousands(axes):
    """Step ticks as 0, 10k, 20k, ...: short labels that do not crowd a phone-width panel."""
    fmt = FuncFormatter(lambda v, _: "0" if v == 0 else f"{v / 1000:g}k")
    for ax in axes:
        ax.xaxis.set_major_formatter(fmt)


def figures(results):
    """The paper's Figure 1 from results, one part in a 2 x 2 grid readable on a phone: (a) and
    (b) the plotted unit's input percentiles without and with BN, on one scale so that the bands
    compare by eye, (c) test accuracy, and the legend in the fourth slot."""
    m = results["metrics"]
    fig, axes = plotting.panels(4)
    axes[1].sharey(axes[0])
    names = (("no_bn", "without BN"), ("bn", "with BN"))
    for ax, letter, (norm, name) in zip(axes[:2], "ab", names):
        pct = list(zip(*m[norm]["percentiles"]))
        for series, style in zip(pct, STYLES):
            ax.plot(m["steps"], series, style, color=plotting.COLORS[norm])
        plotting.label(ax, "training step", "sigmoid input", f"({letter}) {name}")
    for norm, name in names:
        axes[2].plot(m["steps"], m[norm]["test_accuracy"], color=plotting.COLORS[norm])
    plotting.label(axes[2], "training step", "test accuracy", "(c) test accuracy")
    # The fourth slot holds the legend: the networks' colours and the percentiles' line styles.
    axes[3].axis("off")
    handles = [Line2D([], [], color=plotting.COLORS[norm], label=name) for norm, name in names]
    handles += [Line2D([], [], ls=style, color="black", label=f"{q}th percentile")
                for q, style in zip(m["percentiles_q"], STYLES)]
    axes[3].legend(handles=handles, loc="center")
    _steps_in_thousands(axes[:3])
    fig.suptitle(f"{results['profile']} profile, {results['device_name']}")
    return {"figure1": fig}
