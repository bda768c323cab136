"""The Triton backend for CUDA, host side: plans and launches the training forward and the
compact backward, three kernel launches each (the @triton.jit kernels are in triton_jit.py),
where the composed backend takes about thirty operators.

Opt-in for now: BNLIB_TRITON=1 (or `bnlib.kernels.use(triton=True)`). It is tested for
correctness in Triton's interpreter on a CPU (TRITON_INTERPRET=1, tests/test_kernels_triton.py)
and stays off by default until a GPU benchmark (`make bench` on CUDA times it beside native and
the composed backend) has shown it at least as fast. A kernel that fails raises KernelError, and
bnlib.kernels then warns once and keeps the composed backend.
Book: book/performance.ipynb
"""
import contextlib
import os

import torch

# Under Triton's interpreter the kernels run on CPU tensors (how the tests check them here).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Values one reduction tile holds (BLOCK_M x BLOCK_C or BLOCK_N x BLOCK_S) and one elementwise
# program handles. Tests shrink TILE to run many tiles and slices on small inputs.
TILE = 4096
ELEMENTWISE_BLOCK = 2048
MAX_SPLIT_BLOCK = 64       # slices merged per step of a finalize kernel
# Reduction programs to aim for: a few per streaming multiprocessor keep every one busy.
PROGRAMS_PER_SM = 4

_impl = None   # bnlib.kernels.triton_jit, once load() has imported it
UNAVAILABLE = ("the Triton path is unavailable, so CUDA inputs use the composed torch path "
               "({reason}). Unset BNLIB_TRITON to skip it.")


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


def load():
    """Import Triton and the kernels (compiled on first launch); raises where that fails."""
    global _impl
    from bnlib.kernels import triton_jit
    _impl = triton_jit


def _major_minor(v):
    return tuple(int(part) for part in v.split(".")[:2])


