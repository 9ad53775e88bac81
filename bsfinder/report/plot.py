"""Pictures (PNG) through matplotlib, an optional extra: ``pip install 'bsfinder[plot]'``."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any

from bsfinder.core.lr_range import MEDIAN_HALF_WIDTH, running_median
from bsfinder.core.results import ProbeResult
from bsfinder.errors import SpecError
from bsfinder.memory.profile import MemoryProfile

__all__ = ["LRView", "lr_view", "plot_lr_range", "plot_probe", "plot_timeline"]

_COLOURS = {"forward": "#1f77b4", "backward": "#d62728", "optimizer": "#2ca02c"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SpecError(
            "pictures need matplotlib: pip install 'bsfinder[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(profile: MemoryProfile, path: str) -> None:
    """Live tensor memory over one training step, coloured by phase, the peak marked."""
    if not profile.timeline:
        raise SpecError("this profile has no timeline to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    mib = 2**20
    for phase, colour in _COLOURS.items():
        xs = [op for op, _, ph in profile.timeline if ph == phase]
        ys = [live / mib for _, live, ph in profile.timeline if ph == phase]
        if xs:
            ax.plot(xs, ys, ".", markersize=2, color=colour, label=phase)
    op, peak, phase = max(profile.timeline, key=lambda p: p[1])
    ax.annotate(
        f"peak {peak / mib:.1f} MiB ({phase})",
        xy=(op, peak / mib),
        xytext=(0.02, 0.92),
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "0.3"},
    )
    ax.set_xlabel("aten op in the step")
    ax.set_ylabel("live tensor memory (MiB)")
    ax.set_title(f"one training step at batch {profile.batch_size}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class LRView:
    """The LR range test of a result, read for drawing (``recommendations.lr_range``).

    Attributes:
        lrs, losses, smoothed: the curve, step by step (a non-finite loss is ``nan``).
        stopped: why the sweep ended (``"diverged"``, ``"end"``, ``"time-limit"``...).
        lr: the suggested learning rate (None: no clear descent); rule: its rule;
            reason: how it was read, or why there is none.
        by_rule: every rule's value on the same curve.
        batch_size, optimizer, seconds: where and how long the sweep ran.
        isolation: ``"process"`` (a fresh process) or ``"inline"``.
        reference_lr, reference_rule: the LR scaled from the user's reference, if given;
            reference_base: that reference, ``(base_lr, base_batch)``.
        recommended: ``"range-test"``, ``"reference"`` or None; why: in words.
        interrupted: the sweep was stopped by Ctrl-C / SIGTERM.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    stopped: str
    lr: float | None
    rule: str
    reason: str
    by_rule: dict[str, float | None]
    batch_size: int | None
    optimizer: str
    seconds: float | None
    isolation: str
    reference_lr: float | None
    reference_rule: str
    reference_base: tuple[float, int] | None
    recommended: str | None
    why: str
    interrupted: bool

    def y_range(self) -> tuple[float, float]:
        """The loss axis: from below the lowest loss to half the descent above the start,
        so the descent fills the panel and the climb past the minimum runs off its top (a
        diverged step's loss can be orders of magnitude above the rest; fastai's plot
        drops the last steps for the same reason)."""
        smooth_ok = [(i, v) for i, v in enumerate(self.smoothed) if math.isfinite(v)]
        raw_ok = [v for v in self.losses if math.isfinite(v)]
        if not smooth_ok and not raw_ok:
            return 0.0, 1.0
        if smooth_ok:
            low_i, low = min(smooth_ok, key=lambda p: p[1])
            start = max(v for i, v in smooth_ok if i <= low_i)
        else:
            low, start = min(raw_ok), max(raw_ok)
        bottom = min([low, *raw_ok])
        top = start + 0.5 * (start - bottom)
        if self.stopped != "diverged":  # no climb to cut off: the whole curve in view
            ceiling = 2 * max(v for _, v in smooth_ok) if smooth_ok else max(raw_ok)
            top = max([top, *(v for _, v in smooth_ok), *(min(v, ceiling) for v in raw_ok)])
        span = top - bottom
        if span <= 0:
            pad = 0.05 * abs(start) or 0.05
            return start - pad, start + pad
        return bottom - 0.05 * span, top + 0.05 * span

    def loss_at(self, lr: float) -> float | None:
        """The smoothed loss at the step whose LR is nearest ``lr`` (on a log scale)."""
        pairs = enumerate(zip(self.lrs, self.smoothed, strict=True))
        steps = [i for i, (x, y) in pairs if x > 0 and math.isfinite(y)]
        if not steps or not lr > 0:
            return None
        near = min(steps, key=lambda i: abs(math.log(self.lrs[i] / lr)))
        return self.smoothed[near]


