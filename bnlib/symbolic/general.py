"""The backward chain for a batch of symbolic size m (IndexedBase x[i], Sum over i = 0..m-1).

Same graph and chain rule as bnlib.symbolic.partials, with m left as a symbol: the results hold
for every batch size, not just the ones expanded there.
Book: book/derivations/backward.ipynb
"""
from dataclasses import dataclass

import sympy as sp
from sympy.printing.latex import LatexPrinter


@dataclass(frozen=True)
class General:
    """A dataclass of the general-m chain: symbols, node definitions and the derived results.

    chain: the six partials as the chain rule gives them, in the adjoint names dl_dxhat[i] (an
    IndexedBase), dl_dsigma_B^2, dl_dmu_B and the cached xhat[i]; dl_dx is written for example k.
    dl_dvar, dl_dmu: with the adjoints substituted. dvar_dmu: d sigma2 / d mu as derived; dvar_dmu_at_mean: the same with mu = mean(x) (zero);
    centred_sum: sum_i (x_i - mu) with mu = mean(x), split (zero); dl_dx: dl/dx_k staged (in mu,
    sigma2); compact: the compact form; difference_any_mu: dl_dx - compact with mu left free
    (a multiple of sum_i (x_i - mu)); difference: dl_dx - compact, split and with mu = mean(x).
    """
    m: sp.Symbol
    i: sp.Symbol
    k: sp.Symbol
    x: sp.IndexedBase
    dy: sp.IndexedBase
    gamma: sp.Symbol
    eps: sp.Symbol
    mu: sp.Symbol
    sigma2: sp.Symbol
    mean: sp.Expr
    chain: dict
    dl_dvar: sp.Expr
    dl_dmu: sp.Expr
    dvar_dmu: sp.Expr
    dvar_dmu_at_mean: sp.Expr
    centred_sum: sp.Expr
    dl_dx: sp.Expr
    compact: sp.Expr
    difference_any_mu: sp.Expr
    difference: sp.Expr


def split_sums(expr, i, m):
    """Linearity of Sum over i = 0..m-1: split over terms, pull out factors free of i, one dummy i."""
    def split(s):
        (j, lo, hi), = s.limits
        total = sp.Integer(0)
        for term in sp.Add.make_args(sp.expand(s.function.xreplace({j: i}))):
            const, dep = term.as_independent(i, as_Add=False)
            total += const * (hi - lo + 1) if dep == 1 else const * sp.Sum(dep, (i, lo, hi))
        return total
    return sp.expand(expr.replace(lambda e: isinstance(e, sp.Sum), split))


def _in_batch(expr):
    """Resolve Piecewise((v, k <= m - 1), (0, True)) from summing a KroneckerDelta: k is in the batch."""
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), lambda e: e.args[0].expr)


