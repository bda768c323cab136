"""bnlib's compiled CPU backend (bnlib/kernels/cpu.py, cpu.cpp): which inputs take it, its own
edge cases, how it fails. tests/test_parity.py compares it with torch over shapes and dtypes;
tests/test_functional.py runs its whole suite through it as well."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import parity
from bnlib import functional as BF
from bnlib import kernels
from bnlib.kernels import cpu


@pytest.fixture
def built():
    """The kernel, built here and the only backend on (see parity.on)."""
    with parity.on("cpu"):
        assert kernels.usable("cpu", torch.randn(4, 3)), kernels.status("cpu")
        yield


def test_running_statistics_updated_like_torch(built):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 6, 3, generator=gen)
    mine = (torch.rand(6, generator=gen), torch.rand(6, generator=gen) + 1)
    theirs = tuple(t.clone() for t in mine)
    versions = [t._version for t in mine]
    y = BF.batch_norm(x.requires_grad_(), *mine, training=True, momentum=0.3)
    assert BF.backend_of(y) == "cpu"
    F.batch_norm(x, *theirs, training=True, momentum=0.3)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Written in C++, but autograd is told, as an in-place torch op would tell it.
    assert all(t._version > v for t, v in zip(mine, versions))


def test_a_graph_that_saved_the_running_mean_refuses_the_updated_one(built):
    running_mean, scale = torch.zeros(3), torch.ones(3, requires_grad=True)
    z = (running_mean * scale).sum()            # saves running_mean for its backward
    BF.batch_norm(torch.randn(5, 3), running_mean, torch.ones(3), training=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize("dy_strides", ["row-broadcast", "transposed"])
def test_dy_with_other_strides_than_x(built, dy_strides):
    """A stride-0 (expanded) or transposed dy must be read by value, not as x's layout."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    if dy_strides == "row-broadcast":
        dy = torch.randn(8, 1, generator=gen, dtype=torch.float64).expand(8, 3)   # strides (1, 0)
    else:
        dy = torch.randn(3, 8, generator=gen, dtype=torch.float64).t()             # strides (1, 8)
    got, ran = parity.run(x, w, None, dy)
    assert ran == "cpu" and dy.stride() != x.stride()
    for g, want in zip(got, parity.truth(x, w, None, dy.contiguous())):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_only_parameter_gradients_when_x_needs_none(built):
    x = torch.randn(10, 4, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    y = BF.batch_norm(x, None, None, w, None, training=True)
    assert BF.backend_of(y) == "cpu"
    dy = torch.randn(10, 4, dtype=torch.float64)
    y.backward(dy)
    xhat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(w.grad, (dy * xhat).sum(0), rtol=1e-12, atol=1e-12)


def test_what_goes_through_the_kernel(built, monkeypatch):
    def kernel_ran(x, *params):
        y = BF.batch_norm(x.requires_grad_(), None, None, *params, training=True)
        return BF.backend_of(y) == "cpu"
    assert kernel_ran(torch.randn(4, 3))
    assert not kernel_ran(torch.randn(3, 4).t())                     # neither layout
    assert not kernel_ran(torch.randn(4, 3, dtype=torch.float16))    # half: the formula
    assert not kernels.usable("cpu", torch.randn(4, 3), torch.ones(3, dtype=torch.float64))  # mixed
    with pytest.raises(TypeError, match="weight has dtype"):   # and refused, as torch refuses it
        kernel_ran(torch.randn(4, 3), torch.ones(3, dtype=torch.float64))
    monkeypatch.setattr(cpu, "MAX_NUMEL_ONE_THREAD", 8 * torch.get_num_threads())
    monkeypatch.setattr(cpu, "MIN_LIMIT", 8)
    assert cpu.max_numel() == 8
    assert kernel_ran(torch.randn(4, 2)) and not kernel_ran(torch.randn(4, 3))
    with kernels.use(cpu=False):
        assert not kernel_ran(torch.randn(4, 2))


def test_direct_calls_with_bad_arguments_name_them(built):
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="input must be float32 or float64"):
        torch.ops.bnlib.forward(x.int(), None, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous CPU tensor of shape \(3,\)"):
        torch.ops.bnlib.forward(x, torch.ones(4), None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        torch.ops.bnlib.forward(x[:1], None, None, None, None, 0.1, 1e-5)
    _, mean, invstd = torch.ops.bnlib.forward(x, None, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="grad_output must have input's shape"):
        torch.ops.bnlib.backward(torch.randn(4, 2), x, None, mean, invstd, True)


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_one(tmp_path):
    """torch's loader waits forever on a `lock` file left by a process killed mid-build; bnlib
    removes it under its own OS lock. A fresh process, with a source that fails to compile at
    once, must finish (with the fallback warning) instead of waiting."""
    import subprocess
    import sys
    cache = tmp_path / "cache"
    script = (
        "import os, warnings, torch, bnlib.kernels as K, bnlib.kernels.cpu as k\n"
        f"k.SOURCE = __import__('pathlib').Path({str(tmp_path / 'broken.cpp')!r})\n"
        "d = k.build_directory(); os.makedirs(d, exist_ok=True)\n"
        "open(os.path.join(d, 'lock'), 'w').close()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert not K.usable('cpu', torch.randn(4, 3))\n"
        "assert any('could not build' in str(x.message) for x in w)\n"
        "assert not os.path.exists(os.path.join(d, 'lock'))\n"
        "print('ok')\n")
    (tmp_path / "broken.cpp").write_text("#error deliberately broken\n")
    env = {**os.environ, "BNLIB_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_failed_build_warns_once_and_keeps_the_composed_path(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error deliberately broken\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    monkeypatch.setenv("BNLIB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_loaded", {"composed"})   # as in a fresh process
    monkeypatch.setattr(kernels, "_errors", {})
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    with kernels.use(cpu=True), pytest.warns(RuntimeWarning, match="could not build the compiled CPU kernel"):
        y = BF.batch_norm(x, None, None, training=True)
    assert BF.backend_of(y) == "composed"
    assert kernels.status("cpu").startswith(("RuntimeError", "CalledProcess"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # said once, not per call
        y = BF.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))


# --- the C++ autograd node (cpu_autograd.cpp) that plain eager calls get --------------------

def _leaves(*shapes, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def test_a_plain_call_builds_the_cpp_node_and_transforms_get_the_python_function(built):
    x, w = _leaves((6, 3), (3,))
    y = BF.batch_norm(x, None, None, w, None, training=True)
    assert BF.backend_of(y) == "cpu" and not hasattr(y.grad_fn, "backend")  # a C++ node
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        y = BF.batch_norm(dual, None, None, w.detach(), None, training=True)
        tangent = fwAD.unpack_dual(y).tangent
    # The tangent of a per-channel constant shift is zero: normalization removes it.
    torch.testing.assert_close(tangent, torch.zeros_like(tangent), atol=1e-12, rtol=0)


@pytest.mark.parametrize("given", ["weight and bias", "bias only", "weight only", "neither"])
def test_cpp_node_gradients_and_double_backward_match_autograd(built, given):
    x, w, b = _leaves((7, 4, 3), (4,), (4,))
    w = w if "weight" in given or given == "weight and bias" else None
    b = b if "bias" in given else None
    inputs = [t for t in (x, w, b) if t is not None]
    dy = torch.randn(7, 4, 3, dtype=torch.float64)
    grads = {}
    def formula(x, rm, rv, w, b, training):  # autograd through Algorithm 1 (torch's own
        # batch_norm has no double backward with a bias but no weight)
        mean, var = x.mean((0, 2), keepdim=True), x.var((0, 2), unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + 1e-5)
        y = y if w is None else y * w.reshape(1, -1, 1)
        return y if b is None else y + b.reshape(1, -1, 1)
    for name, fn in (("bnlib", BF.batch_norm), ("torch", formula)):
        y = fn(x, None, None, w, b, training=True)
        if name == "bnlib":
            assert BF.backend_of(y) == "cpu"
        first = torch.autograd.grad(y, inputs, dy, create_graph=True)
        # A second derivative through every first-order gradient (the create_graph branch).
        second = torch.autograd.grad(sum((g * g).sum() for g in first), inputs,
                                     allow_unused=True, materialize_grads=True)
        grads[name] = first + second
    for mine, theirs in zip(grads["bnlib"], grads["torch"]):
        # float64, sums of ~21 terms of O(1): agreement to ~1e-13 relative (rounding only).
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_cpp_node_gradcheck_and_inference_mode(built):
    x, w, b = _leaves((5, 3), (3,), (3,))
    fn = lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with torch.inference_mode():
        y = BF.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w, b, training=True).detach())
    torch.testing.assert_close(rm, 0.1 * x.detach().mean(0))