def interpreter_problem():
    """Why Triton's interpreter cannot run the kernels on CPU tensors here, or None."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        return "triton is not installed"
    import numpy as np
    # NumPy 2.4 made int() of a one-element array an error, which the interpreter's loops
    # relied on before Triton 3.9.
    if _major_minor(triton_version) < (3, 9) and _major_minor(np.__version__) >= (2, 4):
        return (f"triton {triton_version}'s interpreter needs NumPy < 2.4, "
                f"not {np.__version__} (Triton >= 3.9 works)")
    return None


def layout(x):
    """'rows' (channel innermost), 'planes' (channel-major contiguous) or None (any other)."""
    spatial = x.numel() // max(1, x.shape[0] * x.shape[1])
    if x.movedim(1, -1).is_contiguous() and (spatial == 1 or not x.is_contiguous()):
        return "rows"
    if x.is_contiguous():
        return "planes"
    return None


def takes(x, *params):
    """True when x (and the per-channel tensors in params) can go through the Triton kernels."""
    if not (x.dtype in DTYPES and 0 < x.numel() < 2**31):
        return False
    if not (x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu")):
        return False
    if layout(x) is None:
        return False
    return all(p is None or (p.dtype in (torch.float32, x.dtype) and p.is_contiguous())
               for p in params)


def _target_programs(device):
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _plan(x):
    """Grid and block sizes of the split reduction for x: (kind, grid, args, meta)."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    target = _target_programs(x.device)
    if layout(x) == "rows":
        m = n * s
        block_c = min(64, _next_pow2(c))
        block_m = max(1, min(TILE // block_c, _next_pow2(m)))
        c_blocks = _cdiv(c, block_c)
        splits = max(1, min(_cdiv(m, block_m), target // c_blocks))
        rows = _cdiv(_cdiv(m, splits), block_m) * block_m   # rows per slice, whole tiles
        splits = _cdiv(m, rows)
        return "rows", (c_blocks, splits), (m, c, rows, splits), dict(BLOCK_M=block_m, BLOCK_C=block_c)
    block_s = min(_next_pow2(s), TILE)
    splits = max(1, min(n, target // c))
    per = _cdiv(n, splits)                                  # images per slice
    splits = _cdiv(n, per)
    block_n = max(1, min(_next_pow2(per), TILE // block_s))
    return "planes", (c, splits), (n, c, s, per, splits), dict(BLOCK_N=block_n, BLOCK_S=block_s)


def _channel_divisor(kind, x):
    """Element i of x's memory (in layout `kind`, from _plan) is in channel (i // divisor) % C."""
    return 1 if kind == "rows" else x.numel() // (x.shape[0] * x.shape[1])


def _finalize_meta(c, splits):
    return dict(BLOCK_SPLIT=min(MAX_SPLIT_BLOCK, _next_pow2(splits)),
                BLOCK_C=min(128, _next_pow2(c)))


class KernelError(RuntimeError):
    """A Triton kernel failed (most likely to compile). running_updated: whether the running
    statistics had already been updated in place when it did (so a fallback must not again)."""

    def __init__(self, err, running_updated=False):
        super().__init__(f"{type(err).__name__}: {err}")
        self.running_updated = running_updated


def _or(t, placeholder):
    """t, or a placeholder pointer for an optional tensor the kernel is told (flag) not to read."""
    return placeholder if t is None else t


def _on_device(x):
    """Triton launches on the current CUDA device: make it x's for the block."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def forward(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward: (y, mean, invstd, mean_lo); running statistics updated in place if given.

    mean is the float32 mean rounded, mean_lo its rounding error (see triton_jit.py):
    backward takes both.
    """
    with _on_device(x):
        c = x.shape[1]
        m = x.numel() // c
        running_updated = False
        try:
            kind, grid, args, meta = _plan(x)
            splits = grid[1]
            f32 = dict(device=x.device, dtype=torch.float32)
            part = torch.empty(3 * splits * c, **f32)
            stats = _impl.stats_rows if kind == "rows" else _impl.stats_planes
            stats[grid](x, part, *args, **meta)
            mean, lo, invstd, scale = (torch.empty(c, **f32) for _ in range(4))
            fmeta = _finalize_meta(c, splits)
            div = _channel_divisor(kind, x)
            _impl.finalize_stats[(_cdiv(c, fmeta["BLOCK_C"]),)](
                part, x, splits, c, div, float(m), float(eps), float(momentum), m / max(m - 1, 1),
                _or(weight, scale), mean, lo, invstd, scale,
                _or(running_mean, mean), _or(running_var, mean),
                HAS_W=weight is not None, HAS_RM=running_mean is not None,
                HAS_RV=running_var is not None, **fmeta)
            running_updated = running_mean is not None or running_var is not None
            y = torch.empty_like(x)
            numel = x.numel()
            _impl.normalize[(_cdiv(numel, ELEMENTWISE_BLOCK),)](
                x, y, mean, lo, scale, _or(bias, scale), numel, c, div,
                HAS_B=bias is not None, BLOCK=ELEMENTWISE_BLOCK)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:
            raise KernelError(err, running_updated) from err
        return y, mean, invstd, lo


def backward(dy, x, weight, mean, invstd, mean_lo, need_dx=True):
    """Compact backward: (dx or None, dl/dgamma, dl/dbeta), the last two in float32."""
    with _on_device(x):
        try:
            if dy.stride() != x.stride() or dy.dtype != x.dtype:
                dy = torch.empty_like(x).copy_(dy)  # the kernels index dy exactly as x
            c = x.shape[1]
            m = x.numel() // c
            kind, grid, args, meta = _plan(x)
            splits = grid[1]
            f32 = dict(device=x.device, dtype=torch.float32)
            part = torch.empty(2 * splits * c, **f32)
            sums = _impl.grad_sums_rows if kind == "rows" else _impl.grad_sums_planes
            sums[grid](dy, x, mean, mean_lo, part, *args, **meta)
            dweight, dbias = torch.empty(c, **f32), torch.empty(c, **f32)
            coef = torch.empty(3 * c, **f32)
            fmeta = _finalize_meta(c, splits)
            _impl.finalize_grad[(_cdiv(c, fmeta["BLOCK_C"]),)](
                part, splits, c, float(m), _or(weight, invstd), invstd,
                dweight, dbias, coef, HAS_W=weight is not None, **fmeta)
            dx = None
            if need_dx:
                dx = torch.empty_like(x)
                numel = x.numel()
                _impl.grad_input[(_cdiv(numel, ELEMENTWISE_BLOCK),)](
                    dy, x, dx, mean, mean_lo, coef, numel, c, _channel_divisor(kind, x),
                    BLOCK=ELEMENTWISE_BLOCK)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:
            raise KernelError(err) from err
        return dx, dweight, dbias


def check(device=None, seed=0):
    """This backend's forward and backward against torch's own batch_norm in float64, on one
    small float32 input. Returns the largest error of y, dl/dx, dl/dgamma and dl/dbeta, each
    relative to that output's largest entry. On a CPU the kernels run in Triton's interpreter,
    which must be on before triton is first imported: `TRITON_INTERPRET=1 python -m
    bnlib.kernels.triton`.
    """
    import torch.nn.functional as F
    load()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    x = 3 + 2 * torch.randn(16, 8, 6, 6, generator=gen)
    dy = torch.randn(16, 8, 6, 6, generator=gen)
    w, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    x32, dy32, w32, b32 = (t.to(device) for t in (x, dy, w, b))
    y, mean, invstd, lo = forward(x32, w32, b32, None, None, 0.1, 1e-5)
    got = [y, *backward(dy32, x32, w32, mean, invstd, lo)]
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    want_y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True)
    want_y.backward(dy.double())
    want = [want_y.detach()] + [t.grad for t in leaves]
    return [((g.cpu().double() - t).abs().max() / t.abs().max()).item() for g, t in zip(got, want)]


if __name__ == "__main__":
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "Triton's interpreter"
    errors = check()
    print(f"Triton backend ({where}): largest relative errors against float64 native: "
          + ", ".join(f"{n} {e:.1e}" for n, e in zip(("y", "dl/dx", "dl/dgamma", "dl/dbeta"), errors)))
