"""bsfinder for a Hugging Face ``transformers.Trainer``: its per-device train and eval batches.

:func:`fit_trainer_batch_size` probes the trainer's own model, data collator, optimizer
settings and precision on batches its collator builds from real samples of its
``train_dataset`` (the longest ones: a padded batch peaks on its longest samples), each
trial in a fresh process (:func:`bsfinder.find_batch_size` with ``train_step=``). It then
sets ``per_device_train_batch_size`` and ``gradient_accumulation_steps`` so that the global
batch the user configured (per-device x accumulation x world size) is kept, and
``per_device_eval_batch_size`` from a search of an evaluation step. Two standing
``transformers`` complaints are answered: the effective batch changing silently when
``auto_find_batch_size`` cuts the per-device batch (huggingface/transformers#33281) and the
eval batch never being searched (huggingface/transformers#32215).

:class:`BsfinderCallback` does the same as a ``TrainerCallback``, given to
``Trainer(callbacks=[...])``: it runs at ``on_init_end``, the one event before
``Trainer.train`` builds its train dataloader. That event is handed ``args``, the model and
the tokenizer but not the trainer, its dataset nor its collator, and ``Trainer.__init__``
has by then copied ``args.train_batch_size`` into ``trainer._train_batch_size`` (what
``get_train_dataloader`` reads; transformers 5.x ``trainer.py``): so the callback takes
the trainer from the ``Trainer.__init__`` frame that called it, and sets both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from bsfinder.core.recommend import scale_learning_rate
from bsfinder.errors import SpecError
from bsfinder.options import (
    BudgetOptions,
    ExecutionOptions,
    Granularity,
    SearchOptions,
    check_option,
)

_CallbackBase: Any
try:  # the callback's base; the functions import transformers when they are called
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is the point of this module
    _CallbackBase = object

if TYPE_CHECKING:
    from bsfinder.core.results import ProbeResult
    from bsfinder.probe import ProbeEvent

__all__ = [
    "BsfinderCallback",
    "TrainerBatchFit",
    "describe_fit",
    "fit_trainer_batch_size",
    "plan_per_device",
]

_log = logging.getLogger(__name__)

#: samples read from the dataset (evenly spaced) to build the probe's batches from
DEFAULT_SAMPLE_SIZE = 512
#: a per-device batch below this fraction of what fits is worth a note (global batch kept)
_LOW_USE = 0.5


@dataclass(frozen=True)
class TrainerBatchFit:
    """What :func:`fit_trainer_batch_size` found and set on the trainer.

    Attributes:
        per_device_train_batch_size: the per-device batch set (it fitted, at the granularity).
        gradient_accumulation_steps: set so that per-device x accumulation is the user's.
        per_device_eval_batch_size: the largest evaluation batch that fits (None: not
            searched, ``eval=False``).
        learning_rate: the learning rate set (the user's unless the global batch changed).
        user_per_device_train_batch_size, user_gradient_accumulation_steps,
        user_learning_rate: the trainer's values before the call.
        world_size: data-parallel processes (``args.world_size``), unchanged.
        train: the probe of the training step; eval: of the evaluation step (or None).
        applied: the values were set on the trainer (``apply=True``).
        notes: what the user should know (the global batch not kept, a low per-device batch).
    """

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    per_device_eval_batch_size: int | None
    learning_rate: float
    user_per_device_train_batch_size: int
    user_gradient_accumulation_steps: int
    user_learning_rate: float
    world_size: int
    train: ProbeResult
    eval: ProbeResult | None
    applied: bool
    notes: tuple[str, ...] = ()

    @property
    def user_global_batch(self) -> int:
        """Per-device x accumulation x world size, as the user configured it."""
        return (
            self.user_per_device_train_batch_size
            * self.user_gradient_accumulation_steps
            * self.world_size
        )

    @property
    def global_batch(self) -> int:
        """Per-device x accumulation x world size, as set."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def global_batch_kept(self) -> bool:
        return self.global_batch == self.user_global_batch


def plan_per_device(
    per_rank_batch: int, max_fit: int, *, keep_global_batch: bool = True
) -> tuple[int, int]:
    """The per-device batch and accumulation for ``per_rank_batch`` samples per optimizer step
    on each rank (per-device x accumulation as the user configured it), when ``max_fit`` fits.

    Keeping the global batch, the per-device batch is the largest divisor of
    ``per_rank_batch`` that fits (fewest accumulation steps, exactly the same global batch).
    Otherwise it is ``max_fit`` (or ``per_rank_batch`` when that is less) with the
    accumulation rounded to the nearest (at least 1): the global batch then changes.

    Raises:
        SpecError: a non-positive value.

    Example:
        >>> plan_per_device(64, 24)
        (16, 4)
        >>> plan_per_device(64, 24, keep_global_batch=False)
        (24, 3)
    """
    if per_rank_batch < 1 or max_fit < 1:
        raise SpecError(f"batches must be >= 1, got {per_rank_batch} and {max_fit}")
    if per_rank_batch <= max_fit:
        return per_rank_batch, 1
    if not keep_global_batch:
        return max_fit, max(1, round(per_rank_batch / max_fit))
    best = max(d for d in range(1, max_fit + 1) if per_rank_batch % d == 0)
    return best, per_rank_batch // best


def fit_trainer_batch_size(
    trainer: Any,
    *,
    memory_limit: int | str | None = None,
    device: str = "auto",
    granularity: Granularity = SearchOptions.granularity,
    eval: bool = True,
    keep_global_batch: bool = True,
    apply: bool = True,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    time_limit: float | str | None = SearchOptions.time_limit,
    isolation: str = ExecutionOptions.isolation,
    on_event: Callable[[ProbeEvent], None] | None = None,
) -> TrainerBatchFit:
    """Find and set a ``transformers.Trainer``'s per-device train and eval batch sizes.

    Call it before ``trainer.train()``. The training step probed is the trainer's: its
    model (a copy per trial process; yours is left as it was), its data collator (with the
    unused columns removed, as ``Trainer`` does) on real samples of ``train_dataset``, the
    longest first, its optimizer (``optimizers=``, ``optimizer_cls_and_kwargs`` or
    ``args.optim``, AdamW by default, with its weight-decay groups), ``args.bf16`` /
    ``args.fp16`` autocast, ``max_grad_norm`` clipping and activation checkpointing.
    ``auto_find_batch_size`` shrinks the per-device batch and with it the effective batch
    (huggingface/transformers#33281); here the accumulation makes up the difference, so
    per-device x accumulation stays what you configured and the learning rate is left alone.
    The eval batch, which ``Trainer`` never searches (huggingface/transformers#32215), is
    found with an evaluation step (``model.eval()``, ``torch.no_grad()``, forward and loss,
    the outputs kept to the end of the step as ``prediction_step`` keeps them unless
    ``prediction_loss_only``), beside the optimizer's state when ``args.eval_strategy``
    evaluates during training.

    Args:
        trainer: a ``transformers.Trainer`` with a ``train_dataset``.
        memory_limit: per-device budget, bytes or text like ``"24GiB"`` (see
            :func:`bsfinder.find_batch_size`; CPU: default 90% of the available RAM).
        device: ``"auto"`` (the trainer's ``args.device``), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        granularity: the per-device batches are multiples of this (``1``: exact, ``"pow2"``).
        eval: also find ``per_device_eval_batch_size`` (on ``eval_dataset``, else the
            training data), searched up to the size of that data set.
        keep_global_batch: keep per-device x accumulation exactly (the per-device batch is
            then the largest divisor of it that fits). False: the largest batch that fits,
            the accumulation rounded, and the learning rate scaled to the new global batch
            (square root for Adam-family, linear for SGD).
        apply: set the values on the trainer (``trainer.args``, ``trainer._train_batch_size``).
        sample_size: samples read (evenly spaced) from each data set; batches cycle through
            them longest first.
        time_limit: seconds (or ``"5m"``) for each search (see :func:`bsfinder.find_batch_size`).
        isolation: ``"auto"``, ``"process"`` (fresh trial processes, or an error saying why
            not) or ``"inline"``.
        on_event: progress callback (:class:`~bsfinder.probe.ProbeEvent`).

    Returns:
        A frozen :class:`TrainerBatchFit` with both probes' results.

    Raises:
        SpecError: no train dataset, a collator whose batches carry no labels (the model
            returns no loss), bad options, or not even batch 1 fits.

    Example:
        >>> fit = fit_trainer_batch_size(trainer, memory_limit="8GiB")  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """
    from bsfinder.api import find_batch_size

    args = trainer.args
    if getattr(trainer, "train_dataset", None) is None:
        raise SpecError("the trainer has no train_dataset: give Trainer(train_dataset=...)")
    _check_sample_size(sample_size)
    world = max(1, int(getattr(args, "world_size", 1)))
    if world > 1:
        raise SpecError(
            f"this process is one of {world} data-parallel ranks: run fit_trainer_batch_size "
            "in a single process (same model, data and budget per device), then launch with "
            "the per-device batch and accumulation it found"
        )
    user_per_device = int(args.per_device_train_batch_size)
    user_accumulation = int(args.gradient_accumulation_steps)
    user_lr = float(args.learning_rate)
    per_rank = user_per_device * user_accumulation
    model = trainer.model
    probe_device = str(args.device) if device == "auto" else device
    notes: list[str] = []
    if type(trainer).compute_loss is not _trainer_class().compute_loss:
        notes.append(
            f"{type(trainer).__name__}.compute_loss is overridden; the probe's loss is the "
            "model's own (outputs.loss): memory the override adds is not measured"
        )
    common: dict[str, Any] = dict(
        device=probe_device, memory_limit=memory_limit, granularity=granularity,
        time_limit=time_limit, isolation=isolation, on_event=on_event,
    )  # fmt: skip
    with _model_on_cpu(model):
        train_samples = _samples(trainer, trainer.train_dataset, "training", sample_size)
        train_step = _TrainerStep(
            model,
            collate=_collator(trainer, "training"),
            samples=train_samples,
            device=probe_device,
            precision=_precision(args),
            training=True,
            optimizer=_optimizer(trainer),
            decay_names=tuple(trainer.get_decay_parameter_names(model)),
            weight_decay=float(args.weight_decay),
            max_grad_norm=float(args.max_grad_norm or 0.0),
            checkpointing=_checkpointing(args),
            keep_outputs=False,
        )
        train_step.check_loss(trainer)
        # per-device x accumulation bounds the useful per-device batch when it is kept
        train = find_batch_size(
            train_step=train_step, max_batch=per_rank if keep_global_batch else None, **common
        )
        evaluated: ProbeResult | None = None
        if eval:
            data = trainer.eval_dataset if trainer.eval_dataset is not None else None
            if isinstance(data, dict):  # several eval sets: the largest batch fits all
                data = next(iter(data.values())) if len(data) == 1 else None
                if data is None:
                    raise SpecError("several eval datasets: pass eval=False, or evaluate one")
            data = data if data is not None else trainer.train_dataset
            eval_step = dataclasses.replace(
                train_step,
                collate=_collator(trainer, "evaluation"),
                samples=_samples(trainer, data, "evaluation", sample_size),
                training=False,
                # evaluation during training runs beside the optimizer's state
                optimizer=train_step.optimizer if _evaluates_in_training(args) else None,
                checkpointing=None,
                keep_outputs=not args.prediction_loss_only,
            )
            evaluated = find_batch_size(train_step=eval_step, max_batch=_size(data), **common)
    if not train.max_batch:
        raise SpecError(
            f"batch 1 of the trainer's training step does not fit in the budget on "
            f"{probe_device} ({_tried(train)}): lower the model's memory (bf16=True, "
            "gradient_checkpointing=True) or raise memory_limit"
        )
    per_device, accumulation = plan_per_device(
        per_rank, train.max_batch, keep_global_batch=keep_global_batch
    )
    lr = user_lr
    if per_device * accumulation != per_rank:
        rule = "linear" if "sgd" in str(args.optim).lower() else "sqrt"
        lr = scale_learning_rate(
            base_lr=user_lr, base_batch=per_rank * world,
            batch_size=per_device * accumulation * world, rule=rule,
        ).lr  # fmt: skip
        notes.append(
            f"the global batch changes from {per_rank * world} to "
            f"{per_device * accumulation * world} (keep_global_batch=False): the learning "
            f"rate is scaled by the {rule} rule, {user_lr:g} -> {lr:g}"
        )
    elif per_device < _LOW_USE * train.max_batch:
        notes.append(
            f"{train.max_batch} fits per device, but the largest divisor of your "
            f"per-device x accumulation ({per_rank}) that fits is {per_device}; a multiple "
            f"of {train.max_batch} (e.g. {train.max_batch * math.ceil(per_rank / train.max_batch)}"
            ") as per-device x accumulation would use the device better"
        )
    if getattr(args, "auto_find_batch_size", False):
        notes.append(
            "args.auto_find_batch_size is on: on an out-of-memory error Trainer would still "
            "cut the per-device batch (and the global batch with it, #33281)"
        )
    if apply and trainer.optimizer is not None and lr != user_lr:
        notes.append("the trainer's optimizer already exists: set its learning rate yourself")
    eval_batch = evaluated.max_batch if evaluated is not None else None
    if evaluated is not None and not eval_batch:
        notes.append(f"no eval batch fits ({_tried(evaluated)}): per_device_eval_batch_size kept")
    if apply:
        values: dict[str, Any] = {
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accumulation,
            "learning_rate": lr,
        }
        if eval_batch:
            values["per_device_eval_batch_size"] = eval_batch
        _set_args(trainer, values)
    return TrainerBatchFit(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=eval_batch,
        learning_rate=lr,
        user_per_device_train_batch_size=user_per_device,
        user_gradient_accumulation_steps=user_accumulation,
        user_learning_rate=user_lr,
        world_size=world,
        train=train,
        eval=evaluated,
        applied=apply,
        notes=tuple(notes),
    )


class BsfinderCallback(_CallbackBase):
    """:func:`fit_trainer_batch_size` as a ``transformers.TrainerCallback``: given to the
    trainer when it is made, it finds and sets the per-device train and eval batches (and
    the accumulation that keeps your global batch) at the end of ``Trainer.__init__``, so
    that ``trainer.train()`` trains with them::

        callback = BsfinderCallback(memory_limit="8GiB")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.train()  # per-device batch and accumulation as found: callback.fit

    It runs at ``on_init_end``, the only event before ``train()`` builds its dataloader.
    That event is not handed the trainer, so the callback takes it from the call stack: the
    ``Trainer.__init__`` that called it. Added to a trainer already made
    (``trainer.add_callback``) it comes too late, and ``train()`` stops at its start with a
    ``SpecError`` saying so, rather than training at the batch you gave.

    Args: as :func:`fit_trainer_batch_size`, keyword-only (the values are always set);
    checked when the callback is made.

    Attributes:
        fit: the :class:`TrainerBatchFit` (None until a trainer was made with it).
    """

    def __init__(
        self,
        *,
        memory_limit: int | str | None = BudgetOptions.memory_limit,
        device: str = "auto",
        granularity: Granularity = SearchOptions.granularity,
        eval: bool = True,
        keep_global_batch: bool = True,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        time_limit: float | str | None = SearchOptions.time_limit,
        isolation: str = ExecutionOptions.isolation,
        on_event: Callable[[ProbeEvent], None] | None = None,
    ) -> None:
        check_option(BudgetOptions, "memory_limit", memory_limit)
        check_option(SearchOptions, "granularity", granularity)
        check_option(SearchOptions, "time_limit", time_limit)
        check_option(ExecutionOptions, "isolation", isolation)
        _check_sample_size(sample_size)
        if not isinstance(device, str):
            raise SpecError(f"device must be a string like 'cuda:0', got {device!r}")
        self._options: dict[str, Any] = dict(
            memory_limit=memory_limit, device=device, granularity=granularity, eval=eval,
            keep_global_batch=keep_global_batch, sample_size=sample_size,
            time_limit=time_limit, isolation=isolation, on_event=on_event,
        )  # fmt: skip
        self.fit: TrainerBatchFit | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Find the trainer that is being made, then fit and set its batches."""
        trainer = _calling_trainer()
        if trainer is None:
            raise SpecError(
                "BsfinderCallback runs when a Trainer is made: pass it as "
                "Trainer(callbacks=[BsfinderCallback(...)])"
            )
        self.fit = fit_trainer_batch_size(trainer, apply=True, **self._options)
        _log.info("%s", describe_fit(self.fit))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse a training run whose batch the callback did not set (it came too late)."""
        if self.fit is None:
            raise SpecError(
                "BsfinderCallback was added after the Trainer was made, so it could not set "
                "the batch before train() built its dataloader: pass it as "
                "Trainer(callbacks=[BsfinderCallback(...)]), or call "
                "fit_trainer_batch_size(trainer) before trainer.train()"
            )


def describe_fit(fit: TrainerBatchFit) -> str:
    """One line of what was set: per-device batch, accumulation, global batch, eval batch.

    Example:
        per_device_train_batch_size 32 -> 64, gradient_accumulation_steps 8 -> 4 (global
        batch 256 kept), per_device_eval_batch_size 64 (96 fit per device)
    """
    text = (
        f"per_device_train_batch_size {fit.user_per_device_train_batch_size} -> "
        f"{fit.per_device_train_batch_size}, gradient_accumulation_steps "
        f"{fit.user_gradient_accumulation_steps} -> {fit.gradient_accumulation_steps} "
        f"(global batch {fit.user_global_batch}"
        + (" kept)" if fit.global_batch_kept else f" -> {fit.global_batch})")
    )
    if fit.per_device_eval_batch_size:
        text += f", per_device_eval_batch_size {fit.per_device_eval_batch_size}"
    text += f" ({fit.train.max_batch} fit per device)"
    return "; ".join([text, *fit.notes])


def _calling_trainer() -> Any:
    """The ``Trainer`` whose ``__init__`` is on the call stack (innermost first), or None."""
    trainer_class = _trainer_class()
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(candidate, trainer_class):
            return candidate
        frame = frame.f_back
    return None


def _check_sample_size(sample_size: Any) -> None:
    if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
        raise SpecError(f"sample_size must be a positive integer, got {sample_size!r}")


# -- the step a trial process runs -----------------------------------------------------------
@dataclass
class _TrainerStep:
    """One step of the trainer's loop at a batch size, run in a trial process.

    It travels there with a copy of the model, the collator and the samples; the model is
    moved to the device, and the optimizer made, on the first call (training memory).
    """

    model: Any
    collate: Callable[[list[Any]], Any]
    samples: Sequence[Any]
    device: str
    precision: str
    training: bool
    #: (optimizer class, keyword arguments), None for the evaluation step
    optimizer: tuple[Any, dict[str, Any]] | None
    decay_names: tuple[str, ...]
    weight_decay: float
    max_grad_norm: float
    #: activation checkpointing keyword arguments, None: off
    checkpointing: dict[str, Any] | None
    keep_outputs: bool
    _state: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def batch(self, batch_size: int) -> Any:
        """The collated batch of ``batch_size`` samples, cycling through the longest first."""
        n = len(self.samples)
        return self.collate([self.samples[i % n] for i in range(batch_size)])

    def check_loss(self, trainer: Any) -> None:
        """The collator's batches carry what makes the model return a loss."""
        batch = self.batch(1)
        keys = set(batch) if hasattr(batch, "keys") else set()
        labels = list(getattr(trainer, "label_names", None) or ["labels"])
        if keys and not any(k in keys for k in (*labels, "return_loss")):
            raise SpecError(
                f"the trainer's collator gives batches with {sorted(keys)} and no "
                f"{' or '.join(labels)}: the model returns no loss to train on; use a "
                "collator that adds labels (e.g. DataCollatorForLanguageModeling(tokenizer, "
                "mlm=False) for a causal language model)"
            )

    def __call__(self, batch_size: int) -> None:
        import torch

        state = self._state
        if not state:
            self._set_up(torch)
        if state.get("size") != batch_size:
            state["size"], state["inputs"] = batch_size, None
            state["inputs"] = _to_device(self.batch(batch_size), self.device)
        inputs = state["inputs"]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        device_type = torch.device(self.device).type
        autocast = torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()
        if not self.training:
            with torch.no_grad(), autocast:
                outputs = self.model(**inputs)
                loss = _loss_of(outputs)
                kept = outputs if self.keep_outputs else None
            del outputs, loss, kept
            return
        with autocast:
            outputs = self.model(**inputs)
            loss = _loss_of(outputs)
        del outputs  # Trainer.training_step keeps the loss only
        optimizer, scaler = state["optimizer"], state["scaler"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.model.zero_grad(set_to_none=True)

    def _set_up(self, torch: Any) -> None:
        self.model.to(self.device)
        if self.checkpointing is not None and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=self.checkpointing
            )
        self.model.train(self.training)
        self._state["optimizer"] = self._state["scaler"] = None
        if self.optimizer is not None:
            cls, kwargs = self.optimizer
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups: list[dict[str, Any]] = [
                {"params": [p for n, p in named if n in self.decay_names],
                 "weight_decay": self.weight_decay},
                {"params": [p for n, p in named if n not in self.decay_names],
                 "weight_decay": 0.0},
            ]  # fmt: skip
            self._state["optimizer"] = cls([g for g in groups if g["params"]], **kwargs)
            if self.precision == "fp16" and self.training:
                self._state["scaler"] = torch.amp.GradScaler(torch.device(self.device).type)
            if not self.training:  # its state, as after a training step, held through eval
                optimizer = self._state["optimizer"]
                for group in groups:
                    for p in group["params"]:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)


