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

from benchmarks.integration_lightning import (  # noqa: E402
    TRAINER,
    TokenMLP,
    TokenMLPEval,
    fit_fits,
)
from bsfinder.errors import SpecError  # noqa: E402
from bsfinder.integrations.lightning import (  # noqa: E402
    BsfinderBatchSizeFinder,
    LightningStep,
    batch_holders,
    first_optimizer,
    lr_find,
    scale_batch_size,
)

BUDGET = 256 * 2**20
#: TokenMLP at 512 tokens: 4 MiB of training memory per sample (68 fit in 256 MiB)
BIG = {"tokens": 512, "samples": 128}
#: its evaluation variant at 8 MiB of evaluation memory per sample (26 validate in 256 MiB)
BIG_EVAL = {"tokens": 512, "hidden": 2048, "samples": 128}
EVAL_MODULE = "benchmarks.integration_lightning:TokenMLPEval"


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
    # GIVEN a LightningModule whose train_dataloader batches by hparams.batch_size, at 4 MiB
    # of training memory per sample: one sample is then well above the ~1 MiB by which two
    # processes' address-space baselines differ (at 1 MiB per sample, 128 tokens, bsfinder
    # answers 272 and Trainer.fit trains 273, not 274: measured, see docs/integrations)
    module = TokenMLP(batch_size=2, **BIG)
    trainer = pl.Trainer(**TRAINER, max_steps=3)
    # WHEN bsfinder's exact search sets it under 256 MiB
    found = scale_batch_size(module, trainer, memory_limit=BUDGET, time_limit=None)
    # THEN it is set where Lightning keeps it, and Trainer.fit trains with it in a fresh
    # process under the same budget, while one sample more runs out of memory
    assert found.set_on == ("model.hparams.batch_size",)
    assert module.hparams.batch_size == found.batch_size == found.probe.max_batch
    assert found.previous_batch_size == 2
    assert fit_fits(found.batch_size, BUDGET, kwargs=BIG)["outcome"] == "ok"
    _next_does_not_fit(found, lambda b: fit_fits(b, BUDGET, kwargs=BIG)["outcome"])


def test_the_eval_batch_it_sets_validates_in_trainer_validate_and_the_next_one_does_not() -> None:
    # GIVEN a module whose val_dataloader batches by hparams.batch_size
    module = TokenMLPEval(batch_size=2, **BIG_EVAL)
    # WHEN bsfinder searches the validation batch under 256 MiB
    found = scale_batch_size(
        module, pl.Trainer(**TRAINER), stage="validate", memory_limit=BUDGET, time_limit=None
    )
    # THEN Trainer.validate runs at it in a fresh process under the budget, not one more
    assert found.stage == "validate" and module.hparams.batch_size == found.batch_size
    at = fit_fits(found.batch_size, BUDGET, module=EVAL_MODULE, kwargs=BIG_EVAL, entry="validate")
    assert at["outcome"] == "ok"
    _next_does_not_fit(
        found,
        lambda b: fit_fits(b, BUDGET, module=EVAL_MODULE, kwargs=BIG_EVAL, entry="validate")[
            "outcome"
        ],
    )


def test_the_callback_at_trainer_validate_rebuilds_the_loader_at_the_eval_batch() -> None:
    seen: list[int] = []

    class Record(pl.Callback):
        def on_validation_batch_start(self, trainer: Any, module: Any, batch: Any, *a: Any) -> None:
            seen.append(len(batch[0]))

    finder = BsfinderBatchSizeFinder(memory_limit=BUDGET, max_val=24, time_limit=None)
    module = TokenMLPEval(batch_size=2, samples=48, tokens=8)
    trainer = pl.Trainer(**TRAINER, callbacks=[finder, Record()])
    trainer.validate(module, verbose=False)
    assert finder.result is not None and finder.result.stage == "validate"
    assert finder.optimal_batch_size == module.hparams.batch_size == 24  # capped by max_val
    assert seen == [24, 24]  # 48 samples validated at 24


def _next_does_not_fit(found: Any, outcome: Any) -> None:
    """One sample more runs out of memory in the framework's own loop. On a busy machine
    (the suite's 2 workers), a trial process's address space can peak ~2 MiB higher than
    on a quiet one (measured: 68 failed in the probe beside 3 busy loops and trained in
    Trainer.fit; cause open), so the probe's own failed trial at the next batch also
    counts: the answer is then one short of a quiet machine's, never above what trains."""
    above = outcome(found.batch_size + 1)
    if above == "ok":
        tried = found.probe.trial(found.batch_size + 1)
        assert tried is not None and not tried.fits and tried.failure == "oom", above
        assert outcome(found.batch_size + 2).startswith("oom")
        return
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


class Regression(pl.LightningModule):
    """A learnable problem (y = x.w*), its LR in ``hparams.lr``, plain SGD."""

    def __init__(self, batch_size: int = 32, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(16, 1)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(512, 16, generator=generator)
        self.data = TensorDataset(x, x @ torch.ones(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> Any:
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


def test_lr_find_sweeps_the_modules_own_step_and_sets_its_lr() -> None:
    module = Regression(batch_size=32)
    found = lr_find(module, pl.Trainer(**TRAINER))  # a fresh process
    assert found.batch_size == 32 and found.optimizer == "SGD"
    assert found.curve.stopped == "diverged" and found.lr is not None
    assert module.hparams.lr == found.lr  # set where Lightning's lr_find sets it
    assert found.lr < found.curve.lrs[-1]  # below where the loss diverged
    # AND the module itself was not trained by the sweep
    assert module.net.weight.grad is None


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
    with pytest.raises(SpecError, match="stage 'train'"):
        scale_batch_size(Tiny(), stage="train")
    with pytest.raises(SpecError, match="does not train"):
        scale_batch_size(Tiny(), stage="validate", set_lr=True)
    with pytest.raises(SpecError, match="defines no validation_step"):
        scale_batch_size(Tiny(), stage="validate")
    manual = Tiny()
    manual.automatic_optimization = False
    with pytest.raises(SpecError, match="manual optimization"):
        scale_batch_size(manual)
