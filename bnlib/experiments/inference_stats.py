"""Train-time vs inference-time statistics: EMA momenta, cumulative average, PreciseBN, batch size, depth.

Book: book/experiments/inference_stats.ipynb
"""
import numpy as np
import torch

from bnlib import plotting, reference
from bnlib.experiments.bn_stats import (StatTrackers, layer_batch_stats, precise_stats,
                                        reference_stats, set_running_stats)
from bnlib.experiments.data import load_dataset
from bnlib.experiments.metrics import ema_lag, mean_error, relative_gap
from bnlib.experiments.models import bn_layers, mlp
from bnlib.experiments.training import (accuracy, batch_indices, frozen_buffers, train,
                                        train_sgd)

NAME = "inference_stats"
DESCRIPTION = "EMA vs cumulative vs PreciseBN statistics; train/eval gap vs batch size and depth"

PROFILES = {
    "quick": dict(dataset="digits", width=64, depth=3, batch_size=32, steps=400, lr=0.02,
                  lr_change_step=200, lr_change_factor=10.0, momenta=[0.01, 0.1, 0.5],
                  eval_every=10, batch_sizes=[2, 4, 8, 16, 32, 64, 128, 256], sweep_steps=150,
                  deep_depth=8, deep_steps=200, deep_eval_batch=8),
    # Full: the same data (accuracy thresholds keep their meaning), wider/deeper nets, longer runs.
    "full": dict(dataset="digits", width=256, depth=4, batch_size=32, steps=2000, lr=0.02,
                 lr_change_step=1000, lr_change_factor=10.0, momenta=[0.01, 0.1, 0.5],
                 eval_every=10, batch_sizes=[2, 4, 8, 16, 32, 64, 128, 256], sweep_steps=1000,
                 deep_depth=16, deep_steps=1000, deep_eval_batch=8),
}


# --- the experiment ---------------------------------------------------------------------------

