"""Accelerate's ``find_executable_batch_size`` calling convention, with bsfinder's answer:
the batch the decorated function then trains with runs the whole function in a fresh
process under the same budget, and the next size at the granularity does not (issue 15,
item 7). Accelerate's own decorator shrinks by 0.9 per out-of-memory error in one process.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("accelerate")

from benchmarks.accelerate_train import train
from bsfinder.errors import BsfinderError, SpecError, UserCodeError
from bsfinder.execution.placement import _by_value
from bsfinder.execution.process import check_batch
from bsfinder.integrations.accelerate import FunctionTrial, find_executable_batch_size
from bsfinder.workload.step import WorkloadSpec

BUDGET = 256 * 2**20
GRANULARITY = 64
START = 8192


def _whole_run_fits(batch_size: int) -> bool:
    """The undecorated function, to its end, in a brand-new process under the budget."""
    blob, why = _by_value(functools.partial(train))
    assert blob is not None, why
    spec = WorkloadSpec(train_step=blob)
    return check_batch(
        spec, batch_size, device="cpu", memory_limit_bytes=BUDGET, warmup_steps=0, steps=1
    ).fits


def test_the_batch_it_trains_with_runs_the_whole_function_and_the_next_does_not() -> None:
    decorated = find_executable_batch_size(
        train, starting_batch_size=START, memory_limit=BUDGET, device="cpu",
        granularity=GRANULARITY, time_limit=None,
    )  # fmt: skip
    steps_run = decorated(max_steps=2)  # the function's own return value, from this process
    result = decorated.result
    found = result.max_batch
    assert steps_run == 2
    assert found is not None and found % GRANULARITY == 0 and GRANULARITY < found < START
    assert result.runner["isolation"] == "process"
    assert max(t.batch_size for t in result.trials) <= START
    assert _whole_run_fits(found)
    assert not _whole_run_fits(found + GRANULARITY)


def test_a_trial_stops_after_its_optimizer_steps() -> None:
    calls: list[int] = []

    def loop(batch_size: int) -> None:
        import torch

        weight = torch.nn.Parameter(torch.zeros(batch_size))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        for _ in range(100):
            calls.append(batch_size)
            try:  # a loop's own `except Exception` does not swallow the stop
                weight.sum().backward()
                optimizer.step()
            except Exception:
                pass
            optimizer.zero_grad()

    trial = FunctionTrial(loop, optimizer_steps=3)
    trial(8)
    assert calls == [8, 8, 8]
    assert trial.optimizer_steps_run == 3


def test_a_function_that_returns_before_its_steps_is_a_whole_trial() -> None:
    trial = FunctionTrial(lambda batch_size, n: None, (1,), optimizer_steps=3)
    trial(4)
    assert trial.optimizer_steps_run == 0


def test_passing_the_batch_size_is_refused_as_accelerate_does() -> None:
    decorated = find_executable_batch_size(starting_batch_size=8)(train)
    with pytest.raises(SpecError, match="the batch size was passed to train"):
        decorated(64, 4096, 5)
    with pytest.raises(SpecError, match="the batch size was passed"):
        decorated(batch_size=64)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"starting_batch_size": 0}, "starting_batch_size must be a positive integer"),
        ({"optimizer_steps": 0}, "optimizer_steps must be a positive integer"),
    ],
)
def test_bad_options_are_refused(options, match) -> None:
    with pytest.raises(SpecError, match=match):
        find_executable_batch_size(train, **options)


def test_a_function_without_a_batch_parameter_is_refused() -> None:
    with pytest.raises(SpecError, match="first parameter must be the batch size"):
        find_executable_batch_size(lambda: None)


def test_nothing_fitting_says_so_with_the_trials() -> None:
    decorated = find_executable_batch_size(
        functools.partial(train, width=1 << 20), starting_batch_size=4, memory_limit="64MiB",
        device="cpu",
    )  # fmt: skip
    with pytest.raises(BsfinderError, match="does not train at batch 1") as caught:
        decorated()
    assert caught.value.result.max_batch is None


def test_an_error_in_the_function_is_the_users_not_a_smaller_batch() -> None:
    def broken(batch_size: int) -> None:
        raise KeyError("no such column")

    decorated = find_executable_batch_size(
        broken, starting_batch_size=8, memory_limit=BUDGET, device="cpu"
    )
    with pytest.raises(UserCodeError) as caught:
        decorated()
    assert caught.value.exc_type == "KeyError"
