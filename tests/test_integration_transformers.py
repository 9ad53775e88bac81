"""bsfinder.integrations.transformers: a Trainer's per-device train and eval batches, end to
end on CPU under a real budget, checked by ``trainer.train()`` in fresh processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bsfinder.errors import SpecError
from bsfinder.integrations.transformers import (
    BsfinderCallback,
    describe_fit,
    fit_trainer_batch_size,
    plan_per_device,
)

pytest.importorskip("transformers")

BUDGET = 96 * 2**20

#: a tiny GPT-2 from a config, a word-level tokenizer built in memory, variable-length samples
WORKLOAD = """
import random

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
    Trainer, TrainingArguments,
)

VOCAB = 1000


def tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def samples(tok, count, seed):
    rng = random.Random(seed)
    words = lambda: " ".join(f"w{rng.randrange(VOCAB - 2)}" for _ in range(rng.randint(4, 32)))
    return [dict(tok(words())) for _ in range(count)]


def trainer(out, per_device=16, accumulation=32, eval_batch=8, max_steps=2, callbacks=None,
            **extra):
    tok = tokenizer()
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, per_device_eval_batch_size=eval_batch,
        max_steps=max_steps, eval_strategy="steps", eval_steps=max_steps,
        prediction_loss_only=True, use_cpu=True, save_strategy="no", report_to=[],
        disable_tqdm=True, logging_strategy="no", **extra,
    )
    return Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=samples(tok, 256, 0),
        eval_dataset=samples(tok, 64, 1),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=callbacks,
    )
"""

#: trains (and evaluates at its last step) in a fresh process under the budget
CHECK = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import hf_workload as w
out, per_device, accumulation, eval_batch, budget = sys.argv[2], *map(int, sys.argv[3:7])
# lazy imports and one-time set-up before the limit, as bsfinder's worker does
w.trainer(out, per_device=2, accumulation=1, eval_batch=2, max_steps=1).train()
gc.collect()
from bsfinder.devices.cpu import CpuBackend
CpuBackend().apply_budget(budget)
try:
    t = w.trainer(out, per_device=per_device, accumulation=accumulation, eval_batch=eval_batch)
    t.train()
    row = {"fits": True, "train_batch": t._train_batch_size,
           "eval_batch": t.args.eval_batch_size, "steps": t.state.global_step}
except BaseException as exc:
    text = f"{type(exc).__name__}: {exc}"
    oom = isinstance(exc, MemoryError) or "alloc" in text or "memory" in text.lower()
    row = {"fits": False, "oom": oom, "error": text[:300]}
print("RESULT " + json.dumps(row))
"""


