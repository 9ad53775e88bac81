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

The package's parts: :mod:`.launch` (where this rank is, the control group, the store),
:mod:`.runner` (the runner that agrees, and :func:`agree`), :mod:`.group` (one round's
trial processes: their group, the failure flag, the wrapped model).
"""

from __future__ import annotations

from bsfinder.execution.distributed.group import (
    PEER_FAILED,
    PEER_FAILED_EXIT,
    TrialGroup,
    flag_failure,
    join_round,
    looks_like_peer_loss,
    round_stores,
    wrap_model,
)
from bsfinder.execution.distributed.launch import Control, DistContext, launch_context, launch_env
from bsfinder.execution.distributed.runner import DistributedRunner, agree
from bsfinder.options import STRATEGIES

__all__ = [
    "PEER_FAILED",
    "PEER_FAILED_EXIT",
    "STRATEGIES",
    "Control",
    "DistContext",
    "DistributedRunner",
    "TrialGroup",
    "agree",
    "flag_failure",
    "join_round",
    "launch_context",
    "launch_env",
    "looks_like_peer_loss",
    "round_stores",
    "wrap_model",
]
