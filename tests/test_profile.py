"""The memory profile of one step, on an MLP whose bytes can be computed by hand."""

from __future__ import annotations

import json

import pytest

from bsfinder import profile_memory
from bsfinder.memory.profile import MemoryProfile, memory_scaling
from bsfinder.workload.loading import InputSpec
from bsfinder.workload.step import WorkloadSpec
from tests.conftest import fresh_trial, run_cli

MiB = 2**20

WIDTH, HIDDEN, CLASSES = 256, 1024, 10
# tests.models.mlp: Linear(256, 1024), ReLU, Linear(1024, 1024), ReLU, Linear(1024, 10)
PARAMS = (WIDTH * HIDDEN + HIDDEN) + (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * CLASSES + CLASSES)
PARAM_BYTES = 4 * PARAMS
KWARGS = {"width": WIDTH, "hidden": HIDDEN}


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_breakdown_matches_hand_computed_bytes(isolation) -> None:
    batch = 512
    p = profile_memory(
        "tests.models:mlp", model_kwargs=KWARGS, input_shape=(WIDTH,), batch_size=batch,
        device="cpu", isolation=isolation, scaling=False,
    )  # fmt: skip
    b = p.breakdown
    assert b["weights"] == PARAM_BYTES
    assert b["gradients"] == PARAM_BYTES  # the peak is in the optimizer step: all grads exist
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 4-byte step counter per tensor
    assert b["optimizer_state"] == 2 * PARAM_BYTES + 6 * 4
    assert b["inputs"] == batch * WIDTH * 4
    assert p.peak_phase == "optimizer"
    # THEN the categories sum to the measured peak, the rest being memory no tensor holds
    assert sum(b.values()) == p.peak_bytes
    assert b["not_tensors"] == p.peak_bytes - p.tracked_peak_bytes
    if isolation == "process":  # AND in a trial process nearly all of the peak is tensors
        assert 0 <= b["not_tensors"] < 8 * 2**20  # 16+ MiB with MKL's buffer cache on
    # AND the op-by-op timeline reaches the same tensor peak, in the optimizer phase
    assert max(p.phase_peak_bytes.values()) == p.phase_peak_bytes["optimizer"]
    assert p.phase_peak_bytes["optimizer"] == p.tracked_peak_bytes
    assert max(live for _, live, _ in p.timeline) == p.tracked_peak_bytes
    assert [ph for _, _, ph in p.timeline][-1] == "optimizer"
    # AND the first Linear keeps its output (batch x hidden floats) for backward
    modules = p.module_activation_bytes
    assert modules["Sequential.0"] == batch * HIDDEN * 4
    assert list(modules.values()) == sorted(modules.values(), reverse=True)


def test_sgd_momentum_is_one_buffer_per_parameter() -> None:
    p = profile_memory("tests.models:mlp", model_kwargs=KWARGS, input_shape=(WIDTH,),
                       batch_size=8, device="cpu", optimizer="sgd", scaling=False)  # fmt: skip
    assert p.breakdown["optimizer_state"] == PARAM_BYTES


def test_bad_batch_size_is_bad_input(tmp_path) -> None:
    from bsfinder import SpecError

    with pytest.raises(SpecError, match="positive integer"):
        profile_memory("tests.models:mlp", input_shape=(8,), batch_size=0, device="cpu")
    with pytest.raises(SpecError, match="needs a CUDA device"):
        profile_memory("tests.models:mlp", input_shape=(512,), batch_size=4, device="cpu",
                       snapshot=tmp_path / "step.pickle")  # fmt: skip
    assert not (tmp_path / "step.pickle").exists()


def test_cli_profile_table_json_and_timeline_picture(tmp_path) -> None:
    out, png = tmp_path / "profile.json", tmp_path / "step.png"
    # batch 1024 (and its half, 512): at 64 and 32 the activations (9 KiB a sample) were
    # within the address space's noise, and the scaling line read "0 B per sample" (no
    # prediction) in 1 of 3 runs; at 1024, 18.4-18.6 KiB a sample in 3 of 3
    proc = run_cli("profile", "tests.models:mlp", "--model-kwargs", json.dumps(KWARGS),
                   "--input", str(WIDTH), "--batch", "1024", "--device", "cpu",
                   "--json", str(out), "--plot", str(png))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tensor peak by phase: forward" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "batch 1024: peak" in proc.stdout and "during the backward step" in proc.stdout
    assert "optimizer state" in proc.stdout and "activation memory held" in proc.stdout
    assert "per sample" in proc.stdout and "largest batch predicted for this device" in proc.stdout
    data = json.loads(out.read_text())
    assert data["breakdown"]["weights"] == PARAM_BYTES
    assert sum(data["breakdown"].values()) == data["peak_bytes"]