def _loss_of(outputs: Any) -> Any:
    loss = outputs.get("loss") if hasattr(outputs, "get") else outputs[0]
    if loss is None:
        raise ValueError(
            "the model returned no loss from the collator's batch (Trainer would raise the "
            "same): give labels"
        )
    return loss


def _to_device(batch: Any, device: str) -> Any:
    if hasattr(batch, "items"):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    raise SpecError(
        f"the trainer's collator returned a {type(batch).__name__}; Trainer calls the model "
        "with model(**batch): a mapping of input names"
    )


# -- reading the trainer ---------------------------------------------------------------------
def _trainer_class() -> Any:
    from transformers import Trainer

    return Trainer


def _evaluates_in_training(args: Any) -> bool:
    """``Trainer`` evaluates between training steps (its optimizer's state then held)."""
    strategy = getattr(args, "eval_strategy", None) or getattr(args, "evaluation_strategy", "no")
    return str(getattr(strategy, "value", strategy)) != "no"


def _precision(args: Any) -> str:
    return (
        "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else ""
    )


def _checkpointing(args: Any) -> dict[str, Any] | None:
    """Activation checkpointing's keyword arguments when it is on (4.x and 5.x names)."""
    for flag, kwargs in (
        ("activation_checkpointing", "activation_checkpointing_kwargs"),
        ("gradient_checkpointing", "gradient_checkpointing_kwargs"),
    ):
        if getattr(args, flag, False):
            found = dict(getattr(args, kwargs, None) or {})
            for key in ("every_n_layers", "offload"):
                found.pop(key, None)
            return found
    return None


