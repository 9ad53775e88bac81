"""Each option is declared once: one default, one check, one wording, for the API and the CLI."""

from __future__ import annotations

import inspect
import re

import pytest
from click.testing import CliRunner

from bsfinder import SpecError, estimate_memory, find_batch_size, profile_memory
from bsfinder.cli import main
from bsfinder.core.search import search
from bsfinder.options import (
    BudgetOptions,
    ExecutionOptions,
    RecommendOptions,
    SearchOptions,
    WorkloadOptions,
    default_of,
    size_bytes,
)
from bsfinder.probe import ProbeSettings

GROUPS = (WorkloadOptions, SearchOptions, BudgetOptions, RecommendOptions, ExecutionOptions)
#: the API keyword whose default is the CLI's own (a command line names a model by spec)
CLI_OWN = {"isolation"}


def _api_error(**bad: object) -> str:
    with pytest.raises(SpecError) as caught:
        find_batch_size("tests.models:mlp", input_shape=(8,), device="cpu", **bad)
    return str(caught.value)


def _cli_error(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(
        main, ["probe", "tests.models:mlp", "--input", "8", "--device", "cpu", "--json", "", *args]
    )
    return res.exit_code, res.output


def test_the_api_and_the_cli_refuse_a_bad_granularity_in_the_same_words() -> None:
    # GIVEN granularity 0, through the API and through the CLI
    api = _api_error(granularity=0)
    code, out = _cli_error("--granularity", "0")
    # THEN both say the option's one sentence, the CLI as a usage error (exit 2)
    assert api == "granularity must be a positive integer or 'pow2', got 0"
    assert code == 2 and api in out
    # and the search itself, called directly, says it too
    with pytest.raises(ValueError, match=re.escape(api)):
        search(lambda b: None, capacity_bytes=None, granularity=0)  # type: ignore[arg-type,return-value]
    # text that is not a number reaches the same check
    code, out = _cli_error("--granularity", "lots")
    assert code == 2 and "granularity must be a positive integer or 'pow2', got 'lots'" in out


def test_the_api_and_the_cli_refuse_a_bad_memory_limit_in_the_same_words() -> None:
    api = _api_error(memory_limit="lots")
    code, out = _cli_error("--memory-limit", "lots")
    assert api.startswith("memory limit: not a memory size: 'lots'")
    # the budget's range depends on the device: the API checks it, the CLI reports one line
    assert code == 2 and out.strip() == f"error: {api}"


def test_the_api_and_the_cli_refuse_a_headroom_out_of_range_in_the_same_words() -> None:
    for bad in (1.0, -0.1):
        api = _api_error(headroom=bad)
        code, out = _cli_error("--headroom", str(bad))
        assert api == f"headroom must be in [0, 1), got {bad}"
        assert code == 2 and api in out


def test_a_group_checks_its_fields_when_made() -> None:
    assert BudgetOptions(memory_limit="1GiB").memory_limit_bytes == 2**30
    assert BudgetOptions().memory_limit_bytes is None
    assert size_bytes(4096) == 4096
    with pytest.raises(SpecError, match="start_batch must be >= 1"):
        SearchOptions(start_batch=0)
    with pytest.raises(SpecError, match=r"steps must be an integer, got 1\.5"):
        ExecutionOptions(steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="does not split evenly over 3 GPUs"):
        RecommendOptions(global_batch=8, gpus=3)
    with pytest.raises(SpecError, match="base_lr needs base_batch"):
        RecommendOptions(base_lr=0.1)
    with pytest.raises(SpecError, match="isolation must be one of auto, process, inline"):
        ExecutionOptions(isolation="thread")


def _options() -> dict[str, object]:
    found: dict[str, object] = {}
    for group in GROUPS:
        for name in inspect.signature(group).parameters:
            found[name] = default_of(group, name)
    return found


@pytest.mark.parametrize("entry", [find_batch_size, profile_memory, estimate_memory])
def test_the_api_signatures_take_their_defaults_from_the_options(entry) -> None:
    options = _options()
    shared = [
        (name, p.default)
        for name, p in inspect.signature(entry).parameters.items()
        if name in options
    ]
    assert len(shared) >= 8  # the workload's at least
    for name, default in shared:
        assert default == options[name], name


def test_the_search_and_the_probe_settings_take_their_defaults_from_the_options() -> None:
    params = inspect.signature(search).parameters
    assert params["granularity"].default == SearchOptions.granularity == 8
    assert params["headroom"].default == RecommendOptions.headroom == 0.05
    assert params["start"].default == SearchOptions.start_batch
    settings = ProbeSettings()
    assert (settings.granularity, settings.headroom, settings.lr_rule) == (
        SearchOptions.granularity,
        RecommendOptions.headroom,
        RecommendOptions.lr_rule,
    )


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (
            "probe",
            {
                "--granularity": SearchOptions.granularity,
                "--headroom": RecommendOptions.headroom,
                "--start-batch": SearchOptions.start_batch,
                "--warmup-steps": ExecutionOptions.warmup_steps,
                "--steps": ExecutionOptions.steps,
                "--gpus": RecommendOptions.gpus,
                "--lr-rule": RecommendOptions.lr_rule,
                "--optimizer": WorkloadOptions.optimizer,
                "--precision": WorkloadOptions.precision,
                "--loss": WorkloadOptions.loss,
                "--device": ExecutionOptions.device,
            },
        ),
        ("estimate", {"--granularity": SearchOptions.granularity}),
        ("profile", {"--optimizer": WorkloadOptions.optimizer}),
    ],
)
def test_the_cli_help_shows_the_options_defaults(command: str, flags: dict[str, object]) -> None:
    res = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    names = [opt for param in main.commands[command].params for opt in param.opts]
    for flag, default in flags.items():
        after = text[text.index(f" {flag} ") :]
        following = names[names.index(flag) + 1]
        shown = after[: after.index(f" {following} ")]  # up to the next flag
        assert f"[default: {default}]" in shown, (flag, shown)
    # the memory budget has one help, wherever the flag is
    if command != "estimate":
        help_text = " ".join(
            BudgetOptions.__dataclass_fields__["memory_limit"].metadata["help"].split()
        )
        assert help_text in text