def _workload(tmp: Path) -> Any:
    (tmp / "hf_workload.py").write_text(textwrap.dedent(WORKLOAD))
    spec = importlib.util.spec_from_file_location("hf_workload", tmp / "hf_workload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trains(tmp: Path, per_device: int, accumulation: int, eval_batch: int) -> dict[str, Any]:
    from bsfinder.devices.cpu import allocator_env

    (tmp / "check.py").write_text(CHECK)
    args = [str(tmp), str(tmp / "out"), str(per_device), str(accumulation), str(eval_batch)]
    proc = subprocess.run(
        [sys.executable, str(tmp / "check.py"), *args, str(BUDGET)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **allocator_env()},
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


def test_the_batch_it_sets_trains_in_a_fresh_trainer_and_the_global_batch_is_kept(
    tmp_path: Path,
) -> None:
    # GIVEN a Trainer configured for 16 per device x 32 accumulation (global batch 512)
    w = _workload(tmp_path)
    trainer = w.trainer(str(tmp_path / "out"))
    # WHEN bsfinder fits it to a 96 MiB budget at power-of-two granularity
    fit = fit_trainer_batch_size(
        trainer, memory_limit=BUDGET, granularity="pow2", time_limit=None, isolation="process"
    )
    # THEN the trainer trains with the largest per-device batch that fits, the accumulation
    # making up the rest: the global batch is the user's, and the learning rate unchanged
    per_device, accumulation = fit.per_device_train_batch_size, fit.gradient_accumulation_steps
    assert per_device == fit.train.max_batch and per_device >= 8, fit.train.trials
    assert per_device * accumulation == 16 * 32 and fit.global_batch_kept
    assert (trainer._train_batch_size, trainer.args.gradient_accumulation_steps) == (
        per_device,
        accumulation,
    )
    assert trainer.args.learning_rate == fit.user_learning_rate
    # and the eval batch was searched (with the optimizer's state held: eval_strategy=steps)
    assert fit.eval is not None and fit.per_device_eval_batch_size is not None
    assert fit.per_device_eval_batch_size >= per_device
    assert trainer.args.per_device_eval_batch_size == fit.per_device_eval_batch_size
    assert fit.train.runner["isolation"] == "process"
    # AND a fresh process trains (2 steps, evaluating at the last) with those values under
    # the same budget, while the next size at the granularity does not fit
    ok = _trains(tmp_path, per_device, accumulation, fit.per_device_eval_batch_size)
    assert ok["fits"], ok
    assert (ok["train_batch"], ok["eval_batch"], ok["steps"]) == (
        per_device,
        fit.per_device_eval_batch_size,
        2,
    )
    over = _trains(tmp_path, 2 * per_device, accumulation // 2 or 1, 1)
    assert not over["fits"] and over["oom"], over


def test_the_callback_sets_the_batches_before_train_builds_its_dataloader(tmp_path: Path) -> None:
    # GIVEN a Trainer made with bsfinder's callback (16 per device x 32 accumulation)
    w = _workload(tmp_path)
    callback = BsfinderCallback(memory_limit=BUDGET, granularity="pow2", time_limit=None)
    trainer = w.trainer(str(tmp_path / "out"), max_steps=1, callbacks=[callback])
    # THEN the trainer was fitted as it was made: the values are set where train() reads them
    fit = callback.fit
    assert fit is not None and fit.applied and fit.global_batch_kept
    per_device, accumulation = fit.per_device_train_batch_size, fit.gradient_accumulation_steps
    assert per_device == fit.train.max_batch and per_device > 16, fit.train.trials
    assert (trainer._train_batch_size, trainer.args.gradient_accumulation_steps) == (
        per_device,
        accumulation,
    )
    assert trainer.args.per_device_eval_batch_size == fit.per_device_eval_batch_size
    assert f"-> {per_device}," in describe_fit(fit) and "kept" in describe_fit(fit)
    # AND train() trains on batches of that size, and evaluates (at its one step) at the
    # eval batch found
    seen: list[tuple[bool, int]] = []
    hook = trainer.model.register_forward_pre_hook(
        lambda m, _a, kw: seen.append((m.training, kw["input_ids"].shape[0])), with_kwargs=True
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    assert {size for training, size in seen if training} == {per_device}
    assert {size for training, size in seen if not training} == {fit.per_device_eval_batch_size}
    assert trainer.state.global_step == 1


def test_the_callback_added_after_the_trainer_was_made_stops_train(tmp_path: Path) -> None:
    w = _workload(tmp_path)
    trainer = w.trainer(str(tmp_path / "out"), max_steps=1)
    trainer.add_callback(BsfinderCallback(memory_limit=BUDGET))
    with pytest.raises(SpecError, match=r"added after the Trainer was made.*callbacks="):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_callback_checks_its_options_when_made_and_runs_only_in_a_trainer() -> None:
    with pytest.raises(SpecError, match="granularity"):
        BsfinderCallback(granularity="fast")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="memory"):
        BsfinderCallback(memory_limit="lots")
    with pytest.raises(SpecError, match="sample_size"):
        BsfinderCallback(sample_size=0)
    with pytest.raises(SpecError, match=r"Trainer\(callbacks="):
        BsfinderCallback().on_init_end(None, None, None)


@pytest.mark.parametrize(
    ("per_rank", "max_fit", "keep", "plan"),
    [
        (64, 200, True, (64, 1)),  # all of it fits: no accumulation
        (64, 24, True, (16, 4)),  # the largest divisor that fits
        (96, 40, True, (32, 3)),
        (127, 64, True, (1, 127)),  # a prime: kept exactly, at a cost (noted)
        (64, 24, False, (24, 3)),  # the global batch changes to 72
        (100, 64, False, (64, 2)),
    ],
)
def test_the_plan_keeps_per_device_times_accumulation_unless_told_not_to(
    per_rank: int, max_fit: int, keep: bool, plan: tuple[int, int]
) -> None:
    assert plan_per_device(per_rank, max_fit, keep_global_batch=keep) == plan


def test_a_plan_from_nothing_is_an_error() -> None:
    with pytest.raises(SpecError, match="must be >= 1"):
        plan_per_device(64, 0)


def test_a_collator_without_labels_is_refused_before_any_trial(tmp_path: Path) -> None:
    from transformers import DataCollatorWithPadding

    w = _workload(tmp_path)
    trainer = w.trainer(str(tmp_path / "out"))
    trainer.data_collator = DataCollatorWithPadding(w.tokenizer())
    with pytest.raises(SpecError, match=r"no labels: the model returns no loss"):
        fit_trainer_batch_size(trainer, memory_limit=BUDGET)
    assert trainer.args.per_device_train_batch_size == 16  # untouched


def test_a_trainer_without_train_data_is_refused(tmp_path: Path) -> None:
    w = _workload(tmp_path)
    trainer = w.trainer(str(tmp_path / "out"))
    trainer.train_dataset = None
    with pytest.raises(SpecError, match="no train_dataset"):
        fit_trainer_batch_size(trainer, memory_limit=BUDGET)


def test_batches_are_built_from_the_longest_samples_by_the_trainers_collator(
    tmp_path: Path,
) -> None:
    from bsfinder.integrations.transformers import _collator, _samples

    w = _workload(tmp_path)
    trainer = w.trainer(str(tmp_path / "out"))
    picked = _samples(trainer, trainer.train_dataset, "training", 32)
    lengths = [len(s["input_ids"]) for s in picked]
    assert lengths == sorted(lengths, reverse=True) and len(picked) == 32
    longest = max(len(s["input_ids"]) for s in trainer.train_dataset)
    batch = _collator(trainer, "training")(picked[:4])
    assert batch["input_ids"].shape[1] == lengths[0] and "labels" in batch
    assert lengths[0] >= longest - 4  # evenly spaced over the data: near its longest


# -- a Hugging Face datasets.Dataset ---------------------------------------------------------
def _hf_dataset(w: Any, count: int, seed: int) -> Any:
    """The workload's samples as a ``datasets.Dataset``, with a ``text`` column the model
    does not take (Trainer removes it; a probe must too, or fail saying so)."""
    datasets = pytest.importorskip("datasets")
    rows = w.samples(w.tokenizer(), count, seed)
    return datasets.Dataset.from_list([{**row, "text": "unused"} for row in rows])


def test_a_datasets_dataset_in_the_trainer_is_sampled_without_its_unused_columns(
    tmp_path: Path,
) -> None:
    from bsfinder.integrations.transformers import _collator, _samples

    w = _workload(tmp_path)
    trainer = w.trainer(str(tmp_path / "out"))
    trainer.train_dataset = _hf_dataset(w, 256, 0)
    picked = _samples(trainer, trainer.train_dataset, "training", 32)
    assert len(picked) == 32 and all("text" not in s for s in picked)
    lengths = [len(s["input_ids"]) for s in picked]
    assert lengths == sorted(lengths, reverse=True)
    batch = _collator(trainer, "training")(picked[:4])
    assert set(batch) >= {"input_ids", "attention_mask", "labels"} and "text" not in batch
    assert batch["input_ids"].shape == (4, lengths[0])


def test_find_batch_size_takes_a_datasets_dataset_with_a_padding_collator(tmp_path: Path) -> None:
    from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel

    from bsfinder import find_batch_size

    w = _workload(tmp_path)
    data = _hf_dataset(w, 128, 0).remove_columns("text")
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=w.VOCAB, n_positions=32, pad_token_id=0
    )
    result = find_batch_size(
        GPT2LMHeadModel(config), batches=data, memory_limit=BUDGET, max_batch=64,
        collate_fn=DataCollatorForLanguageModeling(w.tokenizer(), mlm=False),
        time_limit=None,
    )  # fmt: skip
    assert result.max_batch == 64  # the data's longest 64 samples, padded, fit in 96 MiB
    assert all(t.fits for t in result.trials)


def test_a_datasets_dataset_with_a_text_column_is_an_error_naming_it(tmp_path: Path) -> None:
    from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel

    from bsfinder import find_batch_size

    w = _workload(tmp_path)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=w.VOCAB, n_positions=32)
    with pytest.raises(SpecError, match=r"hold text in 'text'.*remove_columns\(\['text'\]\)"):
        find_batch_size(
            GPT2LMHeadModel(config), batches=_hf_dataset(w, 16, 0), memory_limit=BUDGET,
            collate_fn=DataCollatorForLanguageModeling(w.tokenizer(), mlm=False),
        )  # fmt: skip
