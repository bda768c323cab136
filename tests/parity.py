"""The one parity harness: bnlib on a chosen backend against torch's own batch_norm in float64.

`on(backend)` runs the block on exactly that backend of bnlib.kernels (the others off; the
formula is what runs when all are off); `run` returns bnlib's outputs and the backend that
actually ran; `truth` the same through torch in float64 from the same (rounded) inputs;
`assert_close` compares them within a tolerance derived per dtype (see `tolerance`).
"""
import contextlib
import importlib.util
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from bnlib import functional as BF
from bnlib import kernels
from bnlib.kernels import triton as triton_backend

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ["cpu", "composed", "formula", "triton"]
# The dtypes each backend takes (the formula takes every floating dtype).
DTYPES = {"cpu": (torch.float32, torch.float64), "composed": (torch.float32, torch.float64),
          "formula": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
          "triton": (torch.float32, torch.float16, torch.bfloat16)}
# Triton runs on CUDA, or in its interpreter on CPU tensors (tests/conftest.py turns it on).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unavailable(backend):
    """Why `backend` cannot run here, or None."""
    if backend == "cpu":
        if shutil.which("c++") is None and shutil.which("g++") is None:
            return "no C++ compiler"
    if backend == "triton":
        if TRITON_DEVICE == "cuda":
            return None if importlib.util.find_spec("triton") else "triton is not installed"
        if not triton_backend.INTERPRET:
            return "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)"
        return triton_backend.interpreter_problem()
    return None


def require(backend):
    """Skip where `backend` cannot run here; under CI, whose machines have a compiler and install
    Triton, fail instead, so that a broken build cannot pass unnoticed."""
    problem = unavailable(backend)
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI must run the {backend} backend: {problem}")
        pytest.skip(problem)


@contextlib.contextmanager
def on(backend):
    """Within the block, bnlib's training calls run on `backend` only (skipped if unavailable)."""
    require(backend)
    flags = {name: name == backend for name in kernels.BACKENDS}
    with kernels.use(**flags):
        yield


def device_for(backend, device="cpu"):
    return TRITON_DEVICE if backend == "triton" else device


def inputs(shape, dtype, layout=None, affine=(True, True), device="cpu", loc=3.0, scale=2.0, seed=0):
    """x, dy (in the layout), weight, bias; half inputs get float32 parameters, as under autocast."""
    gen = torch.Generator().manual_seed(seed)
    x = (loc + scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout is not None:
        x, dy = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
    c = shape[1]
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(pdt) if affine[0] else None
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(pdt) if affine[1] else None
    return [None if t is None else t.to(device) for t in (x, dy, w, b)]


def running_stats(x, weight):
    dt = x.dtype if weight is None else weight.dtype
    dt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    return (torch.zeros(x.shape[1], dtype=dt, device=x.device),
            torch.ones(x.shape[1], dtype=dt, device=x.device))


def run(x, weight, bias, dy, running=None, **kw):
    """bnlib's y, dx, dgamma, dbeta (those that exist) and running statistics (if given), and the
    backend that ran the call."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    rm, rv = running if running is not None else (None, None)
    y = BF.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training=True, **kw)
    backend = BF.backend_of(y)
    y.backward(dy)
    stats = [s for s in (rm, rv) if s is not None]
    return [y.detach()] + [t.grad for t in leaves if t is not None] + stats, backend


def truth(x, weight, bias, dy, running=None, **kw):
    """The same through torch's own batch_norm in float64, from the same (rounded) inputs."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    rm, rv = (None, None) if running is None else (s.detach().double().clone() for s in running)
    y = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training=True, **kw)
    y.backward(dy.double())
    stats = [s for s in (rm, rv) if s is not None]
    out = Truth([y.detach()] + [t.grad for t in leaves if t is not None] + stats)
    sizes = term_sizes(leaves[0].detach(), leaves[1], dy.double(), kw.get("eps", 1e-5))
    out.scales = [0.0] + [sizes[i] for i, t in enumerate(leaves) if t is not None] + [0.0] * len(stats)
    return out


class Truth(list):
    """truth's outputs, with `scales`: for each, the size of the terms it is a difference of."""
    scales = None


def term_sizes(x, weight, dy, eps):
    """Rounding in a gradient is relative to the terms it is a difference of, not to the result,
    which can be near zero (for m = 2, dx is zero in exact arithmetic but for eps):
    dx = a (dy - mean(dy) - x_hat mean(dy x_hat)) has terms of size |a| |dy| (a = gamma invstd),
    dgamma = sum(dy x_hat) and dbeta = sum(dy) are sums of terms of either sign."""
    dims = (0,) + tuple(range(2, x.ndim))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    x_hat = (x - mean) * (var + eps).rsqrt()
    a = (var + eps).rsqrt().flatten() * (1.0 if weight is None else weight.detach().abs())
    return [dy.abs().max().item() * a.max().item(), (dy * x_hat).abs().sum(dims).max().item(),
            dy.abs().sum(dims).max().item()]


def tolerance(dtype, x):
    """Largest error relative to each output's largest entry.

    float64: a few dozen roundings of 2^-53 at offsets and scales up to 1e3 (see
    tests/test_reference.py): 1e-9. float32: every value goes through a few float32 roundings
    (2^-24 ~ 6e-8) and the sums through partial sums of at most 64 values or a tree of a few
    dozen merges (worst case a few hundred roundings, typically measured at ~2e-7): 2e-6; the
    backward centres x on the mean as saved, rounded to float32, which moves every x_hat by up to
    |mean| 2^-24 / sigma: twice that is added. Half outputs are rounded once on store: half an
    ulp, 2^-11 (float16) or 2^-8 (bfloat16), so twice that. A formula error would be O(1).
    """
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32:
        xd = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        mean_rounding = xd.mean(1).abs().max() * 2.0**-24
        return 2e-6 + 2 * (mean_rounding / xd.std(1, unbiased=False).min()).item()
    return {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]


def assert_close(got, want, x):
    """Each output within the tolerance of its own dtype (y and dx: x's; the rest their own),
    relative to its largest entry or, for gradients from `truth`, the size of its terms."""
    scales = getattr(want, "scales", None) or [0.0] * len(want)
    for i, (g, t) in enumerate(zip(got, want)):
        tol = max(tolerance(g.dtype, x), tolerance(x.dtype, x)) if i < 2 else tolerance(g.dtype, x)
        err = ((g.double() - t).abs().max() / t.abs().max().clamp_min(scales[i])
               .clamp_min(1e-300)).item()
        assert err <= tol, (i, err, tol, x.dtype)