def _optimizer(trainer: Any) -> tuple[Any, dict[str, Any]]:
    """The class and keyword arguments the trainer would build its optimizer with."""
    if trainer.optimizer is not None:  # Trainer(optimizers=(opt, sched))
        opt = trainer.optimizer
        return type(opt), {k: v for k, v in opt.defaults.items() if k != "params"}
    given = getattr(trainer, "optimizer_cls_and_kwargs", None)
    cls, kwargs = (
        given
        if given is not None
        else trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    )
    if "params" in kwargs or "model" in kwargs:
        raise SpecError(
            f"optimizer {trainer.args.optim!r} builds its own parameter groups from the model; "
            "bsfinder cannot rebuild it in a trial process: probe with optim='adamw_torch'"
        )
    return cls, dict(kwargs)


def _collator(trainer: Any, description: str) -> Callable[[list[Any]], Any]:
    """The trainer's collator as its dataloaders use it (unused columns removed)."""
    from transformers.data.data_collator import default_data_collator

    collate = trainer.data_collator or default_data_collator
    wrap = getattr(trainer, "_get_collator_with_removed_columns", None)
    return wrap(collate, description=description) if wrap is not None else collate


def _length(sample: Any) -> int:
    """A sample's length: its longest sequence (0 when it has none)."""
    values = sample.values() if hasattr(sample, "values") else (
        sample if isinstance(sample, (list, tuple)) else ()
    )  # fmt: skip
    lengths = [0]
    for value in values:
        shape = getattr(value, "shape", None)
        if shape is not None:
            lengths.append(int(shape[0]) if len(shape) else 1)
        elif isinstance(value, (list, tuple)):
            lengths.append(len(value))
    return max(lengths)


