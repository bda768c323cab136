"""Run the cases: torch (native vs bnlib.functional) and NumPy (bnlib.reference compact vs staged)."""
import numpy as np
import torch
import torch.nn.functional as F

from bench.cases import bytes_needed
from bnlib import functional as BF
from bnlib import kernels, reference
from bnlib.measure import saved_extra_bytes, time_calls


def composed_batch_norm(*args):
    """bnlib.functional.batch_norm with its own kernels (compiled CPU, Triton) off: the composed path."""
    with kernels.use(cpu=False, triton=False):
        return BF.batch_norm(*args)


def triton_batch_norm(*args):
    """bnlib.functional.batch_norm through its Triton kernels (what BNLIB_TRITON=1 selects)."""
    with kernels.use(triton=True):
        return BF.batch_norm(*args)


TORCH_IMPLS = {"native": F.batch_norm, "bnlib": BF.batch_norm,
               "bnlib_composed": composed_batch_norm, "bnlib_triton": triton_batch_norm}


def triton_takes(x, *params):
    """Whether the Triton path would take this case (on CUDA, with Triton installed)."""
    if x.device.type != "cuda":
        return False
    with kernels.use(triton=True):
        return kernels.usable("triton", x, *params)


# A case whose slowest function takes longer than this per call gets fewer repeats (>= 3).
MAX_SECONDS_PER_CASE = 10.0
MIN_REPEATS = 3


def _dtype(name):
    return getattr(torch, name)


def torch_inputs(case, device, seed=0):
    """x, dy (in the case's layout), and float parameters: weight, bias, running mean and var.

    Half-precision inputs get float32 parameters, as under autocast.
    """
    gen = torch.Generator().manual_seed(seed)
    dt = _dtype(case.dtype)
    pdt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    x = torch.randn(case.shape, generator=gen).to(device=device, dtype=dt, memory_format=fmt)
    dy = torch.randn(case.shape, generator=gen).to(device=device, dtype=dt, memory_format=fmt)
    c = case.shape[1]
    w = (torch.rand(c, generator=gen) + 0.5).to(device=device, dtype=pdt)
    b = torch.randn(c, generator=gen).to(device=device, dtype=pdt)
    rm, rv = torch.zeros(c, device=device, dtype=pdt), torch.ones(c, device=device, dtype=pdt)
    return x, dy, w, b, rm, rv


def _repeats_for(fns, repeats, device):
    """Cap the repeats so the case stays within MAX_SECONDS_PER_CASE (at least MIN_REPEATS).

    Calls every function once, untimed in the results: this is also the first warm-up call.
    """
    (t,) = time_calls([lambda: [f() for f in fns]], 1, warmup=0, device=device, min_sample=0)
    return max(MIN_REPEATS, min(repeats, int(MAX_SECONDS_PER_CASE / max(t, 1e-9))))


def run_torch_case(case, device, repeats, warmup=1):
    """Median forward and forward+backward times of each torch impl, side by side.

    Where bnlib runs a case through a kernel of its own by default (the compiled CPU kernel, or
    Triton with BNLIB_TRITON=1), the composed path is timed too ("bnlib_composed"); on CUDA the
    Triton path is timed as well ("bnlib_triton"), so each one's effect is measured in one run.
    """
    x, dy, w, b, rm, rv = torch_inputs(case, device)
    path = BF.path_for(x, w, b, rm, rv)   # bnlib's default path for this case

    def step(fn, backward):
        def call():
            xx, ww, bb = (t.detach().requires_grad_() for t in (x, w, b))
            y = fn(xx, rm, rv, ww, bb, True)
            if backward:
                y.backward(dy)
        return call

    names = (["native", "bnlib"] + (["bnlib_composed"] if path != "composed" else [])
             + (["bnlib_triton"] if path != "triton" and triton_takes(x, w, b, rm, rv) else []))
    fns = [step(TORCH_IMPLS[n], bw) for bw in (False, True) for n in names]
    if device == "cuda":  # first calls compile Triton kernels: keep that out of the sizing call
        for f in fns:
            f()
    reps = _repeats_for(fns, repeats, device)
    times = time_calls(fns, reps, warmup=warmup, device=device)
    records = []
    for (bw, n), t in zip([(bw, n) for bw in (False, True) for n in names], times):
        pass_name = "forward+backward" if bw else "forward"
        leaves = [t_.detach().requires_grad_() for t_ in (x, w, b)]
        extra = saved_extra_bytes(lambda xx, ww, bb, m, v: TORCH_IMPLS[n](xx, m, v, ww, bb, True),
                                  leaves + [rm.clone(), rv.clone()])
        records.append(_record(case, device, "torch", n, pass_name, t, reps, extra))
        if n == "bnlib":
            records[-1]["path"] = path
    return records


def run_numpy_case(case, repeats, warmup=0):
    """Median times of bnlib.reference: forward, compact backward, staged backward."""
    gen = np.random.default_rng(0)
    dt = np.dtype(case.dtype)
    x = gen.standard_normal(case.shape).astype(dt)
    dy = gen.standard_normal(case.shape).astype(dt)
    c = case.shape[1]
    gamma, beta = (gen.uniform(0.5, 1.5, c).astype(dt), gen.standard_normal(c).astype(dt))
    _, cache = reference.forward(x, gamma, beta)
    fns = [lambda: reference.forward(x, gamma, beta),
           lambda: reference.backward(dy, cache),
           lambda: reference.backward_staged(dy, cache)]
    reps = _repeats_for(fns, repeats, "cpu")
    times = time_calls(fns, reps, warmup=warmup, device="cpu")
    # What the NumPy cache keeps beyond x and gamma: x_hat (full size), mean and var.
    extra = cache.x_hat.nbytes + cache.mean.nbytes + cache.var.nbytes
    names = [("reference", "forward"), ("reference_compact", "backward"),
             ("reference_staged", "backward")]
    return [_record(case, "cpu", "numpy", impl, p, t, reps, extra if p == "forward" else 0)
            for (impl, p), t in zip(names, times)]


def _record(case, device, library, impl, pass_name, seconds, repeats, saved_bytes):
    nbytes = bytes_needed(case, pass_name)
    return {"case": case.name, "shape": list(case.shape), "layout": case.layout,
            "dtype": case.dtype, "device": device, "library": library, "impl": impl,
            "pass": pass_name, "median_s": seconds, "repeats": repeats, "bytes": nbytes,
            "bandwidth_gbs": nbytes / seconds / 1e9, "saved_extra_bytes": saved_bytes}
