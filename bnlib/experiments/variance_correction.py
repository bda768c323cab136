"""The unbiased variance correction m/(m-1): derived with SymPy, simulated, and measured in trained nets.

Book: book/experiments/variance_correction.ipynb
"""
import numpy as np
import torch

from bnlib import plotting, reference
from bnlib.experiments.bn_stats import eval_second_moments, precise_stats, set_running_stats
from bnlib.experiments.data import load_dataset
from bnlib.experiments.models import mlp
from bnlib.experiments.training import accuracy, train_sgd

NAME = "variance_correction"
DESCRIPTION = "E[sigma_B^2] = (m-1)/m sigma^2: simulation, and biased vs unbiased stored variance"

PROFILES = {
    "quick": dict(dataset="digits", sim_batch_sizes=[2, 3, 4, 8, 16, 32, 64, 128], sim_trials=20000,
                  batch_sizes=[2, 3, 4, 8, 32], width=64, depth=3, steps=250, lr=0.02),
    # Full: the same data (accuracy thresholds keep their meaning), more draws, more and bigger nets.
    "full": dict(dataset="digits", sim_batch_sizes=[2, 3, 4, 8, 16, 32, 64, 128, 256],
                 sim_trials=200000, batch_sizes=[2, 3, 4, 8, 16, 32, 64], width=256, depth=4,
                 steps=2000, lr=0.02),
}


# --- symbolic ---------------------------------------------------------------------------------

def expected_batch_variance():
    """E[sigma_B^2] for m iid values of mean mu and variance sigma^2, for symbolic m.

    Uses E[sigma_B^2] = E[x^2] - E[xbar^2] (the mean of squares minus the squared mean) and
    E[xbar^2] = mu^2 + Var(xbar), Var(xbar) = (1/m^2) sum_i sigma^2 by independence.
    Returns (expression, (m, mu, sigma)).
    """
    import sympy as sp
    m, i = sp.symbols("m i", integer=True, positive=True)
    mu, sigma = sp.Symbol("mu", real=True), sp.Symbol("sigma", positive=True)
    e_x2 = sigma**2 + mu**2
    var_mean = sp.Sum(sigma**2, (i, 1, m)).doit() / m**2
    e_xbar2 = mu**2 + var_mean
    return sp.simplify(e_x2 - e_xbar2), (m, mu, sigma)


def expected_batch_variance_normal(m):
    """The same expectation for a concrete m, with sympy.stats over m iid normal symbols."""
    import sympy as sp
    from sympy.stats import E, Normal
    if int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}")
    mu, sigma = sp.Symbol("mu", real=True), sp.Symbol("sigma", positive=True)
    xs = [Normal(f"x{k}", mu, sigma) for k in range(int(m))]
    xbar = sum(xs) / m
    return sp.simplify(E(sp.expand(sum((x - xbar) ** 2 for x in xs) / m))), (mu, sigma)


# --- simulation -------------------------------------------------------------------------------

def simulate(batch_sizes, trials, seed=0, sigma2=1.0):
    """Draw `trials` batches of m iid N(0, sigma2) values per m; summarize biased and unbiased estimates.

    Returns rows with m, mean of biased/sigma2, mean of unbiased/sigma2, their standard errors,
    the 5/50/95 % quantiles of biased/sigma2, the chi-square prediction of those quantiles and the
    fraction of simulated values below each predicted quantile.
    """
    from scipy.stats import chi2
    rng = np.random.default_rng(seed)
    rows = []
    for m in batch_sizes:
        if m < 2:
            raise ValueError(f"batch sizes must be at least 2, got {m}")
        x = rng.normal(0.0, np.sqrt(sigma2), size=(trials, m))
        biased = x.var(axis=1) / sigma2              # divide by m
        unb = reference.unbiased(biased, m)
        q = [0.05, 0.5, 0.95]
        theory_q = chi2.ppf(q, m - 1) / m
        rows.append({"m": m, "biased_mean": float(biased.mean()), "unbiased_mean": float(unb.mean()),
                     "biased_se": float(biased.std() / np.sqrt(trials)),
                     "unbiased_se": float(unb.std() / np.sqrt(trials)),
                     "theory_biased_mean": (m - 1) / m,
                     "quantiles": np.quantile(biased, q).tolist(),
                     # m * sigma_B^2 / sigma^2 is chi-square with m - 1 degrees of freedom
                     "theory_quantiles": theory_q.tolist(),
                     # fraction of batches below each predicted quantile: q if the prediction holds
                     "fraction_below_theory_quantiles": [float(np.mean(biased < t)) for t in theory_q],
                     "prob_below_half": float(np.mean(biased < 0.5))})
    return rows


# --- PyTorch, measured --------------------------------------------------------------------------

