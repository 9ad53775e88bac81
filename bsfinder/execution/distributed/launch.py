"""Joining the ranks under ``torchrun``: where this rank is, the control group the ranks'
bsfinder processes agree over, and the TCP store their trial processes meet through.

Nothing outside the probe can steer it. The store listens on 127.0.0.1 when all ranks share
a host and network namespace, else on the address of this machine that ``MASTER_ADDR`` names
(all interfaces only when it names none). A TCPStore has no authentication and any client
can list its keys, so the names of a round's keys are HMACs of a 128-bit per-probe secret
that rank 0 sends the other ranks over the control group (see
:func:`~bsfinder.execution.distributed.group.round_stores`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bsfinder.errors import SpecError, WorkerError
from bsfinder.execution.messages import (
    MAX_MESSAGE_BYTES,
    accepts,
    decode_message,
    encode_message,
    malformed,
)
from bsfinder.options import DEFAULT_TRIAL_TIMEOUT_S

__all__ = ["Control", "DistContext", "launch_context", "launch_env"]


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
    timeout_s: float = DEFAULT_TRIAL_TIMEOUT_S

    def describe(self) -> dict[str, Any]:
        """What the result records about the distributed run."""
        return {
            "strategy": self.strategy,
            "backend": self.backend,
            "world_size": self.world_size,
            "local_world_size": self.local_world_size,
        }


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


class Control:
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
                    raise malformed(rank, f"a message of {length} bytes")
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
    strategy: str | None, device: str, *, timeout_s: float = DEFAULT_TRIAL_TIMEOUT_S
) -> tuple[DistContext, Control] | None:
    """Join (or make) the ranks' control group for ``strategy``; None without one.

    Inside an initialised process group (the API in a training script) its ranks probe
    together; under torchrun's environment without a group (the CLI) bsfinder makes a gloo
    group; with neither, a world of one. Rank 0 starts the TCP store the trial processes
    meet through and tells the others where. Every rank must call this: it is collective.

    ``strategy`` is one of :data:`bsfinder.options.STRATEGIES` (the API checks it before any work).

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
        control = Control(group, None, owned)
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
        raise malformed(rank, "a host that is not [name, loopback id]")
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
        and accepts("int", message[1])
        and 0 < message[1] < 65536
        and isinstance(message[2], str)
        and len(message[2]) == 32
    ):
        raise malformed(0, "a store address that is not [host, port, 32-digit secret]")
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


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) for v in value)
