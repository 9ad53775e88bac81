"""The memory line ``peak = a + k * batch``, fitted once for the search, compare and memory.

Peak memory is linear in the batch once activations dominate, so every part of bsfinder that
extrapolates memory draws this line: the search through its largest fitting trials, compare
for the bytes per sample of a result, scale-out for the fixed and per-sample bytes, the
profile and the estimate through two measured batches. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fit_memory_line", "least_squares_line", "line_through"]


def least_squares_line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(a, k)`` of ``y = a + k * x`` through ``points``, in the given order.

    Returns None with fewer than two distinct ``x``. The sums run in the order given: the
    callers' traces (search, compare) are pinned to the last bit.
    """
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    k = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return mean_y - k * mean_x, k


def line_through(low: tuple[float, float], high: tuple[float, float]) -> tuple[float, float]:
    """``(a, k)`` of the line through two points with different ``x``.

    The least-squares line through two points, written as the interpolation: its slope is the
    same float (both are the correctly rounded ``dy / dx``) but its intercept is anchored at
    ``low``, as the profiles' and the estimates' JSON has always had it (the mean-centred
    form differs in the last bit in about one case in five).
    """
    (x0, y0), (x1, y1) = low, high
    k = (y1 - y0) / (x1 - x0)
    return y0 - k * x0, k


def fit_memory_line(points: Sequence[tuple[int, int]]) -> tuple[float, float] | None:
    """Least-squares line ``peak = a + k * batch`` through the largest three fitting points.

    The largest batches are used because peak memory is linear in batch once activations
    dominate; at tiny batches allocator granularity and workspaces bend the curve.
    Returns ``(a, k)``, or None with fewer than two distinct batches or a non-positive slope.
    """
    fitted = least_squares_line(sorted(set(points))[-3:])
    if fitted is None or fitted[1] <= 0:
        return None
    return fitted
