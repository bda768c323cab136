"""bnlib.functional.batch_norm against torch.nn.functional.batch_norm, on every available device."""
import pytest
import torch
import torch.nn.functional as F

import parity
from bn_cases import DEVICES
from bnlib import functional as BF


@pytest.fixture(autouse=True, scope="module", params=["cpu", "composed", "formula"])
def backend(request):
    """Every test here runs on each CPU backend in turn: small inputs through the compiled
    kernel, the composed ATen path (what large inputs and GPUs take) and the formula (what no
    backend takes). tests/test_parity.py compares every backend with torch over many shapes."""
    with parity.on(request.param):
        yield request.param

# float64 tolerance: see tests/parity.py.
TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 7), (2, 3, 4, 5)])
def test_parity_on_device(device, shape):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(device)
    b, dy = torch.randn(c, dtype=torch.float64).to(device), torch.randn(shape, dtype=torch.float64).to(device)
    got, _ = parity.run(x, w, b, dy)
    parity.assert_close(got, parity.truth(x, w, b, dy), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 0.9])
def test_running_stats_updated_in_place_like_torch(device, momentum):
    gen = torch.Generator().manual_seed(1)
    ours = [torch.zeros(3, dtype=torch.float64, device=device),
            torch.ones(3, dtype=torch.float64, device=device)]
    theirs = [t.clone() for t in ours]
    ids = [id(t) for t in ours]
    for _ in range(4):
        x = (2 + 3 * torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)).to(device)
        BF.batch_norm(x, *ours, training=True, momentum=momentum)
        F.batch_norm(x, *theirs, training=True, momentum=momentum)
    assert [id(t) for t in ours] == ids
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_mode_uses_running_stats_like_torch(device, affine):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    rm = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
    rv = torch.rand(4, generator=gen, dtype=torch.float64).to(device) + 0.5
    w, b = (torch.randn(4, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    w, b = (w, b) if affine else (None, None)
    ours = BF.batch_norm(x, rm, rv, w, b, training=False)
    theirs = F.batch_norm(x, rm, rv, w, b, training=False)
    torch.testing.assert_close(ours, theirs, **TOL)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, **TOL)


def test_without_weight_and_bias_matches_torch():
    x = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(9, 2, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(BF.batch_norm(x, None, None, training=True), x, dy)
    (g_theirs,) = torch.autograd.grad(F.batch_norm(x, None, None, training=True), x, dy)
    torch.testing.assert_close(g_ours, g_theirs, **TOL)


@pytest.mark.parametrize("make_x", [
    lambda g: torch.randn(5, 6, 3, generator=g, dtype=torch.float64).permute(2, 0, 1).unsqueeze(0),
    lambda g: torch.randn(4, 7, 3, generator=g, dtype=torch.float64).transpose(1, 2).unsqueeze(-1),
], ids=["one HWC image as (1, C, H, W)", "(N, L, C) as (N, C, L, 1)"])
def test_inputs_whose_layout_is_ambiguous(make_x):
    """Dense x whose size-1 axis has an unusual stride, with a contiguous dy: the layouts of x and
    dy disagree in a way torch's own stride heuristic misjudges (torch 2.13's CPU batch_norm
    gets dx wrong here), so the reference is computed on contiguous copies."""
    gen = torch.Generator().manual_seed(8)
    x = make_x(gen)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xx = x.detach().clone().requires_grad_()
    y = BF.batch_norm(xx, None, None, training=True)
    y.backward(dy)
    xr = x.detach().contiguous().requires_grad_()
    yr = F.batch_norm(xr, None, None, training=True)
    yr.backward(dy)
    torch.testing.assert_close(y, yr, **TOL)
    torch.testing.assert_close(xx.grad, xr.grad, **TOL)


def test_channels_last_input_gives_the_same_result():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    y = BF.batch_norm(x, None, None, training=True)
    y_cl = BF.batch_norm(x.to(memory_format=torch.channels_last), None, None, training=True)
    torch.testing.assert_close(y_cl, y, **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True), (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck(device):
    """Double backward (e.g. for gradient penalties) differentiates the compact form itself."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True), (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(device, dtype):
    """With a large offset, float32 statistics keep y within a few half-precision ulps."""
    gen = torch.Generator().manual_seed(4)
    x64 = 500 + torch.randn(2048, 4, generator=gen, dtype=torch.float64)
    x = x64.to(dtype).to(device).requires_grad_()
    w = torch.ones(4, device=device, requires_grad=True)  # float32 params, as under autocast
    y = BF.batch_norm(x, None, None, w, None, training=True)
    assert y.dtype == dtype
    xq = x.detach().double().cpu()  # the values actually given, in float64
    truth = (xq - xq.mean(0)) / torch.sqrt(xq.var(0, unbiased=False) + 1e-5)
    # x near 500 is stored with spacing 0.25 (fp16) or 2 (bf16), so the per-element value is
    # exact but y in [-4, 4] is rounded to the output dtype: half an ulp at 4 is 2^-9 (fp16) or
    # 2^-6 (bf16). A float16 sum of 2048 values near 500 would overflow (>65504): accumulating
    # in float32 is what keeps the error at output-rounding level.
    ulp4 = {torch.float16: 2.0**-8, torch.bfloat16: 2.0**-5}[dtype]
    assert (y.detach().double().cpu() - truth).abs().max() <= ulp4
    y.backward(torch.randn(y.shape, generator=gen).to(dtype).to(device))
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


def test_float32_large_offset_at_least_as_accurate_as_torch_cpu():
    """1e4 + N(0, 1) in float32, 4096 rows: error of y against a float64 truth, side by side."""
    gen = torch.Generator().manual_seed(5)
    x = (1e4 + torch.randn(4096, 8, generator=gen, dtype=torch.float64)).float()
    xd = x.double()
    truth = (xd - xd.mean(0)) / torch.sqrt(xd.var(0, unbiased=False) + 1e-5)
    err_ours = (BF.batch_norm(x, None, None, training=True).double() - truth).abs().max().item()
    err_torch = (F.batch_norm(x, None, None, training=True).double() - truth).abs().max().item()
    assert err_ours <= err_torch
    # And in absolute terms: a float32 reduction of 4096 values near 1e4 leaves the mean within
    # a few ulps of 1e4 (ulp = 2^-10 ~ 9.8e-4; measured here: about 1 ulp, varying with how the
    # reduction is split across threads), and x - mean is then exact (Sterbenz), so y is off by
    # a few 1e-3 at most: 4 ulps = 3.9e-3. A cancelling E[x^2] - E[x]^2 in float32 would be
    # off by O(1) (x^2 ~ 1e8 has an ulp of 8).
    assert err_ours < 4 * 2.0**-10


def test_float32_large_offset_gradients_at_least_as_accurate_as_torch_cpu():
    """dx, dgamma, dbeta for 1e4 + N(0, 1) in float32, end to end, against a float64 truth."""
    gen = torch.Generator().manual_seed(7)
    x = (1e4 + torch.randn(4096, 8, generator=gen, dtype=torch.float64)).float()
    dy = torch.randn(4096, 8, generator=gen)
    xd, dyd = x.double(), dy.double()
    xhat = (xd - xd.mean(0)) / torch.sqrt(xd.var(0, unbiased=False) + 1e-5)
    invstd = torch.rsqrt(xd.var(0, unbiased=False) + 1e-5)
    truth = (invstd * (dyd - dyd.mean(0) - xhat * (dyd * xhat).mean(0)), (dyd * xhat).sum(0))

    def errors(fn):
        xx = x.clone().requires_grad_()
        w = torch.ones(8, requires_grad=True)
        fn(xx, None, None, w, None, training=True).backward(dy)
        return [((got.double() - want).abs().max() / want.abs().max()).item()
                for got, want in zip((xx.grad, w.grad), truth)]

    ours, theirs = errors(BF.batch_norm), errors(F.batch_norm)
    assert all(o <= t for o, t in zip(ours, theirs)), (ours, theirs)
    # Absolute: the saved float32 mean is off by delta <= ~1.5 ulp(1e4) = 1.5e-3 (see the test
    # above), which shifts every x_hat by delta/sigma. dgamma = sum(dy x_hat) moves by
    # (delta/sigma) sum(dy), and sum(dy) is about as large as sum(dy x_hat) (both ~ sqrt(m)), so
    # its relative error is about delta/sigma: bound 3e-3. dx's x_hat term carries mean(dy x_hat)
    # ~ 1/sqrt(m) = 1/64 on top, so dx moves by well under 1e-4 relative to its largest entry.
    # A formula or cancellation error would be O(1).
    err_dx, err_dgamma = ours
    assert err_dx < 1e-4 and err_dgamma < 3e-3, ours


# --- issue 13: bnlib as a drop-in (each test below fails on the code before it) ---------------

def _case(shape=(6, 3, 2), seed=11):
    gen = torch.Generator().manual_seed(seed)
    x = 1 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    return x, w, b


@pytest.mark.parametrize("training", [True, False])
def test_torch_func_transforms_match_torch(training):
    """grad, jacrev, jacfwd, vmap, vmap(grad) and jvp of bnlib equal torch's (before issue 13:
    'must override the setup_context staticmethod' in training)."""
    from torch.func import grad, jacfwd, jacrev, jvp, vmap
    x, w, b = _case()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    stats = (None, None) if training else (rm, rv)
    ours = lambda x, w, b: BF.batch_norm(x, *stats, w, b, training=training)  # noqa: E731
    theirs = lambda x, w, b: F.batch_norm(x, *stats, w, b, training=training)  # noqa: E731
    for transform in (jacrev, jacfwd):
        for i in range(3):
            torch.testing.assert_close(transform(ours, argnums=i)(x, w, b),
                                       transform(theirs, argnums=i)(x, w, b), **TOL)
    loss = lambda f: (lambda x: f(x, w, b).pow(3).sum())  # noqa: E731
    torch.testing.assert_close(grad(loss(ours))(x), grad(loss(theirs))(x), **TOL)
    xs = torch.randn(4, *x.shape, dtype=torch.float64)
    torch.testing.assert_close(vmap(ours, in_dims=(0, None, None))(xs, w, b),
                               vmap(theirs, in_dims=(0, None, None))(xs, w, b), **TOL)
    torch.testing.assert_close(vmap(grad(loss(ours)))(xs), vmap(grad(loss(theirs)))(xs), **TOL)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    torch.testing.assert_close(jvp(ours, (x, w, b), tangents)[1],
                               jvp(theirs, (x, w, b), tangents)[1], **TOL)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "all"])
def test_jvp_is_the_derived_formula_and_matches_torch_forward_ad(which):
    """The jvp staticmethod (dy = gamma invstd (dx - mean(dx) - x_hat mean(dx x_hat))
    + dgamma x_hat + dbeta) against torch's own forward AD through its batch_norm."""
    import torch.autograd.forward_ad as fwAD
    x, w, b = _case((5, 4, 3))
    tangents = {n: torch.randn_like(t) if which in (n, "all") else None
                for n, t in (("x", x), ("weight", w), ("bias", b))}
    results = []
    for fn in (BF.batch_norm, F.batch_norm):
        with fwAD.dual_level():
            duals = [t if tangents[n] is None else fwAD.make_dual(t, tangents[n])
                     for n, t in (("x", x), ("weight", w), ("bias", b))]
            y = fn(duals[0], None, None, duals[1], duals[2], training=True)
            results.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(results[0], results[1], **TOL)


def test_gradcheck_with_forward_ad_and_batched_grad_in_training():
    x, w, b = (t.requires_grad_() for t in _case((4, 3, 2)))
    fn = lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


@pytest.mark.parametrize("shape,stats", [((4, 0), False), ((0, 3), True), ((0, 3, 4), True),
                                         ((2, 3, 0), True), ((0,), False), ((0, 3, 2, 2), True)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_input_gives_an_empty_output_like_torch(shape, stats, training):
    """Before issue 13: SIGFPE (composed path, C = 0) or 'more than one value per channel'."""
    c = shape[1] if len(shape) > 1 else 0
    rm, rv = (torch.zeros(c), torch.ones(c)) if stats or not training else (None, None)
    x = torch.randn(shape)
    y = BF.batch_norm(x, rm, rv, training=training)
    want = F.batch_norm(x, None if rm is None else rm.clone(), None if rv is None else rv.clone(),
                        training=training)
    assert y.shape == want.shape == x.shape and y.stride() == want.stride()
    if rm is not None:
        assert torch.equal(rm, torch.zeros(c)) and torch.equal(rv, torch.ones(c))


def test_empty_input_does_not_crash_the_process_on_the_composed_path():
    """Run in a child process, so a crash shows as a signal instead of killing the test run."""
    import subprocess
    import sys
    code = ("import torch; from bnlib import functional as BF; from bnlib import kernels\n"
            "with kernels.use(cpu=False):\n"
            "    print(tuple(BF.batch_norm(torch.randn(4, 0), None, None, training=True).shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "(4, 0)"


@pytest.mark.parametrize("make_x", [
    lambda: torch.randn(3, 4, dtype=torch.float64).t(),
    lambda: torch.randn(8, 3, dtype=torch.float64)[::2],
    lambda: torch.randn(2, 4, 3, 5, dtype=torch.float64).permute(0, 2, 1, 3),
    lambda: torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
    lambda: torch.randn(2, 3, 2, 4, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last_3d),
], ids=["transposed", "sliced", "permuted", "channels_last", "channels_last_3d"])
@pytest.mark.parametrize("training", [True, False])
def test_output_strides_are_torch_s(make_x, training):
    """Before issue 13 a transposed input gave a transposed output, and y.view(-1) raised."""
    x = make_x()
    rm, rv = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    y = BF.batch_norm(x, rm, rv, training=training)
    want = F.batch_norm(x, rm.clone(), rv.clone(), training=training)
    assert y.stride() == want.stride()
    torch.testing.assert_close(y, want, **TOL)
