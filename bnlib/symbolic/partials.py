"""The six backward partials of Batch Normalization, derived by SymPy for a batch of m values.

The forward graph is Algorithm 1 of Ioffe & Szegedy (2015), one node per line:

    mu     = (1/m) sum_i x_i
    sigma2 = (1/m) sum_i (x_i - mu)^2
    xhat_i = (x_i - mu) / sqrt(sigma2 + eps)
    y_i    = gamma * xhat_i + beta
    l      = sum_i dy_i * y_i          (dy_i = dl/dy_i, the upstream gradient)

`partials(m)` runs reverse-mode differentiation over this graph with sympy.diff: the adjoint of a
node is the sum, over the nodes that consume it, of the consumer's adjoint times the derivative of
the consumer's defining expression with respect to the node. Nothing in the result is typed in by
hand; `paper_forms` (typed from the paper) and `compact_dx` (the closed form to be proven) exist only
to be compared with what is derived.
Book: book/derivations/backward.ipynb
"""
from dataclasses import dataclass, field

import sympy as sp

STAGES = ("dl_dxhat", "dl_dvar", "dl_dmu", "dl_dx", "dl_dgamma", "dl_dbeta")


@dataclass(frozen=True)
class Partials:
    """A dataclass: symbols, forward graph and the six partials (attribute access, `as_dict()`).

    Symbols: x, dy (lists of m), gamma, beta, eps; graph nodes mu, sigma2 (Symbols) and xhat_node
    (list of m Symbols); d_xhat (list), d_var, d_mu: Symbols standing for the adjoints of those
    nodes. mean, var, xhat, y, loss: the forward graph as expressions in x (and gamma, beta, eps).
    chain: each partial as the chain rule gives it (in node and adjoint symbols, the paper's form);
    staged: the same with the adjoints substituted (still in mu, sigma2, xhat_node); the attributes
    dl_dxhat, dl_dvar, dl_dmu, dl_dx, dl_dgamma, dl_dbeta: expressions in x, dy, gamma, beta, eps.
    """
    m: int
    x: list
    dy: list
    gamma: sp.Symbol
    beta: sp.Symbol
    eps: sp.Symbol
    mu: sp.Symbol
    sigma2: sp.Symbol
    xhat_node: list
    d_xhat: list
    d_var: sp.Symbol
    d_mu: sp.Symbol
    mean: sp.Expr
    var: sp.Expr
    xhat: list
    y: list
    loss: sp.Expr
    chain: dict = field(repr=False)
    staged: dict = field(repr=False)
    dl_dxhat: list = field(repr=False)
    dl_dvar: sp.Expr = field(repr=False)
    dl_dmu: sp.Expr = field(repr=False)
    dl_dx: list = field(repr=False)
    dl_dgamma: sp.Expr = field(repr=False)
    dl_dbeta: sp.Expr = field(repr=False)

    def as_dict(self):
        """The six partials (in x, dy, gamma, beta, eps) keyed by STAGES."""
        return {name: getattr(self, name) for name in STAGES}

    def to_x(self, expr):
        """Replace the graph nodes mu, sigma2, xhat_node by their expressions in x."""
        rep = {self.mu: self.mean, self.sigma2: self.var}
        rep.update(zip(self.xhat_node, self.xhat))
        return _map(expr, lambda e: e.xreplace(rep))


def _map(obj, f):
    """Apply f to an expression or to each element of a list of expressions."""
    return [f(e) for e in obj] if isinstance(obj, (list, tuple)) else f(obj)


def _check_m(m):
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"m must be an int (the batch size), got {type(m).__name__}")
    if m < 2:
        raise ValueError(f"m must be at least 2 (batch statistics need two values), got {m}")


def reverse_mode(graph, seeds):
    """Adjoints of every node of `graph` by the chain rule, one sympy.diff per (consumer, node).

    graph: list of (node Symbol, defining expression) in topological order, the last one the loss.
    seeds: {node: Symbol} naming the adjoint of a node (used in place of its value downstream).
    Returns {symbol: adjoint expression} for every symbol the definitions depend on, each written
    in the adjoint symbols of its consumers (the chain form).
    """
    loss = graph[-1][0]
    adjoint = {loss: sp.Integer(1)}
    name = dict(seeds)
    name[loss] = sp.Integer(1)
    free = set().union(*(d.free_symbols for _, d in graph))
    order = [n for n, _ in graph]
    targets = order[::-1] + sorted(free - set(order), key=str)
    for node in targets[1:]:
        total = sp.Integer(0)
        for consumer, definition in graph:
            if node in definition.free_symbols:
                total += name.get(consumer, consumer) * sp.diff(definition, node)
        adjoint[node] = total
    return adjoint