def lr_view(result: ProbeResult) -> LRView | None:
    """The result's LR range test, or None when it has none (a result from before the
    range test, no ``--data``, or a record without a curve to draw)."""
    record = result.recommendations.lr_range
    if not isinstance(record, dict):
        return None
    curve = record.get("curve")
    if not isinstance(curve, dict):
        return None
    lrs = _floats(curve.get("lrs"))
    losses = _floats(curve.get("losses"))
    smoothed = _floats(curve.get("smoothed"))
    if not lrs or len(losses) != len(lrs) or (smoothed and len(smoothed) != len(lrs)):
        return None
    suggestion = record.get("suggestion") or {}
    reference = record.get("reference") or {}
    by_rule = {str(k): _float(v) for k, v in (suggestion.get("by_rule") or {}).items()}
    seconds = _float(record.get("seconds"))
    batch = record.get("batch_size")
    return LRView(
        lrs=lrs, losses=losses, smoothed=smoothed or (math.nan,) * len(lrs),
        stopped=str(curve.get("stopped", "")),
        lr=_float(suggestion.get("lr", record.get("lr"))),
        rule=str(suggestion.get("rule", "")), reason=str(suggestion.get("reason", "")),
        by_rule=by_rule, batch_size=batch if isinstance(batch, int) else None,
        optimizer=str(record.get("optimizer", "")), seconds=seconds,
        isolation=str(record.get("isolation", "")),
        reference_lr=_float(reference.get("lr")),
        reference_rule=str(reference.get("rule", "")),
        reference_base=(
            (base_lr, base_batch)
            if (base_lr := _float(reference.get("base_lr"))) is not None
            and isinstance(base_batch := reference.get("base_batch"), int)
            else None
        ),
        recommended=record.get("recommended"), why=str(record.get("why") or ""),
        interrupted=bool(record.get("interrupted", False)),
    )  # fmt: skip


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _floats(values: Any) -> tuple[float, ...]:
    """JSON numbers, ``null`` (a non-finite loss) as ``nan``."""
    if not isinstance(values, list | tuple):
        return ()
    out = [_float(v) for v in values]
    return tuple(math.nan if v is None else v for v in out)


def lr_title(view: LRView) -> str:
    """One line of where the sweep ran, how far, and how long."""
    where = f"at batch {view.batch_size}" if view.batch_size is not None else ""
    parts = [p for p in (view.optimizer, f"{len(view.lrs)} steps", view.stopped) if p]
    if view.seconds is not None:
        parts.append(f"{view.seconds:.1f} s")
    return f"LR range test {where} ({', '.join(parts)})".replace("  ", " ")


