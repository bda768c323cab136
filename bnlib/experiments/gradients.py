"""What BN does to gradients: per-layer norms at init vs depth, lr and init-scale sweeps, effective lr.

Book: book/experiments/gradients.ipynb
"""
import math

import numpy as np
import torch
from torch import nn

from bnlib import plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.metrics import growth_factor, log_slope
from bnlib.experiments.models import hidden_linears, mlp
from bnlib.experiments.training import accuracy, train_sgd

NAME = "gradients"
DESCRIPTION = "gradient norms vs depth with/without BN (Yang et al.), lr x5/x30 and init-scale sweeps"

# Yang et al. (2019): in a wide ReLU MLP with BN (no skip connections) at initialization the squared
# gradient norm grows by lambda -> pi / (pi - 1) per layer backwards, in the limit of a large batch.
YANG_RELU_FACTOR = math.pi / (math.pi - 1)
# The sweeps record every hidden layer's weight norm every NORM_EVERY steps (as the loss curve).
NORM_EVERY = 5

PROFILES = {
    "quick": dict(dataset="digits", init_depth=32, init_width=256, init_batch=128, init_seeds=3,
                  fit_skip=4, sweep_depth=8, sweep_width=128, sweep_steps=200, batch_size=64,
                  base_lr=0.01, lr_factors=[1, 5, 30], init_scales=[0.1, 0.3, 1.0, 3.0, 10.0],
                  scales=[0.25, 0.5, 1.0, 2.0, 4.0], norm_steps=200, norm_lr=0.1),
    # Full: the same data (accuracy thresholds keep their meaning), wider/deeper nets, more seeds.
    "full": dict(dataset="digits", init_depth=64, init_width=1024, init_batch=512, init_seeds=10,
                 fit_skip=8, sweep_depth=16, sweep_width=512, sweep_steps=2000, batch_size=64,
                 base_lr=0.01, lr_factors=[1, 5, 30], init_scales=[0.1, 0.3, 1.0, 3.0, 10.0],
                 scales=[0.25, 0.5, 1.0, 2.0, 4.0], norm_steps=2000, norm_lr=0.1),
}


# --- probes -------------------------------------------------------------------------------------

