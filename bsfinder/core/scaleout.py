"""Per-rank memory and the largest batch under DDP or FSDP, from a single-device probe.

A probe on one device measures the peak at several batches. Two regimes show in it: at
large batches a line ``a + k * batch`` (activations, on top of the weights and optimizer
state), and at small batches a floor, the optimizer step's peak (weights, gradients,
optimizer state and the step's temporaries), which does not grow with the batch. Data
parallelism keeps the activations per sample (``k``) and changes what each rank holds:

- DDP keeps every weight, gradient and optimizer state, plus its gradient buckets: a flat
  copy of every trainable gradient (``gradient_as_bucket_view=False``, the default), in
  both regimes.
- FSDP keeps ``1/N`` of the weights, gradients and optimizer state. At the activation peak
  (the turn from forward to backward) one block's weights are gathered whole, and the
  weights no block holds (embeddings, a head: the root's own) stay gathered through the
  step. The gradients are in the line's intercept only if it is large enough to hold them;
  otherwise they are not subtracted. The optimizer step runs on shards.

The state bytes come from the probe itself: the parameter, trainable and buffer bytes the
worker reports, and the optimizer state measured after a trial's steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bsfinder.core.fit import fit_memory_line
from bsfinder.core.results import ProbeResult, Recommendations, Trial
from bsfinder.errors import SpecError

__all__ = ["FSDP_GATHERED_BLOCKS", "RankEstimate", "probe_from_estimate", "scale_out"]

#: whole copies of the largest block an FSDP rank holds at its activation peak (measured on
#: CPU with gloo, benchmarks/distributed.py: one; the next block's prefetch comes later)
FSDP_GATHERED_BLOCKS = 1


@dataclass(frozen=True)
class RankEstimate:
    """One rank's memory under ``strategy`` over ``ranks`` ranks (bytes; batches per rank).

    ``peak(b) = max(floor_bytes, fixed_bytes + per_sample_bytes * b)``.

    Attributes:
        strategy: ``"ddp"`` or ``"fsdp"``.
        ranks: how many ranks share the model.
        fixed_bytes: the activation line's intercept on one rank.
        per_sample_bytes: added per sample of the per-rank batch.
        floor_bytes: the optimizer step's peak on one rank (any batch).
        capacity_bytes: the memory per rank the largest batch is for.
        max_batch: the largest per-rank batch under ``capacity_bytes`` (None: nothing fits,
            or no capacity).
        terms: how ``fixed_bytes`` was made from the single device's line: ``single_device``,
            then the strategy's additions (positive) and savings (negative).
        floor_terms: the same for ``floor_bytes``.
        source: the probe's model, device, the batches of its line and the state bytes.
    """

    strategy: str
    ranks: int
    fixed_bytes: int
    per_sample_bytes: float
    floor_bytes: int
    capacity_bytes: int | None
    max_batch: int | None
    terms: dict[str, int] = field(default_factory=dict)
    floor_terms: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def peak_bytes(self, batch_size: int) -> int:
        """Estimated per-rank peak at a per-rank ``batch_size``."""
        return max(self.floor_bytes, round(self.fixed_bytes + self.per_sample_bytes * batch_size))

    @property
    def global_max_batch(self) -> int | None:
        """The largest per-rank batch summed over the ranks."""
        return None if self.max_batch is None else self.max_batch * self.ranks


def probe_from_estimate(data: dict[str, Any]) -> ProbeResult:
    """A ``bsfinder estimate`` result (its JSON) in the shape :func:`scale_out` reads:
    each estimated batch as a point with its traced peak (the target's context and
    workspace included, as the estimate counts them), the target's memory as the capacity,
    and the model's bytes from the traced state. The estimate does not separate buffers
    from parameters: both count as parameters, so FSDP shards the buffers too (an
    overestimate of its saving by their size, e.g. BatchNorm's statistics).

    Raises:
        SpecError: not an estimate, or one with fewer than two estimated batches.
    """
    if not isinstance(data, dict) or data.get("kind") != "estimate":
        raise SpecError('not a bsfinder estimate result (no "kind": "estimate")')
    try:
        points = [
            (int(p["batch_size"]), int(p["peak_bytes"]), p.get("fits")) for p in data["points"]
        ]
        state = data["state_bytes"]
        weights, grads = int(state["weights"]), int(state["gradients"])
        optimizer = int(state["optimizer_state"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"the estimate result is incomplete: {exc!r} is missing or wrong") from None
    trials = tuple(
        Trial(
            batch_size=b,
            fits=fits is not False,
            peak_bytes=peak,
            state_bytes=weights + optimizer,
            phase="estimate",
        )
        for b, peak, fits in sorted(points)
    )
    target = data.get("target") or {}
    rec = Recommendations(
        max_batch=data.get("max_batch"), first_failure=data.get("first_failure"),
        max_pow2_batch=None, safe_batch=data.get("safe_batch"),
        headroom=float(data.get("headroom") or 0.0), time_optimal_batch=None,
        throughput_tolerance=0.05,
    )  # fmt: skip
    workload = {
        **(data.get("workload") or {}),
        "parameter_bytes": weights, "trainable_parameter_bytes": grads, "buffer_bytes": 0,
        "source": "estimate",
    }  # fmt: skip
    return ProbeResult(
        trials=trials, recommendations=rec, capacity_bytes=target.get("memory_bytes"),
        device={
            "kind": target.get("kind", "cuda"),
            **target,
            "device": target.get("card") or target.get("kind", "cuda"),
        },
        workload=workload,
    )  # fmt: skip


def scale_out(
    result: ProbeResult, strategy: str, ranks: int, *, capacity_bytes: int | None = None
) -> RankEstimate:
    """Estimate one rank's memory under ``strategy`` over ``ranks`` ranks from ``result``.

    Args:
        result: a single-device probe (this bsfinder's: it records the parameter bytes), or
            an estimate through :func:`probe_from_estimate`.
        strategy: ``"ddp"`` or ``"fsdp"``.
        ranks: ranks that share the model (>= 1).
        capacity_bytes: memory per rank; default: the probe's own capacity.

    Raises:
        SpecError: a distributed probe, a result without parameter bytes (an older
            bsfinder, or a ``train_step``), or fewer than two fitting trials with a peak.
    """
    if strategy not in ("ddp", "fsdp"):
        raise SpecError(f"strategy {strategy!r}: use ddp or fsdp")
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise SpecError(f"ranks must be a positive integer, got {ranks!r}")
    workload = result.workload
    if result.recommendations.world_size > 1 or workload.get("distributed"):
        raise SpecError("scale-out starts from a single-device probe; this one ran on ranks")
    needed = ("parameter_bytes", "trainable_parameter_bytes", "buffer_bytes")
    if any(workload.get(k) is None for k in needed):
        raise SpecError(
            "this result does not record the model's parameter bytes (a train_step, or a "
            "result from an older bsfinder): rerun the probe"
        )
    points = sorted((t.batch_size, t.peak_bytes) for t in result.trials if t.fits and t.peak_bytes)
    line = fit_memory_line(points)
    if line is None:
        raise SpecError(
            "the probe has fewer than two fitting trials with a measured peak: nothing to "
            "draw a memory line through"
        )
    fixed, per_sample = line
    floor = points[0][1]  # the smallest batch: the optimizer step's peak if it is the higher
    params = int(workload["parameter_bytes"])
    grads = int(workload["trainable_parameter_bytes"])
    buffers = int(workload["buffer_bytes"])
    states = [t.state_bytes for t in result.trials if t.fits and t.state_bytes is not None]
    # after a trial's steps the gradients are gone (zero_grad sets them to None): the state
    # is weights + buffers + optimizer state
    optimizer = max(0, max(states) - params - buffers) if states else 0
    terms: dict[str, int] = {"single_device": round(fixed)}
    floor_terms: dict[str, int] = {"single_device": floor}
    if strategy == "ddp":
        terms["gradient_buckets"] = floor_terms["gradient_buckets"] = grads
    else:
        share = 1 - 1 / ranks
        terms["sharded_weights"] = floor_terms["sharded_weights"] = -round(params * share)
        terms["sharded_optimizer_state"] = -round(optimizer * share)
        floor_terms["sharded_optimizer_state"] = terms["sharded_optimizer_state"]
        floor_terms["sharded_gradients"] = -round(grads * share)
        if fixed >= params + buffers + optimizer + grads:  # the line holds the gradients
            terms["sharded_gradients"] = floor_terms["sharded_gradients"]
        if ranks > 1:
            block = int(workload.get("largest_unit_bytes") or 0)
            terms["gathered_block"] = FSDP_GATHERED_BLOCKS * block
            terms["gathered_root"] = round(int(workload.get("root_unit_bytes") or 0) * share)
    per_rank_fixed = sum(terms.values())
    per_rank_floor = sum(floor_terms.values())
    capacity = capacity_bytes if capacity_bytes is not None else result.capacity_bytes
    max_batch = None
    if capacity is not None and capacity >= per_rank_floor and capacity > per_rank_fixed:
        max_batch = math.floor((capacity - per_rank_fixed) / per_sample) or None
    return RankEstimate(
        strategy=strategy,
        ranks=ranks,
        fixed_bytes=per_rank_fixed,
        per_sample_bytes=per_sample,
        floor_bytes=per_rank_floor,
        capacity_bytes=capacity,
        max_batch=max_batch,
        terms=terms,
        floor_terms=floor_terms,
        source={
            "model": workload.get("model"),
            "device": result.device.get("device"),
            "line_batches": [b for b, _ in points][-3:],
            "floor_batch": points[0][0],
            "parameter_bytes": params,
            "optimizer_state_bytes": optimizer,
            "kind": "estimate" if workload.get("source") == "estimate" else "probe",
        },
    )