def partials(m):
    """Symbols, forward graph and the paper's six partials for a concrete batch size m."""
    _check_m(m)
    x = list(sp.symbols(f"x_1:{m + 1}", real=True))
    dy = list(sp.symbols(f"dy_1:{m + 1}", real=True))
    gamma, beta = sp.symbols("gamma beta", real=True)
    eps = sp.Symbol("epsilon", positive=True)
    mu, sigma2 = sp.Symbol("mu_B", real=True), sp.Symbol("sigma_B^2", nonnegative=True)
    xhat_node = list(sp.symbols(f"xhat_1:{m + 1}", real=True))
    y_node = list(sp.symbols(f"y_1:{m + 1}", real=True))
    d_xhat = list(sp.symbols(f"dl_dxhat_1:{m + 1}", real=True))
    d_var, d_mu = sp.symbols("dl_dsigma_B^2 dl_dmu_B", real=True)
    loss = sp.Symbol("ell", real=True)

    # The forward graph, one line of Algorithm 1 per node, each in terms of its direct inputs.
    graph = [(mu, sp.Add(*x) / m),
             (sigma2, sp.Add(*[(xi - mu) ** 2 for xi in x]) / m)]
    graph += [(xh, (xi - mu) / sp.sqrt(sigma2 + eps)) for xh, xi in zip(xhat_node, x)]
    graph += [(yi, gamma * xh + beta) for yi, xh in zip(y_node, xhat_node)]
    graph += [(loss, sp.Add(*[g * yi for g, yi in zip(dy, y_node)]))]

    seeds = dict(zip(xhat_node, d_xhat))
    seeds.update({sigma2: d_var, mu: d_mu})
    seeds.update(zip(y_node, dy))
    adj = reverse_mode(graph, seeds)
    # dl/dy_i of l = sum dy_i y_i is dy_i itself: the chain form may name it dy_i.
    assert all(adj[yi] == g for yi, g in zip(y_node, dy))

    chain = {"dl_dxhat": [adj[n] for n in xhat_node], "dl_dvar": adj[sigma2], "dl_dmu": adj[mu],
             "dl_dx": [adj[xi] for xi in x], "dl_dgamma": adj[gamma], "dl_dbeta": adj[beta]}

    # Staged: substitute each adjoint symbol by its value, upstream first (xhat, then var, then mu).
    values = {}
    for syms, name in ((d_xhat, "dl_dxhat"), ([d_var], "dl_dvar"), ([d_mu], "dl_dmu")):
        vals = chain[name] if isinstance(chain[name], list) else [chain[name]]
        for s, v in zip(syms, vals):
            values[s] = v.xreplace(values)
    staged = {k: _map(v, lambda e: e.xreplace(values)) for k, v in chain.items()}

    # The forward graph composed into expressions in x.
    mean = graph[0][1]
    var = graph[1][1].xreplace({mu: mean})
    xhat = [(xi - mean) / sp.sqrt(var + eps) for xi in x]
    y = [gamma * xh + beta for xh in xhat]
    loss_x = sp.Add(*[g * yi for g, yi in zip(dy, y)])
    to_x = dict(zip(xhat_node, [(xi - mu) / sp.sqrt(sigma2 + eps) for xi in x]))
    final = {k: _map(v, lambda e: e.xreplace(to_x).xreplace({sigma2: var}).xreplace({mu: mean}))
             for k, v in staged.items()}
    return Partials(m, x, dy, gamma, beta, eps, mu, sigma2, xhat_node, d_xhat, d_var, d_mu,
                    mean, var, xhat, y, loss_x, chain, staged, *(final[k] for k in STAGES))


def vanishes(expr, p):
    """True when expr (in x, dy, gamma, beta, eps or the graph nodes) is identically zero.

    Change of variables eps = t - var(x), t > 0: every sqrt(var + eps) becomes sqrt(t), so the
    expression becomes a polynomial in x, dy, gamma, beta times powers of t, and expand() decides.
    """
    t = sp.Symbol("t", positive=True)
    sub = {p.eps: t - p.var}
    return all(sp.expand(p.to_x(sp.sympify(e)).xreplace(sub)) == 0
               for e in (expr if isinstance(expr, (list, tuple)) else [expr]))


