"""The trial worker: a fork server started by :class:`bsfinder.execution.process.ProcessRunner`.

It is started as ``python -P -c BOOT READ_FD WRITE_FD SYS_PATH PARENT_PID`` (see
:data:`BOOT`): ``sys.path`` is set before anything but ``sys`` is imported, so nothing in the
current directory can shadow the standard library or bsfinder's dependencies. It dies with
its parent (``PR_SET_PDEATHSIG``), and so does every trial process it forks.

A fork server. It imports torch and, when that is safe (``preload``), the user's code once,
builds the model on the CPU once (``prebuild``, see :func:`_prebuild`), then forks one child
per request. The child warms up, puts the memory budget in force (counting the inherited
weights as its own), places the model on the device (on the CPU: nothing to do; where the
server could not build it: builds it), runs one trial, reports and exits: every trial runs
in a process that no other trial has touched, at the cost of a fork instead of a new
interpreter (seconds) or a new model (seconds of random initialisation for a billion
parameters).

Fork is only safe from a process with one thread. The server runs torch with one intra-op
thread, so that a tensor op in the user's module (a NumPy-initialised weight, a position
table, Keras at import) cannot start an OpenMP pool whose threads the children would wait
for forever (measured on 178d663: 5 of 5 such models hung every trial); each child sets the
real thread count. After importing the user's code the server checks that it still has no
thread but torch's own and has not initialised CUDA; if it has (``unsafe``), the runner
starts a server that imports only torch, and every child imports the user's code itself.

Requests carry an id; every answer to a request comes with its id, so that a stray message
can never be taken for the answer to a later request. The messages are the dataclasses of
:mod:`bsfinder.execution.messages`. Answers: ``Stage`` (what the child is doing:
``import``, ``rehearse``, ``build``), ``Begin`` (the child's pid and budget baseline),
``Step``..., then ``Described``, ``TrialDone``, ``Profiled``, or one of ``SpecFailed``,
``UserFailed``, ``BuildOOM``, ``ProfileOOM``, ``PeerFailed``, ``WorkerFailed``; ``Died``
with the exit status and the child's peak resident bytes when it exits without its final
message (signal, ``os._exit``, abort). The server itself sends ``Stage`` (``import``,
``rehearse``, ``prebuild``), then ``ServerReady`` or ``Unsafe`` (why forking from it is not
safe) once.
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

from bsfinder.execution.messages import (
    Begin,
    BuildOOM,
    Described,
    Died,
    PeerFailed,
    Profiled,
    ProfileOOM,
    Request,
    ServerReady,
    SpecFailed,
    Stage,
    Step,
    TrialDone,
    Unsafe,
    UserFailed,
    WorkerConfig,
    WorkerFailed,
    send,
)

#: the ``-c`` program that starts the server: only ``sys`` is imported before ``sys.path`` is
#: the one the runner chose (argv[3], one entry per line)
BOOT = (
    "import sys; sys.path[:] = [p for p in sys.argv[3].split('\\n') if p]; "
    "from bsfinder.execution._worker import main; sys.exit(main(sys.argv))"
)

#: PR_SET_PDEATHSIG from <linux/prctl.h>
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), and exit now if
    the parent is already gone (it died before the request was made)."""
    import signal

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the parent's killpg still stops us
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _restore_env(name: str, value: str | None) -> None:
    """Give the trial process the user's value of an environment variable the server set."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _threads() -> dict[str, str]:
    """This process's threads: id -> name (from /proc; empty where there is no /proc)."""
    try:
        ids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    names = {}
    for tid in ids:
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as handle:
                names[tid] = handle.read().strip()
        except OSError:
            continue
    return names


