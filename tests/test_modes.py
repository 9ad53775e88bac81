"""``mode``: the largest evaluation (no_grad) and inference (inference_mode) batch, probed in
real processes under a real budget, and a step that really runs without gradients."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bsfinder import find_batch_size
from bsfinder.errors import SpecError
from bsfinder.workload.loading import parse_input_spec
from bsfinder.workload.step import STEPS_TO_PEAK, Workload, WorkloadSpec
from tests.conftest import invoke_cli


class TinyLM(nn.Module):
    """Token ids -> logits over a large vocabulary: the logits dominate a step's memory, so
    the eval step's loss (a log-softmax as large as the logits) costs what inference does
    not."""

    def __init__(self, vocab: int = 4096, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def _probe(mode: str) -> object:
    return find_batch_size(
        TinyLM(),
        inputs=["64:int64:4096"],
        loss="cross-entropy",
        mode=mode,
        device="cpu",
        memory_limit="256MiB",
        granularity=8,
        time_limit=None,
    )


def test_infer_fits_more_than_eval_and_eval_more_than_train() -> None:
    """Real probes, each trial in a fresh process under 256 MiB: training keeps gradients,
    optimizer state and the graph; eval keeps the logits and its loss's log-softmax;
    inference the logits only (measured: 80, 120 and 248 on 2 cores)."""
    train, evaluate, infer = (_probe(m) for m in ("train", "eval", "infer"))
    assert train.max_batch and evaluate.max_batch and infer.max_batch
    assert train.max_batch < evaluate.max_batch < infer.max_batch
    for result, mode in ((train, "train"), (evaluate, "eval"), (infer, "infer")):
        assert result.workload["mode"] == mode
        assert result.recommendations.time_optimal_batch is not None
        assert any(t.fits and t.timed for t in result.trials)  # its own throughput
    assert evaluate.workload["optimizer"] == "none" and infer.workload["loss"] == "none"
    assert train.workload["optimizer"] == "adamw"


class Recorder(nn.Module):
    """Records, per forward, whether gradients and inference mode were on, and its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(
            (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), self.training)
        )
        return self.linear(x)


@pytest.mark.parametrize(
    ("mode", "seen"),
    [
        ("train", (True, False, True)),
        ("eval", (False, False, False)),
        ("infer", (False, True, False)),
    ],
)
def test_the_step_runs_in_its_mode(mode: str, seen: tuple[bool, bool, bool]) -> None:
    model = Recorder()
    spec = WorkloadSpec(inputs=(parse_input_spec("4"),), mode=mode, loss="mean")
    workload = Workload(spec, "cpu", model=model)
    workload.load()
    workload.build()
    workload.begin_trial()
    workload.step(workload.make_batch(3))
    assert model.seen == [seen]
    # no optimizer, and no gradient anywhere, outside training
    assert (workload.optimizer is None) == (mode != "train")
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none) or none
    workload.end_trial()


@pytest.mark.slow  # 27 s a mode on 2 cores: three fresh trial processes
@pytest.mark.parametrize("mode", ["eval", "infer"])
def test_steps_to_peak_hold_without_gradients(mode: str) -> None:
    """STEPS_TO_PEAK holds for eval and infer: a trial's peak after 2 steps (each trial in a
    fresh process) is within 1 MiB of its peak after 5, and after 1 step it is short
    (measured: 4 MiB short at batch 64), though no gradient or optimizer state appears."""
    from bsfinder.execution.process import ProcessRunner

    spec = WorkloadSpec(
        model="bsfinder.examples:SmallCNN", inputs=(parse_input_spec("3x32x32"),), mode=mode
    )

    def peak(warmup: int) -> int:
        runner = ProcessRunner(
            spec, device="cpu", memory_limit_bytes=2**30, warmup_steps=warmup, steps=1
        )
        try:
            runner.start()
            trial = runner.run_trial(64, timed=True)
        finally:
            runner.close()
        assert trial.fits and trial.peak_bytes
        return trial.peak_bytes

    one, enough, five = peak(0), peak(STEPS_TO_PEAK - 1), peak(4)
    assert STEPS_TO_PEAK == 2
    assert enough >= five - 2**20
    assert one < enough - 2**20


def test_a_train_step_has_no_mode() -> None:
    with pytest.raises(SpecError, match="train_step runs what it runs"):
        find_batch_size(train_step=lambda b: None, mode="eval", device="cpu")


def test_the_cli_flag_probes_eval_and_skips_the_learning_rate(tmp_path) -> None:
    out = tmp_path / "r.json"
    done = invoke_cli(
        "probe", "tests.test_modes:TinyLM", "--input", "64:int64:4096", "--mode", "eval",
        "--loss", "cross-entropy", "--memory-limit", "256MiB", "--max-batch", "32",
        "--base-lr", "1e-3", "--base-batch", "8", "--quiet", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["workload"]["mode"] == "eval"
    assert data["recommendations"]["learning_rate"] is None
    assert any("learning rate (base_lr)" in n and "skipped" in n for n in data["notes"])
    bad = invoke_cli("probe", "tests.test_modes:TinyLM", "--input", "64:int64:4096", "--mode", "x")
    assert bad.returncode == 2 and "train" in bad.stderr and "infer" in bad.stderr
