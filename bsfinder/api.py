"""The public entry points: thin facades over specs, runners, the search and recommendations."""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from bsfinder.core.recommend import LR_RULES
from bsfinder.core.results import ProbeResult
from bsfinder.core.search import Granularity
from bsfinder.devices.base import resolve_device
from bsfinder.devices.cpu import check_cpu_budget, default_cpu_budget
from bsfinder.errors import BsfinderError, BsfinderWarning, SpecError, UserCodeError
from bsfinder.execution.distributed import STRATEGIES, DistributedRunner, launch_context
from bsfinder.execution.inline import InlineRunner
from bsfinder.execution.process import DEFAULT_TRIAL_TIMEOUT_S, ProcessRunner
from bsfinder.memory.estimate import MemoryEstimate
from bsfinder.memory.profile import MemoryProfile, memory_scaling
from bsfinder.probe import ProbeEvent, ProbeSettings, run_probe, with_noise_scale
from bsfinder.units import format_bytes, parse_bytes
from bsfinder.workload.loading import InputSpec, load_object, parse_input_spec
from bsfinder.workload.step import OPTIMIZERS, WorkloadSpec

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
    keep_outputs: bool = False,
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
    trial_timeout_s: float | None = None,
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
        keep_outputs: keep the model's outputs (logits) alive through backward and the
            optimizer step, as a loop that holds them does. By default they are released
            once the loss is taken, as HF Trainer, Lightning and ``loss = model(x).loss``
            loops do. Not with ``train_step`` (your step decides).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        memory_limit: bytes or text like ``"24GiB"``. CPU: the budget (default: 90% of the
            available RAM, or of the container's cgroup memory limit minus its use when that
            is less; under torchrun shared by the node's ranks), from 16 MiB up to the RAM or
            the container's limit. CUDA: cap the allocator, to plan for a smaller card.
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
            workload can travel there: what a script or notebook defines goes by value,
            and a ``train_step`` steps copies of the model and optimizer it closes over;
            not an object that cannot be pickled, nor tensors already on the GPU here;
            then inline, with a :class:`~bsfinder.errors.BsfinderWarning` saying why).
        memory_model: jump near the answer with a fitted ``peak = a + k*batch`` line.
        trial_timeout_s: the longest a trial process may go without progress before any
            step has been timed (start-up, model build, the first trial; default 900 s);
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
    options = {k: v for k, v in locals().items() if k not in ("model", "on_event")}
    with _prepared(model, options, distributed=True) as (runner, settings):
        result = run_probe(runner, settings, on_event=on_event)
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
    return with_noise_scale(result, noise, settings)


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
    model_kwargs: dict[str, Any] | None = None,
    optimizer: Any = "adamw",
    precision: str = "32",
    loss: str = "auto",
    keep_outputs: bool = False,
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
            keep_outputs, device, isolation, memory_limit: as :func:`find_batch_size`.
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
    keep_outputs: bool = False,
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
        model, input_shape, inputs, make_batch, model_kwargs, optimizer, precision, loss,
            keep_outputs: as :func:`find_batch_size` (no ``train_step``: it needs real
            tensors).
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
    from bsfinder.memory.estimate import TargetDevice, estimate_workload
    from bsfinder.workload.step import Workload

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
    fields["keep_outputs"] = keep_outputs
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
    The temporary files (the saved model) go on every way out: a bad option found after
    saving, an error in the probe, a Ctrl-C or SIGTERM at any point.
    """
    with contextlib.ExitStack() as files, _prepare(model, options, distributed, files) as ready:
        yield ready


@contextlib.contextmanager
def _prepare(
    model: Any, options: dict[str, Any], distributed: bool, files: contextlib.ExitStack
) -> Iterator[tuple[ProcessRunner | InlineRunner | DistributedRunner, ProbeSettings]]:
    """:func:`_prepared`'s work; what it creates that must go is registered on ``files``."""
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
    if o["keep_outputs"] and o["train_step"] is not None:
        raise SpecError("keep_outputs applies to bsfinder's step: a train_step keeps what it keeps")
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
    budget = _budget(o["memory_limit"], cpu=resolved == "cpu")

    fields = _spec_fields(
        model, specs, optimizer_name, o["precision"], o["loss"], o["model_kwargs"]
    )
    fields["keep_outputs"] = o["keep_outputs"]

    # inline: nothing travels, so nothing is serialised (a GPU model would be copied to RAM)
    travel, reasons = (
        ({}, [])
        if o["isolation"] == "inline"
        else _what_travels(
            model,
            model_kwargs=fields["model_kwargs"],
            make_batch=o["make_batch"],
            train_step=o["train_step"],
        )
    )
    saved_model: str | None = None
    if is_module and o["train_step"] is None and not reasons and o["isolation"] != "inline":
        saved_model, why = _save_module(model)
        if saved_model is not None:
            files.callback(_remove, saved_model)
        if why:
            reasons.append(why)
    if o["isolation"] == "process" and reasons:
        raise SpecError(
            "isolation='process' is impossible, the workload cannot travel to a trial "
            "process: " + "; ".join(reasons)
        )
    use_process = o["isolation"] == "process" or (o["isolation"] == "auto" and not reasons)
    launched = None
    if distributed:  # the last step that can fail on one rank alone: it is collective
        launched = launch_context(
            o["strategy"], resolved, timeout_s=o["trial_timeout_s"] or DEFAULT_TRIAL_TIMEOUT_S
        )
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
        if o["isolation"] == "auto":
            warnings.warn(
                "bsfinder runs this probe's trials in this process, not in fresh ones: "
                + "; ".join(reasons)
                + ". A failed trial can leave memory held here, so the answer may be lower "
                "than a fresh training process can do. Pass isolation='inline' to choose "
                "this without a warning",
                BsfinderWarning,
                stacklevel=_callers_level(),
            )
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


