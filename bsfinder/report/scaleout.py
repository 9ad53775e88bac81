"""Plain-text rendering of scale-out estimates (DDP/FSDP per-rank memory from one device)."""

from __future__ import annotations

from collections.abc import Sequence

from bsfinder.core.scaleout import RankEstimate
from bsfinder.units import format_bytes

__all__ = ["render_scale_out"]

_TERMS = {
    "single_device": "measured on one device",
    "gradient_buckets": "DDP gradient buckets",
    "sharded_weights": "weights sharded",
    "sharded_gradients": "gradients sharded",
    "sharded_optimizer_state": "optimizer state sharded",
    "gathered_block": "largest block gathered",
    "gathered_root": "root weights gathered",
}


def render_scale_out(estimates: Sequence[RankEstimate]) -> str:
    """One row per strategy and rank count, then how the fixed memory was made."""
    if not estimates:
        return "no estimates"
    first = estimates[0]
    source = first.source
    what = "an estimate" if source.get("kind") == "estimate" else "a single-device probe"
    lines = [
        f"per-rank memory from {what} of {source.get('model')} on "
        f"{source.get('device')} (memory line through batches "
        f"{', '.join(str(b) for b in source.get('line_batches', []))}); "
        f"{format_bytes(first.capacity_bytes)} per rank",
        "",
        f"  {'strategy':<8}  {'ranks':>5}  {'fixed':>10}  {'per sample':>10}  "
        f"{'optimizer step':>14}  {'largest batch':>13}  {'global':>8}",
    ]
    for e in estimates:
        lines.append(
            f"  {e.strategy:<8}  {e.ranks:>5}  {format_bytes(e.fixed_bytes):>10}  "
            f"{format_bytes(round(e.per_sample_bytes)):>10}  {format_bytes(e.floor_bytes):>14}  "
            f"{e.max_batch if e.max_batch is not None else 'none':>13}  "
            f"{e.global_max_batch if e.global_max_batch is not None else '-':>8}"
        )
    lines.append("")
    for e in estimates:
        estimated = e.source.get("kind") == "estimate"
        lines.append(f"  {e.strategy} x {e.ranks}: fixed = {_terms(e.terms, estimated)}")
        lines.append(f"      optimizer step = {_terms(e.floor_terms, estimated)}")
    lines.append(
        "  peak per rank = max(optimizer step, fixed + per sample x batch); batches are per "
        "rank. Check the answer with a real probe under torchrun (--strategy)."
    )
    return "\n".join(lines)


def _terms(terms: dict[str, int], estimated: bool = False) -> str:
    names = {**_TERMS, "single_device": "estimated on one device"} if estimated else _TERMS
    return ", ".join(
        f"{names.get(name, name)} {_signed(value, name == 'single_device')}"
        for name, value in terms.items()
    )


def _signed(value: int, plain: bool) -> str:
    text = format_bytes(abs(value))
    return text if plain else ("+" if value >= 0 else "-") + text
