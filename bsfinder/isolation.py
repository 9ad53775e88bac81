"""Run every trial in a fresh process, forked from a server that has the imports done.

In-process finders get poisoned after an OOM: the traceback holds the failed step's
tensors, the caching allocator keeps fragmented segments, and glibc keeps freed heap. They
then report batches below what a fresh training process can do. Measured here, history
moves the edge both ways: after a trial at batch 16 a batch that fits fresh fails, and after
a trial at 3072 a batch that fails fresh fits. So no trial shares a process with another:
the worker (:mod:`bsfinder._worker`) imports torch and the user's code once and forks one
child per trial, which builds the model under the budget, runs the trial and exits.
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

from bsfinder.devices.cpu import allocator_env
from bsfinder.distributed import PEER_FAILED, PEER_FAILED_EXIT, DistContext
from bsfinder.errors import SpecError, UserCodeError, WorkerError
from bsfinder.profiling import MemoryProfile, profile_does_not_fit
from bsfinder.results import Trial
from bsfinder.runner import RunnerInfo, StepCallback
from bsfinder.workload import WorkloadSpec

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
    runner.start()
    try:
        return runner.run_trial(batch_size)
    finally:
        runner.close()


class _Silent(Exception):
    """The worker did not answer within the timeout."""


class ProcessRunner:
    """A :class:`~bsfinder.runner.TrialRunner` that runs each trial in a fresh process.

    Args:
        spec: the workload, as picklable data.
        device: resolved torch device string (``cpu``, ``cuda:0``).
        budget_bytes: CPU: the budget (None: 90% of available RAM); CUDA: a cap (None: the
            whole device).
        warmup_steps: untimed steps per trial (the first creates optimizer state).
        steps: timed steps per trial.
        timeout_s: a trial (or start-up) silent for this long is killed and counted as
            failed with failure ``"timeout"``.
        threads: torch intra-op threads in the trial process (None: torch's default).
        distributed: this rank's place under torchrun: each trial process joins the other
            ranks' in a process group of its own, the model wrapped for the strategy (see
            :mod:`bsfinder.distributed`).
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        device: str,
        budget_bytes: int | None,
        warmup_steps: int,
        steps: int,
        timeout_s: float = 900.0,
        threads: int | None = None,
        distributed: DistContext | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.budget_bytes = budget_bytes
        self.warmup_steps = warmup_steps
        self.steps = steps
        self.timeout_s = timeout_s
        self.threads = threads
        self.distributed = distributed
        self.server_starts = 0
        self.server_start_s = 0.0
        self.trial_processes = 0
        self.setup_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox: Connection | None = None
        self._outbox: Connection | None = None
        self._log: IO[bytes] | None = None
        self._next_id = 0

    # -- TrialRunner ------------------------------------------------------------------------
    def start(self) -> RunnerInfo:
        self._serve()
        message = self._request("describe", None, None)
        ready: dict[str, Any] = {}
        build_failure = None
        if message[0] == "ready":
            ready = message[1]
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
        return RunnerInfo(
            capacity_bytes=ready.get("capacity_bytes", self.budget_bytes),
            device=device,
            workload=workload,
            build_failure=build_failure,
        )

    def run_trial(
        self, batch_size: int, on_step: StepCallback | None = None, *, tag: str | None = None
    ) -> Trial:
        """Run one trial; ``tag`` names the round its trial process joins under torchrun."""
        started = time.perf_counter()
        if not self._alive():
            self._serve()
        message = self._request("trial", batch_size, on_step, {"tag": tag})
        wall = time.perf_counter() - started
        kind = message[0]
        if kind == "trial":
            self.setup_s += message[2]
            return replace(Trial.from_dict(message[1]), wall_s=wall)
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

    def _request(
        self,
        kind: str,
        batch_size: int | None,
        on_step: StepCallback | None,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """Ask for one forked child and return its final message (or died/timeout/peer)."""
        assert self._outbox is not None
        self.trial_processes += 1
        self._next_id += 1
        request_id = self._next_id
        try:
            self._outbox.send((kind, batch_size, request_id, extra or {}))
            while True:
                tagged = self._receive()
                if tagged[0] == "gone":  # the server itself exited
                    message = ("died", tagged[1])
                    break
                if tagged[0] != request_id:
                    continue  # a stray answer to an earlier request
                message = tagged[1:]
                if message[0] != "step":
                    break
                if on_step is not None:
                    on_step(message[1], message[2])
        except OSError as exc:  # the server died between requests: the pipe is broken
            self._stop()
            return ("died", f"the trial worker is gone ({exc})")
        except _Silent:
            self._stop()
            return (
                "timeout",
                f"no progress for {self.timeout_s:.0f} s; stopped it (raise --trial-timeout "
                "if one step is that slow)",
            )
        if message[0] == "died" and message[1] == PEER_FAILED_EXIT:
            return ("peer", PEER_FAILED)
        if message[0] == "died" and not isinstance(message[1], str):
            return ("died", self._exit_reason(message[1]))
        return message

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _serve(self) -> None:
        """Start the fork server: imports once, then one child per trial."""
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
        # The server must import this very bsfinder, even one found through a runtime sys.path.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        # closed in _stop(), with the worker it logs
        self._log = tempfile.TemporaryFile(prefix="bsfinder-worker-")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bsfinder._worker", str(child_read), str(child_write)],
                pass_fds=(child_read, child_write),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches bsfinder, which stops the worker
            )
        finally:
            os.close(child_read)
            os.close(child_write)
        self._inbox = Connection(parent_read, writable=False)
        self._outbox = Connection(parent_write, readable=False)
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
                    "sys_path": [p for p in sys.path if p],
                }
            )
        try:
            message = self._receive()
        except _Silent:
            self._stop()
            raise WorkerError(
                f"the trial worker did not start within {self.timeout_s:.0f} s"
            ) from None
        finally:
            self.server_start_s += time.perf_counter() - started
        if message[0] == "gone":
            reason = self._exit_reason(message[1])
            self._stop()
            raise WorkerError(f"the trial worker failed to start: {reason}")
        if message[0] != "zygote-ready":
            self._stop()
            self._raise(message)

    def _receive(self) -> Any:
        assert self._inbox is not None and self._proc is not None
        if not self._inbox.poll(self.timeout_s):
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
        if code is None:
            what = "the worker closed its pipe and did not exit"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            what = f"the trial process was killed by {name}"
            if name == "SIGKILL":
                what += " (the kernel's OOM killer, or a cgroup memory limit)"
        else:
            what = f"the trial process exited with code {code}"
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
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the server and any trial child
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()
        for conn in (self._inbox, self._outbox):
            if conn is not None:
                conn.close()
        self._inbox = self._outbox = None
        if self._log is not None:
            self._log.close()
            self._log = None
