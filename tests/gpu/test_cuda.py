"""The CUDA path: OOM recovery, NVML against torch, the --memory-limit cap. Run: pytest -m gpu"""

from __future__ import annotations

import pytest
import torch

from bsfinder import find_batch_size
from bsfinder.workload.loading import InputSpec
from bsfinder.workload.step import WorkloadSpec
from tests.conftest import fresh_trial

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MLP = {"width": 4096, "hidden": 8192}


def _probe(limit: int, **kwargs):
    return find_batch_size(
        "tests.models:mlp", model_kwargs=MLP, input_shape=(4096,), device="cuda:0",
        memory_limit=limit, steps=2, **kwargs,
    )  # fmt: skip


def test_oom_recovery_finds_the_exact_edge_in_fresh_processes() -> None:
    limit = 4 * 2**30
    result = _probe(limit)
    rec = result.recommendations
    assert rec.max_batch is not None and rec.first_failure == rec.max_batch + 8
    failed = [t for t in result.trials if not t.fits]
    assert failed and all(
        t.failure == "oom" and "out of memory" in (t.error or "").lower() for t in failed
    )
    spec = WorkloadSpec(model="tests.models:mlp", model_kwargs=MLP, inputs=(InputSpec((4096,)),))
    assert fresh_trial(spec, rec.max_batch, limit, device="cuda:0")
    assert not fresh_trial(spec, rec.first_failure, limit, device="cuda:0")


def test_nvml_matches_torchs_device() -> None:
    result = _probe(4 * 2**30, max_batch=64, granularity="pow2")
    props = torch.cuda.get_device_properties(0)
    assert result.device["uuid"].startswith(("GPU-", "MIG-"))
    trial = result.trial(64)
    assert trial is not None and trial.fits
    # NVML's total is the whole board; torch's excludes nothing more than a few reserved MiB
    assert trial.device_total_bytes is not None
    assert abs(trial.device_total_bytes - props.total_memory) < 0.02 * props.total_memory
    # the driver sees at least what the allocator reserved
    assert trial.device_used_bytes is not None and trial.peak_reserved_bytes is not None
    assert trial.device_used_bytes >= trial.peak_reserved_bytes
    assert trial.peak_allocated_bytes <= trial.peak_reserved_bytes


def test_memory_limit_caps_the_allocator() -> None:
    small, large = _probe(2 * 2**30), _probe(4 * 2**30)
    assert small.capacity_bytes == 2 * 2**30 and large.capacity_bytes == 4 * 2**30
    assert small.max_batch is not None and large.max_batch is not None
    assert small.max_batch < large.max_batch
    for t in small.trials:
        if t.fits:
            assert t.peak_reserved_bytes <= 2 * 2**30


def test_bf16_mixed_precision_runs() -> None:
    result = _probe(4 * 2**30, precision="bf16-mixed", max_batch=256, granularity="pow2")
    assert result.max_batch == 256


def test_profile_on_cuda_sums_to_the_allocator_peak_and_writes_a_snapshot(tmp_path) -> None:
    import pickle

    from bsfinder import profile_memory

    path = tmp_path / "step.pickle"
    p = profile_memory("tests.models:mlp", model_kwargs=MLP, input_shape=(4096,), batch_size=256,
                       device="cuda:0", snapshot=path, target_memory="80GiB")  # fmt: skip
    assert sum(p.breakdown.values()) == p.peak_bytes
    assert p.allocator_overhead_bytes is not None and p.outside_allocator_bytes is not None
    snapshot = pickle.loads(path.read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]
    assert p.scaling is not None and p.scaling.per_sample_bytes > 0


def test_cuda_estimate_is_within_10_percent_of_the_real_reserved_peak() -> None:
    from bsfinder import estimate_memory
    from bsfinder.execution.process import check_batch

    spec = WorkloadSpec(model="tests.models:mlp", model_kwargs=MLP, inputs=(InputSpec((4096,)),))
    real = check_batch(spec, 512, device="cuda:0", memory_limit_bytes=None, steps=1)
    est = estimate_memory("tests.models:mlp", model_kwargs=MLP, input_shape=(4096,),
                          batch_sizes=[512], context=0)  # fmt: skip
    point = est.point(512)
    # tensors, rounding, cuBLAS workspace and segment slack against the reserved peak
    estimated = point.peak_bytes
    assert real.peak_reserved_bytes
    assert abs(estimated - real.peak_reserved_bytes) / real.peak_reserved_bytes < 0.10


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_path_world_size_one_runs_on_nccl(strategy, tmp_path) -> None:
    # the torchrun path on one GPU: the trial process joins a world of one over NCCL and
    # wraps the model; DDP adds its gradient buckets, FSDP at one rank shards nothing
    limit = 4 * 2**30
    single = _probe(limit, max_batch=512)
    ranked = _probe(limit, max_batch=512, strategy=strategy)
    assert ranked.workload["distributed"]["backend"] == "nccl"
    assert ranked.workload["distributed"]["world_size"] == 1
    assert ranked.recommendations.world_size == 1
    assert all(len(t.ranks) == 1 for t in ranked.trials)
    assert ranked.max_batch is not None and single.max_batch is not None
    if strategy == "ddp":
        at = 1 << (min(single.max_batch, ranked.max_batch).bit_length() - 1)  # both grew there
        extra = ranked.trial(at).peak_bytes - single.trial(at).peak_bytes
        params = ranked.workload["trainable_parameter_bytes"]
        assert extra == pytest.approx(params, rel=0.25)  # one bucket copy of the gradients


# -- hostile user code on CUDA (see tests/test_robust_isolation.py for the CPU versions) ------
HOSTILE = "tests/hostile"


def _hostile(spec: str, **kwargs):
    return find_batch_size(
        f"{HOSTILE}/{spec}", input_shape=(64,), device="cuda:0", memory_limit=2**30,
        max_batch=32, steps=1, trial_timeout_s=30, **kwargs,
    )  # fmt: skip


def test_cuda_tensor_at_import_runs_with_imports_in_each_trial_process() -> None:
    result = _hostile("cuda_at_import.py:Net")
    assert result.max_batch == 32
    assert result.runner["imports"] == "per trial"
    assert any("CUDA" in note for note in result.notes)


def test_parallel_cpu_op_at_import_does_not_hang_cuda_trials() -> None:
    assert _hostile("parallel_at_import.py:Net").max_batch == 32


@pytest.mark.parametrize("how", ["segv", "exit", "hang"])
def test_a_crash_or_hang_on_cuda_is_the_models(how: str) -> None:
    from bsfinder.errors import ModelCrashError

    with pytest.raises(ModelCrashError) as caught:
        _hostile("misbehave.py:Misbehave", model_kwargs={"how": how, "at": 16}, trial_timeout_s=5)
    assert caught.value.batch_size == 16
