"""Measuring tools the benchmark (bench/) and the Performance chapter share: interleaved timers
(CUDA events on a GPU, perf_counter on a CPU), copy bandwidth, bytes saved for backward,
full-size passes over memory (a dispatch log) and NumPy's peak temporary memory.
Book: book/performance.ipynb
"""
import gc
import math
import statistics
import time
import tracemalloc

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode


# One timed sample lasts at least this long: a call shorter than that is repeated within the
# sample and the sample divided by the count (as timeit's autorange does), so that timer
# resolution and one-off interruptions weigh less on sub-millisecond calls.
MIN_SAMPLE_SECONDS = 2e-3

# The CPU clock; a module attribute so that a test can drive the timer with a fake clock.
clock = time.perf_counter


def calls_per_sample(seconds_per_call, min_sample=MIN_SAMPLE_SECONDS):
    """How many back-to-back calls make one sample last at least min_sample seconds."""
    if seconds_per_call <= 0:
        return 1
    return max(1, math.ceil(min_sample / seconds_per_call))


def time_calls(fns, repeats, warmup=2, device="cpu", min_sample=MIN_SAMPLE_SECONDS):
    """Median seconds per call of each function in fns, run interleaved (same conditions for each).

    Every function is called `warmup` times first; then each repeat takes one sample of every
    function, in an order that alternates between repeats, so that drifting load affects all
    alike. A sample is calls_per_sample back-to-back calls (one for anything slower than
    min_sample), timed together and divided by their count; the call that measures how many is
    one more warm-up call (none when min_sample is 0).
    Python's garbage collector is paused while timing (as timeit does).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    numbers = ([calls_per_sample(_time_one(fn, device), min_sample) for fn in fns]
               if min_sample > 0 else [1] * len(fns))
    samples = [[] for _ in fns]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                samples[i].append(_time_one(fns[i], device, numbers[i]))
    finally:
        if was_enabled:
            gc.enable()
    return [statistics.median(s) for s in samples]


def _time_one(fn, device, number=1):
    """Seconds per call of `number` back-to-back calls of fn."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    t0 = clock()
    for _ in range(number):
        fn()
    return (clock() - t0) / number


def copy_bandwidth(device, nbytes=256 * 2**20, repeats=5):
    """Measured device-to-device copy bandwidth in bytes/s (reads and writes nbytes each)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    (t,) = time_calls([lambda: dst.copy_(src)], repeats, warmup=2, device=device)
    return 2 * nbytes / t


def saved_extra_bytes(fn, inputs):
    """Bytes of the tensors autograd saves for backward beyond the inputs' own storage.

    Runs fn(*inputs) under saved_tensors_hooks and adds up every saved tensor that does not
    share storage with an input (the input x itself, the weight and running stats are free).
    """
    known = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in seen and t.numel() > 0:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return total


class FullSizePasses(TorchDispatchMode):
    """Within the block, logs each dispatched operator that reads or writes a tensor of `numel`
    elements: `passes` holds (operator, full-size tensors read, written); `calls` counts every
    operator of any size. Views and allocations move no data and are left out."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.passes, self.calls = numel, [], 0

    def _full(self, tree):
        """Distinct full-size tensors in tree: the same tensor passed twice is read once."""
        return len({t.data_ptr() for t in tree_flatten(tree)[0]
                    if isinstance(t, torch.Tensor) and t.numel() == self.numel})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        if not func.is_view and not func.__name__.startswith(("empty", "detach")):
            inputs = {k: v for k, v in (kwargs or {}).items() if k != "out"}  # out= is written
            reads, writes = self._full((args, inputs)), self._full(out)
            if reads or writes:
                self.passes.append((func.__name__, reads, writes))
        return out


def peak_in_tensors(fn, nbytes):
    """Peak bytes NumPy allocates while fn runs (Python's tracemalloc), in units of nbytes."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak / nbytes
