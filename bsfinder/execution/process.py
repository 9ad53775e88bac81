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
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import IO, Any, NoReturn

from bsfinder.core.results import Trial
from bsfinder.devices.cpu import allocator_env
from bsfinder.errors import ModelCrashError, SpecError, UserCodeError, WorkerError
from bsfinder.execution._worker import BOOT
from bsfinder.execution.distributed import PEER_FAILED, PEER_FAILED_EXIT, DistContext
from bsfinder.execution.runner import RunnerInfo, StepCallback
from bsfinder.memory.profile import MemoryProfile, profile_does_not_fit
from bsfinder.units import format_bytes
from bsfinder.workload.loading import library_roots
from bsfinder.workload.step import WorkloadSpec

__all__ = ["ProcessRunner", "check_batch"]


def check_batch(
    spec: WorkloadSpec,
    batch_size: int,
    *,
    device: str,
    budget_bytes: int | None,
    warmup_steps: int = 1,
    steps: int = 1,
) -> Trial:
    """Run one trial of ``spec`` at ``batch_size`` in a brand-new worker, and nothing else.

    The independent check of a probe's answer: a new server, a fresh child, one trial.
    """
    runner = ProcessRunner(
        spec, device=device, budget_bytes=budget_bytes, warmup_steps=warmup_steps, steps=steps
    )
    try:
        runner.start()
        return runner.run_trial(batch_size)
    finally:
        runner.close()


class _Silent(Exception):
    """The worker did not answer within the timeout."""


