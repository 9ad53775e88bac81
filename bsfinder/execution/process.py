"""Run every trial in a fresh process, forked from a server that has the imports done.

In-process finders get poisoned after an OOM: the traceback holds the failed step's
tensors, the caching allocator keeps fragmented segments, and glibc keeps freed heap. They
then report batches below what a fresh training process can do. Measured here, history
moves the edge both ways: after a trial at batch 16 a batch that fits fresh fails, and after
a trial at 3072 a batch that fails fresh fits. So no trial shares a process with another:
the worker (:mod:`bsfinder.execution._worker`) imports torch and (when that leaves it safe to fork)
the user's code once and forks one child per trial, which builds the model under the
budget, runs the trial and exits.

A trial process that dies (a signal, an exit) or stops making progress is judged on
evidence, never silently taken for "does not fit": see :meth:`ProcessRunner.run_trial`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import IO, Any, NoReturn

from bsfinder.core.results import Trial
from bsfinder.devices.cpu import allocator_env
from bsfinder.errors import ModelCrashError, SpecError, WorkerError
from bsfinder.execution._worker import BOOT
from bsfinder.execution.distributed import PEER_FAILED, PEER_FAILED_EXIT, DistContext
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
    receive,
    to_wire,
)
from bsfinder.execution.runner import RunnerInfo, StepCallback, describe_workload
from bsfinder.memory.profile import MemoryProfile, profile_does_not_fit
from bsfinder.options import DEFAULT_TRIAL_TIMEOUT_S
from bsfinder.units import format_bytes
from bsfinder.workload.loading import library_roots
from bsfinder.workload.step import WorkloadSpec, trial_recipe

__all__ = ["ProcessRunner", "check_batch"]


def check_batch(
    spec: WorkloadSpec,
    batch_size: int,
    *,
    device: str,
    memory_limit_bytes: int | None,
    warmup_steps: int = 1,
    steps: int = 1,
) -> Trial:
    """Run one trial of ``spec`` at ``batch_size`` in a brand-new worker, and nothing else.

    The independent check of a probe's answer: a new server, a fresh child, one trial.
    """
    runner = ProcessRunner(
        spec,
        device=device,
        memory_limit_bytes=memory_limit_bytes,
        warmup_steps=warmup_steps,
        steps=steps,
    )
    try:
        runner.start()
        return runner.run_trial(batch_size)
    finally:
        runner.close()


class _Silent(Exception):
    """The worker did not answer within the timeout."""


@dataclass(frozen=True)
class _Gone:
    """The server's pipe closed: its exit status (None: it did not exit)."""

    code: int | None


@dataclass(frozen=True)
class _Lost:
    """A request's child (or the server) ended without its final message: it died
    (``hung`` False) or made no progress; ``evidence`` is what is known of its memory
    (``used_bytes`` above its baseline: the peak resident set of a dead child, the peak
    address space of a hung one), its ``signal``, ``what`` happened and its ``output``."""

    hung: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


#: a trial is judged out of memory only if its process came this close to the budget
NEAR_BUDGET = 0.75
#: the no-progress limit, once steps have been timed: this many predicted steps...
HANG_STEPS = 10.0
#: ...and never less than this (or than --trial-timeout, when one is given)
HANG_FLOOR_S = 30.0
#: starting the server (torch and the user's imports) may take this long at least: a busy
#: machine took 20 s to import torch and a module that starts a thread
STARTUP_FLOOR_S = 120.0


