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
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from typing import Any

from bsfinder.errors import BsfinderError, SpecError, UserCodeError, WorkerError
from bsfinder.results import Trial
from bsfinder.runner import RunnerInfo, StepCallback

__all__ = [
    "PEER_FAILED",
    "PEER_FAILED_EXIT",
    "STRATEGIES",
    "DistContext",
    "DistributedRunner",
    "TrialGroup",
    "agree",
    "flag_failure",
    "fsdp_units",
    "join_round",
    "launch_context",
    "launch_env",
    "looks_like_peer_loss",
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
        import torch.distributed as dist

        if self.group is None:
            return [value]
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        try:
            dist.all_gather_object(gathered, value, group=self.group)
        except RuntimeError as exc:  # a rank's bsfinder is gone (killed, or it crashed)
            text = " ".join(str(exc).split())[:300]
            raise WorkerError(f"lost contact with the other ranks' bsfinder: {text}") from None
        return gathered

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
        # which ranks share this machine: the store's address and the RAM split follow
        hosts = control.all_gather(socket.gethostname())
        mine = [r for r, host in enumerate(hosts) if host == hosts[rank]]
        local_world = len(mine)
        local = int(os.environ.get("LOCAL_RANK", mine.index(rank)))
        address: list[Any] = [None]
        if rank == 0:
            control.store = dist.TCPStore(
                "0.0.0.0", 0, world_size=None, is_master=True, timeout=timeout,
                wait_for_workers=False,
            )  # fmt: skip
            host = "127.0.0.1" if len(set(hosts)) == 1 else _reachable_host()
            address = [(host, control.store.port, secrets.token_hex(4))]
        if group is not None:
            dist.broadcast_object_list(address, src=0, group=group)
        host, port, session = address[0]
        if control.store is None:
            control.store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    except RuntimeError as exc:
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


def _encode_error(exc: BsfinderError) -> tuple[Any, ...]:
    if isinstance(exc, UserCodeError):
        return ("user_error", exc.batch_size, exc.exc_type, exc.detail, exc.traceback_text)
    if isinstance(exc, SpecError):
        return ("spec_error", str(exc))
    return ("worker_error", str(exc))


def _raise_error(rank: int, message: tuple[Any, ...]) -> None:
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
    """A :class:`~bsfinder.runner.TrialRunner` whose trials run on every rank at once.

    Wraps this rank's :class:`~bsfinder.isolation.ProcessRunner`; every rank must call the
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
        gathered = self.control.all_gather(outcome.message)
        self._raise_first(gathered)
        infos = [RunnerInfo(**m[1]) for m in gathered]
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
            flag_failure(self.control.store, tag, self.ctx.rank, "failed")
        gathered = self.control.all_gather(outcome.message)
        self._raise_first(gathered)
        agreed = agree([Trial.from_dict(m[1]) for m in gathered])
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

    def _raise_first(self, gathered: list[tuple[Any, ...]]) -> None:
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


def flag_failure(store: Any, tag: str, rank: int, reason: str) -> None:
    """Tell every trial process of round ``tag`` that rank ``rank`` failed."""
    if store is None:
        return
    with contextlib.suppress(RuntimeError):  # best effort: the all-gather tells them anyway
        _raise_flag(_round_store(store, tag), rank, reason)


def _round_store(store: Any, tag: str) -> Any:
    """The keys of round ``tag``: its process group's rendezvous and its failure flag."""
    import torch.distributed as dist

    return dist.PrefixStore(f"bsfinder/{tag}/", store)


def _raise_flag(round_store: Any, rank: int, reason: str) -> None:
    round_store.set(f"reason/{rank}", reason)
    round_store.add("failed", 1)


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
        self.store = _round_store(base, tag)
        # a connection of its own: the watching thread never shares the main thread's socket
        watch = dist.TCPStore(ctx.store_host, ctx.store_port, is_master=False, timeout=timeout)
        self._watch = _round_store(watch, tag)
        self._thread = threading.Thread(target=self._watch_peers, daemon=True)
        self._thread.start()
        kwargs: dict[str, Any] = {}
        if ctx.backend == "nccl":
            torch.cuda.set_device(device)
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(
            ctx.backend,
            store=dist.PrefixStore("group/", self.store),
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timeout,
            **kwargs,
        )

    def _watch_peers(self) -> None:
        while not self._done.wait(0.05):
            try:
                failed = self._watch.add("failed", 0) > 0
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
        _raise_flag(self.store, self.ctx.rank, kind)
        return True

    def peer_failed(self, wait_s: float) -> bool:
        """Whether another rank flagged a failure within ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.store.add("failed", 0) > 0:
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
    :meth:`~bsfinder.workload.Workload.prebuild`).
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
