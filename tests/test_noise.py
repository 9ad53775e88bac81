"""The gradient noise scale: the unbiased micro-batch estimator against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from bsfinder import SpecError
from bsfinder.noise.scale import GradientNoise, measure_noise_scale, noise_scale_from_groups
from tests.models import regression_batch, regression_loader, regression_model

DIM, SIGMA, DELTA = 16, 1.0, 1.0
# B_simple = (d (|delta|^2 + sigma^2) + |delta|^2) / |delta|^2 (tests.models.LinearRegression)
TRUE_B = (DIM * (DELTA**2 + SIGMA**2) + DELTA**2) / DELTA**2  # 33


def _loss(model, batch):
    return model(*batch)


def test_group_statistics_invert_exactly() -> None:
    # GIVEN the expected A and C of k micro-batches of b samples for known |G|^2 and tr(Sigma)
    g2, tr, b, k = 2.0, 300.0, 8, 4
    a, c = g2 + tr / b, g2 + tr / (b * k)
    found = noise_scale_from_groups([(a, c)] * 3, micro_batch=b, micro_batches=k)
    # THEN the estimator gives them back, and B_simple = tr / |G|^2
    assert found.grad_sq_norm == pytest.approx(g2) and found.trace == pytest.approx(tr)
    assert found.b_simple == pytest.approx(150.0) and found.low == found.high == found.b_simple
    # a gradient all noise (|G|^2 estimated <= 0) is an infinite noise scale, not a negative
    assert (
        noise_scale_from_groups([(5.0, 1.0)], micro_batch=1, micro_batches=2).b_simple == math.inf
    )
    with pytest.raises(SpecError, match="2 micro-batches"):
        noise_scale_from_groups([(a, c)], micro_batch=b, micro_batches=1)


def test_recovers_the_closed_form_noise_scale_of_linear_regression() -> None:
    # GIVEN linear regression with Gaussian inputs and noise, whose B_simple is 33
    model = regression_model(DIM, DELTA)
    found = measure_noise_scale(model, regression_loader(32, dim=DIM, sigma=SIGMA), _loss,
                                micro_batch=32, micro_batches=4, groups=200,
                                time_budget_s=None)  # fmt: skip
    # THEN the 95% interval holds the true value and the estimate is within 15% of it
    assert found.low <= TRUE_B <= found.high, found
    assert abs(found.b_simple - TRUE_B) / TRUE_B < 0.15, found
    assert found.grad_sq_norm == pytest.approx(DELTA**2, rel=0.15)
    assert found.groups == 200 and len(found.estimates) == 200 and found.seconds > 0
    assert "grows as the loss falls" in found.note
    # AND the model is as it was: weights, no gradients, hooks gone
    assert model.w[0].item() == DELTA and model.w.grad is None
    assert not model.w._backward_hooks


def test_amp_scale_is_removed_and_overflowed_micro_batches_are_skipped() -> None:
    # GIVEN the same micro-batches, once plain and once with the loss scaled by 2^10
    results = []
    for scale in (1.0, 1024.0):
        model = regression_model(DIM, DELTA)
        noise = GradientNoise(model, micro_batch=16, ema=0.5)
        data = regression_loader(16, dim=DIM, sigma=SIGMA, seed=1)
        for _ in range(5):
            for _ in range(3):
                with noise.micro_batch(scale=scale):
                    (model(*next(data)) * scale).backward()
                model.zero_grad(set_to_none=True)
            # AND an overflowed micro-batch in every group (as fp16 AMP produces)
            with noise.micro_batch(scale=scale):
                (model(*next(data)) * math.inf).backward()
            model.zero_grad(set_to_none=True)
            noise.end_group()
        results.append((noise.b_simple, noise.result()))
        noise.close()
    (plain, plain_result), (scaled, scaled_result) = results
    # THEN the estimates agree and the overflowed micro-batches are counted, not used
    assert plain == pytest.approx(scaled, rel=1e-5) and 0 < plain < math.inf
    assert plain_result.b_simple == pytest.approx(scaled_result.b_simple, rel=1e-5)
    assert plain_result.skipped == 5 and plain_result.micro_batches == 3


def test_too_little_data_is_a_clear_error() -> None:
    model = regression_model(DIM, DELTA)
    few = [next(regression_loader(8)) for _ in range(5)]  # one group of 4, and one left over
    with pytest.raises(SpecError, match="needs at least 2"):
        measure_noise_scale(model, few, _loss, micro_batch=8, micro_batches=4)
    assert model.w.grad is None


def test_noise_on_data_loads_a_checkpoint_into_a_copy(tmp_path) -> None:
    from bsfinder.noise.data import noise_on_data

    # GIVEN a checkpoint at |delta| = 2, where B_simple = (16 (4 + 1) + 4) / 4 = 21
    path = tmp_path / "ck.pt"
    torch.save({"model": regression_model(DIM, 2.0).state_dict()}, path)
    model = regression_model(DIM, DELTA)
    found = noise_on_data(model, "tests.models:regression_loader", micro_batch=64,
                          checkpoint=path)  # fmt: skip
    assert found.low <= 21 <= found.high and "checkpoint" in found.note
    assert model.w[0].item() == DELTA  # the user's model was not loaded into
    with pytest.raises(SpecError, match="does not match"):
        torch.save({"w": torch.zeros(3)}, path)
        noise_on_data(model, "tests.models:regression_loader", micro_batch=8, checkpoint=path)

    class Logits(torch.nn.Module):  # returns predictions, not a loss
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(DIM, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    with pytest.raises(SpecError, match="real loss"):
        noise_on_data(Logits(), "tests.models:regression_loader", micro_batch=8)

    def small_data(batch_size: int):  # a loader that refuses batches past its data set
        raise ValueError(f"batch_size must be in [1, 100], not {batch_size}")

    with pytest.raises(SpecError, match=r"data loader make_loader\(256\) raised ValueError"):
        noise_on_data(model, small_data, micro_batch=256)


def test_probe_with_data_recommends_by_noise_scale(cli, tmp_path) -> None:
    from bsfinder import ProbeResult, find_batch_size

    # GIVEN linear regression (B_simple = 33) probed with its data and a global batch to plan
    options = {
        "model_kwargs": {"dim": DIM, "delta": DELTA},
        "make_batch": regression_batch,
        "device": "cpu",
        "memory_limit": "128MiB",
        "max_batch": 256,
        "optimizer": "sgd",
        "base_lr": 0.1,
        "base_batch": 32,
        "global_batch": 1024,
    }
    result = find_batch_size("tests.models:regression_model", **options,
                             data="tests.models:regression_loader")  # fmt: skip
    rec = result.recommendations
    # THEN the noise scale is measured on the data, and decides the batch and the LR rule
    assert rec.noise_scale is not None and 15 < rec.noise_scale["b_simple"] < 70
    assert rec.time_optimal_basis == "noise-scale"
    low, high = rec.time_optimal_range
    assert low <= rec.time_optimal_batch <= high
    # (the LR is the range test's at that batch, the noise-capped scaling kept beside it; the
    # batch moves with the timing, and at a small one the curve can show no clear descent:
    # then the scaled reference is the LR, and lr_range says so)
    assert rec.lr_range is not None and rec.lr_range["reference"]["rule"] == "noise"
    kept = rec.lr_range["recommended"] == "reference"
    assert rec.learning_rate.rule == ("noise" if kept else "range-test"), rec.lr_range["why"]
    assert rec.plans[0]["global_batch"] == 1024
    assert ProbeResult.from_json(result.to_json()) == result
    # AND bad data fails before any trial, in one line
    with pytest.raises(SpecError, match="no attribute"):
        find_batch_size("tests.models:regression_model", **options, data="tests.models:nope")
    with pytest.raises(SpecError, match="no such file"):
        find_batch_size("tests.models:regression_model", **options,
                        data="tests.models:regression_loader",
                        checkpoint=tmp_path / "x.pt")  # fmt: skip
    # AND the CLI prints the noise scale and the plan
    proc = cli("probe", "tests.models:regression_model", "--model-kwargs", '{"delta": 1.0}',
               "--input", "16", "--input", "1", "--data", "tests.models:regression_loader",
               "--optimizer", "sgd", "--base-lr", "0.1", "--base-batch", "32", "--max-batch",
               "128", "--memory-limit", "128MiB", "--global-batch", "512", "--json",
               str(tmp_path / "r.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "noise scale           : B_simple" in proc.stdout and "grows" in proc.stdout
    assert "global batch 512" in proc.stdout and "measuring the gradient noise" in proc.stderr


def test_ctrl_c_while_measuring_keeps_the_probe(monkeypatch) -> None:
    import bsfinder.noise.data
    from bsfinder import find_batch_size

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bsfinder.noise.data, "noise_on_data", interrupted)
    result = find_batch_size("tests.models:regression_model", make_batch=regression_batch,
                             device="cpu", memory_limit="128MiB", max_batch=32,
                             data="tests.models:regression_loader")  # fmt: skip
    assert result.interrupted and result.max_batch == 32 and result.trials
    assert result.recommendations.noise_scale is None
    assert any("interrupted" in note for note in result.notes)


def test_groups_of_different_sizes_use_their_own_k() -> None:
    # GIVEN two groups with the same |G|^2 = 2 and tr(Sigma) = 300 at b = 8, one of k = 4
    # micro-batches and one of k = 2 (an overflowed micro-batch dropped from it)
    g2, tr, b = 2.0, 300.0, 8
    groups = [(g2 + tr / b, g2 + tr / (b * k), k) for k in (4, 2)]
    found = noise_scale_from_groups(groups, micro_batch=b, micro_batches=4)
    # THEN each group is unbiased on its own, so together they still give tr / |G|^2
    assert found.b_simple == pytest.approx(150.0) and found.micro_batches == 4
