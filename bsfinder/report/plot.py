"""Pictures (PNG) through matplotlib, an optional extra: ``pip install 'bsfinder[plot]'``."""

from __future__ import annotations

from typing import Any

from bsfinder.errors import SpecError
from bsfinder.profiling import MemoryProfile

__all__ = ["plot_timeline"]

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
