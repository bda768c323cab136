"""Small and non-i.i.d. normalisation batches: BN vs Batch Renorm vs GroupNorm vs LayerNorm.

Two sweeps on one MLP (Linear -> norm -> ReLU, twice, then a read-out), every arm trained on the
same minibatches from the same initial weights:

  micro   the gradient minibatch stays `batch` examples; BN and Batch Renorm normalise each
          consecutive group of g of them on its own (Ioffe 2017's "microbatches"), g from 2 to
          `batch`. GroupNorm and LayerNorm use no batch statistics, so g does not change them.
  noniid  minibatches of `batch` drawn from only k classes each (balanced), normalised whole.

Each run reports test accuracy in eval mode (running statistics) and in train mode (test batches
built the way training batches were: microbatches of g, or k classes per batch), and the mean
loss of the last 20 steps. Batch Renorm's r_max, d_max follow bnlib.renorm.ramp over training.
Book: book/experiments/small_batches.ipynb
"""
import numpy as np
import torch
from torch import nn

from bnlib import plotting
from bnlib.experiments.data import load_dataset
from bnlib.experiments.training import (accuracy, batch_indices, frozen_buffers, train)

NAME = "small_batches"
DESCRIPTION = ("BN vs Batch Renorm vs GroupNorm vs LayerNorm: normalisation batches of 2..64, "
               "and minibatches of few classes")

ARMS = ("bn", "renorm", "gn", "ln")
LABELS = {"bn": "BN", "renorm": "Batch Renorm", "gn": "GroupNorm", "ln": "LayerNorm"}
COLORS = {"bn": plotting.COLORS["bn"], "renorm": plotting.PALETTE[3],
          "gn": plotting.PALETTE[4], "ln": plotting.PALETTE[5]}
BATCH_ARMS = ("bn", "renorm")   # the arms whose output depends on the other examples

PROFILES = {
    "quick": dict(dataset="digits", width=64, groups=8, batch=64, micro=[2, 4, 8, 16, 32, 64],
                  classes_per_batch=[2, 5], steps=400, lr=0.05, momentum=0.1, seeds=2,
                  ramp=[0.1, 0.5, 0.3], r_max=3.0, d_max=5.0),
    "full": dict(dataset="digits", width=128, groups=8, batch=64, micro=[2, 4, 8, 16, 32, 64],
                 classes_per_batch=[2, 5], steps=1500, lr=0.05, momentum=0.1, seeds=5,
                 ramp=[0.1, 0.5, 0.3], r_max=3.0, d_max=5.0),
}


class Micro(nn.Module):
    """In training, `layer` applied to each consecutive group of `group` examples on its own.

    Each group updates the running statistics, with the momentum lowered so that the
    batch // group updates of one step weigh as much as one update of `momentum` would:
    (1 - m_g) ** (batch / group) = 1 - momentum. In eval mode the layer sees the whole input.
    """

    def __init__(self, layer, group, batch, momentum=0.1):
        super().__init__()
        if group < 2 or batch % group:
            raise ValueError(f"group must be >= 2 and divide batch={batch}, got {group!r}")
        self.layer, self.group = layer, group
        layer.momentum = 1.0 - (1.0 - momentum) ** (group / batch)

    def forward(self, x):
        if not self.training or len(x) <= self.group:
            return self.layer(x)
        return torch.cat([self.layer(part) for part in x.split(self.group)])


def norm_layer(arm, width, cfg, group):
    """The normalisation of one hidden layer for `arm` (see ARMS); BN and Batch Renorm in Micro."""
    if arm == "gn":
        return nn.GroupNorm(cfg["groups"], width)
    if arm == "ln":
        return nn.LayerNorm(width)
    if arm == "bn":
        from bnlib.nn import BatchNorm1d
        layer = BatchNorm1d(width)
    elif arm == "renorm":
        from bnlib.renorm import BatchRenorm1d
        layer = BatchRenorm1d(width, r_max=cfg["r_max"], d_max=cfg["d_max"])
    else:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    return Micro(layer, group, cfg["batch"], cfg["momentum"])


