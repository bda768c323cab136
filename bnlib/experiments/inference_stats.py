"""Train-time vs inference-time statistics: EMA momenta, cumulative average, PreciseBN, batch size, depth."""
import numpy as np
import torch

from bnlib import plotting, reference
from bnlib.experiments.common import cpu_threads, load_dataset
from bnlib.experiments.models import bn_layers, mlp
from bnlib.experiments.train import accuracy, frozen_buffers, train

NAME = "inference_stats"
DESCRIPTION = "EMA vs cumulative vs PreciseBN statistics; train/eval gap vs batch size and depth"
DATASET = "digits"

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


# --- metrics (tested in tests/test_experiments_part2.py) ------------------------------------

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


def relative_gap(a, b):
    """Mean over rows of ||a_i - b_i|| / ||b_i||: how far outputs a are from outputs b."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).mean())


# --- helpers ----------------------------------------------------------------------------------

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


def reference_stats(x):
    """(mean, biased var) per channel of a (N, C) tensor, in float64."""
    x = x.detach().double()
    return x.mean(0), x.var(0, unbiased=False)


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
    for b, (mean, var) in zip(bn_layers(model), stats):
        b.running_mean.copy_(torch.as_tensor(mean, dtype=b.running_mean.dtype))
        b.running_var.copy_(torch.as_tensor(var, dtype=b.running_var.dtype))


class StatTrackers:
    """EMA (several momenta) and cumulative averages of each BN layer's batch statistics, updated by hooks."""

    def __init__(self, model, momenta):
        self.layers, self.momenta, self.count = bn_layers(model), list(momenta), 0
        c = [b.num_features for b in self.layers]
        keys = [f"ema {p:g}" for p in self.momenta] + ["cumulative"]
        self.stats = {k: [(np.zeros(n), np.ones(n)) for n in c] for k in keys}
        self.hooks = [b.register_forward_pre_hook(self._hook(l)) for l, b in enumerate(self.layers)]

    def _hook(self, l):
        def hook(mod, inp):
            if not mod.training:
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

    def remove(self):
        for h in self.hooks:
            h.remove()


def mean_error(stats, ref):
    """stat_error averaged over layers."""
    return float(np.mean([stat_error(m, v, rm, rv) for (m, v), (rm, rv) in zip(stats, ref)]))


# --- the experiment ---------------------------------------------------------------------------

def _estimators(cfg, data, device, seed, progress):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp(x_tr.shape[1], [cfg["width"]] * cfg["depth"], 10,
                "relu", "bn", he_scale=1.0).to(device)
    trackers = StatTrackers(model, cfg["momenta"])
    trace = {"step": [], **{k: [] for k in trackers.stats}}
    lr0, change, factor = cfg["lr"], cfg["lr_change_step"], cfg["lr_change_factor"]

    def callback(step, model, loss):
        if (step + 1) % cfg["eval_every"] == 0:
            ref = layer_batch_stats(model, x_tr)   # the whole training set as one batch
            ref = [(m, reference.unbiased(v, len(x_tr))) for m, v in ref]
            trace["step"].append(step + 1)
            for k, st in trackers.stats.items():
                trace[k].append(mean_error(st, ref))

    train(model, x_tr, y_tr, cfg["steps"], cfg["batch_size"], lr0, seed=seed,
          lr_fn=lambda s: lr0 * (factor if s >= change else 1.0), callback=callback, show=progress)
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
        losses = train(model, x_tr, y_tr, cfg["sweep_steps"], b, cfg["lr"], seed=seed, show=progress)
        rows.append({**_mode_gap(model, x_te, y_te, b, seed),
                     "final_loss": float(np.mean(losses[-20:]))})
        if b == cfg["batch_size"]:
            fixed = model
    return rows, [_mode_gap(fixed, x_te, y_te, b, seed) for b in cfg["batch_sizes"]]


def forward_both(model, x):
    """Walk the net twice, with batch statistics (train mode) and with running statistics (eval mode).

    Returns per BN layer the relative gap between the two paths' BN outputs (compounded), and the
    gap when the eval-mode normalization is applied to the train-mode input of that layer (local).
    """
    h_tr, h_ev, compounded, local = x, x, [], []
    with torch.no_grad():
        for mod in model.layers():
            if mod in bn_layers(model):
                w, b, eps = mod.weight, mod.bias, mod.eps
                mean, var = reference_stats(h_tr)
                norm = lambda h, m, v: ((h.double() - m) / torch.sqrt(v + eps) * w.double() + b.double())  # noqa: E731
                rm, rv = mod.running_mean.double(), mod.running_var.double()
                out_tr, out_ev, out_local = norm(h_tr, mean, var), norm(h_ev, rm, rv), norm(h_tr, rm, rv)
                compounded.append(relative_gap(out_ev, out_tr))
                local.append(relative_gap(out_local, out_tr))
                h_tr, h_ev = out_tr.float(), out_ev.float()
            else:
                h_tr, h_ev = mod(h_tr), mod(h_ev)
    return compounded, local


