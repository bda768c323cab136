"""Which backend runs a training-mode BN call: one registry that selects, falls back and reports.

The backends compute the same two-pass forward and compact backward as bnlib.functional's
formula (book/derivations/backward.ipynb), each faster where it applies; tried in this order:

  cpu       one compiled C++ call per direction, for small float32/float64 CPU inputs (cpu.py)
  triton    three Triton launches per direction on CUDA; opt-in, BNLIB_TRITON=1 (triton.py)
  composed  ATen operators with one full-size buffer per direction, float32/float64 (composed.py)

Where none takes the tensors (half precision on a CPU, or any call under torch.func), the
caller's formula runs (mixed dtypes never get here: bnlib.checks refuses them, as torch does).
A backend that cannot load or fails at run time warns once and is switched off for the
process; the call goes on with the next one, and the running statistics are never updated twice.
Book: book/performance.ipynb
"""
import contextlib
import os
import warnings

import torch

from bnlib.kernels import composed, cpu, triton

BACKENDS = {"cpu": cpu, "triton": triton, "composed": composed}
# Backends that write the running statistics outside torch's operators (so autograd's version
# counters must be told).
_WRITES_IN_PLACE = ("cpu", "triton")

_enabled = {"cpu": os.environ.get("BNLIB_CPU_KERNEL", "1") != "0",
            "triton": os.environ.get("BNLIB_TRITON", "0") == "1",
            "composed": True}
_loaded = {"composed"}   # composed needs nothing loaded
_errors = {}             # backend -> why it was switched off


# Marks a tensor as modified in place, so autograd refuses a stale saved copy of it.
_increment_version = (getattr(torch.autograd.graph, "increment_version", None)
                      or torch._C._increment_version)


def disable(name, err):
    """Record why backend `name` failed, warn once, and skip it from now on."""
    _loaded.discard(name)
    _errors[name] = f"{type(err).__name__}: {err}"
    reason = _errors[name].splitlines()[0]
    warnings.warn("bnlib: " + BACKENDS[name].UNAVAILABLE.format(reason=reason), RuntimeWarning,
                  stacklevel=3)


def _ready(name):
    if name in _loaded:
        return True
    if name in _errors:
        return False
    try:
        BACKENDS[name].load()
    except Exception as err:  # no compiler, no Triton, a failed build
        disable(name, err)
        return False
    _loaded.add(name)
    return True


def usable(name, x, *tensors):
    """True when backend `name` is switched on, loads, and takes these tensors."""
    return _enabled[name] and name not in _errors and BACKENDS[name].takes(x, *tensors) and _ready(name)


def select(x, *tensors):
    """The backend a training-mode call on these tensors runs on, or "formula" where none takes them."""
    return next((n for n in BACKENDS if usable(n, x, *tensors)), "formula")


def status(name):
    """'loaded', 'disabled', 'not loaded yet' or why it failed, for reports."""
    if not _enabled[name]:
        return "disabled"
    if name in _loaded:
        return "loaded"
    return _errors.get(name, "not loaded yet")


@contextlib.contextmanager
def use(**on):
    """Switch backends on or off within the block, e.g. `with use(cpu=False, triton=True):`."""
    unknown = set(on) - set(BACKENDS)
    if unknown:
        raise ValueError(f"backends must be among {sorted(BACKENDS)}, got {sorted(unknown)}")
    saved = dict(_enabled)
    _enabled.update({k: bool(v) for k, v in on.items()})
    try:
        yield
    finally:
        _enabled.update(saved)


def forward(x, weight, bias, running_mean, running_var, momentum, eps, formula):
    """(backend name, y, tensors its backward needs); running statistics updated in place.

    formula(x, weight, bias, eps) -> (y, mean, var, invstd) runs where no backend takes x.
    """
    for name in BACKENDS:
        if not usable(name, x, weight, bias, running_mean, running_var):
            continue
        try:
            y, *saved = BACKENDS[name].forward(x, weight, bias, running_mean, running_var,
                                               momentum, eps)
        except triton.KernelError as err:
            disable(name, err)
            if err.running_updated:  # done already: whoever runs next must not repeat it
                running_mean = running_var = None
            continue
        if name in _WRITES_IN_PLACE:
            for t in (running_mean, running_var):
                if t is not None:
                    _increment_version(t)
        return name, y, tuple(saved)
    y, mean, var, invstd = formula(x, weight, bias, eps)
    m = x.numel() // x.shape[1]
    composed.update_running_stats(running_mean, running_var, mean, var, m, momentum)
    return "formula", y, (mean, invstd)


def train(x, weight, bias, running_mean, running_var, momentum, eps):
    """y from a backend whose call builds its own (C++) autograd node, or None where none takes
    the tensors. Only for plain eager calls: that node has no jvp or torch.func rule."""
    if usable("cpu", x, weight, bias, running_mean, running_var):
        return cpu.train(x, weight, bias, running_mean, running_var, momentum, eps)
    return None


def backward(name, dy, x, weight, saved, need_dx, formula):
    """(dx or None, dl/dgamma, dl/dbeta) from the backend that ran the forward (saved: what its
    forward returned), else the composed backend, else formula(dy, x, weight, mean, invstd)."""
    if name in ("cpu", "triton") and name not in _errors:
        try:
            return BACKENDS[name].backward(dy, x, weight, *saved, need_dx=need_dx)
        except triton.KernelError as err:
            disable(name, err)
    mean, invstd = saved[:2]
    if _enabled["composed"] and composed.takes(x, dy, weight, mean):
        return composed.backward(dy, x, weight, mean, invstd, need_dx)
    return formula(dy, x, weight, mean, invstd)