def _callers_level() -> int:
    """The ``stacklevel`` that names the first frame outside bsfinder (and contextlib): the
    user's call, where a warning belongs."""
    inside = (os.path.dirname(os.path.abspath(__file__)) + os.sep, contextlib.__file__)
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame = frame.f_back
        level += 1
    return level


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
        (
            options["trial_timeout_s"] is None or options["trial_timeout_s"] > 0,
            "trial_timeout_s must be > 0",
        ),
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


def _budget(memory_limit: int | str | None, *, cpu: bool = False) -> int | None:
    """A memory size in bytes (None stays None); ``cpu``: the budget of a CPU probe, which
    must lie between :data:`~bsfinder.devices.cpu.MIN_CPU_BUDGET` and what this machine or
    container holds (checked here, before any trial)."""
    if memory_limit is None:
        return None
    if isinstance(memory_limit, str):
        try:
            value = parse_bytes(memory_limit)
        except ValueError as exc:
            raise SpecError(f"memory limit: {exc}") from None
    elif isinstance(memory_limit, bool) or not isinstance(memory_limit, int | float):
        raise SpecError(f"memory limit must be bytes or text like '4GiB', got {memory_limit!r}")
    elif not 1 <= memory_limit < float("inf"):  # also NaN
        raise SpecError(f"memory limit must be a positive number of bytes, got {memory_limit}")
    else:
        value = int(memory_limit)
    if cpu:
        check_cpu_budget(value)
    return value


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
    """Serialise what a trial process needs, and list why some of it cannot go there.

    Code from ``__main__`` (a script, a notebook cell) or from a ``path/file.py`` travels by
    value, importable code by reference (cloudpickle). A ``train_step`` takes copies of the
    model and optimizer it closes over: the user's own objects are never stepped.
    """
    travel: dict[str, bytes | None] = {}
    reasons: list[str] = []
    for name, obj in (("make_batch", make_batch), ("train_step", train_step)):
        if obj is not None:
            travel[name], why = _by_value(obj)
            if why:
                reasons.append(f"{name} {why}")
    if model_kwargs:
        # the spec itself (model_kwargs included) is pickled plainly, by reference
        try:
            blob = pickle.dumps(model_kwargs)
        except Exception as exc:
            blob, why = b"", f"cannot be pickled ({type(exc).__name__}: {exc})"
        else:
            why = "refer to code defined in a script" if _refers_to_script(blob) else ""
        if why:
            reasons.append(
                f"model_kwargs {why}; pass plain values (numbers, strings) and build such "
                "objects inside the model factory"
            )
    if model is None or isinstance(model, str) or train_step is not None:
        return travel, reasons
    if _is_module(model):
        devices = _devices_of(model)
        if devices:
            reasons.append(
                f"the model already lives on {', '.join(devices)} in this process, and a trial "
                "process would need a second copy; pass it on the CPU (model.cpu()), or pass "
                "its class or factory"
            )
    else:
        travel["model_factory"], why = _by_value(model)
        if why:
            reasons.append(f"the model factory {why}")
    return travel, reasons


def _refers_to_script(blob: bytes) -> bool:
    return any(name in blob for name in _SCRIPT_MODULES)


