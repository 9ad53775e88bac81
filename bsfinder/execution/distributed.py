"""Probing under ``torchrun``: every rank runs each trial, and all ranks agree on the outcome.

Each rank keeps bsfinder's isolation: its own fork server and one fresh process per trial.
The trial processes of one trial join a process group of their own (NCCL on CUDA, gloo on
CPU) through a TCP store that rank 0 hosts, and the model is wrapped in
``DistributedDataParallel`` or FSDP2's ``fully_shard`` there. The ranks' bsfinder processes
agree over a gloo group (no CUDA in them): a batch fits only if it fits on every rank, the
step time is the slowest rank's, and an error on one rank is raised on all of them.

An OOM on one rank must not leave the others waiting in a collective forever. A failing
trial process sets a flag in the store before it reports; every trial process watches the
flag from a thread and exits at once when another rank raised it. The rank's bsfinder
process raises the flag too when its trial process died or hung, which covers a rank that
could not raise it itself.

Nothing outside the probe can steer it. The store listens on 127.0.0.1 when all ranks share
a host and network namespace, else on the address of this machine that ``MASTER_ADDR`` names
(all interfaces only when it names none). A TCPStore has no authentication and any client
can list its keys, so the names of a round's keys are HMACs of a 128-bit per-probe secret
that rank 0 sends the other ranks over the control group: a client that lists the keys
cannot tell which key is the next round's failure flag (that one exists only once raised).
The ranks' messages are JSON, checked field by field; nothing a peer sends is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from typing import Any

from bsfinder.core.results import Trial
from bsfinder.errors import BsfinderError, SpecError, UserCodeError, WorkerError
from bsfinder.execution.runner import RunnerInfo, StepCallback

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PEER_FAILED",
    "PEER_FAILED_EXIT",
    "STRATEGIES",
    "DistContext",
    "DistributedRunner",
    "TrialGroup",
    "agree",
    "check_message",
    "decode_message",
    "encode_message",
    "flag_failure",
    "from_peer",
    "fsdp_units",
    "join_round",
    "launch_context",
    "launch_env",
    "looks_like_peer_loss",
    "round_stores",
    "unit_bytes",
    "wrap_model",
]

#: ``ddp``: DistributedDataParallel; ``fsdp``: FSDP2 ``fully_shard``; ``none``: the process
#: group is set up but the model is not wrapped (a ``train_step`` that wraps its own)
STRATEGIES = ("ddp", "fsdp", "none")

#: exit status of a trial process that stopped because another rank's trial failed
PEER_FAILED_EXIT = 75
#: the error of such a trial
PEER_FAILED = "stopped: another rank's trial failed first"

#: failure kinds, most telling first: the agreed failure is the first one found
_FAILURE_ORDER = ("oom", "crash", "timeout", "peer")


@dataclass(frozen=True)
class DistContext:
    """Where this rank is, and how its trial processes meet the other ranks' (picklable)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    strategy: str
    backend: str
    store_host: str
    store_port: int
    #: the per-probe secret the names of the store's keys derive from (never in the store)
    session: str
    timeout_s: float = 900.0

    def describe(self) -> dict[str, Any]:
        """What the result records about the distributed run."""
        return {
            "strategy": self.strategy,
            "backend": self.backend,
            "world_size": self.world_size,
            "local_world_size": self.local_world_size,
        }