def worker_sys_path(path: list[str] | None = None, cwd: str | None = None) -> list[str]:
    """The trial worker's ``sys.path``: this process's, the standard library first, then
    bsfinder's own root and the installed packages, then the user's directories, and the
    current directory last.

    A ``psutil.py`` or ``json.py`` in the current directory, or beside the model's file,
    must never shadow what bsfinder and torch import; the current directory still comes
    last so that ``bsfinder probe mymodel:Net`` finds ``mymodel.py`` there.
    """
    path = list(sys.path if path is None else path)
    cwd = os.path.realpath(cwd or os.getcwd())
    stdlib, installed = library_roots()
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def kind(entry: str) -> int:
        real = os.path.realpath(entry)
        if os.path.join(real, "").startswith(installed):  # first: site-packages is in the stdlib
            return 2
        if os.path.join(real, "").startswith(stdlib):
            return 0
        if real.endswith(".zip") and os.path.basename(real).startswith("python"):
            return 0
        return 3

    ordered: dict[int, list[str]] = {0: [], 1: [package_root], 2: [], 3: []}
    seen = {os.path.realpath(package_root)}
    for entry in path:
        real = os.path.realpath(entry) if entry else cwd
        if real in seen or real == cwd:
            continue
        seen.add(real)
        ordered[kind(entry)].append(entry)
    return [*ordered[0], *ordered[1], *ordered[2], *ordered[3], cwd]


