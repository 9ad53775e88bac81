"""The messages between the runner and its trial worker, and between the ranks.

Two channels, each with one encoder and one decoder here:

- the worker's pipes (:mod:`bsfinder.execution._worker`): both ends are bsfinder, so the
  messages travel as pickles over ``multiprocessing.connection``; :func:`send` wraps one with
  the id of the request it answers (None for the server's own), :func:`receive` unwraps it
  and rejects anything that is not one of :data:`WORKER_MESSAGES`.
- the ranks' control group (:mod:`bsfinder.execution.distributed`): a peer is another
  machine, so nothing it sends is unpickled. A message is JSON, ``[tag, *fields]``
  (:func:`to_wire`, :func:`encode_message`); :func:`decode_message`, :func:`check_message` and
  :func:`from_wire` check it field by field against the dataclass, and anything malformed is
  a :class:`~bsfinder.errors.WorkerError` naming the rank.

It imports only the standard library and :mod:`bsfinder.errors`: both ends can load it before
torch, and a message's meaning never depends on what else is installed.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from bsfinder.errors import BsfinderError, SpecError, UserCodeError, WorkerError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "RANK_MESSAGES",
    "WORKER_MESSAGES",
    "Begin",
    "BuildOOM",
    "Described",
    "Died",
    "Interrupted",
    "PeerFailed",
    "ProfileOOM",
    "Profiled",
    "RankReady",
    "RankTrial",
    "Request",
    "ServerReady",
    "SpecFailed",
    "Stage",
    "Step",
    "TrialDone",
    "Unsafe",
    "UserFailed",
    "WorkerConfig",
    "WorkerFailed",
    "check_message",
    "decode_message",
    "encode_message",
    "error_message",
    "from_peer",
    "from_wire",
    "malformed",
    "raise_error",
    "receive",
    "send",
    "to_wire",
]


# -- errors: both channels -----------------------------------------------------------------------
@dataclass(frozen=True)
class UserFailed:
    """The model raised something that is not an allocation failure (a
    :class:`~bsfinder.errors.UserCodeError`); ``batch_size`` None: while building."""

    tag: ClassVar[str] = "user_error"
    batch_size: int | None
    exc_type: str
    detail: str
    traceback_text: str

    @classmethod
    def of(cls, exc: UserCodeError) -> UserFailed:
        return cls(exc.batch_size, exc.exc_type, exc.detail, exc.traceback_text)

    def error(self, rank: int | None = None) -> UserCodeError:
        return UserCodeError(
            batch_size=self.batch_size,
            exc_type=self.exc_type,
            detail=self.detail,
            traceback_text=self.traceback_text,
            rank=rank,
        )


@dataclass(frozen=True)
class SpecFailed:
    """The workload's specification is wrong (a :class:`~bsfinder.errors.SpecError`)."""

    tag: ClassVar[str] = "spec_error"
    text: str


@dataclass(frozen=True)
class WorkerFailed:
    """bsfinder's own failure (a traceback or an error's text)."""

    tag: ClassVar[str] = "worker_error"
    text: str


# -- the runner and its worker: requests ---------------------------------------------------------
@dataclass(frozen=True)
class WorkerConfig:
    """The first thing the runner sends the server: what every trial process needs."""

    spec: Any  # a WorkloadSpec
    device: str
    memory_limit_bytes: int | None
    warmup_steps: int
    steps: int
    threads: int | None
    distributed: Any  # a DistContext, or None
    preload: bool
    openblas_threads: str | None
    rehearse: bool
    #: build the model once in the server, before the fork (see ``_worker._prebuild``)
    prebuild: bool = True


@dataclass(frozen=True)
class Request:
    """One forked child: ``kind`` is ``describe``, ``trial`` or ``profile``; ``extra`` holds
    ``rehearse``, ``tag``, ``memory_limit_bytes`` (a rerun's) or ``snapshot``."""

    kind: str
    batch_size: int | None
    request_id: int
    extra: dict[str, Any] = field(default_factory=dict)


# -- the worker's answers ------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """What the server or the child is doing now: import, rehearse, warm-up, build, train."""

    tag: ClassVar[str] = "stage"
    name: str


@dataclass(frozen=True)
class Unsafe:
    """The server imported the model's code and is no longer safe to fork from: why."""

    tag: ClassVar[str] = "unsafe"
    reasons: str
    #: what made it unsafe: ``import`` (the model's code) or ``prebuild`` (building the model)
    stage: str = "import"


@dataclass(frozen=True)
class ServerReady:
    """The server has its imports done and waits for requests."""

    tag: ClassVar[str] = "zygote-ready"
    pid: int
    startup_s: float
    #: the server built the model once, for its trial processes to inherit
    prebuilt: bool = False


