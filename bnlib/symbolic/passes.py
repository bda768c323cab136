"""Passes over memory of the backward pass: how many m-sized arrays each kernel reads and writes.

Counted from the general-m expressions (bnlib.symbolic.general): a kernel reads every distinct
batch array (an IndexedBase such as dy, x, xhat, dl_dxhat) that occurs in its expression once, and
writes one batch array when its result is per example (indexed by i or k), none for a reduction.
Book: book/performance.ipynb
"""
from dataclasses import dataclass

import sympy as sp

from bnlib.symbolic.general import General


@dataclass(frozen=True)
class Kernel:
    """One loop over the batch: its name, the arrays it reads and whether it writes one."""
    name: str
    reads: tuple
    writes: int

    @property
    def traffic(self):
        """m-sized arrays moved: reads plus writes."""
        return len(self.reads) + self.writes


def arrays_read(expr):
    """Names of the batch arrays (IndexedBase) an expression touches, sorted."""
    return tuple(sorted({str(a.base) for a in sp.sympify(expr).atoms(sp.Indexed)}))


def _per_example(expr, g):
    """True when expr has a free batch index (i or k) left: one value per example."""
    return bool({g.i, g.k} & sp.sympify(expr).free_symbols)


def staged_kernels(g: General):
    """The paper's order, one kernel per partial (each reduction inside its partial's loop)."""
    return [Kernel(name, arrays_read(e), int(_per_example(e, g))) for name, e in g.chain.items()]


def compact_kernels(g: General):
    """Compact form: its Sums fused into one reduction loop, then one elementwise loop for dx."""
    sums = sorted(g.compact.atoms(sp.Sum), key=str)
    reduce = Kernel("reductions " + ", ".join(str(s) for s in sums),
                    tuple(sorted(set().union(*(arrays_read(s) for s in sums)))), 0)
    elementwise = g.compact.xreplace({s: sp.Dummy() for s in sums})
    return [reduce, Kernel("dl_dx", arrays_read(elementwise), int(_per_example(elementwise, g)))]


def traffic(kernels):
    """Total m-sized arrays read plus written by a list of kernels."""
    return sum(k.traffic for k in kernels)
