"""The trial worker: ``python -m bsfinder._worker READ_FD WRITE_FD``.

A fork server. It imports torch and the user's code once, without starting threads or
CUDA, then forks one child per request. The child warms up, puts the memory budget in
force, builds the model, runs one trial, reports and exits: every trial runs in a process
that no other trial has touched, at the cost of a fork and a model build (tens of ms for
small models) instead of a new interpreter (seconds).

Requests carry an id; every answer to a request starts with its id, so that a stray message
can never be taken for the answer to a later request. Answers (tuples ``(id, kind, ...)``):
``ready`` (describe), ``step``..., ``trial``, or one of ``spec_error``, ``user_error``,
``build_oom``, ``worker_error``; ``died`` when a child exits without its final message
(signal, abort).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    inbox = Connection(int(argv[1]), writable=False)
    outbox = Connection(int(argv[2]), readable=False)
    config: dict[str, Any] = inbox.recv()
    sys.path[:0] = [p for p in config["sys_path"] if p not in sys.path]

    from bsfinder.errors import SpecError
    from bsfinder.workload import Workload

    try:
        import torch

        workload = Workload(config["spec"], config["device"])
        workload.load()
        _preimport(workload, config["device"], distributed=config.get("distributed") is not None)
        workload.rehearse()
        if config["device"].startswith("cuda") and torch.cuda.is_initialized():
            raise SpecError(
                "importing the model's module initialised CUDA, so bsfinder cannot fork fresh "
                "trial processes from it; create CUDA tensors inside the model factory instead"
            )
    except Exception as exc:
        message = _failure_message(exc, under_limit=False)
        outbox.send(message)
        return 2 if message[0] == "spec_error" else 1
    # Everything imported so far is permanent: freezing it keeps each child's garbage
    # collection (and its copy-on-write page faults) to the child's own objects.
    gc.collect()
    gc.freeze()
    outbox.send(("zygote-ready", {"pid": os.getpid(), "startup_s": time.perf_counter() - started}))

    while True:
        try:
            request = inbox.recv()
        except EOFError:
            return 0
        if request[0] not in ("describe", "trial", "profile"):
            return 0
        kind, batch_size, request_id, extra = request
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one trial, then _exit (never back into this loop)
            code = 3
            try:
                outbox_for = _Tagged(outbox, request_id)
                code = _child(kind, batch_size, workload, config, outbox_for, extra)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            outbox.send((request_id, "died", -os.WTERMSIG(status)))
        elif os.WEXITSTATUS(status) != 0:
            outbox.send((request_id, "died", os.WEXITSTATUS(status)))


class _Tagged:
    """The outbox of one child: every message starts with the id of its request."""

    def __init__(self, outbox: Connection, request_id: int) -> None:
        self._outbox = outbox
        self._id = request_id

    def send(self, message: tuple[Any, ...]) -> None:
        self._outbox.send((self._id, *message))


def _failure_message(exc: Exception, *, under_limit: bool) -> tuple[Any, ...]:
    """The message for an exception raised while loading or building (call inside except)."""
    from bsfinder.errors import SpecError, UserCodeError, describe_oom

    text = " ".join(str(exc).split())
    if isinstance(exc, SpecError):
        return ("spec_error", str(exc))
    if isinstance(exc, UserCodeError):
        return ("user_error", None, exc.exc_type, exc.detail, exc.traceback_text)
    reason = describe_oom(exc, under_memory_limit=under_limit)
    if reason is not None:
        return ("build_oom", reason)
    if "forked subprocess" in text or "CUDA initialization" in text:
        return (
            "spec_error",
            "CUDA cannot start in bsfinder's forked trial process: importing the model's module "
            f"touched CUDA ({text[:200]}); create CUDA tensors inside the model factory, or use "
            "--isolation inline",
        )
    return ("user_error", None, type(exc).__name__, str(exc), traceback.format_exc())


def _profile(
    workload: Any, backend: Any, batch_size: int, outbox: _Tagged, snapshot: str | None
) -> int:
    from bsfinder.errors import describe_oom
    from bsfinder.profiling import profile_step

    try:
        profile = profile_step(workload, backend, batch_size, snapshot=snapshot)
    except Exception as exc:
        reason = describe_oom(exc, under_memory_limit=backend.under_limit)
        if reason is not None:
            outbox.send(("profile_oom", reason))
        else:
            tb = traceback.format_exc()
            outbox.send(("user_error", batch_size, type(exc).__name__, str(exc), tb))
        return 0
    outbox.send(("profile", profile.to_dict()))
    return 0


def _preimport(workload: Any, device: str, *, distributed: bool = False) -> None:
    """Trigger lazy imports in the server, so that children share them (no threads, no CUDA).

    Under torchrun also DDP's and FSDP2's modules (measured: 42 MiB of address space that a
    trial would otherwise count as its own).
    """
    import torch

    if distributed:
        import torch.distributed.tensor
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    param = torch.nn.Parameter(torch.zeros(2))
    for name in ("AdamW", "Adam", "SGD"):
        getattr(torch.optim, name)([param], lr=0.0)
    if not device.startswith("cuda"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pass


def _child(
    kind: str,
    batch_size: int | None,
    workload: Any,
    config: dict[str, Any],
    outbox: _Tagged,
    extra: dict[str, Any],
) -> int:
    """Run in the forked child; returns 0 once its final message is sent.

    Under torchrun (``config["distributed"]``) a trial first joins this round's process
    group; a failure is flagged to the other ranks, and a failure that only follows another
    rank's (a collective whose peer is gone) is reported as ``peer``.
    """
    started = time.perf_counter()
    from bsfinder.devices.base import backend_for
    from bsfinder.devices.cpu import ALLOCATOR_KEYS
    from bsfinder.distributed import PEER_FAILED, looks_like_peer_loss
    from bsfinder.errors import UserCodeError
    from bsfinder.trial import execute_trial

    backend = None
    group = None
    ctx = config.get("distributed")
    try:
        import torch

        if config.get("threads"):
            torch.set_num_threads(config["threads"])
        workload.warm_up()
        if ctx is not None and kind == "trial":
            from bsfinder.distributed import join_round

            group = join_round(workload, ctx, extra["tag"], config["device"])
        elif ctx is not None and ctx.strategy == "fsdp":
            # describing an FSDP probe: the whole model may not fit one rank, and never has
            # to; it is built on the CPU, outside the budget, and only its sizes are read
            workload.prebuild()
            workload.wrap = lambda model: model
        backend = backend_for(config["device"])
        capacity = backend.apply_budget(config["budget_bytes"])
        workload.build()
    except Exception as exc:
        under_limit = backend is not None and backend.under_limit
        message = _failure_message(exc, under_limit=under_limit)
        peer_like = message[0] == "user_error" and looks_like_peer_loss(message[2], message[3])
        if group is not None and not group.own_failure(message[0], peer_like=peer_like):
            message = ("peer", PEER_FAILED)
        outbox.send(message)
        return 0
    setup_s = time.perf_counter() - started
    if kind == "describe":
        try:
            info = {
                "capacity_bytes": capacity,
                "device": backend.describe(),
                "allocator_env": {k: os.environ[k] for k in ALLOCATOR_KEYS if k in os.environ},
                "setup_s": setup_s,
                "parameters": workload.parameter_stats(),
            }
        except Exception:
            outbox.send(("worker_error", traceback.format_exc()))
            return 0
        outbox.send(("ready", info))
        return 0
    assert batch_size is not None
    if kind == "profile":
        return _profile(workload, backend, batch_size, outbox, extra.get("snapshot"))

    def progress(done: int, total: int) -> None:
        outbox.send(("step", done, total))

    try:
        trial = execute_trial(
            workload,
            backend,
            batch_size,
            warmup_steps=config["warmup_steps"],
            steps=config["steps"],
            on_step=progress,
        )
    except UserCodeError as exc:
        peer_like = looks_like_peer_loss(exc.exc_type, exc.detail)
        if group is not None and not group.own_failure("user_error", peer_like=peer_like):
            detail = " ".join(exc.detail.split())[:200]
            outbox.send(("peer", f"{PEER_FAILED} ({exc.exc_type}: {detail})"))
            return 0
        outbox.send(("user_error", batch_size, exc.exc_type, exc.detail, exc.traceback_text))
        return 0
    except BaseException:
        if group is not None:
            group.own_failure("worker_error")
        outbox.send(("worker_error", traceback.format_exc()))
        return 0
    if group is not None:
        if trial.fits:
            group.finish()
        else:
            group.own_failure(trial.failure or "oom")
    outbox.send(("trial", asdict(trial), setup_s))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