#: threads whose library makes fork safe itself: jemalloc's background purging threads
#: (``background_thread:true``, as pyarrow's bundled jemalloc runs; pandas loads pyarrow, and
#: Keras 3 loads pandas). jemalloc takes all its locks before a fork and, in the child,
#: resets its background-thread state to none running (its ``pthread_atfork`` handlers,
#: ``background_thread_postfork_child``): the child holds no lock a lost thread held.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def _fork_hazards(baseline: dict[str, str]) -> str:
    """Why forking from this process is not safe now ('' when it is)."""
    import torch

    reasons = []
    new = {
        tid: name
        for tid, name in _threads().items()
        if tid not in baseline and name not in FORK_SAFE_THREADS
    }
    if new:
        names = sorted(set(new.values()))
        reasons.append(
            f"started {len(new)} thread{'s' if len(new) > 1 else ''} "
            f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
        )
    if torch.cuda.is_initialized():
        reasons.append("initialised CUDA")
    return " and ".join(reasons)


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    die_with_parent(int(argv[4]))
    inbox = Connection(int(argv[1]), writable=False)
    outbox = Connection(int(argv[2]), readable=False)
    config: WorkerConfig = inbox.recv()

    from bsfinder.workload.step import Workload

    distributed = config.distributed is not None
    held = None  # bytes of the model built here, which every trial counts as its own
    try:
        import torch

        # the children's thread count: the caller's choice, else torch's default here
        threads = config.threads or torch.get_num_threads()
        torch.set_num_threads(1)  # no OpenMP pool in the server (see the module docstring)
        workload = Workload(config.spec, config.device)
        _preimport(workload, config.device, distributed=distributed)
        baseline = _threads()  # torch's own (and bsfinder's pre-imports'): the user's come after
        if config.preload:
            send(outbox, Stage("import"))
            workload.load()
            if config.rehearse:
                send(outbox, Stage("rehearse"))
                workload.rehearse()
            hazards = _fork_hazards(baseline)
            if hazards:
                send(outbox, Unsafe(hazards))
                return 0
            if _may_prebuild(workload, config):
                send(outbox, Stage("prebuild"))
                # what is imported so far is permanent: frozen, the build's collections skip
                # it (3 collections of 0.13 s each after torch's import, on 2 cores)
                gc.collect()
                gc.freeze()
                held = _prebuild(workload, config)
                hazards = _fork_hazards(baseline)
                if hazards:  # the build, not the import: the runner starts again without it
                    send(outbox, Unsafe(hazards, stage="prebuild"))
                    return 0
    except BaseException as exc:
        message = _failure_message(exc, under_limit=False)
        send(outbox, message)
        return 2 if isinstance(message, SpecFailed) else 1
    # Everything imported so far is permanent: freezing it keeps each child's garbage
    # collection (and its copy-on-write page faults) to the child's own objects.
    gc.collect()
    gc.freeze()
    startup_s = time.perf_counter() - started
    send(outbox, ServerReady(pid=os.getpid(), startup_s=startup_s, prebuilt=held is not None))
    server_pid = os.getpid()

    while True:
        try:
            request = inbox.recv()
        except EOFError:
            return 0
        if not isinstance(request, Request):
            return 0
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one trial, then _exit (never back into this loop)
            code = 3
            try:
                forked = time.perf_counter()
                die_with_parent(server_pid)
                if held is not None and config.device == "cpu":
                    # while this process has one thread (see populate_writable): the trial
                    # writes its weights, and they are then its own
                    from bsfinder.devices.cpu import populate_writable

                    populate_writable(workload.prebuilt_storages())
                torch.set_num_threads(threads)
                _restore_env("OPENBLAS_NUM_THREADS", config.openblas_threads)
                outbox_for = _Tagged(outbox, request.request_id)
                code = _child(request, workload, config, outbox_for, held or 0, forked)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        # ru_maxrss is in KiB on Linux: the dead child's peak resident set, for the runner's
        # judgement of a crash (near the budget or far from it)
        peak_rss = usage.ru_maxrss * 1024
        # sent whatever the status: a child that exits 0 without its final message (the
        # model's os._exit(0)) is a crash too; after a final message this is a stray answer
        # the runner skips
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        send(outbox, Died(code, peak_rss), request.request_id)


class _Tagged:
    """The outbox of one child: every message goes with the id of its request."""

    def __init__(self, outbox: Connection, request_id: int) -> None:
        self._outbox = outbox
        self._id = request_id

    def send(self, message: Any) -> None:
        send(self._outbox, message, self._id)


def _failure_message(exc: BaseException, *, under_limit: bool) -> Any:
    """The message for an exception raised while loading or building (call inside except).

    ``SystemExit`` and ``KeyboardInterrupt`` are the model's too: signals from the terminal
    never reach a worker (it runs in a session of its own), so the user's code raised them.
    """
    from bsfinder.errors import SpecError, UserCodeError
    from bsfinder.execution.trial import oom_or_model_error

    text = " ".join(str(exc).split())
    if isinstance(exc, SpecError):
        return SpecFailed(str(exc))
    if isinstance(exc, UserCodeError):
        return UserFailed.of(exc)
    outcome = oom_or_model_error(exc, under_memory_limit=under_limit, batch_size=None)
    if isinstance(outcome, str):
        return BuildOOM(outcome)
    if "forked subprocess" in text or "CUDA initialization" in text:
        return SpecFailed(
            "CUDA cannot start in bsfinder's forked trial process: importing the model's module "
            f"touched CUDA ({text[:200]}); create CUDA tensors inside the model factory, or use "
            "--isolation inline",
        )
    return UserFailed.of(outcome)