def equal(a, b, p):
    """True when a == b identically (expressions or lists of them), by `vanishes` of a - b."""
    if isinstance(a, (list, tuple)) != isinstance(b, (list, tuple)):
        raise TypeError("a and b must both be expressions or both be lists of expressions")
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
        return vanishes([u - v for u, v in zip(a, b)], p)
    return vanishes(a - b, p)


def compact_dx(p):
    """The compact closed form (to be proven equal): gamma/(m s) (m dy_i - sum dy - xhat_i sum dy xhat).

    s = sqrt(sigma2 + eps); written in the graph nodes mu, sigma2, xhat_node.
    """
    m, s = p.m, sp.sqrt(p.sigma2 + p.eps)
    sum_dy = sp.Add(*p.dy)
    sum_dy_xhat = sp.Add(*[g * xh for g, xh in zip(p.dy, p.xhat_node)])
    return [p.gamma / (m * s) * (m * g - sum_dy - xh * sum_dy_xhat)
            for g, xh in zip(p.dy, p.xhat_node)]


def total_derivative(p):
    """dl/dx_i straight from the composed loss l(x) (no staging): an independent route."""
    return [sp.diff(p.loss, xi) for xi in p.x]


def paper_forms(p):
    """The six partials as printed in the paper's section 3 (typed in, for comparison only).

    In the chain form's symbols: d_xhat, d_var, d_mu stand for dl/dxhat_i, dl/dsigma2, dl/dmu.
    """
    m, mu, s2, eps = p.m, p.mu, p.sigma2, p.eps
    half = sp.Rational(1, 2)
    c = [xi - mu for xi in p.x]
    return {
        "dl_dxhat": [g * p.gamma for g in p.dy],
        "dl_dvar": sp.Add(*[d * ci * (-half) * (s2 + eps) ** sp.Rational(-3, 2)
                            for d, ci in zip(p.d_xhat, c)]),
        "dl_dmu": (sp.Add(*[d * (-1 / sp.sqrt(s2 + eps)) for d in p.d_xhat])
                   + p.d_var * sp.Add(*[-2 * ci for ci in c]) / m),
        "dl_dx": [d / sp.sqrt(s2 + eps) + p.d_var * 2 * ci / m + p.d_mu / m
                  for d, ci in zip(p.d_xhat, c)],
        "dl_dgamma": sp.Add(*[g * xh for g, xh in zip(p.dy, p.xhat_node)]),
        "dl_dbeta": sp.Add(*p.dy),
    }


def latex_names(p):
    """symbol_names for sympy.latex: the paper's notation for every symbol of p."""
    names = {p.mu: r"\mu_{\mathcal{B}}", p.sigma2: r"\sigma_{\mathcal{B}}^{2}",
             p.eps: r"\epsilon", p.d_var: r"\frac{\partial \ell}{\partial \sigma_{\mathcal{B}}^{2}}",
             p.d_mu: r"\frac{\partial \ell}{\partial \mu_{\mathcal{B}}}"}
    for i in range(p.m):
        names[p.x[i]] = f"x_{{{i + 1}}}"
        names[p.dy[i]] = rf"\frac{{\partial \ell}}{{\partial y_{{{i + 1}}}}}"
        names[p.xhat_node[i]] = rf"\hat{{x}}_{{{i + 1}}}"
        names[p.d_xhat[i]] = rf"\frac{{\partial \ell}}{{\partial \hat{{x}}_{{{i + 1}}}}}"
    return names


def latex(expr, p):
    """LaTeX of an expression of p in the paper's notation."""
    return sp.latex(expr, symbol_names=latex_names(p))


def lambdify(p, name=None):
    """A NumPy function f(x, dy, gamma, beta, eps) of one partial (or of all six as a dict)."""
    args = [p.x, p.dy, p.gamma, p.beta, p.eps]
    if name is None:
        fs = {k: lambdify(p, k) for k in STAGES}
        return lambda *a: {k: f(*a) for k, f in fs.items()}
    if name not in STAGES:
        raise ValueError(f"name must be one of {STAGES}, got {name!r}")
    return sp.lambdify(args, getattr(p, name), modules="numpy")
