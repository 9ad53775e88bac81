"""The LR range test on the user's model and data: the steps, in a fresh process or here.

:func:`find_lr` trains a copy of the model (built fresh, or the checkpoint's weights) on
real batches of ``data(batch_size)`` while the learning rate grows exponentially
(:func:`bsfinder.core.lr_range.sweep`), records the loss of every step, stops when the
smoothed loss diverges, and reads the suggestion (:func:`bsfinder.core.lr_range.suggest`).

By default it runs in a fresh process (``isolation="process"``): the model, the data
loader and the optimizer's settings travel there (by reference or by value, as a probe's
trials), so that nothing of the sweep (weights it wrecked, optimizer state, RNG draws,
BatchNorm statistics) touches this process. ``isolation="inline"`` runs it here on a copy,
and puts the RNG states back. Each step's loss is written as it is measured: a Ctrl-C or
SIGTERM keeps the curve so far (``stopped="interrupted"``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bsfinder.core.lr_range import (
    DEFAULT_RULE,
    RULES,
    LRCurve,
    LRSuggestion,
    diverged,
    smooth,
    suggest,
    sweep,
)
from bsfinder.errors import BsfinderError, SpecError, UserCodeError
from bsfinder.options import WorkloadOptions, check_option

__all__ = ["LR_END", "LR_START", "LR_STEPS", "LRRangeResult", "find_lr", "run_sweep"]

#: the sweep's default range and length: fastai's (1e-7 to 10, 100 steps); Lightning's is
#: 1e-8 to 1 in 100. A diverging loss ends it early.
LR_START = 1e-7
LR_END = 10.0
LR_STEPS = 100
#: the optimizer families bsfinder builds, with the settings of its probe's (and of the
#: validation benchmark's): SGD with momentum 0.9; AdamW with torch's defaults
OPTIMIZERS = ("sgd", "adamw", "adam")
#: the version of :meth:`LRRangeResult.to_dict`'s shape
SCHEMA_VERSION = 1
#: a fresh process gets this long without a new step before it is stopped (start-up counts)
STALL_S = 300.0


@dataclass(frozen=True)
class LRRangeResult:
    """What a range test measured and suggests.

    Attributes:
        lr: the suggested learning rate (None: no clear descent; ``suggestion.reason`` says
            why).
        batch_size: the batch the sweep trained at.
        optimizer: the optimizer swept (``"sgd"``, ``"adamw"``, ``"adam"``, or a class name).
        curve: every step's LR and loss (:class:`~bsfinder.core.lr_range.LRCurve`).
        suggestion: the rule's reading (every rule's value in ``by_rule``).
        seconds: wall seconds of the whole test (a fresh process's start-up included).
        isolation: ``"process"`` or ``"inline"``.
        interrupted: stopped by Ctrl-C / SIGTERM: the curve is what was measured.
    """

    lr: float | None
    batch_size: int
    optimizer: str
    curve: LRCurve
    suggestion: LRSuggestion
    seconds: float
    isolation: str
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``schema_version`` (:data:`SCHEMA_VERSION`)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "suggestion": self.suggestion.to_dict(),
            "curve": self.curve.to_dict(),
            "seconds": round(self.seconds, 3),
            "isolation": self.isolation,
            "interrupted": self.interrupted,
        }


def find_lr(
    model: Any,
    data: Callable[[int], Any] | str,
    *,
    batch_size: int,
    optimizer: Any = "adamw",
    rule: str = DEFAULT_RULE,
    start_lr: float = LR_START,
    end_lr: float = LR_END,
    steps: int = LR_STEPS,
    device: str = "cpu",
    loss: str = "auto",
    precision: str = "32",
    checkpoint: str | os.PathLike[str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    isolation: str = "process",
    checkpointing: str = "none",
    seed: int = 0,
    time_limit_s: float | None = 120.0,
    on_step: Callable[[int, float, float], None] | None = None,
) -> LRRangeResult:
    """Run an LR range test (Smith 2017) of ``model`` on ``data`` at ``batch_size``.

    Args:
        model: a module class or factory, ``"pkg.mod:Net"``, or a module object (a copy is
            trained; yours is left as it was).
        data: ``data(batch_size)`` returning an iterable of training batches (re-iterated
            when it ends), or its ``"pkg.mod:make_loader"``.
        batch_size: the batch to sweep at: the one you will train with.
        optimizer: ``"sgd"`` (momentum 0.9), ``"adamw"``, ``"adam"``, or your optimizer
            object: its class and settings (momentum, betas, weight decay...) are used, its
            learning rate and state are not.
        rule: how the suggestion is read: ``"minimum/3"`` (the default: a third of the LR
            at the loss's running-median minimum, within 3x of the steepest descent; chosen
            on the validation benchmark, see :mod:`bsfinder.core.lr_range`),
            ``"steepest"``, ``"valley"``, ``"minimum/10"``.
        start_lr, end_lr, steps: the exponential sweep.
        device, loss, precision, checkpoint, model_kwargs: as
            :func:`bsfinder.find_batch_size` (``loss``: ``"auto"`` is the model's own
            loss, ``"cross-entropy"`` the batch's last element as the target).
        isolation: ``"process"`` (a fresh process; the default) or ``"inline"``.
        checkpointing: ``"blocks"``: the model's blocks checkpointed, as the probe that
            found ``batch_size`` had them (the same losses, less memory).
        seed: the torch seed of the copy's initialisation and the sweep.
        time_limit_s: stop the sweep after this long (the curve so far is read).
        on_step: called here, in this process, with ``(step, lr, loss)`` as each step is
            measured (``step`` from 1), for progress.

    Returns:
        An :class:`LRRangeResult`.

    Raises:
        SpecError: bad arguments, or the data or loss cannot be used. UserCodeError: the
            model raised on a batch.
    """
    _check(batch_size, rule, start_lr, end_lr, steps, isolation, optimizer, time_limit_s)
    check_option(WorkloadOptions, "checkpointing", checkpointing)
    lrs = sweep(start_lr, end_lr, steps)
    family = _optimizer_name(optimizer)
    job = {
        "model": model,
        "data": data,
        "batch_size": batch_size,
        "optimizer": _optimizer_recipe(optimizer),
        "lrs": lrs,
        "device": device,
        "loss": loss,
        "precision": precision,
        "checkpointing": checkpointing,
        "checkpoint": None if checkpoint is None else os.fspath(checkpoint),
        "model_kwargs": dict(model_kwargs or {}),
        "seed": seed,
        "time_limit_s": time_limit_s,
    }
    started = time.perf_counter()
    interrupted = False
    if isolation == "inline":
        curve = _inline(job, on_step)
        interrupted = curve.stopped == "interrupted"
    else:
        curve, interrupted = _fresh(job, on_step)
    suggestion = suggest(curve, rule)
    return LRRangeResult(
        lr=suggestion.lr,
        batch_size=batch_size,
        optimizer=family,
        curve=curve,
        suggestion=suggestion,
        seconds=time.perf_counter() - started,
        isolation=isolation,
        interrupted=interrupted,
    )


def _check(
    batch_size: Any,
    rule: str,
    start: float,
    end: float,
    steps: Any,
    isolation: str,
    optimizer: Any,
    time_limit_s: float | None,
) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SpecError(f"batch_size must be a positive integer, got {batch_size!r}")
    if rule not in RULES:
        raise SpecError(f"rule {rule!r}: use one of {', '.join(RULES)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 20:
        raise SpecError(f"steps={steps!r}: a range test needs at least 20 steps to show a descent")
    if not (isinstance(start, int | float) and isinstance(end, int | float)) or not (
        0 < start < end and math.isfinite(end)
    ):
        raise SpecError(f"the sweep needs 0 < start_lr < end_lr, got {start!r} and {end!r}")
    if isolation not in ("process", "inline"):
        raise SpecError(f"isolation {isolation!r}: use 'process' or 'inline'")
    if time_limit_s is not None and not time_limit_s > 0:
        raise SpecError(f"time_limit_s must be positive or None, got {time_limit_s!r}")
    _optimizer_name(optimizer)


def _optimizer_name(optimizer: Any) -> str:
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise SpecError(f"optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        return optimizer
    import torch

    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer).__name__
    raise SpecError(
        f"optimizer must be one of {', '.join(OPTIMIZERS)} or an optimizer object, got "
        f"{type(optimizer).__name__}"
    )


def _optimizer_recipe(optimizer: Any) -> dict[str, Any]:
    """How to build the sweep's optimizer: a family, or the user's class with its settings
    (the first param group's, without its parameters and learning rate)."""
    if isinstance(optimizer, str):
        return {"family": optimizer}
    group = optimizer.param_groups[0]
    accepted = inspect.signature(type(optimizer).__init__).parameters
    settings = {
        key: value
        for key, value in group.items()
        if key not in ("params", "lr", "initial_lr") and key in accepted
    }
    return {"class": type(optimizer), "settings": settings}


def _build_optimizer(recipe: dict[str, Any], params: Any, lr: float) -> Any:
    import torch

    family = recipe.get("family")
    if family == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if family == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if family == "adam":
        return torch.optim.Adam(params, lr=lr)
    return recipe["class"](params, lr=lr, **recipe["settings"])


# -- the sweep itself ---------------------------------------------------------------------------
def run_sweep(
    net: Any,
    batches: Iterator[Any],
    loss_fn: Callable[[Any, Any], Any],
    optimizer: Any,
    lrs: tuple[float, ...],
    *,
    autocast: Any = None,
    scaler: Any = None,
    time_limit_s: float | None = None,
    on_step: Callable[[float, float], None] | None = None,
) -> LRCurve:
    """Train ``net`` one step per LR of ``lrs`` on ``batches``; stop when the smoothed loss
    diverges (:func:`bsfinder.core.lr_range.diverged`), at the time limit, when the data
    ends, or at a Ctrl-C (``stopped="interrupted"``: the steps so far are kept). With a
    ``GradScaler`` (fp16), a step whose gradients overflowed is skipped by the scaler; its
    loss still counts (the loss itself was finite). ``on_step(lr, loss)`` is called after
    each step."""
    seen_lrs: list[float] = []
    losses: list[float] = []
    stopped = "end"
    started = time.perf_counter()
    net.train()
    try:
        for lr in lrs:
            if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
                stopped = "time-limit"
                break
            try:
                batch = next(batches)
            except StopIteration:
                stopped = "data"
                break
            value = _step(net, batch, loss_fn, optimizer, lr, autocast=autocast, scaler=scaler)
            batch = None
            seen_lrs.append(lr)
            losses.append(value)
            if on_step is not None:
                on_step(lr, value)
            if diverged(smooth(losses)):
                stopped = "diverged"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    optimizer.zero_grad(set_to_none=True)
    return LRCurve(tuple(seen_lrs), tuple(losses), smooth(losses), stopped)


def _step(
    net: Any,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any],
    optimizer: Any,
    lr: float,
    *,
    autocast: Any,
    scaler: Any,
) -> float:
    """One training step at ``lr``; its loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = loss_fn(net, batch)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach().float())


def _run_job(job: dict[str, Any], on_step: Callable[[float, float], None] | None) -> LRCurve:
    """Build the model copy, its optimizer and data, and sweep (in whichever process)."""
    import torch

    from bsfinder.noise.data import LoaderError, _load_checkpoint, data_loss_fn, loader_batches
    from bsfinder.workload.loading import build_model, load_object
    from bsfinder.workload.step import autocast_for, weights_dtype

    torch.manual_seed(job["seed"])
    model = job["model"]
    if isinstance(model, torch.nn.Module):
        net = model  # a copy: the inline job's, or the one the fresh process unpickled
    else:
        factory = load_object(model) if isinstance(model, str) else model
        spec = model if isinstance(model, str) else ""
        net = build_model(factory, job["model_kwargs"], spec=spec)
    device = job["device"]
    net.to(device, weights_dtype(job["precision"]))  # bf16-true: the weights in bf16
    if job["checkpointing"] != "none":  # the probe's batch fits with it, maybe not without
        from bsfinder.workload.blocks import checkpoint_blocks

        if not checkpoint_blocks(net)[0]:
            raise SpecError("checkpointing='blocks': the model has no blocks to checkpoint")
    if job["checkpoint"] is not None:
        _load_checkpoint(net, job["checkpoint"], device)
    data = job["data"]
    make_loader = load_object(data) if isinstance(data, str) else data
    optimizer = _build_optimizer(job["optimizer"], net.parameters(), job["lrs"][0])
    autocast = autocast_for(job["precision"], device)
    scaler = (
        torch.amp.GradScaler(torch.device(device).type)
        if job["precision"] == "fp16-mixed"
        else None
    )
    batch_size = job["batch_size"]
    try:
        return run_sweep(
            net, loader_batches(make_loader, batch_size, repeat=True),
            data_loss_fn(job["loss"], device, weights_dtype(job["precision"])),
            optimizer, job["lrs"], autocast=autocast, scaler=scaler,
            time_limit_s=job["time_limit_s"], on_step=on_step,
        )  # fmt: skip
    except (SpecError, KeyboardInterrupt):
        raise
    except LoaderError as exc:
        raise exc.spec_error(f"data({batch_size})") from None
    except Exception as exc:
        raise UserCodeError.from_exception(exc, batch_size=batch_size) from exc


def _inline(job: dict[str, Any], on_step: Callable[[int, float, float], None] | None) -> LRCurve:
    """The sweep here, on a copy; the RNG states put back after."""
    import torch

    from bsfinder.workload.state import UserStateGuard

    guard = UserStateGuard()
    if isinstance(job["model"], torch.nn.Module):  # the user's: sweep a copy of it
        job = {**job, "model": copy.deepcopy(job["model"])}
    counted = None
    if on_step is not None:
        step = itertools.count(1)

        def counted(lr: float, loss: float) -> None:
            on_step(next(step), lr, loss)

    try:
        return _run_job(job, counted)
    finally:
        guard.restore()


# -- in a fresh process -------------------------------------------------------------------------
def _fresh(
    job: dict[str, Any], on_step: Callable[[int, float, float], None] | None = None
) -> tuple[LRCurve, bool]:
    """Run the sweep in a new interpreter; each step's (lr, loss) comes back as a line of
    JSON, so that an interrupt keeps the curve so far. Returns the curve and whether it was
    interrupted."""
    from bsfinder.execution.placement import _by_value
    from bsfinder.execution.process import worker_sys_path

    with tempfile.TemporaryDirectory(prefix="bsfinder-lr-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.pt"), os.path.join(tmp, "steps.jsonl")
        blob, why = _by_value(job, job_path)
        if blob is None:
            raise SpecError(f"the LR range test cannot run in a fresh process: the job {why}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(worker_sys_path())}
        # stderr to a file, not a pipe: a model that warns at every step would fill a pipe
        # nobody reads until the end, and block the sweep
        with open(os.path.join(tmp, "stderr.txt"), "w+", encoding="utf-8") as errors:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bsfinder.lr._child", job_path, out_path],
                env=env, stdout=subprocess.DEVNULL, stderr=errors, text=True,
                start_new_session=True,
            )  # fmt: skip
            interrupted = False
            try:
                _wait(proc, out_path, on_step)
            except KeyboardInterrupt:
                interrupted = True
                _stop(proc)
            errors.seek(0)
            stderr = errors.read()
        lines = _read_lines(out_path)
    return _curve_from(lines, interrupted, proc.returncode, stderr), interrupted


def _wait(
    proc: subprocess.Popen[str],
    out_path: str,
    on_step: Callable[[int, float, float], None] | None = None,
) -> None:
    """Wait for the child, passing each step it writes to ``on_step``; stop it when no step
    came for :data:`STALL_S`."""
    last_size, last_change = -1, time.monotonic()
    seen = 0
    while proc.poll() is None:
        size = os.path.getsize(out_path) if os.path.exists(out_path) else 0
        if size != last_size:
            last_size, last_change = size, time.monotonic()
            if on_step is not None:
                seen = _report(_read_lines(out_path), seen, on_step)
        elif time.monotonic() - last_change > STALL_S:
            _stop(proc)
            raise BsfinderError(
                f"the LR range test's process made no step in {STALL_S:.0f} s and was stopped"
            )
        time.sleep(0.05)
    if on_step is not None:
        _report(_read_lines(out_path), seen, on_step)


def _report(
    lines: list[dict[str, Any]], seen: int, on_step: Callable[[int, float, float], None]
) -> int:
    """``on_step`` for the step lines after the first ``seen``; the step lines seen now."""
    steps = [line for line in lines if "lr" in line and "loss" in line]
    for index in range(seen, len(steps)):
        loss = steps[index]["loss"]
        on_step(index + 1, float(steps[index]["lr"]), math.nan if loss is None else float(loss))
    return max(seen, len(steps))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_lines(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the last line, cut by a kill
                break
    return out


def _curve_from(
    lines: list[dict[str, Any]], interrupted: bool, code: int | None, stderr: str
) -> LRCurve:
    """The curve from the child's lines, or its error raised as the error it was."""
    steps = [line for line in lines if "lr" in line]
    ends = [line for line in lines if "end" in line]
    if ends and "error" in ends[-1]:
        error = ends[-1]["error"]
        if error["kind"] == "spec":
            raise SpecError(error["message"])
        raise UserCodeError(
            batch_size=error.get("batch_size"), exc_type=error["exc_type"],
            detail=error["detail"], traceback_text=error.get("traceback", ""),
        )  # fmt: skip
    if not ends and not interrupted:
        tail = " | ".join(stderr.strip().splitlines()[-3:]) if stderr.strip() else "no output"
        raise BsfinderError(
            f"the LR range test's process ended with exit status {code} after {len(steps)} "
            f"steps: {tail}"
        )
    lrs = tuple(float(s["lr"]) for s in steps)
    losses = tuple(math.nan if s["loss"] is None else float(s["loss"]) for s in steps)
    stopped = "interrupted" if interrupted else str(ends[-1]["end"])
    return LRCurve(lrs, losses, smooth(losses), stopped)
