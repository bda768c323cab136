"""The compiled CPU backend (bnlib/kernels/cpu.cpp), built with torch's C++ extension
loader the first time it is needed on a machine (about 10 s with g++), then loaded from cache.

It computes what the composed backend computes, in one call per direction instead
of about thirty dispatched operators, which is what small inputs spend their time on. Where it
cannot be built (no compiler), bnlib.kernels says so once with a warning and keeps the composed
path. Set BNLIB_CPU_KERNEL=0 to never try.
Book: book/performance.ipynb
"""
import contextlib
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
# bnlib::train, the same call with its autograd node in C++ (see there).
AUTOGRAD_SOURCE = Path(__file__).with_name("cpu_autograd.cpp")
# The kernel is single-threaded; the composed path runs on all of torch's threads. Measured on a
# 2-core machine (bench/, see the Performance chapter), the kernel is ahead of both torch's
# native kernel and the composed path at 1024 x 1024 with one thread and level with native with
# two, so with T threads it takes inputs up to 2^21 / T values (and always up to 2^16, where
# threads cannot pay for themselves).
MAX_NUMEL_ONE_THREAD = 1 << 21
MIN_LIMIT = 1 << 16


def _cpu_flags():
    """The CPU's feature flags (Linux), so a build made for one CPU is never loaded on another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compile_flags():
    # -march=native (vector instructions this CPU has) only where the build directory is tied
    # to this CPU's flags, i.e. on x86-64 Linux; elsewhere the compiler's portable default.
    native = platform.machine() in ("x86_64", "AMD64") and _cpu_flags() != ""
    return ["-O3", "-fopenmp-simd"] + (["-march=native"] if native else [])


def build_directory():
    """Per torch version, Python version and CPU, so an upgrade or another machine sharing the
    cache rebuilds instead of loading a binary made for something else."""
    from bnlib import cache_dir
    root = str(cache_dir())
    cpu = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:8]
    tag = (f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}"
           f"{sys.version_info[1]}-{platform.machine()}-{cpu}")
    return os.path.join(root, tag)


@contextlib.contextmanager
def _build_lock(directory):
    """Hold an OS lock on directory/bnlib.lock while building or loading.

    torch's loader guards a build with a file named `lock` that it deletes when done; a process
    killed mid-build (a notebook kernel restarted during the build) leaves it behind, and every
    later process would wait on it forever. An OS lock is released when its holder dies, and
    every bnlib process takes it first, so a `lock` file found while holding it is stale.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's own lock file only
        yield
        return
    with open(os.path.join(directory, "bnlib.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = os.path.join(directory, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


UNAVAILABLE = ("could not build the compiled CPU kernel, so small CPU inputs use the slower "
               "composed path ({reason}). Set BNLIB_CPU_KERNEL=0 to skip the attempt.")


def load():
    """Build (once per machine) and load the kernel, so torch.ops.bnlib is ready; raises if not."""
    from torch.utils.cpp_extension import load as load_extension
    _ninja_on_path()
    directory = build_directory()
    os.makedirs(directory, exist_ok=True)
    with _build_lock(directory):
        load_extension(name="bnlib_cpu", sources=[str(SOURCE), str(AUTOGRAD_SOURCE)],
                       build_directory=directory,
                       extra_cflags=_compile_flags(), is_python_module=False, verbose=False)


def max_numel():
    """Largest input (in values) the kernel takes at torch's current thread count."""
    return max(MIN_LIMIT, MAX_NUMEL_ONE_THREAD // torch.get_num_threads())


def _ninja_on_path():
    """torch's loader runs `ninja` from PATH; the pip package's binary may not be on it (e.g. a
    notebook kernel started without the environment's bin directory on PATH)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def takes(x, *params):
    """True when x (and the per-channel tensors in params) can go through the kernel."""
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.numel() <= max_numel()):
        return False
    if not (x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return False
    return all(p is None or (p.dtype == x.dtype and p.is_contiguous()) for p in params)


def forward(x, weight, bias, running_mean, running_var, momentum, eps):
    """(y, mean, invstd); the running statistics are updated in place, in C++."""
    return torch.ops.bnlib.forward(x, weight, bias, running_mean, running_var, momentum, eps)


def train(x, weight, bias, running_mean, running_var, momentum, eps):
    """y of a training-mode call, with its autograd node in C++ (backward: the kernel's)."""
    return torch.ops.bnlib.train(x, weight, bias, running_mean, running_var, momentum, eps)


def backward(dy, x, weight, mean, invstd, need_dx=True):
    """(dx or None, dl/dgamma, dl/dbeta)."""
    dx, dweight, dbias = torch.ops.bnlib.backward(dy if dy.dtype == x.dtype else dy.to(x.dtype),
                                                  x, weight, mean, invstd, need_dx)
    return (dx if need_dx else None), dweight, dbias
