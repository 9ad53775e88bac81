"""The trial processes of one round under ``torchrun``: their process group, the failure flag
they watch, and the model wrapped for the strategy.

An OOM on one rank must not leave the others waiting in a collective forever. A failing
trial process sets a flag in the store before it reports; every trial process watches the
flag from a thread and exits at once when another rank raised it. The rank's bsfinder
process raises the flag too when its trial process died or hung, which covers a rank that
could not raise it itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
import time
from datetime import timedelta
from typing import Any

from bsfinder.execution.distributed.launch import DistContext
from bsfinder.workload.blocks import fsdp_units

__all__ = [
    "PEER_FAILED",
    "PEER_FAILED_EXIT",
    "TrialGroup",
    "flag_failure",
    "join_round",
    "looks_like_peer_loss",
    "round_stores",
    "wrap_model",
]

#: exit status of a trial process that stopped because another rank's trial failed
PEER_FAILED_EXIT = 75
#: the error of such a trial
PEER_FAILED = "stopped: another rank's trial failed first"


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
    workload.place_with(lambda model: wrap_model(model, ctx, device, mesh=mesh))
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
