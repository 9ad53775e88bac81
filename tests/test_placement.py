"""Where trials run, decided once (bsfinder.execution.placement): real torch, tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from bsfinder.errors import BsfinderWarning, SpecError
from bsfinder.execution.inline import InlineRunner
from bsfinder.execution.placement import Placement, build_runner, place
from bsfinder.execution.process import ProcessRunner
from bsfinder.workload.loading import InputSpec
from bsfinder.workload.step import WorkloadSpec

SPEC = WorkloadSpec(inputs=(InputSpec(shape=(4,)),), model_label="tests:tiny")


def _place(model: Any, **options: Any) -> Any:
    options = {"make_batch": None, "train_step": None, "isolation": "auto", "device": "cpu",
               "resolved": "cpu", "memory_limit_bytes": 256 << 20, **options}  # fmt: skip
    return place(model, SPEC, **options)


def _runner(placement: Placement, model: Any, make_batch: Any = None) -> Any:
    return build_runner(placement, SPEC, model=model, make_batch=make_batch, train_step=None,
                        optimizer="adamw", warmup_steps=1, steps=1,
                        trial_timeout_s=None)  # fmt: skip


def _unpicklable_make_batch() -> Any:
    lock = threading.Lock()  # a lock cannot be pickled, not even by value

    def make_batch(batch_size: int) -> torch.Tensor:
        with lock:
            return torch.randn(batch_size, 4)

    return make_batch


def test_a_class_defined_in_a_script_travels_by_value(monkeypatch, tmp_path) -> None:
    # GIVEN a model class as a script defines it: its module is __main__, where it is not found
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    monkeypatch.setattr(Net, "__module__", "__main__")
    # WHEN the trials are placed
    with _place(Net) as placement:
        # THEN they run in fresh processes, with the class itself on its way there
        assert placement.use_process and placement.reasons == ()
        assert placement.model_file is None  # a factory is built there, not saved here
        blob = placement.travel["model_factory"]
        assert isinstance(blob, bytes) and b"__main__" in blob
        # a fresh interpreter, whose __main__ has no Net, builds it from the bytes alone
        (tmp_path / "net.pt").write_bytes(blob)
        load = "import sys, torch; net = torch.load(sys.argv[1], weights_only=False)()"
        shape = "print(tuple(net(torch.randn(3, 4)).shape))"
        command = [sys.executable, "-c", f"{load}; {shape}", "net.pt"]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "(3, 2)", done.stderr
        assert isinstance(_runner(placement, Net), ProcessRunner)


def test_an_object_that_cannot_be_pickled_places_trials_inline_with_the_reason() -> None:
    make_batch = _unpicklable_make_batch()
    model = nn.Linear(4, 2)
    with _place(model, make_batch=make_batch) as placement:
        assert not placement.use_process and placement.model_file is None
        assert len(placement.reasons) == 1
        assert placement.reasons[0].startswith("make_batch cannot be pickled, even by value")
        assert placement.why_inline == placement.reasons[0]
        # the runner it names is the inline one, and the user hears why (at their own call)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = _runner(placement, model, make_batch)
        assert isinstance(runner, InlineRunner) and runner.reason == placement.reasons[0]
        assert [w.category for w in caught] == [BsfinderWarning]
        assert "make_batch cannot be pickled" in str(caught[0].message)
        assert caught[0].filename == __file__


def test_isolation_inline_serialises_nothing_and_warns_nothing() -> None:
    model = nn.Linear(4, 2)
    with _place(model, make_batch=_unpicklable_make_batch(), isolation="inline") as placement:
        assert not placement.use_process and placement.reasons == ()
        assert placement.travel == {} and placement.model_file is None
        assert placement.why_inline == "isolation='inline'"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert isinstance(_runner(placement, model), InlineRunner)


def test_isolation_process_with_an_object_that_cannot_travel_is_a_spec_error() -> None:
    make_batch = _unpicklable_make_batch()
    with (
        pytest.raises(SpecError, match="isolation='process' is impossible") as raised,
        _place(nn.Linear(4, 2), make_batch=make_batch, isolation="process"),
    ):
        pytest.fail("placed")
    assert "make_batch cannot be pickled" in str(raised.value)


def test_the_saved_model_file_is_gone_after_an_error_raised_after_it_was_saved() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="the probe failed"), _place(model) as placement:
        path = placement.model_file
        assert path is not None and os.path.getsize(path) > 0
        saved = torch.load(path, weights_only=False)
        assert torch.equal(saved.weight, model.weight)
        raise RuntimeError("the probe failed")
    assert not os.path.exists(path)
    # and on the way out without an error too
    with _place(model) as placement:
        path = placement.model_file
        assert path is not None and os.path.exists(path)
    assert not os.path.exists(path)


def test_a_cpu_budget_left_to_the_default_is_settled_once_and_gpus_wait_for_ranks() -> None:
    # gpus plans for ranks elsewhere: without a strategy the probe is a world of one
    with _place(nn.Linear(4, 2), memory_limit_bytes=None, gpus=4) as placement:
        assert placement.world_size == 1 and placement.launched is None
        assert placement.memory_limit_bytes is not None and placement.memory_limit_bytes > 16 << 20
