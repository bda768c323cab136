"""Every backend of bnlib.kernels (and the formula) against torch's batch_norm in float64:
y, dx, dgamma, dbeta and the running statistics, over layouts, dtypes and affine settings."""
import pytest
import torch
from hypothesis import given, settings

import parity
from bn_cases import bn_problems
from bnlib import kernels

SHAPES = [((37, 5), None), ((300, 70), None), ((4, 3, 7), None), ((6, 4, 5, 3), None),
          ((6, 4, 5, 3), torch.channels_last), ((2, 3, 2, 3, 4), None),
          ((2, 3, 2, 3, 4), torch.channels_last_3d)]


def cases():
    for backend in parity.BACKENDS:
        for dtype in parity.DTYPES[backend]:
            for shape, layout in SHAPES:
                if backend == "cpu" and layout == torch.channels_last_3d:
                    continue  # the compiled kernel takes contiguous and 4-D channels-last only
                yield pytest.param(backend, dtype, shape, layout,
                                   id=f"{backend}-{str(dtype)[6:]}-{shape}-{layout}")


@pytest.mark.parametrize("backend,dtype,shape,layout", list(cases()))
def test_backend_matches_float64_torch(backend, dtype, shape, layout):
    x, dy, w, b = parity.inputs(shape, dtype, layout, device=parity.device_for(backend))
    with parity.on(backend):
        got, ran = parity.run(x, w, b, dy, parity.running_stats(x, w), momentum=0.3)
    assert ran == backend
    assert got[0].dtype == x.dtype and got[0].stride() == x.stride()   # y keeps x's layout
    assert got[1].stride() == x.stride()                                # so does dx
    parity.assert_close(got, parity.truth(x, w, b, dy, parity.running_stats(x, w), momentum=0.3), x)


@pytest.mark.parametrize("backend", parity.BACKENDS)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)], ids=str)
@pytest.mark.parametrize("running", [True, False])
def test_with_and_without_parameters_and_running_statistics(backend, affine, running):
    dtype = torch.float32
    x, dy, w, b = parity.inputs((16, 3, 5), dtype, affine=affine, device=parity.device_for(backend))
    stats = (lambda: parity.running_stats(x, w)) if running else (lambda: None)
    with parity.on(backend):
        got, ran = parity.run(x, w, b, dy, stats())
    assert ran == backend
    parity.assert_close(got, parity.truth(x, w, b, dy, stats()), x)


@pytest.mark.parametrize("backend", ["cpu", "composed", "triton"])
def test_float32_at_a_large_offset_is_as_accurate_as_float64_allows(backend):
    """1e4 + N(0, 1) in float32: no E[x^2] - E[x]^2 cancellation on any backend (which would be
    off by O(1)); the tolerance includes the saved float32 mean's rounding (see parity.tolerance)."""
    x, dy, w, b = parity.inputs((512, 4, 3), torch.float32, loc=1e4, scale=1.0,
                         device=parity.device_for(backend))
    with parity.on(backend):
        got, ran = parity.run(x, w, b, dy)
    assert ran == backend
    parity.assert_close(got, parity.truth(x, w, b, dy), x)


@pytest.mark.parametrize("backend", ["cpu", "composed", "formula"])
@settings(max_examples=40, deadline=None)
@given(problem=bn_problems())
def test_random_float64_problems(backend, problem):
    x, gamma, beta, dy = (torch.tensor(a) for a in problem)
    with parity.on(backend):
        got, ran = parity.run(x, gamma, beta, dy)
    assert ran == backend
    parity.assert_close(got, parity.truth(x, gamma, beta, dy), x)


def test_use_rejects_unknown_backends_and_restores_the_switches():
    before = {n: kernels.status(n) == "disabled" for n in kernels.BACKENDS}
    with pytest.raises(ValueError, match="backends must be among"):
        with kernels.use(cuda_graphs=True):
            pass
    with kernels.use(composed=False, cpu=False, triton=False):
        assert kernels.select(torch.randn(4, 3)) == "formula"
    assert {n: kernels.status(n) == "disabled" for n in kernels.BACKENDS} == before


def test_inputs_no_backend_takes_run_the_formula():
    with kernels.use(triton=False):
        assert kernels.select(torch.randn(8, 3, dtype=torch.float16)) == "formula"
    # float32 input with float64 parameters: no backend mixes dtypes.
    assert kernels.select(torch.randn(8, 3), torch.ones(3, dtype=torch.float64)) == "formula"
    assert kernels.select(torch.randn(8, 3)) in ("cpu", "composed")
