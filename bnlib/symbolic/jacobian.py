"""The Jacobian d xhat / d x of one feature over a batch, and of full whitening for a small case.

Both are derived with sympy.diff through the forward expressions. `closed_form` and `zca_matrix`
are typed in only to be compared with (or to build) what is differentiated.
Book: book/derivations/jacobian.ipynb
"""
from dataclasses import dataclass

import sympy as sp

from bnlib.symbolic.partials import Partials, partials, vanishes


@dataclass(frozen=True)
class Jacobian:
    """A dataclass: p (the batch's Partials: symbols x, eps, expressions mean, var, xhat) and
    J, the m x m Matrix J[i, k] = d xhat_i / d x_k derived by sympy.diff."""
    p: Partials
    J: sp.Matrix

    @property
    def m(self):
        return self.p.m


def jacobian(m):
    """d xhat / d x for a batch of m values of one feature, eps kept, by sympy.diff."""
    p = partials(m)
    return Jacobian(p, sp.Matrix(m, m, lambda i, k: sp.diff(p.xhat[i], p.x[k])))


def closed_form(jac):
    """The claimed closed form (I - 1 1^T / m - xhat xhat^T / m) / sqrt(var + eps), in x."""
    p, m = jac.p, jac.m
    ones, xhat = sp.ones(m, 1), sp.Matrix(p.xhat)
    return (sp.eye(m) - ones * ones.T / m - xhat * xhat.T / m) / sp.sqrt(p.var + p.eps)


def eigenvalues(jac):
    """The claimed spectrum {vector: eigenvalue}: 1 -> 0, xhat -> eps/(var+eps)^(3/2), and
    1/sqrt(var+eps) (multiplicity m-2) on the vectors orthogonal to both."""
    p = jac.p
    return {"ones": sp.Integer(0), "xhat": p.eps / (p.var + p.eps) ** sp.Rational(3, 2),
            "rest": 1 / sp.sqrt(p.var + p.eps)}


def matrix_vanishes(M, p):
    """True when every entry of the Matrix M is identically zero (see partials.vanishes)."""
    return vanishes(list(M), p)


def structure(jac):
    """Each structural claim about J, decided symbolically: {claim: bool}."""
    p, J, m = jac.p, jac.J, jac.m
    ones, xhat = sp.ones(m, 1), sp.Matrix(p.xhat)
    lam = eigenvalues(jac)
    s = sp.sqrt(p.var + p.eps)
    return {
        "equals closed form": matrix_vanishes(J - closed_form(jac), p),
        "symmetric": matrix_vanishes(J - J.T, p),
        "J 1 = 0": matrix_vanishes(J * ones, p),
        "J xhat = eps/(var+eps)^(3/2) xhat": matrix_vanishes(J * xhat - lam["xhat"] * xhat, p),
        "xhat orthogonal to 1": vanishes((ones.T * xhat)[0], p),
        # J - I/s is minus a combination of the projections on 1 and xhat (rank <= 2), so every
        # vector orthogonal to both is an eigenvector with eigenvalue 1/s.
        "J - I/s = -(1 1^T + xhat xhat^T)/(m s)": matrix_vanishes(
            J - sp.eye(m) / s + (ones * ones.T + xhat * xhat.T) / (m * s), p),
    }


# --- full whitening of d = 2 features (ZCA, the paper's Cov[x]^(-1/2)) -------------------------

def zca_matrix(S):
    """Sigma^(-1/2) of a symmetric positive definite 2 x 2 Matrix, from the closed form of its
    square root sqrt(S) = (S + sqrt(det S) I) / sqrt(tr S + 2 sqrt(det S))."""
    if S.shape != (2, 2):
        raise ValueError(f"S must be a 2 x 2 Matrix, got shape {S.shape}")
    r = sp.sqrt(S.det())
    root = (S + r * sp.eye(2)) / sp.sqrt(S.trace() + 2 * r)
    return root.adjugate() / root.det()


@dataclass(frozen=True)
class Whitening:
    """A dataclass: X (m x d Matrix of symbols), eps, stats (node Symbols of the statistics the
    output depends on) and their values in X, Z (m x d output in X and the stats) and J, the
    (m d) x (m d) Matrix dZ/dX (row-major flattening) by the chain rule through the stats:
    J = dZ/dX (stats fixed) + dZ/dstats * dstats/dX, every factor by sympy.diff."""
    X: sp.Matrix
    eps: sp.Symbol
    stats: list
    values: list
    Z: sp.Matrix
    J: sp.Matrix

    def lambdify(self):
        """A NumPy function J(X, eps) of an (m, d) array: statistics first, then the chain."""
        import numpy as np
        f_stats = sp.lambdify([list(self.X), self.eps], self.values, modules="numpy")
        f_j = sp.lambdify([list(self.X), self.eps, self.stats], self.J, modules="numpy", cse=True)

        def jac(X, eps):
            flat = list(np.asarray(X, dtype=np.float64).ravel())
            return np.array(f_j(flat, eps, f_stats(flat, eps)), dtype=np.float64)
        return jac


def _batch(m, d):
    if isinstance(m, bool) or not isinstance(m, int) or m < 3:
        raise ValueError(f"m must be an int >= 3 (a 2 x 2 covariance of full rank), got {m!r}")
    X = sp.Matrix(m, d, lambda i, f: sp.Symbol(f"x_{i + 1}{f + 1}", real=True))
    C = X - sp.ones(m, 1) * (sp.ones(1, m) * X / m)
    return X, C, sp.Symbol("epsilon", positive=True)


def _chain(X, Z, stats, values):
    flat_x, flat_z = list(X), list(Z)
    direct = sp.Matrix(len(flat_z), len(flat_x), lambda a, b: sp.diff(flat_z[a], flat_x[b]))
    dz_ds = sp.Matrix(len(flat_z), len(stats), lambda a, s: sp.diff(flat_z[a], stats[s]))
    ds_dx = sp.Matrix(len(stats), len(flat_x), lambda s, b: sp.diff(values[s], flat_x[b]))
    return direct + dz_ds * ds_dx


def whitening(m=3):
    """Full (ZCA) whitening of m examples of d = 2 features: Z = (X - mean) (Cov + eps I)^(-1/2)."""
    d = 2
    X, C, eps = _batch(m, d)
    a, b, c = sp.symbols("S_11 S_12 S_22", real=True)
    cov = C.T * C / m + eps * sp.eye(d)
    values = [cov[0, 0], cov[0, 1], cov[1, 1]]
    Z = C * zca_matrix(sp.Matrix([[a, b], [b, c]]))
    return Whitening(X, eps, [a, b, c], values, Z, _chain(X, Z, [a, b, c], values))


def per_feature(m=3, d=2):
    """BN's normalization of the same m x d batch, each feature by its own mean and variance."""
    X, C, eps = _batch(m, d)
    v = list(sp.symbols(f"v_1:{d + 1}", nonnegative=True))
    values = [sum(C[i, f] ** 2 for i in range(m)) / m for f in range(d)]
    Z = sp.Matrix(m, d, lambda i, f: C[i, f] / sp.sqrt(v[f] + eps))
    return Whitening(X, eps, v, values, Z, _chain(X, Z, v, values))
