"""bnlib: Batch Normalization derived (bnlib.symbolic), implemented (bnlib.reference in NumPy,
bnlib.functional and bnlib.nn in torch, run by one of bnlib.kernels' backends) and measured
(bnlib.experiments, bnlib.measure).

Submodules are imported on first use, so `import bnlib` does not pull in torch or SymPy.
"""
import importlib

__version__ = "0.1.0"
_SUBMODULES = ("reference", "functional", "kernels", "nn", "symbolic", "experiments", "plotting",
               "measure", "chapter", "checks", "exercises", "grading", "sync", "processes",
               "deploy", "renorm", "frozen", "conventions", "convert")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"bnlib.{name}")
    raise AttributeError(f"module 'bnlib' has no attribute {name!r}")


def cache_dir():
    """Where bnlib keeps what it builds or generates once per machine (the compiled CPU kernel,
    MNIST-1D): $BNLIB_CACHE_DIR, else $XDG_CACHE_HOME/bnlib, else ~/.cache/bnlib."""
    import os
    from pathlib import Path
    return Path(os.environ.get("BNLIB_CACHE_DIR")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnlib")