def layer_grad_norms(model, x, y):
    """Squared Frobenius norm of the loss gradient for each hidden Linear weight, input to output."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [float((lin.weight.grad.double() ** 2).sum()) for lin in hidden_linears(model)]


# --- parts ------------------------------------------------------------------------------------------

def _at_init(cfg, data, device, seed):
    x_tr, y_tr = data[0], data[1]
    out = {}
    for bn in (True, False):
        per_seed = []
        for s in range(cfg["init_seeds"]):
            torch.manual_seed(seed + s)
            model = mlp(x_tr.shape[1], [cfg["init_width"]] * cfg["init_depth"], 10, "relu",
                        "bn" if bn else None, he_scale=1.0).to(device).train()
            idx = torch.randperm(len(x_tr))[:cfg["init_batch"]].to(x_tr.device)
            per_seed.append(layer_grad_norms(model, x_tr[idx], y_tr[idx]))
        sq = np.exp(np.mean(np.log(per_seed), 0))   # geometric mean over seeds
        out["bn" if bn else "no_bn"] = {"sq_norms": sq.tolist(),
                                        "factor_sq": growth_factor(sq, cfg["fit_skip"]),
                                        "factor_sq_per_seed": [growth_factor(p, cfg["fit_skip"])
                                                               for p in per_seed]}
    out["yang_relu_factor_sq"] = YANG_RELU_FACTOR
    return out


def _train_one(cfg, data, device, seed, bn, lr, init_scale=1.0, progress=False):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp(x_tr.shape[1], [cfg["sweep_width"]] * cfg["sweep_depth"], 10, "relu",
                "bn" if bn else None, he_scale=1.0).to(device)
    with torch.no_grad():
        for lin in hidden_linears(model):
            lin.weight.mul_(init_scale)
    lins = hidden_linears(model)
    norms = []  # ||W_l|| of every hidden layer before the first step and after every NORM_EVERY-th

    def record(done, loss):
        if done % NORM_EVERY == 0:
            norms.append([float(lin.weight.detach().double().norm()) for lin in lins])

    losses = train_sgd(model, x_tr, y_tr, cfg["sweep_steps"], cfg["batch_size"], lr, seed=seed,
                       show=progress, hook=record)
    diverged = not np.isfinite(losses[-1])
    # A diverged run has no accuracy (None, drawn as a marker, never as 0 %).
    acc = None if diverged else accuracy(model.eval(), x_te, y_te).item()
    tail = losses[-20:]
    return {"bn": bn, "lr": lr, "init_scale": init_scale, "test_accuracy": acc, "diverged": diverged,
            "final_loss": float(np.mean(tail)) if not diverged else None, "loss_curve": losses[::5],
            "weight_norms": norms, "weight_norms_every": NORM_EVERY}


def _effective_lr(cfg, data, device, seed):
    """Scale invariance measured: rescale one layer's weights by c; then plain SGD's norm growth."""
    x_tr, y_tr = data[0], data[1]
    torch.manual_seed(seed)
    model = mlp(x_tr.shape[1], [cfg["sweep_width"]] * cfg["sweep_depth"], 10,
                "relu", "bn", he_scale=1.0).to(device).train()
    lin = hidden_linears(model)[1]
    w0 = lin.weight.detach().clone()
    xb, yb = x_tr[:cfg["batch_size"]], y_tr[:cfg["batch_size"]]
    rows = []
    for c in cfg["scales"]:
        with torch.no_grad():
            lin.weight.copy_(c * w0)
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        g = lin.weight.grad.detach().clone()
        w_new = lin.weight.detach() - cfg["norm_lr"] * g
        cos = torch.nn.functional.cosine_similarity(w_new.flatten().double(),
                                                    lin.weight.detach().flatten().double(), dim=0)
        angle = float(torch.arccos(cos.clamp(-1, 1)))
        # relative step ||lr g|| / ||W||: with g orthogonal to W, tan(angle) of the step
        step = cfg["norm_lr"] * float(g.double().norm() / lin.weight.detach().double().norm())
        rows.append({"scale": c, "loss": loss.item(), "grad_norm": float(g.norm()), "angle": angle,
                     "relative_step": step,
                     "cos_w_grad": float(torch.nn.functional.cosine_similarity(
                         g.flatten().double(), lin.weight.detach().flatten().double(), dim=0))})
    # plain SGD without weight decay: the weight norm of a scale-invariant layer can only grow
    torch.manual_seed(seed)
    model = mlp(x_tr.shape[1], [cfg["sweep_width"]] * cfg["sweep_depth"], 10,
                "relu", "bn", he_scale=1.0).to(device)
    lin = hidden_linears(model)[1]
    norms = []  # before the first step, then after each
    train_sgd(model, x_tr, y_tr, cfg["norm_steps"], cfg["batch_size"], cfg["norm_lr"],
              momentum=0.0, seed=seed,
              hook=lambda done, loss: norms.append(float(lin.weight.detach().norm())))
    eff = [cfg["norm_lr"] / n ** 2 for n in norms]
    return {"rescale": rows, "grad_slope": log_slope([r["scale"] for r in rows], [r["grad_norm"] for r in rows]),
            "angle_slope": log_slope([r["scale"] for r in rows], [r["angle"] for r in rows]),
            "step_slope": log_slope([r["scale"] for r in rows], [r["relative_step"] for r in rows]),
            "weight_norms": norms, "effective_lr": eff}


def run(cfg, device, seed, progress):
    """Gradients at init, lr and init-scale sweeps, and the effective learning rate."""
    data = load_dataset(cfg["dataset"], seed=seed, device=device)
    lr_sweep = [_train_one(cfg, data, device, seed, bn, cfg["base_lr"] * f, progress=progress)
                for bn in (True, False) for f in cfg["lr_factors"]]
    init_sweep = [_train_one(cfg, data, device, seed, bn, cfg["base_lr"], init_scale=s, progress=progress)
                  for bn in (True, False) for s in cfg["init_scales"]]
    return {"at_init": _at_init(cfg, data, device, seed), "lr_sweep": lr_sweep,
            "init_sweep": init_sweep, "effective_lr": _effective_lr(cfg, data, device, seed)}


def _sweep_figure(rows, xkey, xlabel, title):
    """Test accuracy against xkey, with and without BN; a diverged run has no accuracy, so it is
    a cross in the strip above 100 %, not a point at 0 % (which would read as below chance)."""
    fig, ax = plotting.subplots()
    for bn in (True, False):
        mine = sorted((r for r in rows if r["bn"] == bn), key=lambda r: r[xkey])
        color, name = plotting.COLORS["bn" if bn else "no_bn"], "BN" if bn else "no BN"
        acc = [math.nan if r["diverged"] else 100 * r["test_accuracy"] for r in mine]
        ax.semilogx([r[xkey] for r in mine], acc, "o-", color=color, label=name)
        gone = [r[xkey] for r in mine if r["diverged"]]
        if gone:
            ax.semilogx(gone, [DIVERGED_Y] * len(gone), "X", color=color, ms=11, ls="none",
                        label=f"{name}: diverged")
    ax.axhspan(101.5, 112, color=plotting.COLORS["reference"], alpha=0.12, lw=0)
    ax.text(0.01, DIVERGED_Y, "diverged", transform=ax.get_yaxis_transform(), va="center",
            fontsize="small", color=plotting.COLORS["reference"])
    ax.axhline(10, color=plotting.COLORS["reference"], ls=":", lw=1.5, label="chance (10 classes)")
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    plotting.ticks_at(ax, [r[xkey] for r in rows])
    fig.legend(loc="outside lower center", ncols=3)  # below the axes: inside, a curve crosses it
    plotting.label(ax, xlabel, "test accuracy (%)", title)
    return fig


def lr_norm_rows(results):
    """The BN runs of the lr sweep with weight norms, and where they come from: the sweep itself,
    or, for a run recorded before the sweep recorded norms, the rerun stored with it
    (metrics["lr_sweep_rerun"]: same configuration and seed, rerun later; see its "note")."""
    m, prof = results["metrics"], results["profile"]
    if "lr_sweep_rerun" in m:
        return m["lr_sweep_rerun"]["rows"], f"{prof}, rerun"
    return [r for r in m["lr_sweep"] if r["bn"]], prof


# Where a diverged run is drawn: in a strip above the 0-100 % accuracy scale.
DIVERGED_Y = 107


def figures(results):
    """Six one-panel parts, each beside its paragraph in the chapter: at_init (norms vs layer),
    lr_sweep, lr_weight_norms (BN weight norms in the lr sweep), init_sweep, rescale (one layer's
    weights scaled by c), weight_norm (plain SGD)."""
    m, cfg, prof = results["metrics"], results["config"], results["profile"]
    figs = {}
    fig, ax = plotting.subplots(figsize=(plotting.WIDTH, 1.3 * plotting.HEIGHT))  # legend below
    for key in ("bn", "no_bn"):
        sq = m["at_init"][key]["sq_norms"]
        ax.semilogy(range(1, len(sq) + 1), sq, "o-", color=plotting.COLORS[key], ms=3,
                    label=f"{'BN' if key == 'bn' else 'no BN'}: x{m['at_init'][key]['factor_sq']:.2f} per layer")
    sq = m["at_init"]["bn"]["sq_norms"]
    ref = [sq[-1] * YANG_RELU_FACTOR ** (len(sq) - l) for l in range(1, len(sq) + 1)]
    ax.semilogy(range(1, len(sq) + 1), ref, "--", color=plotting.COLORS["reference"],
                label="x pi/(pi-1) per layer (Yang et al., wide limit)")
    fig.legend(loc="outside lower center")  # inside, the dashed line crosses it
    plotting.label(ax, "hidden layer l", "squared norm of dl/dW_l", f"At initialization ({prof})")
    figs["at_init"] = fig
    figs["lr_sweep"] = _sweep_figure(m["lr_sweep"], "lr", "learning rate",
                                     f"Learning rate, depth {cfg['sweep_depth']} ({prof})")
    rows, where = lr_norm_rows(results)
    fig, ax = plotting.subplots()
    for r, color in zip(rows, plotting.PALETTE[3:]):
        w = np.array(r.get("weight_norms") or [[math.nan]])
        steps = np.arange(len(w)) * r.get("weight_norms_every", NORM_EVERY)
        ax.plot(steps, (w / w[0]).mean(1), color=color, label=f"lr {r['lr']:g}")
    if not all(r.get("weight_norms") for r in rows):
        ax.text(0.5, 0.5, "not recorded in this run", transform=ax.transAxes, ha="center")
    ax.legend()
    plotting.label(ax, "SGD step", "||W_l|| / ||W_l|| at step 0\n(mean over hidden layers)",
                   f"BN weight norms, lr sweep ({where})")
    figs["lr_weight_norms"] = fig
    figs["init_sweep"] = _sweep_figure(m["init_sweep"], "init_scale", "init scale (x He)",
                                       f"Init scale, depth {cfg['sweep_depth']} ({prof})")
    e = m["effective_lr"]
    sc = [r["scale"] for r in e["rescale"]]
    fig, ax = plotting.subplots(figsize=(plotting.WIDTH, 1.3 * plotting.HEIGHT))  # legend below
    ax.loglog(sc, [r["grad_norm"] for r in e["rescale"]], "o-", label="gradient norm ||g||")
    ax.loglog(sc, [r["relative_step"] for r in e["rescale"]], "s-", label="relative step ||lr g|| / ||W||")
    ax.loglog(sc, [r["angle"] for r in e["rescale"]], "o:", mfc="none", ms=11,
              label="angle of that step (rad)")
    plotting.ticks_at(ax, sc)
    fig.legend(loc="outside lower center")  # inside, the falling curves cross it
    plotting.label(ax, "weight scale c", "value (see legend)", f"Layer 2's weights times c ({prof})")
    figs["rescale"] = fig
    fig, ax = plotting.subplots()
    ax.plot(np.array(e["weight_norms"]) / e["weight_norms"][0], color=plotting.COLORS["bn"])
    plotting.label(ax, "SGD step", "||W_2|| / ||W_2|| at step 0",
                   f"Plain SGD, lr {cfg['norm_lr']:g} ({prof})")
    figs["weight_norm"] = fig
    return figs
