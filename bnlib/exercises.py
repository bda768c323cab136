"""Graders for "implement it yourself" exercises: your NumPy function against bnlib.reference.

check_forward, check_backward, check_inference and check_jacobian (see each for the signature
your function must have) run it on several shapes and edge cases (m = 2, 3-D and 4-D inputs, a
large offset, a constant channel, a large eps), print a one-line verdict and return it. A wrong
answer raises WrongAnswer (an AssertionError) naming the case, the output, the largest error and,
where the error matches a typical mistake, a hint. Inputs are float64, channel axis 1.
"""
import numpy as np

from bnlib import reference as R
from bnlib.grading import Case, Verdict, WrongAnswer, grade, kappa  # noqa: F401 (re-exported)


def _batches(rng):
    """(name, x, eps) per case; the large eps comes before the constant channel, so a missing eps
    shows as a wrong value before it shows as NaN."""
    const = rng.normal(size=(6, 3))
    const[:, 1] = 3.0
    return [("(N, C) = (8, 3)", rng.normal(size=(8, 3)), 1e-5),
            ("m = 2, (N, C) = (2, 4)", rng.normal(size=(2, 4)), 1e-5),
            ("(N, C, L) = (4, 3, 5)", rng.normal(size=(4, 3, 5)), 1e-5),
            ("(N, C, H, W) = (2, 3, 4, 5)", rng.normal(1.0, 2.0, size=(2, 3, 4, 5)), 1e-5),
            ("large eps = 0.5, (N, C) = (8, 3)", rng.normal(size=(8, 3)), 0.5),
            ("large offset 1e6 + N(0, 1), (N, C) = (16, 2)", 1e6 + rng.normal(size=(16, 2)), 1e-5),
            ("a constant channel (sigma_B^2 = 0), (N, C) = (6, 3)", const, 1e-5)]


def _per_channel_cases(rng, with_dy):
    cases = []
    for name, x, eps in _batches(rng):
        c = x.shape[1]
        gamma = rng.uniform(0.5, 2.0, size=c) * rng.choice([-1.0, 1.0], size=c)
        other = rng.normal(size=x.shape) if with_dy else rng.normal(size=c)  # dy, or beta
        cases.append(Case(name, (other, x, gamma, eps) if with_dy else (x, gamma, other, eps),
                          R.values_per_channel(x.shape), kappa(x, R.reduce_axes(x.ndim), eps),
                          AXES_NOTE if x.ndim > 2 else ""))
    return cases


AXES_NOTE = ("x has shape (N, C, *spatial) here: statistics and sums run over every axis but the "
             "channel axis 1, so m = N * L or N * H * W and dgamma, dbeta have shape (C,)")
UNBIASED = "you used the unbiased variance (divide by m - 1); Algorithm 1 divides by m"