def _samples(trainer: Any, dataset: Any, description: str, count: int) -> list[Any]:
    """Up to ``count`` real samples of ``dataset``, evenly spaced, the longest first."""
    with contextlib.suppress(ImportError):
        import datasets

        if isinstance(dataset, datasets.Dataset) and hasattr(trainer, "_remove_unused_columns"):
            dataset = trainer._remove_unused_columns(dataset, description=description)
    size = _size(dataset)
    if size is not None:
        if size == 0:
            raise SpecError(f"the trainer's {description} dataset is empty")
        step = max(1, size // count)
        picked = [dataset[i] for i in range(0, size, step)][:count]
    else:  # an iterable data set: its first samples
        picked = []
        for sample in dataset:
            picked.append(sample)
            if len(picked) == count:
                break
        if not picked:
            raise SpecError(f"the trainer's {description} dataset yielded no sample")
    return sorted(picked, key=_length, reverse=True)


def _size(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


@contextlib.contextmanager
def _model_on_cpu(model: Any) -> Iterator[None]:
    """The user's model on the CPU while the trial processes take their copies (and the
    device's memory is theirs), back where it was afterwards."""
    devices = {p.device for p in model.parameters()}
    if all(d.type == "cpu" for d in devices):
        yield
        return
    (where,) = devices if len(devices) == 1 else (None,)
    if where is None:
        raise SpecError("the model is spread over several devices; fit it on one")
    model.to("cpu")
    try:
        yield
    finally:
        model.to(where)


def _set_args(trainer: Any, values: dict[str, Any]) -> None:
    """Set ``values`` on the trainer's arguments (replaced when they are frozen) and the
    batch ``Trainer.get_train_dataloader`` reads (``_train_batch_size``)."""
    args = trainer.args
    try:
        for name, value in values.items():
            setattr(args, name, value)
    except dataclasses.FrozenInstanceError:
        trainer.args = dataclasses.replace(args, **values)
    trainer._train_batch_size = trainer.args.train_batch_size


def _tried(result: ProbeResult) -> str:
    return "tried " + " ".join(f"{t.batch_size}{'✓' if t.fits else '✗'}" for t in result.trials)
