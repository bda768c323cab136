"""Kept only for book/performance.ipynb's `from bnlib.experiments.common import recorded_file`:
recorded_file lives in bnlib.chapter. Delete this module once that chapter imports it there."""
from bnlib.chapter import recorded_file

__all__ = ["recorded_file"]