# -- the ranks' bsfinder processes --------------------------------------------------------------
def launch_env() -> dict[str, int] | None:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` as torchrun sets them."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as exc:
        raise SpecError(f"torchrun's environment is malformed ({exc})") from None
    return {"rank": rank, "world_size": world, "local_rank": local, "local_world_size": local_world}


class _Control:
    """The ranks' bsfinder processes: a gloo group to agree over and the trials' store."""

    def __init__(self, group: Any, store: Any, owned: bool) -> None:
        self.group = group
        self.store = store
        self.owned = owned  # bsfinder made this group (the default one, or a gloo subgroup)

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, as JSON data (a world of one round-trips it too).

        Raises:
            WorkerError: a rank is gone, or sent what is not a JSON message (every rank
                raises the same error: each decodes every rank's bytes).
        """
        data = encode_message(value)
        if self.group is None:
            return [decode_message(data, 0)]
        import torch
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        try:
            # torch's all_gather_object pickles; this gathers the JSON's length, then its bytes
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
            lengths = [int(size.item()) for size in sizes]
            for rank, length in enumerate(lengths):
                if not 0 < length <= MAX_MESSAGE_BYTES:
                    raise _malformed(rank, f"a message of {length} bytes")
            mine = torch.zeros(max(lengths), dtype=torch.uint8)
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buffers = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(buffers, mine, group=self.group)
        except RuntimeError as exc:  # a rank's bsfinder is gone (killed, or it crashed)
            text = " ".join(str(exc).split())[:300]
            raise WorkerError(f"lost contact with the other ranks' bsfinder: {text}") from None
        return [
            decode_message(bytes(buffer[:length].tolist()), rank)
            for rank, (buffer, length) in enumerate(zip(buffers, lengths, strict=True))
        ]

    def close(self) -> None:
        import torch.distributed as dist

        self.store = None  # rank 0's closes the TCP store
        if self.owned and dist.is_initialized():
            dist.destroy_process_group(None if self.group is dist.group.WORLD else self.group)
        self.owned = False


def launch_context(
    strategy: str | None, device: str, *, timeout_s: float = 900.0
) -> tuple[DistContext, _Control] | None:
    """Join (or make) the ranks' control group for ``strategy``; None without one.

    Inside an initialised process group (the API in a training script) its ranks probe
    together; under torchrun's environment without a group (the CLI) bsfinder makes a gloo
    group; with neither, a world of one. Rank 0 starts the TCP store the trial processes
    meet through and tells the others where. Every rank must call this: it is collective.

    ``strategy`` is one of :data:`STRATEGIES` (the API checks it before any work).

    Raises:
        SpecError: torch without ``torch.distributed``.
        WorkerError: the ranks could not be joined (the group or the store failed).
    """
    if strategy is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise SpecError("this torch was built without torch.distributed")
    env = launch_env()
    timeout = timedelta(seconds=timeout_s + 120)
    group, owned = None, False
    try:
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            # agree over gloo: bsfinder's own process stays off the GPU the trials measure
            group = dist.group.WORLD if dist.get_backend() == "gloo" else None
            if group is None and world > 1:
                group, owned = dist.new_group(backend="gloo", timeout=timeout), True
        elif env is not None:
            rank, world = env["rank"], env["world_size"]
            if world > 1:
                dist.init_process_group("gloo", timeout=timeout)
                group, owned = dist.group.WORLD, True
        else:  # a strategy asked for without a launcher: one rank
            rank, world = 0, 1
        control = _Control(group, None, owned)
        # which ranks share this machine (the RAM split follows) and its loopback (the
        # store's address follows)
        places = [_place(m, r) for r, m in enumerate(control.all_gather(_where()))]
        mine = [r for r, place in enumerate(places) if place[0] == places[rank][0]]
        local_world = len(mine)
        local = int(os.environ.get("LOCAL_RANK", mine.index(rank)))
        address: list[Any] = []
        if rank == 0:
            try:
                listener, host = _listen_socket(len({place[1] for place in places}) == 1)
                control.store = _master_store(listener, timeout)
                address = [host, control.store.port, secrets.token_hex(16)]
            except (RuntimeError, OSError) as exc:  # the others are waiting for the address
                address = ["error", " ".join(str(exc).split())[:300]]
        host, port, session = _address(control.all_gather(address)[0])
        if control.store is None:
            control.store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    except (RuntimeError, OSError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise WorkerError(f"could not join the other ranks: {text}") from None
    ctx = DistContext(
        rank=rank,
        world_size=world,
        local_rank=local,
        local_world_size=local_world,
        strategy=strategy,
        backend="nccl" if device.startswith("cuda") else "gloo",
        store_host=host,
        store_port=port,
        session=session,
        timeout_s=timeout_s,
    )
    return ctx, control


def _reachable_host() -> str:
    """The address other nodes reach rank 0 at: torchrun's master address, else its name."""
    return os.environ.get("MASTER_ADDR") or socket.getfqdn()


def _where() -> list[str]:
    """This rank's host name, and what ranks that share 127.0.0.1 have in common.

    A host name alone can lie both ways: containers on one machine in separate network
    namespaces share a name but not a loopback, and two machines can share a name. The boot
    id (one per running kernel) and the network namespace's inode tell them apart.
    """
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as file:
        boot = file.read().strip()
    netns = ""
    with contextlib.suppress(OSError):
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    host = socket.gethostname()
    return [host, f"{host}/{boot}/{netns}"]


def _place(message: Any, rank: int) -> tuple[str, str]:
    if not (_is_list_of(message, str) and len(message) == 2):
        raise _malformed(rank, "a host that is not [name, loopback id]")
    return message[0], message[1]


def _address(message: Any) -> tuple[str, int, str]:
    if _is_list_of(message, str) and len(message) == 2 and message[0] == "error":
        error = WorkerError(f"could not join the other ranks: rank 0's store: {message[1]}")
        error.agreed = True
        raise error
    if not (
        isinstance(message, list)
        and len(message) == 3
        and isinstance(message[0], str)
        and _accepts("int", message[1])
        and 0 < message[1] < 65536
        and isinstance(message[2], str)
        and len(message[2]) == 32
    ):
        raise _malformed(0, "a store address that is not [host, port, 32-digit secret]")
    return message[0], message[1], message[2]


def _listen_socket(same_host: bool) -> tuple[socket.socket, str]:
    """The store's listening socket, and the address the other ranks connect to.

    TCPStore's server binds every interface (``::``) whatever host it is given (measured on
    torch 2.13, both backends); a socket bound here and handed over as ``master_listen_fd``
    listens only where it was bound.
    """
    if same_host:
        return _bound("127.0.0.1"), "127.0.0.1"
    name = _reachable_host()
    ip = _local_address(name)
    if ip is not None:
        return _bound(ip), ip
    # MASTER_ADDR names no address of this machine (a name only the other nodes resolve, a
    # NAT): listen everywhere, as torchrun's own store does; the key names stay secret
    return _bound(""), name


def _local_address(name: str) -> str | None:
    """The first address ``name`` resolves to that is one of this machine's, not loopback."""
    import psutil

    try:
        resolved = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    local = {
        a.address.split("%")[0]
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }
    for *_, sockaddr in resolved:
        ip = str(sockaddr[0]).split("%")[0]
        if ip in local and not ipaddress.ip_address(ip).is_loopback:
            return ip
    return None


def _bound(ip: str) -> socket.socket:
    """A listening TCP socket on ``ip`` (``""``: every interface, IPv6 and IPv4) and a free
    port."""
    backlog = socket.SOMAXCONN  # two connections per trial process, and the ranks
    if ip == "":
        try:
            return socket.create_server(
                ("::", 0), family=socket.AF_INET6, backlog=backlog, dualstack_ipv6=True
            )
        except (OSError, ValueError):  # no IPv6 here
            return socket.create_server(("0.0.0.0", 0), backlog=backlog)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.create_server((ip, 0), family=family, backlog=backlog)


def _master_store(listener: socket.socket, timeout: timedelta) -> Any:
    """Rank 0's TCPStore server on ``listener`` (the store owns and closes the socket)."""
    import torch
    import torch.distributed as dist

    host, port = listener.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "127.0.0.1"  # the server's own client connects here
    return dist.TCPStore(
        host, port, world_size=None, is_master=True, timeout=timeout,
        wait_for_workers=False, master_listen_fd=listener.detach(),
        # libuv's server ignored master_listen_fd before torch 2.7 (pytorch#150215)
        use_libuv=torch.__version__ >= "2.7",
    )  # fmt: skip


# -- the ranks' messages: JSON data, checked field by field ------------------------------------
#: the largest message a rank accepts from another: what it allocates for a peer's bytes is
#: bounded (the longest real message is a traceback; Python folds a recursion's repeats)
MAX_MESSAGE_BYTES = 16 * 2**20

#: what each kind of message carries after its kind
_MESSAGES: dict[str, tuple[str, ...]] = {
    "ok": ("dict",),  # a RunnerInfo
    "trial": ("dict",),  # a Trial
    "user_error": ("int | None", "str", "str", "str"),
    "spec_error": ("str",),
    "worker_error": ("str",),
    "interrupted": (),
}


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
        raise _malformed(rank, f"what is not JSON ({type(exc).__name__})") from None


def check_message(message: Any, rank: int, expected: str) -> list[Any]:
    """``message`` if it is an ``expected`` message or an error, each field of its type.

    Raises:
        WorkerError: anything else.
    """
    kind = message[0] if isinstance(message, list) and message else None
    if not isinstance(kind, str) or (kind != expected and kind not in _ERRORS):
        raise _malformed(rank, f"a message that is not {expected!r} or an error")
    shape = _MESSAGES[kind]
    if len(message) != 1 + len(shape) or not all(
        _accepts(t, v) for t, v in zip(shape, message[1:], strict=True)
    ):
        raise _malformed(rank, f"a malformed {kind!r} message")
    return message


_ERRORS = ("user_error", "spec_error", "worker_error", "interrupted")


def from_peer(cls: Any, data: Any, rank: int) -> Any:
    """A ``cls`` dataclass (:class:`Trial`, :class:`RunnerInfo`) from ``rank``'s JSON, each
    field checked against its annotation; keys ``cls`` has no field for are ignored.

    Raises:
        WorkerError: a field is missing or of another type.
    """
    if not isinstance(data, dict):
        raise _malformed(rank, f"a {cls.__name__} that is not an object")
    values: dict[str, Any] = {}
    for f in fields(cls):
        annotation = f.type if isinstance(f.type, str) else "Any"
        if f.name not in data:
            if not _has_default(f):
                raise _malformed(rank, f"a {cls.__name__} without {f.name!r}")
            continue
        value = data[f.name]
        if not _accepts(annotation, value):
            raise _malformed(rank, f"a {cls.__name__} whose {f.name!r} is not {annotation}")
        values[f.name] = tuple(value) if annotation.startswith("tuple") else value
    return cls(**values)


def _has_default(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is not MISSING or f.default_factory is not MISSING


def _malformed(rank: int, what: str) -> WorkerError:
    error = WorkerError(
        f"rank {rank} sent {what}; the ranks' bsfinder processes only exchange bsfinder's "
        "JSON messages (is every rank running the same bsfinder?)"
    )
    error.agreed = True  # every rank decodes every rank's message: all raise this
    return error


_SCALARS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def _accepts(annotation: str, value: Any) -> bool:
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
            if isinstance(value, list) and all(_accepts(item, v) for v in value):
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


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _encode_error(exc: BsfinderError) -> tuple[Any, ...]:
    if isinstance(exc, UserCodeError):
        return ("user_error", exc.batch_size, exc.exc_type, exc.detail, exc.traceback_text)
    if isinstance(exc, SpecError):
        return ("spec_error", str(exc))
    return ("worker_error", str(exc))


def _raise_error(rank: int, message: list[Any] | tuple[Any, ...]) -> None:
    """Raise, on every rank, the error ``rank`` reported (``agreed`` marks it as such)."""
    kind = message[0]
    where = f"on rank {rank}: "
    error: BsfinderError
    if kind == "user_error":
        _, batch, exc_type, detail, tb = message
        error = UserCodeError(
            batch_size=batch, exc_type=exc_type, detail=detail, traceback_text=tb, rank=rank
        )
    elif kind == "spec_error":
        error = SpecError(where + message[1])
    else:
        error = WorkerError(where + message[1])
    error.agreed = True
    raise error


class DistributedRunner:
    """A :class:`~bsfinder.execution.runner.TrialRunner` whose trials run on every rank at once.

    Wraps this rank's :class:`~bsfinder.execution.process.ProcessRunner`; every rank must call the
    same methods in the same order (the search is deterministic given the agreed trials).
    """

    def __init__(self, inner: Any, ctx: DistContext, control: _Control) -> None:
        self.inner = inner
        self.ctx = ctx
        self.control = control
        self._round = 0

    def start(self) -> RunnerInfo:
        with _outcome() as outcome:
            outcome.message = ("ok", asdict(self.inner.start()))
        gathered = self._gather(outcome.message, "ok")
        infos = [from_peer(RunnerInfo, m[1], r) for r, m in enumerate(gathered)]
        mine = infos[self.ctx.rank]
        capacities = [i.capacity_bytes for i in infos]
        failures = [(r, i.build_failure) for r, i in enumerate(infos) if i.build_failure]
        known = [c for c in capacities if c is not None]
        return replace(
            mine,
            capacity_bytes=min(known) if known else None,
            device={**infos[0].device, "ranks": [i.device for i in infos]},
            workload={
                **infos[0].workload,
                "distributed": {**self.ctx.describe(), "capacity_bytes": capacities},
            },
            build_failure=(f"rank {failures[0][0]}: {failures[0][1]}" if failures else None),
        )

    def run_trial(self, batch_size: int, on_step: StepCallback | None = None) -> Trial:
        self._round += 1
        tag = f"{self.ctx.session}/{self._round}"
        with _outcome() as outcome:
            trial = self.inner.run_trial(batch_size, on_step, tag=tag)
            outcome.message = ("trial", asdict(trial))
        if outcome.message[0] != "trial" or not trial.fits:
            # a trial process that died or hung could not tell the others itself
            flag_failure(self.control.store, self.ctx.session, tag, self.ctx.rank, "failed")
        gathered = self._gather(outcome.message, "trial")
        trials = [from_peer(Trial, m[1], r) for r, m in enumerate(gathered)]
        for rank, other in enumerate(trials):
            if other.batch_size != batch_size:
                raise _malformed(rank, f"a trial at batch {other.batch_size}, not {batch_size}")
        agreed = agree(trials)
        if not agreed.fits and agreed.failure == "peer":  # no rank failed: they lost each other
            error = WorkerError(
                f"the ranks' trial processes lost each other at batch {batch_size}, though no "
                f"rank ran out of memory: {agreed.error}"
            )
            error.agreed = True
            raise error
        return agreed

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.control.close()

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), **self.ctx.describe(), "rounds": self._round}

    def _gather(self, message: tuple[Any, ...], expected: str) -> list[list[Any]]:
        """Every rank's outcome, each checked; the first error is raised on every rank."""
        try:
            data: Any = list(message)
            encode_message(data)
        except (TypeError, ValueError) as exc:  # bsfinder's own bug: still meet the others
            data = ["worker_error", f"this rank's {message[0]!r} message is not JSON: {exc}"]
        gathered = [
            check_message(m, r, expected) for r, m in enumerate(self.control.all_gather(data))
        ]
        self._raise_first(gathered)
        return gathered

    def _raise_first(self, gathered: list[list[Any]]) -> None:
        if any(message[0] == "interrupted" for message in gathered):
            raise KeyboardInterrupt  # a rank was stopped: all stop, keeping what was agreed
        for rank, message in enumerate(gathered):
            if message[0] not in ("ok", "trial"):
                _raise_error(rank, message)


class _Outcome:
    message: tuple[Any, ...] = ("worker_error", "no outcome")


@contextlib.contextmanager
def _outcome() -> Iterator[_Outcome]:
    """What this rank brings to the next all-gather, whatever happened: every rank must
    reach it, or the others wait in it until the timeout."""
    outcome = _Outcome()
    try:
        yield outcome
    except BsfinderError as exc:
        outcome.message = _encode_error(exc)
    except KeyboardInterrupt:
        outcome.message = ("interrupted",)
    except Exception as exc:  # bsfinder's own failure (a callback, the worker's pipe)
        outcome.message = ("worker_error", f"{type(exc).__name__}: {exc}")


def agree(per_rank: list[Trial]) -> Trial:
    """One trial from every rank's: it fits only if it fits on every rank.

    The step time of each step is the slowest rank's (the ranks wait for each other); the
    memory is the largest rank's; ``ranks`` keeps each rank's own readings. When it does not
    fit, the failure is the most telling rank's (an OOM before a crash before a rank that
    stopped because another failed), named with its rank.
    """
    if not per_rank:
        raise ValueError("no trials to agree on")
    batch = per_rank[0].batch_size
    summaries = tuple(
        {
            "rank": rank,
            "fits": t.fits,
            "step_s": t.step_s,
            "peak_bytes": t.peak_bytes,
            "peak_rss_bytes": t.peak_rss_bytes,
            "peak_reserved_bytes": t.peak_reserved_bytes,
            "state_bytes": t.state_bytes,
            "failure": t.failure,
            "error": t.error,
        }
        for rank, t in enumerate(per_rank)
    )

    def largest(name: str) -> Any:
        values = [getattr(t, name) for t in per_rank if getattr(t, name) is not None]
        return max(values) if values else None

    walls = [t.wall_s for t in per_rank if t.wall_s is not None]
    if all(t.fits for t in per_rank):
        lengths = {len(t.step_times_s) for t in per_rank}
        times: tuple[float, ...] = ()
        if len(lengths) == 1:
            steps = zip(*(t.step_times_s for t in per_rank), strict=True)
            times = tuple(max(step) for step in steps)
        return Trial(
            batch_size=batch,
            fits=True,
            step_times_s=times,
            steps_run=min(t.steps_run for t in per_rank),
            peak_bytes=largest("peak_bytes"),
            peak_allocated_bytes=largest("peak_allocated_bytes"),
            peak_reserved_bytes=largest("peak_reserved_bytes"),
            device_used_bytes=largest("device_used_bytes"),
            device_total_bytes=largest("device_total_bytes"),
            peak_rss_bytes=largest("peak_rss_bytes"),
            state_bytes=largest("state_bytes"),
            wall_s=max(walls) if walls else None,
            ranks=summaries,
        )
    failed = [(r, t) for r, t in enumerate(per_rank) if not t.fits]
    rank, worst = min(
        failed,
        key=lambda rt: (
            _FAILURE_ORDER.index(rt[1].failure)
            if rt[1].failure in _FAILURE_ORDER
            else len(_FAILURE_ORDER)
        ),
    )
    return Trial(
        batch_size=batch,
        fits=False,
        steps_run=min(t.steps_run for t in per_rank),
        failure=worst.failure,
        error=f"rank {rank}: {worst.error}",
        peak_rss_bytes=largest("peak_rss_bytes"),
        wall_s=max(walls) if walls else None,
        ranks=summaries,
    )


def flag_failure(store: Any, session: str, tag: str, rank: int, reason: str) -> None:
    """Tell every trial process of round ``tag`` that rank ``rank`` failed."""
    if store is None:
        return
    with contextlib.suppress(RuntimeError):  # best effort: the all-gather tells them anyway
        _raise_flag(round_stores(store, session, tag)[1], rank, reason)


def round_stores(store: Any, session: str, tag: str) -> tuple[Any, Any]:
    """Round ``tag``'s keys: its process group's rendezvous, and its failure flag.

    Any client of a TCPStore can list its keys, so each prefix is an HMAC of the round under
    the probe's secret ``session``: the rendezvous keys a client can list tell nothing of the
    flag's name, and a raised flag nothing of the next round's.
    """
    import torch.distributed as dist

    def prefix(purpose: str) -> str:
        name = hmac.new(session.encode(), f"{purpose}/{tag}".encode(), hashlib.sha256)
        return f"bsfinder/{name.hexdigest()[:32]}/"

    return dist.PrefixStore(prefix("group"), store), dist.PrefixStore(prefix("flag"), store)


def _raise_flag(flags: Any, rank: int, reason: str) -> None:
    flags.set(f"reason/{rank}", reason)
    flags.set("failed", "1")


def _flag_raised(flags: Any) -> bool:
    # check(), unlike add(key, 0), does not create the key: the flag's name stays unlisted
    return bool(flags.check(["failed"]))


#: what a collective raises when the process on the other end is gone
_PEER_LOSS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited",
)


def looks_like_peer_loss(exc_type: str, detail: str) -> bool:
    """Whether an error is a collective that lost its peer rather than the model's bug."""
    return exc_type in ("DistBackendError", "DistNetworkError", "DistStoreError") or any(
        sign in detail for sign in _PEER_LOSS
    )


# -- the trial processes -------------------------------------------------------------------------
class TrialGroup:
    """This trial's process group across ranks, and the watch on the other ranks' failure.

    Made before the memory budget is applied: the group's threads and buffers are the
    launcher's, not the training step's.
    """

    def __init__(self, ctx: DistContext, tag: str, device: str) -> None:
        import torch
        import torch.distributed as dist

        self.ctx = ctx
        self._done = threading.Event()
        self._self_failed = False
        timeout = timedelta(seconds=ctx.timeout_s)
        base = dist.TCPStore(ctx.store_host, ctx.store_port, is_master=False, timeout=timeout)
        self.store, self._flags = round_stores(base, ctx.session, tag)
        # a connection of its own: the watching thread never shares the main thread's socket
        watch = dist.TCPStore(ctx.store_host, ctx.store_port, is_master=False, timeout=timeout)
        self._watch = round_stores(watch, ctx.session, tag)[1]
        self._thread = threading.Thread(target=self._watch_peers, daemon=True)
        self._thread.start()
        kwargs: dict[str, Any] = {}
        if ctx.backend == "nccl":
            torch.cuda.set_device(device)
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(
            ctx.backend,
            store=self.store,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timeout,
            **kwargs,
        )

    def _watch_peers(self) -> None:
        while not self._done.wait(0.05):
            try:
                failed = _flag_raised(self._watch)
            except Exception:  # the store is gone: rank 0's bsfinder exited
                failed = True
            # this rank's own report wins: it finished, or it is reporting its own failure
            if failed and not self._self_failed and not self._done.is_set():
                os._exit(PEER_FAILED_EXIT)

    def own_failure(self, kind: str, *, peer_like: bool = False) -> bool:
        """This rank's trial failed with ``kind``: flag it, unless it only follows another
        rank's failure; then False. ``peer_like``: the error is a collective whose peer is
        gone (never this rank's own failure; if no rank failed, the ranks say so)."""
        self._self_failed = True
        if peer_like:
            return False
        if kind not in ("oom", "build_oom") and self.peer_failed(wait_s=3.0):
            return False
        _raise_flag(self._flags, self.ctx.rank, kind)
        return True

    def peer_failed(self, wait_s: float) -> bool:
        """Whether another rank flagged a failure within ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            if _flag_raised(self._flags):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def finish(self) -> None:
        """The trial is over on this rank: stop watching (its report must not be cut off)."""
        self._done.set()
        self._thread.join(timeout=1.0)


def join_round(workload: Any, ctx: DistContext, tag: str, device: str) -> TrialGroup:
    """In a trial process: join round ``tag``'s group and have ``workload`` wrap its model.

    FSDP: the full model is built on the CPU here, before the budget (see
    :meth:`~bsfinder.workload.step.Workload.prebuild`).
    """
    import torch

    group = TrialGroup(ctx, tag, device)
    mesh = None
    if ctx.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(torch.device(device).type, (ctx.world_size,))
        workload.prebuild()
    workload.wrap = lambda model: wrap_model(model, ctx, device, mesh=mesh)
    return group


def wrap_model(model: Any, ctx: DistContext, device: str, *, mesh: Any = None) -> Any:
    """Put ``model`` (on the CPU, in train mode) on ``device``, wrapped for ``ctx.strategy``
    (FSDP over ``mesh``, made here when not given)."""
    import torch

    if ctx.strategy == "ddp":
        model.to(device)
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if ctx.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if mesh is None:
            mesh = init_device_mesh(torch.device(device).type, (ctx.world_size,))
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)  # moves what no unit holds to the device, sharded
        return model
    return model.to(device)


def fsdp_units(model: Any) -> list[Any]:
    """The submodules sharded one by one, before the root: the repeated blocks.

    The elements of every ``nn.ModuleList`` (transformer layers); without one, the root's
    children that hold parameters. Each unit's weights are gathered only while it runs.
    """
    import torch

    units: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            units.extend(m for m in module if any(True for _ in m.parameters()))
    if not units:
        units = [m for m in model.children() if any(True for _ in m.parameters())]
    seen: set[int] = set()
    nested = {id(sub) for u in units for sub in u.modules() if sub is not u}
    unique = []
    for unit in units:  # a unit inside another unit is sharded with it
        if id(unit) not in seen and id(unit) not in nested:
            seen.add(id(unit))
            unique.append(unit)
    return unique


def unit_bytes(model: Any) -> tuple[int, int]:
    """Parameter bytes of the largest FSDP unit (what one all-gather materialises) and of
    the root's own parameters, those no unit holds (gathered through the whole step)."""

    def size(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    units = fsdp_units(model)
    in_units = {id(p) for unit in units for p in unit.parameters()}
    root = size(p for p in model.parameters() if id(p) not in in_units)
    return max((size(unit.parameters()) for unit in units), default=0), root
