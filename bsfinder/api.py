"""The public entry points: thin facades over specs, runners, the search and recommendations."""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from bsfinder.devices.base import resolve_device
from bsfinder.devices.cpu import default_cpu_budget
from bsfinder.distributed import STRATEGIES, DistributedRunner, launch_context
from bsfinder.errors import BsfinderError, SpecError
from bsfinder.estimate import MemoryEstimate
from bsfinder.inline import InlineRunner
from bsfinder.isolation import ProcessRunner
from bsfinder.loading import InputSpec, load_object, parse_input_spec
from bsfinder.probe import ProbeEvent, ProbeSettings, run_probe, with_noise_scale
from bsfinder.profiling import MemoryProfile, memory_scaling
from bsfinder.recommend import LR_RULES
from bsfinder.results import ProbeResult
from bsfinder.search import Granularity
from bsfinder.units import format_bytes, parse_bytes
from bsfinder.workload import OPTIMIZERS, WorkloadSpec

__all__ = ["estimate_memory", "find_batch_size", "profile_memory"]

ISOLATIONS = ("auto", "process", "inline")
#: the largest micro-batch the noise scale is measured with
NOISE_MICRO_BATCH = 64


def find_batch_size(
    model: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    inputs: Sequence[str | InputSpec] | None = None,
    make_batch: Callable[[int], Any] | None = None,
    train_step: Callable[[int], Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    optimizer: Any = "adamw",
    precision: str = "32",
    loss: str = "auto",
    device: str = "auto",
    memory_limit: int | str | None = None,
    max_batch: int | None = None,
    start_batch: int = 1,
    granularity: Granularity = 8,
    headroom: float = 0.05,
    warmup_steps: int = 1,
    steps: int = 3,
    base_lr: float | None = None,
    base_batch: int | None = None,
    lr_rule: str = "auto",
    dataset_size: int | None = None,
    data: Callable[[int], Any] | str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    global_batch: int | None = None,
    gpus: int = 1,
    strategy: str | None = None,
    isolation: str = "auto",
    memory_model: bool = True,
    trial_timeout_s: float = 900.0,
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
            bsfinder times it and measures memory.
        model_kwargs: keyword arguments for a model class or factory.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"`` (momentum 0.9) or ``"none"``, or an
            optimizer object: its family is used (bsfinder makes its own, fresh per trial);
            with ``train_step``, your optimizer is also restored after the probe, with the
            values of every parameter it updates.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"fp16-mixed"`` (autocast; GradScaler for fp16).
        loss: ``"auto"`` (the model's own ``loss`` if it returns one, else the mean of its
            outputs), ``"mean"`` or ``"cross-entropy"`` (random targets over the last dim).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        memory_limit: bytes or text like ``"24GiB"``. CPU: the budget (default: 90% of the
            available RAM). CUDA: cap the allocator, to plan for a smaller card.
        max_batch: never try a larger batch.
        start_batch: first batch tried (then doubled).
        granularity: answer to a multiple of this (default 8), ``1`` for exact, ``"pow2"``.
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
            workload can travel: picklable, nothing defined in a script, no model already on
            the GPU here; a ``train_step`` runs inline unless you ask for ``"process"``).
        memory_model: jump near the answer with a fitted ``peak = a + k*batch`` line.
        trial_timeout_s: a worker silent this long is stopped; the trial counts as failed.
        on_event: progress callback receiving :class:`~bsfinder.probe.ProbeEvent`.

    Returns:
        A frozen :class:`~bsfinder.results.ProbeResult`. Your model, optimizer and RNG state
        are exactly as before the call.

    Raises:
        SpecError: invalid arguments (exit code 2 in the CLI).
        UserCodeError: the model raised a non-OOM exception.
        WorkerError: the worker process could not start.

    Example:
        >>> result = find_batch_size(Net(), input_shape=(3, 64, 64), device="cpu",
        ...                          memory_limit="2GiB")  # doctest: +SKIP
        >>> result.max_batch, result.time_optimal_batch  # doctest: +SKIP
        (504, 128)
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "on_event")}
    with _prepared(model, options, distributed=True) as (runner, settings):
        result = run_probe(runner, settings, on_event=on_event)
    if data is None or result.interrupted or not result.recommendations.time_optimal_batch:
        return result
    from bsfinder.datanoise import noise_on_data

    # the estimator is unbiased at any micro-batch: a moderate one keeps it quick and within
    # small data sets (a CPU's throughput knee can be past the whole data set)
    micro = min(result.recommendations.time_optimal_batch, NOISE_MICRO_BATCH)
    if dataset_size is not None:
        micro = max(1, min(micro, dataset_size // 8))
    if on_event is not None:
        on_event(ProbeEvent("noise", batch_size=micro))
    try:
        noise = noise_on_data(
            model, data, micro_batch=micro, device=result.device.get("device", "cpu"),
            checkpoint=checkpoint, loss=loss, precision=precision, model_kwargs=model_kwargs,
        )  # fmt: skip
    except KeyboardInterrupt:  # the probe's trials are kept; the knee stands
        note = "the noise-scale measurement was interrupted: recommendations by the knee"
        return replace(result, interrupted=True, notes=(*result.notes, note))
    return with_noise_scale(result, noise, settings)


def profile_memory(
    model: Any = None,
    *,
    batch_size: int,
    input_shape: Sequence[int] | None = None,
    inputs: Sequence[str | InputSpec] | None = None,
    make_batch: Callable[[int], Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    optimizer: Any = "adamw",
    precision: str = "32",
    loss: str = "auto",
    device: str = "auto",
    isolation: str = "auto",
    memory_limit: int | str | None = None,
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
            device, isolation, memory_limit: as :func:`find_batch_size`.
        batch_size: the batch to profile.
        scaling: also profile a second batch for the per-sample cost.
        target_memory: memory sizes (``"24GiB"``) to predict the largest batch for.
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
    memories = [(format_bytes(b), b) for b in (_budget(t) for t in targets) if b is not None]
    given = {
        k: v
        for k, v in locals().items()
        if k in _DEFAULTS and k not in ("model", "batch_size", "target_memory")
    }
    path = None if snapshot is None else os.fspath(snapshot)
    options = {**_DEFAULTS, **given, "warmup_steps": 1, "steps": 1}
    with _prepared(model, options) as (runner, _):
        assert not isinstance(runner, DistributedRunner)  # only find_batch_size spans ranks
        info = runner.start()
        try:
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
    """The profile at half the batch (at 2 for batch 1; None if 2 does not fit)."""
    if batch_size > 1:
        return runner.run_profile(batch_size // 2)
    try:
        return runner.run_profile(2)
    except BsfinderError:  # batch 1 fits, 2 does not: no line to draw
        return None


def estimate_memory(
    model: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    inputs: Sequence[str | InputSpec] | None = None,
    make_batch: Callable[[int], Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    optimizer: Any = "adamw",
    precision: str = "32",
    loss: str = "auto",
    batch_sizes: Sequence[int] = (),
    target: str = "cuda",
    target_memory: int | str | None = None,
    context: int | str | None = None,
    workspace: int | str | None = None,
    granularity: Granularity = 8,
    max_batch: int | None = None,
    kernel_scratch: bool = True,
) -> MemoryEstimate:
    """Predict a training step's peak memory per batch size, and the largest batch that fits
    a target device, without allocating real memory and without that device.

    The model is built with fake parameters (``FakeTensorMode``), one training step (as a
    probe trial: forward, loss, backward, optimizer step) is traced per batch size, and live
    tensor bytes are counted with the target's allocator rounding, plus what the target
    holds outside tensors. The result lists what the estimate cannot see (``unseen``).

    Args:
        model, input_shape, inputs, make_batch, model_kwargs, optimizer, precision, loss:
            as :func:`find_batch_size` (no ``train_step``: it needs real tensors).
        batch_sizes: batches to estimate (besides those the search visits).
        target: ``"cuda"`` (a GPU: 512 B blocks, segments, context, cuBLAS workspace) or
            ``"cpu"`` (this process's allocator, oneDNN's primitive cache).
        target_memory: the target's memory (``"80GiB"``); with it, the largest batch is
            searched.
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
    from bsfinder.estimate import TargetDevice, estimate_workload
    from bsfinder.workload import Workload

    _check_options(**{**_DEFAULTS, "max_batch": max_batch, "granularity": granularity})
    for b in batch_sizes:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise SpecError(f"batch sizes must be positive integers, got {b!r}")
    if model is None:
        raise SpecError("give a model (object, class, factory or 'module:Name') to estimate")
    if target not in ("cuda", "cpu"):
        raise SpecError(f"target must be 'cuda' or 'cpu', got {target!r}")
    memory = _budget(target_memory)
    if memory is None and not batch_sizes:
        raise SpecError(
            "give the target's memory (--target-memory 80GiB, target_memory=) or batch sizes "
            "to estimate (--batch, batch_sizes=)"
        )
    device = (
        TargetDevice.cuda(
            memory, context_bytes=_budget(context), workspace_bytes=_budget(workspace)
        )
        if target == "cuda"
        else TargetDevice("cpu", memory, _budget(context) or 0, _budget(workspace) or 0)
    )
    specs = _batch_specs(input_shape, inputs, make_batch)
    fields = _spec_fields(model, specs, _optimizer_name(optimizer), precision, loss, model_kwargs)
    is_module = _is_module(model)
    workload = Workload(
        WorkloadSpec(**fields),
        "cpu",
        model=model if is_module else None,
        factory=_factory(model),
        make_batch=make_batch,
    )
    workload.load()
    return estimate_workload(
        workload,
        device,
        batch_sizes=batch_sizes,
        granularity=granularity,
        max_batch=max_batch,
        kernel_scratch=kernel_scratch,
    )


@contextlib.contextmanager
def _prepared(
    model: Any, options: dict[str, Any], *, distributed: bool = False
) -> Iterator[tuple[ProcessRunner | InlineRunner | DistributedRunner, ProbeSettings]]:
    """Check the options, decide where trials run, and yield the runner and settings.

    ``distributed``: a probe that runs on every rank under torchrun or a process group.
    """
    o = options
    _check_options(
        warmup_steps=o["warmup_steps"],
        steps=o["steps"],
        max_batch=o["max_batch"],
        start_batch=o["start_batch"],
        granularity=o["granularity"],
        headroom=o["headroom"],
        base_lr=o["base_lr"],
        base_batch=o["base_batch"],
        lr_rule=o["lr_rule"],
        isolation=o["isolation"],
        trial_timeout_s=o["trial_timeout_s"],
        dataset_size=o["dataset_size"],
    )
    if model is None and o["train_step"] is None:
        raise SpecError("give a model (object, class, factory or 'module:Name') or a train_step")
    _check_planning(o)
    specs = _batch_specs(o["input_shape"], o["inputs"], o["make_batch"], o["train_step"])
    optimizer_name = _optimizer_name(o["optimizer"])
    # Without a train_step bsfinder builds its own optimizer of the same family (fresh state
    # per trial); with one, the user's optimizer is stepped and must be restored afterwards.
    user_optimizer = (
        o["optimizer"] if o["train_step"] is not None and optimizer_name != o["optimizer"] else None
    )
    is_module = _is_module(model)
    if o["device"] == "auto" and is_module:
        params = list(model.parameters())
        o["device"] = str(params[0].device) if params else "auto"
    resolved = resolve_device(o["device"])
    if distributed:
        _check_strategy(o)
    budget = _budget(o["memory_limit"])

    fields = _spec_fields(
        model, specs, optimizer_name, o["precision"], o["loss"], o["model_kwargs"]
    )

    travel, reasons = _what_travels(
        model,
        model_kwargs=fields["model_kwargs"],
        make_batch=o["make_batch"],
        train_step=o["train_step"],
    )
    if o["train_step"] is not None and o["isolation"] == "auto":
        reasons.append(
            "a train_step usually closes over live objects (isolation='process' forks anyway)"
        )
    saved_model: str | None = None
    if is_module and o["train_step"] is None and not reasons and o["isolation"] != "inline":
        saved_model, why = _save_module(model)
        if why:
            reasons.append(why)
    if o["isolation"] == "process" and reasons:
        raise SpecError("isolation='process' is impossible: " + "; ".join(reasons))
    use_process = o["isolation"] == "process" or (o["isolation"] == "auto" and not reasons)
    launched = None
    if distributed:  # the last step that can fail on one rank alone: it is collective
        try:
            launched = launch_context(o["strategy"], resolved, timeout_s=o["trial_timeout_s"])
        except BsfinderError:
            if saved_model is not None:
                os.unlink(saved_model)
            raise
    if launched is not None and o["device"] in ("auto", "cuda") and resolved != "cpu":
        resolved = f"cuda:{launched[0].local_rank}"  # torchrun's convention: a GPU per rank
    if budget is None and resolved == "cpu":
        # settled once: every trial gets the same budget; the ranks of a node share its RAM
        share = launched[0].local_world_size if launched is not None else 1
        budget = default_cpu_budget() // share
    if launched is not None and not use_process:
        launched[1].close()
        raise SpecError(
            "a probe with strategy= runs each rank's trials in fresh processes, and this "
            "workload cannot travel there: "
            + ("; ".join(reasons) or "isolation='inline'")
            + ". Put the model in an importable module (or pass 'path/to/file.py:Net', with "
            "the script's own work under `if __name__ == '__main__':`)"
        )
    world = launched[0].world_size if launched is not None else 1
    mismatch = None
    if o["gpus"] not in (1, world):
        mismatch = f"gpus={o['gpus']}, but the probe runs on {world} ranks: plans are for them"
    elif o["global_batch"] is not None and o["global_batch"] % world:
        mismatch = f"global batch {o['global_batch']} does not split evenly over {world} ranks"
    elif launched is not None and launched[0].local_world_size > 1 and ":" in o["device"]:
        mismatch = (
            f"device {o['device']!r} would put every rank of this node on one GPU; leave the "
            "device 'auto' or 'cuda': each rank uses cuda:LOCAL_RANK"
        )
    if launched is not None and mismatch is not None:
        launched[1].close()
        if saved_model is not None:
            os.unlink(saved_model)
        raise SpecError(mismatch)

    settings = ProbeSettings(
        start_batch=o["start_batch"],
        max_batch=o["max_batch"],
        granularity=o["granularity"],
        headroom=o["headroom"],
        memory_model=o["memory_model"],
        base_lr=o["base_lr"],
        base_batch=o["base_batch"],
        lr_rule=o["lr_rule"],
        optimizer=optimizer_name,
        dataset_size=o["dataset_size"],
        global_batch=o["global_batch"],
        ranks=max(o["gpus"], world),
        world_size=world,
    )
    try:
        runner: ProcessRunner | InlineRunner | DistributedRunner
        if use_process:
            spec = WorkloadSpec(
                **fields,
                model_file=saved_model,
                model_factory=travel.get("model_factory"),
                make_batch=travel.get("make_batch"),
                train_step=travel.get("train_step"),
            )
            runner = ProcessRunner(
                spec,
                device=resolved,
                budget_bytes=budget,
                warmup_steps=o["warmup_steps"],
                steps=o["steps"],
                timeout_s=o["trial_timeout_s"],
                distributed=launched[0] if launched is not None else None,
            )
            if launched is not None:
                runner = DistributedRunner(runner, *launched)
        else:
            factory = _factory(model)
            runner = InlineRunner(
                WorkloadSpec(**fields),
                device=resolved,
                budget_bytes=budget,
                warmup_steps=o["warmup_steps"],
                steps=o["steps"],
                model=model if is_module and o["train_step"] is None else None,
                factory=factory,
                make_batch=o["make_batch"],
                train_step=o["train_step"],
                guard_model=model if is_module else None,
                guard_optimizer=user_optimizer,
                reason="; ".join(reasons) or "isolation='inline'",
            )
        yield runner, settings
    finally:
        if saved_model is not None:
            os.unlink(saved_model)


_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(find_batch_size).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "on_event"
}


def _spec_fields(
    model: Any,
    specs: tuple[InputSpec, ...],
    optimizer: str,
    precision: str,
    loss: str,
    model_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """The WorkloadSpec fields every entry point shares."""
    fields: dict[str, Any] = {
        "inputs": specs,
        "optimizer": optimizer,
        "precision": precision,
        "loss": loss,
        "model_kwargs": dict(model_kwargs or {}),
    }
    if isinstance(model, str):
        fields.update(model=model, model_label=model)
    elif model is not None:
        fields["model_label"] = _label(model)
    return fields


def _check_options(**options: Any) -> None:
    for name in ("warmup_steps", "steps", "start_batch", "max_batch", "base_batch", "dataset_size"):
        value = options.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise SpecError(f"{name} must be an integer, got {value!r}")
    checks = [
        (options["warmup_steps"] >= 0, "warmup_steps must be >= 0"),
        (options["steps"] >= 1, "steps must be >= 1 (a trial must time at least one step)"),
        (options["max_batch"] is None or options["max_batch"] >= 1, "max_batch must be >= 1"),
        (options["start_batch"] >= 1, "start_batch must be >= 1"),
        (
            options["granularity"] == "pow2"
            or (isinstance(options["granularity"], int) and options["granularity"] >= 1),
            "granularity must be a positive integer or 'pow2'",
        ),
        (0 <= options["headroom"] < 1, "headroom must be in [0, 1)"),
        (options["lr_rule"] in LR_RULES, f"lr_rule must be one of {', '.join(LR_RULES)}"),
        (options["isolation"] in ISOLATIONS, f"isolation must be one of {', '.join(ISOLATIONS)}"),
        (options["trial_timeout_s"] > 0, "trial_timeout_s must be > 0"),
        (
            options["dataset_size"] is None or options["dataset_size"] >= 1,
            "dataset_size must be >= 1",
        ),
        (
            options["base_lr"] is None or options["base_batch"] is not None,
            "base_lr needs base_batch (the batch size that learning rate was tuned at)",
        ),
        (
            options["base_lr"] is None or options["base_lr"] > 0,
            "base_lr must be > 0",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SpecError(message)


def _check_strategy(o: dict[str, Any]) -> None:
    """Checks of ``strategy`` against what a distributed probe can do."""
    strategy = o.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise SpecError(f"strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if o.get("train_step") is not None and strategy in ("ddp", "fsdp"):
        raise SpecError(
            f"strategy {strategy!r} wraps a model bsfinder builds; a train_step wraps its own "
            "model: use strategy='none' (the process group is set up for it)"
        )
    if o.get("data") is not None and strategy is not None:
        raise SpecError(
            "the noise scale (data=, --data) is measured on one device: measure it in a "
            "single-device probe, and use its batch and learning rate for the global batch"
        )


def _check_planning(o: dict[str, Any]) -> None:
    """Checks of the data, checkpoint and global-batch options, before any trial runs."""
    for name in ("global_batch", "gpus"):
        value = o.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise SpecError(f"{name} must be an integer, got {value!r}")
    if o.get("global_batch") is not None and o["global_batch"] < 1:
        raise SpecError("global_batch must be >= 1")
    if o.get("gpus", 1) < 1:
        raise SpecError("gpus must be >= 1")
    if o.get("global_batch") is not None and o["global_batch"] % o.get("gpus", 1):
        raise SpecError(
            f"global batch {o['global_batch']} does not split evenly over {o['gpus']} GPUs"
        )
    data = o.get("data")
    if o.get("lr_rule") == "noise" and data is None:
        raise SpecError("lr_rule 'noise' needs the noise scale: give data (--data)")
    if data is None:
        if o.get("checkpoint") is not None:
            raise SpecError("a checkpoint is loaded to measure the noise scale: give data too")
        return
    if o.get("train_step") is not None:
        raise SpecError(
            "the noise scale is measured on a model (data= with model=), not a train_step"
        )
    loader = load_object(data) if isinstance(data, str) else data
    if not callable(loader):
        raise SpecError(f"data must be make_loader(batch_size), got {type(loader).__name__}")
    checkpoint = o.get("checkpoint")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SpecError(f"checkpoint {os.fspath(checkpoint)!r}: no such file")


def _budget(memory_limit: int | str | None) -> int | None:
    if memory_limit is None:
        return None
    if isinstance(memory_limit, str):
        try:
            return parse_bytes(memory_limit)
        except ValueError as exc:
            raise SpecError(f"memory limit: {exc}") from None
    if memory_limit < 1:
        raise SpecError(f"memory limit must be positive, got {memory_limit}")
    return int(memory_limit)


def _input_specs(
    input_shape: Sequence[int] | None, inputs: Sequence[str | InputSpec] | None
) -> tuple[InputSpec, ...]:
    specs: list[InputSpec] = []
    if input_shape is not None:
        shape = tuple(input_shape)
        if not all(isinstance(d, int) and d >= 1 for d in shape):
            raise SpecError(f"input_shape {shape!r} must hold positive integers")
        specs.append(InputSpec(shape=shape))
    for item in inputs or ():
        specs.append(item if isinstance(item, InputSpec) else parse_input_spec(item))
    return tuple(specs)


def _batch_specs(
    input_shape: Sequence[int] | None,
    inputs: Sequence[str | InputSpec] | None,
    make_batch: Callable[[int], Any] | None,
    train_step: Callable[[int], Any] | None = None,
) -> tuple[InputSpec, ...]:
    """The input specs, once it is clear that a batch can be made (or a train_step makes it)."""
    specs = _input_specs(input_shape, inputs)
    if train_step is None and make_batch is None and not specs:
        raise SpecError("give input_shape=, inputs= or make_batch= so bsfinder can make a batch")
    return specs


def _factory(model: Any) -> Callable[..., Any] | None:
    """``model`` when it is a class or factory object (not a module, not a spec string)."""
    if callable(model) and not _is_module(model) and not isinstance(model, str):
        return model
    return None


def _is_module(obj: Any) -> bool:
    from torch import nn

    return isinstance(obj, nn.Module)


def _label(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    name = getattr(obj, "__qualname__", None) or cls.__qualname__
    return f"{getattr(obj, '__module__', cls.__module__)}:{name}"


_SCRIPT_MODULES = (b"__main__", b"_bsfinder_user_")


def _what_travels(
    model: Any,
    *,
    model_kwargs: dict[str, Any],
    make_batch: Callable[[int], Any] | None,
    train_step: Callable[[int], Any] | None,
) -> tuple[dict[str, bytes | None], list[str]]:
    """Pickle (by reference) what a worker process needs, and list why some of it cannot go.

    Nothing may point into a script: the worker's ``__main__`` is not the user's.
    """
    travel: dict[str, bytes | None] = {}
    reasons: list[str] = []
    for name, obj in (("make_batch", make_batch), ("train_step", train_step)):
        if obj is not None:
            travel[name], why = _by_reference(obj)
            if why:
                reasons.append(f"{name} {why}")
    if model_kwargs:
        _, why = _by_reference(model_kwargs)
        if why:
            reasons.append(f"model_kwargs {why}")
    if model is None or isinstance(model, str) or train_step is not None:
        return travel, reasons
    if _is_module(model):
        if any(p.is_cuda for p in model.parameters()):
            reasons.append(
                "the model already lives on the GPU in this process; a worker would need a "
                "second copy"
            )
    else:
        travel["model_factory"], why = _by_reference(model)
        if why:
            reasons.append(f"the model factory {why}")
    return travel, reasons


def _optimizer_name(optimizer: Any) -> str:
    """An optimizer name, or the family of an optimizer object (for memory and the LR rule)."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise SpecError(f"optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        return optimizer
    import torch

    for cls, name in (
        (torch.optim.AdamW, "adamw"),
        (torch.optim.Adam, "adam"),
        (torch.optim.SGD, "sgd"),
    ):
        if isinstance(optimizer, cls):
            return name
    raise SpecError(
        f"optimizer {type(optimizer).__name__}: bsfinder models AdamW, Adam and SGD; pass one of "
        f"{', '.join(OPTIMIZERS)} by name, or measure your own optimizer with train_step="
    )


def _by_reference(obj: Any) -> tuple[bytes | None, str]:
    """Pickle ``obj`` for the worker, or say why it cannot travel there."""
    try:
        blob = pickle.dumps(obj)
    except Exception as exc:
        return None, f"cannot be pickled ({type(exc).__name__}: {exc})"
    if any(name in blob for name in _SCRIPT_MODULES):
        return None, "refers to code defined in a script, which a worker cannot import"
    return blob, ""


def _save_module(model: Any) -> tuple[str | None, str]:
    """``torch.save`` a module object for the worker, or say why it cannot travel there."""
    import zipfile

    import torch

    fd, path = tempfile.mkstemp(prefix="bsfinder-model-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(model, path)
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
            refs_script = any(
                name in archive.read(member) for member in pickles for name in _SCRIPT_MODULES
            )
    except Exception as exc:
        os.unlink(path)
        return None, f"the model cannot be saved for a worker ({type(exc).__name__}: {exc})"
    if refs_script:
        os.unlink(path)
        return None, "the model refers to code defined in a script, which a worker cannot import"
    return path, ""
