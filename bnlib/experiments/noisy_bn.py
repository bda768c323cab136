"""Santurkar et al. (2018): does BN help by reducing internal covariate shift? No BN, BN and
"noisy BN" trained side by side; gradient-based ICS and smoothness along the gradient.

Book: book/experiments/noisy_bn.ipynb
"""
from contextlib import contextmanager

import torch
from matplotlib.ticker import FuncFormatter

from bnlib import plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.metrics import gradient_change
from bnlib.experiments.models import held_noise, mlp
from bnlib.experiments.training import (accuracy, batch_indices, frozen_buffers, loss_fn,
                                        stack_list, train)

NAME = "noisy_bn"
DESCRIPTION = "Santurkar et al.: noisy BN, gradient-based internal covariate shift, smoothness"
VARIANTS = ("no_bn", "bn", "noisy_bn")

# Chapter 1's network (3 x 100 sigmoid units, small Gaussian init, batches of 60, SGD at lr 1),
# with noise after each BN layer: unit means drawn from [-0.5, 0.5], scales from [1/1.5, 1.5]
# and per-value spreads from [0, 0.25] at every step.
_COMMON = {"dataset": "mnist1d", "widths": [100, 100, 100], "activation": "sigmoid",
           "batch_size": 60, "lr": 1.0, "init_std": 0.1,
           "noise": {"shift": 0.5, "scale": 1.5, "spread": 0.25},
           "step_multiples": [0.5, 1.0, 2.0, 4.0], "unit": 0, "probe_batches": 4}
PROFILES = {
    "quick": {**_COMMON, "num_samples": 4000, "steps": 1000, "eval_every": 25, "probe_every": 100},
    "full": {**_COMMON, "num_samples": 70000, "steps": 20000, "eval_every": 250,
             "probe_every": 500},
}


def layer_params(model):
    """Parameters grouped by layer, input to output (a hidden block's Linear and BN together)."""
    return [list(b.parameters()) for b in model.hidden] + [list(model.out.parameters())]


def grads(model, x, y, params):
    """Gradient of the loss on (x, y) with respect to params (a flat list of tensors)."""
    return torch.autograd.grad(loss_fn(model, x, y), params)


@contextmanager
def shifted(params, direction, eta):
    """Within the block params are moved to params - eta * direction; on exit they are restored
    exactly (from a copy: subtracting and adding eta * direction back would not round-trip)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(eta * d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def ics(model, x, y, lr):
    """Santurkar's internal covariate shift of each layer k >= 2 on the batch (x, y): the
    gradient G_k of layer k's parameters now, against G'_k after layers 1..k-1 take their SGD
    step (lr times their gradient). Returns (l2 distance, relative distance, cosine) per layer.
    """
    layers = layer_params(model)
    flat = [p for ps in layers for p in ps]
    g = grads(model, x, y, flat)
    split, start = [], 0
    for ps in layers:
        split.append(g[start:start + len(ps)])
        start += len(ps)
    dist, rel, cos = [], [], []
    for k in range(1, len(layers)):
        earlier = [p for ps in layers[:k] for p in ps]
        earlier_g = [t for gs in split[:k] for t in gs]
        with shifted(earlier, earlier_g, lr):
            g_after = grads(model, x, y, layers[k])
        d, c = gradient_change(split[k], g_after)
        dist.append(d)
        rel.append(d / torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in split[k]])))
        cos.append(c)
    return torch.stack(dist), torch.stack(rel), torch.stack(cos)


def smoothness(model, x, y, lr, multiples):
    """Loss and gradient along the gradient direction: for eta = lr * multiple, the loss at
    w - eta g, and ||g(w - eta g) - g||. Returns (loss range, largest gradient change,
    effective beta-smoothness = max ||g(w - eta g) - g|| / ||eta g||)."""
    params = list(model.parameters())
    g = grads(model, x, y, params)
    gnorm = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in g]))
    losses, changes, betas = [], [], []
    for mult in multiples:
        eta = lr * mult
        with shifted(params, g, eta), torch.enable_grad():
            loss = loss_fn(model, x, y)
            g_eta = torch.autograd.grad(loss, params)
        change = gradient_change(g, g_eta)[0]
        losses.append(loss.detach())
        changes.append(change)
        betas.append(change / (eta * gnorm))
    losses = torch.stack(losses)
    return losses.max() - losses.min(), torch.stack(changes).max(), torch.stack(betas).max()


def probe(model, x_train, y_train, batches, i, cfg):
    """Both probes, averaged over cfg["probe_batches"] batches: the training batch of step i and
    the batches of the steps after it (one batch of 60 gives a noisy estimate). Each batch
    gets its own noise draw, held fixed across that batch's passes; the model is unchanged."""
    keys = ("ics_l2", "ics_relative", "ics_cosine", "loss_range", "grad_change", "beta")
    per_batch = []
    for j in range(cfg["probe_batches"]):
        idx = batches[(i + j) % len(batches)]
        x, y = x_train[idx], y_train[idx]
        with frozen_buffers(model), held_noise(model):
            model(x)  # draw this batch's noise once; every probe pass reuses it
            per_batch.append(ics(model, x, y, cfg["lr"])
                             + smoothness(model, x, y, cfg["lr"], cfg["step_multiples"]))
    return {k: torch.stack(vs).mean(0) for k, vs in zip(keys, zip(*per_batch))}


