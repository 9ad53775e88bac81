"""``bsfinder lr``'s text: the suggestion, why, the other rules, and the curve in brief."""

from __future__ import annotations

import math

from bsfinder.lr import LRRangeResult
from bsfinder.units import format_duration

__all__ = ["render_lr_range"]

#: rows of the curve shown (evenly spaced over the steps run, the suggestion's and the last)
CURVE_ROWS = 12


def render_lr_range(result: LRRangeResult) -> str:
    """The range test as a few lines and a short table of the curve."""
    curve, suggestion = result.curve, result.suggestion
    lines = []
    if result.lr is not None:
        lines.append(
            f"learning rate : {result.lr:.3g} at batch {result.batch_size} ({result.optimizer}, "
            f"{suggestion.rule} rule)"
        )
    else:
        lines.append(f"learning rate : none ({result.optimizer}, batch {result.batch_size})")
    lines.append(f"why           : {suggestion.reason}")
    others = [
        f"{rule} {lr:.3g}" if lr is not None else f"{rule} -"
        for rule, lr in suggestion.by_rule.items()
        if rule != suggestion.rule
    ]
    lines.append(f"other rules   : {', '.join(others)}")
    first = f"{curve.lrs[0]:.2g}" if curve.lrs else "-"
    last = f"{curve.lrs[-1]:.3g}" if curve.lrs else "-"
    lines.append(
        f"sweep         : {len(curve.lrs)} steps, lr {first} to {last}, stopped: "
        f"{curve.stopped}; {format_duration(result.seconds)} ({result.isolation})"
    )
    if result.interrupted:
        lines.append("note          : interrupted: the suggestion reads the steps measured")
    if curve.lrs:
        lines += ["", "    step          lr        loss    smoothed"]
        shown = _rows(len(curve.lrs), suggestion.index)
        for i in shown:
            mark = "  <- suggestion" if i == suggestion.index and result.lr is not None else ""
            lines.append(
                f"  {i + 1:>6}  {curve.lrs[i]:>10.3g}  {_loss(curve.losses[i]):>10}  "
                f"{_loss(curve.smoothed[i]):>10}{mark}"
            )
    return "\n".join(lines)


def _rows(count: int, index: int | None) -> list[int]:
    step = max(1, count // CURVE_ROWS)
    rows = set(range(0, count, step)) | {count - 1}
    if index is not None and 0 <= index < count:
        rows.add(index)
    return sorted(rows)


def _loss(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "not finite"
