"""Where trials run, decided once: what of the workload can travel to a trial process.

A probe's trials run in fresh processes when the workload can travel there (code from a
script or notebook goes by value, a module object as a saved file, tensors as records) and
in this process otherwise, with a :class:`~bsfinder.errors.BsfinderWarning` saying why.
:func:`place` makes that decision once, with the device per rank and the CPU budget, and
:func:`build_runner` builds the runner it names. The options are checked before (by the
API): here they are decided on.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bsfinder.devices.cpu import cpu_budget_default
from bsfinder.errors import BsfinderWarning, SpecError
from bsfinder.execution.distributed import Control, DistContext, DistributedRunner, launch_context
from bsfinder.execution.inline import InlineRunner
from bsfinder.execution.process import ProcessRunner
from bsfinder.options import DEFAULT_TRIAL_TIMEOUT_S
from bsfinder.workload.spec import factory_of, is_module
from bsfinder.workload.step import WorkloadSpec

__all__ = [
    "Placement",
    "asked_device",
    "build_runner",
    "place",
]


@dataclass(frozen=True)
class Placement:
    """Where a probe's trials run, decided once before the first trial."""

    #: the isolation asked for: ``"auto"``, ``"process"`` or ``"inline"``
    isolation: str
    #: trials run in fresh processes (else in this one, with the user's objects)
    use_process: bool
    #: the device the trials use (under a launcher: this rank's GPU)
    device: str
    #: the user's memory budget for every trial (a CPU probe's default settled here, once)
    memory_limit_bytes: int | None
    #: ``make_batch``, ``train_step`` and ``model_factory`` serialised for a trial process
    travel: Mapping[str, bytes | None] = field(default_factory=dict)
    #: a module object saved for the trial processes (removed when the placement ends)
    model_file: str | None = None
    #: why the workload cannot travel to a trial process (empty when it can)
    reasons: tuple[str, ...] = ()
    #: this rank's place among the ranks and their control group (a probe with strategy=)
    launched: tuple[DistContext, Control] | None = None
    #: what set the budget when it is a CPU's default ("90% of the available RAM"), else None
    budget_source: str | None = None

    @property
    def world_size(self) -> int:
        """The ranks probing together (1 without a strategy)."""
        return self.launched[0].world_size if self.launched is not None else 1

    @property
    def why_inline(self) -> str:
        """Why trials run in this process, for the inline runner's notes."""
        return "; ".join(self.reasons) or "isolation='inline'"


def asked_device(model: Any, device: str) -> str:
    """The device asked for: under ``"auto"``, a module object's own (where it lives)."""
    if device == "auto" and is_module(model):
        params = list(model.parameters())
        return str(params[0].device) if params else "auto"
    return device


@contextlib.contextmanager
def place(
    model: Any,
    spec: WorkloadSpec,
    *,
    make_batch: Callable[[int], Any] | None,
    train_step: Callable[[int], Any] | None,
    isolation: str,
    device: str,
    resolved: str,
    memory_limit_bytes: int | None,
    strategy: str | None = None,
    trial_timeout_s: float | None = None,
    gpus: int = 1,
    global_batch: int | None = None,
) -> Iterator[Placement]:
    """Decide where the trials run, and hold that placement for the probe.

    ``device`` is the device asked for (:func:`asked_device`), ``resolved`` the one it names
    here; ``memory_limit_bytes`` the checked budget (None: a CPU probe's default, shared by
    the ranks of a node). ``strategy``: join the other ranks (collective: every rank calls this).

    The saved model file goes on every way out (a refusal found after saving, an error in
    the probe, a Ctrl-C or SIGTERM at any point): one exit stack holds it from before the
    file exists.

    Raises:
        SpecError: ``isolation="process"`` or a ``strategy`` with a workload that cannot
            travel to a trial process; ``gpus``, ``global_batch`` or ``device`` that do not
            fit the ranks.
    """
    with contextlib.ExitStack() as cleanup:
        # inline: nothing travels, so nothing is serialised (a GPU model would be copied to RAM)
        travel, reasons = (
            ({}, [])
            if isolation == "inline"
            else _what_travels(
                model, model_kwargs=dict(spec.model_kwargs), make_batch=make_batch,
                train_step=train_step,
            )
        )  # fmt: skip
        model_file: str | None = None
        if is_module(model) and train_step is None and not reasons and isolation != "inline":
            model_file, why = _save_module(model, cleanup)
            if why:
                reasons.append(why)
        if isolation == "process" and reasons:
            raise SpecError(
                "isolation='process' is impossible, the workload cannot travel to a trial "
                "process: " + "; ".join(reasons)
            )
        use_process = isolation == "process" or (isolation == "auto" and not reasons)
        # the last step that can fail on one rank alone: it is collective
        launched = launch_context(
            strategy, resolved, timeout_s=trial_timeout_s or DEFAULT_TRIAL_TIMEOUT_S
        )
        placement = Placement(
            isolation=isolation,
            use_process=use_process,
            device=_rank_device(device, resolved, launched),
            memory_limit_bytes=memory_limit_bytes,
            travel=travel,
            model_file=model_file,
            reasons=tuple(reasons),
            launched=launched,
        )
        if placement.memory_limit_bytes is None and placement.device == "cpu":
            # settled once: every trial gets the same budget; the ranks of a node share its RAM
            share = launched[0].local_world_size if launched is not None else 1
            budget, source = cpu_budget_default(share=share)
            placement = replace(placement, memory_limit_bytes=budget, budget_source=source)
        if launched is not None:
            try:
                _check_ranks(placement, device=device, gpus=gpus, global_batch=global_batch)
            except SpecError:
                launched[1].close()
                raise
        yield placement


