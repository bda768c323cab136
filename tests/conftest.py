"""Session-wide test setup, run before any test module is imported."""
import os

import torch

# Without a GPU, bnlib's Triton kernels are tested in Triton's interpreter, on CPU tensors
# (tests/test_kernels_triton.py, tests/test_parity.py). Triton reads TRITON_INTERPRET whenever a function is decorated,
# its own library's functions included when triton is first imported, so it is set here, before
# any test can import triton. Nothing else runs Triton on a CPU-only machine.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
