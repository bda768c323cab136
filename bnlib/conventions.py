"""What each framework's BN layer does, measured: the same stream of batches fed to PyTorch's,
bnlib's, Keras 3's and Flax's layers, and every convention inferred from what comes out.

Nothing is read from documentation: the momentum's meaning comes from the stored mean after one
and two steps, the place of epsilon from outputs on a channel whose variance (about 1e-8) is far
below epsilon, the variance that normalizes from the training output, the one that is stored
from the moving variance, and the eval output after N steps is compared with the formula those
conventions predict. Keras, Flax and JAX are imported inside the functions (bnlib imports
without them); a framework that is not installed gives a row saying so. TensorFlow's own rows
(`CITED`) are cited, not measured.
Book: book/experiments/variance_correction.ipynb
"""
import importlib.util
import os

import numpy as np

M, C = 4, 2          # batch size; channel 0 is ordinary data, channel 1 has a tiny variance
TINY = 1e-4          # channel 1's scale: variance ~1e-8, far below every default epsilon
RTOL = 1e-3          # candidates differ by 4/3 at least (m/(m-1), m = 4); float32 errors ~1e-6
FRAMEWORKS = ("torch.nn.BatchNorm1d", "bnlib.nn.BatchNorm1d", "keras.layers.BatchNormalization",
              "flax.linen.BatchNorm", "flax.nnx.BatchNorm")
# The stored variance second: the column that differs most, visible on a phone without scrolling.
COLUMNS = ("framework", "stores", "momentum weighs", "eps", "normalizes with", "eps added",
           "eval vs formula", "version", "source")
# TensorFlow's kernels are not installed with the book (they are large): these rows are cited.
CITED = (
    {"framework": "tf.keras 2.x, fused path", "cite": "keras2batchnorm",
     "momentum weighs": "old value: 0.99", "eps": "0.001", "normalizes with": "biased",
     "stores": "unbiased"},
    {"framework": "tf.keras 2.x, non-fused path", "cite": "keras2batchnorm",
     "momentum weighs": "old value: 0.99", "eps": "0.001", "normalizes with": "biased",
     "stores": "biased"},
    {"framework": "TensorFlow FusedBatchNorm op", "cite": "tensorflowfusedbn",
     "momentum weighs": "new batch: 1.0 (no average)", "eps": "0.0001", "normalizes with": "biased",
     "stores": "unbiased"},
)


def stream(n, seed=0):
    """n float32 batches of shape (M, C): channel 0 is 3 + 2 N(0, 1), channel 1 is TINY N(0, 1)."""
    rng = np.random.default_rng(seed)
    scale = np.array([2.0, TINY], dtype=np.float32)
    shift = np.array([3.0, 0.0], dtype=np.float32)
    return [(shift + scale * rng.standard_normal((M, C))).astype(np.float32) for _ in range(n)]


class _Layer:
    """One framework's layer behind four calls: train(x), eval(x), stats() -> (mean, var)."""

    def __init__(self, momentum, eps, train, eval, stats):
        self.momentum, self.eps = float(momentum), float(eps)
        self.train, self.eval, self.stats = train, eval, stats


def _torch(cls, momentum):
    import torch
    bn = cls(C) if momentum is None else cls(C, momentum=momentum)

    def run(x, training):
        bn.train(training)
        with torch.no_grad():
            return bn(torch.from_numpy(x)).numpy()

    return _Layer(bn.momentum, bn.eps, lambda x: run(x, True), lambda x: run(x, False),
                  lambda: (bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()))


def _keras(momentum=None):
    keras = import_keras()
    bn = keras.layers.BatchNormalization(**({} if momentum is None else {"momentum": momentum}))
    to_np = keras_numpy
    return _Layer(bn.momentum, bn.epsilon, lambda x: to_np(bn(x, training=True)),
                  lambda x: to_np(bn(x, training=False)),
                  lambda: (to_np(bn.moving_mean), to_np(bn.moving_variance)))


