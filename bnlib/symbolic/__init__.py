"""SymPy derivations of Batch Normalization: every partial by sympy.diff through the forward graph.

partials(m): the paper's six partials for a batch of m (a `Partials` dataclass, see
bnlib.symbolic.partials); general(): the same chain for symbolic m (IndexedBase/Sum, see
bnlib.symbolic.general); staged_kernels/compact_kernels: memory traffic of the two backward forms
(bnlib.symbolic.passes); jacobian(m): d xhat / d x for a batch, and whitening(m): full whitening's
Jacobian for two features (bnlib.symbolic.jacobian).
"""
from bnlib.symbolic.general import General, general, latex_general, split_sums
from bnlib.symbolic.jacobian import (Jacobian, Whitening, closed_form, eigenvalues, jacobian,
                                     per_feature, structure, whitening)
from bnlib.symbolic.partials import (STAGES, Partials, compact_dx, equal, latex, lambdify,
                                     paper_forms, partials, reverse_mode, total_derivative,
                                     vanishes)
from bnlib.symbolic.passes import Kernel, compact_kernels, staged_kernels, traffic

__all__ = ["STAGES", "General", "Jacobian", "Kernel", "Partials", "Whitening", "closed_form",
           "compact_dx", "compact_kernels", "eigenvalues", "equal", "general", "jacobian", "latex",
           "lambdify", "latex_general", "paper_forms", "partials", "per_feature", "reverse_mode", "split_sums",
           "staged_kernels", "structure", "total_derivative", "traffic", "vanishes", "whitening"]
