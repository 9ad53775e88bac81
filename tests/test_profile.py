"""The memory profile of one step, on an MLP whose bytes can be computed by hand."""

from __future__ import annotations

import json

import pytest

from bsfinder import profile_memory

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
        device="cpu", isolation=isolation,
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
                       batch_size=8, device="cpu", optimizer="sgd")  # fmt: skip
    assert p.breakdown["optimizer_state"] == PARAM_BYTES


def test_bad_batch_size_is_bad_input() -> None:
    from bsfinder import SpecError

    with pytest.raises(SpecError, match="positive integer"):
        profile_memory("tests.models:mlp", input_shape=(8,), batch_size=0, device="cpu")


def test_cli_profile_table_json_and_timeline_picture(cli, tmp_path) -> None:
    out, png = tmp_path / "profile.json", tmp_path / "step.png"
    proc = cli("profile", "tests.models:mlp", "--model-kwargs", json.dumps(KWARGS),
               "--input", str(WIDTH), "--batch", "64", "--device", "cpu",
               "--json", str(out), "--plot", str(png))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tensor peak by phase: forward" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "batch 64: peak" in proc.stdout and "during the optimizer step" in proc.stdout
    assert "optimizer state" in proc.stdout and "activation memory held" in proc.stdout
    data = json.loads(out.read_text())
    assert data["breakdown"]["weights"] == PARAM_BYTES
    assert sum(data["breakdown"].values()) == data["peak_bytes"]


def test_lazy_imports_of_a_transformers_model_are_not_training_memory() -> None:
    # GIVEN a transformers GPT-2 whose construction and forward import ~287 MiB of modules
    pytest.importorskip("transformers")
    p = profile_memory(
        "bsfinder.examples:gpt2", inputs=["input_ids=64:int64:1000", "labels=64:int64:1000"],
        batch_size=2, device="cpu",
    )  # fmt: skip
    # THEN the worker imported them before the baseline (a rehearsal on the meta device): the
    # measured peak is the step's tensors plus a few MiB, not plus hundreds
    assert p.breakdown["not_tensors"] < 16 * 2**20, p.breakdown
