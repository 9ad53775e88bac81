"""Probing under torchrun: 2 ranks on CPU with gloo, DDP and FSDP, agreeing on every trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bsfinder.distributed import agree, fsdp_units
from bsfinder.results import ProbeResult, Trial

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 ARGS`` from the repository root."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _trial(batch: int, fits: bool, times: tuple[float, ...] = (), peak: int | None = None,
           failure: str | None = None) -> Trial:  # fmt: skip
    return Trial(
        batch_size=batch,
        fits=fits,
        step_times_s=times,
        steps_run=len(times) + 1 if fits else 0,
        peak_bytes=peak,
        failure=failure,
        error=None if fits else f"{failure} here",
    )


# -- agreement (pure) -----------------------------------------------------------------------------
def test_agreed_trial_fits_everywhere_at_the_slowest_rank_and_the_largest_peak() -> None:
    trial = agree([_trial(64, True, (0.10, 0.30), 100), _trial(64, True, (0.20, 0.25), 120)])
    assert trial.fits
    assert trial.step_times_s == (0.20, 0.30)  # step by step, the slowest rank
    assert trial.peak_bytes == 120
    assert [r["peak_bytes"] for r in trial.ranks] == [100, 120]
    assert [r["rank"] for r in trial.ranks] == [0, 1]


def test_agreed_trial_fails_when_one_rank_fails_and_names_the_real_failure() -> None:
    trial = agree([_trial(64, False, failure="peer"), _trial(64, False, failure="oom")])
    assert not trial.fits
    assert trial.failure == "oom"
    assert trial.error == "rank 1: oom here"
    one_fits = agree([_trial(64, True, (0.1,), 50), _trial(64, False, failure="crash")])
    assert not one_fits.fits and one_fits.failure == "crash"
    assert one_fits.ranks[0]["fits"] and not one_fits.ranks[1]["fits"]


def test_agreed_result_round_trips_through_json() -> None:
    trial = agree([_trial(8, True, (0.1,), 10), _trial(8, True, (0.2,), 20)])
    assert Trial.from_dict(json.loads(json.dumps(trial.__dict__))) == trial


def test_fsdp_units_are_the_repeated_blocks_else_the_children_with_weights() -> None:
    from torch import nn

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))

    blocks = Blocks()
    assert fsdp_units(blocks) == list(blocks.layers)
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert fsdp_units(flat) == [flat[0], flat[2]]


# -- real ranks -----------------------------------------------------------------------------------
def test_cli_ddp_two_ranks_agree_and_rank_0_writes_per_rank_memory(tmp_path) -> None:
    out = tmp_path / "ddp.json"
    proc = torchrun(
        "-m", "bsfinder", "probe", "tests.models:mlp", "--input", "512", "--device", "cpu",
        "--memory-limit", "160MiB", "--strategy", "ddp", "--steps", "1", "--optimizer", "sgd",
        "--base-lr", "0.1", "--base-batch", "64", "--global-batch", "1024",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("largest that fits") == 1  # rank 0 prints; rank 1 is quiet
    assert "2 x ddp over gloo" in proc.stdout
    result = ProbeResult.load(str(out))
    rec = result.recommendations
    assert rec.world_size == 2 and result.workload["distributed"]["world_size"] == 2
    for trial in result.trials:
        assert len(trial.ranks) == 2
        assert trial.fits == all(r["fits"] for r in trial.ranks)
        if trial.fits:
            assert trial.peak_bytes == max(r["peak_bytes"] for r in trial.ranks)
            assert trial.step_s >= max(r["step_s"] for r in trial.ranks) * 0.999
    best = result.trial(rec.max_batch)
    assert best.fits and rec.first_failure is not None and rec.first_failure > rec.max_batch
    # the learning rate is for the global batch, linear for SGD from 0.1 @ 64
    assert rec.learning_rate.batch_size == 2 * rec.time_optimal_batch
    assert rec.learning_rate.lr == pytest.approx(0.1 * 2 * rec.time_optimal_batch / 64)
    assert all(p["ranks"] == 2 for p in rec.plans)
    assert all(p["micro_batch"] * p["accumulation"] * 2 == 1024 for p in rec.plans)
    # DDP keeps a bucket copy of the gradients: the parameter bytes again, on each rank
    assert result.workload["parameter_bytes"] > 20 * 2**20


def test_api_fsdp_smaller_budget_on_one_rank_limits_both_and_oom_does_not_hang(tmp_path) -> None:
    proc = torchrun(
        "tests/dist_probe.py", "tests.models:mlp", "--width", "512", "--strategy", "fsdp",
        "--limits", "192MiB,128MiB", "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [ProbeResult.load(str(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert results[0].to_dict()["trials"] == results[1].to_dict()["trials"]  # every rank agrees
    assert results[0].recommendations == results[1].recommendations
    result = results[0]
    assert result.workload["distributed"]["capacity_bytes"] == [192 * 2**20, 128 * 2**20]
    assert result.capacity_bytes == 128 * 2**20
    rec = result.recommendations
    failed = result.trial(rec.first_failure)
    # rank 1's smaller budget ran out; rank 0 was stopped (not left waiting in a collective)
    assert [r["failure"] for r in failed.ranks] == ["peer", "oom"]
    assert failed.error.startswith("rank 1: ")
    assert result.trial(rec.max_batch).ranks[1]["peak_bytes"] <= 128 * 2**20
    # weights + momentum are 2x the parameter bytes; FSDP keeps half of each on each rank
    params = result.workload["parameter_bytes"]
    assert result.trial(rec.max_batch).state_bytes == pytest.approx(params, rel=0.01)


def test_a_non_oom_error_on_one_rank_stops_every_rank_with_that_error(tmp_path) -> None:
    proc = torchrun(
        "tests/dist_probe.py", "tests.models:FailsOnRank", "--width", "8", "--strategy", "ddp",
        "--limits", "192MiB,192MiB", "--out", str(tmp_path), timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    for rank in (0, 1):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert error["type"] == "UserCodeError"
        assert "ValueError on rank 1 at batch 4: rank 1 cannot take 4 samples" in error["error"]