def _stats(x, eps, ddof=0, axes=None):
    """mu_B, sigma_B^2 (keepdims) and 1/sqrt(sigma_B^2 + eps), over axes (default: all but 1)."""
    axes = R.reduce_axes(x.ndim) if axes is None else axes
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).sum(axis=axes, keepdims=True) / (x.size // mu.size - ddof)
    return mu, var, 1 / np.sqrt(var + eps)


# --- check_forward -------------------------------------------------------------------------

def _forward_scales(x, gamma, beta, eps):
    mu, _, s = _stats(x, eps)
    g, b = (np.abs(R.per_channel(v, x.ndim)) for v in (gamma, beta))
    return [g * np.maximum(np.abs(x - mu) * s, 1) + b]  # y = gamma x_hat + beta, term by term


def _forward_with(ddof=0, eps_at="inside", axes=None, swap=False):
    def fn(x, gamma, beta, eps):
        mu, var, _ = _stats(x, eps, ddof, axes if x.ndim > 2 else None)
        sd = {"inside": np.sqrt(var + eps), "outside": np.sqrt(var) + eps, "none": np.sqrt(var)}
        g, b = (beta, gamma) if swap else (gamma, beta)
        return R.per_channel(g, x.ndim) * (x - mu) / sd[eps_at] + R.per_channel(b, x.ndim)
    return fn


_FORWARD_MISTAKES = [
    (UNBIASED, _forward_with(ddof=1)),
    ("eps goes inside the square root: (x - mu_B) / sqrt(sigma_B^2 + eps)",
     _forward_with(eps_at="outside")),
    ("eps is missing: divide by sqrt(sigma_B^2 + eps)", _forward_with(eps_at="none")),
    ("statistics are taken over every axis but the channel axis 1 (N and the spatial axes: "
     "m = N * H * W), not over axis 0 alone", _forward_with(axes=(0,))),
    ("gamma scales and beta shifts: y = gamma * x_hat + beta", _forward_with(swap=True))]


def check_forward(fn):
    """Grade fn(x, gamma, beta, eps) -> y, Algorithm 1 (training mode, biased batch variance)."""
    return grade("check_forward", fn, _per_channel_cases(np.random.default_rng(1), False),
                  ("y",), "fn(x, gamma, beta, eps) -> y", lambda *a: R.forward(*a)[0],
                  _forward_scales, _FORWARD_MISTAKES)


# --- check_backward ------------------------------------------------------------------------

def _backward_reference(dy, x, gamma, eps):
    return R.backward(dy, R.forward(x, gamma, np.zeros_like(gamma), eps)[1])


def _backward_scales(dy, x, gamma, eps):
    mu, _, s = _stats(x, eps)
    big_dy, big_xhat = np.max(np.abs(dy)), max(np.max(np.abs(x - mu) * s), 1.0)
    m, ones = R.values_per_channel(x.shape), np.ones_like(gamma)
    # dx_i = a dy_i + b x_hat_i + c: its terms are at most |a| max|dy| (1 + max x_hat^2)
    a = np.abs(R.per_channel(gamma, x.ndim)) * s
    return [a * big_dy * (1 + big_xhat ** 2) * np.ones_like(x), m * big_dy * big_xhat * ones,
            m * big_dy * ones]


def _backward_with(mean_path=True, var_path=True, ddof=0, with_gamma=True, swap=False):
    def fn(dy, x, gamma, eps):
        axes = R.reduce_axes(x.ndim)
        mu, _, s = _stats(x, eps, ddof)
        x_hat = (x - mu) * s
        a = R.per_channel(gamma if with_gamma else np.ones_like(gamma), x.ndim) * s
        dgamma, dbeta = (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)
        dx = a * (dy - mean_path * dy.mean(axis=axes, keepdims=True)
                  - var_path * x_hat * (dy * x_hat).mean(axis=axes, keepdims=True))
        return (dx, dbeta, dgamma) if swap else (dx, dgamma, dbeta)
    return fn


_BACKWARD_MISTAKES = [
    ("you treated mu_B and sigma_B^2 as constants: dx_i = a dy_i + b x_hat_i + c also has "
     "c = -a (1/m) sum_j dy_j (through mu_B) and b = -a (1/m) sum_j dy_j x_hat_j (through "
     "sigma_B^2)", _backward_with(mean_path=False, var_path=False)),
    ("the path through sigma_B^2 is missing: the term b x_hat_i, b = -a (1/m) sum_j dy_j x_hat_j",
     _backward_with(var_path=False)),
    ("the path through mu_B is missing: the term c = -a (1/m) sum_j dy_j",
     _backward_with(mean_path=False)),
    (UNBIASED, _backward_with(ddof=1)),
    ("dx carries the factor gamma: a = gamma / sqrt(sigma_B^2 + eps)",
     _backward_with(with_gamma=False)),
    ("dgamma and dbeta are swapped: dgamma = sum dy x_hat, dbeta = sum dy",
     _backward_with(swap=True))]


def check_backward(fn):
    """Grade fn(dy, x, gamma, eps) -> (dx, dgamma, dbeta), the backward of Algorithm 1."""
    return grade("check_backward", fn, _per_channel_cases(np.random.default_rng(2), True),
                  ("dx", "dgamma", "dbeta"), "fn(dy, x, gamma, eps) -> (dx, dgamma, dbeta)",
                  _backward_reference, _backward_scales, _BACKWARD_MISTAKES)


# --- check_inference -----------------------------------------------------------------------

def _inference_scales(mean, var, gamma, beta, eps):
    scale = np.abs(gamma) / np.sqrt(var + eps)
    return [scale, np.abs(beta) + np.abs(mean) * scale]  # shift = beta - mean * scale


def _fold_with(eps_at="inside", shift_scaled=True):
    def fn(mean, var, gamma, beta, eps):
        scale = gamma / {"inside": np.sqrt(var + eps), "outside": np.sqrt(var) + eps,
                         "none": np.sqrt(var), "no sqrt": var + eps}[eps_at]
        return scale, beta - mean * (scale if shift_scaled else 1.0)
    return fn


_INFERENCE_MISTAKES = [
    ("eps goes inside the square root: gamma / sqrt(running_var + eps)", _fold_with("outside")),
    ("eps is missing: scale = gamma / sqrt(running_var + eps)", _fold_with("none")),
    ("running_var is a variance: divide by its square root, sqrt(running_var + eps)",
     _fold_with("no sqrt")),
    ("the mean is subtracted before scaling: y = scale (x - mean) + beta, so shift = beta - "
     "mean * scale", _fold_with(shift_scaled=False))]


def check_inference(fn):
    """Grade fn(running_mean, running_var, gamma, beta, eps) -> (scale, shift), each of shape (C,),
    so that Algorithm 2's output is y = scale * x + shift per channel."""
    rng, cases = np.random.default_rng(3), []
    for name, c, offset, eps in [("C = 1", 1, 0.0, 1e-5), ("C = 6", 6, 0.0, 1e-5),
                                 ("large eps = 0.5, C = 4", 4, 0.0, 0.5),
                                 ("large running mean 1e6, C = 3", 3, 1e6, 1e-5),
                                 ("a channel with running_var = 0, C = 3", 3, 0.0, 1e-5)]:
        mean, var = offset + rng.normal(size=c), rng.uniform(0.2, 3.0, size=c)
        if "= 0" in name:
            var[1] = 0.0
        gamma, beta = rng.uniform(0.5, 2.0, size=c), rng.normal(size=c)
        kappa = float(1 + np.max(np.abs(mean) / np.sqrt(var + eps)))
        cases.append(Case(name, (mean, var, gamma, beta, eps), 1, kappa))
    return grade("check_inference", fn, cases, ("scale", "shift"),
                  "fn(running_mean, running_var, gamma, beta, eps) -> (scale, shift)",
                  lambda mean, var, g, b, eps: R.fold(g, b, mean, var, eps), _inference_scales,
                  _INFERENCE_MISTAKES)


# --- check_jacobian ------------------------------------------------------------------------

def _jacobian_reference(x, eps):
    # m channels, each a copy of x; channel j gets dy = e_j, so its dx is row j of J
    m = x.shape[0]
    cache = R.forward(np.repeat(x[:, None], m, axis=1), np.ones(m), np.zeros(m), eps)[1]
    return R.backward(np.eye(m), cache)[0].T


def _jacobian_scales(x, eps):
    s = 1 / np.sqrt(x.var() + eps)
    # J = s (I - 1/m - x_hat x_hat^T / m): its terms are at most s (1 + max x_hat^2)
    return [np.full((x.size, x.size), s * (1 + max(np.max(np.abs(x - x.mean()) * s), 1) ** 2))]


def _jacobian_with(mean_path=True, var_path=True, ddof=0):
    def fn(x, eps):
        mu, _, s = _stats(x[:, None], eps, ddof)
        x_hat, m = ((x[:, None] - mu) * s)[:, 0], x.shape[0]
        return s[0, 0] * (np.eye(m) - mean_path / m - var_path * np.outer(x_hat, x_hat) / m)
    return fn


_JACOBIAN_MISTAKES = [
    ("you treated mu_B and sigma_B^2 as constants: J also has -1/m (through mu_B) and "
     "-x_hat_i x_hat_j / m (through sigma_B^2), both times 1/sqrt(sigma_B^2 + eps)",
     _jacobian_with(mean_path=False, var_path=False)),
    ("the path through sigma_B^2 is missing: the term -x_hat_i x_hat_j / m",
     _jacobian_with(var_path=False)),
    ("the path through mu_B is missing: the term -1/m in every entry",
     _jacobian_with(mean_path=False)),
    (UNBIASED, _jacobian_with(ddof=1))]


def check_jacobian(fn):
    """Grade fn(x_column, eps) -> J, the (m, m) Jacobian J[i, j] = d x_hat_i / d x_j of a channel
    whose m values are x_column (shape (m,))."""
    rng, cases = np.random.default_rng(4), []
    for name, x, eps in [("m = 2", rng.normal(size=2), 1e-5), ("m = 5", rng.normal(size=5), 1e-5),
                         ("m = 16", rng.normal(1.0, 2.0, size=16), 1e-5),
                         ("large eps = 0.5, m = 6", rng.normal(size=6), 0.5),
                         ("large offset 1e6 + N(0, 1), m = 8", 1e6 + rng.normal(size=8), 1e-5),
                         ("a constant column (sigma_B^2 = 0), m = 4", np.full(4, 3.0), 1e-5)]:
        cases.append(Case(name, (x, eps), x.size, kappa(x, 0, eps)))
    return grade("check_jacobian", fn, cases, ("J",), "fn(x_column, eps) -> J",
                  _jacobian_reference, _jacobian_scales, _JACOBIAN_MISTAKES)
