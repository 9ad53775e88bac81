"""The step is a real loop's step (outputs released before backward), and an inline
``train_step`` probe leaves every module it reaches as it found it (issue 12, items 4 and 9)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from bsfinder import estimate_memory, find_batch_size, profile_memory
from bsfinder.cli import main
from bsfinder.errors import SpecError
from bsfinder.workload.state import reachable_state

SEQ, VOCAB = 64, 8192
LOGITS_PER_SAMPLE = SEQ * VOCAB * 4
#: a 1-layer Llama whose logits (64 x 8192 x 4 B = 2 MiB a sample) dominate its step; in a
#: file of its own, so that trial and plain-loop processes import only Llama's code
LLAMA_SOURCE = textwrap.dedent(
    f"""
    from transformers import LlamaConfig, LlamaForCausalLM

    SEQ, VOCAB = {SEQ}, {VOCAB}


    def llama():
        config = LlamaConfig(
            num_hidden_layers=1, hidden_size=32, intermediate_size=128, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return LlamaForCausalLM(config)
    """
)
LLAMA_INPUTS = [f"input_ids={SEQ}:int64:{VOCAB}", f"labels={SEQ}:int64:{VOCAB}"]

#: a fresh process training the model with a plain loop, under the budget a trial gets:
#: the same warm-up before the limit as bsfinder's worker (imports, a meta-device forward and
#: backward, a toy AdamW step), then RLIMIT_AS = address space + budget (CpuBackend), then the
#: model is built and trained: loss = model(**b).loss; backward; step; zero_grad
PLAIN_LOOP = textwrap.dedent(
    """
    import importlib.util, sys
    import torch
    from bsfinder.devices.cpu import CpuBackend
    from bsfinder.errors import describe_oom

    path, (batch, budget, steps) = sys.argv[1], map(int, sys.argv[2:])
    spec = importlib.util.spec_from_file_location("llama_model", path)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)

    def make_batch(b, device=None):
        ids = torch.randint(0, models.VOCAB, (b, models.SEQ), device=device)
        return {"input_ids": ids, "labels": torch.randint_like(ids, models.VOCAB)}

    with torch.device("meta"):
        rehearsal = models.llama()
        rehearsal.train()
        rehearsal(**make_batch(2, "meta")).loss.backward()
    del rehearsal
    toy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    toy_opt = torch.optim.AdamW(toy.parameters(), lr=0.0)
    toy(torch.randn(2, 8)).mean().backward()
    toy_opt.step()
    del toy, toy_opt
    CpuBackend().apply_budget(budget)
    try:
        model = models.llama()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        b = make_batch(batch)
        for _ in range(steps):
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    except Exception as exc:
        if describe_oom(exc, under_memory_limit=True) is None:
            raise
        print("oom")
        sys.exit(3)
    print("ok")
    """
)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama") / "llama_model.py"
    path.write_text(LLAMA_SOURCE)
    return path


def _llama() -> Any:
    """The same Llama, as a factory object (for in-process profiles and estimates)."""
    namespace: dict[str, Any] = {}
    exec(LLAMA_SOURCE, namespace)  # the test module's own source
    return namespace["llama"]()


def _plain_loops_fit(
    model_file: Path, result: Any, batches: list[int], budget: int
) -> dict[int, bool]:
    """Whether each batch trains in its own fresh plain-loop process (run side by side)."""
    script = model_file.with_name("plain_loop.py")
    script.write_text(PLAIN_LOOP)
    env = {**os.environ, **result.workload["allocator_env"]}
    steps = result.workload["warmup_steps"] + result.workload["steps"]
    runs = {
        b: subprocess.Popen(
            [sys.executable, str(script), str(model_file), str(b), str(budget), str(steps)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for b in batches
    }
    fits = {}
    for b, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode in (0, 3), err[-2000:]
        fits[b] = run.returncode == 0
    return fits


@pytest.mark.slow
def test_found_batch_trains_in_a_plain_hf_loop_and_one_granule_more_does_not(
    llama_file: Path,
) -> None:
    # GIVEN an HF causal LM that returns its ModelOutput (loss + logits), probed in fresh
    # processes under a CPU budget at granularity 8
    budget = 320 * 2**20
    result = find_batch_size(
        f"{llama_file}:llama", inputs=LLAMA_INPUTS, device="cpu", memory_limit=budget,
        granularity=8, start_batch=8, warmup_steps=1, steps=1,
    )  # fmt: skip
    found = result.max_batch
    assert result.runner["isolation"] == "process" and found and found >= 16
    assert result.workload["keep_outputs"] is False
    # THEN a plain `loss = model(**b).loss` loop in a fresh process trains the found batch
    # under the same budget, and the found batch + 8 does not fit there
    fits = _plain_loops_fit(llama_file, result, [found, found + 8], budget)
    assert fits == {found: True, found + 8: False}, (found, fits)


def test_profile_and_estimate_release_the_outputs_before_backward() -> None:
    # GIVEN the same Llama step at batch 8, outputs released (default) or kept
    batch = 8
    common: dict[str, Any] = {"inputs": LLAMA_INPUTS}
    estimates = {
        keep: estimate_memory(_llama, **common, batch_sizes=[batch], target="cpu",
                              kernel_scratch=False, keep_outputs=keep).point(batch)
        for keep in (False, True)
    }  # fmt: skip
    profiles = {
        keep: profile_memory(_llama, **common, batch_size=batch, device="cpu", isolation="inline",
                             memory_limit="1GiB", scaling=False, keep_outputs=keep)
        for keep in (False, True)
    }  # fmt: skip
    logits = batch * LOGITS_PER_SAMPLE
    # THEN both see the step's tensor peak drop by the logits, at the backward
    estimated = estimates[True].tensor_peak_bytes - estimates[False].tensor_peak_bytes
    profiled = profiles[True].tracked_peak_bytes - profiles[False].tracked_peak_bytes
    assert abs(estimated - logits) < 0.05 * logits, (estimated, logits)
    assert abs(profiled - logits) < 0.05 * logits, (profiled, logits)
    assert estimates[False].peak_phase == profiles[False].peak_phase == "backward"
    # and they agree with each other on the peak itself (both count live tensors)
    for keep in (False, True):
        tracked = profiles[keep].tracked_peak_bytes
        assert abs(estimates[keep].tensor_peak_bytes - tracked) < 0.05 * tracked


def test_the_mean_and_cross_entropy_losses_release_the_outputs_too() -> None:
    # GIVEN a model that returns only logits (no loss of its own): a big last layer
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4096))
    logits = 64 * 4096 * 4
    for loss in ("mean", "cross-entropy"):
        peaks = {
            keep: estimate_memory(model, input_shape=(16,), loss=loss, batch_sizes=[64],
                                  target="cpu", kernel_scratch=False,
                                  keep_outputs=keep).point(64).tensor_peak_bytes
            for keep in (False, True)
        }  # fmt: skip
        # THEN keeping them costs the logits (the losses save no copy of them)
        assert abs(peaks[True] - peaks[False] - logits) < 0.05 * logits, (loss, peaks)


def test_keep_outputs_is_recorded_and_reaches_the_cli(tmp_path: Path, llama_file: Path) -> None:
    out = tmp_path / "e.json"
    args = ["estimate", f"{llama_file}:llama", "--batch", "4",
            "--target", "cpu", "--no-scratch", "--json", str(out)]  # fmt: skip
    for flag in LLAMA_INPUTS:
        args += ["--input", flag]
    peaks = {}
    for keep in (False, True):
        ran = CliRunner().invoke(main, args + (["--keep-outputs"] if keep else []))
        assert ran.exit_code == 0, ran.output
        written = json.loads(out.read_text())
        assert written["workload"]["keep_outputs"] is keep
        peaks[keep] = written["points"][0]["tensor_peak_bytes"]
    assert peaks[True] - peaks[False] > 0.9 * 4 * LOGITS_PER_SAMPLE


def test_keep_outputs_with_a_train_step_is_refused() -> None:
    with pytest.raises(SpecError, match="keep_outputs"):
        find_batch_size(
            train_step=lambda b: None, keep_outputs=True, device="cpu", memory_limit="64MiB",
            max_batch=2, isolation="inline",
        )  # fmt: skip


# -- item 9: an inline train_step probe leaves what it reaches as it found it -------------
def _bn_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4),
    )  # fmt: skip


def test_an_inline_train_step_probe_restores_batchnorm_statistics_and_weights() -> None:
    # GIVEN a BatchNorm model trained by a closure (no model=, no optimizer=), with an LR
    # scheduler, and running statistics that differ from their initial values
    torch.manual_seed(0)
    net = _bn_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    net(torch.randn(4, 3, 8, 8) + 3.0)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()

    def step(batch_size: int) -> None:
        net.train()
        loss = net(torch.randn(batch_size, 3, 8, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    result = find_batch_size(
        train_step=step, device="cpu", memory_limit="256MiB", max_batch=8, granularity="pow2",
        steps=1, isolation="inline",
    )  # fmt: skip
    assert result.runner["isolation"] == "inline" and result.max_batch == 8
    assert result.workload["restored_after_probe"] == {
        "modules": 1, "optimizers": 1, "others": ["StepLR"]
    }  # fmt: skip
    # THEN running mean/var, num_batches_tracked and the weights are as before, the module
    # is back in eval mode, and the optimizer, scheduler and RNG are untouched
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert int(after["1.num_batches_tracked"]) == 1
    assert not any(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert opt.state_dict()["state"] == {} and opt.param_groups[0]["lr"] == 0.1
    assert sched.last_epoch == 0
    assert torch.equal(torch.get_rng_state(), rng)


class _Trainer:
    def __init__(self) -> None:
        self.holder = {"nets": [_bn_net()]}

    def step(self, batch_size: int) -> None:
        self.holder["nets"][0](torch.randn(batch_size, 3, 8, 8)).mean().backward()


GLOBAL_NET = _bn_net()


def _uses_global(batch_size: int) -> None:
    GLOBAL_NET(torch.randn(batch_size, 3, 8, 8)).mean().backward()


def test_reachable_state_follows_closures_globals_methods_defaults_and_partials() -> None:
    a, b, c = _bn_net(), _bn_net(), _bn_net()
    opt = torch.optim.Adam(a.parameters())

    def closure(n: int, default: torch.nn.Module = b) -> None:
        a(torch.randn(n, 3, 8, 8)).sum().backward()
        opt.step()

    trainer = _Trainer()
    cases = {
        "closure and default": (closure, {id(a), id(b)}, 1),
        "global": (_uses_global, {id(GLOBAL_NET)}, 0),
        "bound method, nested containers": (trainer.step, {id(trainer.holder["nets"][0])}, 0),
        "partial": (functools.partial(lambda m, n: m(n), c), {id(c)}, 0),
    }
    for name, (fn, expected, n_optimizers) in cases.items():
        modules, optimizers, _ = reachable_state(fn)
        assert {id(m) for m in modules} == expected, name
        assert len(optimizers) == n_optimizers, name
    # a submodule of a module found is left to its parent
    modules, _, _ = reachable_state((a, a[1]))
    assert modules == [a]


class _TwoBatchStep:
    """A step that trains 2 batches per call (as the Keras integration's ``fit``), 40 ms."""

    batches_per_call = 2

    def __call__(self, batch_size: int) -> None:
        import time

        time.sleep(0.04)


def test_a_step_of_several_batches_is_timed_per_batch() -> None:
    result = find_batch_size(
        train_step=_TwoBatchStep(), device="cpu", memory_limit="256MiB", max_batch=4,
        granularity="pow2", steps=2, isolation="inline", time_limit=None,
    )  # fmt: skip
    timed = [t for t in result.trials if t.step_s]
    assert timed and all(0.018 <= t.step_s <= 0.03 for t in timed), timed  # 40 ms / 2
    assert all(t.samples_per_s == pytest.approx(t.batch_size / t.step_s) for t in timed)


@pytest.mark.parametrize("bad", [0, 1.5, True, "2"])
def test_a_bad_batches_per_call_is_a_spec_error_before_any_trial(bad: object) -> None:
    step = _TwoBatchStep()
    step.batches_per_call = bad  # type: ignore[assignment]
    with pytest.raises(SpecError, match="batches_per_call is"):
        find_batch_size(train_step=step, device="cpu", memory_limit="256MiB", isolation="inline")