def test_lazy_imports_of_a_transformers_model_are_not_training_memory() -> None:
    # GIVEN a transformers GPT-2 whose construction and forward import ~287 MiB of modules
    pytest.importorskip("transformers")
    p = profile_memory(
        "bsfinder.examples:gpt2", inputs=["input_ids=64:int64:1000", "labels=64:int64:1000"],
        batch_size=2, device="cpu", scaling=False,
    )  # fmt: skip
    # THEN the worker imported them before the baseline (a rehearsal on the meta device): the
    # measured peak is the step's tensors plus a few MiB, not plus hundreds
    assert p.breakdown["not_tensors"] < 16 * 2**20, p.breakdown


def _profile(batch: int, phases: dict[str, int], peak: int) -> MemoryProfile:
    return MemoryProfile(batch, peak, {}, max(phases.values()), "backward", phase_peak_bytes=phases)


def test_scaling_draws_one_line_per_phase() -> None:
    # GIVEN a step whose optimizer peak (200 B) is flat and whose backward grows 0.6 B/sample,
    # with 10 B then 12 B outside tensors
    small = _profile(100, {"forward": 50, "backward": 60, "optimizer": 200}, 210)
    large = _profile(200, {"forward": 100, "backward": 120, "optimizer": 200}, 212)
    line = memory_scaling(large, small, [("this device", 500), ("tiny", 100)])
    assert line.batch_sizes == (100, 200) and line.peak_bytes == (210, 212)
    assert line.phase_lines["backward"] == (0.0, 0.6) and line.phase_lines["optimizer"] == (200, 0)
    assert line.overhead_line == (8.0, 0.02)
    # THEN the steepest phase bounds large batches: (500 - 8) / 0.62 = 793.5
    assert line.per_sample_bytes == pytest.approx(0.62) and line.fixed_bytes == 8
    assert [p["max_batch"] for p in line.predictions] == [793, 0]  # 100 B: the optimizer's 208
    assert line.peak(793) <= 500 < line.peak(794)
    # one line through the two step peaks would have said (500 - 208) / 0.02 = 14600


def test_scaling_predicts_the_largest_batch_a_fresh_process_fits(cli) -> None:
    # GIVEN SmallCNN profiled at batch 64 (and 32) under a 256 MiB budget
    budget = 256 * MiB
    p = profile_memory("bsfinder.examples:SmallCNN", input_shape=(3, 32, 32), batch_size=64,
                       device="cpu", memory_limit=budget, target_memory="1GiB")  # fmt: skip
    assert p.scaling is not None and p.scaling.batch_sizes == (32, 64)
    (device, target) = p.scaling.predictions
    assert device["label"] == "this device" and device["memory_bytes"] == budget
    assert target["memory_bytes"] == 2**30 and target["max_batch"] > 3 * device["max_batch"]
    # THEN in brand-new processes under that budget, 10% less fits and 10% more does not
    # (measured: 262 predicted; the probe finds 256-263)
    spec = WorkloadSpec(model="bsfinder.examples:SmallCNN", inputs=(InputSpec((3, 32, 32)),))
    predicted = device["max_batch"]
    assert fresh_trial(spec, int(predicted * 0.9), budget, steps=1)
    assert not fresh_trial(spec, int(predicted * 1.1) + 1, budget, steps=1)
    # AND the CLI prints a prediction for each --target-memory
    proc = cli("profile", "bsfinder.examples:SmallCNN", "--input", "3x32x32", "--batch",
               "16", "--target-memory", "24GiB", "--target-memory", "80GiB")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "predicted for 24.0 GiB: batch" in proc.stdout and "80.0 GiB" in proc.stdout
