"""Pictures (PNG) through matplotlib, an optional extra: ``pip install 'bsfinder[plot]'``."""

from __future__ import annotations

from typing import Any

from bsfinder.core.results import ProbeResult
from bsfinder.errors import SpecError
from bsfinder.memory.profile import MemoryProfile

__all__ = ["plot_probe", "plot_timeline"]

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


def plot_probe(result: ProbeResult, path: Any) -> None:
    """Throughput and peak memory against batch size: the capacity line, the failed trials,
    and the recommendations (largest, safe, time-optimal and its flat region) marked.
    ``path``: a file name or a binary file object (PNG)."""
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
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(9, 7), dpi=110, sharex=True)
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
