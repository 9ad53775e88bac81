"""Real data as the batch source: trial batches of the largest real samples, collated as the
loader collates them, non-tensor keyword inputs, masks, and unknown input names refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bsfinder import find_batch_size
from bsfinder.errors import SpecError
from bsfinder.workload.loading import real_batches
from tests.conftest import invoke_cli

VOCAB = 1000
#: sequence lengths of the data set: mostly short, one long (the memory edge)
LENGTHS = [16, 24, 8, 32, 512, 20, 12, 40] * 4


class Sequences(Dataset):
    """Token sequences of varying length, as a tokenised text data set holds them."""

    def __len__(self) -> int:
        return len(LENGTHS)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": [(i * 7 + j) % VOCAB for j in range(LENGTHS[i])]}


def pad(samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest, with its attention mask and labels (a padding collator)."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
        mask[row, : len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def loader() -> DataLoader:
    return DataLoader(Sequences(), batch_size=4, collate_fn=pad)


class MaskedLM(nn.Module):
    """A masked LM loss that needs its mask and a non-tensor flag; ``**kwargs`` would
    swallow a misspelt input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None, return_loss=False, **kwargs):
        assert attention_mask is not None, "the mask must be passed through"
        logits = self.head(self.embed(input_ids))
        if not return_loss:
            return logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return {"loss": (loss * attention_mask.flatten()).sum() / attention_mask.sum()}


def test_a_trial_batch_is_the_largest_samples_collated() -> None:
    batches = real_batches(loader())  # the DataLoader's dataset and collate_fn
    assert batches.input_names == ("input_ids", "attention_mask", "labels")
    one = batches(1)
    assert one["input_ids"].shape == (1, 512)  # the longest sample first
    four = batches(4)
    assert four["input_ids"].shape == (4, 512)  # the four longest, padded to the longest
    assert four["attention_mask"].sum(1).tolist() == [512, 512, 512, 512]
    eight = batches(8)  # the next longest are the 40s
    assert sorted(eight["attention_mask"].sum(1).tolist())[:4] == [40, 40, 40, 40]
    big = batches(100)  # more than the data set: the largest repeated, never smaller
    assert big["input_ids"].shape == (100, 512)
    assert batches.describe() == "DataLoader: the largest of 32 of 32 samples read, 32 kept"


def test_real_batches_probe_with_masks_and_a_non_tensor_keyword() -> None:
    """A real probe under 256 MiB on real samples: the mask and return_loss=True reach the
    model (it asserts the mask and returns its own loss only with the flag), and the
    longest samples decide the answer: the same data without its long samples fits more."""
    result = find_batch_size(
        MaskedLM(), batches=loader(), forward_kwargs={"return_loss": True}, device="cpu",
        memory_limit="256MiB", granularity=8, time_limit=None,
    )  # fmt: skip
    assert result.max_batch is not None
    assert result.workload["batches"].startswith("DataLoader: the largest of 32")
    assert result.workload["forward_kwargs"] == {"return_loss": "True"}
    short = find_batch_size(
        MaskedLM(), batches=[s for s in Sequences() if len(s["input_ids"]) <= 40],
        collate_fn=pad, forward_kwargs={"return_loss": True}, device="cpu",
        memory_limit="256MiB", granularity=8, max_batch=4 * result.max_batch, time_limit=None,
    )  # fmt: skip
    assert short.max_batch is not None and short.max_batch > 2 * result.max_batch


def misspelt(samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    batch = pad(samples)
    batch["atention_mask"] = batch.pop("attention_mask")
    return batch


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batches": Sequences(), "collate_fn": misspelt}, "atention_mask"),
        ({"inputs": ["input_ids=8:int64:1000", "attention_mask=8:int64:1:2",
                     "lables=8:int64:1000"]}, "lables"),
        ({"inputs": ["input_ids=8:int64:1000"], "forward_kwargs": {"retrun_loss": True}},
         "retrun_loss"),
    ],
)  # fmt: skip
def test_an_unknown_input_name_is_an_error(kwargs, name) -> None:
    """A name the model's forward does not take is refused in the trial process, before any
    trial, though forward's **kwargs would take it silently."""
    with pytest.raises(SpecError, match=rf"input '{name}'.*accepts input_ids, attention_mask"):
        find_batch_size(MaskedLM(), device="cpu", memory_limit="256MiB", max_batch=8, **kwargs)


def test_bad_batch_sources_are_clear_errors() -> None:
    with pytest.raises(SpecError, match=r"collating its samples failed.*collate_fn"):
        real_batches(Sequences())  # lists of different lengths: torch's default cannot
    with pytest.raises(SpecError, match="cannot be given with inputs"):
        find_batch_size(MaskedLM(), batches=loader(), inputs=["8:int64:10"], device="cpu")
    with pytest.raises(SpecError, match="the data set is empty"):
        real_batches([], collate_fn=pad)
    with pytest.raises(SpecError, match="batch_size=None"):
        real_batches(DataLoader(Sequences(), batch_size=None))


def test_the_cli_takes_a_batch_source(tmp_path) -> None:
    out = tmp_path / "r.json"
    done = invoke_cli(
        "probe", "tests.test_batches:MaskedLM", "--batches", "tests.test_batches:loader",
        "--forward-kwargs", '{"return_loss": true}', "--mode", "eval", "--max-batch", "8",
        "--memory-limit", "256MiB", "--quiet", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["workload"]["batches"].startswith("tests.test_batches:loader: the largest of 32")
    assert data["workload"]["mode"] == "eval"
    assert data["recommendations"]["max_batch"] == 8  # --max-batch: 8 fits