def _profile(
    workload: Any, backend: Any, batch_size: int, outbox: _Tagged, snapshot: str | None
) -> int:
    from bsfinder.execution.trial import oom_or_model_error
    from bsfinder.memory.profile import profile_step

    try:
        profile = profile_step(workload, backend, batch_size, snapshot=snapshot)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # the model's (see above)
        outcome = oom_or_model_error(
            exc, under_memory_limit=backend.under_limit, batch_size=batch_size
        )
        if isinstance(outcome, str):
            outbox.send(ProfileOOM(outcome))
        else:
            outbox.send(UserFailed.of(outcome))
        return 0
    outbox.send(Profiled(profile.to_dict()))
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


def _may_prebuild(workload: Any, config: WorkerConfig) -> bool:
    """Build the model once in the server? Not for a ``train_step`` (the model is the
    step's, built under the budget), nor under torchrun (each rank's trial process joins its
    group first; FSDP prebuilds there itself)."""
    return config.prebuild and not workload.has_train_step and config.distributed is None


def _prebuild(workload: Any, config: WorkerConfig) -> int | None:
    """Build the model on the CPU once, before the fork, for every trial process to inherit
    copy-on-write; returns the bytes of address space it added, which each trial then
    counts as its own (None: not built).

    Measured on 15 ``Linear(8192, 8192)`` (1.0 B parameters, 2 cores): set-up per trial
    4.5 s -> 1.7 s, of which 1.5 s makes the inherited weights the trial's own (see
    ``populate_writable``); the server starts in 7.3 s instead of 2.7 s, once
    (benchmarks/setup_cost.py). Best effort: a
    build that raises, or does not fit the budget (on the CPU the build runs under the
    trial's address-space limit here too), leaves the build to each trial process, which
    reports it exactly as it always did. A build that starts threads or CUDA is caught by
    the hazard check after it. Not for bf16-true: the trial casts the weights into new
    tensors, and the float32 copy inherited here would count as its memory too.
    """
    import resource

    from bsfinder.devices._cgroup import memory_bounds
    from bsfinder.workload.step import weights_dtype

    if weights_dtype(workload.spec.precision) is not None:
        return None
    from bsfinder.devices.cpu import default_cpu_budget, settled_address_space

    before = settled_address_space()
    saved = None
    budget = config.memory_limit_bytes or default_cpu_budget()
    if config.device == "cpu" and before is not None:
        saved = resource.getrlimit(resource.RLIMIT_AS)
        limit = before + budget
        if saved[1] != resource.RLIM_INFINITY:
            limit = min(limit, saved[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, saved[1]))
    built = False
    try:
        workload.prebuild()
        built = True
    except BaseException:  # the model's error or an allocation failure: the trial process
        pass  # meets it again under the budget and reports it as it always did
    finally:
        if saved is not None:
            resource.setrlimit(resource.RLIMIT_AS, saved)
    # outside the except block: its traceback would keep a failed build's tensors alive
    after = settled_address_space() if built else None
    # The trial writes its weights, so it holds a copy of its own beside this one: with this
    # copy kept, a trial that uses its whole budget would push the machine into swap or the
    # OOM killer (the default budget is 90% of the RAM available before it)
    if not built or (
        config.device == "cpu" and budget > min(b.available_bytes for b in memory_bounds())
    ):
        workload.drop_prebuilt()
        settled_address_space()
        return None
    if before is None or after is None:  # no /proc: only the CPU budget reads it, on Linux
        return workload.prebuilt_bytes()
    # The address space the build added, as the budget counts it, rather than the tensors'
    # bytes: measured on SmallCNN (1.16 MB of weights, 1.03 MB of address space: small
    # tensors fill free heap), peaks came out within today's noise (150 KiB) this way and
    # 170-220 KiB above it counting the tensors.
    return max(after - before, 0)


def _begin_info(backend: Any, capacity: int) -> Begin:
    """What the runner needs to judge this child if it hangs or dies."""
    return Begin(
        pid=os.getpid(),
        capacity_bytes=capacity,
        baseline_vm_bytes=getattr(backend, "_baseline_vm", None),
        baseline_rss_bytes=getattr(backend, "_baseline_rss", None),
    )


