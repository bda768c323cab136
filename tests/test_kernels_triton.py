"""bnlib's Triton backend (bnlib/kernels/triton.py, triton_jit.py): what it computes, which
inputs take it, how it fails.

On a GPU the kernels are compiled and run on CUDA. Without one they run in Triton's interpreter
(TRITON_INTERPRET=1) on CPU tensors: the same kernel source, executed block by block in NumPy,
which checks the indexing, masking, splitting and arithmetic, though not the compiled code's
speed. Locally a missing Triton skips this file; under CI (which installs it) it fails instead.
"""
import warnings

import pytest
import torch

import torch.nn.functional as F

import parity
from bnlib import functional as BF
from bnlib import kernels
from bnlib.kernels import triton as T

DEVICE = parity.TRITON_DEVICE


@pytest.fixture(scope="module", autouse=True)
def triton_on():
    """Load the kernels (interpreted on a CPU); Triton the only backend on (see parity.on)."""
    with parity.on("triton"):
        assert kernels.usable("triton", torch.randn(4, 3, device=DEVICE)), kernels.status("triton")
        yield


@pytest.fixture(params=[None, 32], ids=["default tiles", "32-value tiles"])
def tile(request, monkeypatch):
    """Default tiles, then 32-value tiles: several tiles per slice and several slices per
    channel even on these small inputs, so every merge in the kernels is exercised."""
    if request.param is not None:
        monkeypatch.setattr(T, "TILE", request.param)
    return request.param


def _inputs(shape, dtype, layout=None, affine=True, **kw):
    return parity.inputs(shape, dtype, layout, (affine, affine), device=DEVICE, **kw)


def _run(x, dy, w, b, running=True, momentum=0.1):
    """bnlib's outputs (see parity.run) and whether Triton ran."""
    stats = parity.running_stats(x, w) if running else None
    got, ran = parity.run(x, w, b, dy, stats, momentum=momentum)
    return got, ran == "triton"


def _truth(x, dy, w, b, running=True, momentum=0.1):
    stats = parity.running_stats(x, w) if running else None
    return parity.truth(x, w, b, dy, stats, momentum=momentum)


def _assert_close(got, want, x):
    parity.assert_close(got, want, x)


SHAPES = [((37, 5), None), ((300, 70), None), ((4, 3, 7), None), ((6, 4, 5, 3), None),
          ((6, 4, 5, 3), torch.channels_last), ((2, 3, 2, 3, 4), None),
          ((2, 3, 2, 3, 4), torch.channels_last_3d)]


@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_float64_torch(tile, shape, layout, dtype):
    x, dy, w, b = _inputs(shape, dtype, layout)
    got, used = _run(x, dy, w, b)
    assert used
    assert got[0].dtype == x.dtype and got[0].stride() == x.stride()   # y keeps x's layout
    assert got[1].stride() == x.stride()                                # so does dx
    _assert_close(got, _truth(x, dy, w, b), x)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("running", [True, False])
def test_without_parameters_or_running_statistics(tile, affine, running):
    x, dy, w, b = _inputs((20, 6, 9), torch.float32, affine=affine)
    got, used = _run(x, dy, w, b, running=running, momentum=0.3)
    assert used
    _assert_close(got, _truth(x, dy, w, b, running=running, momentum=0.3), x)


@pytest.mark.parametrize("shape,layout", [((512, 8), None), ((16, 4, 8, 8), None),
                                          ((16, 4, 8, 8), torch.channels_last)], ids=str)
def test_float32_keeps_its_accuracy_at_a_large_offset(tile, shape, layout):
    """x = 1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 would lose everything (its float32
    rounding is ~1e8 * 6e-8 = 6 against a variance of 1), and a float32 mean alone would shift
    every x_hat by up to half an ulp of 1e4 (5e-4, measured 2.6e-4 on y before bnlib kept the
    mean's rounding error). The same 2e-6 as at offset 3 holds."""
    x, dy, w, b = _inputs(shape, torch.float32, layout, loc=1e4, scale=1.0)
    got, used = _run(x, dy, w, b)
    assert used
    _assert_close(got, _truth(x, dy, w, b), x)


def test_a_single_hwc_image_as_nchw_and_a_dy_in_another_layout(tile):
    """(1, C, H, W) from an HWC image is channel-innermost (its batch stride is arbitrary), and
    a dy of other strides (here: contiguous) is copied into x's layout. The truth comes from
    contiguous copies: torch's own CPU kernel misreads this pair of layouts (see the
    Performance chapter's layout trap)."""
    gen = torch.Generator().manual_seed(3)
    x = (3 + torch.randn(5, 6, 4, generator=gen)).permute(2, 0, 1).unsqueeze(0).to(DEVICE)
    dy = torch.randn(1, 4, 5, 6, generator=gen).to(DEVICE)             # contiguous: unlike x
    assert T.layout(x) == "rows" and dy.stride() != x.stride()
    got, used = _run(x, dy, None, None)
    assert used
    _assert_close(got, _truth(x.contiguous(), dy, None, None), x)


