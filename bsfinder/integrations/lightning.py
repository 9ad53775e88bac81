"""The batch a ``LightningModule`` can train with in ``Trainer.fit``, found in fresh processes.

:func:`scale_batch_size` (and the :class:`BsfinderBatchSizeFinder` callback, at
``on_fit_start``) probes the module with **its own** training step, through
:func:`bsfinder.find_batch_size` with ``train_step=``: each trial is a fresh process with
a copy of the module (and datamodule), and runs :class:`LightningStep`, the wiring of
Lightning's automatic optimization on one device. Then it sets the answer where
Lightning's convention keeps the batch size (the ``batch_arg_name`` attribute of the
module, its ``hparams``, the datamodule and its ``hparams``: every holder, as
``lightning.pytorch.utilities.parsing.lightning_setattr`` does), and the learning rate
when asked::

    result = scale_batch_size(model, trainer, memory_limit="4GiB")
    trainer.fit(model)  # trains at result.batch_size

The wiring (one, defined): a trial sets the batch size on its copy, builds the loader with
the module's (or datamodule's) ``train_dataloader()`` and takes real batches from it, one
batch fetched ahead when the loader has no length (Lightning's prefetching fetcher then
holds the next batch while a step runs; with a length it fetches none ahead); the optimizer
is the first one ``configure_optimizers()`` returns. Each step is
Lightning's closure in its order: ``training_step(batch, batch_idx)`` (under the trainer's
precision: autocast for ``bf16-mixed`` and ``16-mixed``, with a ``GradScaler`` for
``16-mixed``; backward runs on its loss divided by 1, a new tensor, as Lightning's
``ClosureResult``: the loss tensor it returned is freed), the ``optimizer_zero_grad``
hook (set_to_none: the previous step's
gradients live through the forward pass, as in Lightning, where zero_grad comes after
``training_step``), the ``backward`` hook, then ``optimizer.step()``. Its answer is what
``Trainer.fit`` can train because ``Trainer.fit`` runs these same calls, in this order, on
the same objects, in a process that holds the module, its data set and the batch:
tests/test_integration_lightning.py runs ``Trainer.fit`` in a fresh process under the
same budget at the answer (it trains) and at the next batch (it runs out of memory; at
about 1 MiB per sample it may train one more: the CPU's address-space baselines of two
processes differ by under 1 MiB, see docs/integrations/lightning.md).

``stage="validate"`` / ``"test"`` / ``"predict"`` finds an evaluation batch the same way
with the stage's loader and step, without gradients (see :class:`LightningStep`).

Not in the wiring: a fit's own validation (``val_check_interval``, sanity checks: the eval
batch is another search, ``stage="validate"``), gradient clipping and accumulation settings
of the trainer, loggers and checkpoint saving, distributed strategies, manual optimization
(give :func:`bsfinder.find_batch_size` your own ``train_step``), DataLoader worker processes
(a trial's loader runs in the trial process).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bsfinder.core.lr_range import DEFAULT_RULE
from bsfinder.core.recommend import scale_learning_rate
from bsfinder.core.results import LearningRateAdvice, ProbeResult
from bsfinder.errors import BsfinderError, SpecError, UserCodeError
from bsfinder.lr.range_test import LR_END, LR_START, LR_STEPS, LRRangeResult
from bsfinder.options import BudgetOptions, Granularity, SearchOptions
from bsfinder.probe import ProbeEvent

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the integration needs its framework
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError:
        pl = None  # type: ignore[assignment]

__all__ = [
    "MODES",
    "STAGES",
    "BsfinderBatchSizeFinder",
    "LightningBatchSize",
    "LightningStep",
    "lr_find",
    "scale_batch_size",
]

#: ``"power"``: the largest power of two; ``"binsearch"`` and ``"exact"``: bsfinder's exact
#: search (to ``granularity``)
MODES = ("power", "binsearch", "exact")
#: a trainer entry point's loader and step (Lightning's ``RunningStage``): ``"fit"`` trains;
#: the others run the step without gradients (under ``torch.inference_mode``, as
#: ``Trainer(inference_mode=True)``, its default; ``torch.no_grad`` when it is False)
STAGES: dict[str, tuple[str, str]] = {
    "fit": ("train_dataloader", "training_step"),
    "validate": ("val_dataloader", "validation_step"),
    "test": ("test_dataloader", "test_step"),
    "predict": ("predict_dataloader", "predict_step"),
}
#: the trainer precisions the wiring runs (others: a SpecError, not a silent fp32 answer)
PRECISIONS = {
    "32": None, "32-true": None, "bf16-mixed": "bfloat16", "16-mixed": "float16",
}  # fmt: skip
#: Lightning's learning-rate attribute names, in the order its LR finder looks for them
LR_ATTR_NAMES = ("lr", "learning_rate")
#: marks the error a trial raises when the loader ignores the batch size
_IGNORED = "bsfinder: train_dataloader() gave"


@dataclass(frozen=True)
class LightningBatchSize:
    """What :func:`scale_batch_size` found and set.

    Attributes:
        batch_size: the batch set on every holder of ``batch_arg_name`` (the probe's
            ``max_batch``: a power of two in ``"power"`` mode).
        mode: the mode searched with.
        stage: the entry point it was found for (``"fit"``, ``"validate"``, ``"test"``,
            ``"predict"``).
        batch_arg_name: the attribute set.
        set_on: where it was set, e.g. ``("model.batch_size", "model.hparams.batch_size")``.
        previous_batch_size: the value before.
        learning_rate: the LR advice for ``batch_size`` (``set_lr``), else None.
        lr_set_on: where the learning rate was set.
        probe: bsfinder's full result (trials, peaks, the time-optimal batch).
    """

    batch_size: int
    mode: str
    stage: str
    batch_arg_name: str
    set_on: tuple[str, ...]
    previous_batch_size: Any
    learning_rate: LearningRateAdvice | None
    lr_set_on: tuple[str, ...]
    probe: ProbeResult

    @property
    def partial(self) -> bool:
        """The probe stopped early (time limit, Ctrl-C): ``batch_size`` is a lower bound."""
        return self.probe.partial


def scale_batch_size(
    model: Any,
    trainer: Any = None,
    datamodule: Any = None,
    *,
    mode: str = "exact",
    stage: str = "fit",
    init_val: int = 2,
    max_val: int | None = None,
    steps_per_trial: int = 3,
    batch_arg_name: str = "batch_size",
    memory_limit: int | str | None = BudgetOptions.memory_limit,
    device: str = "auto",
    granularity: Granularity | None = None,
    precision: str | None = None,
    set_lr: bool = False,
    base_lr: float | None = None,
    lr_rule: str = "auto",
    time_limit: float | str | None = SearchOptions.time_limit,
    isolation: str = "process",
    on_event: Callable[[ProbeEvent], None] | None = None,
) -> LightningBatchSize:
    """Find the largest batch ``Trainer.fit`` can train ``model`` with, and set it.

    Args:
        model: the ``LightningModule``.
        trainer: its ``Trainer`` (optional): its precision and device are used.
        datamodule: a ``LightningDataModule`` giving the ``train_dataloader`` (default: the
            trainer's, else the module's own ``train_dataloader``).
        mode: ``"power"`` (the largest power of two), ``"binsearch"`` or ``"exact"``
            (bsfinder's exact search: the largest batch, to ``granularity``).
        stage: ``"fit"`` (``train_dataloader`` and ``training_step``, trained), or the
            batch of an evaluation entry point, without gradients: ``"validate"``
            (``val_dataloader``, ``validation_step``), ``"test"``, ``"predict"``. The
            loader must batch by the same ``batch_arg_name``.
        init_val: the first batch tried.
        max_val: never try a larger batch (also capped by the data set's length).
        steps_per_trial: steps per trial (>= 2: in training the first creates the
            optimizer state): 1 untimed + the rest timed.
        batch_arg_name: the attribute holding the batch size (module, ``hparams``,
            datamodule).
        memory_limit: the budget (bytes or ``"4GiB"``): on the CPU a limit on each trial
            process, on CUDA a cap of the allocator; default as
            :func:`bsfinder.find_batch_size`.
        device: ``"auto"`` (the trainer's device, else a GPU if there is one), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``.
        granularity: answer to a multiple of this (default 1 for ``"exact"`` and
            ``"binsearch"``; ``"pow2"``, the only one for ``"power"``).
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (default: the
            trainer's, else ``"32-true"``).
        set_lr: also scale the learning rate (the ``lr`` or ``learning_rate`` attribute,
            or ``base_lr``) from the previous batch size to the new one, and set it.
        base_lr: the learning rate tuned at the previous batch size (default: read from
            the ``lr`` / ``learning_rate`` attribute).
        lr_rule: ``"auto"`` (SGD: linear, Adam-family: sqrt), ``"linear"``, ``"sqrt"``.
        time_limit: seconds after which no trial starts (the result is then ``partial``).
        isolation: ``"process"`` (fresh processes; the default) or ``"inline"``.
        on_event: bsfinder's progress callback.

    Returns:
        A :class:`LightningBatchSize`; the batch size (and LR) are set on ``model``
        (``hparams``) and the datamodule.

    Raises:
        SpecError: no loader or step for ``stage``, no ``batch_arg_name`` attribute, a
            loader that ignores it, manual optimization (``"fit"``), ``set_lr`` outside
            ``"fit"``, an unsupported precision, mode or stage.
        BsfinderError: not even ``init_val`` fits.

    Example:
        >>> found = scale_batch_size(model, memory_limit="256MiB")  # doctest: +SKIP
        >>> found.batch_size, model.hparams.batch_size  # doctest: +SKIP
        (172, 172)
    """
    return _scale(
        model, trainer, datamodule, mode=mode, stage=stage, init_val=init_val, max_val=max_val,
        steps_per_trial=steps_per_trial, batch_arg_name=batch_arg_name,
        memory_limit=memory_limit, device=device, granularity=granularity,
        precision=precision, set_lr=set_lr, base_lr=base_lr, lr_rule=lr_rule,
        time_limit=time_limit, isolation=isolation, on_event=on_event, set_up=False,
    )  # fmt: skip


def _scale(
    model: Any,
    trainer: Any,
    datamodule: Any,
    *,
    mode: str,
    stage: str,
    init_val: int,
    max_val: int | None,
    steps_per_trial: int,
    batch_arg_name: str,
    memory_limit: int | str | None,
    device: str,
    granularity: Granularity | None,
    precision: str | None,
    set_lr: bool,
    base_lr: float | None,
    lr_rule: str,
    time_limit: float | str | None,
    isolation: str,
    on_event: Callable[[ProbeEvent], None] | None,
    set_up: bool,
) -> LightningBatchSize:
    """:func:`scale_batch_size`; ``set_up``: the trainer already ran ``prepare_data`` and
    ``setup(stage)`` (the callback, at the stage's start)."""
    from bsfinder.api import find_batch_size

    datamodule = _parts(model, trainer, datamodule)
    search_granularity = _granularity_of(mode, granularity)
    _check_stage(stage, set_lr)
    if not isinstance(steps_per_trial, int) or isinstance(steps_per_trial, bool):
        raise SpecError(f"steps_per_trial must be an integer, got {steps_per_trial!r}")
    if steps_per_trial < 2:
        raise SpecError(
            f"steps_per_trial={steps_per_trial}: give at least 2 (the first step creates the "
            "optimizer state; training's peak is reached from the second step on)"
        )
    if stage == "fit" and not getattr(model, "automatic_optimization", True):
        raise SpecError(
            f"{type(model).__name__} uses manual optimization (automatic_optimization=False): "
            "its training_step drives the optimizers through the Trainer. Measure it with "
            "bsfinder.find_batch_size(train_step=...) and a step of your own"
        )
    holders = batch_holders(model, datamodule, batch_arg_name)
    if not holders:
        raise SpecError(_no_attribute(model, datamodule, batch_arg_name))
    source = _data_source(model, datamodule, stage)
    autocast = _precision_of(precision, trainer)
    run_device = _device_of(device, trainer)
    previous = holders[-1][1].get()  # Lightning reads the last holder
    lr_holders: list[tuple[str, _Holder]] = []
    optimizer_family = "sgd"
    if set_lr:
        optimizer_family = _optimizer_family(model)
        lr_holders, base_lr = _lr_holders(model, datamodule, base_lr)
        if not isinstance(previous, int) or previous < 1:
            raise SpecError(
                f"set_lr scales the learning rate from the batch it was tuned at: "
                f"{batch_arg_name} is {previous!r}; set it to that batch first"
            )
    if not set_up:
        _set_up(model, datamodule, stage)
    dataset_size = _check_loader(source, holders, init_val, batch_arg_name, stage)
    cap = max_val
    if dataset_size is not None:
        cap = dataset_size if cap is None else min(cap, dataset_size)
    step = LightningStep(
        model, datamodule, batch_arg_name=batch_arg_name, device=run_device, autocast=autocast,
        stage=stage, inference_mode=_inference_mode_of(trainer),
    )  # fmt: skip
    try:
        probe = find_batch_size(
            train_step=step, device=run_device, memory_limit=memory_limit,
            start_batch=init_val, max_batch=cap, granularity=search_granularity,
            warmup_steps=1, steps=steps_per_trial - 1, time_limit=time_limit,
            isolation=isolation, on_event=on_event,
        )  # fmt: skip
    except UserCodeError as exc:
        if exc.detail.startswith(_IGNORED):
            raise SpecError(exc.detail) from None
        raise
    found = probe.max_batch
    if found is None:
        tried = ", ".join(f"{t.batch_size} {'fits' if t.fits else 'no'}" for t in probe.trials)
        raise BsfinderError(
            f"no batch of {type(model).__name__} fits from init_val={init_val} "
            f"(tried {tried or 'nothing'}); lower init_val, raise memory_limit or use a "
            "smaller model or precision"
        )
    for _, holder in holders:
        holder.set(found)
    advice = None
    if set_lr:
        assert base_lr is not None and isinstance(previous, int)
        advice = scale_learning_rate(
            base_lr=base_lr, base_batch=previous, batch_size=found, rule=lr_rule,
            optimizer=optimizer_family,
        )  # fmt: skip
        for _, holder in lr_holders:
            holder.set(advice.lr)
    return LightningBatchSize(
        batch_size=found,
        mode=mode,
        stage=stage,
        batch_arg_name=batch_arg_name,
        set_on=tuple(name for name, _ in holders),
        previous_batch_size=previous,
        learning_rate=advice,
        lr_set_on=tuple(name for name, _ in lr_holders),
        probe=probe,
    )


try:
    from torch import nn as _nn

    _ModuleBase: Any = _nn.Module
except ImportError:  # pragma: no cover
    _ModuleBase = object


def lr_find(
    model: Any,
    trainer: Any = None,
    datamodule: Any = None,
    *,
    batch_size: int | None = None,
    batch_arg_name: str = "batch_size",
    min_lr: float = LR_START,
    max_lr: float = LR_END,
    num_training: int = LR_STEPS,
    rule: str = DEFAULT_RULE,
    update_attr: bool = True,
    device: str = "auto",
    isolation: str = "process",
) -> LRRangeResult:
    """Lightning's ``Tuner.lr_find``, by bsfinder's LR range test: the module's own
    ``training_step`` (its loss, as Lightning's closure takes it), the first optimizer of
    ``configure_optimizers`` (its class and settings; the LR swept), and real batches of
    its ``train_dataloader`` (or the datamodule's) at ``batch_size``, on a copy in a fresh
    process. The suggestion is bsfinder's rule (default: the steepest descent capped at a
    third of the smoothed minimum's LR; measured against Lightning's uncapped steepest in
    docs/learning-rate.md), and ``update_attr`` sets it where Lightning's LR finder would
    (``lr`` or ``learning_rate``: the module, its hparams, the datamodule)::

        found = lr_find(model, trainer)       # after scale_batch_size, at its batch
        found.lr, model.hparams.lr

    Args:
        model, trainer, datamodule, batch_arg_name: as :func:`scale_batch_size`.
        batch_size: the batch to sweep at (default: the module's ``batch_arg_name``).
        min_lr, max_lr, num_training: the exponential sweep (bsfinder's defaults: 1e-7 to
            10 in 100 steps; Lightning's are 1e-8 to 1).
        rule: ``"minimum/3"`` (the default), ``"steepest"``, ``"valley"`` or
            ``"minimum/10"`` (see :mod:`bsfinder.core.lr_range`).
        update_attr: set the suggestion on the LR attribute (when there is one).
        device: ``"auto"`` (the trainer's), ``"cpu"``, ``"cuda"``...
        isolation: ``"process"`` (default) or ``"inline"``.

    Returns:
        bsfinder's :class:`~bsfinder.lr.LRRangeResult` (``lr`` is None when the curve has no
        clear descent; ``suggestion.reason`` says why, and nothing is set).
    """
    from bsfinder.lr import find_lr

    datamodule = _parts(model, trainer, datamodule)
    if not getattr(model, "automatic_optimization", True):
        raise SpecError(
            f"{type(model).__name__} uses manual optimization: its training_step steps its "
            "own optimizers; run bsfinder.lr.find_lr with a model whose forward returns the "
            "loss"
        )
    holders = batch_holders(model, datamodule, batch_arg_name)
    if not holders:
        raise SpecError(_no_attribute(model, datamodule, batch_arg_name))
    batch = holders[-1][1].get() if batch_size is None else batch_size
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise SpecError(f"batch_size must be a positive integer, got {batch!r}")
    source = _data_source(model, datamodule)
    _set_up(model, datamodule, "fit")
    _check_loader(source, holders, batch, batch_arg_name, "fit")
    optimizer = first_optimizer(model.configure_optimizers(), type(model).__name__)
    run_device = _device_of(device, trainer)
    found = find_lr(
        _TrainingStepLoss(model, run_device), _Loader(model, datamodule, batch_arg_name),
        batch_size=batch, optimizer=optimizer, rule=rule, start_lr=min_lr, end_lr=max_lr,
        steps=num_training, device=run_device, isolation=isolation,
    )  # fmt: skip
    if update_attr and found.lr is not None:
        try:
            lr_holders, _ = _lr_holders(model, datamodule, None)
        except SpecError:
            lr_holders = []
        for _, holder in lr_holders:
            holder.set(found.lr)
    return found


class _TrainingStepLoss(_ModuleBase):
    """A module whose forward is a LightningModule's training-step loss on one batch (the
    range test calls ``model(batch)``)."""

    def __init__(self, module: Any, device: str) -> None:
        super().__init__()
        self.module = module
        self.device = device
        self.batch_idx = 0

    def forward(self, batch: Any) -> Any:
        import warnings

        import torch

        batch = self.module._apply_batch_transfer_handler(batch, torch.device(self.device))
        with warnings.catch_warnings():  # self.log() without a trainer: nothing to log to
            warnings.filterwarnings("ignore", message=".*self.log.*")
            output = self.module.training_step(batch, self.batch_idx)
        loss, _ = _closure_loss(output)
        self.batch_idx += 1
        if loss is None:
            raise ValueError("training_step returned None: there is no loss to sweep on")
        return loss


class _Loader:
    """``data(batch_size)`` for the range test: the module's (or datamodule's)
    ``train_dataloader()`` at that batch, each batch as one argument of the model."""

    def __init__(self, module: Any, datamodule: Any, batch_arg_name: str) -> None:
        self.module, self.datamodule, self.batch_arg_name = module, datamodule, batch_arg_name

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "datamodule": _detached(self.datamodule)}

    def __call__(self, batch_size: int) -> Iterator[Any]:
        for _, holder in batch_holders(self.module, self.datamodule, self.batch_arg_name):
            holder.set(batch_size)
        source = _data_source(self.module, self.datamodule)
        for batch in _single_process(source.train_dataloader()):
            yield ((batch,), {})


_CallbackBase: Any = pl.Callback if pl is not None else object


class BsfinderBatchSizeFinder(_CallbackBase):
    """Lightning's ``BatchSizeFinder`` callback, with bsfinder's answer: at ``on_fit_start``
    (after ``setup``, before the fit loop builds its dataloaders) it runs
    :func:`scale_batch_size` on the trainer's module and datamodule and sets the batch, so
    that the fit that follows trains with it::

        trainer = Trainer(callbacks=[BsfinderBatchSizeFinder(memory_limit="4GiB")])
        trainer.fit(model)

    As Lightning's callback it also runs at the start of ``trainer.validate``, ``test`` and
    ``predict`` (not of the validation inside a fit): it finds that stage's batch (without
    gradients, ``stage=...`` of :func:`scale_batch_size`), sets it, and rebuilds the
    stage's dataloader so that the run that follows uses it (``set_lr`` applies to fits
    only)::

        trainer.validate(model)  # validates at the largest evaluation batch

    Args: as :func:`scale_batch_size` (keyword-only). Attributes after a stage starts:
    ``optimal_batch_size`` (as Lightning's callback) and ``result`` (the last stage's).
    """

    def __init__(
        self,
        *,
        mode: str = "exact",
        init_val: int = 2,
        max_val: int | None = None,
        steps_per_trial: int = 3,
        batch_arg_name: str = "batch_size",
        memory_limit: int | str | None = BudgetOptions.memory_limit,
        granularity: Granularity | None = None,
        set_lr: bool = False,
        base_lr: float | None = None,
        lr_rule: str = "auto",
        time_limit: float | str | None = SearchOptions.time_limit,
        on_event: Callable[[ProbeEvent], None] | None = None,
    ) -> None:
        _require_lightning()
        super().__init__()
        _granularity_of(mode, granularity)  # a bad mode fails when the callback is made
        self._options: dict[str, Any] = {
            "mode": mode, "init_val": init_val, "max_val": max_val,
            "steps_per_trial": steps_per_trial, "batch_arg_name": batch_arg_name,
            "memory_limit": memory_limit, "granularity": granularity, "set_lr": set_lr,
            "base_lr": base_lr, "lr_rule": lr_rule, "time_limit": time_limit,
            "on_event": on_event,
        }  # fmt: skip
        self.optimal_batch_size: int | None = None
        self.result: LightningBatchSize | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """Refuse what the wiring does not run, before the fit starts."""
        if trainer.world_size > 1:
            raise SpecError(
                "BsfinderBatchSizeFinder probes one device; under a distributed strategy run "
                "bsfinder.find_batch_size(strategy=...) on every rank instead"
            )
        stage = stage or "fit"
        loop = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop"}.get(
            stage, "predict_loop"
        )
        data_source = getattr(getattr(trainer, loop, None), "_data_source", None)
        if data_source is not None and not data_source.is_module():
            name = STAGES.get(stage, STAGES["fit"])[0]
            raise SpecError(
                f"BsfinderBatchSizeFinder sets the batch size of a {name} defined on the "
                "LightningModule or a LightningDataModule, not of dataloaders passed to "
                f"{stage}(): define {name}() there, reading self."
                + str(self._options["batch_arg_name"])
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Probe, then set the batch size (and LR) before the dataloaders are built."""
        self._run(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """At ``trainer.validate`` (not a fit's validation, nor its sanity check)."""
        if trainer.sanity_checking or trainer.state.fn != "validate":
            return
        self._run(trainer, pl_module, "validate", trainer.validate_loop)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._run(trainer, pl_module, "test", trainer.test_loop)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._run(trainer, pl_module, "predict", trainer.predict_loop)

    def _run(self, trainer: Any, pl_module: Any, stage: str, loop: Any = None) -> None:
        options = dict(self._options)
        if stage != "fit":
            options["set_lr"] = False
        with _on_cpu(pl_module):  # a module already on a GPU travels as a CPU copy
            self.result = _scale(
                pl_module, trainer, trainer.datamodule, stage=stage,
                device=_device_of("auto", trainer), precision=None, isolation="process",
                set_up=True, **options,
            )  # fmt: skip
        self.optimal_batch_size = self.result.batch_size
        if loop is not None:  # the evaluation loop built its loader and fetcher already
            loop._combined_loader = None
            loop.setup_data()
            loop.reset()


class LightningStep:
    """One training step of a LightningModule as Lightning's automatic optimization runs it
    (see the module docstring): a ``train_step(batch_size)`` for
    :func:`bsfinder.find_batch_size`. It travels to each trial process as a copy of the
    module and datamodule (without their trainer), and steps only that copy.

    In an evaluation ``stage`` (``"validate"``, ``"test"``, ``"predict"``) a step is the
    evaluation loop's: the module in ``eval()`` mode, the stage's loader, its step under
    ``torch.inference_mode`` (``torch.no_grad`` when ``inference_mode`` is False), no
    optimizer.

    Args:
        module: the ``LightningModule``. datamodule: its ``LightningDataModule`` or None.
        batch_arg_name: the batch-size attribute the stage's loader reads.
        device: where the copy runs. autocast: ``"bfloat16"``, ``"float16"`` or None.
        stage: a key of :data:`STAGES`. inference_mode: as the trainer's.
    """

    def __init__(
        self,
        module: Any,
        datamodule: Any = None,
        *,
        batch_arg_name: str = "batch_size",
        device: str = "cpu",
        autocast: str | None = None,
        stage: str = "fit",
        inference_mode: bool = True,
    ) -> None:
        _check_stage(stage, set_lr=False)
        self.module = module
        self.datamodule = datamodule
        self.batch_arg_name = batch_arg_name
        self.device = device
        self.autocast = autocast
        self.stage = stage
        self.inference_mode = inference_mode
        self._live: _Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None, "datamodule": _detached(self.datamodule)}

    def __call__(self, batch_size: int) -> None:
        live = self._live
        if live is None or live.batch_size != batch_size:
            live = self._live = self._start(batch_size)
        import torch

        batch = live.next_batch()
        module = self.module
        batch = module._apply_batch_transfer_handler(batch, torch.device(self.device))
        dtype = getattr(torch, self.autocast) if self.autocast else None
        context = (
            torch.autocast(torch.device(self.device).type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        if self.stage != "fit":
            grad_off = torch.inference_mode() if self.inference_mode else torch.no_grad()
            with grad_off, context:
                output = getattr(module, STAGES[self.stage][1])(batch, live.batch_idx)
            output = batch = None  # the loop drops both before it fetches the next batch
            live.batch_idx += 1
            return
        with context:
            output = module.training_step(batch, live.batch_idx)
        loss, extra = _closure_loss(output)
        output = None
        if loss is not None:  # None: Lightning skips backward and the optimizer step
            module.optimizer_zero_grad(0, live.batch_idx, live.optimizer)
            if live.scaler is not None:
                module.backward(live.scaler.scale(loss))
                live.scaler.step(live.optimizer)
                live.scaler.update()
            else:
                module.backward(loss)
                live.optimizer.step()
        del extra  # held through the optimizer step, as Lightning's ClosureResult.extra
        loss = batch = None
        live.batch_idx += 1

    def _start(self, batch_size: int) -> _Live:
        """The copy at ``batch_size``: its optimizer, its loader, the first batch fetched."""
        import torch

        holders = batch_holders(self.module, self.datamodule, self.batch_arg_name)
        for _, holder in holders:
            holder.set(batch_size)
        module = self.module
        module.to(self.device)
        optimizer = None
        if self.stage == "fit":
            module.train()
            optimizer = first_optimizer(module.configure_optimizers(), type(module).__name__)
        else:
            module.eval()
        source = _data_source(module, self.datamodule, self.stage)
        loader = _single_process(getattr(source, STAGES[self.stage][0])())
        scaler = (
            torch.amp.GradScaler(torch.device(self.device).type)
            if self.autocast == "float16"
            else None
        )
        live = _Live(batch_size, optimizer, loader, scaler)
        got = batch_length(live.peek())
        if got is not None and got != batch_size:
            raise ValueError(
                f"{_IGNORED} a batch of {got} samples with {self.batch_arg_name}={batch_size} "
                f"from {STAGES[self.stage][0]}(): "
                f"build its DataLoader with batch_size=self.{self.batch_arg_name} (or "
                "self.hparams...), and a data set of at least that many samples"
            )
        return live


def _closure_loss(output: Any) -> tuple[Any, dict[str, Any]]:
    """The loss backward runs on, and the other outputs, as Lightning's ``ClosureResult.
    from_training_step_output`` makes them: ``loss / 1`` (its ``closure_loss /
    normalize``), a new tensor, so that ``training_step``'s own loss tensor is freed before
    backward (measured: torch's ``mse_loss`` returns a 0-dim tensor that keeps its
    elementwise buffer, one batch-sized tensor); the rest of a returned dict lives through
    the optimizer step, as Lightning keeps it for ``on_train_batch_end``."""
    import torch

    if isinstance(output, Mapping):
        loss = output.get("loss")
        if loss is None:
            raise ValueError(
                "training_step returned a dict without a 'loss' key: in automatic "
                "optimization Lightning needs it"
            )
        extra = {key: value for key, value in output.items() if key != "loss"}
    elif isinstance(output, torch.Tensor) or output is None:
        loss, extra = output, {}
    else:
        raise ValueError(
            f"training_step returned a {type(output).__name__}: in automatic optimization "
            "it must return a Tensor, a dict with 'loss', or None (the step is skipped)"
        )
    return (None if loss is None else loss / 1), extra


class _Live:
    """A trial's state: the batch, the optimizer, the loader's iterator and, for a loader
    without a length, the batch fetched ahead (Lightning's ``_PrefetchDataFetcher`` holds
    one to know which batch is the last; with a length it fetches none ahead)."""

    def __init__(self, batch_size: int, optimizer: Any, loader: Any, scaler: Any) -> None:
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.loader = loader
        self.scaler = scaler
        self.batch_idx = 0
        try:
            len(loader)
            self.prefetch = False
        except TypeError:
            self.prefetch = True
        self._ahead: list[Any] = []
        self._iterator: Iterator[Any] = iter(loader)

    def peek(self) -> Any:
        """The next batch, kept for :meth:`next_batch`."""
        if not self._ahead:
            self._ahead.append(self._fetch())
        return self._ahead[0]

    def next_batch(self) -> Any:
        """The batch for this step; meanwhile the next one when Lightning would prefetch."""
        batch = self._ahead.pop(0) if self._ahead else self._fetch()
        if self.prefetch:
            self._ahead.append(self._fetch())
        return batch

    def _fetch(self) -> Any:
        """The loader's next batch; a new epoch when it is exhausted (as the fit loop)."""
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                raise ValueError(f"{_IGNORED} no batch: its data set is empty") from None


# -- Lightning's conventions ------------------------------------------------------------------
class _Holder:
    """One place that holds an attribute: an object's attribute or a mapping's key."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def get(self) -> Any:
        if isinstance(self.owner, Mapping):
            return self.owner[self.name]
        return getattr(self.owner, self.name)

    def set(self, value: Any) -> None:
        if isinstance(self.owner, Mapping):
            self.owner[self.name] = value  # type: ignore[index]
        else:
            setattr(self.owner, self.name, value)


def batch_holders(module: Any, datamodule: Any, name: str) -> list[tuple[str, _Holder]]:
    """Every place holding ``name``, in Lightning's order (``_lightning_get_all_attr_holders``):
    the module, ``module.hparams``, the datamodule, ``datamodule.hparams``. Lightning reads
    the last and sets them all; so does this integration. The datamodule is the one given
    (Lightning's is the trainer's, registered at fit)."""
    holders: list[tuple[str, _Holder]] = []
    if hasattr(module, name):
        holders.append((f"model.{name}", _Holder(module, name)))
    hparams = getattr(module, "hparams", None)
    if hparams is not None and name in hparams:
        holders.append((f"model.hparams.{name}", _Holder(hparams, name)))
    if datamodule is not None:
        if hasattr(datamodule, name):
            holders.append((f"datamodule.{name}", _Holder(datamodule, name)))
        dm_hparams = getattr(datamodule, "hparams", None)
        if dm_hparams is not None and name in dm_hparams:
            holders.append((f"datamodule.hparams.{name}", _Holder(dm_hparams, name)))
    return holders


def first_optimizer(config: Any, owner: str = "the module") -> Any:
    """The optimizer of ``configure_optimizers()``'s return, in any of Lightning's forms: an
    optimizer, a list or tuple of them, ``([optimizers], [schedulers])``, or a dict with
    ``"optimizer"`` (or a list of such dicts). One optimizer: automatic optimization steps
    one (Lightning 2 needs manual optimization for several)."""
    import torch

    found: list[Any] = []

    def collect(item: Any) -> None:
        if isinstance(item, torch.optim.Optimizer):
            found.append(item)
        elif isinstance(item, Mapping) and "optimizer" in item:
            collect(item["optimizer"])
        elif isinstance(item, Sequence) and not isinstance(item, str):
            if len(item) == 2 and isinstance(item[0], Sequence) and isinstance(item[1], Sequence):
                collect(item[0])  # ([optimizers], [schedulers])
            else:
                for part in item:
                    collect(part)

    collect(config)
    if len(found) != 1:
        what = "no optimizer" if not found else f"{len(found)} optimizers"
        raise SpecError(
            f"{owner}.configure_optimizers() returned {what}: automatic optimization steps "
            "exactly one; with several, Lightning needs manual optimization: measure it with "
            "bsfinder.find_batch_size(train_step=...)"
        )
    return found[0]


def batch_length(batch: Any) -> int | None:
    """The samples in a batch: the first dimension of its first tensor (None: no tensor)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        items = batch
    else:
        return None
    for item in items:
        found = batch_length(item)
        if found is not None:
            return found
    return None


# -- checks -----------------------------------------------------------------------------------
def _require_lightning() -> None:
    if pl is None:
        raise SpecError("the Lightning integration needs Lightning: pip install lightning")


def _parts(model: Any, trainer: Any, datamodule: Any) -> Any:
    """Check the module, trainer and datamodule given; the datamodule to use (the one
    given, else the trainer's)."""
    _require_lightning()
    if not isinstance(model, pl.LightningModule):
        raise SpecError(f"model must be a LightningModule, got {type(model).__name__}")
    if trainer is not None and not isinstance(trainer, pl.Trainer):
        raise SpecError(f"trainer must be a lightning Trainer, got {type(trainer).__name__}")
    if datamodule is None and trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and not isinstance(datamodule, pl.LightningDataModule):
        raise SpecError(
            f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}"
        )
    return datamodule


def _set_up(model: Any, datamodule: Any, stage: str) -> None:
    """What the trainer's entry point does before it builds the loaders."""
    for part in (datamodule, model):
        if part is not None:
            part.prepare_data()
            part.setup(stage)


def _detached(datamodule: Any) -> Any:
    """The datamodule as it travels to a trial process: a shallow copy without its trainer
    (it shares its data; the trainer stays here)."""
    if datamodule is None or getattr(datamodule, "trainer", None) is None:
        return datamodule
    detached = copy.copy(datamodule)
    detached.trainer = None
    return detached


def _granularity_of(mode: str, granularity: Granularity | None) -> Granularity:
    if mode not in MODES:
        raise SpecError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "power":
        if granularity not in (None, "pow2"):
            raise SpecError(
                f"mode='power' answers a power of two: granularity {granularity!r} does not "
                "apply; use mode='exact' with it"
            )
        return "pow2"
    return 1 if granularity is None else granularity


def _no_attribute(module: Any, datamodule: Any, name: str) -> str:
    where = f"{type(module).__name__}" + (
        f" or {type(datamodule).__name__}" if datamodule is not None else ""
    )
    return (
        f"{where} has no {name!r}: it is neither an attribute of the module nor in its hparams"
        + (" nor on the datamodule" if datamodule is not None else "")
        + f". Store the batch size there (self.{name} = ..., or save_hyperparameters() with a "
        f"{name} argument) and build train_dataloader() with it, or pass the attribute's "
        "name as batch_arg_name="
    )


def _data_source(module: Any, datamodule: Any, stage: str = "fit") -> Any:
    """What gives the stage's loader: the datamodule, else the module (as the trainer)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    loader_name, step_name = STAGES[stage]
    if stage != "fit" and not is_overridden(step_name, module):
        raise SpecError(
            f"{type(module).__name__} defines no {step_name}(): stage={stage!r} runs it"
        )
    if datamodule is not None:
        if is_overridden(loader_name, datamodule):
            return datamodule
        raise SpecError(
            f"{type(datamodule).__name__} defines no {loader_name}(): define it, reading "
            "self.batch_size (or the batch_arg_name given)"
        )
    if is_overridden(loader_name, module):
        return module
    raise SpecError(
        f"{type(module).__name__} defines no {loader_name}() and no datamodule was given: "
        "the probe runs on real batches from it. Define "
        f"{loader_name}() on the module (building its DataLoader with "
        "batch_size=self.batch_size), or pass datamodule= (or a trainer whose datamodule is "
        "set)"
    )


def _check_stage(stage: str, set_lr: bool) -> None:
    if stage not in STAGES:
        raise SpecError(f"stage {stage!r}: use one of {', '.join(STAGES)}")
    if set_lr and stage != "fit":
        raise SpecError(
            f"set_lr scales the learning rate of training: stage={stage!r} does not train"
        )


def _inference_mode_of(trainer: Any) -> bool:
    """The trainer's ``inference_mode`` (its evaluation loops keep it; default True)."""
    loop = getattr(trainer, "validate_loop", None)
    return bool(getattr(loop, "inference_mode", True))


def _precision_of(precision: str | None, trainer: Any) -> str | None:
    """The autocast dtype of the precision asked for, or the trainer's."""
    value = precision if precision is not None else getattr(trainer, "precision", "32-true")
    value = str(value)
    if value not in PRECISIONS:
        raise SpecError(
            f"precision {value!r}: the probe runs {', '.join(PRECISIONS)}; for other "
            "precisions measure your own step with bsfinder.find_batch_size(train_step=...)"
        )
    return PRECISIONS[value]


def _device_of(device: str, trainer: Any) -> str:
    """The device asked for; under ``"auto"`` the trainer's root device when there is one."""
    if device == "auto" and trainer is not None:
        root = trainer.strategy.root_device
        return "cpu" if root.type == "cpu" else f"{root.type}:{root.index or 0}"
    from bsfinder.devices.select import resolve_device

    return resolve_device(device)


def _optimizer_family(module: Any) -> str:
    """``"sgd"`` or ``"adamw"`` for the LR rule: the optimizer ``configure_optimizers``
    makes (its state is created at its first step: none here)."""
    import torch

    optimizer = first_optimizer(module.configure_optimizers(), type(module).__name__)
    return "sgd" if isinstance(optimizer, torch.optim.SGD) else "adamw"


def _lr_holders(
    module: Any, datamodule: Any, base_lr: float | None
) -> tuple[list[tuple[str, _Holder]], float]:
    """Where the learning rate is kept (Lightning's LR finder: ``lr`` or ``learning_rate``),
    and the base LR (given, else read there)."""
    for name in LR_ATTR_NAMES:
        holders = batch_holders(module, datamodule, name)
        if holders:
            value = holders[-1][1].get() if base_lr is None else base_lr
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise SpecError(f"{name} is {value!r}: give base_lr= to scale from")
            return holders, float(value)
    raise SpecError(
        f"set_lr: {type(module).__name__} keeps no learning rate as 'lr' or 'learning_rate' "
        "(attribute or hparams) to set; store it there and read it in configure_optimizers()"
    )


def _check_loader(
    source: Any, holders: list[tuple[str, _Holder]], batch_size: int, name: str, stage: str
) -> int | None:
    """Build the loader once at ``batch_size`` (the holders put back after) and check that
    it batches by the attribute; the data set's length (None: not sized)."""
    saved = [(holder, holder.get()) for _, holder in holders]
    try:
        for holder, _ in saved:
            holder.set(batch_size)
        loader = getattr(source, STAGES[stage][0])()
        dataset = getattr(loader, "dataset", None)
        try:
            size: int | None = len(dataset) if dataset is not None else None
        except TypeError:
            size = None
        if size is not None and size < batch_size:
            raise SpecError(
                f"{type(source).__name__}.{STAGES[stage][0]}()'s data set has {size} samples, "
                f"fewer than init_val={batch_size}: lower init_val"
            )
        got = batch_length(next(iter(_single_process(loader))))
    finally:
        for holder, value in saved:
            holder.set(value)
    if got is not None and got != batch_size:
        raise SpecError(
            f"{type(source).__name__}.{STAGES[stage][0]}() gave a batch of {got} samples with "
            f"{name}={batch_size}: it does not batch by {name}. Build its DataLoader with "
            f"batch_size=self.{name} (or self.hparams.{name})"
        )
    return size


def _single_process(loader: Any) -> Any:
    """The loader, loading in this process: worker processes would run outside the trial's
    accounting (the same data set, sampler and collate function)."""
    import torch

    if not isinstance(loader, torch.utils.data.DataLoader) or loader.num_workers == 0:
        return loader
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(
            loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
        )  # fmt: skip
    return torch.utils.data.DataLoader(
        loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn
    )


@contextlib.contextmanager
def _on_cpu(module: Any) -> Iterator[None]:
    """The module on the CPU meanwhile (its tensors on a GPU cannot travel to a trial, and
    the trials need that memory), then back where it was: ``.to()`` keeps the parameter
    objects, so the trainer's optimizer still refers to them."""
    import torch

    params = list(module.parameters())
    where = params[0].device if params else torch.device("cpu")
    if where.type == "cpu":
        yield
        return
    module.to("cpu")
    try:
        yield
    finally:
        module.to(where)