def general():
    """Derive the staged chain for symbolic m and prove the two general facts the chapters use."""
    m = sp.Symbol("m", integer=True, positive=True)
    i, j, k = sp.symbols("i j k", integer=True, nonnegative=True)
    x, dy = sp.IndexedBase("x", real=True), sp.IndexedBase("dy", real=True)
    gamma, eps = sp.Symbol("gamma", real=True), sp.Symbol("epsilon", positive=True)
    mu, sigma2 = sp.Symbol("mu_B", real=True), sp.Symbol("sigma_B^2", nonnegative=True)
    batch = (i, 0, m - 1)

    # The graph's nodes, as in Algorithm 1 (node i of xhat and y written with the index i).
    mean = sp.Sum(x[j], (j, 0, m - 1)) / m
    var_def = sp.Sum((x[j] - mu) ** 2, (j, 0, m - 1)) / m
    xhat_def = (x[i] - mu) / sp.sqrt(sigma2 + eps)
    xhat, beta = sp.IndexedBase("xhat", real=True), sp.Symbol("beta", real=True)
    y_def = gamma * xhat[i] + beta
    # Adjoint names: D[i] = dl/dxhat_i, V = dl/dsigma2, M = dl/dmu.
    D = sp.IndexedBase("dl_dxhat", real=True)
    V, M = sp.Symbol("dl_dsigma_B^2", real=True), sp.Symbol("dl_dmu_B", real=True)

    # Chain rule, each consumer's adjoint times the derivative of its definition (y_i is the only
    # consumer of xhat_i; the xhat_i consume sigma2; sigma2 and the xhat_i consume mu; x_k feeds
    # xhat_k, sigma2 and mu).
    dvar_dmu = sp.diff(var_def, mu)
    at = {i: k}
    chain = {
        "dl_dxhat": dy[i] * sp.diff(y_def, xhat[i]),
        "dl_dvar": sp.Sum(D[i] * sp.diff(xhat_def, sigma2), batch),
        "dl_dmu": sp.Sum(D[i] * sp.diff(xhat_def, mu), batch) + V * dvar_dmu,
        "dl_dx": (D[k] * sp.diff(xhat_def.xreplace(at), x[k])
                  + V * _in_batch(sp.diff(var_def, x[k]).doit())
                  + M * _in_batch(sp.diff(mean, x[k]).doit())),
        "dl_dgamma": sp.Sum(dy[i] * sp.diff(y_def, gamma), batch),
        "dl_dbeta": sp.Sum(dy[i] * sp.diff(y_def, beta), batch),
    }
    dl_dxhat = chain["dl_dxhat"]
    dl_dvar = chain["dl_dvar"].xreplace({D[i]: dl_dxhat})
    dl_dmu = chain["dl_dmu"].xreplace({D[i]: dl_dxhat, V: dl_dvar})
    dl_dx = chain["dl_dx"].xreplace({D[k]: dl_dxhat.xreplace(at), V: dl_dvar, M: dl_dmu})

    to_mean = {mu: mean}
    dvar_dmu_at_mean = split_sums(split_sums(dvar_dmu, i, m).xreplace(to_mean), i, m)
    centred_sum = split_sums(split_sums(sp.Sum(x[i] - mu, batch), i, m).xreplace(to_mean), i, m)

    xh = lambda n: (x[n] - mu) / sp.sqrt(sigma2 + eps)  # noqa: E731 (xhat of example n)
    compact = gamma / (m * sp.sqrt(sigma2 + eps)) * (
        m * dy[k] - sp.Sum(dy[i], batch) - xh(k) * sp.Sum(dy[i] * xh(i), batch))
    difference_any_mu = sp.factor(split_sums(dl_dx - compact, i, m))
    difference = split_sums(split_sums(dl_dx - compact, i, m).xreplace(to_mean), i, m)
    return General(m, i, k, x, dy, gamma, eps, mu, sigma2, mean, chain, dl_dvar, dl_dmu, dvar_dmu,
                   dvar_dmu_at_mean, centred_sum, dl_dx, compact, difference_any_mu,
                   sp.simplify(difference))


class _BookLatex(LatexPrinter):
    """LaTeX in the book's notation: sums over the batch shown as i = 1..m, the paper's symbols."""

    def __init__(self, g, **settings):
        names = {g.mu: r"\mu_\mathcal{B}", g.sigma2: r"\sigma_\mathcal{B}^2", g.eps: r"\epsilon",
                 sp.Symbol("dl_dsigma_B^2", real=True):
                     r"\frac{\partial \ell}{\partial \sigma_\mathcal{B}^2}",
                 sp.Symbol("dl_dmu_B", real=True): r"\frac{\partial \ell}{\partial \mu_\mathcal{B}}"}
        super().__init__({"symbol_names": names, **settings})
        self.g = g

    def _print_Sum(self, expr):
        (j, lo, hi), = expr.limits
        if (lo, hi) != (0, self.g.m - 1):
            return super()._print_Sum(expr)
        if expr.function.could_extract_minus_sign():
            return "- " + self._print(sp.Sum(-expr.function, *expr.limits))
        body = self._print(expr.function)
        if isinstance(expr.function, sp.Add):
            body = rf"\left({body}\right)"
        return rf"\sum_{{{self._print(j)}=1}}^{{m}} {body}"

    def _print_Indexed(self, expr):
        forms = {"x": "x_{%s}", "dy": "dy_{%s}", "xhat": r"\hat{x}_{%s}",
                 "dl_dxhat": r"\frac{\partial \ell}{\partial \hat{x}_{%s}}"}
        name, (idx,) = expr.base.label.name, expr.indices
        return forms[name] % self._print(idx) if name in forms else super()._print_Indexed(expr)


def latex_general(expr, g):
    """LaTeX of an expression of general() in the book's notation: each Sum over the batch shown
    from 1 to m (SymPy's runs over 0..m-1; renaming the summation index changes nothing), mu_B and
    sigma_B^2 as the paper writes them, dy_i for dl/dy_i, hat-x_i, and the adjoints as dl/d(node)."""
    return _BookLatex(g).doprint(expr)