def _linen(momentum=None):
    jax, linen = import_jax(), importlib.import_module("flax.linen")
    bn = linen.BatchNorm(**({} if momentum is None else {"momentum": momentum}))
    state = {}

    def train(x):
        if not state:
            state.update(bn.init(jax.random.key(0), x, use_running_average=True))
        y, new = bn.apply(state, x, use_running_average=False, mutable=["batch_stats"])
        state.update(new)
        return np.asarray(y)

    return _Layer(bn.momentum, bn.epsilon, train,
                  lambda x: np.asarray(bn.apply(state, x, use_running_average=True)),
                  lambda: tuple(np.asarray(state["batch_stats"][k]) for k in ("mean", "var")))


def _nnx(momentum=None):
    import_jax()
    nnx = importlib.import_module("flax.nnx")
    bn = nnx.BatchNorm(C, rngs=nnx.Rngs(0), **({} if momentum is None else {"momentum": momentum}))

    def run(x, use_running_average):
        return np.asarray(bn(x, use_running_average=use_running_average))

    return _Layer(bn.momentum, bn.epsilon, lambda x: run(x, False), lambda x: run(x, True),
                  lambda: (np.asarray(bn.mean[...]), np.asarray(bn.var[...])))


def import_keras():
    """Keras 3 on the torch backend unless KERAS_BACKEND says otherwise (set before import).
    Keras imports JAX where it is installed, so JAX's platform is settled first (import_jax)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return importlib.import_module("keras")


def keras_numpy(value):
    """A Keras tensor or variable as a NumPy array (a torch-backend tensor through torch itself:
    NumPy's conversion of it warns under NumPy 2)."""
    value = getattr(value, "value", value)
    return value.detach().cpu().numpy().copy() if hasattr(value, "detach") else np.array(value)


def import_jax():
    """JAX on the CPU unless JAX_PLATFORMS says otherwise: on a GPU machine it would otherwise
    reserve most of the GPU's memory, which the torch code beside it needs."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return importlib.import_module("jax")


def _factory(framework):
    if framework.startswith(("torch.", "bnlib.")):
        import torch
        from bnlib import nn as bnn
        cls = torch.nn.BatchNorm1d if framework.startswith("torch.") else bnn.BatchNorm1d
        return lambda momentum=None: _torch(cls, momentum)
    return {"keras.layers.BatchNormalization": _keras, "flax.linen.BatchNorm": _linen,
            "flax.nnx.BatchNorm": _nnx}[framework]


def version(framework):
    """The framework's version as its row shows it, or None where it is not installed."""
    from importlib.metadata import version as dist
    need = {"torch": ["torch"], "bnlib": ["bnlib", "torch"], "keras": ["keras"],
            "flax": ["flax", "jax"]}[framework.split(".")[0]]
    if any(importlib.util.find_spec(n) is None for n in need):
        return None
    text = ", ".join(f"{n} {dist(n)}" for n in need)
    if framework.startswith("keras"):
        text += f" ({import_keras().backend.backend()} backend)"
    return text


def _which(value, candidates):
    """The one label whose candidate array matches value within RTOL, else '?'."""
    value = np.asarray(value, dtype=np.float64)
    hits = [k for k, c in candidates.items()
            if np.allclose(value, c, rtol=RTOL, atol=RTOL * np.abs(c).max())]
    return hits[0] if len(hits) == 1 else "?"


def _moments(x):
    x = x.astype(np.float64)
    return x.mean(0), x.var(0), x.var(0, ddof=1)


def measure(framework, steps=10, seed=0):
    """One row of the table for `framework` (one of FRAMEWORKS): what its layer did with the
    batches of stream(steps + 1, seed). Keys as in COLUMNS, plus the raw numbers behind them."""
    row = dict.fromkeys(COLUMNS, "")
    row.update(framework=framework, source="measured", version=version(framework))
    if row["version"] is None:
        row.update(version="not installed", source="not measured")
        return row
    row.update(infer(_factory(framework), steps, seed))
    return row


def infer(make, steps=10, seed=0):
    """The conventions of the layers that make(momentum=None) builds (its default momentum where
    None), inferred from what they do with stream(steps + 1, seed). A layer has attributes
    momentum and eps and methods train(x), eval(x) (arrays of shape (M, C)) and stats() -> (the
    stored mean, the stored variance); gamma 1 and beta 0. Returns the row's measured cells."""
    xs = stream(steps + 1, seed)
    layer = make()
    p, eps = layer.momentum, layer.eps
    mu1, b1, u1 = _moments(xs[0])
    y1 = layer.train(xs[0])
    mean1, var1 = layer.stats()
    layer.train(xs[1])
    mean2, _ = layer.stats()
    # Stored means start at 0: after one step the mean is w mu_1, after two (1 - w) w mu_1 + w mu_2.
    w = float(mean1[0] / mu1[0])
    mu2 = _moments(xs[1])[0]
    ema = np.allclose(mean2, (1 - w) * mean1 + w * mu2, rtol=RTOL, atol=RTOL * TINY)
    weighs = _which([w], {"new batch": [p], "old value": [1 - p]}) if ema else "?"
    w_new = p if weighs == "new batch" else 1 - p
    x0 = xs[0].astype(np.float64) - mu1
    normalizes = _which(y1[:, 0], {"biased": x0[:, 0] / np.sqrt(b1[0] + eps),
                                   "unbiased": x0[:, 0] / np.sqrt(u1[0] + eps)})
    v1 = b1[1] if normalizes != "unbiased" else u1[1]
    eps_train = _which(y1[:, 1], {"inside √": x0[:, 1] / np.sqrt(v1 + eps),
                                  "outside √": x0[:, 1] / (np.sqrt(v1) + eps)})
    # Stored variances start at 1: after one step (1 - w) + w v, v the stored kind of variance.
    stores = _which([(var1[0] - (1 - w_new)) / w_new], {"biased": [b1[0]], "unbiased": [u1[0]]})
    # Eps at inference: a layer that keeps only the newest batch (weight 1), so that channel 1's
    # stored variance is tiny; the eval output against both places, with the stats it stored.
    full = make(1.0 if weighs == "new batch" else 0.0)
    full.train(xs[0])
    rm, rv = (s.astype(np.float64) for s in full.stats())
    xe = xs[0][:, 1].astype(np.float64) - rm[1]
    eps_eval = _which(full.eval(xs[0])[:, 1], {"inside √": xe / np.sqrt(rv[1] + eps),
                                               "outside √": xe / (np.sqrt(rv[1]) + eps)})
    # Eval after `steps` steps against the formula the conventions above predict (gamma 1, beta 0).
    mean, var = np.zeros(C), np.ones(C)
    fresh = make()
    for x in xs[:steps]:
        fresh.train(x)
        mu, b, u = _moments(x)
        mean = (1 - w_new) * mean + w_new * mu
        var = (1 - w_new) * var + w_new * (u if stores == "unbiased" else b)
    x_eval = xs[steps].astype(np.float64)
    divisor = np.sqrt(var) + eps if eps_eval == "outside √" else np.sqrt(var + eps)
    formula = (x_eval - mean) / divisor
    diff = float(np.abs(fresh.eval(xs[steps]) - formula).max())
    # What float rounding of the output scales with: |x| and |mean| over the divisor.
    scale = float(((np.abs(x_eval) + np.abs(mean)) / divisor).max())
    return {"momentum weighs": f"{weighs}: {p:g}", "eps": f"{eps:g}",
            "eps added": eps_train if eps_train == eps_eval else f"train {eps_train}, eval {eps_eval}",
            "normalizes with": normalizes, "stores": stores, "eval vs formula": f"{diff:.1e}",
            "raw": {"momentum": p, "eps": eps, "weight of new batch": w, "steps": steps,
                    "eval max abs diff": diff, "eval scale": scale}}


def measure_all(steps=10, seed=0):
    """measure() for every framework in FRAMEWORKS, then the CITED TensorFlow rows (each marked
    'cited', with TensorFlow's version where it is installed: those rows are still not measured)."""
    rows = [measure(f, steps, seed) for f in FRAMEWORKS]
    tf = importlib.util.find_spec("tensorflow")
    for c in CITED:
        row = dict.fromkeys(COLUMNS, "")
        row.update({k: v for k, v in c.items() if k in COLUMNS}, source=f"cited: {c['cite']}",
                   version="installed, not measured" if tf else "not installed")
        rows.append(row)
    return rows
