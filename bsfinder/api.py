"""The public entry points: thin facades over specs, runners, the search and recommendations."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any, NamedTuple

from bsfinder.core.recommend import weight_decay_advice
from bsfinder.core.results import LearningRateAdvice, ProbeResult
from bsfinder.devices.cpu import check_cpu_budget
from bsfinder.devices.select import resolve_device
from bsfinder.errors import BsfinderError, SpecError, UserCodeError, is_batchnorm_one_sample
from bsfinder.execution.distributed import DistributedRunner
from bsfinder.execution.inline import InlineRunner
from bsfinder.execution.placement import asked_device, build_runner, place
from bsfinder.execution.process import ProcessRunner
from bsfinder.memory.estimate import MemoryEstimate
from bsfinder.memory.profile import MemoryProfile, memory_scaling
from bsfinder.options import (
    CHECKPOINTING,
    BudgetOptions,
    ExecutionOptions,
    Granularity,
    RecommendOptions,
    SearchOptions,
    WorkloadOptions,
    size_bytes,
)
from bsfinder.probe import ProbeEvent, ProbeSettings, run_probe, with_noise_scale
from bsfinder.units import format_bytes
from bsfinder.workload.loading import InputSpec, RealBatches, load_object, parse_input_spec
from bsfinder.workload.spec import (
    batch_source,
    batch_specs,
    factory_of,
    is_module,
    optimizer_name,
    spec_fields,
)
from bsfinder.workload.step import WorkloadSpec, batches_per_call

__all__ = [
    "FrontierPoint",
    "WhatIfRow",
    "estimate_frontier",
    "estimate_memory",
    "estimate_what_if",
    "find_batch_size",
    "profile_memory",
]

#: the largest micro-batch the noise scale is measured with
NOISE_MICRO_BATCH = 64


def find_batch_size(
    model: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    inputs: Sequence[str | InputSpec] | None = None,
    make_batch: Callable[[int], Any] | None = None,
    train_step: Callable[[int], Any] | None = None,
    model_kwargs: dict[str, Any] | None = WorkloadOptions.model_kwargs,
    optimizer: Any = WorkloadOptions.optimizer,
    precision: str = WorkloadOptions.precision,
    loss: str = WorkloadOptions.loss,
    keep_outputs: bool = WorkloadOptions.keep_outputs,
    checkpointing: str = WorkloadOptions.checkpointing,
    mode: str = WorkloadOptions.mode,
    batches: Any = WorkloadOptions.batches,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    forward_kwargs: dict[str, Any] | None = WorkloadOptions.forward_kwargs,
    device: str = ExecutionOptions.device,
    memory_limit: int | str | None = BudgetOptions.memory_limit,
    max_batch: int | None = SearchOptions.max_batch,
    start_batch: int = SearchOptions.start_batch,
    granularity: Granularity = SearchOptions.granularity,
    headroom: float = RecommendOptions.headroom,
    warmup_steps: int = ExecutionOptions.warmup_steps,
    steps: int = ExecutionOptions.steps,
    base_lr: float | None = RecommendOptions.base_lr,
    base_batch: int | None = RecommendOptions.base_batch,
    lr_rule: str = RecommendOptions.lr_rule,
    dataset_size: int | None = RecommendOptions.dataset_size,
    data: Callable[[int], Any] | str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    global_batch: int | None = RecommendOptions.global_batch,
    gpus: int = RecommendOptions.gpus,
    strategy: str | None = ExecutionOptions.strategy,
    isolation: str = ExecutionOptions.isolation,
    memory_model: bool = SearchOptions.memory_model,
    time_limit: float | str | None = SearchOptions.time_limit,
    trial_timeout_s: float | None = ExecutionOptions.trial_timeout_s,
    on_event: Callable[[ProbeEvent], None] | None = None,
) -> ProbeResult:
    """Find the largest batch that trains, and the time-optimal batch, by real training steps.

    Each trial runs warm-up + timed steps (forward, loss, backward, optimizer step,
    zero_grad) at one batch size, in a fresh worker process after any failure, so that the
    answer is what a fresh training process can do.

    Args:
        model: an ``nn.Module``, an ``nn.Module`` class or factory function, or a spec string
            ``"pkg.mod:Net"`` / ``"path/file.py:make_model"``. Not needed with ``train_step``.
        input_shape: shape of one float32 sample, e.g. ``(3, 224, 224)``.
        inputs: input specs for several or non-float inputs, e.g.
            ``["input_ids=128:int64:50257", "labels=128:int64:50257"]``.
        make_batch: ``make_batch(batch_size)`` returning a tensor, tuple, dict or
            ``(args, kwargs)``: the model is called with it.
        train_step: your own ``train_step(batch_size)`` that runs one full training step;
            bsfinder times it and measures memory. A step object that trains several
            batches per call says so with a ``batches_per_call`` attribute (an int; step
            times are then per batch).
        model_kwargs: keyword arguments for a model class or factory.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"`` (momentum 0.9) or ``"none"``, or an
            optimizer object: its family is used (bsfinder makes its own, fresh per trial);
            with ``train_step``, your optimizer is also restored after the probe, with the
            values of every parameter it updates.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"fp16-mixed"`` (autocast, float32
            weights; GradScaler for fp16), or ``"bf16-true"`` (weights, gradients, optimizer
            state and float inputs in bfloat16).
        loss: ``"auto"`` (the model's own ``loss`` if it returns one, else the mean of its
            outputs), ``"mean"`` or ``"cross-entropy"`` (random targets over the last dim).
        keep_outputs: keep the model's outputs (logits) alive through backward and the
            optimizer step, as a loop that holds them does. By default they are released
            once the loss is taken, as HF Trainer, Lightning and ``loss = model(x).loss``
            loops do. Not with ``train_step`` (your step decides).
        checkpointing: ``"none"`` or ``"blocks"``: activation checkpointing of the model's
            repeated blocks (the elements of its ``nn.ModuleList``; a Hugging Face model's
            own ``activation_checkpointing_enable``), recomputed in the backward instead of
            kept. Not with ``train_step``.
        mode: ``"train"`` (the training step above), ``"eval"`` (``model.eval()`` and
            ``torch.no_grad()``: forward and loss, no backward, no optimizer) or ``"infer"``
            (``model.eval()`` and ``torch.inference_mode()``: forward only): the largest
            evaluation or inference batch and its throughput. The learning rate and the
            noise scale are training's: skipped there, with a note. See docs/modes.md.
        batches: real samples as the batch source instead of specs: a ``Dataset`` (map-style
            or iterable, a Hugging Face dataset too), a ``DataLoader`` (its dataset and
            ``collate_fn``), a function of no arguments returning one, or its spec
            ``"pkg.mod:obj"``. Up to 4,096 samples are read (evenly spaced); a trial batch
            of ``b`` is the ``b`` largest (the longest sequences: variable-length data peaks
            on its longest batch), collated. A dict batch's keys are checked against the
            model's ``forward``. With ``loss="cross-entropy"`` a tuple sample's last element
            is the target. See docs/real-data.md.
        collate_fn: collates a list of samples of ``batches`` (default: the loader's, else
            ``torch.utils.data.default_collate``), e.g. an HF ``DataCollatorWithPadding``.
        forward_kwargs: keyword arguments passed to every forward call, tensors or not
            (``{"return_loss": True}``); checked against the model's ``forward``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        memory_limit: bytes or text like ``"24GiB"``. CPU: the budget (default: 90% of the
            available RAM, or of the container's cgroup memory limit minus its use when that
            is less; under torchrun shared by the node's ranks), from 16 MiB up to the RAM or
            the container's limit. CUDA: cap the allocator, to plan for a smaller card.
        max_batch: never try a larger batch.
        start_batch: first batch tried (then grown 4x: 1, 4, 16, ...; doubled at
            granularity ``"pow2"``).
        granularity: answer to a multiple of this, ``1`` for exact, ``"pow2"``.
        headroom: fraction of capacity the recommended safe batch leaves free.
        warmup_steps: untimed steps per trial (the first creates the optimizer state).
        steps: timed steps per trial (the median is reported).
        base_lr: a learning rate known to work at ``base_batch``, to scale.
        base_batch: the batch ``base_lr`` was tuned at.
        lr_rule: ``"auto"`` (SGD: the noise-capped rule with ``data``, else linear;
            Adam-family: sqrt), ``"linear"``, ``"sqrt"``, ``"noise"``, ``"none"``.
        dataset_size: samples per epoch, to give the warm-up in steps.
        data: ``make_loader(batch_size)`` (or its spec ``"pkg.mod:make_loader"``) returning an
            iterable of real batches (tuples passed to the model; with
            ``loss="cross-entropy"`` the last element is the target). After the search,
            the gradient noise scale is measured on them (a few seconds), and the
            time-optimal batch minimises ``(B + B_noise) / samples/s``.
        checkpoint: a ``state_dict`` file to load before measuring the noise scale (it
            grows as training progresses: measure where training will be).
        global_batch: plan micro-batch x accumulation x ``gpus`` for this global batch.
        gpus: data-parallel ranks for ``global_batch``.
        strategy: probe on every rank of the initialised process group (or of
            ``torchrun``'s environment), each trial process wrapping the model in
            ``"ddp"``, ``"fsdp"`` (FSDP2 ``fully_shard`` per block) or ``"none"`` (a
            ``train_step`` that wraps its own). Every rank must then call this function
            with the same arguments (each rank its own ``memory_limit``); a batch fits only
            if it fits on every rank, and every rank gets the same result. Without a group
            or launcher: a world of one. None (default): this process alone, group or not.
            See docs/distributed.md.
        isolation: ``"process"`` (each trial in a fresh process forked from a worker),
            ``"inline"`` (this process, with your objects), ``"auto"`` (process when the
            workload can travel there: what a script or notebook defines goes by value,
            and a ``train_step`` steps copies of the model and optimizer it closes over;
            not an object that cannot be pickled, nor tensors already on the GPU here;
            then inline, with a :class:`~bsfinder.errors.BsfinderWarning` saying why).
        memory_model: jump near the answer with a fitted ``peak = a + k*batch`` line.
        time_limit: seconds (or ``"5m"``) after which no trial is started (default 90;
            None or ``"none"``: no limit); the result is then ``partial``, with what the
            trials established and, in ``result.search``, where the memory line puts the
            edge and what the next trial would have cost.
        trial_timeout_s: the longest a trial process may go without progress before any
            step has been timed (start-up, model build, the first trial; default
            :data:`~bsfinder.options.DEFAULT_TRIAL_TIMEOUT_S`);
            after that the limit is 10x the step time predicted from the slowest step per
            sample seen plus three model builds, at least 30 s or, when given, this. A
            trial stopped for it, or one whose process dies, is judged on evidence: out of
            memory only near the budget (or when it fits only under a more generous one),
            otherwise the model's crash or hang (:class:`~bsfinder.errors.ModelCrashError`).
        on_event: progress callback receiving :class:`~bsfinder.probe.ProbeEvent`.

    Returns:
        A frozen :class:`~bsfinder.core.results.ProbeResult`. Your model, optimizer and RNG state
        are exactly as before the call.

    Raises:
        SpecError: invalid arguments (exit code 2 in the CLI).
        UserCodeError: the model raised a non-OOM exception.
        WorkerError: the worker process could not start.

        An error from measuring the noise scale (``data``: the loader raised, the model
        raised on a data batch) comes after the search: its ``result`` attribute holds the
        probe's result, trials and recommendations by the throughput knee, with a note
        naming the failure. Ctrl-C returns what was measured, with ``interrupted`` set.

    Example:
        >>> result = find_batch_size(Net(), input_shape=(3, 64, 64), device="cpu",
        ...                          memory_limit="2GiB")  # doctest: +SKIP
        >>> result.max_batch, result.time_optimal_batch  # doctest: +SKIP
        (504, 128)
    """
    execution = ExecutionOptions(
        device=device, isolation=isolation, warmup_steps=warmup_steps, steps=steps,
        trial_timeout_s=trial_timeout_s, strategy=strategy,
    )  # fmt: skip
    search = SearchOptions(
        start_batch=start_batch, max_batch=max_batch, granularity=granularity,
        memory_model=memory_model, time_limit=time_limit,
    )  # fmt: skip
    recommend = RecommendOptions(
        headroom=headroom, base_lr=base_lr, base_batch=base_batch, lr_rule=lr_rule,
        dataset_size=dataset_size, global_batch=global_batch, gpus=gpus,
    )  # fmt: skip
    workload = WorkloadOptions(
        inputs=inputs, model_kwargs=model_kwargs, optimizer=optimizer, precision=precision,
        loss=loss, keep_outputs=keep_outputs, checkpointing=checkpointing, mode=mode,
        batches=batches, forward_kwargs=forward_kwargs,
    )  # fmt: skip
    make_batch = batch_source(
        batches, collate_fn=collate_fn, input_shape=input_shape, inputs=inputs,
        make_batch=make_batch, train_step=train_step, loss=loss,
    )  # fmt: skip
    step = _Step(input_shape, make_batch, train_step, data, checkpoint)
    budget = BudgetOptions(memory_limit=memory_limit)
    with _prepared(model, step, workload, budget, execution, search, recommend) as prepared:
        runner, settings, budget_source = prepared
        result = run_probe(runner, settings, on_event=_saying(on_event, budget_source))
    if mode != "train":
        result = _without_training_advice(result, mode, base_lr=base_lr, data=data)
        data = None
    if data is None or result.interrupted or not result.recommendations.time_optimal_batch:
        return result
    from bsfinder.noise.data import noise_on_data

    # the estimator is unbiased at any micro-batch: a moderate one keeps it quick and within
    # small data sets (a CPU's throughput knee can be past the whole data set)
    micro = min(result.recommendations.time_optimal_batch, NOISE_MICRO_BATCH)
    if dataset_size is not None:
        micro = max(1, min(micro, dataset_size // 8))
    try:
        if on_event is not None:
            on_event(ProbeEvent("noise", batch_size=micro))
        noise = noise_on_data(
            model, data, micro_batch=micro, device=result.device.get("device", "cpu"),
            checkpoint=checkpoint, loss=loss, precision=precision, model_kwargs=model_kwargs,
        )  # fmt: skip
    except KeyboardInterrupt:  # the probe's trials are kept; the knee stands
        note = "the noise-scale measurement was interrupted: recommendations by the knee"
        return replace(result, interrupted=True, notes=(*result.notes, note))
    except BsfinderError as exc:
        # the search's trials stand, and so do the recommendations by the throughput knee:
        # they travel on the error (the CLI writes them, then reports the error)
        note = f"the gradient noise scale was not measured ({_short_reason(exc)}): " + (
            "recommendations by the throughput knee"
        )
        exc.result = replace(result, notes=(*result.notes, note))
        raise
    result = with_noise_scale(result, noise, settings)
    if settings.world_size > 1:
        note = "the LR range test runs on one process: under torchrun it is not run"
        return replace(result, notes=(*result.notes, note))
    return _with_lr_range(
        result, model, data, optimizer=optimizer, loss=loss, precision=precision,
        checkpoint=checkpoint, model_kwargs=model_kwargs, isolation=isolation,
        on_event=on_event, dataset_size=dataset_size, checkpointing=checkpointing,
    )  # fmt: skip


def _with_lr_range(
    result: ProbeResult,
    model: Any,
    data: Any,
    *,
    optimizer: Any,
    loss: str,
    precision: str,
    checkpoint: Any,
    model_kwargs: dict[str, Any] | None,
    isolation: str,
    on_event: Callable[[ProbeEvent], None] | None,
    dataset_size: int | None,
    checkpointing: str = "none",
) -> ProbeResult:
    """``result`` with the LR range test at its time-optimal batch: the pair (batch, LR),
    with the probe's checkpointing (the batch may fit only with it).

    The range test's LR is recommended (``learning_rate``, rule ``"range-test"``): it was
    measured at this batch on the user's data, where a scaled reference carries the
    reference's own error to the new batch. The scaled reference, when ``base_lr`` was
    given, is kept in ``lr_range["reference"]``, and is recommended instead when the range
    test shows no clear descent. An error or Ctrl-C in the range test keeps the probe's
    result, with a note.
    """
    from bsfinder.lr import find_lr

    rec = result.recommendations
    batch = rec.time_optimal_batch
    if batch is None or (isinstance(optimizer, str) and optimizer == "none"):
        return result
    on_step = None
    if on_event is not None:
        from bsfinder.lr.range_test import LR_STEPS

        on_event(ProbeEvent("lr-range", batch_size=batch))

        def on_step(step: int, lr: float, loss: float) -> None:
            on_event(ProbeEvent("lr-step", batch_size=batch, step=step, total_steps=LR_STEPS))

    try:
        found = find_lr(
            model, data, batch_size=batch, optimizer=optimizer, loss=loss,
            precision=precision, checkpoint=checkpoint, model_kwargs=model_kwargs,
            device=result.device.get("device", "cpu"), checkpointing=checkpointing,
            isolation="inline" if isolation == "inline" else "process", on_step=on_step,
        )  # fmt: skip
        if on_event is not None:
            on_event(ProbeEvent("lr-range-done", batch_size=batch))
    except KeyboardInterrupt:
        note = "the LR range test was interrupted: no learning rate from it"
        return replace(result, interrupted=True, notes=(*result.notes, note))
    except BsfinderError as exc:
        note = f"the LR range test did not run ({_short_reason(exc)})"
        return replace(result, notes=(*result.notes, note))
    reference = rec.learning_rate
    record: dict[str, Any] = found.to_dict()
    # as JSON has it (tuples as lists): a result read back from its JSON equals this one
    record["reference"] = None if reference is None else json.loads(json.dumps(asdict(reference)))
    if found.interrupted:  # the curve so far is kept; no LR is read from half a sweep
        record["recommended"] = "reference" if reference is not None else None
        record["why"] = f"interrupted after {len(found.curve.lrs)} steps"
        note = (
            f"the LR range test was interrupted after {len(found.curve.lrs)} steps: no "
            "learning rate from it (its curve so far is in lr_range)"
        )
        return replace(
            result, interrupted=True, recommendations=replace(rec, lr_range=record),
            notes=(*result.notes, note),
        )  # fmt: skip
    if found.lr is None:
        record["recommended"] = "reference" if reference is not None else None
        record["why"] = found.suggestion.reason + (
            ": the learning rate scaled from your reference is kept"
            if reference is not None
            else ": no learning rate (give --base-lr/--base-batch to scale a known one)"
        )
        notes = (*result.notes, "LR range test: " + record["why"])
        return replace(result, recommendations=replace(rec, lr_range=record), notes=notes)
    steps = None if dataset_size is None else 0
    advice = LearningRateAdvice(
        rule="range-test", base_lr=found.lr, base_batch=batch, batch_size=batch,
        lr=found.lr, warmup_epochs=0.0, warmup_steps=steps,
        note=(
            f"LR range test (Smith 2017) at batch {batch} on your data, {found.suggestion.rule} "
            f"rule: {found.suggestion.reason}"
        ),
        advice=_range_advice(found, reference),
    )  # fmt: skip
    record["recommended"] = "range-test"
    record["why"] = "measured at this batch on your data" + (
        f"; your reference scaled by the {reference.rule} rule gives {reference.lr:.3g}, "
        "which carries the reference's own error to the new batch"
        if reference is not None
        else ""
    )
    return replace(result, recommendations=replace(rec, learning_rate=advice, lr_range=record))


def _range_advice(found: Any, reference: LearningRateAdvice | None) -> tuple[str, ...]:
    """Lines shown under the range test's LR: the curve's stop, and the reference."""
    curve = found.curve
    others = [
        f"{rule} {lr:.3g}"
        for rule, lr in found.suggestion.by_rule.items()
        if lr is not None and rule != found.suggestion.rule
    ]
    lines = [
        f"the sweep ran {len(curve.lrs)} steps from {curve.lrs[0]:.0e} to "
        f"{curve.lrs[-1]:.3g} ({curve.stopped}) in {found.seconds:.1f} s; other rules: "
        + (", ".join(others) or "none")
    ]
    if reference is not None:
        lines.append(
            f"your reference scaled ({reference.rule} rule, from {reference.base_lr:g} @ "
            f"{reference.base_batch}): {reference.lr:.3g}; the range test's is recommended "
            "(measured at this batch on your data)"
        )
        if found.optimizer.lower() == "adamw" and found.lr is not None:
            lines.append(
                weight_decay_advice(
                    reference.base_lr, reference.base_batch, found.lr, found.batch_size
                )
            )
    return tuple(lines)


def _without_training_advice(
    result: ProbeResult, mode: str, *, base_lr: float | None, data: Any
) -> ProbeResult:
    """An eval or infer probe's result, with a note for the training advice asked for and
    skipped: no learning rate is scaled and no noise scale measured for a step without
    gradients."""
    skipped = [
        what
        for what, asked in (
            ("the learning rate (base_lr)", base_lr is not None),
            ("the gradient noise scale (data)", data is not None),
        )
        if asked
    ]
    if not skipped:
        return result
    note = (
        f"mode {mode!r} runs no backward and no optimizer step: {' and '.join(skipped)} "
        "skipped (they advise training); the time-optimal batch is by the throughput knee"
    )
    return replace(result, notes=(*result.notes, note))


def _short_reason(exc: BsfinderError) -> str:
    """One line saying what failed, for a note in the result."""
    if isinstance(exc, UserCodeError):
        detail = exc.detail.strip().splitlines()[0] if exc.detail.strip() else "(no message)"
        text = f"the model raised {exc.exc_type} on a batch of the data: {detail}"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def profile_memory(
    model: Any = None,
    *,
    batch_size: int,
    input_shape: Sequence[int] | None = None,
    inputs: Sequence[str | InputSpec] | None = None,
    make_batch: Callable[[int], Any] | None = None,
    model_kwargs: dict[str, Any] | None = WorkloadOptions.model_kwargs,
    optimizer: Any = WorkloadOptions.optimizer,
    precision: str = WorkloadOptions.precision,
    loss: str = WorkloadOptions.loss,
    keep_outputs: bool = WorkloadOptions.keep_outputs,
    checkpointing: str = WorkloadOptions.checkpointing,
    mode: str = WorkloadOptions.mode,
    batches: Any = WorkloadOptions.batches,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    forward_kwargs: dict[str, Any] | None = WorkloadOptions.forward_kwargs,
    device: str = ExecutionOptions.device,
    isolation: str = ExecutionOptions.isolation,
    memory_limit: int | str | None = BudgetOptions.memory_limit,
    scaling: bool = True,
    target_memory: int | str | Sequence[int | str] = (),
    snapshot: str | os.PathLike[str] | None = None,
) -> MemoryProfile:
    """Where the memory of one training step at ``batch_size`` goes.

    Runs a warm-up step and one tracked step (in a fresh process unless the workload cannot
    travel there) and breaks the peak down into weights, gradients, optimizer state,
    optimizer-step temporaries, inputs, activations, temporaries and memory no tensor
    accounts for; the categories sum to the measured peak. Also per-module activations.

    With ``scaling`` (the default), a second step at half the batch (batch 1: at 2) splits
    the peak into a fixed cost and a cost per sample, and that line predicts the largest
    batch for this device (its budget or card) and for each ``target_memory``.

    Args:
        model, input_shape, inputs, make_batch, model_kwargs, optimizer, precision, loss,
            keep_outputs, checkpointing, mode, batches, collate_fn, forward_kwargs, device,
            isolation, memory_limit: as :func:`find_batch_size`.
        batch_size: the batch to profile.
        scaling: also profile a second batch for the per-sample cost.
        target_memory: the memory of cards to plan for (``"24GiB"``), not a budget: the
            largest batch is predicted for each.
        snapshot: CUDA only: write torch's memory snapshot of the profiled step to this
            file (open it at https://pytorch.org/memory_viz).

    Raises:
        SpecError: invalid arguments. BsfinderError: the batch does not fit.

    Example:
        >>> p = profile_memory("mymodel:Net", batch_size=64,
        ...                    input_shape=(3, 224, 224))  # doctest: +SKIP
        >>> p.breakdown["activations"], p.peak_phase  # doctest: +SKIP
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SpecError(f"batch_size must be a positive integer, got {batch_size!r}")
    targets = [target_memory] if isinstance(target_memory, int | str) else list(target_memory)
    memories = [
        (format_bytes(b), b)
        for b in (size_bytes(t, "target memory") for t in targets)
        if b is not None
    ]
    path = None if snapshot is None else os.fspath(snapshot)
    # one warm-up step and one tracked step
    execution = ExecutionOptions(device=device, isolation=isolation, warmup_steps=1, steps=1)
    workload = WorkloadOptions(
        inputs=inputs, model_kwargs=model_kwargs, optimizer=optimizer, precision=precision,
        loss=loss, keep_outputs=keep_outputs, checkpointing=checkpointing, mode=mode,
        batches=batches, forward_kwargs=forward_kwargs,
    )  # fmt: skip
    make_batch = batch_source(
        batches, collate_fn=collate_fn, input_shape=input_shape, inputs=inputs,
        make_batch=make_batch, train_step=None, loss=loss,
    )  # fmt: skip
    step = _Step(input_shape, make_batch)
    budget = BudgetOptions(memory_limit=memory_limit)
    with _prepared(model, step, workload, budget, execution) as (runner, _, _):
        assert not isinstance(runner, DistributedRunner)  # only find_batch_size spans ranks
        try:
            info = runner.start()  # inside: a Ctrl-C while the worker starts stops it too
            if path is not None and info.device.get("kind") != "cuda":
                raise SpecError(
                    "--snapshot records the CUDA caching allocator's history: it needs a CUDA "
                    f"device, and this profile runs on {info.device.get('kind', 'cpu')}"
                )
            profile = runner.run_profile(batch_size, path)
            other = _second_profile(runner, batch_size) if scaling else None
        finally:
            runner.close()
    if other is None:
        return profile
    if info.capacity_bytes is not None:
        memories.insert(0, ("this device", info.capacity_bytes))
    return replace(profile, scaling=memory_scaling(profile, other, memories))


def _second_profile(runner: Any, batch_size: int) -> MemoryProfile | None:
    """The profile at half the batch (at 2 for batch 1, and at 4 for batch 2 when BatchNorm
    cannot train on 1; None if that does not fit)."""
    if batch_size > 1:
        try:
            return runner.run_profile(batch_size // 2)
        except UserCodeError as exc:
            if not is_batchnorm_one_sample(exc):
                raise
    try:
        return runner.run_profile(2 * batch_size)
    except BsfinderError:  # the batch fits, twice it does not: no line to draw
        return None


def estimate_memory(
    model: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    inputs: Sequence[str | InputSpec] | None = None,
    make_batch: Callable[[int], Any] | None = None,
    model_kwargs: dict[str, Any] | None = WorkloadOptions.model_kwargs,
    optimizer: Any = WorkloadOptions.optimizer,
    precision: str = WorkloadOptions.precision,
    loss: str = WorkloadOptions.loss,
    keep_outputs: bool = WorkloadOptions.keep_outputs,
    checkpointing: str = WorkloadOptions.checkpointing,
    mode: str = WorkloadOptions.mode,
    forward_kwargs: dict[str, Any] | None = WorkloadOptions.forward_kwargs,
    batch_sizes: Sequence[int] = (),
    target: str = "cuda",
    target_memory: int | str | None = None,
    context: int | str | None = None,
    workspace: int | str | None = None,
    granularity: Granularity = SearchOptions.granularity,
    max_batch: int | None = SearchOptions.max_batch,
    kernel_scratch: bool = True,
    headroom: float = RecommendOptions.headroom,
) -> MemoryEstimate:
    """Predict a training step's peak memory per batch size, and the largest batch that fits
    a target device, without allocating real memory and without that device.

    The model is built with fake parameters (``FakeTensorMode``), one training step (as a
    probe trial: forward, loss, backward, optimizer step) is traced per batch size, and live
    tensor bytes are counted with the target's allocator rounding, plus what the target
    holds outside tensors. The result lists what the estimate cannot see (``unseen``).

    Args:
        model, input_shape, inputs, make_batch, model_kwargs, optimizer, precision, loss,
            keep_outputs, checkpointing, mode, forward_kwargs: as :func:`find_batch_size` (no
            ``train_step``: it needs real tensors; no ``batches``: real samples).
        batch_sizes: batches to estimate (besides those the search visits).
        target: ``"cuda"`` (a GPU: 512 B blocks, segments, context, cuBLAS workspace),
            ``"cpu"`` (this process's allocator, oneDNN's primitive cache), or a card
            preset (``"h100-80gb"``, ``"a100-40gb"``, ``"l4"``, ...:
            :data:`bsfinder.devices.cards.CARDS`): a GPU with the memory a CUDA process
            really has on it, from public sources.
        target_memory: the memory of the card you plan for (``"80GiB"``), not a budget:
            with it, the largest batch is searched. Not with a card preset.
        headroom: the safe batch leaves this fraction of the target's memory free (the
            probe's rule, default 5%).
        context: CUDA context size (default 512 MiB); workspace: cuBLAS workspace (32 MiB).
        granularity: answer to a multiple of this (``1`` exact, ``"pow2"``).
        max_batch: never estimate a larger batch.
        kernel_scratch: CPU target: measure oneDNN's convolution scratch on this CPU (real
            convolutions at small batches in a child process, about a second).

    Raises:
        SpecError: invalid arguments. BsfinderError: the model cannot run on fake tensors.

    Example:
        >>> e = estimate_memory("mymodel:Net", input_shape=(3, 224, 224),
        ...                     target_memory="80GiB")  # doctest: +SKIP
        >>> e.max_batch, e.point(e.max_batch).peak_bytes  # doctest: +SKIP
    """
    from bsfinder.memory.estimate import TargetDevice, estimate_workload
    from bsfinder.workload.step import Workload

    SearchOptions(max_batch=max_batch, granularity=granularity)
    options = WorkloadOptions(mode=mode, forward_kwargs=forward_kwargs, checkpointing=checkpointing)
    for b in batch_sizes:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise SpecError(f"batch sizes must be positive integers, got {b!r}")
    if model is None:
        raise SpecError("give a model (object, class, factory or 'module:Name') to estimate")
    RecommendOptions(headroom=headroom)
    preset = None
    if target not in ("cuda", "cpu"):
        from bsfinder.devices.cards import card

        preset = card(target)
        if target_memory is not None:
            raise SpecError(
                f"target {target!r} is a card preset with its own memory: give it or "
                "--target-memory, not both"
            )
        target, target_memory = "cuda", preset.usable_bytes
    memory = size_bytes(target_memory, "target memory")
    if memory is None and not batch_sizes:
        raise SpecError(
            "give the target's memory (--target-memory 80GiB, target_memory=) or batch sizes "
            "to estimate (--batch, batch_sizes=)"
        )
    device = (
        TargetDevice.cuda(
            memory,
            context_bytes=size_bytes(context, "context"),
            workspace_bytes=size_bytes(workspace, "workspace"),
        )
        if target == "cuda"
        else TargetDevice(
            "cpu",
            memory,
            size_bytes(context, "context") or 0,
            size_bytes(workspace, "workspace") or 0,
        )
    )
    specs = batch_specs(input_shape, inputs, make_batch)
    fields = spec_fields(model, specs, optimizer_name(optimizer), precision, loss, model_kwargs)
    workload = Workload(
        WorkloadSpec(
            **fields,
            keep_outputs=keep_outputs,
            checkpointing=options.checkpointing,
            mode=options.mode,
            forward_kwargs=_forward_kwargs(options.forward_kwargs),
        ),
        "cpu",
        model=model if is_module(model) else None,
        factory=factory_of(model),
        make_batch=make_batch,
    )
    workload.load()
    result = estimate_workload(
        workload,
        device,
        batch_sizes=batch_sizes,
        granularity=granularity,
        max_batch=max_batch,
        kernel_scratch=kernel_scratch,
        headroom=headroom if memory is not None else 0.0,
    )
    if preset is None:
        return result
    card_info = {
        "card": preset.name, "card_label": preset.label, "card_smi_mib": preset.smi_mib,
        "card_cuda_total_mib": preset.cuda_total_mib, "card_sources": list(preset.sources),
    }  # fmt: skip
    return replace(result, target={**result.target, **card_info})


class FrontierPoint(NamedTuple):
    """One sequence length of :func:`estimate_frontier`: the largest batch and the safe one
    (the estimate's headroom), the tokens per step at the largest, and its peak."""

    sequence_length: int
    max_batch: int | None
    safe_batch: int | None
    tokens_per_step: int | None
    peak_bytes: int | None


def estimate_frontier(
    model: Any,
    *,
    sequence_lengths: Sequence[int],
    inputs: Sequence[str | InputSpec],
    **options: Any,
) -> tuple[FrontierPoint, ...]:
    """The largest batch per sequence length, for a language model: one
    :func:`estimate_memory` per length, with the first dimension of every integer input
    (token ids, labels, masks: ``input_ids=1024:int64:50257``) set to that length.

    Args:
        model: as :func:`estimate_memory`. sequence_lengths: the lengths to estimate at.
        inputs: the input specs (at least one integer input with a sequence dimension).
        options: the other arguments of :func:`estimate_memory` (``target``,
            ``target_memory``, ``precision``...; a target memory is needed).

    Raises:
        SpecError: no lengths, a length below 1, no integer input with a sequence dimension,
            no target memory (from :func:`estimate_memory`).
    """
    lengths = list(sequence_lengths)
    if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
        raise SpecError(f"sequence lengths must be positive integers, got {lengths!r}")
    specs = [s if isinstance(s, InputSpec) else parse_input_spec(s) for s in inputs]
    if not any(s.is_integer and s.shape for s in specs):
        raise SpecError(
            "a sequence frontier needs token inputs: an integer input with a sequence "
            "dimension, e.g. --input input_ids=1024:int64:50257"
        )
    if options.get("batch_sizes"):
        raise SpecError("a sequence frontier searches the largest batch: give no batch sizes")
    points = []
    for length in sorted(set(lengths)):
        at = [
            replace(s, shape=(length, *s.shape[1:])) if s.is_integer and s.shape else s
            for s in specs
        ]
        found = estimate_memory(model, inputs=at, **options)  # it asks for a target memory
        best = found.max_batch
        points.append(
            FrontierPoint(
                sequence_length=length,
                max_batch=best,
                safe_batch=found.safe_batch,
                tokens_per_step=None if best is None else best * length,
                peak_bytes=None if best is None else found.point(best).peak_bytes,
            )
        )
    return tuple(points)


class WhatIfRow(NamedTuple):
    """One line of :func:`estimate_what_if`: a precision and checkpointing, the largest
    and safe batch on one device with its peak and the state (weights, gradients,
    optimizer state) bytes, and the largest batch per rank under DDP and FSDP over the
    table's ranks. ``error``: why this line has no estimate (then the rest is None)."""

    precision: str
    checkpointing: str
    max_batch: int | None
    safe_batch: int | None
    peak_bytes: int | None
    state_bytes: int | None
    ddp_max_batch: int | None
    fsdp_max_batch: int | None
    error: str | None = None


#: the precisions a what-if table compares (fp16-mixed holds what bf16-mixed holds)
WHAT_IF_PRECISIONS = ("32", "bf16-mixed", "bf16-true")


def estimate_what_if(
    model: Any,
    *,
    ranks: int = 8,
    on_line: Callable[[str, str], None] | None = None,
    **options: Any,
) -> tuple[WhatIfRow, ...]:
    """The planning questions in one table: for each precision of
    :data:`WHAT_IF_PRECISIONS` with and without activation checkpointing of the model's
    blocks, the estimated largest and safe batch on the target, and what one rank of
    ``ranks`` could train under DDP and under FSDP
    (:func:`~bsfinder.core.scaleout.scale_out` on the estimate).

    Args:
        model: as :func:`estimate_memory`. ranks: the ranks of the DDP and FSDP columns.
        on_line: called with (precision, checkpointing) before each line is estimated
            (progress: a large model takes seconds per line).
        options: the other arguments of :func:`estimate_memory` (a target memory is
            needed; ``precision`` and ``checkpointing`` are the table's).

    Raises:
        SpecError: bad options, ``ranks`` below 1, no target memory, or the model cannot be
            estimated as given at float32 without checkpointing (the first line).
    """
    from bsfinder.core.scaleout import probe_from_estimate, scale_out

    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise SpecError(f"ranks must be a positive integer, got {ranks!r}")
    for name in ("precision", "checkpointing", "batch_sizes"):
        if options.get(name):
            raise SpecError(f"a what-if table sets {name} itself: leave it out")
        options.pop(name, None)
    if options.get("target_memory") is None and options.get("target", "cuda") in ("cuda", "cpu"):
        raise SpecError(
            "a what-if table needs the target's memory: --target-memory 80GiB "
            "(target_memory=) or a card preset (--target l4)"
        )
    granularity = options.get("granularity", SearchOptions.granularity)
    rows: list[WhatIfRow] = []
    for precision in WHAT_IF_PRECISIONS:
        for checkpointing in CHECKPOINTING:
            if on_line is not None:
                on_line(precision, checkpointing)
            try:
                found = estimate_memory(
                    model, precision=precision, checkpointing=checkpointing, **options
                )
            except BsfinderError as exc:
                if not rows:  # the plain step: an error in the options or the model
                    raise
                rows.append(
                    WhatIfRow(
                        precision, checkpointing, None, None, None, None, None, None, str(exc)
                    )
                )
                continue
            per_rank = []
            for strategy in ("ddp", "fsdp"):
                try:
                    plan = scale_out(probe_from_estimate(found.to_dict()), strategy, ranks)
                    per_rank.append(_at_granularity(plan.max_batch, granularity))
                except SpecError:  # fewer than two fitting points: nothing fits
                    per_rank.append(None)
            best = found.max_batch
            rows.append(
                WhatIfRow(
                    precision=precision,
                    checkpointing=checkpointing,
                    max_batch=best,
                    safe_batch=found.safe_batch,
                    peak_bytes=None if best is None else found.point(best).peak_bytes,
                    state_bytes=sum(found.state_bytes.values()),
                    ddp_max_batch=per_rank[0],
                    fsdp_max_batch=per_rank[1],
                )
            )
    return tuple(rows)


def _at_granularity(batch: int | None, granularity: Granularity) -> int | None:
    """A batch from a memory line, down to the granularity the searched ones have (a
    power of two; a multiple of ``granularity`` once it reaches one, else as it is)."""
    if batch is None or granularity == 1:
        return batch
    if granularity == "pow2":
        return 1 << (batch.bit_length() - 1)
    step = int(granularity)
    return batch // step * step if batch >= step else batch


class _Step(NamedTuple):
    """What makes the batches and steps, besides the options (and the noise-scale data)."""

    input_shape: Sequence[int] | None
    make_batch: Callable[[int], Any] | None
    train_step: Callable[[int], Any] | None = None
    data: Callable[[int], Any] | str | None = None
    checkpoint: str | os.PathLike[str] | None = None


Prepared = tuple[ProcessRunner | InlineRunner | DistributedRunner, ProbeSettings, str | None]


@contextlib.contextmanager
def _prepared(
    model: Any,
    step: _Step,
    workload: WorkloadOptions,
    budget: BudgetOptions,
    execution: ExecutionOptions,
    search: SearchOptions | None = None,
    recommend: RecommendOptions | None = None,
) -> Iterator[Prepared]:
    """Check what the option groups cannot check alone, place the trials
    (:func:`~bsfinder.execution.placement.place`), and yield the runner, the settings and
    what set a CPU's default budget (None: given, or not a CPU).

    A ``strategy`` runs on every rank under torchrun or a process group.
    The temporary files (the saved model) go on every way out: a bad option found after
    saving, an error in the probe, a Ctrl-C or SIGTERM at any point.
    """
    search = search or SearchOptions()
    recommend = recommend or RecommendOptions()
    if model is None and step.train_step is None:
        raise SpecError("give a model (object, class, factory or 'module:Name') or a train_step")
    if workload.keep_outputs and step.train_step is not None:
        raise SpecError("keep_outputs applies to bsfinder's step: a train_step keeps what it keeps")
    if workload.checkpointing != "none" and step.train_step is not None:
        raise SpecError(
            "checkpointing applies to bsfinder's step: a train_step runs its model as it is "
            "(checkpoint its blocks in your own code)"
        )
    if step.train_step is not None:
        batches_per_call(step.train_step)  # a bad attribute fails here, not in a trial
    _check_planning(step, recommend)
    specs = batch_specs(step.input_shape, workload.inputs, step.make_batch, step.train_step)
    optimizer = optimizer_name(workload.optimizer)
    device = asked_device(model, execution.device)
    resolved = resolve_device(device)
    _check_strategy(step, execution.strategy)
    memory_limit_bytes = budget.memory_limit_bytes
    if memory_limit_bytes is not None and resolved == "cpu":
        check_cpu_budget(memory_limit_bytes)  # its range is this machine's or container's
    fields = spec_fields(
        model, specs, optimizer, workload.precision, workload.loss, workload.model_kwargs
    )
    spec = WorkloadSpec(
        **fields,
        keep_outputs=workload.keep_outputs,
        checkpointing=workload.checkpointing,
        mode=workload.mode,
        forward_kwargs=_forward_kwargs(workload.forward_kwargs),
        batches_label=(
            step.make_batch.describe() if isinstance(step.make_batch, RealBatches) else ""
        ),
    )
    with place(
        model,
        spec,
        make_batch=step.make_batch,
        train_step=step.train_step,
        isolation=execution.isolation,
        device=device,
        resolved=resolved,
        memory_limit_bytes=memory_limit_bytes,
        strategy=execution.strategy,
        trial_timeout_s=execution.trial_timeout_s,
        gpus=recommend.gpus,
        global_batch=recommend.global_batch,
    ) as placement:
        settings = ProbeSettings(
            start_batch=search.start_batch,
            max_batch=search.max_batch,
            granularity=search.granularity,
            headroom=recommend.headroom,
            memory_model=search.memory_model,
            time_limit_s=search.time_limit_s,
            base_lr=recommend.base_lr,
            base_batch=recommend.base_batch,
            lr_rule=recommend.lr_rule,
            optimizer=optimizer,
            dataset_size=recommend.dataset_size or _data_size(step.data),
            global_batch=recommend.global_batch,
            ranks=max(recommend.gpus, placement.world_size),
            world_size=placement.world_size,
            mode=workload.mode,
        )
        runner = build_runner(
            placement,
            spec,
            model=model,
            make_batch=step.make_batch,
            train_step=step.train_step,
            optimizer=workload.optimizer,
            warmup_steps=execution.warmup_steps,
            steps=execution.steps,
            trial_timeout_s=execution.trial_timeout_s,
        )
        yield runner, settings, placement.budget_source


def _forward_kwargs(value: Any) -> dict[str, Any]:
    """``forward_kwargs`` checked: a dict of keyword names (None: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SpecError(
            f"forward_kwargs must be a dict of keyword names, e.g. {{'return_loss': True}}, "
            f"got {value!r}"
        )
    return dict(value)


def _saying(
    on_event: Callable[[ProbeEvent], None] | None, budget_source: str | None
) -> Callable[[ProbeEvent], None] | None:
    """``on_event``, told in the ``started`` event what set a default budget: the value the
    probe used is decided once (placement), and the CLI shows it rather than re-deriving it."""
    if on_event is None or budget_source is None:
        return on_event
    emit = on_event

    def saying(event: ProbeEvent) -> None:
        if event.kind == "started" and event.info is not None:
            event = replace(event, info=replace(event.info, budget_source=budget_source))
        emit(event)

    return saying


def _data_size(data: Callable[[int], Any] | str | None) -> int | None:
    """The number of samples of ``data`` (``make_loader(batch_size)``) when its loader says
    (``len(loader.dataset)``, or ``len(loader)`` at batch 1); None when it does not, or
    when asking fails (the noise measurement reports the loader's own errors)."""
    if data is None:
        return None
    try:
        loader = (load_object(data) if isinstance(data, str) else data)(1)
        sized = getattr(loader, "dataset", loader)
        size = len(sized)
    except Exception:  # not sized, or the loader's own error: no cap from it
        return None
    return size if isinstance(size, int) and size > 0 else None


def _check_strategy(step: _Step, strategy: str | None) -> None:
    """Checks of ``strategy`` against what a distributed probe can do."""
    if step.train_step is not None and strategy in ("ddp", "fsdp"):
        raise SpecError(
            f"strategy {strategy!r} wraps a model bsfinder builds; a train_step wraps its own "
            "model: use strategy='none' (the process group is set up for it)"
        )
    if step.data is not None and strategy is not None:
        raise SpecError(
            "the noise scale (data=, --data) is measured on one device: measure it in a "
            "single-device probe, and use its batch and learning rate for the global batch"
        )


def _check_planning(step: _Step, recommend: RecommendOptions) -> None:
    """Checks of the data and checkpoint, before any trial runs."""
    data = step.data
    if recommend.lr_rule == "noise" and data is None:
        raise SpecError("lr_rule 'noise' needs the noise scale: give data (--data)")
    if data is None:
        if step.checkpoint is not None:
            raise SpecError("a checkpoint is loaded to measure the noise scale: give data too")
        return
    if step.train_step is not None:
        raise SpecError(
            "the noise scale is measured on a model (data= with model=), not a train_step"
        )
    loader = load_object(data) if isinstance(data, str) else data
    if not callable(loader):
        raise SpecError(f"data must be make_loader(batch_size), got {type(loader).__name__}")
    checkpoint = step.checkpoint
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SpecError(f"checkpoint {os.fspath(checkpoint)!r}: no such file")