def _draw_lr(ax: Any, view: LRView) -> None:
    """Loss against LR on a log axis: raw (faint), smoothed, the suggestion marked and
    labelled with its rule, the other rules and the scaled reference as light lines."""
    ax.plot(view.lrs, view.losses, "-", color="#1f77b4", alpha=0.25, linewidth=1,
            label="loss (each step)")  # fmt: skip
    ax.plot(view.lrs, view.smoothed, "-", color="#1f77b4", linewidth=1.8,
            label="smoothed (EMA 0.98)")  # fmt: skip
    # what minimum/3 reads (no lag); a diverged step's inf drawn as a gap
    median = [v if math.isfinite(v) else math.nan for v in running_median(view.losses,
              MEDIAN_HALF_WIDTH)]  # fmt: skip
    ax.plot(view.lrs, median, "--", color="#9467bd", linewidth=1.2,
            label=f"running median ({2 * MEDIAN_HALF_WIDTH + 1} steps)")  # fmt: skip
    ax.set_xscale("log")
    low, high = view.y_range()
    ax.set_ylim(low, high)
    styles = iter([":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2))])
    for rule, lr in view.by_rule.items():
        if lr is None or rule == view.rule or not lr > 0:
            continue
        ax.axvline(lr, color="0.5", alpha=0.6, linewidth=1.1, linestyle=next(styles, ":"),
                   label=f"{rule} rule: {lr:.3g}")  # fmt: skip
    if view.reference_lr is not None and view.reference_lr > 0:
        name = f"your reference, {view.reference_rule} rule" if view.reference_rule else "reference"
        ax.axvline(view.reference_lr, color="#ff7f0e", alpha=0.7, linewidth=1.1,
                   linestyle="--", label=f"{name}: {view.reference_lr:.3g}")  # fmt: skip
    if view.lr is not None and view.lr > 0:
        y = view.loss_at(view.lr)
        ax.axvline(view.lr, color="#2ca02c", alpha=0.8, linewidth=1.2,
                   label=f"suggested ({view.rule} rule): {view.lr:.3g}")  # fmt: skip
        if y is not None:
            ax.plot([view.lr], [y], "o", color="#2ca02c", markersize=7, zorder=5)
        # the label at the top, left of the line: above the flat start of the curve, away
        # from its climb past the minimum (right of it for a suggestion near the start)
        spread = math.log(view.lrs[-1] / view.lrs[0]) if view.lrs[-1] > view.lrs[0] > 0 else 0
        left = spread > 0 and math.log(view.lr / view.lrs[0]) / spread > 0.3
        ax.annotate(f"suggested {view.lr:.3g} ({view.rule})", xy=(view.lr, 0.96),
                    xycoords=("data", "axes fraction"), xytext=(-5, 0) if left else (5, 0),
                    textcoords="offset points", ha="right" if left else "left", va="top",
                    color="#2ca02c", fontsize=9, fontweight="bold")  # fmt: skip
    else:
        ax.text(0.02, 0.96, textwrap.fill(f"no suggestion: {view.reason}", 110),
                transform=ax.transAxes, va="top", fontsize=8, color="#d62728",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})  # fmt: skip
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(lr_title(view), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left" if view.lr is not None else "best", fontsize=8)


def plot_lr_range(result: ProbeResult, path: Any) -> None:
    """The LR range test alone: loss against learning rate, the suggestion marked (what
    Lightning's and fastai's ``lr_find`` plots show). ``path``: a file name or a binary
    file object (PNG).

    Raises:
        SpecError: the result has no LR range test (probe with ``--data``), or matplotlib
            is not installed.
    """
    view = lr_view(result)
    if view is None:
        raise SpecError("this result has no LR range test to plot: probe with --data")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    _draw_lr(ax, view)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_probe(result: ProbeResult, path: Any, *, lr_curve: bool = True) -> None:
    """Throughput and peak memory against batch size: the capacity line, the failed trials,
    and the recommendations (largest, safe, time-optimal and its flat region) marked; and,
    when the probe ran the LR range test (``--data``), a third panel with its curve (see
    :func:`plot_lr_range`). ``path``: a file name or a binary file object (PNG).
    ``lr_curve=False`` leaves that panel out (the HTML report draws its own).

    One figure, not a second file: ``--plot PATH`` names one picture, and the curve belongs
    to the time-optimal batch the panels above mark."""
    fitting = sorted(
        (t.batch_size, t.samples_per_s, t.peak_bytes)
        for t in result.trials
        if t.fits and t.samples_per_s
    )
    if not fitting:
        raise SpecError("this result has no fitting, timed trial to plot")
    plt = _pyplot()
    mib = 2**20
    rec = result.recommendations
    view = lr_view(result) if lr_curve else None
    if view is None:
        fig, (speed, memory) = plt.subplots(2, 1, figsize=(9, 7), dpi=110, sharex=True)
    else:
        fig = plt.figure(figsize=(9, 10.5), dpi=110)
        speed = fig.add_subplot(3, 1, 1)
        memory = fig.add_subplot(3, 1, 2, sharex=speed)
        speed.tick_params(labelbottom=False)
        _draw_lr(fig.add_subplot(3, 1, 3), view)
    batches = [b for b, _, _ in fitting]
    speed.plot(batches, [r for _, r, _ in fitting], "o-", color="#1f77b4")
    speed.set_ylabel("samples/s")
    speed.set_ylim(bottom=0)
    peaks = [(b, p / mib) for b, _, p in fitting if p is not None]
    memory.plot([b for b, _ in peaks], [p for _, p in peaks], "o-", color="#9467bd", label="peak")
    failed = sorted({t.batch_size for t in result.trials if not t.fits})
    if failed:
        top = max((p for _, p in peaks), default=0.0)
        memory.plot(failed, [top] * len(failed), "x", color="#d62728", markersize=9,
                    label="did not fit")  # fmt: skip
    if result.capacity_bytes:
        label = "budget" if result.device.get("kind") == "cpu" else "capacity"
        memory.axhline(result.capacity_bytes / mib, color="0.3", linestyle="--", label=label)
    memory.set_ylabel("peak memory (MiB)")
    memory.set_xlabel("batch size")
    memory.set_ylim(bottom=0)
    memory.set_xscale("log", base=2)
    if rec.time_optimal_range is not None:
        low, high = rec.time_optimal_range
        speed.axvspan(low, high, color="#2ca02c", alpha=0.12, label="within 5% of the best time")
    marks = [
        (rec.max_batch, "largest", "#d62728"),
        (rec.safe_batch, "safe", "#ff7f0e"),
        (rec.time_optimal_batch, "time-optimal", "#2ca02c"),
    ]
    for batch, name, colour in marks:
        if batch is None:
            continue
        for ax in (speed, memory):
            ax.axvline(batch, color=colour, alpha=0.7, linewidth=1.2)
        speed.annotate(f"{name} {batch}", xy=(batch, 0), xytext=(3, 6), color=colour,
                       textcoords="offset points", rotation=90, fontsize=8)  # fmt: skip
    model = result.workload.get("model_label") or result.workload.get("model") or "model"
    where = result.device.get("device", result.device.get("kind", ""))
    speed.set_title(f"{model} on {where}: throughput and memory by batch size")
    for ax in (speed, memory):
        ax.grid(alpha=0.3)
    if rec.time_optimal_range is not None:
        speed.legend(loc="lower right", fontsize=8)
    memory.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
