"""bnlib.exercises: each grader accepts a correct implementation and rejects typical wrong ones
with a message that names the case, the output and the mistake. The implementations below are
written here, independently of bnlib.reference, the way a reader would write them."""
import numpy as np
import pytest

from bnlib.exercises import (WrongAnswer, check_backward, check_forward, check_inference,
                             check_jacobian)


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _c(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def forward(x, gamma, beta, eps, ddof=0):
    mu = x.mean(axis=_axes(x), keepdims=True)
    var = x.var(axis=_axes(x), keepdims=True, ddof=ddof)
    return _c(gamma, x) * (x - mu) / np.sqrt(var + eps) + _c(beta, x)


def backward(dy, x, gamma, eps, mean_term=True, xhat_term=True):
    ax = _axes(x)
    mu, var = x.mean(axis=ax, keepdims=True), x.var(axis=ax, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    a = _c(gamma, x) / np.sqrt(var + eps)
    b = -a * (dy * x_hat).mean(axis=ax, keepdims=True)
    c = -a * dy.mean(axis=ax, keepdims=True)
    dx = a * dy + xhat_term * b * x_hat + mean_term * c
    return dx, (dy * x_hat).sum(axis=ax), dy.sum(axis=ax)


def inference(mean, var, gamma, beta, eps):
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def jacobian(x, eps, mean_term=True, var_term=True):
    m, s = len(x), 1 / np.sqrt(x.var() + eps)
    x_hat = (x - x.mean()) * s
    return s * (np.eye(m) - mean_term / m - var_term * np.outer(x_hat, x_hat) / m)


@pytest.mark.parametrize("check, fn", [(check_forward, forward), (check_backward, backward),
                                       (check_inference, inference), (check_jacobian, jacobian)])
def test_a_correct_implementation_passes_every_case_with_a_printed_verdict(check, fn, capsys):
    verdict = check(fn)
    assert 0 <= verdict.worst < 1 and len(verdict.cases) >= 5
    assert any("large" in c for c in verdict.cases)
    assert capsys.readouterr().out.strip() == str(verdict)
    assert str(verdict).startswith(f"{check.__name__}: correct on all {len(verdict.cases)} cases")


def _fails(check, fn, *patterns):
    with pytest.raises(WrongAnswer) as err:
        check(fn)
    msg = str(err.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in the message:\n{msg}"
    return msg


def test_forward_mistakes_are_named():
    _fails(check_forward, lambda *a: forward(*a, ddof=1), "wrong y on case '(N, C) = (8, 3)'",
           "largest error", "hint: you used the unbiased variance")
    def eps_outside(x, gamma, beta, eps):
        ax = _axes(x)
        sd = x.std(axis=ax, keepdims=True)
        return _c(gamma, x) * (x - x.mean(axis=ax, keepdims=True)) / (sd + eps) + _c(beta, x)
    _fails(check_forward, eps_outside, "eps goes inside the square root")
    _fails(check_forward, lambda x, g, b, eps: forward(x, b, g, eps), "gamma scales and beta shifts")


def test_forward_on_axis_0_only_fails_on_the_3d_case_with_the_axis_hint():
    def axis0(x, gamma, beta, eps):
        mu, var = x.mean(axis=0, keepdims=True), x.var(axis=0, keepdims=True)
        return _c(gamma, x) * (x - mu) / np.sqrt(var + eps) + _c(beta, x)
    _fails(check_forward, axis0, "case '(N, C, L) = (4, 3, 5)'", "every axis but the channel axis 1")


def test_one_pass_variance_fails_only_at_the_large_offset():
    def one_pass(x, gamma, beta, eps):
        ax = _axes(x)
        mu = x.mean(axis=ax, keepdims=True)
        var = (x * x).mean(axis=ax, keepdims=True) - mu ** 2
        return _c(gamma, x) * (x - mu) / np.sqrt(var + eps) + _c(beta, x)
    _fails(check_forward, one_pass, "case 'large offset 1e6", "E[x^2] - E[x]^2")


def test_nan_at_a_constant_channel_gets_the_eps_hint():
    def rescaled(x, gamma, beta, eps):  # normalizes by the std, then corrects: 0/0 where var = 0
        ax = _axes(x)
        sd = x.std(axis=ax, keepdims=True)
        z = (x - x.mean(axis=ax, keepdims=True)) / sd
        return _c(gamma, x) * z * sd / np.sqrt(sd ** 2 + eps) + _c(beta, x)
    with np.errstate(invalid="ignore"):
        _fails(check_forward, rescaled, "a constant channel", "NaN or inf", "inside the square root")


def test_backward_mistakes_are_named():
    _fails(check_backward, lambda *a: backward(*a, mean_term=False, xhat_term=False),
           "wrong dx on case '(N, C) = (8, 3)'", "treated mu_B and sigma_B^2 as constants")
    _fails(check_backward, lambda *a: backward(*a, xhat_term=False), "path through sigma_B^2")
    _fails(check_backward, lambda *a: backward(*a, mean_term=False), "path through mu_B")
    _fails(check_backward, lambda dy, x, g, eps: backward(dy, x, np.ones_like(g), eps),
           "dx carries the factor gamma")
    msg = _fails(check_backward, lambda *a: (lambda dx, dg, db: (dx, db, dg))(*backward(*a)),
                 "dgamma and dbeta are swapped")
    assert "wrong dgamma" in msg or "wrong dbeta" in msg


def test_an_unrecognised_mistake_gets_the_generic_hint():
    _fails(check_backward, lambda *a: tuple(1.01 * o for o in backward(*a)),
           "also wrong: ", "hint: compare your steps")


def test_inference_mistakes_are_named():
    _fails(check_inference, lambda mu, v, g, b, eps: (g / np.sqrt(v + eps), b - mu),
           "wrong shift on case 'C = 1'", "shift = beta - mean * scale")
    _fails(check_inference, lambda mu, v, g, b, eps: (g / (v + eps), b - mu * g / (v + eps)),
           "wrong scale", "running_var is a variance")
    _fails(check_inference, lambda mu, v, g, b, eps: inference(mu, v, g, b, eps ** 2),
           "case 'C = 1'", "hint: compare your steps")


def test_jacobian_mistakes_are_named():
    _fails(check_jacobian, lambda x, eps: np.eye(len(x)) / np.sqrt(x.var() + eps),
           "wrong J on case 'm = 2'", "treated mu_B and sigma_B^2 as constants")
    _fails(check_jacobian, lambda x, eps: jacobian(x, eps, var_term=False), "path through sigma_B^2")
    _fails(check_jacobian, lambda x, eps: jacobian(x, eps, mean_term=False), "path through mu_B")


def test_bad_arguments_and_bad_return_values_get_clear_errors():
    with pytest.raises(TypeError, match=r"fn must be a function fn\(dy, x, gamma, eps\)"):
        check_backward(np.zeros(3))
    with pytest.raises(ValueError, match=r"must return a tuple \(dx, dgamma, dbeta\).*length 2"):
        check_backward(lambda *a: backward(*a)[:2])
    with pytest.raises(ValueError, match=r"dgamma must have shape \(3,\) on case '\(N, C\) = \(8, 3\)'"):
        check_backward(lambda *a: (lambda dx, dg, db: (dx, dg[None], db))(*backward(*a)))
    with pytest.raises(ValueError, match=r"y must have shape \(8, 3\)"):
        check_forward(lambda *a: forward(*a).T)
    with pytest.raises(ValueError, match="J must be a float array"):
        check_jacobian(lambda x, eps: "J")


def test_an_exception_in_the_readers_function_is_reported_with_its_case():
    def broken(x, eps):
        raise ZeroDivisionError("oops")
    with pytest.raises(WrongAnswer, match=r"raised ZeroDivisionError: oops on case 'm = 2'"):
        check_jacobian(broken)


def test_a_2d_only_backward_is_told_about_the_channel_axis_on_the_3d_case():
    def rows_only(dy, x, gamma, eps):  # written for (m, C): statistics over axis 0
        x_hat = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + eps)
        a = gamma / np.sqrt(x.var(axis=0) + eps)
        dgamma, dbeta = (dy * x_hat).sum(axis=0), dy.sum(axis=0)
        return a * (dy - dbeta / len(x) - x_hat * dgamma / len(x)), dgamma, dbeta
    with pytest.raises(WrongAnswer, match=r"(?s)on case '\(N, C, L\) = \(4, 3, 5\)'.*every axis but"):
        check_backward(rows_only)


def test_bnlib_reference_itself_passes_every_checker():
    from bnlib import reference as R

    def jac(x, eps):  # row i of J is dx for dy = e_i (J is symmetric)
        cache = R.forward(x[:, None], np.ones(1), np.zeros(1), eps)[1]
        return np.stack([R.backward(np.eye(len(x))[:, [i]], cache)[0][:, 0] for i in range(len(x))])

    verdicts = [check_forward(lambda x, g, b, eps: R.forward(x, g, b, eps)[0]),
                check_backward(lambda dy, x, g, eps: R.backward(dy, R.forward(x, g, 0 * g, eps)[1])),
                check_inference(lambda mean, var, g, b, eps: R.fold(g, b, mean, var, eps)),
                check_jacobian(jac)]
    assert [len(v.cases) for v in verdicts] == [7, 7, 5, 6]
    assert all(0 <= v.worst < 1 for v in verdicts)