@dataclass(frozen=True)
class Begin:
    """What the runner needs to judge a child that hangs or dies: its pid, the budget, and
    the address space and resident set it started from."""

    tag: ClassVar[str] = "begin"
    pid: int
    capacity_bytes: int | None
    baseline_vm_bytes: int | None
    baseline_rss_bytes: int | None


@dataclass(frozen=True)
class Step:
    tag: ClassVar[str] = "step"
    done: int
    total: int


@dataclass(frozen=True)
class Described:
    """The answer to ``describe``: the model built under the budget."""

    tag: ClassVar[str] = "ready"
    capacity_bytes: int | None
    device: dict[str, Any]
    allocator_env: dict[str, str]
    setup_s: float
    parameters: dict[str, Any]


@dataclass(frozen=True)
class TrialDone:
    """The answer to ``trial``: a Trial (as a dict) and the child's set-up seconds."""

    tag: ClassVar[str] = "trial"
    trial: dict[str, Any]
    setup_s: float


@dataclass(frozen=True)
class Profiled:
    """The answer to ``profile``: a MemoryProfile, as a dict."""

    tag: ClassVar[str] = "profile"
    profile: dict[str, Any]


@dataclass(frozen=True)
class ProfileOOM:
    tag: ClassVar[str] = "profile_oom"
    reason: str


@dataclass(frozen=True)
class BuildOOM:
    """Building the model ran out of memory (the weights do not fit)."""

    tag: ClassVar[str] = "build_oom"
    reason: str


@dataclass(frozen=True)
class PeerFailed:
    """Under torchrun: this rank's trial stopped because another rank's failed first."""

    tag: ClassVar[str] = "peer"
    error: str


@dataclass(frozen=True)
class Died:
    """The server's word that a child exited without its final message: its exit status
    (``-signal`` when killed) and its peak resident bytes."""

    tag: ClassVar[str] = "died"
    code: int
    peak_rss_bytes: int


#: what the worker sends the runner
WORKER_MESSAGES: tuple[type, ...] = (
    Stage,
    Unsafe,
    ServerReady,
    Begin,
    Step,
    Described,
    TrialDone,
    Profiled,
    ProfileOOM,
    BuildOOM,
    PeerFailed,
    Died,
    UserFailed,
    SpecFailed,
    WorkerFailed,
)


def send(conn: Any, message: Any, request_id: int | None = None) -> None:
    """Send ``message`` over the worker's pipe, as the answer to request ``request_id``."""
    conn.send((request_id, message))


def receive(conn: Any) -> tuple[int | None, Any]:
    """The next ``(request id, message)`` from the worker's pipe.

    Raises:
        EOFError, OSError: the pipe is closed.
        WorkerError: what came is not one of :data:`WORKER_MESSAGES` (bsfinder's bug).
    """
    data = conn.recv()
    if not (
        isinstance(data, tuple)
        and len(data) == 2
        and (data[0] is None or isinstance(data[0], int))
        and isinstance(data[1], WORKER_MESSAGES)
    ):
        raise WorkerError(f"unexpected message from the trial worker: {data!r}")
    return data


# -- the ranks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankReady:
    """A rank's runner started: its RunnerInfo, as a dict."""

    tag: ClassVar[str] = "ok"
    info: dict[str, Any]


@dataclass(frozen=True)
class RankTrial:
    """A rank's trial: a Trial, as a dict."""

    tag: ClassVar[str] = "trial"
    trial: dict[str, Any]


@dataclass(frozen=True)
class Interrupted:
    """A rank was stopped (Ctrl-C): every rank stops, keeping what was agreed."""

    tag: ClassVar[str] = "interrupted"


#: what a rank sends the others: an answer, or one of the errors any answer may be
RANK_MESSAGES: dict[str, type] = {
    m.tag: m for m in (RankReady, RankTrial, UserFailed, SpecFailed, WorkerFailed, Interrupted)
}
_ERRORS = tuple(m.tag for m in (UserFailed, SpecFailed, WorkerFailed, Interrupted))

#: the largest message a rank accepts from another: what it allocates for a peer's bytes is
#: bounded (the longest real message is a traceback; Python folds a recursion's repeats)
MAX_MESSAGE_BYTES = 16 * 2**20


def to_wire(message: Any) -> list[Any]:
    """A rank message as JSON data: ``[tag, *fields]`` (any message, for an error's text)."""
    return [message.tag, *(getattr(message, f.name) for f in fields(message))]


def from_wire(data: Any, rank: int, expected: str) -> Any:
    """The rank message ``rank`` sent, if it is an ``expected`` one or an error.

    Raises:
        WorkerError: anything else (see :func:`check_message`).
    """
    checked = check_message(data, rank, expected)
    return RANK_MESSAGES[checked[0]](*checked[1:])