def build(arm, in_features, out_features, cfg, group):
    w = cfg["width"]
    return nn.Sequential(nn.Linear(in_features, w, bias=False), norm_layer(arm, w, cfg, group),
                         nn.ReLU(), nn.Linear(w, w, bias=False), norm_layer(arm, w, cfg, group),
                         nn.ReLU(), nn.Linear(w, out_features))


def ramp_steps(cfg):
    """(warmup, full, d_full) in steps from cfg["ramp"], fractions of cfg["steps"]."""
    return tuple(int(f * cfg["steps"]) for f in cfg["ramp"])


def ramp_hook(model, cfg):
    """A training hook that sets every Batch Renorm layer's r_max, d_max for the next step:
    plain BN for the first `warmup` steps, then relaxed linearly (bnlib.renorm.ramp)."""
    from bnlib.renorm import ramp_limits
    warmup, full, d_full = ramp_steps(cfg)

    def hook(done, loss):
        ramp_limits(model, done, warmup, full, cfg["r_max"], cfg["d_max"], d_full)
    return hook


def noniid_indices(labels, k, batch, steps, seed=0):
    """(steps, batch) indices: each row drawn from k classes picked at random, as evenly as the
    batch allows (sizes differ by at most one), without repeats within a row."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ValueError(f"k must be in [1, {len(classes)}], got {k!r}")
    by_class = [np.flatnonzero(labels == c) for c in classes]
    sizes = [batch // k + (j < batch % k) for j in range(k)]
    if sizes[0] > min(len(b) for b in by_class):
        raise ValueError(f"batch={batch} over k={k} classes needs {sizes[0]} examples a class, "
                         f"the smallest class has {min(len(b) for b in by_class)}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(steps):
        picked = rng.choice(len(classes), size=k, replace=False)
        rows.append(np.concatenate([rng.choice(by_class[c], size=n, replace=False)
                                    for c, n in zip(picked, sizes)]))
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


@torch.no_grad()
def mode_accuracies(model, x, y, rows):
    """(train-mode, eval-mode) accuracy on the same test batches, each row of `rows` (indices
    into x) one batch; the running statistics are left as they were."""
    out = []
    with frozen_buffers(model):
        for mode in (True, False):
            model.train(mode)
            out.append(float(torch.stack([(model(x[r]).argmax(1) == y[r]).float().mean()
                                          for r in rows]).mean()))
    model.train()
    return tuple(out)


def run_one(arm, data, cfg, batches, test_rows, group, seed):
    """Train one arm on `batches`; its eval-mode and train-mode test accuracy and final loss."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = build(arm, x.shape[1], int(y.max()) + 1, cfg, group).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    losses = train(model, opt, x, y, batches, hook=ramp_hook(model, cfg) if arm == "renorm"
                   else None)
    train_mode, eval_mode = mode_accuracies(model, xt, yt, test_rows)
    return dict(acc_eval=float(accuracy(model, xt, yt)), acc_train_mode=train_mode,
                gap=train_mode - eval_mode, loss=float(np.mean(losses[-20:])))


def _mean_rows(per_seed):
    keys = per_seed[0].keys()
    return {**{k: float(np.mean([r[k] for r in per_seed])) for k in keys},
            "acc_eval_seeds": [r["acc_eval"] for r in per_seed]}


