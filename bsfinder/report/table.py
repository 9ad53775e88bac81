"""Plain-text rendering of a probe: the trial table and the recommendations."""

from __future__ import annotations

from typing import Any

from bsfinder.core.recommend import ACCUMULATION_CAVEATS, ThroughputModel
from bsfinder.core.results import ProbeResult, Trial
from bsfinder.units import format_bytes, format_duration, format_rate

__all__ = ["render_summary", "render_trial_line", "render_trials"]

FIT, NO_FIT = "✓", "✗"
#: a fitting trial that ran without timing (it only asked "does it fit"): not a zero
UNTIMED = "—"
#: the step-time spread above which the summary says the machine is noisy
NOISY_SPREAD = 0.10


def _percent(part: int | None, whole: int | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{100 * part / whole:.0f}%"


def render_trial_line(index: int, trial: Trial, capacity_bytes: int | None) -> str:
    """One line per finished trial, as the progress display prints it."""
    if trial.fits:
        speed = (
            f"{format_duration(trial.step_s):>9}  {format_rate(trial.samples_per_s):>17}"
            if trial.timed
            else f"{UNTIMED:>9}  {'not timed':>17}"
        )
        detail = (
            f"{speed}  "
            f"peak {format_bytes(trial.peak_bytes)} ({_percent(trial.peak_bytes, capacity_bytes)})"
        )
    else:
        detail = f"{trial.failure or 'failed'}: {_short(trial.error)}"
    mark = FIT if trial.fits else NO_FIT
    return f"  trial {index:>2}  batch {trial.batch_size:>6}  {mark}  {detail}"


def render_trials(result: ProbeResult) -> str:
    """The table of every trial: batch, fits, step time, samples/s, peak, % of capacity."""
    cuda = result.device.get("kind") == "cuda"
    header = ["#", "batch", "phase", "fits", "step", "samples/s", "peak"]
    if cuda:
        header += ["allocated", "device used"]
    header += ["of capacity"]
    rows = [header]
    for i, t in enumerate(result.trials, 1):
        row = [
            str(i),
            str(t.batch_size),
            t.phase or "",
            FIT if t.fits else f"{NO_FIT} {t.failure or ''}".rstrip(),
            format_duration(t.step_s) if t.timed or not t.fits else UNTIMED,
            (format_rate(t.samples_per_s, "").strip() or "-") if t.timed or not t.fits else UNTIMED,
            format_bytes(t.peak_bytes),
        ]
        if cuda:
            row += [format_bytes(t.peak_allocated_bytes), format_bytes(t.device_used_bytes)]
        row += [_percent(t.peak_bytes, result.capacity_bytes)]
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(w) if c in (2, 3) else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _time_limit_line(result: ProbeResult) -> str:
    """What a search stopped by its time limit established, and what one more trial costs."""
    search = result.search
    limit = search.get("time_limit_s")
    rec = result.recommendations
    text = (
        f"reached after {format_duration(result.duration_s)} (--time-limit "
        f"{format_duration(limit)}): fits up to {rec.max_batch}"
    )
    edge, nxt = search.get("edge_estimate"), search.get("next_batch")
    cost = search.get("next_trial_s")
    if edge is not None and rec.max_batch is not None and edge > rec.max_batch:
        text += f"; the memory line puts the edge near {edge}, not tried"
    if nxt is not None and cost is not None:
        text += f"; one trial at {nxt} would take ~{format_duration(cost)}"
    return text + "; rerun with a longer --time-limit (or none) for the edge"


def render_summary(result: ProbeResult) -> str:
    """The recommendations, one per line, each with the numbers behind it."""
    rec = result.recommendations
    device = result.device
    cap = result.capacity_bytes
    where = f"{device.get('device', device.get('kind', '?'))} ({device.get('name') or '?'})"
    label = "budget" if device.get("kind") == "cpu" else "capacity"
    lines: list[str] = []

    def add(key: str, value: str) -> None:
        lines.append(f"{key:<22}: {value}" if key else f"{'':<24}{value}")

    if result.interrupted:
        add("interrupted", f"after {len(result.trials)} trials; below is what they establish")
    if rec.max_batch is None and not result.trials:
        add(
            "nothing fits",
            f"no trial could run on {where}, {label} {format_bytes(cap)}: "
            + ("; ".join(result.notes) or "the probe was stopped before its first trial")
            + ". Try --precision bf16-mixed, a smaller model, or a larger --memory-limit.",
        )
        return "\n".join(lines)
    if rec.max_batch is None and result.search.get("stop_reason") == "time-limit":
        add("time limit", _time_limit_line(result).replace("fits up to None", "nothing fitted"))
        return "\n".join(lines)
    if rec.max_batch is None:
        tried = " ".join(f"{t.batch_size} {FIT if t.fits else NO_FIT}" for t in result.trials)
        reason = next((t.error for t in result.trials if not t.fits and t.error), None)
        add(
            "nothing fits",
            f"not even batch {min((t.batch_size for t in result.trials), default=1)} fits on "
            f"{where}, {label} {format_bytes(cap)}; tried {tried}"
            + (f". First failure: {_short(reason, 200)}" if reason else "")
            + ". Try --precision bf16-mixed, a smaller model, or a larger --memory-limit.",
        )
        return "\n".join(lines)
    nxt = f"next tried: {rec.first_failure} {NO_FIT}" if rec.first_failure else "no failure"
    if rec.capped_by_max_batch:
        nxt = (
            "the data set's size; larger is not tried without --max-batch"
            if result.search.get("capped_by") == "dataset-size"
            else "stopped at --max-batch; larger may fit"
        )
    if result.search.get("stop_reason") == "time-limit":
        nxt = "a lower bound: the time limit stopped the search"
        add("time limit", _time_limit_line(result))
    peak = result.trial(rec.max_batch)
    world = rec.world_size
    dist = result.workload.get("distributed") or {}
    if world > 1 or dist:
        add(
            "ranks",
            f"{world} x {dist.get('strategy', '?')} over {dist.get('backend', '?')}: batches "
            "are per rank, each fitted on every rank and timed at the slowest rank",
        )
    add(
        "largest that fits",
        f"{rec.max_batch}{_global(rec.max_batch, world)}   ({nxt}; peak "
        f"{format_bytes(peak.peak_bytes if peak else None)} of {label} {format_bytes(cap)} "
        f"on {where})",
    )
    if peak is not None and peak.ranks:
        add(
            "peak per rank",
            ", ".join(f"{format_bytes(r.get('peak_bytes'))}" for r in peak.ranks)
            + f" (ranks 0-{len(peak.ranks) - 1})",
        )
    if rec.max_pow2_batch is not None:
        untried = result.trial(rec.max_pow2_batch) is None
        add(
            "largest power of two",
            f"{rec.max_pow2_batch}"
            + ("   (below the largest that fits; not run on its own)" if untried else ""),
        )
    if rec.safe_batch is not None:
        safe = result.trial(rec.safe_batch)
        estimate = (result.search or {}).get("safe_peak_estimate") if safe is None else None
        safe_peak: int | None = safe.peak_bytes if safe else estimate
        add(
            f"safe ({rec.headroom:.0%} headroom)",
            f"{rec.safe_batch}   (peak {format_bytes(safe_peak)}"
            + (" on the memory line" if estimate else "")
            + f", {_percent(safe_peak, cap)} of {label}"
            + ("; not run on its own" if estimate else "")
            + ("; a lower bound, as the largest is" if result.partial else "")
            + ")",
        )
    if rec.time_optimal_batch is not None:
        best = result.trial(rec.time_optimal_batch)
        base_batch = rec.learning_rate.base_batch if rec.learning_rate else None
        ref = result.trial(base_batch) if base_batch else None
        # the largest batch whose samples/s was measured (trials past the plateau are not
        # timed: only whether they fit matters)
        timed_trials = [
            t
            for t in result.trials
            if t.fits
            and t.samples_per_s
            and (rec.max_batch is None or t.batch_size <= rec.max_batch)
        ]
        largest = max(timed_trials, key=lambda t: t.batch_size, default=None)
        gain = ""
        if best and best.samples_per_s:
            if ref is not None and ref.fits and ref.samples_per_s and ref is not best:
                ratio = best.samples_per_s / ref.samples_per_s
                gain = f"; {ratio:.1f}x the samples/s of batch {ref.batch_size}"
            elif largest is not None and largest.samples_per_s and largest is not best:
                # why not the largest: it is barely faster per sample
                ratio = largest.samples_per_s / best.samples_per_s
                which = "largest" if largest.batch_size == rec.max_batch else "largest timed"
                gain = f"; the {which}, {largest.batch_size}, gives {ratio:.2f}x its samples/s"
        noise = rec.noise_scale
        if noise is not None:
            add("noise scale", _noise_line(noise))
        if rec.time_optimal_basis == "noise-scale" and rec.time_optimal_range is not None:
            low, high = rec.time_optimal_range
            flat = f"batches {low}-{high}" if low != high else f"only {low}"
            add(
                "time-optimal",
                f"{rec.time_optimal_batch}   (least (B + B_noise) / samples/s, the time to a "
                f"target loss; {flat} within {rec.throughput_tolerance:.0%} of it; "
                f"{_rate_at(rec, best)})",
            )
        else:
            add(
                "time-optimal",
                f"{rec.time_optimal_batch}{_global(rec.time_optimal_batch, world)}   "
                f"(>= {1 - rec.throughput_tolerance:.0%} of the best fitted throughput, "
                f"{_rate_at(rec, best)}{gain})",
            )
    noise_line = _timing_noise_line(rec)
    if noise_line:
        add("timing noise", noise_line)
    if rec.learning_rate is not None:
        lr = rec.learning_rate
        warm = ""
        if lr.warmup_epochs:
            warm = f", warm up over ~{lr.warmup_epochs:g} epochs"
            if lr.warmup_steps is not None:
                warm += f" ({lr.warmup_steps} steps)"
        if lr.rule == "range-test":
            found = rec.lr_range or {}
            rule = (found.get("suggestion") or {}).get("rule")
            add(
                "learning rate",
                f"{lr.lr:.3g} at batch {lr.batch_size} (LR range test on your data"
                + (f", {rule} rule" if rule else "")
                + "; no warm-up for batch scaling: found at this batch)",
            )
        else:
            add(
                "learning rate",
                f"{lr.lr:.3g} at {'global ' if world > 1 else ''}batch {lr.batch_size} "
                f"({lr.rule} rule, from {lr.base_lr:g} @ {lr.base_batch}){warm}",
            )
        for line in lr.advice:
            add("", line)
    if rec.plans:
        ranks = f" on {rec.ranks} GPUs" if rec.ranks > 1 else ""
        fastest = rec.plans[0]
        add(
            f"global batch {rec.global_batch}",
            f"fastest{ranks}: {_plan(fastest)}"
            + (" (ranks assumed to scale perfectly)" if rec.ranks > world else ""),
        )
        for plan in rec.plans[1:3]:
            add("", f"then {_plan(plan)}")
    elif rec.global_batch is not None:
        add(
            f"global batch {rec.global_batch}",
            f"no measured micro-batch divides {rec.global_batch // rec.ranks} per rank; try "
            "a global batch with more factors of two",
        )
        if any(p["accumulation"] > 1 for p in rec.plans[:3]):
            add("", "accumulation: " + "; ".join(ACCUMULATION_CAVEATS))
    env = result.workload.get("allocator_env")
    if env:
        settings = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
        add("allocator", f"{settings} (set the same in training for these numbers to hold)")
    timed = result.trial_seconds
    runner = result.runner
    workers = ""
    if runner.get("isolation") == "process":
        built = "imports and the model" if runner.get("model_builds") == "once" else "imports"
        workers = (
            f"; one fresh process per trial: start-up "
            f"{format_duration(runner.get('server_start_s'))} once ({built}), then "
            f"{format_duration(runner.get('trial_setup_s'))} of trial set-up"
        )
    add(
        "trials",
        f"{len(result.trials)} in {format_duration(result.duration_s)} "
        f"(timed steps {format_duration(timed)}{workers})",
    )
    for note in result.notes:
        add("note", note)
    return "\n".join(lines)


def _timing_noise_line(rec: Any) -> str:
    """One line with the numbers when the timing was noisy: the step-time spread and, when the
    bootstrap disagreed, the range of time-optimal batches reruns are likely to give."""
    spread = rec.step_time_spread
    high = spread is not None and spread >= NOISY_SPREAD
    if not high and not rec.time_optimal_noisy:
        return ""
    vary = (
        f"step times vary {spread:.0%} within trials on this machine"
        if spread is not None
        else "the trials' throughput scatters around the fitted curve"
    )
    agree = rec.time_optimal_agreement
    agreed = f" ({agree:.0%} of resamples agree)" if agree is not None else ""
    if rec.time_optimal_noisy and rec.time_optimal_noise_range is not None:
        low, top = rec.time_optimal_noise_range
        return f"{vary}; the time-optimal batch is noisy: {low}-{top}{agreed}"
    if rec.time_optimal_noisy:
        return f"{vary}; the time-optimal batch is noisy{agreed}"
    return f"{vary}; the time-optimal batch is stable under it{agreed}"


def _global(batch: int | None, world: int) -> str:
    """`` per rank (global N)`` under torchrun."""
    return f" per rank (global {batch * world})" if batch is not None and world > 1 else ""


def _rate_at(rec: Any, trial: Any) -> str:
    """The time-optimal batch's samples/s: measured when it was timed, else the fitted
    throughput model's (a batch between two trials, or one only checked for fit)."""
    if trial is not None and trial.samples_per_s:
        return format_rate(trial.samples_per_s)
    model = rec.throughput_model
    if model is None or rec.time_optimal_batch is None:
        return format_rate(None)
    rate = ThroughputModel(**model).samples_per_s(rec.time_optimal_batch)
    why = "only checked for fit, not timed" if trial is not None else "not run: between the trials"
    return f"{format_rate(rate)} on the throughput fit ({why})"


def _noise_line(noise: dict[str, Any]) -> str:
    value, low, high = noise.get("b_simple"), noise.get("low"), noise.get("high")
    size = (
        f"{noise['groups']} groups of {noise['micro_batches']} x {noise['micro_batch']}, "
        f"{format_duration(noise.get('seconds'))}"
    )
    if value is None:
        return (
            f"not measurable ({size}): the gradient's mean is lost in its noise at these "
            "weights; the knee rule is used"
        )
    interval = f"{low:.3g}-{high:.3g}" if low is not None and high is not None else "open"
    return f"B_simple {value:.3g} samples (95% {interval}; {size}). {noise.get('note', '')}"


def _plan(plan: dict[str, Any]) -> str:
    how = "measured" if plan["measured"] else "interpolated"
    return (
        f"micro-batch {plan['micro_batch']} x {plan['accumulation']} accumulation: "
        f"{format_rate(plan['samples_per_s'])} ({how}), "
        f"{format_duration(plan['optimizer_step_s'])} per optimizer step"
    )


def _short(text: str | None, limit: int = 90) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
