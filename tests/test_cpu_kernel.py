"""bnlib's compiled CPU kernel (bnlib/csrc/batch_norm_cpu.cpp): when it is used, what it computes,
how it fails. tests/test_functional.py runs its whole suite through it as well."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from bnlib import _cpu_kernel
from bnlib import functional as BF

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setattr(_cpu_kernel, "enabled", True)


def require_kernel():
    """The kernel, built here. Without a C++ compiler bnlib falls back (tested below): skip, but
    fail under CI, whose machines have one, so a broken build cannot pass unnoticed."""
    if shutil.which("c++") is None and shutil.which("g++") is None and not IN_CI:
        pytest.skip("no C++ compiler")
    assert _cpu_kernel.load(), _cpu_kernel.status()
    assert _cpu_kernel.status() == "loaded"


@pytest.fixture
def built():
    require_kernel()


def _run(x, weight, bias, dy, running=None, **kw):
    """y, dx, dgamma, dbeta (the ones that exist) through bnlib, and whether the kernel ran."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    rm, rv = running if running is not None else (None, None)
    y = BF.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training=True, **kw)
    used_kernel = y.grad_fn.kernel
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves if t is not None], used_kernel


def _truth(x, weight, bias, dy, **kw):
    """The same through torch's own batch_norm in float64."""
    def d(t):
        return None if t is None else t.detach().double().requires_grad_()
    leaves = [d(t) for t in (x, weight, bias)]
    y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, **kw)
    y.backward(dy.double())
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def f32_rtol(x):
    """float32 tolerance, relative to each output's largest entry. Every value goes through a few
    float32 roundings (eps = 2^-24 ~ 6e-8) and the statistics through float32 partial sums of at
    most 64 values before double (worst case 64 eps ~ 4e-6 relative, typically about sqrt(64)
    eps ~ 5e-7): 2e-6 is a few times the ~4e-7 measured on y.
    The backward centres x on the mean as saved, rounded to float32 (as torch's kernel saves it):
    off by up to |mean| 2^-24, which moves every x_hat by that over sigma; twice that bound is
    added. A formula error would be O(1)."""
    xd = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean_rounding = xd.mean(1).abs().max() * 2.0**-24
    return 2e-6 + 2 * (mean_rounding / xd.std(1, unbiased=False).min()).item()


@pytest.mark.parametrize("shape,layout", [
    ((64, 5), None), ((7, 3, 11), None), ((6, 4, 5, 7), None),
    ((6, 4, 5, 7), torch.channels_last), ((3, 300), None)])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_float64_torch(built, shape, layout, affine, dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 50).to(dtype)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    c = shape[1]
    weight = (torch.rand(c, generator=gen, dtype=dtype) + 0.5) if affine[0] else None
    bias = torch.randn(c, generator=gen, dtype=dtype) if affine[1] else None
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    got, used_kernel = _run(x, weight, bias, dy)
    assert used_kernel
    assert got[0].stride() == x.stride()       # y keeps x's memory layout, as torch's does
    rtol = f32_rtol(x) if dtype == torch.float32 else 1e-12
    for g, want in zip(got, _truth(x, weight, bias, dy)):
        err = (g.double() - want).abs().max() / want.abs().max()
        assert err <= rtol, (err, rtol)


def test_running_statistics_updated_like_torch(built):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 6, 3, generator=gen)
    mine = (torch.rand(6, generator=gen), torch.rand(6, generator=gen) + 1)
    theirs = tuple(t.clone() for t in mine)
    versions = [t._version for t in mine]
    y = BF.batch_norm(x.requires_grad_(), *mine, training=True, momentum=0.3)
    assert y.grad_fn.kernel
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
    got, used_kernel = _run(x, w, None, dy)
    assert used_kernel and dy.stride() != x.stride()
    for g, want in zip(got, _truth(x, w, None, dy.contiguous())):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_only_parameter_gradients_when_x_needs_none(built):
    x = torch.randn(10, 4, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    y = BF.batch_norm(x, None, None, w, None, training=True)
    assert y.grad_fn.kernel
    dy = torch.randn(10, 4, dtype=torch.float64)
    y.backward(dy)
    xhat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(w.grad, (dy * xhat).sum(0), rtol=1e-12, atol=1e-12)


def test_what_goes_through_the_kernel(built, monkeypatch):
    def kernel_ran(x, *params):
        return BF.batch_norm(x.requires_grad_(), None, None, *params, training=True).grad_fn.kernel
    assert kernel_ran(torch.randn(4, 3))
    assert not kernel_ran(torch.randn(3, 4).t())                     # neither layout
    assert not kernel_ran(torch.randn(4, 3, dtype=torch.float16))    # half: composed path
    assert not kernel_ran(torch.randn(4, 3), torch.ones(3, dtype=torch.float64))  # mixed dtypes
    monkeypatch.setattr(_cpu_kernel, "MAX_NUMEL_ONE_THREAD", 8 * torch.get_num_threads())
    monkeypatch.setattr(_cpu_kernel, "MIN_LIMIT", 8)
    assert _cpu_kernel.max_numel() == 8
    assert kernel_ran(torch.randn(4, 2)) and not kernel_ran(torch.randn(4, 3))
    monkeypatch.setattr(_cpu_kernel, "enabled", False)
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
        "import os, warnings, bnlib._cpu_kernel as k\n"
        f"k.SOURCE = __import__('pathlib').Path({str(tmp_path / 'broken.cpp')!r})\n"
        "d = k.build_directory(); os.makedirs(d, exist_ok=True)\n"
        "open(os.path.join(d, 'lock'), 'w').close()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert not k.load()\n"
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
    monkeypatch.setattr(_cpu_kernel, "SOURCE", broken)
    monkeypatch.setenv("BNLIB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(_cpu_kernel._status, "loaded", False)
    monkeypatch.setitem(_cpu_kernel._status, "error", None)
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="could not build the compiled CPU kernel"):
        y = BF.batch_norm(x, None, None, training=True)
    assert not y.grad_fn.kernel and _cpu_kernel.status().startswith(("RuntimeError", "CalledProcess"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # said once, not per call
        y = BF.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