def _devices_of(model: Any) -> list[str]:
    """The devices other than the CPU that hold the module's parameters or buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({str(t.device) for t in tensors if t.device.type not in ("cpu", "meta")})


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


def _by_value(obj: Any, path: str | None = None) -> tuple[bytes | None, str]:
    """Serialise ``obj`` for a trial process (to ``path`` when given), or say why it cannot go.

    ``torch.save`` with cloudpickle inside: classes and functions of ``__main__`` (a script,
    a notebook cell) and of ``path/file.py`` modules by value, importable ones by reference,
    and tensors as archive records, which ``torch.load`` reads straight into their storage
    (a plain pickle holds each storage as a bytes object: two copies while it loads, under
    the trial's budget). Tensors on an accelerator do not go: the trial would hold a second
    copy of them on the same device.
    """
    import io

    import torch

    target: Any = io.BytesIO() if path is None else path
    with _pickling() as (pickle_module, devices, refusals):
        try:
            torch.save(obj, target, pickle_module=pickle_module, pickle_protocol=5)
        except Exception as exc:
            text = " ".join(str(exc).split())[:300]
            return None, (
                f"cannot be pickled, even by value ({type(exc).__name__}: {text}); create "
                "such objects inside the function or the model, or use isolation='inline'"
            )
    if refusals:
        return None, "; ".join(dict.fromkeys(refusals))
    if devices:
        return None, (
            f"holds tensors on {', '.join(sorted(devices))} in this process, and a trial "
            "process would need a second copy; keep them on the CPU until the step runs, or "
            "create them inside it"
        )
    return (target.getvalue() if path is None else b""), ""


@contextlib.contextmanager
def _pickling() -> Iterator[tuple[Any, set[str], list[str]]]:
    """A pickle module for ``torch.save``: cloudpickle, noting the accelerators whose tensors
    it meets and why an object would not load in a trial process (Keras); meanwhile the
    modules of ``path/file.py`` specs are pickled by value."""
    import cloudpickle
    import torch

    devices: set[str] = set()
    refusals: list[str] = []
    saving = sys.modules.get("keras.src.saving.keras_saveable")
    keras_saveable = getattr(saving, "KerasSaveable", None)

    class Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
                devices.add(str(obj.device))
            elif keras_saveable is not None and isinstance(obj, keras_saveable):
                return _keras_reduce(obj, devices, refusals)
            return super().reducer_override(obj)

    class PickleModule:  # what torch.save needs of a pickle module
        __name__ = "bsfinder-travel"

    PickleModule.Pickler = Pickler  # type: ignore[attr-defined]
    # a worker cannot import these by name (they were loaded from a file path): send code
    registered = []
    for name, module in list(sys.modules.items()):
        if name.startswith("_bsfinder_user_") and module is not None:
            with contextlib.suppress(ValueError):  # already registered
                cloudpickle.register_pickle_by_value(module)
                registered.append(module)
    try:
        yield PickleModule, devices, refusals
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


def _keras_reduce(obj: Any, devices: set[str], refusals: list[str]) -> Any:
    """Keras's own pickling of a model, layer or optimizer, checked here: it saves a config
    and weights, and a trial process rebuilds the object from them by class name, which
    fails for a class defined in a script (measured: Keras 3.x, a ``keras.Model`` subclass
    in ``__main__``: "Could not locate class")."""
    import io

    on = set()
    for variable in getattr(obj, "variables", None) or ():
        value = getattr(variable, "value", None)  # the torch backend's tensor
        device = getattr(value, "device", None)
        if getattr(device, "type", "cpu") not in ("cpu", "meta"):
            on.add(str(device))
    reduced = obj.__reduce__()
    if on:  # it cannot travel anyway; no second copy on that device to check it
        devices.update(on)
        return reduced
    rebuild, (saved, *_) = reduced[0], reduced[1]
    try:
        with warnings.catch_warnings():  # Keras warns that a fresh optimizer has no state
            warnings.simplefilter("ignore")
            rebuild(io.BytesIO(saved.getvalue()))
    except Exception as exc:
        text = " ".join(str(exc).split()).split(". ")[0][:200]  # Keras: hints follow
        refusals.append(
            f"holds a Keras {type(obj).__name__} that Keras cannot rebuild in another process "
            f"({type(exc).__name__}: {text}); define its classes in an importable module, "
            "registered with @keras.saving.register_keras_serializable()"
        )
    return reduced


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _save_module(model: Any) -> tuple[str | None, str]:
    """Save a module object for the trial processes, or say why it cannot travel there.

    A file, read under each trial's budget: its weights are the trial's memory.
    """
    fd, path = tempfile.mkstemp(prefix="bsfinder-model-", suffix=".pt")
    os.close(fd)
    try:
        _, why = _by_value(model, path)
    except BaseException:  # a Ctrl-C or SIGTERM while a large model is written
        os.unlink(path)
        raise
    if why:
        os.unlink(path)
        return None, f"the model {why}"
    return path, ""