def _rank_device(device: str, resolved: str, launched: tuple[DistContext, Control] | None) -> str:
    """The device of this rank's trials: under a launcher, GPU ``LOCAL_RANK``."""
    if launched is not None and device in ("auto", "cuda") and resolved != "cpu":
        return f"cuda:{launched[0].local_rank}"  # torchrun's convention: a GPU per rank
    return resolved


def _check_ranks(placement: Placement, *, device: str, gpus: int, global_batch: int | None) -> None:
    """A probe with strategy=: its trials can run in fresh processes, and the plans fit the
    ranks it runs on."""
    assert placement.launched is not None
    ctx, world = placement.launched[0], placement.world_size
    if not placement.use_process:
        raise SpecError(
            "a probe with strategy= runs each rank's trials in fresh processes, and this "
            "workload cannot travel there: "
            + placement.why_inline
            + ". Put the model in an importable module (or pass 'path/to/file.py:Net', with "
            "the script's own work under `if __name__ == '__main__':`)"
        )
    if gpus not in (1, world):
        raise SpecError(f"gpus={gpus}, but the probe runs on {world} ranks: plans are for them")
    if global_batch is not None and global_batch % world:
        raise SpecError(f"global batch {global_batch} does not split evenly over {world} ranks")
    if ctx.local_world_size > 1 and ":" in device:
        raise SpecError(
            f"device {device!r} would put every rank of this node on one GPU; leave the "
            "device 'auto' or 'cuda': each rank uses cuda:LOCAL_RANK"
        )


def build_runner(
    placement: Placement,
    spec: WorkloadSpec,
    *,
    model: Any,
    make_batch: Callable[[int], Any] | None,
    train_step: Callable[[int], Any] | None,
    optimizer: Any,
    warmup_steps: int,
    steps: int,
    trial_timeout_s: float | None,
) -> ProcessRunner | InlineRunner | DistributedRunner:
    """The runner ``placement`` names: a process runner (on every rank with strategy=) with
    what travels, or the inline runner with the user's own objects (warning, under
    ``isolation="auto"``, that the answer may be lower than a fresh process can do)."""
    if placement.use_process:
        runner: ProcessRunner | DistributedRunner = ProcessRunner(
            replace(
                spec,
                model_file=placement.model_file,
                model_factory=placement.travel.get("model_factory"),
                make_batch=placement.travel.get("make_batch"),
                train_step=placement.travel.get("train_step"),
            ),
            device=placement.device,
            memory_limit_bytes=placement.memory_limit_bytes,
            warmup_steps=warmup_steps,
            steps=steps,
            timeout_s=trial_timeout_s,
            distributed=placement.launched[0] if placement.launched is not None else None,
        )
        if placement.launched is not None:
            runner = DistributedRunner(runner, *placement.launched)
        return runner
    if placement.isolation == "auto":
        warnings.warn(
            "bsfinder runs this probe's trials in this process, not in fresh ones: "
            + "; ".join(placement.reasons)
            + ". A failed trial can leave memory held here, so the answer may be lower "
            "than a fresh training process can do. Pass isolation='inline' to choose "
            "this without a warning",
            BsfinderWarning,
            stacklevel=_callers_level(),
        )
    module = is_module(model)
    # Without a train_step bsfinder builds its own optimizer of the same family (fresh state
    # per trial); with one, the user's optimizer is stepped and must be restored afterwards.
    user_optimizer = optimizer if train_step is not None and spec.optimizer != optimizer else None
    return InlineRunner(
        spec,
        device=placement.device,
        memory_limit_bytes=placement.memory_limit_bytes,
        warmup_steps=warmup_steps,
        steps=steps,
        model=model if module and train_step is None else None,
        factory=factory_of(model),
        make_batch=make_batch,
        train_step=train_step,
        guard_model=model if module else None,
        guard_optimizer=user_optimizer,
        reason=placement.why_inline,
    )


def _callers_level() -> int:
    """The ``stacklevel`` that names the first frame outside bsfinder (and contextlib): the
    user's call, where a warning belongs."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bsfinder/
    inside = (package + os.sep, contextlib.__file__)
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame = frame.f_back
        level += 1
    return level


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
    if is_module(model):
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


def _save_module(model: Any, cleanup: contextlib.ExitStack) -> tuple[str | None, str]:
    """Save a module object for the trial processes, or say why it cannot travel there.

    A file, read under each trial's budget: its weights are the trial's memory. Its removal
    goes on ``cleanup`` as soon as it exists (a Ctrl-C or SIGTERM while a large model is
    written included); a model that cannot travel takes its file with it at once.
    """
    fd, path = tempfile.mkstemp(prefix="bsfinder-model-", suffix=".pt")
    cleanup.callback(_remove, path)
    os.close(fd)
    _, why = _by_value(model, path)
    if why:
        _remove(path)
        return None, f"the model {why}"
    return path, ""
