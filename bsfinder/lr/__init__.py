"""The learning rate found on the user's data: the LR range test (:func:`find_lr`)."""

from bsfinder.lr.range_test import LRRangeResult, find_lr

__all__ = ["LRRangeResult", "find_lr"]
