"""bsfinder's ``fit_trainer_batch_size`` against ``Trainer(auto_find_batch_size=True)``, on
the same Trainer under the same CPU memory budget.

    python benchmarks/integration_transformers.py            # ~5 min on 2 cores
    python benchmarks/integration_transformers.py \
        --out benchmarks/results/cpu-integration-transformers.json

The Trainer: a tiny GPT-2 built from a config (2 layers, 64 wide, vocabulary 1000, 32
positions), a word-level tokenizer built in memory, 256 variable-length training samples
(4-32 tokens) and 64 eval samples, ``DataCollatorForLanguageModeling(mlm=False)``, AdamW
(``adamw_torch_fused``, the default), evaluation at the last of ``max_steps=2``.

Every finder runs in its own fresh process; each answer is checked in another. A process
whose training is limited does its lazy imports and one toy ``trainer.train()`` first, then
limits its address space as bsfinder's trial processes do (``CpuBackend.apply_budget``:
``RLIMIT_AS`` = its address space + the budget), with bsfinder's allocator environment, and
builds the model and Trainer under the limit.

- ``hf-auto``: ``per_device_train_batch_size=START``, ``auto_find_batch_size=True``,
  ``trainer.train()`` under the limit. Its answer is the batch it ended up training with
  (``trainer._train_batch_size``); on an out-of-memory error it retries at 0.9x (accelerate's
  ``find_executable_batch_size``), in the same process.
- ``bsfinder`` (granularity 8, the default) and ``bsfinder-g1`` (exact):
  ``fit_trainer_batch_size(trainer, memory_limit=budget, time_limit=None)`` in an unlimited
  process (it forks its own limited trial processes), the user's per-device x accumulation
  ``START`` x 1 kept. Its answer is the largest batch that fits (``fit.train.max_batch``);
  the per-device batch it sets is the largest divisor of ``START`` up to it.

The check: ``trainer.train()`` at the answer (and at the answer + 1, the next exact size)
in a fresh limited process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header
from bsfinder.core.results import write_text_atomic

BUDGET = 96 * 2**20
START = 512  # the per-device batch HF's finder starts from (and bsfinder's kept global batch)
FINDERS = ("hf-auto", "bsfinder", "bsfinder-g1")
VOCAB = 1000
TIMEOUT_S = 900


# -- the Trainer ----------------------------------------------------------------------------
def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _samples(tok: Any, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    texts = [
        " ".join(f"w{rng.randrange(VOCAB - 2)}" for _ in range(rng.randint(4, 32)))
        for _ in range(count)
    ]
    return [dict(tok(text)) for text in texts]


def make_trainer(out: str, per_device: int, max_steps: int = 2, **extra: Any) -> Any:
    from transformers import (
        DataCollatorForLanguageModeling,
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
    )

    tok = _tokenizer()
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, per_device_eval_batch_size=8,
        max_steps=max_steps, eval_strategy="steps", eval_steps=max_steps,
        prediction_loss_only=True, use_cpu=True, save_strategy="no", report_to=[],
        disable_tqdm=True, logging_strategy="no", **extra,
    )  # fmt: skip
    return Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=_samples(tok, 256, 0),
        eval_dataset=_samples(tok, 64, 1),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )  # fmt: skip


# -- the processes --------------------------------------------------------------------------
def _limited(out: str, budget: int) -> None:
    """Lazy imports and a toy run before the limit, then the limit."""
    make_trainer(out, per_device=2, max_steps=1).train()
    gc.collect()
    from bsfinder.devices.cpu import CpuBackend

    CpuBackend().apply_budget(budget)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    out = job["tmp"]
    if job["kind"] == "hf-auto":
        _limited(out, job["budget"])
        started = time.perf_counter()
        trainer = make_trainer(out, per_device=START, auto_find_batch_size=True)
        try:
            trainer.train()
            found, error = trainer._train_batch_size, None
        except BaseException as exc:
            found, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
        return {"found": found, "error": error, "search_s": time.perf_counter() - started}
    if job["kind"].startswith("bsfinder"):
        from bsfinder.integrations.transformers import fit_trainer_batch_size

        started = time.perf_counter()
        trainer = make_trainer(out, per_device=START)
        fit = fit_trainer_batch_size(
            trainer, memory_limit=job["budget"], time_limit=None, isolation="process",
            granularity=1 if job["kind"] == "bsfinder-g1" else 8,
        )  # fmt: skip
        return {
            "found": fit.train.max_batch,
            "per_device_set": fit.per_device_train_batch_size,
            "accumulation": fit.gradient_accumulation_steps,
            "eval_batch": fit.per_device_eval_batch_size,
            "global_batch_kept": fit.global_batch_kept,
            "tried": [[t.batch_size, t.fits] for t in fit.train.trials],
            "eval_tried": [[t.batch_size, t.fits] for t in fit.eval.trials] if fit.eval else [],
            "notes": list(fit.notes),
            "search_s": time.perf_counter() - started,
        }
    # a check: trainer.train() at this batch under the limit
    _limited(out, job["budget"])
    try:
        make_trainer(out, per_device=job["batch"]).train()
        return {"fits": True}
    except BaseException as exc:
        return {"fits": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def run(kind: str, budget: int, batch: int | None = None) -> dict[str, Any]:
    """One job in a fresh process; its result, and the process's wall time."""
    from bsfinder.devices.cpu import allocator_env

    with tempfile.TemporaryDirectory(prefix="hf-bench-") as tmp:
        job = {"kind": kind, "budget": budget, "batch": batch, "tmp": tmp}
        path = os.path.join(tmp, "job.json")
        Path(path).write_text(json.dumps(job))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", path],
            capture_output=True, text=True, timeout=TIMEOUT_S,
            env={**os.environ, **allocator_env()},
        )  # fmt: skip
        wall = time.perf_counter() - started
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            return {"fits": False, "found": None, "error": f"died ({proc.returncode}): {tail}"}
        return {**json.loads(lines[-1][7:]), "process_s": round(wall, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--finders", nargs="+", choices=FINDERS, default=list(FINDERS))
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.worker:
        result = worker(json.loads(Path(args.worker).read_text()))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    rows = []
    for finder in args.finders:
        row: dict[str, Any] = {"finder": finder, "budget_bytes": BUDGET, **run(finder, BUDGET)}
        found = row.get("found")
        if found:
            row["answer_trains"] = run("check", BUDGET, found)["fits"]
            row["answer_plus_1_trains"] = run("check", BUDGET, found + 1)["fits"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        result = {"header": header(), "start": START, "rows": rows}
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