def _estimators(cfg, data, device, seed, progress):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp(x_tr.shape[1], [cfg["width"]] * cfg["depth"], 10,
                "relu", "bn", he_scale=1.0).to(device)
    trackers = StatTrackers(model, cfg["momenta"])
    trace = {"step": [], **{k: [] for k in trackers.stats}}
    lr0, change, factor = cfg["lr"], cfg["lr_change_step"], cfg["lr_change_factor"]
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=0.9)

    def after(done, loss):
        if done > 0 and done % cfg["eval_every"] == 0:
            with trackers.paused():  # the whole training set as one batch, not a training step
                ref = layer_batch_stats(model, x_tr)
            ref = [(m, reference.unbiased(v, len(x_tr))) for m, v in ref]
            trace["step"].append(done)
            for k, st in trackers.stats.items():
                trace[k].append(mean_error(st, ref))
        for group in opt.param_groups:  # the learning rate of the next step
            group["lr"] = lr0 * (factor if done >= change else 1.0)

    train(model, opt, x_tr, y_tr, batch_indices(len(x_tr), cfg["batch_size"], cfg["steps"], seed,
                                                x_tr.device), hook=after, show=progress)
    trackers.remove()
    model.eval()
    final = {"torch running stats (ema 0.1)": accuracy(model, x_te, y_te).item()}
    candidates = dict(trackers.stats)
    candidates["precise (batches)"] = precise_stats(model, x_tr, cfg["batch_size"])
    full = layer_batch_stats(model, x_tr)
    candidates["precise (full set)"] = [(m, reference.unbiased(v, len(x_tr))) for m, v in full]
    ref = candidates["precise (full set)"]
    acc, err = {}, {}
    for k, st in candidates.items():
        set_running_stats(model, st)
        acc[k] = accuracy(model, x_te, y_te).item()
        err[k] = mean_error(st, ref)
    steps = np.array(trace["step"])
    before = (steps > change - change // 2) & (steps <= change)
    after = (steps > change) & (steps <= change + change // 2)
    window = {k: {"before": float(np.mean(np.array(trace[k])[before])),
                  "after": float(np.mean(np.array(trace[k])[after]))} for k in trackers.stats}
    return {"trace": trace, "test_accuracy": acc, "final_error": err, "error_window": window,
            "torch_layer_check": final, "lag_theory": {f"ema {p:g}": ema_lag(p) for p in cfg["momenta"]}}


def _mode_gap(model, x_te, y_te, b, seed):
    """Train-mode vs eval-mode outputs of model on the test set cut into batches of b (the
    remainder that does not fill a batch is left out): relative gap, both accuracies, and the
    fraction of examples whose predicted class differs. Running statistics are left unchanged."""
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(x_te), generator=gen).to(x_te.device)
    z_train, z_eval, ys = [], [], []
    with torch.no_grad():
        for i in range(0, len(x_te) - b + 1, b):
            idx = perm[i:i + b]
            model.eval()
            z_eval.append(model(x_te[idx]))
            model.train()
            with frozen_buffers(model):  # so that the next eval pass sees the same statistics
                z_train.append(model(x_te[idx]))
            ys.append(y_te[idx])
    zt, ze, ys = torch.cat(z_train), torch.cat(z_eval), torch.cat(ys)
    return {"batch_size": b, "gap": relative_gap(zt, ze),
            "acc_train_mode": (zt.argmax(1) == ys).float().mean().item(),
            "acc_eval_mode": (ze.argmax(1) == ys).float().mean().item(),
            "disagreement": (zt.argmax(1) != ze.argmax(1)).float().mean().item()}


def _batch_size_sweep(cfg, data, device, seed, progress):
    """Two sweeps over the batch size m. Trained at m: one network per m, each trained with
    batches of m for the same number of steps and evaluated in batches of m. Fixed network: the
    one trained at cfg["batch_size"], evaluated in batches of every m (the statistics' noise
    alone, without the small-m networks' undertraining)."""
    if cfg["batch_size"] not in cfg["batch_sizes"]:
        raise ValueError(f"batch_sizes must include batch_size ({cfg['batch_size']}) for the "
                         f"fixed-network sweep, got {cfg['batch_sizes']}")
    x_tr, y_tr, x_te, y_te = data
    rows, fixed = [], None
    for b in cfg["batch_sizes"]:
        torch.manual_seed(seed)
        model = mlp(x_tr.shape[1], [cfg["width"]] * cfg["depth"], 10,
                    "relu", "bn", he_scale=1.0).to(device)
        losses = train_sgd(model, x_tr, y_tr, cfg["sweep_steps"], b, cfg["lr"], seed=seed,
                           show=progress)
        rows.append({**_mode_gap(model, x_te, y_te, b, seed),
                     "final_loss": float(np.mean(losses[-20:]))})
        if b == cfg["batch_size"]:
            fixed = model
    return rows, [_mode_gap(fixed, x_te, y_te, b, seed) for b in cfg["batch_sizes"]]


def forward_both(model, x):
    """Walk the net twice, with batch statistics (train mode) and with running statistics (eval mode).

    Per BN layer, relative gaps (metrics.relative_gap) between BN outputs:
    compounded: the eval path's output against the train path's, each path fed by its own
      previous layers;
    local: the train path's input normalized with the running statistics against the same
      input normalized with its batch statistics;
    local_eval_input: the same comparison on the eval path's input, whose examples did not
      pass through any batch statistics upstream;
    and mean_offset: on the train path, |batch mean - running mean| / running std, averaged over
    channels (how far the batch's own mean is from the stored one).
    Returns {name: [one value per BN layer]}.
    """
    h_tr, h_ev = x, x
    out = {"compounded": [], "local": [], "local_eval_input": [], "mean_offset": []}
    with torch.no_grad():
        for mod in model.layers():
            if mod in bn_layers(model):
                w, b, eps = mod.weight.double(), mod.bias.double(), mod.eps
                rm, rv = mod.running_mean.double(), mod.running_var.double()
                norm = lambda h, m, v: (h.double() - m) / torch.sqrt(v + eps) * w + b  # noqa: E731
                mean, var = reference_stats(h_tr)
                out_tr, out_ev, out_local = norm(h_tr, mean, var), norm(h_ev, rm, rv), norm(h_tr, rm, rv)
                out["compounded"].append(relative_gap(out_ev, out_tr))
                out["local"].append(relative_gap(out_local, out_tr))
                out["local_eval_input"].append(relative_gap(out_ev, norm(h_ev, *reference_stats(h_ev))))
                out["mean_offset"].append(float(((mean - rm).abs() / torch.sqrt(rv)).mean()))
                h_tr, h_ev = out_tr.float(), out_ev.float()
            else:
                h_tr, h_ev = mod(h_tr), mod(h_ev)
    return out


def _depth(cfg, data, device, seed, progress):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp(x_tr.shape[1], [cfg["width"]] * cfg["deep_depth"], 10,
                "relu", "bn", he_scale=1.0).to(device)
    train_sgd(model, x_tr, y_tr, cfg["deep_steps"], cfg["batch_size"], cfg["lr"], seed=seed,
              show=progress)
    model.eval()
    b = cfg["deep_eval_batch"]
    per_batch = [forward_both(model, x_te[i:i + b]) for i in range(0, len(x_te) - b + 1, b)]
    return {"layer": list(range(1, cfg["deep_depth"] + 1)), "eval_batch": b,
            **{k: np.mean([p[k] for p in per_batch], 0).tolist() for k in per_batch[0]},
            "test_accuracy": accuracy(model, x_te, y_te).item()}


def run(cfg, device, seed, progress):
    """All three parts on one dataset."""
    data = load_dataset(cfg["dataset"], seed=seed, device=device)
    estimators = _estimators(cfg, data, device, seed, progress)
    sweep, fixed = _batch_size_sweep(cfg, data, device, seed, progress)
    return {"estimators": estimators, "batch_size_sweep": sweep, "fixed_network_sweep": fixed,
            "depth": _depth(cfg, data, device, seed, progress)}


def figures(results):
    """Four parts, one panel each: estimators (error over training), gap and accuracy (the batch
    size sweeps), depth (the mismatch layer by layer)."""
    m, cfg, tag = results["metrics"], results["config"], f"{results['profile']}, {results['device_name']}"
    figs = {}
    fig, ax = plotting.subplots()
    tr = m["estimators"]["trace"]
    for k in tr:
        if k != "step":
            ax.plot(tr["step"], tr[k], label=k)
    ax.axvline(cfg["lr_change_step"], ymax=0.65, color=plotting.COLORS["reference"], ls="--",
               label=f"lr x{cfg['lr_change_factor']:g}")  # stops below the legend
    ax.set_yscale("log")
    ax.legend(loc="upper left", ncols=2, fontsize="small")
    ax.set_ylim(top=ax.get_ylim()[1] * 30)  # headroom above the curves for the legend
    plotting.label(ax, "training step", "error of the stored statistics",
                   f"Running statistics lag the weights ({tag})")
    figs["estimators"] = fig
    rows, fixed = m["batch_size_sweep"], m["fixed_network_sweep"]
    bs = [r["batch_size"] for r in rows]
    fig, ax = plotting.subplots()
    ax.loglog(bs, [r["gap"] for r in rows], "o-", color=plotting.COLORS["bn"],
              label="one network per m, trained at m")
    ax.loglog([r["batch_size"] for r in fixed], [r["gap"] for r in fixed], "s--",
              color=plotting.PALETTE[4], label=f"one network, trained at m = {cfg['batch_size']}")
    ax.loglog(bs, [rows[-1]["gap"] * (bs[-1] / b) ** 0.5 for b in bs], ":",
              color=plotting.COLORS["reference"], label=r"$\propto m^{-1/2}$")
    plotting.ticks_at(ax, bs)
    ax.legend()
    plotting.label(ax, "batch size m (evaluation)", "output gap, train vs eval mode",
                   f"Output gap ({tag})")
    figs["gap"] = fig
    fig, ax = plotting.subplots()
    ax.semilogx(bs, [100 * r["acc_train_mode"] for r in rows], "o-", label="train mode (batch stats)")
    ax.semilogx(bs, [100 * r["acc_eval_mode"] for r in rows], "s-", label="eval mode (running stats)")
    plotting.ticks_at(ax, bs)
    ax.legend()
    plotting.label(ax, "batch size m", "test accuracy (%)",
                   f"One network per m: accuracy ({tag})")
    figs["accuracy"] = fig
    fig, ax = plotting.subplots()
    d = m["depth"]
    ax.plot(d["layer"], d["compounded"], "o-", label="compounded")
    ax.plot(d["layer"], d["local"], "s--", label="local, train-path input")
    ax.plot(d["layer"], d["local_eval_input"], "^:", label="local, eval-path input")
    ax.set_ylim(0, 1.6 * max(d["compounded"] + d["local_eval_input"]))  # room for the legend
    ax.legend(loc="upper left")
    plotting.label(ax, "BN layer", "gap after BN, train vs eval",
                   f"Mismatch through depth, batch {d['eval_batch']} ({tag})")
    figs["depth"] = fig
    return figs