def torch_conventions():
    """Poke torch.nn.BatchNorm1d and report what it does (defaults, momentum, which variance where)."""
    x = torch.tensor([[1.0], [2.0], [4.0], [9.0]], dtype=torch.float64)   # mean 4, var 9.5 / 12.67
    m = x.shape[0]
    mean, biased = x.mean().item(), x.var(unbiased=False).item()
    unb = x.var(unbiased=True).item()
    bn = torch.nn.BatchNorm1d(1, dtype=torch.float64)
    y = bn(x).detach()
    rm, rv = bn.running_mean.item(), bn.running_var.item()
    p = bn.momentum
    y_biased = (x - mean) / np.sqrt(biased + bn.eps)
    y_unbiased = (x - mean) / np.sqrt(unb + bn.eps)
    cum = torch.nn.BatchNorm1d(1, momentum=None, dtype=torch.float64)
    cum(x), cum(2 * x)
    return {
        "default momentum": p,
        "default eps": bn.eps,
        "momentum is the weight of": ("the new batch" if np.isclose(rm, p * mean)
                                      else "the old value" if np.isclose(rm, (1 - p) * mean) else "?"),
        "training normalizes with": ("biased variance (divide by m)" if torch.allclose(y, y_biased)
                                     else "unbiased variance" if torch.allclose(y, y_unbiased) else "?"),
        "running_var receives": ("unbiased variance (m/(m-1))" if np.isclose(rv, (1 - p) + p * unb)
                                 else "biased variance" if np.isclose(rv, (1 - p) + p * biased) else "?"),
        "momentum=None means": ("cumulative average" if np.isclose(cum.running_mean.item(), 1.5 * mean)
                                else "?"),
        "m": m,
    }


# --- trained networks -------------------------------------------------------------------------

def _trained(cfg, data, device, seed, progress):
    x_tr, y_tr, x_te, y_te = data
    rows = []
    for m in cfg["batch_sizes"]:
        torch.manual_seed(seed)
        model = mlp(x_tr.shape[1], [cfg["width"]] * cfg["depth"], 10,
                    "relu", "bn", he_scale=1.0).to(device)
        train_sgd(model, x_tr, y_tr, cfg["steps"], m, cfg["lr"], seed=seed, show=progress)
        row = {"m": m}
        for name, unb in (("unbiased", True), ("biased", False)):
            set_running_stats(model, precise_stats(model, x_tr, m, unbiased_var=unb))
            row[f"acc_{name}"] = accuracy(model.eval(), x_te, y_te).item()
            row[f"second_moment_{name}"] = eval_second_moments(model, x_tr)
        rows.append(row)
    return rows


def run(cfg, device, seed, progress):
    """Simulation of the estimator, then trained nets with either stored variance."""
    data = load_dataset(cfg["dataset"], seed=seed, device=device)
    return {"simulation": simulate(cfg["sim_batch_sizes"], cfg["sim_trials"], seed=seed),
            "trained": _trained(cfg, data, device, seed, progress)}


def figures(results):
    """Three parts, one panel each: simulation (the estimator's distribution vs m), and for the
    trained networks second_moment (eval-mode E[x_hat^2] at layer 1) and accuracy."""
    m, tag = results["metrics"], f"{results['profile']}, {results['device_name']}"
    figs = {}
    fig, ax = plotting.subplots()
    sim = m["simulation"]
    ms = [r["m"] for r in sim]
    ax.semilogx(ms, [r["biased_mean"] for r in sim], "o", color=plotting.COLORS["bn"], label="mean of biased")
    ax.semilogx(ms, [r["unbiased_mean"] for r in sim], "s", color=plotting.COLORS["noisy_bn"],
                label="mean of unbiased")
    ax.semilogx(ms, [(k - 1) / k for k in ms], "-", color=plotting.COLORS["reference"], label="(m-1)/m")
    lo, hi = [r["quantiles"][0] for r in sim], [r["quantiles"][2] for r in sim]
    ax.fill_between(ms, lo, hi, alpha=0.2, color=plotting.COLORS["bn"], label="biased, 5-95 %")
    plotting.ticks_at(ax, ms)
    ax.set_ylim(0, 1.35 * max(hi))  # headroom above the band for the legend
    ax.legend(loc="upper right", ncols=2)
    plotting.label(ax, "batch size m", "estimate / true variance", f"Batch variance estimator ({tag})")
    figs["simulation"] = fig
    tr = m["trained"]
    bs = [r["m"] for r in tr]
    fig, a1 = plotting.subplots()
    fig2, a2 = plotting.subplots()
    for name, color in (("unbiased", plotting.COLORS["bn"]), ("biased", plotting.COLORS["no_bn"])):
        a1.semilogx(bs, [r[f"second_moment_{name}"][0] for r in tr], "o-", color=color, label=name)
        a2.semilogx(bs, [100 * r[f"acc_{name}"] for r in tr], "o-", color=color, label=name)
    plotting.ticks_at(a1, bs), plotting.ticks_at(a2, bs)
    a1.axhline(1.0, color=plotting.COLORS["reference"], ls="--", lw=2.5, zorder=0,
               label="1 (every training batch)")
    a1.legend(), a2.legend()
    plotting.label(a1, "training batch size m", r"eval-mode mean of $\hat{x}^2$, layer 1",
                   f"Second moment at inference ({tag})")
    plotting.label(a2, "training batch size m", "test accuracy (%)", f"Accuracy ({tag})")
    figs["second_moment"], figs["accuracy"] = fig, fig2
    return figs
