"""The benchmark's cases (shape, layout, dtype) and the bytes each pass needs to move."""
from dataclasses import dataclass

import numpy as np

# Traffic actually needed, in tensors the size of x (see the Performance chapter):
# forward reads x for the statistics, reads it again to normalise, writes y;
# backward reads x and dy for the two reductions, again for dx, and writes dx.
TENSORS_MOVED = {"forward": 3, "backward": 5, "forward+backward": 8}

# The benchmark's shapes. On a CPU the largest 2D case is 256 MB per float32 tensor; it runs
# with capped repeats (see MAX_SECONDS_PER_CASE in bench/run.py) rather than scaled down.
SHAPES_2D = [(100, 500), (1024, 1024), (8192, 1024), (65536, 1024)]
SHAPES_4D = [(64, 64, 56, 56), (256, 256, 14, 14)]
# --quick: the same characters (tiny 2D, wide 2D, image-like 4D) at a few hundred KB each.
QUICK_2D = [(100, 500), (512, 256)]
QUICK_4D = [(8, 16, 14, 14)]


@dataclass(frozen=True)
class Case:
    """One input configuration: shape (N, C, ...), memory layout and dtype name."""
    shape: tuple
    layout: str = "contiguous"      # "contiguous" or "channels_last" (4D only)
    dtype: str = "float32"

    @property
    def numel(self):
        return int(np.prod(self.shape))

    @property
    def itemsize(self):
        return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]

    @property
    def name(self):
        dims = "x".join(str(s) for s in self.shape)
        kind = "2D" if len(self.shape) == 2 else ("NHWC" if self.layout == "channels_last" else "NCHW")
        return f"{kind} {dims} {self.dtype}"


def bytes_needed(case, pass_name):
    """Bytes a pass must move at least: TENSORS_MOVED[pass] tensors of x's size."""
    if pass_name not in TENSORS_MOVED:
        raise ValueError(f"pass_name must be one of {sorted(TENSORS_MOVED)}, got {pass_name!r}")
    return TENSORS_MOVED[pass_name] * case.numel * case.itemsize


def cases(quick=False, dtypes=("float32",)):
    """Every case to run: 2D shapes, then 4D shapes in NCHW and channels-last, per dtype."""
    shapes_2d, shapes_4d = (QUICK_2D, QUICK_4D) if quick else (SHAPES_2D, SHAPES_4D)
    out = []
    for dtype in dtypes:
        out += [Case(s, "contiguous", dtype) for s in shapes_2d]
        for s in shapes_4d:
            out += [Case(s, "contiguous", dtype), Case(s, "channels_last", dtype)]
    return out
