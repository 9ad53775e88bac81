"""Errors and the one out-of-memory classifier.

The exception tree::

    BsfinderError            exit code 1: something went wrong; message says what and what to do
    ├── SpecError            exit code 2: bad input (model spec, input spec, option value)
    ├── UserCodeError        exit code 1: the user's model or step raised a non-OOM exception
    │   └── ModelCrashError  the model's trial process crashed or hung, not for lack of memory
    └── WorkerError          exit code 1: the worker process could not start or talk to us

    BsfinderWarning (UserWarning)  the probe goes on, but its answer may be off: a user sees it
                                   on stderr (e.g. trials that must run in the caller's process)

"Nothing fits" is not an exception: it is a result whose recommendations are empty, so that
the trials that prove it are still reported (the CLI turns it into exit code 1).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BsfinderError",
    "BsfinderWarning",
    "ModelCrashError",
    "SpecError",
    "UserCodeError",
    "WorkerError",
    "describe_oom",
    "is_batchnorm_one_sample",
    "is_oom",
    "oom_kind",
]


class BsfinderError(Exception):
    """Base of all bsfinder errors; ``exit_code`` is what the CLI exits with.

    ``agreed``: under torchrun, every rank raised this same error (rank 0 reports it).
    ``result``: what was measured before the error, when there is something to keep (a
    :class:`~bsfinder.core.results.ProbeResult` whose noise-scale measurement failed after the
    search); the CLI writes it before reporting the error.
    """

    exit_code = 1
    agreed = False
    result: Any = None


class SpecError(BsfinderError, ValueError):
    """The user's input is invalid: a model or input spec, or an option value."""

    exit_code = 2


