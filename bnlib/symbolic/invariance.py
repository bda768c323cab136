"""SymPy derivations of two invariances of BN: the bias centring cancels, the scale it ignores.

Everything here differentiates the forward graph built from symbols (sympy.diff through the
expressions); no derivative is typed in by hand. Concrete batch sizes use lists of symbols;
results for a general batch size m use IndexedBase and Sum.
"""
import sympy as sp


# --- the forward graph on a list of symbols --------------------------------------------------

def batch_symbols(name, m):
    """m real symbols name_1 ... name_m (one value per example of the batch)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ValueError(f"m must be an int >= 2 (examples in the batch), got {m!r}")
    return list(sp.symbols(f"{name}_1:{m + 1}", real=True))


def mean(xs):
    """mu_B: the batch mean of a list of expressions."""
    return sp.Add(*xs) / len(xs)


def variance(xs):
    """sigma_B^2: the biased batch variance (divide by m), factored so a common scale comes out."""
    mu = mean(xs)
    return sp.factor(sp.Add(*[(x - mu) ** 2 for x in xs]) / len(xs))


def centre(xs):
    """x_i - mu_B for every example."""
    mu = mean(xs)
    return [x - mu for x in xs]


def normalize(xs, eps):
    """x_hat_i = (x_i - mu_B) / sqrt(sigma_B^2 + eps) for every example.
    Book: book/derivations/transform.ipynb
    """
    mu, var = mean(xs), variance(xs)
    return [(x - mu) / sp.sqrt(var + eps) for x in xs]


# --- section 2 of the paper: a bias that the centring cancels --------------------------------

def bias_centring(m):
    """x = u + b centred over a batch of m: its b-derivative, the full and naive steps, their effect.
    Book: book/derivations/bias_cancelled.ipynb
    """
    u, g = batch_symbols("u", m), batch_symbols("g", m)
    b, delta_b, mu_const = sp.symbols("b Delta_b mu", real=True)
    x = [ui + b for ui in u]
    x_hat = centre(x)
    dxhat_db = [sp.diff(e, b) for e in x_hat]
    full_grad = sp.Add(*[gi * d for gi, d in zip(g, dxhat_db)])
    # The naive step sees x_hat_i = x_i - mu with mu a constant symbol, then puts mu back.
    naive_grad = sp.Add(*[gi * sp.diff(xi - mu_const, b) for gi, xi in zip(g, x)])
    x_new = [xi + delta_b for xi in x]
    after_step = [sp.expand(new - old) for new, old in zip(centre(x_new), x_hat)]
    mean_shift = sp.expand(mean(x_new) - mean(x))
    return dict(u=u, b=b, delta_b=delta_b, g=g, x=x, x_hat=x_hat, dxhat_db=dxhat_db,
                full_grad=sp.expand(full_grad), naive_grad=naive_grad,
                after_step=after_step, mean_shift=mean_shift)


def bias_centring_general():
    """bias_centring for a symbolic batch size m (IndexedBase/Sum): the mean moves by delta_b.
    Book: book/derivations/bias_cancelled.ipynb
    """
    i, j = sp.symbols("i j", integer=True)
    m = sp.Symbol("m", integer=True, positive=True)
    u = sp.IndexedBase("u")
    b, delta_b = sp.symbols("b Delta_b", real=True)

    def batch_mean(shift):
        return sp.Sum(u[i] + shift, (i, 1, m)).doit() / m

    mean_old, mean_new = batch_mean(b), batch_mean(b + delta_b)
    x_hat_j = u[j] + b - mean_old
    after_step = sp.simplify((u[j] + b + delta_b - mean_new) - x_hat_j)
    dxhat_db = sp.simplify(sp.diff(x_hat_j, b).doit())
    return dict(m=m, u=u, b=b, delta_b=delta_b, mean_old=mean_old, mean_new=mean_new,
                mean_shift=sp.simplify(mean_new - mean_old), after_step=after_step,
                dxhat_db=dxhat_db)


# --- section 3.3 of the paper: scale invariance ------------------------------------------------

def scale_forward(m):
    """x_hat(a z) against x_hat(z) for m examples, a > 0: at eps = 0, with eps -> eps/a^2, ratio.
    Book: book/derivations/scale_invariance.ipynb
    """
    z = batch_symbols("z", m)
    a, eps = sp.symbols("a epsilon", positive=True)
    scaled = normalize([a * zi for zi in z], eps)
    plain = normalize(z, eps)
    diff_eps0 = [sp.simplify(s.subs(eps, 0) - p.subs(eps, 0)) for s, p in zip(scaled, plain)]
    rescaled = normalize(z, eps / a ** 2)
    diff_rescaled = [sp.simplify(s - r) for s, r in zip(scaled, rescaled)]
    ratio = sp.simplify(scaled[0] / plain[0])
    return dict(z=z, a=a, eps=eps, scaled=scaled, plain=plain, diff_eps0=diff_eps0,
                diff_rescaled=diff_rescaled, ratio=ratio)


def eps_correction(order=2):
    """Series in eps of x_hat(a z; eps) / x_hat(z; eps) = sqrt((v + eps) / (v + eps/a^2)).
    Book: book/derivations/scale_invariance.ipynb
    """
    v, a, eps = sp.symbols("v a epsilon", positive=True)
    ratio = sp.sqrt(v + eps) / sp.sqrt(v + eps / a ** 2)
    return dict(v=v, a=a, eps=eps, ratio=ratio, series=sp.series(ratio, eps, 0, order).removeO())


def scale_forward_general():
    """x_hat_j(a z) - x_hat_j(z) at eps = 0 for a general batch size m (IndexedBase/Sum).
    Book: book/derivations/scale_invariance.ipynb
    """
    i, j = sp.symbols("i j", integer=True)
    m = sp.Symbol("m", integer=True, positive=True)
    a = sp.Symbol("a", positive=True)
    z = sp.IndexedBase("z")

    def x_hat_j(scale):
        mu = sp.factor_terms(sp.Sum(scale * z[i], (i, 1, m))) / m
        var = sp.factor_terms(sp.Sum((scale * z[i] - mu) ** 2, (i, 1, m))) / m
        return (scale * z[j] - mu) / sp.sqrt(sp.factor_terms(var))

    return dict(m=m, a=a, z=z, scaled=x_hat_j(a), plain=x_hat_j(1),
                difference=sp.simplify(x_hat_j(a) - x_hat_j(1)))


def refactor_radicals(expr):
    """Factor the base of every square root, so that sqrt(a^2 P) becomes a sqrt(P) for a > 0."""
    return expr.replace(lambda p: p.is_Pow and p.exp.is_Rational and p.exp.q == 2,
                        lambda p: sp.factor(p.base) ** p.exp)


def scale_gradients(m):
    """dl/dz of l = sum_i g_i x_hat_i(z) (eps = 0) at z and at a*z, and z . dl/dz, sum dl/dz.
    Book: book/derivations/scale_invariance.ipynb
    """
    z, g = batch_symbols("z", m), batch_symbols("g", m)
    a = sp.Symbol("a", positive=True)
    loss = sp.Add(*[gi * xi for gi, xi in zip(g, normalize(z, 0))])
    grad = [sp.diff(loss, zj) for zj in z]
    to_scaled = {zk: a * zk for zk in z}
    grad_scaled = [refactor_radicals(gj.subs(to_scaled, simultaneous=True)) for gj in grad]
    radial = sp.Add(*[zj * gj for zj, gj in zip(z, grad)])
    return dict(z=z, g=g, a=a, loss=loss, grad=grad, grad_scaled=grad_scaled,
                radial=radial, total=sp.Add(*grad))


def sgd_norm_step():
    """||W - lr g||^2 - ||W||^2 for a 2-vector W and gradient g, and its value when W . g = 0.
    Book: book/derivations/scale_invariance.ipynb
    """
    w1, w2, g1, g2 = sp.symbols("w_1 w_2 g_1 g_2", real=True)
    lr = sp.Symbol("eta", positive=True)
    change = sp.expand((w1 - lr * g1) ** 2 + (w2 - lr * g2) ** 2 - w1 ** 2 - w2 ** 2)
    # Impose W . g = 0 by eliminating g_2 (w_2 != 0): g_2 = -w_1 g_1 / w_2.
    orth = sp.simplify(change.subs(g2, -w1 * g1 / w2))
    return dict(w=(w1, w2), g=(g1, g2), lr=lr, change=change, change_orthogonal=orth,
                expected=sp.simplify(lr ** 2 * (g1 ** 2 + (w1 * g1 / w2) ** 2)))


def weight_gradients(m, d):
    """dl/dW and dl/du_i of l = sum_i g_i x_hat_i(W u_i) (eps = 0, W a 1 x d row): at W and at a*W.
    Book: book/derivations/scale_invariance.ipynb
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1 (inputs per example), got {d!r}")
    w, g = list(sp.symbols(f"w_1:{d + 1}", real=True)), batch_symbols("g", m)
    U = [[sp.Symbol(f"u_{i + 1}_{k + 1}", real=True) for k in range(d)] for i in range(m)]
    a = sp.Symbol("a", positive=True)
    z = [sp.Add(*[wk * uk for wk, uk in zip(w, row)]) for row in U]
    loss = sp.Add(*[gi * xi for gi, xi in zip(g, normalize(z, 0))])
    grad_w = [sp.diff(loss, wk) for wk in w]
    grad_u = [[sp.diff(loss, uik) for uik in row] for row in U]
    to_scaled = {wk: a * wk for wk in w}
    return dict(w=w, U=U, g=g, a=a, loss=loss, grad_w=grad_w, grad_u=grad_u,
                grad_w_scaled=[e.subs(to_scaled, simultaneous=True) for e in grad_w],
                grad_u_scaled=[[e.subs(to_scaled, simultaneous=True) for e in row] for row in grad_u])


def at_rational_point(exprs, symbols, seed=0):
    """Substitute random small rationals for `symbols` (others, such as a, stay symbolic)."""
    import random
    rnd = random.Random(seed)
    point = {s: sp.Rational(rnd.randint(-9, 9) or 1, rnd.randint(1, 5)) for s in symbols}
    return [sp.sympify(e).subs(point) for e in exprs]
