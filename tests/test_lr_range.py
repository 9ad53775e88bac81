"""The LR range test: its arithmetic, a problem whose divergence is known in closed form,
restoring state, a fresh process that a SIGTERM stops with the curve kept, and the pair
(batch, LR) in a probe with data."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bsfinder.core.lr_range import (
    DEFAULT_RULE,
    MEDIAN_HALF_WIDTH,
    RULES,
    LRCurve,
    diverged,
    smooth,
    suggest,
    sweep,
)
from bsfinder.errors import SpecError, UserCodeError
from bsfinder.lr import find_lr
from tests.models import LinearRegression, fixed_regression_curvature

ROOT = Path(__file__).resolve().parent.parent
REGRESSION = "tests.models:fixed_regression_model"
LOADER = "tests.models:fixed_regression_loader"


# -- arithmetic ---------------------------------------------------------------------------------
def test_the_sweep_is_exponential_from_start_to_end() -> None:
    lrs = sweep(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in itertools.pairwise(lrs))
    with pytest.raises(ValueError):
        sweep(1.0, 0.1, 10)


def test_smoothing_is_bias_corrected_and_divergence_is_4x_the_best() -> None:
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0, 2.0))  # no pull towards 0
    assert smooth([1.0, 3.0], beta=0.5)[1] == pytest.approx((0.25 + 1.5) / 0.75)
    assert not diverged((1.0, 0.5, 1.9)) and diverged((1.0, 0.5, 2.01))
    assert diverged((1.0, math.nan))


def _curve(losses: list[float]) -> LRCurve:
    lrs = sweep(1e-5, 1.0, len(losses))
    return LRCurve(lrs, tuple(losses), smooth(losses), "diverged")


def test_a_flat_loss_or_too_few_steps_give_no_suggestion_saying_why() -> None:
    flat = suggest(_curve([1.0 - 0.001 * i for i in range(60)]))
    assert flat.lr is None and "no clear descent" in flat.reason and "fell" in flat.reason
    early = suggest(_curve([1.0, 0.2, 0.1, *([5.0] * 40)]))
    assert early.lr is None and "lowest at step" in early.reason
    assert set(flat.by_rule) == set(RULES) and all(v is None for v in flat.by_rule.values())


def test_every_rule_stays_below_the_smoothed_minimum() -> None:
    # a loss flat for 30 steps, falling for 40, then diverging
    losses = [2.0] * 30 + [2.0 - 0.04 * i for i in range(40)] + [0.4 * 1.5**i for i in range(8)]
    curve = _curve(losses)
    low = min(range(len(losses)), key=lambda i: curve.smoothed[i])
    for rule in RULES:
        found = suggest(curve, rule)
        assert found.lr is not None and found.lr <= curve.lrs[low], rule
    assert suggest(curve, "minimum/10").lr == pytest.approx(curve.lrs[low] / 10)
    assert DEFAULT_RULE in RULES
    with pytest.raises(ValueError, match="rule 'nope'"):
        suggest(curve, "nope")


def test_the_default_rule_reads_the_raw_minimum_without_the_emas_lag() -> None:
    # GIVEN a loss that falls to its lowest at step 60, then climbs for 20 steps before the
    # sweep stops (the EMA, lagging, is lowest later)
    losses = [2.0 - 0.03 * i for i in range(61)] + [0.2 + 0.05 * i for i in range(1, 31)]
    curve = _curve(losses)
    ema_low = min(range(len(losses)), key=lambda i: curve.smoothed[i])
    assert ema_low >= 70
    # WHEN the default rule reads it
    found = suggest(curve)
    # THEN it is a third of the LR at the raw minimum (within the median's half-width),
    # not at the EMA's
    assert found.rule == DEFAULT_RULE == "minimum/3" and found.index is not None
    assert 60 - MEDIAN_HALF_WIDTH <= found.index <= 60
    assert found.lr == pytest.approx(curve.lrs[found.index] / 3)
    # AND a single wild step does not move the running median's minimum
    spiked = list(losses)
    spiked[30] = 0.0
    assert suggest(_curve(spiked)).index == found.index


def test_the_default_rule_stays_within_3x_of_the_steepest_descent() -> None:
    # GIVEN a loss falling steeply at first, then creeping down for 60 more steps to its
    # lowest (as a noise-free quadratic does past its divergence)
    losses = [2.0] * 10 + [2.0 - 0.15 * i for i in range(12)]
    losses += [0.35 - 0.005 * i for i in range(60)] + [0.06 * 2**i for i in range(1, 8)]
    curve = _curve(losses)
    found = suggest(curve)
    steepest = suggest(curve, "steepest")
    # THEN it is bounded at 3x the (uncapped) steepest point, and says so
    assert "steepest descent" in found.reason and found.lr is not None
    assert found.lr < curve.lrs[found.index] / 3
    assert found.lr <= 3 * curve.lrs[steepest.index] * (1 + 1e-9)


# -- a problem with a known answer ---------------------------------------------------------------
def test_on_linear_regression_no_rule_is_above_the_closed_form_divergence_2_over_L() -> None:
    # GIVEN full-batch gradient descent on 0.5 * mean((Xw - y)^2): it diverges above 2/L,
    # L the largest eigenvalue of X^T X / n (9.15 here: 2/L = 0.219), and never below it
    two_over_l = 2 / fixed_regression_curvature()
    plain_sgd = torch.optim.SGD(LinearRegression(16).parameters(), lr=0.1)  # no momentum
    # WHEN the range test sweeps it
    found = find_lr(
        REGRESSION, LOADER, batch_size=512, optimizer=plain_sgd, isolation="inline",
        start_lr=1e-4, end_lr=10.0, steps=100,
    )  # fmt: skip
    curve = found.curve
    # THEN it stopped because the loss diverged, past 2/L (GD cannot diverge below it)
    assert curve.stopped == "diverged" and curve.lrs[-1] > two_over_l
    # AND every rule's suggestion is below 2/L, the default one included
    assert found.lr is not None and found.suggestion.rule == DEFAULT_RULE
    for rule, lr in found.suggestion.by_rule.items():
        assert lr is not None and lr < two_over_l, (rule, lr, two_over_l)
    # AND the suggested LR trains: 50 steps of plain GD at it lower the loss 100x
    model, x_y = LinearRegression(16), next(iter(_loader()))
    opt = torch.optim.SGD(model.parameters(), lr=found.lr)
    first = float(model(*x_y).detach())
    for _ in range(50):
        opt.zero_grad()
        model(*x_y).backward()
        opt.step()
    assert float(model(*x_y).detach()) < first / 100


def _loader():  # the test's own copy of the data
    from tests.models import fixed_regression_loader

    return fixed_regression_loader(512)


# -- state ---------------------------------------------------------------------------------------
def test_inline_leaves_the_users_model_optimizer_and_rng_as_they_were() -> None:
    model = LinearRegression(16)
    with torch.no_grad():
        model.w.fill_(0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    weights, opt_state = model.w.detach().clone(), json.dumps(opt.state_dict(), default=str)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    found = find_lr(model, LOADER, batch_size=512, optimizer=opt, isolation="inline")
    assert found.curve.lrs and found.optimizer == "AdamW"
    assert torch.equal(model.w, weights) and model.w.grad is None
    assert json.dumps(opt.state_dict(), default=str) == opt_state
    assert torch.equal(torch.get_rng_state(), rng)


def test_process_and_inline_give_the_same_curve() -> None:
    kwargs = {"batch_size": 512, "optimizer": "sgd", "steps": 40, "start_lr": 1e-3}
    seen: dict[str, list[tuple[int, float, float]]] = {"process": [], "inline": []}
    fresh = find_lr(REGRESSION, LOADER, on_step=lambda *a: seen["process"].append(a), **kwargs)
    here = find_lr(
        REGRESSION, LOADER, isolation="inline", on_step=lambda *a: seen["inline"].append(a),
        **kwargs,
    )  # fmt: skip
    assert fresh.isolation == "process" and fresh.curve.losses == here.curve.losses
    # AND each step was reported as it was measured, numbered from 1, in both
    for found, steps in ((fresh, seen["process"]), (here, seen["inline"])):
        assert [s[0] for s in steps] == list(range(1, len(found.curve.lrs) + 1))
        assert tuple(s[1] for s in steps) == found.curve.lrs
        assert tuple(s[2] for s in steps) == found.curve.losses


def test_bad_arguments_and_broken_data_are_clear_errors() -> None:
    with pytest.raises(SpecError, match="at least 20 steps"):
        find_lr(REGRESSION, LOADER, batch_size=8, steps=5)
    with pytest.raises(SpecError, match="optimizer 'lamb'"):
        find_lr(REGRESSION, LOADER, batch_size=8, optimizer="lamb")
    with pytest.raises(SpecError, match="no attribute"):
        find_lr(REGRESSION, "tests.models:nope", batch_size=8)
    with pytest.raises(UserCodeError, match="at batch 4"):
        find_lr("tests.models:BrokenAt", "tests.models:regression_loader", batch_size=4,
                model_kwargs={"at": 1})  # fmt: skip


def test_a_loss_that_does_not_move_gives_no_lr_and_the_reason() -> None:
    found = find_lr("tests.models:ConstantLoss", LOADER, batch_size=8, isolation="inline")
    assert found.lr is None and "no clear descent" in found.suggestion.reason
    assert found.curve.stopped == "end" and len(found.curve.lrs) == 100


# -- the command ----------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "bsfinder", "lr", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_the_cli_prints_the_suggestion_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "lr.json"
    proc = _cli(REGRESSION, "--data", LOADER, "--batch", "512", "--optimizer", "sgd",
                "--json", str(out))  # fmt: skip
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "learning rate :" in stdout and "<- suggestion" in stdout
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and data["lr"] > 0 and data["curve"]["stopped"]


def test_sigterm_keeps_the_steps_measured_and_exits_143(tmp_path: Path) -> None:
    # GIVEN a sweep at 0.1 s per step (100 steps: 10 s)
    out = tmp_path / "lr.json"
    proc = _cli(REGRESSION, "--data", "tests.models:slow_regression_loader", "--batch", "8",
                "--json", str(out))  # fmt: skip
    # WHEN SIGTERM comes a second after the first step (the progress line says when)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("LR range test at batch 8: up to 100 steps"), first
    step = proc.stderr.readline()
    assert step.split()[:2] == ["step", "1/100"], step
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    # THEN it stops, prints and writes what was measured, and exits 128 + SIGTERM
    assert proc.returncode == 143, stderr
    data = json.loads(out.read_text())
    assert data["interrupted"] and data["curve"]["stopped"] == "interrupted"
    assert 0 < len(data["curve"]["lrs"]) < 100
    assert "interrupted" in stdout


# -- in the probe --------------------------------------------------------------------------------
def test_a_probe_with_data_recommends_the_pair_and_keeps_the_scaled_reference() -> None:
    from bsfinder import ProbeResult, find_batch_size

    # one trial, at 64: the time-optimal batch does not move with the machine's timing;
    # the fixed full-batch data and the seeded sweep make the range test's curve the same
    # every run (regression_loader's 0.5 -> 1.0 loss window is too narrow for the EMA: no
    # clear descent, measured)
    result = find_batch_size(
        REGRESSION, make_batch=_regression_batch, device="cpu", memory_limit="128MiB",
        start_batch=64, max_batch=64, optimizer="sgd", base_lr=0.1, base_batch=32,
        data=LOADER,
    )  # fmt: skip
    rec = result.recommendations
    assert rec.learning_rate is not None and rec.learning_rate.rule == "range-test"
    assert rec.lr_range is not None and rec.lr_range["batch_size"] == rec.time_optimal_batch
    assert rec.lr_range["recommended"] == "range-test"
    assert rec.lr_range["reference"]["base_lr"] == 0.1  # the scaled reference, kept
    assert rec.learning_rate.lr == rec.lr_range["lr"]
    assert ProbeResult.from_json(result.to_json()) == result


def _regression_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch_size, 16), torch.randn(batch_size)


def test_a_ctrl_c_inline_keeps_the_steps_so_far() -> None:
    found = find_lr(REGRESSION, "tests.models:interrupted_regression_loader", batch_size=8,
                    isolation="inline")  # fmt: skip
    assert found.interrupted and found.curve.stopped == "interrupted"
    assert len(found.curve.lrs) == 30
