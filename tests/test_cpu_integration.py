"""End to end on real torch, on CPU, under a real memory budget (RLIMIT_AS in a worker)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from bsfinder import SpecError, UserCodeError, find_batch_size
from bsfinder.core.results import SCHEMA_VERSION
from bsfinder.errors import ModelCrashError
from bsfinder.workload.loading import InputSpec
from bsfinder.workload.step import WorkloadSpec
from tests import models
from tests.conftest import ROOT, fresh_trial

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS budget is Linux"
)

BUDGET = 96 * 2**20
MLP_KWARGS = {"width": 256, "hidden": 1024}


def _probe_and_check_fresh(model: str, kwargs: dict, shape: tuple[int, ...], budget: int) -> None:
    result = find_batch_size(
        model, model_kwargs=kwargs, input_shape=shape, device="cpu", memory_limit=budget,
        warmup_steps=1, steps=1,
    )  # fmt: skip
    rec = result.recommendations
    assert rec.max_batch is not None and rec.max_batch % 8 == 0
    assert rec.first_failure == rec.max_batch + 8
    # THEN a brand-new process trains the found batch, and not one step of granularity more
    spec = WorkloadSpec(model=model, model_kwargs=kwargs, inputs=(InputSpec(shape),))
    assert fresh_trial(spec, rec.max_batch, budget, steps=1)
    assert not fresh_trial(spec, rec.max_batch + 8, budget, steps=1)
    # AND every trial ran real steps, every failure is the real allocator's error
    for t in result.trials:
        assert (t.steps_run == 2) if t.fits else ("DefaultCPUAllocator" in (t.error or ""))
    assert result.workload["allocator_env"]["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert result.workload["allocator_env"]["MKL_DISABLE_FAST_MM"] == "1"
    # AND every trial ran in its own process, from one server
    assert result.runner["trial_processes"] == len(result.trials) + 1  # + the describe child
    assert result.runner["server_starts"] == 1


def test_found_batch_fits_and_next_does_not_each_in_a_fresh_process() -> None:
    # GIVEN a CNN (about 0.9 MiB per sample, so 8 samples are far above the process-to-process
    # noise of the address space: 1 MiB Python arenas before PYTHONMALLOC=malloc, tens of KiB
    # of baseline after) under a 128 MiB budget
    _probe_and_check_fresh("bsfinder.examples:SmallCNN", {}, (3, 32, 32), 128 * 2**20)


@pytest.mark.slow
def test_exact_edge_at_a_fine_granule_in_fresh_processes() -> None:
    # GIVEN an MLP at ~17 KiB per sample: 8 samples are ~140 KiB, close to the noise floor
    _probe_and_check_fresh("tests.models:mlp", MLP_KWARGS, (256,), BUDGET)


def test_model_object_is_bit_identical_after_the_probe() -> None:
    model = models.mlp(64, 128)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    for isolation in ("process", "inline"):
        result = find_batch_size(
            model, input_shape=(64,), device="cpu", memory_limit=BUDGET, max_batch=64,
            granularity="pow2", steps=1, isolation=isolation,
        )  # fmt: skip
        assert result.max_batch == 64
        assert result.runner["isolation"] == isolation
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(p.grad is None for p in model.parameters())
        assert not model.training
        assert torch.equal(torch.get_rng_state(), rng)


def test_inline_bn_buffers_restored() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # where the search may not go past batch 1, BatchNorm's one-sample error stays
    with pytest.raises(UserCodeError, match=r"use a batch of 2 or more"):
        find_batch_size(model, input_shape=(8,), device="cpu", memory_limit=BUDGET,
                        max_batch=1, isolation="inline")  # fmt: skip
    # otherwise the probe starts again at 2 by itself (tests/test_batchnorm_start.py)
    result = find_batch_size(model, input_shape=(8,), device="cpu", memory_limit=BUDGET,
                             max_batch=4, granularity="pow2", steps=1,
                             isolation="inline")  # fmt: skip
    assert result.max_batch == 4 and result.trials[0].batch_size == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running stats and num_batches_tracked too


def test_user_train_step_runs_in_a_worker_when_asked() -> None:
    result = find_batch_size(
        train_step=models.train_step, device="cpu", memory_limit=256 * 2**20, max_batch=256,
        granularity="pow2", steps=1, isolation="process",
    )  # fmt: skip
    assert result.runner["isolation"] == "process"
    assert result.max_batch == 256
    assert all(t.steps_run == 2 for t in result.trials)


def test_train_step_closure_leaves_the_weights_it_trains_as_found() -> None:
    # GIVEN a closure that trains a layer with SGD, lr 0.1, and no model= passed
    layer = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in layer.parameters()]

    def step(batch_size: int) -> None:
        layer(torch.randn(batch_size, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    result = find_batch_size(train_step=step, optimizer=opt, device="cpu", memory_limit=BUDGET,
                             max_batch=8, granularity="pow2", steps=1)  # fmt: skip
    # THEN it ran in-process (auto) and the weights and optimizer state are as before
    # the closure travels by value: the trial steps copies, the user's objects are untouched
    assert result.runner["isolation"] == "process" and result.max_batch == 8
    assert result.recommendations.time_optimal_batch is not None
    for p, b in zip(layer.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert opt.state_dict()["state"] == {}


def test_an_optimizer_object_sets_the_family_and_unknown_ones_are_refused() -> None:
    model = models.mlp(16, 32)
    result = find_batch_size(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             input_shape=(16,), device="cpu", memory_limit=BUDGET, max_batch=4,
                             granularity="pow2", steps=1)  # fmt: skip
    assert result.workload["optimizer"] == "sgd"
    with pytest.raises(SpecError, match="models AdamW, Adam and SGD"):
        find_batch_size(model, optimizer=torch.optim.Adagrad(model.parameters()),
                        input_shape=(16,), device="cpu")  # fmt: skip


@pytest.mark.parametrize("bad", [{"max_batch": 10.5}, {"steps": 2.0}, {"start_batch": True}])
def test_non_integer_options_are_bad_input(bad) -> None:
    with pytest.raises(SpecError, match="must be an integer"):
        find_batch_size("tests.models:mlp", input_shape=(8,), device="cpu", **bad)


def test_make_batch_and_dict_outputs() -> None:
    result = find_batch_size(
        models.DictOutput(), make_batch=lambda b: torch.randn(b, 16), device="cpu",
        memory_limit=BUDGET, max_batch=32, granularity="pow2", steps=1,
    )  # fmt: skip
    # a lambda travels to the trial processes by value (cloudpickle)
    assert result.runner["isolation"] == "process"
    assert result.max_batch == 32


def test_non_oom_error_is_the_users_bug_not_nothing_fits() -> None:
    with pytest.raises(UserCodeError, match="ValueError at batch 4: shapes do not line up"):
        find_batch_size(
            "tests.models:BrokenAt", input_shape=(8,), device="cpu", memory_limit=BUDGET
        )


def test_worker_crash_is_the_models_with_its_batch_and_signal() -> None:
    # before: a failed trial, and "largest that fits: 8" (tests/test_robust_isolation.py)
    with pytest.raises(ModelCrashError, match="SIGABRT at batch 16") as caught:
        find_batch_size(
            "tests.models:AbortsAt", input_shape=(8,), device="cpu", memory_limit=BUDGET,
            granularity="pow2", steps=1,
        )  # fmt: skip
    assert caught.value.exit_code == 1


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_model_larger_than_the_budget_fits_nothing_without_made_up_trials(isolation) -> None:
    result = find_batch_size(
        "tests.models:mlp", model_kwargs={"width": 4096, "hidden": 8192}, input_shape=(4096,),
        device="cpu", memory_limit=64 * 2**20, isolation=isolation,
    )  # fmt: skip
    assert result.max_batch is None
    assert result.trials == ()
    assert any(
        "the model itself does not fit" in n and "DefaultCPUAllocator" in n for n in result.notes
    )


def test_cli_end_to_end_small_cnn(cli, tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = cli("probe", "bsfinder.examples:SmallCNN", "--input", "3x32x32",
               "--memory-limit", "96MiB",
               "--steps", "1", "--base-lr", "0.1", "--base-batch", "32", "--optimizer", "sgd",
               "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "largest that fits" in proc.stdout and "time-optimal" in proc.stdout
    assert "learning rate" in proc.stdout and "linear rule" in proc.stdout
    assert "trial  1  batch      1  ✓" in proc.stderr  # progress, per trial
    data = json.loads(out.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["recommendations"]["max_batch"] >= 8
    assert data["device"]["kind"] == "cpu" and data["device"]["budget_bytes"] == 96 * 2**20


def test_cli_time_limit_gives_an_honest_partial_answer_and_exit_0(cli, tmp_path) -> None:
    # GIVEN a budget whose edge (~2,900 at 3x32x32) takes minutes to reach, and 6 s of time
    out = tmp_path / "r.json"
    proc = cli("probe", "bsfinder.examples:SmallCNN", "--input", "3x32x32",
               "--memory-limit", "3GiB", "--time-limit", "6s", "--json", str(out))  # fmt: skip
    # THEN it stops with what it established: exit 0, the summary and the JSON say partial
    assert proc.returncode == 0, proc.stderr
    assert "time limit            : reached after" in proc.stdout
    assert "rerun with a longer --time-limit (or none)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["partial"] is True and data["search"]["stop_reason"] == "time-limit"
    assert data["search"]["time_limit_s"] == 6.0 and data["search"]["next_trial_s"] > 0
    assert data["recommendations"]["max_batch"] >= 1
    assert data["duration_s"] < 6.0 + 10  # the last trial may run past it by its prediction


@pytest.mark.parametrize("bad", ["0s", "-5", "soon", "5 parsecs"])
def test_cli_bad_time_limit_is_bad_input(cli, bad) -> None:
    proc = cli("probe", "bsfinder.examples:SmallCNN", "--input", "3x32x32", "--time-limit", bad)
    assert proc.returncode == 2
    assert "--time-limit" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_gpt2_from_transformers_config(cli, tmp_path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "gpt2.json"
    proc = cli(
        "probe", f"{ROOT}/examples/hf_models.py:gpt2",
        "--model-kwargs", '{"n_layer": 2, "n_embd": 64, "vocab_size": 1000, "n_positions": 64}',
        "--input", "input_ids=64:int64:1000", "--input", "labels=64:int64:1000",
        "--memory-limit", "128MiB", "--steps", "1", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["recommendations"]["max_batch"] >= 8
    assert result["workload"]["inputs"] == ["input_ids=64:int64:1000", "labels=64:int64:1000"]


def test_cli_bert_with_cross_entropy_on_logits(cli, tmp_path) -> None:
    pytest.importorskip("transformers")
    proc = cli(
        "probe", "bsfinder.examples:bert", "--model-kwargs", '{"hidden_size": 64}',
        "--input", "input_ids=32:int64:1000", "--loss", "cross-entropy",
        "--memory-limit", "512MiB", "--max-batch", "16", "--granularity", "pow2", "--steps", "1",
        "--json", "",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "largest that fits     : 16" in proc.stdout
    assert "stopped at --max-batch" in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["nosuchmod:Net", "--input", "3"], "no module named 'nosuchmod'"),
        (["tests.models:mlp", "--input", "3xAx2"], "must be sizes joined by 'x'"),
        (["tests.models:NotAModel", "--input", "3"], "not a torch.nn.Module"),
        (["tests.models:mlp", "--input", "3", "--memory-limit", "lots"], "not a memory size"),
    ],
)
def test_cli_bad_specs_exit_2_with_one_line(cli, args, fragment) -> None:
    proc = cli("probe", *args, "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_user_error_exits_1_without_traceback(cli) -> None:
    proc = cli("probe", "tests.models:BrokenAt", "--input", "8", "--device", "cpu",
               "--memory-limit", "96MiB", "--json", "")  # fmt: skip
    assert proc.returncode == 1
    assert "ValueError at batch 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = cli("probe", "tests.models:BrokenAt", "--input", "8", "--device", "cpu",
                "--memory-limit", "96MiB", "--json", "", "--debug")  # fmt: skip
    assert "Traceback" in debug.stderr and "raise ValueError" in debug.stderr


def test_cli_ctrl_c_stops_cleanly_and_writes_what_was_measured(tmp_path) -> None:
    out = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bsfinder", "probe", "tests.models:mlp", "--input", "512",
         "--device", "cpu", "--memory-limit", "1GiB", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 120
    while "trial  3" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:  # it ended before trial 3: fail on its exit code, not after 120 s
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    assert len(data["trials"]) >= 3
    assert "interrupted" in stdout


def test_cli_devices_lists_the_cpu_with_its_memory(cli) -> None:
    proc = cli("devices")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cpu ") and "total" in proc.stdout and "GiB" in proc.stdout
    listed = json.loads(cli("devices", "--json").stdout)
    assert listed[0]["device"] == "cpu" and listed[0]["total_bytes"] > 0


def test_cli_model_that_does_not_fit_says_so_and_exits_1(cli) -> None:
    proc = cli("probe", "tests.models:mlp", "--model-kwargs", '{"width": 4096, "hidden": 8192}',
               "--input", "4096", "--device", "cpu", "--memory-limit", "64MiB",
               "--json", "")  # fmt: skip
    assert proc.returncode == 1
    assert "nothing fits" in proc.stdout and "the model itself does not fit" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_runs_real_steps_on_cpu(precision) -> None:
    result = find_batch_size(
        "tests.models:mlp", model_kwargs={"width": 64, "hidden": 128}, input_shape=(64,),
        device="cpu", memory_limit=BUDGET, max_batch=16, granularity="pow2", steps=1,
        precision=precision,
    )  # fmt: skip
    assert result.max_batch == 16 and result.workload["precision"] == precision
    assert all(t.steps_run == 2 for t in result.trials)


def test_optimizer_state_is_measured_adamw_over_sgd_over_none() -> None:
    # GIVEN a model whose parameters (6.3 MiB) dwarf its activations at batch 8
    peaks = {}
    for optimizer in ("adamw", "sgd", "none"):
        result = find_batch_size(
            "tests.models:mlp", model_kwargs={"width": 512, "hidden": 1024}, input_shape=(512,),
            device="cpu", memory_limit=BUDGET, start_batch=8, max_batch=8, steps=1,
            optimizer=optimizer,
        )  # fmt: skip
        peaks[optimizer] = result.trial(8).peak_bytes
    # THEN AdamW's two moments cost more than SGD's momentum, which costs more than nothing
    params = (512 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10) * 4
    assert peaks["adamw"] - peaks["sgd"] > 0.8 * params
    assert peaks["sgd"] - peaks["none"] > 0.8 * params


def test_allocator_env_defaults_yield_to_the_users_settings() -> None:
    from bsfinder.devices.cpu import allocator_env

    assert allocator_env({})["MKL_DISABLE_FAST_MM"] == "1"
    assert allocator_env({"MALLOC_ARENA_MAX": "4"})["MALLOC_ARENA_MAX"] == "4"
    # GLIBC_TUNABLES replaces the glibc defaults, not the MKL or CPython ones
    tuned = allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert "MALLOC_ARENA_MAX" not in tuned and "MALLOC_MMAP_THRESHOLD_" not in tuned
    assert tuned["MKL_DISABLE_FAST_MM"] == "1" and tuned["PYTHONMALLOC"] == "malloc"