def run(config, device="cpu", seed=0, progress=False):
    data = load_dataset(config["dataset"], seed=seed, device=device)
    x, y, xt, yt = data
    b, steps = config["batch"], config["steps"]
    if b not in config["micro"]:  # the i.i.d. reference of the non-i.i.d. sweep and the figures
        raise ValueError(f"micro must include batch ({b}), the whole minibatch, got "
                         f"{config['micro']}")
    n_test = len(xt) // b * b
    micro, noniid = [], []
    for g in config["micro"]:
        for arm in ARMS:
            if arm not in BATCH_ARMS and g != config["micro"][0]:  # g changes nothing for them
                micro.append({**next(r for r in micro if r["arm"] == arm), "group": g})
                continue
            per_seed = []
            for s in range(config["seeds"]):
                batches = batch_indices(len(x), b, steps, seed + s, device)
                test_rows = torch.randperm(len(xt), generator=torch.Generator().manual_seed(
                    seed + s))[:n_test].view(-1, b).to(device)
                per_seed.append(run_one(arm, data, config, batches, test_rows, g, seed + s))
            micro.append(dict(arm=arm, group=g, **_mean_rows(per_seed)))
    for k in config["classes_per_batch"]:
        for arm in ARMS:
            per_seed = []
            for s in range(config["seeds"]):
                batches = noniid_indices(y.cpu(), k, b, steps, seed + s).to(device)
                test_rows = noniid_indices(yt.cpu(), k, b, len(xt) // b, seed + s).to(device)
                per_seed.append(run_one(arm, data, config, batches, test_rows, b, seed + s))
            noniid.append(dict(arm=arm, classes=k, **_mean_rows(per_seed)))
    return dict(micro=micro, noniid=noniid)


def _rows(rows, arm):
    return [r for r in rows if r["arm"] == arm]


STYLES = {"bn": "o-", "renorm": "o-", "gn": "s--", "ln": "^:"}


def _draw(ax, xs, rows_of, key):
    """One line per arm of rows_of(arm) (values of `key`, in %) against xs. On a gap panel GN and
    LN are one line: they are the same function in both modes, so their gap is exactly 0."""
    arms = ARMS if key != "gap" else BATCH_ARMS
    for arm in arms:
        ax.plot(xs, [100 * r[key] for r in rows_of(arm)], STYLES[arm], color=COLORS[arm],
                label=LABELS[arm])
    if key == "gap":
        ax.plot(xs, [100 * r[key] for r in rows_of("gn")], "--", color=COLORS["gn"],
                label="GroupNorm, LayerNorm")


def figures(results):
    """Four parts, one panel each: accuracy and gap (against the normalisation batch g),
    noniid and noniid_gap (against the classes per minibatch, i.i.d. minibatches last)."""
    m, cfg = results["metrics"], results["config"]
    tag = f"{results['profile']}, {results['device_name']}"
    b, ks = cfg["batch"], cfg["classes_per_batch"]
    iid = {arm: next(r for r in m["micro"] if r["arm"] == arm and r["group"] == b) for arm in ARMS}
    accuracy_label, gap_label = "test accuracy, eval mode (%)", "train-mode minus eval-mode (points)"
    figs = {}
    for part, key, ylabel, title in (("accuracy", "acc_eval", accuracy_label, "Accuracy"),
                                     ("gap", "gap", gap_label, "Train/eval gap")):
        fig, ax = plotting.subplots()
        _draw(ax, cfg["micro"], lambda arm: _rows(m["micro"], arm), key)
        ax.set_xscale("log")
        plotting.ticks_at(ax, cfg["micro"])
        ax.legend()
        plotting.label(ax, f"normalisation group g (of a minibatch of {b})", ylabel,
                       f"{title} ({tag})")
        figs[part] = fig
    xs = list(range(len(ks) + 1))
    for part, key, ylabel, title in (("noniid", "acc_eval", accuracy_label, "Few classes"),
                                     ("noniid_gap", "gap", gap_label, "Train/eval gap")):
        fig, ax = plotting.subplots()
        _draw(ax, xs, lambda arm: _rows(m["noniid"], arm) + [iid[arm]], key)
        ax.set_xticks(xs, [str(k) for k in ks] + ["i.i.d."])
        ax.legend()
        plotting.label(ax, f"classes per minibatch of {b}", ylabel, f"{title} ({tag})")
        figs[part] = fig
    return figs
