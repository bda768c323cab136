"""bnlib.conventions: the inference recovers every combination of conventions from a NumPy layer
built with them, and the live frameworks' rows say what their layers do."""
import importlib.util
import itertools

import numpy as np
import pytest

from bnlib import conventions

FLOAT32_UNIT = 2.0 ** -24   # float32 rounding, relative


class NumpyLayer:
    """A BN layer with chosen conventions (float64), for infer() to find out."""

    def __init__(self, momentum, eps, weighs_new, eps_inside, normalize_unbiased, store_unbiased):
        self.momentum, self.eps = momentum, eps
        self.w = momentum if weighs_new else 1 - momentum
        self.inside, self.norm_unb, self.store_unb = eps_inside, normalize_unbiased, store_unbiased
        self.mean, self.var = np.zeros(conventions.C), np.ones(conventions.C)

    def _normalize(self, x, mean, var):
        return (x - mean) / (np.sqrt(var + self.eps) if self.inside else np.sqrt(var) + self.eps)

    def train(self, x):
        x = x.astype(np.float64)
        mu, b, u = x.mean(0), x.var(0), x.var(0, ddof=1)
        self.mean = (1 - self.w) * self.mean + self.w * mu
        self.var = (1 - self.w) * self.var + self.w * (u if self.store_unb else b)
        return self._normalize(x, mu, u if self.norm_unb else b)

    def eval(self, x):
        return self._normalize(x.astype(np.float64), self.mean, self.var)

    def stats(self):
        return self.mean.copy(), self.var.copy()


@pytest.mark.parametrize("weighs_new, inside, norm_unb, store_unb",
                         list(itertools.product([True, False], repeat=4)))
def test_infer_recovers_each_convention(weighs_new, inside, norm_unb, store_unb):
    default = 0.1 if weighs_new else 0.99

    def make(momentum=None):
        return NumpyLayer(default if momentum is None else momentum, 1e-3, weighs_new, inside,
                          norm_unb, store_unb)

    row = conventions.infer(make, steps=6)
    assert row["momentum weighs"] == ("new batch: 0.1" if weighs_new else "old value: 0.99")
    assert row["eps"] == "0.001"
    assert row["eps added"] == ("inside √" if inside else "outside √")
    assert row["normalizes with"] == ("unbiased" if norm_unb else "biased")
    assert row["stores"] == ("unbiased" if store_unb else "biased")
    # float64 all through: the layer and the formula agree to rounding (1e-12 of the scale).
    assert row["raw"]["eval max abs diff"] < 1e-12 * row["raw"]["eval scale"]


def test_infer_says_so_when_nothing_fits():
    """A layer that keeps a cumulative average is no constant-weight EMA: its momentum is '?'."""

    class Cumulative(NumpyLayer):
        n = 0

        def train(self, x):
            self.n += 1
            self.w = 1 / self.n
            return super().train(x)

    row = conventions.infer(lambda momentum=None: Cumulative(0.1, 1e-5, True, True, False, True))
    assert row["momentum weighs"].startswith("?")


def test_stream_is_seeded_and_channel_1_tiny():
    a, b = conventions.stream(3, seed=1), conventions.stream(3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(x.dtype == np.float32 and x.shape == (conventions.M, conventions.C) for x in a)
    assert max(x[:, 1].var() for x in a) < 1e-3 * 1e-5   # far below the smallest default eps


def _live(framework):
    need = {"keras": "keras", "flax": "flax"}.get(framework.split(".")[0])
    if need and importlib.util.find_spec(need) is None:
        pytest.skip(f"{need} is not installed (pip install -e .[test] installs it)")
    return conventions.measure(framework, steps=10)


def _check_formula(row):
    # The formula runs in float64 on the float32 batches; the layer keeps float32 statistics:
    # each of the `steps` EMA updates rounds mean and var a few times (4 units of 2^-24, relative),
    # errors the output inherits at most in proportion to (|x| + |mean|) / sqrt(var + eps).
    raw = row["raw"]
    assert raw["eval max abs diff"] <= 4 * (raw["steps"] + 2) * FLOAT32_UNIT * raw["eval scale"], raw


@pytest.mark.parametrize("framework", ["torch.nn.BatchNorm1d", "bnlib.nn.BatchNorm1d"])
def test_torch_and_bnlib_rows(framework):
    row = _live(framework)
    assert row["source"] == "measured" and "torch 2." in row["version"]
    assert (row["momentum weighs"], row["eps"], row["eps added"]) == ("new batch: 0.1", "1e-05", "inside √")
    assert (row["normalizes with"], row["stores"]) == ("biased", "unbiased")
    _check_formula(row)


def test_keras_row():
    row = _live("keras.layers.BatchNormalization")
    assert row["version"].startswith("keras 3.") and "backend" in row["version"]
    assert (row["momentum weighs"], row["eps"], row["eps added"]) == ("old value: 0.99", "0.001", "inside √")
    assert (row["normalizes with"], row["stores"]) == ("biased", "biased")
    _check_formula(row)


@pytest.mark.parametrize("framework", ["flax.linen.BatchNorm", "flax.nnx.BatchNorm"])
def test_flax_rows(framework):
    row = _live(framework)
    assert row["version"].startswith("flax ") and "jax " in row["version"]
    assert (row["momentum weighs"], row["eps"], row["eps added"]) == ("old value: 0.99", "1e-05", "inside √")
    assert (row["normalizes with"], row["stores"]) == ("biased", "biased")
    _check_formula(row)


def test_missing_framework_gives_a_row(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "keras" else real(n, *a))
    row = conventions.measure("keras.layers.BatchNormalization")
    assert row["version"] == "not installed" and row["source"] == "not measured"
    assert set(conventions.COLUMNS) <= set(row)


def test_cited_rows_are_marked():
    cited = conventions.measure_all(steps=2)[len(conventions.FRAMEWORKS):]
    assert len(cited) == len(conventions.CITED)
    assert all(r["source"].startswith("cited: ") and r["eval vs formula"] == "" for r in cited)