class ProcessRunner:
    """A :class:`~bsfinder.execution.runner.TrialRunner` that runs each trial in a fresh process.

    Args:
        spec: the workload, as picklable data.
        device: resolved torch device string (``cpu``, ``cuda:0``).
        memory_limit_bytes: CPU: the budget (None: the default, see
            :func:`~bsfinder.devices.cpu.default_cpu_budget`); CUDA: a cap (None: the whole
            device).
        warmup_steps: untimed steps per trial (the first creates optimizer state).
        steps: timed steps per trial.
        timeout_s: the longest the worker may go without progress before any step has been
            timed (start-up, model build, the first trial; None: ``DEFAULT_TRIAL_TIMEOUT_S``).
            Once steps are timed, a trial is stopped after ``HANG_STEPS`` times its predicted
            step time (scaled from the slowest step seen per sample) plus three model builds,
            at least ``HANG_FLOOR_S`` or, when given, ``timeout_s``; and judged as a hang.
        threads: torch intra-op threads in the trial process (None: torch's default).
        distributed: this rank's place under torchrun: each trial process joins the other
            ranks' in a process group of its own, the model wrapped for the strategy (see
            :mod:`bsfinder.execution.distributed`).
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        device: str,
        memory_limit_bytes: int | None,
        warmup_steps: int,
        steps: int,
        timeout_s: float | None = None,
        threads: int | None = None,
        distributed: DistContext | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.memory_limit_bytes = memory_limit_bytes
        self.warmup_steps = warmup_steps
        self.steps = steps
        self.timeout_s = DEFAULT_TRIAL_TIMEOUT_S if timeout_s is None else timeout_s
        self.hang_floor_s = HANG_FLOOR_S if timeout_s is None else timeout_s
        self.threads = threads
        self.distributed = distributed
        self.server_starts = 0
        self.server_start_s = 0.0
        self.trial_processes = 0
        self.setup_s = 0.0
        #: the user's code is imported once in the server (True) or in every trial process
        self.preload = True
        #: the model is rehearsed on the meta device before the budget (see Workload.rehearse)
        self.rehearse = True
        #: the server builds the model once for its trial processes (see _worker._prebuild);
        #: False: every trial process builds it (also the fallback when that is not safe)
        self.prebuild = True
        #: whether the running server did build it
        self.prebuilt = False
        self.notes: list[str] = []
        self._capacity: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox: Connection | None = None
        self._outbox: Connection | None = None
        self._log: IO[bytes] | None = None
        self._next_id = 0
        # what the current request's child said about itself
        self._stage = ""
        self._begin: Begin | None = None
        # (batch, slowest step s) of every trial that fitted; the slowest model build
        self._timed: list[tuple[int, float]] = []
        self._setup_max_s = 0.0

    # -- TrialRunner ------------------------------------------------------------------------
    def start(self) -> RunnerInfo:
        message = self._describe()
        ready = None
        build_failure = None
        if isinstance(message, Described):
            ready = message
            self._setup_max_s = max(self._setup_max_s, ready.setup_s)
        elif isinstance(message, BuildOOM):
            build_failure = message.reason
        else:
            self._raise(message)
        more = dict(ready.parameters if ready else {})
        if self.device == "cpu":
            more["allocator_env"] = ready.allocator_env if ready else allocator_env()
        workload = describe_workload(
            self.spec,
            isolation="process",
            warmup_steps=self.warmup_steps,
            steps=self.steps,
            more=more,
        )
        device = (ready.device if ready else None) or {
            "kind": self.device.split(":")[0],
            "device": self.device,
        }
        self._capacity = ready.capacity_bytes if ready else self.memory_limit_bytes
        user_step = self.spec.train_step is not None
        timed, untimed = (
            sum(trial_recipe(self.warmup_steps, self.steps, timed=t, user_step=user_step))
            for t in (True, False)
        )
        return RunnerInfo(
            capacity_bytes=self._capacity,
            device=device,
            workload=workload,
            build_failure=build_failure,
            notes=tuple(self.notes),
            trial_steps=(timed, untimed),
        )

    def _describe(self) -> Any:
        """Start the server and describe the workload, falling back from what fails: a
        server that is not safe to fork from (the user's code imported in each trial
        process instead), and a rehearsal that crashes or hangs (none)."""
        while True:
            self._serve()
            message = self._request("describe", None, None, {"rehearse": self.rehearse})
            failed = isinstance(message, _Lost)
            if failed and self._stage == "rehearse" and self.rehearse:
                self._no_rehearsal(message.reason)
                continue
            if failed:
                evidence = message.evidence
                what = evidence.get("what", message.reason)
                capacity = self._begin.capacity_bytes if self._begin else None
                used = evidence.get("used_bytes")
                if capacity and used is not None and used >= NEAR_BUDGET * capacity:
                    # building the model under the budget took it: the model does not fit
                    return BuildOOM(f"the trial process {what} at {used / capacity:.0%}")
                where = _STAGES.get(self._stage, "starting")
                raise ModelCrashError(
                    batch_size=None,
                    what=what,
                    output=evidence.get("output", ""),
                    evidence=f"it happened while {where}, "
                    + ("under the budget, far from it" if self._begin else "before any budget"),
                    exc_type="hang" if message.hung else "crash",
                )
            return message

    def _no_rehearsal(self, reason: str) -> None:
        self.rehearse = False
        self.notes.append(
            "the model's rehearsal on the meta device (which imports what its forward pass "
            f"imports before the budget) failed ({reason}); trials run without it, so lazy "
            "imports in the first step count as training memory"
        )

    def run_trial(
        self,
        batch_size: int,
        on_step: StepCallback | None = None,
        *,
        timed: bool = True,
        tag: str | None = None,
    ) -> Trial:
        """Run one trial (``timed`` False: only the steps to the peak, see
        :func:`~bsfinder.workload.step.trial_recipe`); ``tag`` names the round its trial
        process joins under torchrun.

        A trial process that dies or hangs is judged on evidence (single-process probes):

        - it died and a more generous budget exists (CPU: the default budget; CUDA: the
          whole card): the same batch runs again under it. It is out of memory only if that
          run also fails for memory, or fits with a peak near (``NEAR_BUDGET``) or past the
          budget; a crash that repeats, or a run far below the budget, is the model's.
        - it died and no more generous budget exists: out of memory only if its peak
          resident set came near the budget.
        - it hung: out of memory only if its address space came near the budget (a CPU
          budget fails allocations at once; it never makes a process hang).

        The model's crash or hang raises :class:`~bsfinder.errors.ModelCrashError`.
        Under torchrun a crash stays a failed trial (failure ``crash``) that every rank
        agrees on: a rerun on one rank would leave the others' round.
        """
        started = time.perf_counter()
        if not self._alive():
            self._serve()
        message = self._request("trial", batch_size, on_step, {"tag": tag, "timed": timed})
        wall = time.perf_counter() - started
        if isinstance(message, _Lost) and self.distributed is None:
            return replace(self._judge(batch_size, message), wall_s=time.perf_counter() - started)
        return self._trial_from(batch_size, message, wall)

    def _trial_from(self, batch_size: int, message: Any, wall: float) -> Trial:
        if isinstance(message, TrialDone):
            self.setup_s += message.setup_s
            self._setup_max_s = max(self._setup_max_s, message.setup_s)
            trial = replace(Trial.from_dict(message.trial), wall_s=wall)
            if trial.fits and trial.step_times_s:
                self._timed.append((batch_size, max(trial.step_times_s)))
            return trial
        if isinstance(message, PeerFailed):
            return Trial(
                batch_size=batch_size, fits=False, failure="peer", error=message.error, wall_s=wall
            )
        if isinstance(message, _Lost):
            return Trial(
                batch_size=batch_size,
                fits=False,
                failure="timeout" if message.hung else "crash",
                error=message.reason,
                wall_s=wall,
            )
        if isinstance(message, BuildOOM):
            return Trial(
                batch_size=batch_size,
                fits=False,
                failure="oom",
                error=f"building the model ran out of memory: {message.reason}",
                wall_s=wall,
            )
        self._raise(message)

    def _judge(self, batch_size: int, message: _Lost) -> Trial:
        """A trial process died or hung at ``batch_size``: out of memory, or the model's?"""
        evidence = message.evidence
        what, output = evidence.get("what", message.reason), evidence.get("output", "")
        capacity = (self._begin.capacity_bytes if self._begin else None) or self._capacity
        exc_type = "hang" if message.hung else evidence.get("signal") or "crash"

        def crash(why: str) -> NoReturn:
            raise ModelCrashError(
                batch_size=batch_size, what=what, evidence=why, output=output, exc_type=exc_type
            )

        def counted(why: str) -> Trial:
            return Trial(
                batch_size=batch_size,
                fits=False,
                failure="oom",
                error=f"the trial process {what}; counted as out of memory: {why}",
            )

        used = evidence.get("used_bytes")
        near = capacity is not None and used is not None and used >= NEAR_BUDGET * capacity
        share = f"{used / capacity:.0%} of the budget" if capacity and used is not None else ""
        if message.hung:
            if near:
                return counted(f"its memory had reached {share}")
            crash(f"its memory was at {share}" if share else "a memory budget never hangs")
        generous = self._generous_budget()
        if generous is None:
            if near:
                return counted(f"its resident memory had reached {share}")
            crash(
                f"its resident memory was at {share}"
                if share
                else "no budget was in force that could explain it"
            )
        label = "the whole device" if generous[0] is None else format_bytes(generous[0])
        self._stage, self._begin = "", None
        if not self._alive():  # the server itself went down with the trial
            self._serve()
        again = self._request("trial", batch_size, None, {"memory_limit_bytes": generous[0]})
        if isinstance(again, _Lost):
            crash(f"it did so again under {label}")
        if isinstance(again, BuildOOM):
            return counted(f"under {label} the model did not even build")
        if not isinstance(again, TrialDone):
            self._raise(again)
        rerun = Trial.from_dict(again.trial)
        if not rerun.fits:
            return counted(f"under {label} it ran out of memory ({rerun.error})")
        peak = rerun.peak_bytes
        if capacity is not None and peak is not None and peak >= NEAR_BUDGET * capacity:
            return counted(
                f"under {label} it ran with a peak of {format_bytes(peak)}, "
                f"{peak / capacity:.0%} of the budget"
            )
        crash(
            f"under {label} the same batch ran"
            + (
                f" with a peak of only {peak / capacity:.0%} of the budget"
                if peak and capacity
                else ""
            )
        )

    def _generous_budget(self) -> tuple[int | None] | None:
        """A budget that memory cannot fail under, when it differs from this probe's:
        (bytes or None for the whole CUDA device,), or None when there is none."""
        if self.device.startswith("cuda"):
            return None if self.memory_limit_bytes is None else (None,)
        from bsfinder.devices.cpu import default_cpu_budget

        roomy = default_cpu_budget()
        capacity = self._capacity or self.memory_limit_bytes
        if capacity is None or roomy < 1.5 * capacity:
            return None
        return (roomy,)

    def run_profile(self, batch_size: int, snapshot: str | None = None) -> MemoryProfile:
        """Profile one step at ``batch_size`` in a fresh process (``snapshot``: CUDA memory
        snapshot file to write).

        Raises:
            BsfinderError: the batch does not fit (the message says so).
        """
        if not self._alive():
            self._serve()
        message = self._request("profile", batch_size, None, {"snapshot": snapshot})
        if isinstance(message, Profiled):
            return MemoryProfile(**message.profile)
        if isinstance(message, ProfileOOM | BuildOOM):
            raise profile_does_not_fit(batch_size, message.reason)
        if isinstance(message, _Lost):
            raise WorkerError(f"the profiling process failed: {message.reason}")
        self._raise(message)

    def close(self) -> None:
        self._stop()

    def stats(self) -> dict[str, Any]:
        return {
            "isolation": "process",
            "imports": "once" if self.preload else "per trial",
            "model_builds": "once" if self.prebuilt else "per trial",
            "trial_processes": self.trial_processes,
            "server_starts": self.server_starts,
            "server_start_s": round(self.server_start_s, 4),
            "trial_setup_s": round(self.setup_s, 4),
        }

    # -- the worker -------------------------------------------------------------------------
    def _raise(self, message: Any) -> NoReturn:
        if isinstance(message, SpecFailed):
            raise SpecError(message.text)
        if isinstance(message, UserFailed):
            raise message.error()
        if isinstance(message, WorkerFailed):
            raise WorkerError(f"bsfinder's trial process failed (please report): {message.text}")
        if isinstance(message, _Lost):
            raise WorkerError(f"the trial process failed before any trial: {message.reason}")
        shown = tuple(to_wire(message)) if hasattr(message, "tag") else message
        raise WorkerError(f"unexpected message from the trial worker: {shown!r}")

    def _hang_limit_s(self, batch_size: int | None) -> float:
        """How long a request may go without progress (see the class docstring)."""
        if not self._timed or batch_size is None:
            return self.timeout_s
        step = max(s * max(1.0, batch_size / b) for b, s in self._timed)
        return max(self.hang_floor_s, HANG_STEPS * step + 3 * self._setup_max_s)

    def _request(
        self,
        kind: str,
        batch_size: int | None,
        on_step: StepCallback | None,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """Ask for one forked child and return its final message, a :class:`_Lost` when it
        died or hung, or :class:`PeerFailed` when it stopped for another rank's failure."""
        assert self._outbox is not None
        self.trial_processes += 1
        self._next_id += 1
        request_id = self._next_id
        self._stage, self._begin = "", None
        limit = self._hang_limit_s(batch_size) if kind == "trial" else self.timeout_s
        try:
            self._outbox.send(Request(kind, batch_size, request_id, extra or {}))
            while True:
                tagged = self._receive(limit)
                if isinstance(tagged, _Gone):  # the server itself exited
                    message: Any = tagged
                    break
                answers, message = tagged
                if answers != request_id:
                    continue  # a stray answer to an earlier request
                if isinstance(message, Stage):
                    self._stage = message.name
                elif isinstance(message, Begin):
                    self._begin = message
                elif isinstance(message, Step):
                    if on_step is not None:
                        on_step(message.done, message.total)
                else:
                    break
        except OSError as exc:  # the server died between requests: the pipe is broken
            self._stop()
            return _Lost(hung=False, reason=f"the trial worker is gone ({exc})")
        except _Silent:
            where = _STAGES.get(self._stage, "")
            what = f"made no progress for {limit:.0f} s" + (f" while {where}" if where else "")
            evidence = {**self._hung_child_memory(), "what": what, "output": self._log_tail()}
            self._stop()
            return _Lost(hung=True, reason=f"the trial process {what}", evidence=evidence)
        if isinstance(message, Died | _Gone):
            code = message.code
            if code == PEER_FAILED_EXIT and self.distributed:
                return PeerFailed(PEER_FAILED)
            evidence = {
                "signal": _signal_name(code),
                "what": _what_died(code),
                "output": self._log_tail(),
            }
            baseline = self._begin.baseline_rss_bytes if self._begin else None
            if isinstance(message, Died) and baseline is not None and self.device == "cpu":
                evidence["used_bytes"] = max(0, message.peak_rss_bytes - baseline)
            return _Lost(hung=False, reason=self._exit_reason(code), evidence=evidence)
        return message

    def _hung_child_memory(self) -> dict[str, Any]:
        """The peak address space above its baseline of the child that stopped answering."""
        if self._begin is None:
            return {}
        pid, baseline = self._begin.pid, self._begin.baseline_vm_bytes
        if pid is None or baseline is None:
            return {}
        from bsfinder.devices.cpu import read_proc_status

        peak = read_proc_status(f"/proc/{pid}/status").get("VmPeak")
        return {} if peak is None else {"used_bytes": max(0, peak - baseline)}

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _serve(self) -> None:
        """Start the fork server (imports once, then one child per trial); if importing the
        user's code there leaves it unsafe to fork from, start one that imports only torch."""
        try:
            self._launch()
        except _Unsafe as exc:
            self._stop()
            if exc.stage == "prebuild":
                # building the model, not importing it, did that: each trial builds it again
                self.prebuild = False
                self.notes.append(
                    f"building the model {exc}, so the trial processes cannot inherit it from "
                    "the process that built it: every trial process builds it afresh"
                )
                return self._serve()
            self.preload = False
            self.notes.append(
                f"the model's code {exc} when imported, so forking from the process that "
                "imported it is not safe: every trial process imports it afresh"
            )
            self._launch()

    def _launch(self) -> None:
        self._stop()
        started = time.perf_counter()
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        env = dict(os.environ)
        if self.device == "cpu":
            env.update(allocator_env())
        # Ask the driver through NVML whether CUDA is there, so that nothing the server does
        # before forking (the user's module calling torch.cuda.is_available()) poisons fork.
        env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        # OpenBLAS (NumPy's, SciPy's: transformers imports scipy.linalg) starts its thread pool
        # when it loads, which would make every HF model look unsafe to fork from and cost it
        # the per-trial import (GPT-2: 31 s instead of 8 s); trials run torch's own kernels,
        # and the trial processes get the user's value of the variable back
        env["OPENBLAS_NUM_THREADS"] = "1"
        flags = ["-P"] if sys.version_info >= (3, 11) else []  # no script directory on the path
        argv = [
            sys.executable,
            *flags,
            "-c",
            BOOT,
            str(child_read),
            str(child_write),
            "\n".join(worker_sys_path()),
            str(os.getpid()),
        ]
        # closed in _stop(), with the worker it logs
        self._log = tempfile.TemporaryFile(prefix="bsfinder-worker-")  # noqa: SIM115
        self._inbox = Connection(parent_read, writable=False)
        self._outbox = Connection(parent_write, readable=False)
        try:
            self._proc = subprocess.Popen(
                argv,
                pass_fds=(child_read, child_write),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches bsfinder, which stops the worker
            )
        except BaseException:
            self._stop()  # closes our ends of the pipes and the log
            raise
        finally:
            os.close(child_read)
            os.close(child_write)
        self.server_starts += 1
        with contextlib.suppress(OSError):  # the server died first: _receive() says how
            self._outbox.send(
                WorkerConfig(
                    spec=self.spec,
                    device=self.device,
                    memory_limit_bytes=self.memory_limit_bytes,
                    warmup_steps=self.warmup_steps,
                    steps=self.steps,
                    threads=self.threads,
                    distributed=self.distributed,
                    preload=self.preload,
                    openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
                    rehearse=self.rehearse,
                    prebuild=self.prebuild,
                )
            )
        stage = ""
        startup_s = max(self.timeout_s, STARTUP_FLOOR_S)
        message: Any = None
        silent_s = None
        try:
            while True:
                # importing may be slow on a busy machine; the rehearsal is a meta-device step
                limit = self.timeout_s if stage == "rehearse" else startup_s
                received = self._receive(limit)
                message = received if isinstance(received, _Gone) else received[1]
                if not isinstance(message, Stage):
                    break
                stage = message.name
        except _Silent:
            silent_s = limit
        finally:
            self.server_start_s += time.perf_counter() - started
        if silent_s is not None or isinstance(message, _Gone):
            self._start_failed(stage, silent_s, None if silent_s is not None else message.code)
            return self._launch()  # without the rehearsal that failed
        if isinstance(message, Unsafe):
            raise _Unsafe(message.reasons, message.stage)
        if not isinstance(message, ServerReady):
            self._stop()
            self._raise(message)
        self.prebuilt = message.prebuilt

    def _start_failed(self, stage: str, silent_s: float | None, code: int | None) -> None:
        """The server went silent for ``silent_s`` seconds, or exited (``code``; None: it
        closed its pipe and did not exit) while starting: a rehearsal that failed is dropped
        (returns: start again); a failure while importing the model's code is the model's;
        anything else bsfinder's."""
        silent = silent_s is not None
        what = f"made no progress for {silent_s:.0f} s" if silent else _what_died(code)
        output = self._log_tail()
        self._stop()
        if stage == "rehearse":
            self._no_rehearsal(what + (f"; its last output: {output}" if output else ""))
            return
        if stage == "prebuild":  # each trial process builds the model and reports what fails
            self.prebuild = False
            self.notes.append(
                f"building the model once before the trials failed (the process {what}); "
                "every trial process builds it afresh"
            )
            return
        if stage == "import":
            raise ModelCrashError(
                batch_size=None,
                what=what,
                evidence="it happened while importing the model's code, before any budget",
                output=output,
                exc_type="hang" if silent else _signal_name(code) or "crash",
            )
        if silent:
            raise WorkerError(f"the trial worker did not start within {silent_s:.0f} s")
        reason = f"the trial process {what}" + (f"; its last output: {output}" if output else "")
        raise WorkerError(f"the trial worker failed to start: {reason}")

    def _receive(self, timeout_s: float) -> tuple[int | None, Any] | _Gone:
        """The next (request id, message) from the worker, or how the server went."""
        assert self._inbox is not None and self._proc is not None
        if not self._inbox.poll(timeout_s):
            raise _Silent()
        try:
            return receive(self._inbox)
        except (EOFError, OSError):
            try:
                code = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            return _Gone(code)

    def _exit_reason(self, code: int | None) -> str:
        what = (
            "the worker closed its pipe and did not exit"
            if code is None
            else f"the trial process {_what_died(code)}"
        )
        tail = self._log_tail()
        return f"{what}; its last output: {tail}" if tail else what

    def _log_tail(self, limit: int = 600) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - limit))
            text = self._log.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-4:])

    def _stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the server and any trial child
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()
        self._proc = None  # only now: a Ctrl-C above leaves it for the retry to kill
        for conn in (self._inbox, self._outbox):
            if conn is not None:
                conn.close()
        self._inbox = self._outbox = None
        if self._log is not None:
            self._log.close()
            self._log = None


class _Unsafe(Exception):
    """The server imported the user's code (``stage`` ``import``) or built the model
    (``prebuild``) and is no longer safe to fork from (why)."""

    def __init__(self, reasons: str, stage: str = "import") -> None:
        super().__init__(reasons)
        self.stage = stage


#: what a child or the server was doing, by the stage it last announced
_STAGES = {
    "import": "importing the model's code",
    "rehearse": "rehearsing the model on the meta device",
    "prebuild": "building the model once, before the trials",
    "warm-up": "warming up",
    "build": "building the model",
    "train": "training",
}


def _what_died(code: int | None) -> str:
    """``was killed by SIGSEGV`` / ``exited with code 3``, for a child's exit status."""
    if code is None:
        return "closed its pipe and did not exit"
    if code == 0:
        return "exited with code 0 without reporting a result"
    if code >= 0:
        return f"exited with code {code}"
    name = _signal_name(code)
    if name == "SIGKILL":
        return f"was killed by {name} (the kernel's OOM killer, or a cgroup memory limit)"
    return f"was killed by {name}"


def _signal_name(code: int | None) -> str:
    """``SIGSEGV`` for an exit status of -11; '' for an exit code or None."""
    if code is None or code >= 0:
        return ""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
