"""Activation checkpointing of the model's blocks (``--checkpointing blocks``) and bf16
weights (``--precision bf16-true``): the same gradients, the memory they save measured in
real processes and predicted by the estimate, the user's module left as given, and the
what-if table that compares them."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bsfinder import SpecError, estimate_memory, find_batch_size
from bsfinder.api import WHAT_IF_PRECISIONS, WhatIfRow, estimate_what_if
from bsfinder.core.scaleout import probe_from_estimate, scale_out
from bsfinder.execution.process import check_batch
from bsfinder.workload.blocks import checkpoint_blocks
from bsfinder.workload.loading import parse_input_spec
from bsfinder.workload.step import WorkloadSpec
from tests import models

MiB = 2**20
BLOCKS = "tests.models:ResidualBlocks"
GPT2 = "bsfinder.examples:gpt2"
TOKENS = ["input_ids=64:int64:1000", "labels=64:int64:1000"]


def _gradients(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_checkpointed_blocks_give_the_same_gradients_and_can_be_undone() -> None:
    # GIVEN a model with 4 blocks in a ModuleList, and a copy checkpointed
    torch.manual_seed(0)
    plain = models.ResidualBlocks(width=32)
    checkpointed = copy.deepcopy(plain)
    blocks, undo = checkpoint_blocks(checkpointed)
    assert blocks == 4
    x = torch.randn(8, 32)
    # THEN its gradients are the plain model's
    for a, b in zip(_gradients(plain, x), _gradients(checkpointed, x), strict=True):
        torch.testing.assert_close(a, b)
    # AND a deep copy recomputes its own blocks, not the original's
    twin = copy.deepcopy(checkpointed)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    assert not torch.allclose(twin(x), checkpointed(x))
    # AND undo puts the class's forward back
    undo()
    assert all("forward" not in block.__dict__ for block in checkpointed.blocks)


def test_a_hugging_face_model_uses_its_own_switch_and_it_is_undone() -> None:
    from bsfinder.examples import gpt2

    model = gpt2(n_layer=3)
    blocks, undo = checkpoint_blocks(model)
    assert blocks == 3 and model.is_activation_checkpointing
    undo()
    assert not model.is_activation_checkpointing


@pytest.mark.parametrize(
    ("model", "inputs", "kwargs", "batch"),
    [(BLOCKS, ["256"], {}, 2048), (GPT2, TOKENS, {"n_layer": 4}, 16)],
    ids=["residual-blocks", "gpt2"],
)
def test_checkpointing_saves_memory_in_a_fresh_process_as_the_estimate_predicts(
    model, inputs, kwargs, batch
) -> None:
    # GIVEN one step with and without checkpointing, measured alone in a fresh process
    peaks = {}
    for checkpointing in ("none", "blocks"):
        spec = WorkloadSpec(model=model, model_kwargs=kwargs, checkpointing=checkpointing,
                            inputs=tuple(parse_input_spec(s) for s in inputs))  # fmt: skip
        trial = check_batch(spec, batch, device="cpu", memory_limit_bytes=4096 * MiB)
        assert trial.fits and trial.peak_bytes, trial.error
        est = estimate_memory(model, inputs=inputs, model_kwargs=kwargs, target="cpu",
                              batch_sizes=[batch], checkpointing=checkpointing)  # fmt: skip
        peaks[checkpointing] = (trial.peak_bytes, est.point(batch).peak_bytes)
        # THEN the estimate is within 5% of the measured peak, with checkpointing too
        measured, estimated = peaks[checkpointing]
        assert abs(estimated - measured) <= 0.05 * measured, (checkpointing, peaks)
    # AND checkpointing measurably lowers the peak
    assert peaks["blocks"][0] < 0.8 * peaks["none"][0], peaks


def test_probe_with_checkpointing_finds_a_larger_batch_that_trains_fresh() -> None:
    budget = 64 * MiB
    options = {"device": "cpu", "memory_limit": budget, "warmup_steps": 1, "steps": 1}
    found = {
        ck: find_batch_size(BLOCKS, input_shape=(256,), checkpointing=ck, **options)
        for ck in ("none", "blocks")
    }
    plain, checkpointed = found["none"], found["blocks"]
    assert checkpointed.workload["checkpointing"] == "blocks"
    assert checkpointed.workload["checkpointed_blocks"] == 4
    assert plain.max_batch and checkpointed.max_batch
    assert checkpointed.max_batch > 2 * plain.max_batch, (plain.max_batch, checkpointed.max_batch)
    # AND the batch to train with, the safe one, trains in a fresh process. (The largest is
    # the edge in the probe's own worker: a fresh process's address space starts a fraction
    # of a MiB apart, and the full suite beside another worker failed it by one 1 MiB
    # allocation at 2304 of 64 MiB; the 5% headroom is for that.)
    safe = checkpointed.recommendations.safe_batch
    assert safe is not None and plain.max_batch < safe < checkpointed.max_batch
    spec = WorkloadSpec(model=BLOCKS, inputs=(parse_input_spec("256"),), checkpointing="blocks")
    trial = check_batch(spec, safe, device="cpu", memory_limit_bytes=budget)
    assert trial.fits, trial.error


def test_an_inline_probe_leaves_the_users_module_as_given() -> None:
    # GIVEN the user's own module, probed in this process with both changes to the model
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = find_batch_size(model, input_shape=(16,), device="cpu", memory_limit="128MiB",
                             isolation="inline", precision="bf16-true", checkpointing="blocks",
                             max_batch=64)  # fmt: skip
    assert result.max_batch == 64
    # THEN its weights, buffers, dtypes and forward are as they were
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert all("forward" not in m.__dict__ for m in model)


def test_bad_checkpointing_is_one_clear_error(cli) -> None:
    with pytest.raises(SpecError, match="no blocks to checkpoint"):
        estimate_memory(torch.nn.Linear(4, 4), input_shape=(4,), target="cpu",
                        batch_sizes=[2], checkpointing="blocks")  # fmt: skip
    with pytest.raises(SpecError, match="checkpointing"):
        find_batch_size(train_step=models.train_step, checkpointing="blocks", device="cpu",
                        memory_limit="64MiB")  # fmt: skip
    with pytest.raises(SpecError, match="checkpointing"):
        estimate_memory(BLOCKS, input_shape=(256,), batch_sizes=[2], checkpointing="layers")
    bad = cli("estimate", BLOCKS, "--input", "256", "--batch", "2", "--checkpointing", "all")
    assert bad.returncode == 2 and "--checkpointing" in bad.stderr


def test_bf16_true_halves_the_state_and_trains() -> None:
    # GIVEN the same model with float32 and with bf16 weights
    states = {}
    for precision in ("32", "bf16-true"):
        est = estimate_memory(BLOCKS, input_shape=(256,), target="cpu", batch_sizes=[32],
                              precision=precision)  # fmt: skip
        states[precision] = est.state_bytes
    # THEN weights, gradients and optimizer state take half the bytes
    for kind in ("weights", "gradients"):
        assert states["bf16-true"][kind] * 2 == states["32"][kind]
    # (AdamW's step counters, one float32 per parameter tensor, stay float32)
    tensors = len(list(models.ResidualBlocks().parameters()))
    assert states["bf16-true"]["optimizer_state"] * 2 - states["32"]["optimizer_state"] == (
        4 * tensors
    )
    # AND real steps train in it, in a fresh process
    spec = WorkloadSpec(model=BLOCKS, inputs=(parse_input_spec("256"),), precision="bf16-true")
    trial = check_batch(spec, 32, device="cpu", memory_limit_bytes=256 * MiB)
    assert trial.fits, trial.error


def test_what_if_table_orders_the_planning_questions(cli, tmp_path) -> None:
    # GIVEN the what-if table of a model with blocks, from the CLI (exact by default)
    out = tmp_path / "what-if.json"
    proc = cli("estimate", BLOCKS, "--input", "256", "--target", "cpu", "--target-memory",
               "64MiB", "--what-if", "--ranks", "4", "--no-scratch",
               "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "<- as given" in proc.stdout and "FSDP x4" in proc.stdout
    assert proc.stderr.count("tracing") == 6  # progress, a line per estimate
    data = json.loads(out.read_text())
    assert data["kind"] == "estimate-what-if"
    rows = [WhatIfRow(**r) for r in data["rows"]]
    # THEN a line per precision, each without and with checkpointing
    assert [(r.precision, r.checkpointing) for r in rows] == [
        (p, c) for p in WHAT_IF_PRECISIONS for c in ("none", "blocks")
    ]
    by = {(r.precision, r.checkpointing): r for r in rows}
    plain = by["32", "none"]
    assert all(r.error is None and r.max_batch for r in rows)
    # AND checkpointing trains more; bf16 weights halve the state; DDP adds gradient buckets
    assert by["32", "blocks"].max_batch > 2 * plain.max_batch
    assert by["bf16-true", "none"].state_bytes < 0.6 * plain.state_bytes
    assert plain.ddp_max_batch < plain.max_batch <= plain.fsdp_max_batch
    # AND the API gives the same line (one estimate here: the first)
    first = estimate_memory(BLOCKS, inputs=["256"], target="cpu", target_memory="64MiB",
                            granularity=1, kernel_scratch=False)  # fmt: skip
    assert first.max_batch == plain.max_batch
    bad = cli("estimate", BLOCKS, "--input", "256", "--target-memory", "64MiB", "--what-if",
              "--batch", "4")  # fmt: skip
    assert bad.returncode == 2 and "--what-if" in bad.stderr
    with pytest.raises(SpecError, match="ranks"):
        estimate_what_if(BLOCKS, inputs=["256"], target_memory="64MiB", ranks=0)
    with pytest.raises(SpecError, match="needs the target's memory"):
        estimate_what_if(BLOCKS, inputs=["256"])
    with pytest.raises(SpecError, match="sets precision itself"):
        estimate_what_if(BLOCKS, inputs=["256"], target_memory="64MiB", precision="bf16-true")


def test_scale_out_from_an_estimate_gathers_the_largest_block() -> None:
    est = estimate_memory(BLOCKS, input_shape=(256,), target="cpu", target_memory="64MiB",
                          kernel_scratch=False)  # fmt: skip
    plan = scale_out(probe_from_estimate(est.to_dict()), "fsdp", 4)
    block = 256 * 1024 * 2 * 4 + (1024 + 256) * 4  # one block's weights and biases, float32
    assert plan.terms["gathered_block"] == block


def test_the_range_test_and_the_noise_scale_run_with_bf16_weights() -> None:
    from bsfinder.lr import find_lr
    from bsfinder.noise.data import noise_on_data

    # GIVEN the closed-form regression, swept with bf16 weights and inputs
    found = find_lr("tests.models:fixed_regression_model", "tests.models:fixed_regression_loader",
                    batch_size=512, optimizer="sgd", isolation="inline", precision="bf16-true",
                    start_lr=1e-4, end_lr=10.0, steps=60)  # fmt: skip
    # THEN the sweep descends and diverges as in float32, and suggests an LR
    assert found.curve.stopped == "diverged" and found.lr is not None
    # AND the noise scale measures (under bf16 autocast, on the module as given)
    scale = noise_on_data("tests.models:fixed_regression_model",
                          "tests.models:fixed_regression_loader", micro_batch=16,
                          precision="bf16-true")  # fmt: skip
    assert scale.b_simple is not None


def test_the_range_test_with_checkpointed_blocks_sees_the_same_losses() -> None:
    from bsfinder.lr import find_lr

    model, loader = "examples.digits:DigitsNet", "examples.digits:make_loader"
    options = {"batch_size": 64, "optimizer": "sgd", "isolation": "inline", "steps": 40}
    plain = find_lr(model, loader, **options)
    checkpointed = find_lr(model, loader, checkpointing="blocks", **options)
    assert checkpointed.curve.losses == pytest.approx(plain.curve.losses, rel=1e-5)
    with pytest.raises(SpecError, match="checkpointing"):
        find_lr(model, loader, checkpointing="layers", **options)