def test_slices_cover_every_value_once(monkeypatch):
    """The split reduction's plan: slices of whole tiles, none empty, together exactly m values."""
    for tile in (32, 4096):
        monkeypatch.setattr(T, "TILE", tile)
        for shape in [(37, 5), (300, 70), (65536, 3), (64, 64, 7, 7), (1, 3, 100, 100), (3, 200, 2)]:
            x = torch.empty(shape)
            for t in (x, x.contiguous(memory_format=torch.channels_last)) if x.ndim == 4 else (x,):
                kind, (blocks, splits), args, meta = T._plan(t)
                n, c = shape[:2]
                if kind == "rows":
                    m, _, rows, _ = args
                    assert rows % meta["BLOCK_M"] == 0 and (splits - 1) * rows < m <= splits * rows
                    assert blocks * meta["BLOCK_C"] >= c
                else:
                    _, _, s, per, _ = args
                    assert (splits - 1) * per < n <= splits * per and blocks == c
                    assert meta["BLOCK_N"] * meta["BLOCK_S"] <= tile
                    assert meta["BLOCK_S"] >= min(s, tile)


def test_what_takes_the_triton_path():
    def ran(x, *params):
        y = BF.batch_norm(x.requires_grad_(), None, None, *params, training=True)
        return BF.backend_of(y) == "triton"
    x = torch.randn(8, 3, 4, 4, device=DEVICE)
    assert ran(x.clone()) and ran(x.contiguous(memory_format=torch.channels_last))
    assert ran(torch.randn(8, 4, 3, device=DEVICE).transpose(1, 2))   # (N, L, C) memory: rows
    assert not ran(x[:, :, ::2].clone().transpose(0, 3))            # neither layout
    assert not ran(torch.randn(8, 3, dtype=torch.float64, device=DEVICE))   # float64: composed
    assert not kernels.usable("triton", torch.randn(8, 3, device=DEVICE),
                              torch.ones(3, dtype=torch.float64, device=DEVICE))  # mixed dtypes
    with kernels.use(triton=False):
        assert not ran(torch.randn(8, 3, device=DEVICE))
    assert T.layout(torch.empty(8, 3)) == "rows"
    assert T.layout(torch.empty(8, 3, 5)) == "planes"
    assert T.layout(torch.empty(8, 3, 5).transpose(0, 2)) is None


def test_running_statistics_are_updated_in_place_and_autograd_is_told():
    x = torch.randn(10, 3, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    ids, versions = (id(rm), id(rv)), (rm._version, rv._version)
    y = BF.batch_norm(x, rm, rv, training=True)
    assert BF.backend_of(y) == "triton"
    assert (id(rm), id(rv)) == ids and rm._version > versions[0] and rv._version > versions[1]
    want_rm, want_rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    F.batch_norm(x.detach(), want_rm, want_rv, training=True)
    torch.testing.assert_close(rm, want_rm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, want_rv, rtol=1e-6, atol=1e-6)


@pytest.fixture
def fresh_status(monkeypatch):
    """Let a test break the Triton path without breaking it for the tests after it."""
    monkeypatch.setattr(kernels, "_loaded", set(kernels._loaded))
    monkeypatch.setattr(kernels, "_errors", dict(kernels._errors))


@pytest.mark.parametrize("broken", ["normalize", "stats_planes", "grad_input"])
def test_a_failing_kernel_warns_once_and_hands_over_to_the_composed_path(fresh_status, monkeypatch,
                                                                       broken):
    """A kernel that raises (as one that fails to compile would): the call still returns the
    right values, the running statistics are updated once (normalize fails after they were
    written, stats_planes before), the warning comes once, and later calls skip Triton."""
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("deliberately broken kernel")
            return launch
    monkeypatch.setattr(T._impl, broken, Broken())
    x, dy, w, b = _inputs((6, 4, 5), torch.float32)
    with kernels.use(composed=True):
        with pytest.warns(RuntimeWarning, match="deliberately broken kernel"):
            got, used = _run(x, dy, w, b)
        assert used == (broken == "grad_input")             # the forward had already succeeded
        _assert_close(got, _truth(x, dy, w, b), x)
        assert "deliberately broken kernel" in kernels.status("triton")
        with warnings.catch_warnings():
            warnings.simplefilter("error")                  # said once, not per call
            got, ran = parity.run(x, w, b, dy)
        assert ran == "composed"
