"""Probing under torchrun: 2 ranks on CPU with gloo, DDP and FSDP, agreeing on every trial."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bsfinder.core.results import ProbeResult, Trial
from bsfinder.execution.distributed import agree, looks_like_peer_loss
from bsfinder.execution.process import check_batch
from bsfinder.workload.blocks import fsdp_units
from bsfinder.workload.loading import InputSpec
from bsfinder.workload.step import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 ARGS`` from the repository root, on a free port (two
    test processes may run torchrun at once: pytest -n)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", OMP_NUM_THREADS="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    return subprocess.run(
        [*launcher, "--master-addr", "127.0.0.1", "--master-port", str(port), *args],
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


def test_a_collective_that_lost_its_peer_is_not_the_models_error() -> None:
    gloo = "[pair.cc:553] Connection closed by peer [127.0.0.1]:3503. This is typically caused"
    assert looks_like_peer_loss("RuntimeError", gloo)
    assert looks_like_peer_loss("DistBackendError", "NCCL error")
    assert not looks_like_peer_loss("ValueError", "shapes do not line up")


def test_ranks_that_only_lost_each_other_raise_instead_of_calling_it_a_misfit() -> None:
    from bsfinder.errors import WorkerError
    from bsfinder.execution.distributed import Control, DistContext, DistributedRunner

    class LostPeer:
        def run_trial(self, batch_size, on_step=None, *, timed=True, tag=None):
            return Trial(batch_size=batch_size, fits=False, failure="peer", error="gone")

    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, strategy="ddp",
                      backend="gloo", store_host="", store_port=0, session="s")  # fmt: skip
    runner = DistributedRunner(LostPeer(), ctx, Control(None, None, False))
    with pytest.raises(WorkerError, match="lost each other at batch 8") as caught:
        runner.run_trial(8)
    assert caught.value.agreed


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
        "--granularity", "pow2",  # agreement is the point, not the edge: 18 s, not 42 s
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
    spec = WorkloadSpec(model="tests.models:mlp", inputs=(InputSpec((512,)),), optimizer="sgd")
    alone = check_batch(spec, 1, device="cpu", memory_limit_bytes=160 * 2**20, steps=1)
    ddp = max(r["peak_bytes"] for r in result.trial(1).ranks)
    params = result.workload["trainable_parameter_bytes"]
    assert ddp - alone.peak_bytes == pytest.approx(params, rel=0.2)


@pytest.mark.slow  # 40 s on 2 cores; the DDP CLI test keeps two real ranks in the fast tier
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


def test_a_crash_on_one_rank_is_a_failed_trial_for_all_and_the_search_goes_on(tmp_path) -> None:
    proc = torchrun(
        "tests/dist_probe.py", "tests.models:FailsOnRank", "--width", "8", "--model-kwargs",
        '{"at": 16, "how": "abort"}', "--strategy", "ddp", "--limits", "192MiB,192MiB",
        "--max-batch", "64", "--out", str(tmp_path),
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = ProbeResult.load(str(tmp_path / "rank0.json"))
    failed = result.trial(16)
    assert not failed.fits and failed.failure == "crash"
    assert [r["failure"] for r in failed.ranks] == ["peer", "crash"]
    assert "SIGABRT" in failed.error and failed.error.startswith("rank 1: ")
    assert result.max_batch < 16


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


# -- scale-out estimate from a single-device probe (pure) ------------------------------------------
MIB = 2**20


def _single_device_result(**workload: int) -> ProbeResult:
    """The measured MLP's shape: a flat optimizer-step peak (448 MiB) up to ~2048, then
    activations (240 MiB + 0.0665 MiB per sample) on 80 MiB of weights and 160 MiB of AdamW."""
    from bsfinder.core.results import Recommendations

    def peak(b: int) -> int:
        return round(max(448.0, 240 + 0.0665 * b) * MIB)

    batches = [1, 2, 4, 1024, 2048, 4096, 6144, 7168]
    trials = tuple(
        Trial(batch_size=b, fits=True, step_times_s=(0.1,), steps_run=2, peak_bytes=peak(b),
              state_bytes=240 * MIB)
        for b in batches
    )  # fmt: skip
    rec = Recommendations(
        max_batch=7168, first_failure=8192, max_pow2_batch=4096, safe_batch=None,
        headroom=0.05, time_optimal_batch=1024, throughput_tolerance=0.05,
    )  # fmt: skip
    params = {
        "parameter_bytes": 80 * MIB,
        "trainable_parameter_bytes": 80 * MIB,
        "buffer_bytes": 0,
        "largest_unit_bytes": 64 * MIB,
        "root_unit_bytes": 0,
        **workload,
    }
    return ProbeResult(
        trials=trials,
        recommendations=rec,
        capacity_bytes=768 * MIB,
        device={"device": "cpu"},
        workload={"model": "tests.models:mlp", **params},
    )


def test_scale_out_ddp_adds_a_bucket_copy_of_the_gradients() -> None:
    from bsfinder.core.scaleout import scale_out

    ddp = scale_out(_single_device_result(), "ddp", 2)
    assert ddp.fixed_bytes == pytest.approx(320 * MIB, rel=1e-3)  # 240 + 80 of buckets
    assert ddp.floor_bytes == 528 * MIB  # the optimizer step: 448 + 80
    assert ddp.per_sample_bytes == pytest.approx(0.0665 * MIB, rel=1e-3)
    assert ddp.max_batch == int((768 - 320) / 0.0665)
    assert ddp.global_max_batch == 2 * ddp.max_batch
    assert ddp.peak_bytes(1) == ddp.floor_bytes


def test_scale_out_fsdp_shards_state_and_gathers_one_block() -> None:
    from bsfinder.core.scaleout import scale_out

    fsdp = scale_out(_single_device_result(), "fsdp", 2)
    # the line's 240 MiB is weights + AdamW state (no gradients): half of each goes, the
    # largest block (64 MiB) is gathered whole
    assert fsdp.terms["sharded_weights"] == -40 * MIB
    assert fsdp.terms["sharded_optimizer_state"] == -80 * MIB
    assert "sharded_gradients" not in fsdp.terms
    assert fsdp.fixed_bytes == pytest.approx(184 * MIB, rel=1e-3)
    # the optimizer step holds the gradients too, all sharded; nothing is gathered then
    assert fsdp.floor_bytes == (448 - 40 - 80 - 40) * MIB
    assert fsdp.max_batch > scale_out(_single_device_result(), "ddp", 2).max_batch
    eight = scale_out(_single_device_result(), "fsdp", 8, capacity_bytes=2**30)
    assert eight.terms["sharded_weights"] == -70 * MIB and eight.capacity_bytes == 2**30
    # a root that holds weights of its own keeps them gathered
    rooted = scale_out(_single_device_result(root_unit_bytes=16 * MIB), "fsdp", 2)
    assert rooted.fixed_bytes - fsdp.fixed_bytes == 8 * MIB


def test_scale_out_refuses_what_it_cannot_estimate_from() -> None:
    from dataclasses import replace

    from bsfinder.core.scaleout import scale_out
    from bsfinder.errors import SpecError

    single = _single_device_result()
    with pytest.raises(SpecError, match="ddp or fsdp"):
        scale_out(single, "zero3", 2)
    with pytest.raises(SpecError, match="positive integer"):
        scale_out(single, "ddp", 0)
    with pytest.raises(SpecError, match="rerun the probe"):
        scale_out(replace(single, workload={"model": "x"}), "ddp", 2)
    ranked = replace(single, workload={**single.workload, "distributed": {"world_size": 2}})
    with pytest.raises(SpecError, match="single-device"):
        scale_out(ranked, "fsdp", 2)
    with pytest.raises(SpecError, match="fewer than two"):
        scale_out(replace(single, trials=single.trials[:1]), "ddp", 2)


def test_cli_scale_out_prints_the_table_and_writes_json(cli, tmp_path) -> None:
    path = tmp_path / "single.json"
    _single_device_result().save(str(path))
    out = tmp_path / "ranks.json"
    proc = cli("scale-out", str(path), "--ranks", "2", "--ranks", "8", "--memory", "1GiB",
               "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fsdp" in proc.stdout and "DDP gradient buckets +80.0 MiB" in proc.stdout
    rows = json.loads(out.read_text())
    assert [(r["strategy"], r["ranks"]) for r in rows] == [
        ("ddp", 2), ("ddp", 8), ("fsdp", 2), ("fsdp", 8),
    ]  # fmt: skip
    assert all(r["capacity_bytes"] == 2**30 for r in rows)
    bad = cli("scale-out", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_a_strategy_without_a_launcher_probes_a_world_of_one() -> None:
    from bsfinder import find_batch_size

    result = find_batch_size(
        "tests.models:mlp", input_shape=(512,), device="cpu", memory_limit="192MiB",
        strategy="fsdp", max_batch=64, steps=1,
    )  # fmt: skip
    assert result.workload["distributed"]["world_size"] == 1
    assert result.workload["distributed"]["backend"] == "gloo"
    assert result.recommendations.world_size == 1 and result.max_batch == 64
    assert all(len(t.ranks) == 1 and t.fits for t in result.trials)