def train_variant(norm, data, cfg, device, seed, show):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # the same initial weights for every variant
    model = mlp(x_train.shape[1], cfg["widths"], 10, cfg["activation"],
                None if norm == "no_bn" else norm, cfg["init_std"], cfg["noise"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    batches = batch_indices(len(x_train), cfg["batch_size"], cfg["steps"], seed, device)
    rec = {k: [] for k in ("test_accuracy", "train_loss", "input_mean", "input_std")}
    probes = {k: [] for k in ("ics_l2", "ics_relative", "ics_cosine", "loss_range",
                              "grad_change", "beta")}
    step_shift, prev = torch.zeros((), device=device), None
    last = {}  # the training batch's last-hidden-layer input, kept by the step's loss

    def step_loss(model, x, y):
        logits, preacts = model(x, keep_preacts=True)
        last["z"] = preacts[-1].detach()
        return torch.nn.functional.cross_entropy(logits, y)

    def after(done, loss):
        nonlocal step_shift, prev
        if done > 0:
            # That input's per-unit batch mean and std, and how much they moved since the
            # previous step (mean over units).
            z = last["z"]
            now = torch.stack([z.mean(0), z.std(0)])
            if prev is not None:
                step_shift += (now - prev).abs().mean()
            prev = now
            if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
                rec["test_accuracy"].append(accuracy(model, x_test, y_test))
                rec["train_loss"].append(loss)
                rec["input_mean"].append(now[0, cfg["unit"]])
                rec["input_std"].append(now[1, cfg["unit"]])
        if done < cfg["steps"] and (done + 1) % cfg["probe_every"] == 0:
            # Probed before the step it is named after, on that step's batch.
            for key, v in probe(model, x_train, y_train, batches, done, cfg).items():
                probes[key].append(v)

    # One step at a time, without graphs: the noise is drawn afresh at every step.
    train(model, opt, x_train, y_train, batches, hook=after, loss=step_loss, graphs=False,
          show=show, desc=f"{NAME} {norm}")
    out = {k: stack_list(v) for k, v in {**rec, **probes}.items()}
    out["final_accuracy"] = out["test_accuracy"][-1]
    out["mean_step_shift"] = step_shift.item() / (cfg["steps"] - 1)
    return out


def run(cfg, device, seed, progress=False):
    data = load_dataset(cfg["dataset"], seed=seed, device=device, num_samples=cfg["num_samples"])
    steps = [s for s in range(1, cfg["steps"] + 1)
             if s % cfg["eval_every"] == 0 or s == cfg["steps"]]
    out = {"steps": steps, "probe_steps": list(range(cfg["probe_every"], cfg["steps"] + 1,
                                                     cfg["probe_every"])),
           "n_train": len(data[0]), "n_test": len(data[2])}
    for norm in VARIANTS:
        out[norm] = train_variant(norm, data, cfg, device, seed, progress)
    return out


NAMES = {"no_bn": "without BN", "bn": "with BN", "noisy_bn": "noisy BN"}


def _steps_in_thousands(axes):
    """Step ticks as 0, 10k, 20k, ...: short labels that do not crowd a phone-width panel."""
    fmt = FuncFormatter(lambda v, _: "0" if v == 0 else f"{v / 1000:g}k")
    for ax in axes:
        ax.xaxis.set_major_formatter(fmt)


def figures(results):
    """Two parts, each a 2 x 2 grid readable on a phone: training (test accuracy, one last-layer
    unit's batch mean and std over time, the legend) and probes (gradient-based ICS, relative
    change and cosine; loss range and gradient change per distance along the gradient)."""
    m, tag = results["metrics"], f"{results['profile']} profile, {results['device_name']}"
    fig, axes = plotting.panels(4)
    for norm in VARIANTS:
        c, r = plotting.COLORS[norm], m[norm]
        axes[0].plot(m["steps"], r["test_accuracy"], color=c, label=NAMES[norm])
        axes[1].plot(m["steps"], r["input_mean"], color=c)
        axes[2].plot(m["steps"], r["input_std"], color=c)
    plotting.label(axes[0], "training step", "test accuracy", "(a) test accuracy")
    plotting.label(axes[1], "training step", "batch mean", "(b) unit input: mean")
    plotting.label(axes[2], "training step", "batch std", "(c) unit input: std")
    axes[3].axis("off")  # the fourth slot holds the legend
    axes[3].legend(*axes[0].get_legend_handles_labels(), loc="center")
    _steps_in_thousands(axes[:3])
    fig.suptitle(tag)
    first = fig
    fig, axes = plotting.panels(4)
    for norm in VARIANTS:
        c, r = plotting.COLORS[norm], m[norm]
        cos = [sum(v) / len(v) for v in r["ics_cosine"]]
        rel = [sum(v) / len(v) for v in r["ics_relative"]]
        axes[0].plot(m["probe_steps"], rel, "o-", color=c, ms=3, label=NAMES[norm])
        axes[1].plot(m["probe_steps"], cos, "o-", color=c, ms=3)
        axes[2].plot(m["probe_steps"], r["loss_range"], "o-", color=c, ms=3)
        axes[3].plot(m["probe_steps"], r["beta"], "o-", color=c, ms=3)
    fig.legend(loc="outside lower center", ncols=len(VARIANTS))
    plotting.label(axes[0], "training step", "||G - G'|| / ||G||", "(a) ICS: relative change")
    plotting.label(axes[1], "training step", "cos(G, G')", "(b) ICS: cosine")
    plotting.label(axes[2], "training step", "max - min loss", "(c) loss range")
    plotting.label(axes[3], "training step", "||g(w - eta g) - g|| / ||eta g||",
                   "(d) gradient change / distance")
    _steps_in_thousands(axes)
    fig.suptitle(tag)
    return {"training": first, "probes": fig}
