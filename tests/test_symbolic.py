"""bnlib.symbolic: the derived partials and Jacobians against bnlib.reference, torch and each other."""
import functools

import numpy as np
import pytest
import sympy as sp
import torch

from bnlib import reference
from bnlib.symbolic import (STAGES, closed_form, compact_dx, compact_kernels, eigenvalues, equal,
                            general, jacobian, lambdify, paper_forms, partials, per_feature,
                            split_sums, staged_kernels, structure, total_derivative, traffic,
                            vanishes, whitening)

U = np.finfo(np.float64).eps  # unit roundoff of float64 (2^-52)


@functools.lru_cache(maxsize=None)
def _derived(m):
    """partials(m) and its NumPy function, built once per m for the whole module (SymPy is slow)."""
    p = partials(m)
    return p, lambdify(p)


_general = functools.lru_cache(maxsize=None)(general)


def _draw(m, seed):
    """A batch of m values (spread out so that var is not tiny), upstream gradients, gamma, beta."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=m)
    while x.var() < 0.25:  # keep 1/sqrt(var + eps) of order 1, so the tolerance below holds
        x = rng.normal(1.0, 2.0, size=m)
    return x, rng.normal(size=m), rng.uniform(0.5, 2.0), rng.normal()


def _tolerance(x, dy, gamma, eps):
    """Rounding bound for float64 evaluation of the partials.

    Each partial is a sum of at most ~4m terms, each a product of a few factors, so the absolute
    error is at most ~ c * m * u times the largest term. The largest term is bounded by
    |gamma| max|dy| (1 + max|xhat|)^2 / (var + eps)^(3/2) * max(1, max|x - mu|); c = 32 covers the
    handful of operations per term with margin.
    """
    s = np.sqrt(x.var() + eps)
    xhat = np.abs(x - x.mean()) / s
    scale = abs(gamma) * np.abs(dy).max() * (1 + xhat.max()) ** 2 / min(s, 1.0) ** 3
    return 32 * len(x) * U * scale * max(1.0, np.abs(x - x.mean()).max())


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_partials_match_reference_staged(m, eps):
    p, f = _derived(m)
    for seed in range(3):
        x, dy, gamma, beta = _draw(m, seed)
        got = f(list(x), list(dy), gamma, beta, eps)
        _, cache = reference.forward(x[:, None], np.array([gamma]), np.array([beta]), eps=eps)
        want = reference.staged_partials(dy[:, None], cache)
        tol = _tolerance(x, dy, gamma, eps)
        for name in STAGES:
            np.testing.assert_allclose(np.ravel(np.asarray(got[name], dtype=np.float64)),
                                       np.ravel(want[name]), rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_compact_equals_staged_symbolically(m):
    p = _derived(m)[0]
    assert equal(p.dl_dx, compact_dx(p), p)
    if m <= 3:  # the fully composed loss grows fast with m; a second route at small m suffices
        assert equal(p.dl_dx, total_derivative(p), p)
    # The check can fail: a compact form with the x_hat term's sign flipped is not equal.
    wrong = [c + 2 * p.gamma * xh * sp.Add(*[g * h for g, h in zip(p.dy, p.xhat_node)])
             / (p.m * sp.sqrt(p.sigma2 + p.eps)) for c, xh in zip(compact_dx(p), p.xhat_node)]
    assert not equal(p.dl_dx, wrong, p)


def test_chain_form_is_the_papers():
    p = _derived(3)[0]
    forms = paper_forms(p)
    for name in STAGES:
        assert equal(p.chain[name], forms[name], p), name
    # dl/dmu's path through sigma2 is there in the chain form but vanishes at mu = mean(x).
    assert p.d_var in p.chain["dl_dmu"].free_symbols
    assert vanishes(p.staged["dl_dmu"] - sp.Add(*[-p.gamma * g / sp.sqrt(p.sigma2 + p.eps)
                                                  for g in p.dy]), p)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="m must be at least 2"):
        partials(1)
    with pytest.raises(TypeError, match="m must be an int"):
        partials(3.0)
    with pytest.raises(ValueError, match="name must be one of"):
        lambdify(_derived(2)[0], "dl_dsigma")
    with pytest.raises(ValueError, match="m must be an int >= 3"):
        whitening(2)


def test_general_m():
    g = _general()
    assert g.dvar_dmu != 0 and g.dvar_dmu_at_mean == 0
    assert g.centred_sum == 0
    # With mu left free the two forms differ by a multiple of (m mu - sum x) ...
    assert g.difference_any_mu != 0
    assert split_sums(g.difference_any_mu.xreplace({g.mu: g.mean}), g.i, g.m) == 0
    # ... and with mu the batch mean the difference is zero for every m.
    assert g.difference == 0


def test_memory_passes():
    g = _general()
    staged, compact = staged_kernels(g), compact_kernels(g)
    # One loop per partial; dl_dxhat and dl_dx write a batch array, the other four only reduce.
    assert [k.writes for k in staged] == [1, 0, 0, 1, 0, 0]
    assert dict((k.name, k.reads) for k in staged)["dl_dvar"] == ("dl_dxhat", "x")
    assert [k.reads for k in compact] == [("dy", "x"), ("dy", "x")]
    assert (traffic(staged), traffic(compact)) == (12, 5)


def _xhat_torch(eps):
    return lambda x: (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_jacobian_structure_symbolic(m):
    assert all(structure(jacobian(m)).values())


@pytest.mark.parametrize("m", [3, 4])
def test_jacobian_numeric(m):
    jac = jacobian(m)
    p = jac.p
    derived = sp.lambdify([p.x, p.eps], jac.J, modules="numpy")
    closed = sp.lambdify([p.x, p.eps], closed_form(jac), modules="numpy")
    lam = {k: sp.lambdify([p.x, p.eps], v, modules="numpy") for k, v in eigenvalues(jac).items()}
    for seed, eps in ((0, 1e-5), (1, 0.5)):
        x, _, _, _ = _draw(m, seed)
        j_auto = torch.autograd.functional.jacobian(_xhat_torch(eps), torch.tensor(x)).numpy()
        j_der = np.array(derived(list(x), eps), dtype=np.float64)
        j_closed = np.array(closed(list(x), eps), dtype=np.float64)
        # Entries are O(1/sqrt(var)) <= 2 here; a few dozen roundings each: 1e3 u is ample.
        tol = 1e3 * U
        np.testing.assert_allclose(j_der, j_auto, rtol=0, atol=tol)
        np.testing.assert_allclose(j_closed, j_der, rtol=0, atol=tol)
        np.testing.assert_allclose(j_der, j_der.T, rtol=0, atol=tol)
        ev = np.sort(np.linalg.eigvalsh(j_der))
        want = np.sort([0.0, lam["xhat"](list(x), eps)] + [lam["rest"](list(x), eps)] * (m - 2))
        np.testing.assert_allclose(ev, want, rtol=0, atol=tol)
        assert np.linalg.matrix_rank(j_der, tol=1e-9) == m - 1
    # eps -> 0: the xhat direction is killed too, rank m - 2.
    x, _, _, _ = _draw(m, 2)
    j0 = np.array(derived(list(x), 0.0), dtype=np.float64)
    assert np.linalg.matrix_rank(j0, tol=1e-9) == m - 2
    assert np.abs(j0 @ ((x - x.mean()) / x.std())).max() < 1e3 * U


def test_whitening_matches_autograd_and_is_dense():
    rng = np.random.default_rng(0)
    X, eps = rng.normal(size=(3, 2)), 1e-5

    def zca(t):
        c = t - t.mean(0)
        lam, v = torch.linalg.eigh(c.T @ c / t.shape[0] + eps * torch.eye(2, dtype=t.dtype))
        return c @ (v @ torch.diag(lam ** -0.5) @ v.T)

    j_sym = whitening(3).lambdify()(X, eps)
    j_auto = torch.autograd.functional.jacobian(zca, torch.tensor(X)).reshape(6, 6).numpy()
    # Entries O(1); eigh's backward divides by the eigenvalue gap (here > 0.1): 1e4 u is ample.
    np.testing.assert_allclose(j_sym, j_auto, rtol=0, atol=1e4 * U)
    j_bn = per_feature(3, 2).lambdify()(X, eps)
    j_bn_auto = torch.autograd.functional.jacobian(
        lambda t: (t - t.mean(0)) / torch.sqrt(t.var(0, unbiased=False) + eps),
        torch.tensor(X)).reshape(6, 6).numpy()
    np.testing.assert_allclose(j_bn, j_bn_auto, rtol=0, atol=1e3 * U)
    # Row-major flattening: index 2 i + f. Per-feature BN never mixes features; whitening does.
    cross = np.add.outer(np.arange(6) % 2, np.arange(6) % 2) == 1
    assert np.all(j_bn[cross] == 0)
    assert np.all(np.abs(j_sym[cross]) > 1e-6)


def test_latex_general_writes_the_books_notation_and_keeps_the_expression():
    from bnlib.symbolic.general import latex_general
    g = _general()
    shown = {k: latex_general(v, g) for k, v in g.chain.items()}
    shown["difference_any_mu"] = latex_general(g.difference_any_mu, g)
    for text in shown.values():
        # sums over the batch run from 1 to m, as in the text; no 0-based limits, no roman B
        assert "=0}" not in text and "m - 1" not in text and "_{B}" not in text, text
        assert "{dy}_" not in text and " {x}_" not in text, text  # SymPy's IndexedBase braces
    assert shown["dl_dbeta"] == r"\sum_{i=1}^{m} dy_{i}"
    assert shown["dl_dgamma"] == r"\sum_{i=1}^{m} dy_{i} \hat{x}_{i}"
    assert r"\mu_\mathcal{B}" in shown["difference_any_mu"]
    assert r"\sigma_\mathcal{B}^2" in shown["dl_dvar"] and shown["dl_dvar"].startswith(r"- \sum_{i=1}^{m}")
    # a sum that is not over the batch's 0..m-1 keeps its own limits
    assert latex_general(sp.Sum(g.x[g.i], (g.i, 0, g.m)), g) == r"\sum_{i=0}^{m} x_{i}"