class UserCodeError(BsfinderError):
    """The user's model or training step raised an exception that is not out-of-memory.

    Attributes:
        batch_size: the batch at which it happened (None while building the model).
        exc_type: the original exception's type name.
        detail: the original exception's message.
        traceback_text: the formatted traceback from where it happened (for ``--debug``).
        rank: under torchrun, the rank it happened on (every rank raises it).
    """

    def __init__(
        self,
        *,
        batch_size: int | None,
        exc_type: str,
        detail: str,
        traceback_text: str = "",
        rank: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.exc_type = exc_type
        self.detail = detail
        self.traceback_text = traceback_text
        self.rank = rank
        where = "while building the model" if batch_size is None else f"at batch {batch_size}"
        if rank is not None:
            where = f"on rank {rank} {where}"
        first_line = detail.strip().splitlines()[0] if detail.strip() else "(no message)"
        hint = "Fix the model or the inputs"
        if _batchnorm_one_sample(batch_size, detail):
            # the probe starts again at 2 by itself; this is for what cannot (a profile of
            # batch 1, a search capped at 1)
            hint = "BatchNorm cannot train on one sample: use a batch of 2 or more"
        super().__init__(
            f"the model raised {exc_type} {where}: {first_line}. This is not an out-of-memory "
            f"error, so bsfinder stopped instead of calling it 'does not fit'. {hint} "
            "(rerun with --debug for the traceback)."
        )

    @classmethod
    def from_exception(cls, exc: BaseException, *, batch_size: int | None) -> UserCodeError:
        """Wrap the exception being handled (call inside ``except``: keeps its traceback)."""
        import traceback

        return cls(
            batch_size=batch_size,
            exc_type=type(exc).__name__,
            detail=str(exc),
            traceback_text=traceback.format_exc(),
        )


class ModelCrashError(UserCodeError):
    """The model's trial process died (signal, exit) or hung, and the evidence says it was
    not the memory budget: the crash reproduced under a generous budget, or the process was
    far from its budget when it happened.

    Attributes (besides :class:`UserCodeError`'s, with ``exc_type`` the signal name,
    ``"exit N"`` or ``"hang"``): ``evidence``, why it is not out of memory.
    """

    def __init__(
        self,
        *,
        batch_size: int | None,
        what: str,
        evidence: str,
        output: str = "",
        exc_type: str = "crash",
        rank: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.exc_type = exc_type
        self.detail = what
        self.evidence = evidence
        self.traceback_text = output
        self.rank = rank
        where = "while loading or building" if batch_size is None else f"at batch {batch_size}"
        tail = f" Its last output: {output}" if output else ""
        BsfinderError.__init__(
            self,
            f"the model's trial process {what} {where}, and {evidence}: this is not "
            "out of memory, so bsfinder stopped instead of calling it 'does not fit'. Fix "
            f"the {'hang' if exc_type == 'hang' else 'crash'} in the model or its inputs.{tail}",
        )


#: torch's words when a BatchNorm layer in training mode sees one value per channel (one
#: sample, no spatial positions): ``Expected more than 1 value per channel when training``
_BATCHNORM_ONE_SAMPLE = "more than 1 value per channel"


def _batchnorm_one_sample(batch_size: int | None, detail: str) -> bool:
    return batch_size == 1 and _BATCHNORM_ONE_SAMPLE in detail


def is_batchnorm_one_sample(exc: BaseException) -> bool:
    """True when ``exc`` is BatchNorm refusing to train on one sample at batch 1.

    Such a :class:`UserCodeError` says that batch 1 is too small for the model, not that the
    model is wrong: the probe starts again at batch 2 (see :func:`bsfinder.probe.run_probe`).
    The same message at any other batch, or while building, is the model's error.

    Example:
        >>> is_batchnorm_one_sample(UserCodeError(batch_size=1, exc_type="ValueError",
        ...     detail="Expected more than 1 value per channel when training, got input "
        ...     "size torch.Size([1, 8])"))
        True
    """
    return (
        isinstance(exc, UserCodeError)
        and not isinstance(exc, ModelCrashError)
        and _batchnorm_one_sample(exc.batch_size, exc.detail)
    )


class WorkerError(BsfinderError):
    """The trial worker process failed outside of any trial (start-up, protocol)."""


class BsfinderWarning(UserWarning):
    """The probe runs, but in a way that can bias its answer; the message says why and what to do.

    Shown on stderr by Python's default warning filters; silence one with
    ``warnings.filterwarnings("ignore", category=BsfinderWarning)``.
    """


# Messages that identify an allocation failure, by backend. Lower-case substrings.
_OOM_MESSAGES: tuple[tuple[str, str], ...] = (
    ("cuda out of memory", "cuda"),
    ("cuda error: out of memory", "cuda"),
    ("hip out of memory", "hip"),
    ("hip error: out of memory", "hip"),
    ("mps backend out of memory", "mps"),
    ("xpu out of memory", "xpu"),
    ("defaultcpuallocator: can't allocate memory", "cpu"),
    ("defaultcpuallocator: not enough memory", "cpu"),
    ("cudnn_status_alloc_failed", "cudnn"),
    ("cublas_status_alloc_failed", "cublas"),
    ("hipblas_status_alloc_failed", "cublas"),
    ("miopenstatusallocfailed", "cudnn"),
    ("cusolver_status_alloc_failed", "cusolver"),
    ("cufft_alloc_failed", "cufft"),
)

# RuntimeErrors that are allocation failures only under the CPU address-space limit: oneDNN
# cannot create its primitive when its scratchpad allocation fails, a new thread cannot get
# its stack; without the limit these are genuine bugs and must propagate. (An OSError such
# as EAGAIN from a socket is never one.)
_OOM_MESSAGES_UNDER_LIMIT: tuple[tuple[str, str], ...] = (
    ("could not create a primitive", "onednn"),
    ("can't start new thread", "thread"),
    ("resource temporarily unavailable", "thread"),
    ("cannot allocate memory", "os"),
    # C++ operator new failing inside a kernel (seen from a conv step under a 64 MiB limit)
    ("std::bad_alloc", "cpu"),
)


def oom_kind(exc: BaseException, *, under_memory_limit: bool = False) -> str | None:
    """Classify an exception as an out-of-memory error, naming the allocator that failed.

    The type decides first (``torch.OutOfMemoryError``, ``MemoryError``); messages are the
    fallback for backends that raise a plain ``RuntimeError``. Returns None for anything else:
    such an exception is the user's bug and must not be reported as "does not fit".

    Args:
        exc: the exception raised by a training step.
        under_memory_limit: the CPU address-space budget is in force, which makes a few
            otherwise ambiguous RuntimeErrors (oneDNN, thread creation) allocation failures.

    Example:
        >>> oom_kind(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        'cuda'
    """
    torch_oom = _torch_oom_type()
    if torch_oom is not None and isinstance(exc, torch_oom):
        return "cuda" if "cuda" in str(exc).lower() else "torch"
    if isinstance(exc, MemoryError):
        return "python"
    if not isinstance(exc, RuntimeError | OSError):
        return None
    message = str(exc).lower()
    for needle, kind in _OOM_MESSAGES:
        if needle in message:
            return kind
    if under_memory_limit and isinstance(exc, RuntimeError):
        for needle, kind in _OOM_MESSAGES_UNDER_LIMIT:
            if needle in message:
                return kind
    return None


def is_oom(exc: BaseException, *, under_memory_limit: bool = False) -> bool:
    """True when ``exc`` is an allocation failure (see :func:`oom_kind`)."""
    return oom_kind(exc, under_memory_limit=under_memory_limit) is not None


def describe_oom(exc: BaseException, *, under_memory_limit: bool = False) -> str | None:
    """``"kind: message"`` on one line (at most ~400 characters) for an allocation failure,
    or None when ``exc`` is not one (see :func:`oom_kind`)."""
    kind = oom_kind(exc, under_memory_limit=under_memory_limit)
    if kind is None:
        return None
    text = " ".join(str(exc).split())
    return f"{kind}: {text if len(text) <= 400 else text[:397] + '...'}"


def _torch_oom_type() -> type[BaseException] | None:
    import sys

    torch = sys.modules.get("torch")  # never import torch just to classify
    return getattr(torch, "OutOfMemoryError", None) if torch is not None else None