def _child(
    request: Request,
    workload: Any,
    config: WorkerConfig,
    outbox: _Tagged,
    held: int = 0,
    forked: float | None = None,
) -> int:
    """Run in the forked child; returns 0 once its final message is sent.

    ``held``: bytes of the model the server built (:func:`_prebuild`), which this process
    inherited and the budget counts as the trial's. ``forked``: when this process began
    (``perf_counter``), the start of its set-up time.

    Under torchrun (``config.distributed``) a trial first joins this round's process
    group; a failure is flagged to the other ranks, and a failure that only follows another
    rank's (a collective whose peer is gone) is reported as ``peer``.
    """
    started = time.perf_counter() if forked is None else forked
    from bsfinder.devices.cpu import ALLOCATOR_KEYS, CpuBackend
    from bsfinder.devices.select import backend_for
    from bsfinder.errors import UserCodeError
    from bsfinder.execution.distributed import PEER_FAILED, looks_like_peer_loss
    from bsfinder.execution.trial import execute_trial
    from bsfinder.workload.step import trial_recipe

    kind, batch_size, extra = request.kind, request.batch_size, request.extra
    backend = None
    group = None
    ctx = config.distributed
    try:
        if not config.preload:  # the server could not safely import the user's code
            outbox.send(Stage("import"))
            workload.load()
            if extra.get("rehearse", config.rehearse):
                outbox.send(Stage("rehearse"))
                workload.rehearse()
        outbox.send(Stage("warm-up"))
        workload.warm_up()
        if ctx is not None and kind == "trial":
            from bsfinder.execution.distributed import join_round

            group = join_round(workload, ctx, extra["tag"], config.device)
        elif ctx is not None and ctx.strategy == "fsdp":
            # describing an FSDP probe: the whole model may not fit one rank, and never has
            # to; it is built on the CPU, outside the budget, and only its sizes are read
            workload.prebuild()
            workload.place_with(lambda model: model)
        backend = backend_for(config.device)
        budget = extra.get("memory_limit_bytes", config.memory_limit_bytes)
        if isinstance(backend, CpuBackend) and held:
            if budget is not None and held > budget:  # built as always: "does not fit"
                workload.drop_prebuilt()
                capacity = backend.apply_budget(budget)
            else:
                capacity = backend.apply_budget(budget, held_bytes=held)
        else:  # CUDA: the weights are copied to the device under the budget, in build()
            capacity = backend.apply_budget(budget)
        outbox.send(_begin_info(backend, capacity))
        outbox.send(Stage("build"))
        workload.build()
    except BaseException as exc:
        under_limit = backend is not None and backend.under_limit
        message = _failure_message(exc, under_limit=under_limit)
        peer_like = isinstance(message, UserFailed) and looks_like_peer_loss(
            message.exc_type, message.detail
        )
        if group is not None and not group.own_failure(message.tag, peer_like=peer_like):
            message = PeerFailed(PEER_FAILED)
        outbox.send(message)
        return 0
    setup_s = time.perf_counter() - started
    if kind == "describe":
        try:
            info = Described(
                capacity_bytes=capacity,
                device=backend.describe(),
                allocator_env={k: os.environ[k] for k in ALLOCATOR_KEYS if k in os.environ},
                setup_s=setup_s,
                parameters=workload.parameter_stats(),
            )
        except Exception:
            outbox.send(WorkerFailed(traceback.format_exc()))
            return 0
        outbox.send(info)
        return 0
    assert batch_size is not None
    if kind == "profile":
        return _profile(workload, backend, batch_size, outbox, extra.get("snapshot"))

    def progress(done: int, total: int) -> None:
        outbox.send(Step(done, total))

    outbox.send(Stage("train"))

    try:
        warmup_steps, steps = trial_recipe(
            config.warmup_steps,
            config.steps,
            timed=extra.get("timed", True),  # untimed: only the steps to the peak (fits?)
            user_step=workload.has_train_step,
        )
        trial = execute_trial(
            workload,
            backend,
            batch_size,
            warmup_steps=warmup_steps,
            steps=steps,
            on_step=progress,
            interrupts_are_model=True,
        )
    except UserCodeError as exc:
        peer_like = looks_like_peer_loss(exc.exc_type, exc.detail)
        if group is not None and not group.own_failure(UserFailed.tag, peer_like=peer_like):
            detail = " ".join(exc.detail.split())[:200]
            outbox.send(PeerFailed(f"{PEER_FAILED} ({exc.exc_type}: {detail})"))
            return 0
        outbox.send(UserFailed.of(exc))
        return 0
    except BaseException:
        if group is not None:
            group.own_failure(WorkerFailed.tag)
        outbox.send(WorkerFailed(traceback.format_exc()))
        return 0
    if group is not None:
        if trial.fits:
            group.finish()
        else:
            group.own_failure(trial.failure or "oom")
    outbox.send(TrialDone(asdict(trial), setup_s))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
