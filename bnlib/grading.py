"""The grading loop behind bnlib.exercises: a reader's function against a reference, case by case,
with errors measured in units of rounding and hints matched against typical mistakes."""
from dataclasses import dataclass

import numpy as np

U = np.finfo(np.float64).eps / 2  # unit roundoff of float64, 2^-53


class WrongAnswer(AssertionError):
    """Your function's result differs from bnlib.reference by more than rounding can explain."""


@dataclass(frozen=True)
class Verdict:
    exercise: str
    cases: tuple    # the names of the cases passed
    worst: float    # the largest error seen, as a fraction of its case's tolerance (< 1)

    def __str__(self):
        return f"{self.exercise}: correct on all {len(self.cases)} cases ({'; '.join(self.cases)})"


@dataclass
class Case:
    name: str
    args: tuple
    m: int          # values per channel
    kappa: float    # 1 + max|x| / sqrt(var + eps): how much centring x - mu_B amplifies rounding
    note: str = ""  # a hint given when fn raises or returns the wrong shape on this case

    @property
    def tol(self):
        # A correct float64 implementation: each output is a few operations on sums of m terms;
        # recursive summation of m terms of size <= S errs by at most (m - 1) u S (Higham, 2002,
        # sec. 4.2), and centring x - mu_B scales those errors by kappa. Errors are measured
        # against the size S of the terms (bnlib.exercises' *_scales functions), so err <= c m u
        # kappa with c a small constant; c = 16 leaves room for any correct order of operations
        # and stays far below the typical mistakes: the smallest, a missing eps, errs by about
        # eps / (2 sigma_B^2) ~ 1e-5 on these cases, against tolerances of 1e-13 to 1e-7.
        return 16 * self.m * U * self.kappa


def kappa(x, axes, eps):
    return float(1 + np.max(np.abs(x)) / np.sqrt(np.min(np.var(x, axis=axes)) + eps))


def as_outputs(got, names, shapes, case):
    """got (one array, or a tuple of them) as float arrays of the expected shapes."""
    where = f"on case {case.name!r}"
    if len(names) == 1:
        got = (got,)
    elif not isinstance(got, (tuple, list)) or len(got) != len(names):
        n = f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""
        raise ValueError(f"fn must return a tuple ({', '.join(names)}) {where}, got "
                         f"{type(got).__name__}{n}")
    out = []
    for name, g, shape in zip(names, got, shapes):
        try:
            out.append(np.asarray(g, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a float array {where}, got {type(g).__name__}") from e
        if out[-1].shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} {where}, got {out[-1].shape}")
    return out


def errors(got, want, scales):
    """Largest |got - want| of each output, in units of the size of its terms (NaN stays NaN)."""
    return [float(np.max(np.abs(g - w) / s)) for g, w, s in zip(got, want, scales)]


def as_list(out):
    return [np.asarray(o, dtype=np.float64) for o in (out if isinstance(out, tuple) else (out,))]


def grade(exercise, fn, cases, names, signature, reference, scales, mistakes):
    """fn against reference on every case; errors in units of scales(*args); mistakes: (hint, fn)."""
    if not callable(fn):
        raise TypeError(f"fn must be a function {signature}, got {type(fn).__name__}")
    worst = 0.0
    for case in cases:
        want, size = as_list(reference(*case.args)), scales(*case.args)
        note = f"\nhint: {case.note}" if case.note else ""
        try:
            raw = fn(*(np.copy(a) if isinstance(a, np.ndarray) else a for a in case.args))
        except Exception as e:
            raise WrongAnswer(f"{exercise}: your function raised {type(e).__name__}: {e} "
                              f"on case {case.name!r}{note}") from e
        try:
            got = as_outputs(raw, names, [w.shape for w in want], case)
        except ValueError as e:
            raise ValueError(f"{e}{note}") from None
        errs = errors(got, want, size)
        bad = [(n, e) for n, e in zip(names, errs) if not e <= case.tol]
        if not bad:
            worst = max(worst, max(errs) / case.tol)
            continue
        name, err = max(bad, key=lambda b: b[1] if np.isfinite(b[1]) else np.inf)
        lines = [f"{exercise}: wrong {name} on case {case.name!r}: largest error {err:.3g} "
                 f"(tolerance {case.tol:.2g}, both relative to the size of the terms)"]
        if len(bad) > 1:
            lines.append("also wrong: " + ", ".join(n for n, _ in bad if n != name))
        lines.append("hint: " + match_hint(got, case, size, mistakes, name, exercise))
        raise WrongAnswer("\n".join(lines))
    verdict = Verdict(exercise, tuple(c.name for c in cases), worst)
    print(verdict)
    return verdict


def match_hint(got, case, size, mistakes, name, exercise):
    """The hint of the first typical mistake that reproduces got, else a generic one."""
    for text, wrong in mistakes:
        with np.errstate(all="ignore"):
            if all(e <= case.tol for e in errors(got, as_list(wrong(*case.args)), size)):
                return text
    if not all(np.all(np.isfinite(g)) for g in got):
        return (f"{name} has NaN or inf values; a constant channel has sigma_B^2 = 0, and only eps "
                "(inside the square root) keeps the division finite")
    if case.name.startswith("large offset"):  # every earlier case passed
        return ("only the large offset fails: E[x^2] - E[x]^2 cancels catastrophically when the "
                "mean is large; subtract the mean first and average the squares of x - mu_B")
    return f"compare your steps with the chapter's derivation, one output of {exercise} at a time"
