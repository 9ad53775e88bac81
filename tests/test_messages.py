"""The typed messages between the runner, its worker and the ranks: each goes through its
channel's one encoder and decoder unchanged, and what is not a message is refused."""

from __future__ import annotations

import ast
import os
import pickle
import sys
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from bsfinder.errors import SpecError, UserCodeError, WorkerError
from bsfinder.execution import messages as m

WORKER_EXAMPLES = [
    m.Stage("build"),
    m.Unsafe("started 1 thread (omp)"),
    m.ServerReady(pid=12, startup_s=0.5),
    m.Begin(pid=13, capacity_bytes=2**30, baseline_vm_bytes=None, baseline_rss_bytes=4096),
    m.Step(done=1, total=3),
    m.Described(
        capacity_bytes=None, device={"kind": "cpu"}, allocator_env={}, setup_s=0.1, parameters={}
    ),
    m.TrialDone(trial={"batch_size": 8, "fits": True}, setup_s=0.2),
    m.Profiled(profile={"batch_size": 8}),
    m.ProfileOOM("cpu: out of memory"),
    m.BuildOOM("cuda: out of memory"),
    m.PeerFailed("stopped: another rank's trial failed first"),
    m.Died(code=-9, peak_rss_bytes=2**20),
    m.UserFailed(batch_size=4, exc_type="ValueError", detail="bad", traceback_text="tb"),
    m.SpecFailed("no such module"),
    m.WorkerFailed("Traceback ..."),
]

RANK_EXAMPLES = [
    m.RankReady({"capacity_bytes": 1, "device": {}, "notes": ["a"]}),
    m.RankTrial({"batch_size": 8, "fits": False}),
    m.UserFailed(batch_size=None, exc_type="KeyError", detail="'x'", traceback_text=""),
    m.SpecFailed("bad option"),
    m.WorkerFailed("pipe closed"),
    m.Interrupted(),
]


def test_every_worker_message_type_has_an_example_and_a_tag() -> None:
    assert {type(e) for e in WORKER_EXAMPLES} == set(m.WORKER_MESSAGES)
    assert len({t.tag for t in m.WORKER_MESSAGES}) == len(m.WORKER_MESSAGES)


@pytest.mark.parametrize("message", WORKER_EXAMPLES, ids=lambda e: type(e).__name__)
def test_worker_messages_round_trip_through_the_pipe(message) -> None:
    read, write = os.pipe()
    inbox, outbox = Connection(read, writable=False), Connection(write, readable=False)
    try:
        m.send(outbox, message, 7)
        m.send(outbox, message)
        assert m.receive(inbox) == (7, message)
        assert m.receive(inbox) == (None, message)
    finally:
        inbox.close()
        outbox.close()


def test_requests_and_the_config_pickle() -> None:
    request = m.Request("trial", 8, 3, {"tag": "s/1"})
    assert pickle.loads(pickle.dumps(request)) == request
    config = m.WorkerConfig(
        spec=None, device="cpu", memory_limit_bytes=None, warmup_steps=1, steps=2, threads=None,
        distributed=None, preload=True, openblas_threads=None, rehearse=True,
    )  # fmt: skip
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(
    "sent", [("user_error", None, "E", "d", "tb"), m.Stage("x"), (1, 2, 3), (None, "stage")]
)
def test_what_is_not_a_worker_message_is_refused(sent) -> None:
    read, write = os.pipe()
    inbox, outbox = Connection(read, writable=False), Connection(write, readable=False)
    try:
        outbox.send(sent)
        with pytest.raises(WorkerError, match="unexpected message from the trial worker"):
            m.receive(inbox)
    finally:
        inbox.close()
        outbox.close()


def test_every_rank_message_type_has_an_example() -> None:
    assert {type(e) for e in RANK_EXAMPLES} == set(m.RANK_MESSAGES.values())


@pytest.mark.parametrize("message", RANK_EXAMPLES, ids=lambda e: type(e).__name__)
def test_rank_messages_round_trip_as_json(message) -> None:
    expected = message.tag if isinstance(message, m.RankReady | m.RankTrial) else "trial"
    data = m.encode_message(m.to_wire(message))
    assert m.from_wire(m.decode_message(data, 2), 2, expected) == message


def test_the_worker_and_the_ranks_build_the_same_errors() -> None:
    user = UserCodeError(batch_size=4, exc_type="ValueError", detail="bad", traceback_text="tb")
    assert m.error_message(user) == m.UserFailed(4, "ValueError", "bad", "tb")
    assert m.error_message(SpecError("s")) == m.SpecFailed("s")
    assert m.error_message(WorkerError("w")) == m.WorkerFailed("w")
    again = m.UserFailed.of(user).error()
    assert (again.batch_size, again.exc_type, again.detail, again.traceback_text) == (
        4,
        "ValueError",
        "bad",
        "tb",
    )
    assert str(again) == str(user)


@pytest.mark.parametrize(
    "data",
    [
        ["trial", "not a dict"],
        ["user_error", "4", "E", "d", "tb"],
        ["user_error", 4, "E", "d"],
        ["interrupted", 1],
        "trial",
        [],
    ],
)
def test_a_malformed_rank_message_is_a_worker_error_naming_the_rank(data) -> None:
    with pytest.raises(WorkerError, match="rank 5 sent") as caught:
        m.from_wire(data, 5, "trial")
    assert caught.value.agreed


@pytest.mark.parametrize("tag", ["exec", "stage", "died", "ok"])
def test_an_unknown_or_unexpected_rank_tag_is_rejected(tag) -> None:
    with pytest.raises(WorkerError, match="rank 1 sent a message that is not 'trial'"):
        m.from_wire([tag, {}], 1, "trial")


def test_a_rank_error_is_raised_on_every_rank_naming_the_rank() -> None:
    with pytest.raises(UserCodeError, match="on rank 3 at batch 4") as caught:
        m.raise_error(3, m.UserFailed(4, "ValueError", "bad", "tb"))
    assert caught.value.rank == 3 and caught.value.agreed
    with pytest.raises(SpecError, match=r"^on rank 1: bad option$"):
        m.raise_error(1, m.SpecFailed("bad option"))
    with pytest.raises(WorkerError, match=r"^on rank 0: gone$"):
        m.raise_error(0, m.WorkerFailed("gone"))


def test_the_rank_shapes_come_from_the_dataclasses() -> None:
    for tag, cls in m.RANK_MESSAGES.items():
        assert cls.tag == tag
        example = next(e for e in RANK_EXAMPLES if type(e) is cls)
        assert len(m.to_wire(example)) == 1 + len(fields(cls))


def test_the_messages_module_imports_only_the_standard_library_and_errors() -> None:
    # the worker's server imports it at start-up (python -P, its own sys.path), before torch
    tree = ast.parse(Path(m.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    outside = {n for n in imported if n.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"bsfinder.errors"}