def _depth(cfg, data, device, seed, progress):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp(x_tr.shape[1], [cfg["width"]] * cfg["deep_depth"], 10,
                "relu", "bn", he_scale=1.0).to(device)
    train(model, x_tr, y_tr, cfg["deep_steps"], cfg["batch_size"], cfg["lr"], seed=seed, show=progress)
    model.eval()
    b = cfg["deep_eval_batch"]
    comp, loc = [], []
    for i in range(0, len(x_te) - b + 1, b):
        c, l = forward_both(model, x_te[i:i + b])
        comp.append(c), loc.append(l)
    return {"layer": list(range(1, cfg["deep_depth"] + 1)), "compounded": np.mean(comp, 0).tolist(),
            "local": np.mean(loc, 0).tolist(), "eval_batch": b,
            "test_accuracy": accuracy(model, x_te, y_te).item()}


def run(cfg, device, seed, progress):
    """All three parts on one dataset."""
    data = load_dataset(cfg["dataset"], seed=seed, device=device)
    with cpu_threads("cpu", threads=1):  # one torch CPU thread, whatever the device
        estimators = _estimators(cfg, data, device, seed, progress)
        sweep, fixed = _batch_size_sweep(cfg, data, device, seed, progress)
        return {"estimators": estimators, "batch_size_sweep": sweep, "fixed_network_sweep": fixed,
                "depth": _depth(cfg, data, device, seed, progress)}


def plot(results, out_dir):
    """Three figures: estimator error over training, the batch-size sweep, mismatch vs depth."""
    m, cfg, tag = results["metrics"], results["config"], f"{results['profile']}, {results['device_name']}"
    plotting.use_style()
    paths = []
    fig, ax = plotting.subplots()
    tr = m["estimators"]["trace"]
    for k in tr:
        if k != "step":
            ax.plot(tr["step"], tr[k], label=k)
    ax.axvline(cfg["lr_change_step"], color=plotting.COLORS["reference"], ls="--",
               label=f"lr x{cfg['lr_change_factor']:g}")
    ax.set_yscale("log")
    fig.legend(loc="outside right center")  # beside the axes: inside, it hides the curves' ends
    plotting.label(ax, "training step", "stored vs current statistics (relative error)",
                   f"Running statistics lag the weights ({tag})")
    paths.append(plotting.save(fig, out_dir / f"inference_stats-{results['profile']}-estimators.png"))
    fig, (a1, a2) = plotting.subplots(1, 2, figsize=(10, 4))
    rows = m["batch_size_sweep"]
    bs = [r["batch_size"] for r in rows]
    a1.loglog(bs, [r["gap"] for r in rows], "o-", color=plotting.COLORS["bn"],
              label="trained at m (one network per m)")
    if "fixed_network_sweep" in m:  # runs recorded before it was added lack it
        fixed = m["fixed_network_sweep"]
        a1.loglog([r["batch_size"] for r in fixed], [r["gap"] for r in fixed], "s--",
                  color=plotting.PALETTE[4], label=f"one network trained at m = {cfg['batch_size']}")
    a1.legend()
    plotting.label(a1, "batch size m (evaluation)", "train vs eval output gap (relative)", "Output gap")
    a2.semilogx(bs, [100 * r["acc_train_mode"] for r in rows], "o-", label="train mode (batch stats)")
    a2.semilogx(bs, [100 * r["acc_eval_mode"] for r in rows], "s-", label="eval mode (running stats)")
    plotting.ticks_at(a1, bs), plotting.ticks_at(a2, bs)  # a tick at every batch size tested
    a2.legend()
    plotting.label(a2, "batch size m", "test accuracy (%)", f"Accuracy ({tag})")
    paths.append(plotting.save(fig, out_dir / f"inference_stats-{results['profile']}-batch_size.png"))
    fig, ax = plotting.subplots()
    d = m["depth"]
    ax.plot(d["layer"], d["compounded"], "o-", label="compounded (eval path from the input)")
    ax.plot(d["layer"], d["local"], "s--", label="local (same input, running stats)")
    ax.legend()
    plotting.label(ax, "BN layer", "train vs eval gap after BN (relative)",
                   f"Mismatch through depth, batch {d['eval_batch']} ({tag})")
    paths.append(plotting.save(fig, out_dir / f"inference_stats-{results['profile']}-depth.png"))
    import matplotlib.pyplot as plt
    plt.close("all")
    return paths