def encode_message(value: Any) -> bytes:
    """``value`` as the JSON the ranks exchange (tuples become lists).

    Raises:
        TypeError: ``value`` holds what JSON cannot (bsfinder's bug, never a peer's).
    """
    return json.dumps(value, separators=(",", ":")).encode()


def decode_message(data: bytes, rank: int) -> Any:
    """What ``rank`` sent, as JSON data: nothing a peer sends is unpickled or evaluated.

    Raises:
        WorkerError: it is not UTF-8 JSON (every rank decodes the same bytes: all raise it).
    """
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise malformed(rank, f"what is not JSON ({type(exc).__name__})") from None


def check_message(message: Any, rank: int, expected: str) -> list[Any]:
    """``message`` if it is an ``expected`` message or an error, each field of its type.

    Raises:
        WorkerError: anything else.
    """
    kind = message[0] if isinstance(message, list) and message else None
    if not isinstance(kind, str) or (kind != expected and kind not in _ERRORS):
        raise malformed(rank, f"a message that is not {expected!r} or an error")
    shape = [f.type if isinstance(f.type, str) else "Any" for f in fields(RANK_MESSAGES[kind])]
    if len(message) != 1 + len(shape) or not all(
        accepts(t, v) for t, v in zip(shape, message[1:], strict=True)
    ):
        raise malformed(rank, f"a malformed {kind!r} message")
    return message


def from_peer(cls: Any, data: Any, rank: int) -> Any:
    """A ``cls`` dataclass (:class:`Trial`, :class:`RunnerInfo`) from ``rank``'s JSON, each
    field checked against its annotation; keys ``cls`` has no field for are ignored.

    Raises:
        WorkerError: a field is missing or of another type.
    """
    if not isinstance(data, dict):
        raise malformed(rank, f"a {cls.__name__} that is not an object")
    values: dict[str, Any] = {}
    for f in fields(cls):
        annotation = f.type if isinstance(f.type, str) else "Any"
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise malformed(rank, f"a {cls.__name__} without {f.name!r}")
            continue
        value = data[f.name]
        if not accepts(annotation, value):
            raise malformed(rank, f"a {cls.__name__} whose {f.name!r} is not {annotation}")
        values[f.name] = tuple(value) if annotation.startswith("tuple") else value
    return cls(**values)


def malformed(rank: int, what: str) -> WorkerError:
    """The error every rank raises when ``rank`` sent ``what`` is not bsfinder's message."""
    error = WorkerError(
        f"rank {rank} sent {what}; the ranks' bsfinder processes only exchange bsfinder's "
        "JSON messages (is every rank running the same bsfinder?)"
    )
    error.agreed = True  # every rank decodes every rank's message: all raise this
    return error


def error_message(exc: BsfinderError) -> UserFailed | SpecFailed | WorkerFailed:
    """The message that carries ``exc`` to the other ranks."""
    if isinstance(exc, UserCodeError):
        return UserFailed.of(exc)
    if isinstance(exc, SpecError):
        return SpecFailed(str(exc))
    return WorkerFailed(str(exc))


def raise_error(rank: int, message: UserFailed | SpecFailed | WorkerFailed) -> None:
    """Raise, on every rank, the error ``rank`` reported (``agreed`` marks it as such)."""
    error: BsfinderError
    if isinstance(message, UserFailed):
        error = message.error(rank=rank)
    elif isinstance(message, SpecFailed):
        error = SpecError(f"on rank {rank}: {message.text}")
    else:
        error = WorkerError(f"on rank {rank}: {message.text}")
    error.agreed = True
    raise error


_SCALARS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def accepts(annotation: str, value: Any) -> bool:
    """Whether JSON ``value`` is of the type ``annotation`` spells (``int | None``,
    ``tuple[float, ...]``, ``dict[str, Any]``); a type it cannot check (``Any``) takes any
    JSON value."""
    for option in _union(annotation):
        base, _, inner = option.partition("[")
        if option == "None":
            if value is None:
                return True
        elif base in _SCALARS:
            if _SCALARS[base](value):
                return True
        elif base in ("tuple", "list"):
            item = inner[:-1].removesuffix(", ...").strip() or "Any"
            if isinstance(value, list) and all(accepts(item, v) for v in value):
                return True
        elif base == "dict":
            if isinstance(value, dict):
                return True
        else:
            return True
    return False


def _union(annotation: str) -> list[str]:
    """``a | b[c | d]`` -> ``["a", "b[c | d]"]``."""
    options, depth, start = [], 0, 0
    for i, char in enumerate(annotation):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0:
            options.append(annotation[start:i].strip())
            start = i + 1
    options.append(annotation[start:].strip())
    return options