#: a trial is judged out of memory only if its process came this close to the budget
NEAR_BUDGET = 0.75
#: the no-progress limit, once steps have been timed: this many predicted steps...
HANG_STEPS = 10.0
#: ...and never less than this (or than --trial-timeout, when one is given)
HANG_FLOOR_S = 30.0
#: the no-progress limit before any step has been timed, without --trial-timeout
DEFAULT_TRIAL_TIMEOUT_S = 900.0
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
        budget_bytes: CPU: the budget (None: the default, see
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
        budget_bytes: int | None,
        warmup_steps: int,
        steps: int,
        timeout_s: float | None = None,
        threads: int | None = None,
        distributed: DistContext | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.budget_bytes = budget_bytes
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
        self.notes: list[str] = []
        self._capacity: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox: Connection | None = None
        self._outbox: Connection | None = None
        self._log: IO[bytes] | None = None
        self._next_id = 0
        # what the current request's child said about itself
        self._stage = ""
        self._begin: dict[str, Any] = {}
        # (batch, slowest step s) of every trial that fitted; the slowest model build
        self._timed: list[tuple[int, float]] = []
        self._setup_max_s = 0.0

    # -- TrialRunner ------------------------------------------------------------------------
    def start(self) -> RunnerInfo:
        message = self._describe()
        ready: dict[str, Any] = {}
        build_failure = None
        if message[0] == "ready":
            ready = message[1]
            self._setup_max_s = max(self._setup_max_s, ready.get("setup_s", 0.0))
        elif message[0] == "build_oom":
            build_failure = message[1]
        else:
            self._raise(message)
        workload: dict[str, Any] = {
            **self.spec.describe(),
            "isolation": "process",
            "warmup_steps": self.warmup_steps,
            "steps": self.steps,
        }
        workload.update(ready.get("parameters", {}))
        if self.device == "cpu":
            workload["allocator_env"] = ready.get("allocator_env", allocator_env())
        device = ready.get("device") or {"kind": self.device.split(":")[0], "device": self.device}
        self._capacity = ready.get("capacity_bytes", self.budget_bytes)
        return RunnerInfo(
            capacity_bytes=self._capacity,
            device=device,
            workload=workload,
            build_failure=build_failure,
            notes=tuple(self.notes),
        )

    def _describe(self) -> Any:
        """Start the server and describe the workload, falling back from what fails: a
        server that is not safe to fork from (the user's code imported in each trial
        process instead), and a rehearsal that crashes or hangs (none)."""
        while True:
            self._serve()
            message = self._request("describe", None, None, {"rehearse": self.rehearse})
            failed = message[0] in ("died", "timeout")
            if failed and self._stage == "rehearse" and self.rehearse:
                self._no_rehearsal(message[1])
                continue
            if failed:
                evidence = message[2] if len(message) > 2 else {}
                what = evidence.get("what", message[1])
                capacity, used = self._begin.get("capacity_bytes"), evidence.get("used_bytes")
                if capacity and used is not None and used >= NEAR_BUDGET * capacity:
                    # building the model under the budget took it: the model does not fit
                    return ("build_oom", f"the trial process {what} at {used / capacity:.0%}")
                where = _STAGES.get(self._stage, "starting")
                raise ModelCrashError(
                    batch_size=None,
                    what=what,
                    output=evidence.get("output", ""),
                    evidence=f"it happened while {where}, "
                    + ("under the budget, far from it" if self._begin else "before any budget"),
                    exc_type="hang" if message[0] == "timeout" else "crash",
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
        self, batch_size: int, on_step: StepCallback | None = None, *, tag: str | None = None
    ) -> Trial:
        """Run one trial; ``tag`` names the round its trial process joins under torchrun.

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
        message = self._request("trial", batch_size, on_step, {"tag": tag})
        wall = time.perf_counter() - started
        kind = message[0]
        if kind in ("died", "timeout") and self.distributed is None:
            return replace(self._judge(batch_size, message), wall_s=time.perf_counter() - started)
        return self._trial_from(batch_size, message, wall)

    def _trial_from(self, batch_size: int, message: Any, wall: float) -> Trial:
        kind = message[0]
        if kind == "trial":
            self.setup_s += message[2]
            self._setup_max_s = max(self._setup_max_s, message[2])
            trial = replace(Trial.from_dict(message[1]), wall_s=wall)
            if trial.fits and trial.step_times_s:
                self._timed.append((batch_size, max(trial.step_times_s)))
            return trial
        if kind == "peer":
            return Trial(
                batch_size=batch_size, fits=False, failure="peer", error=message[1], wall_s=wall
            )
        if kind in ("died", "timeout"):
            return Trial(
                batch_size=batch_size,
                fits=False,
                failure="crash" if kind == "died" else "timeout",
                error=message[1],
                wall_s=wall,
            )
        if kind == "build_oom":
            return Trial(
                batch_size=batch_size,
                fits=False,
                failure="oom",
                error=f"building the model ran out of memory: {message[1]}",
                wall_s=wall,
            )
        self._raise(message)

    def _judge(self, batch_size: int, message: Any) -> Trial:
        """A trial process died or hung at ``batch_size``: out of memory, or the model's?"""
        kind = message[0]
        evidence: dict[str, Any] = message[2] if len(message) > 2 else {}
        what, output = evidence.get("what", message[1]), evidence.get("output", "")
        capacity = self._begin.get("capacity_bytes") or self._capacity
        exc_type = "hang" if kind == "timeout" else evidence.get("signal") or "crash"

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
        if kind == "timeout":
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
        self._stage, self._begin = "", {}
        if not self._alive():  # the server itself went down with the trial
            self._serve()
        again = self._request("trial", batch_size, None, {"budget_bytes": generous[0]})
        if again[0] in ("died", "timeout"):
            crash(f"it did so again under {label}")
        if again[0] == "user_error":
            self._raise(again)
        if again[0] == "build_oom":
            return counted(f"under {label} the model did not even build")
        if again[0] != "trial":
            self._raise(again)
        rerun = Trial.from_dict(again[1])
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
            return None if self.budget_bytes is None else (None,)
        from bsfinder.devices.cpu import default_cpu_budget

        roomy = default_cpu_budget()
        capacity = self._capacity or self.budget_bytes
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
        if message[0] == "profile":
            return MemoryProfile(**message[1])
        if message[0] in ("profile_oom", "build_oom"):
            raise profile_does_not_fit(batch_size, message[1])
        if message[0] in ("died", "timeout"):
            raise WorkerError(f"the profiling process failed: {message[1]}")
        self._raise(message)

    def close(self) -> None:
        self._stop()

    def stats(self) -> dict[str, Any]:
        return {
            "isolation": "process",
            "imports": "once" if self.preload else "per trial",
            "trial_processes": self.trial_processes,
            "server_starts": self.server_starts,
            "server_start_s": round(self.server_start_s, 4),
            "trial_setup_s": round(self.setup_s, 4),
        }

    # -- the worker -------------------------------------------------------------------------
    def _raise(self, message: Any) -> NoReturn:
        kind = message[0]
        if kind == "spec_error":
            raise SpecError(message[1])
        if kind == "user_error":
            _, batch, exc_type, detail, tb = message
            raise UserCodeError(
                batch_size=batch, exc_type=exc_type, detail=detail, traceback_text=tb
            )
        if kind == "worker_error":
            raise WorkerError(f"bsfinder's trial process failed (please report): {message[1]}")
        if kind in ("died", "timeout"):
            raise WorkerError(f"the trial process failed before any trial: {message[1]}")
        raise WorkerError(f"unexpected message from the trial worker: {message!r}")

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
        """Ask for one forked child and return its final message (or died/timeout/peer).

        ``died`` and ``timeout`` carry a third element: what is known of the child's memory
        (``used_bytes`` above its baseline: the peak resident set of a dead child, the peak
        address space of a hung one) and its ``signal``.
        """
        assert self._outbox is not None
        self.trial_processes += 1
        self._next_id += 1
        request_id = self._next_id
        self._stage, self._begin = "", {}
        limit = self._hang_limit_s(batch_size) if kind == "trial" else self.timeout_s
        try:
            self._outbox.send((kind, batch_size, request_id, extra or {}))
            while True:
                tagged = self._receive(limit)
                if tagged[0] == "gone":  # the server itself exited
                    message: Any = ("died", tagged[1])
                    break
                if tagged[0] != request_id:
                    continue  # a stray answer to an earlier request
                message = tagged[1:]
                if message[0] == "stage":
                    self._stage = message[1]
                elif message[0] == "begin":
                    self._begin = message[1]
                elif message[0] == "step":
                    if on_step is not None:
                        on_step(message[1], message[2])
                else:
                    break
        except OSError as exc:  # the server died between requests: the pipe is broken
            self._stop()
            return ("died", f"the trial worker is gone ({exc})", {})
        except _Silent:
            where = _STAGES.get(self._stage, "")
            what = f"made no progress for {limit:.0f} s" + (f" while {where}" if where else "")
            evidence = {**self._hung_child_memory(), "what": what, "output": self._log_tail()}
            self._stop()
            return ("timeout", f"the trial process {what}", evidence)
        if message[0] == "died" and message[1] == PEER_FAILED_EXIT and self.distributed:
            return ("peer", PEER_FAILED)
        if message[0] == "died" and not isinstance(message[1], str):
            code = message[1]
            evidence = {
                "signal": _signal_name(code),
                "what": _what_died(code),
                "output": self._log_tail(),
            }
            baseline = self._begin.get("baseline_rss_bytes")
            if len(message) > 2 and baseline is not None and self.device == "cpu":
                evidence["used_bytes"] = max(0, message[2] - baseline)
            return ("died", self._exit_reason(code), evidence)
        return message

    def _hung_child_memory(self) -> dict[str, Any]:
        """The peak address space above its baseline of the child that stopped answering."""
        pid, baseline = self._begin.get("pid"), self._begin.get("baseline_vm_bytes")
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
                {
                    "spec": self.spec,
                    "device": self.device,
                    "budget_bytes": self.budget_bytes,
                    "warmup_steps": self.warmup_steps,
                    "steps": self.steps,
                    "threads": self.threads,
                    "distributed": self.distributed,
                    "preload": self.preload,
                    "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                    "rehearse": self.rehearse,
                }
            )
        stage = ""
        startup_s = max(self.timeout_s, STARTUP_FLOOR_S)
        try:
            while True:
                # importing may be slow on a busy machine; the rehearsal is a meta-device step
                limit = self.timeout_s if stage == "rehearse" else startup_s
                message = self._receive(limit)
                if message[0] != "stage":
                    break
                stage = message[1]
        except _Silent:
            message = ("silent", limit)
        finally:
            self.server_start_s += time.perf_counter() - started
        if message[0] in ("silent", "gone"):
            self._start_failed(stage, message)
            return self._launch()  # without the rehearsal that failed
        if message[0] == "unsafe":
            raise _Unsafe(message[1])
        if message[0] != "zygote-ready":
            self._stop()
            self._raise(message)

    def _start_failed(self, stage: str, message: tuple[str, Any]) -> None:
        """The server went silent (``("silent", seconds)``) or exited (``("gone", code)``)
        while starting: a rehearsal that failed is dropped (returns: start again); a
        failure while importing the model's code is the model's; anything else bsfinder's."""
        silent = message[0] == "silent"
        what = f"made no progress for {message[1]:.0f} s" if silent else _what_died(message[1])
        output = self._log_tail()
        self._stop()
        if stage == "rehearse":
            self._no_rehearsal(what + (f"; its last output: {output}" if output else ""))
            return
        if stage == "import":
            raise ModelCrashError(
                batch_size=None,
                what=what,
                evidence="it happened while importing the model's code, before any budget",
                output=output,
                exc_type="hang" if silent else _signal_name(message[1]) or "crash",
            )
        if silent:
            raise WorkerError(f"the trial worker did not start within {message[1]:.0f} s")
        reason = f"the trial process {what}" + (f"; its last output: {output}" if output else "")
        raise WorkerError(f"the trial worker failed to start: {reason}")

    def _receive(self, timeout_s: float) -> Any:
        assert self._inbox is not None and self._proc is not None
        if not self._inbox.poll(timeout_s):
            raise _Silent()
        try:
            return self._inbox.recv()
        except (EOFError, OSError):
            try:
                code = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            return ("gone", code)

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
    """The server imported the user's code and is no longer safe to fork from (why)."""


#: what a child or the server was doing, by the stage it last announced
_STAGES = {
    "import": "importing the model's code",
    "rehearse": "rehearsing the model on the meta device",
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
