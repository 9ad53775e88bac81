"""The options of a probe, a profile and an estimate: each declared once.

An option is a field of a frozen group: its default (readable as a class attribute,
``SearchOptions.granularity == 8``, so the API's signatures and the CLI's flags take it from
here), its help text and its check. A group checks its fields when it is made and raises
:class:`~bsfinder.errors.SpecError` with one wording per check; the CLI runs the same check
on a flag (see ``cli/_options.py``). Standard library only: the search (``core/``) imports it.

The groups::

    WorkloadOptions   the training step: inputs, optimizer, precision, loss, outputs, kwargs
    SearchOptions     where the search starts and stops, and how exact its answer is
    BudgetOptions     the user's memory budget (``memory_limit``, bytes once checked)
    RecommendOptions  what is recommended from the trials: headroom, learning rate, plan
    ExecutionOptions  where and how trials run: device, isolation, steps, timeout, strategy

Two sizes are not the budget: ``target_memory`` is a card you plan for (profile, estimate),
and ``scale-out --memory`` the memory of each rank of a plan; both are parsed with
:func:`size_bytes`, as the budget is.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeAlias

from bsfinder.errors import SpecError
from bsfinder.units import MAX_BYTES, parse_bytes, parse_duration

__all__ = [
    "DEFAULT_TIME_LIMIT_S",
    "DEFAULT_TRIAL_TIMEOUT_S",
    "ISOLATIONS",
    "LOSSES",
    "LR_RULES",
    "MODES",
    "OPTIMIZERS",
    "PRECISIONS",
    "STRATEGIES",
    "BudgetOptions",
    "ExecutionOptions",
    "Granularity",
    "RecommendOptions",
    "SearchOptions",
    "WorkloadOptions",
    "check_option",
    "choices_of",
    "default_of",
    "help_of",
    "size_bytes",
]

#: a multiple of this (1 for exact), or "pow2" to stop after the powers of two
Granularity: TypeAlias = int | Literal["pow2"]

#: the longest a trial process may go without progress before any step is timed (start-up,
#: model build, the first trial); a 1.5B-parameter model builds and steps within it on CPU
DEFAULT_TRIAL_TIMEOUT_S = 900.0
#: the probe's default time limit: a first run on a laptop's CPU ends in minutes, whatever
#: the budget (measured: SmallCNN at 3x64x64 under the default 20 GiB budget would take over
#: 15 minutes to reach its edge at batch ~5,700, its trial at 512 alone 27 s)
DEFAULT_TIME_LIMIT_S = 90.0

OPTIMIZERS = ("adamw", "adam", "sgd", "none")
PRECISIONS = ("32", "bf16-mixed", "fp16-mixed", "bf16-true")
LOSSES = ("auto", "mean", "cross-entropy")
LR_RULES = ("auto", "linear", "sqrt", "noise", "none")
ISOLATIONS = ("auto", "process", "inline")
#: what a trial's step runs: ``train`` (forward, loss, backward, optimizer step), ``eval``
#: (``model.eval()``, ``torch.no_grad()``: forward and loss) or ``infer``
#: (``model.eval()``, ``torch.inference_mode()``: forward only)
MODES = ("train", "eval", "infer")
CHECKPOINTING = ("none", "blocks")
#: ``ddp``: DistributedDataParallel; ``fsdp``: FSDP2 ``fully_shard``; ``none``: the process
#: group is set up but the model is not wrapped (a ``train_step`` that wraps its own)
STRATEGIES = ("ddp", "fsdp", "none")

#: a check takes the option's name and the given value, and returns the value to keep
Check = Callable[[str, Any], Any]


def _is_int(value: Any) -> bool:
    """An integer, or what indexes as one (a NumPy integer); not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _at_least(minimum: int, why: str = "") -> Check:
    """An integer ``>= minimum``."""

    def check(name: str, value: Any) -> int:
        if not _is_int(value):
            raise SpecError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise SpecError(f"{name} must be >= {minimum}{why}, got {value!r}")
        return operator.index(value)

    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise SpecError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _granularity(name: str, value: Any) -> Granularity:
    if value == "pow2":
        return "pow2"
    if not _is_int(value) or value < 1:
        raise SpecError(f"{name} must be a positive integer or 'pow2', got {value!r}")
    return int(value)


def _fraction(name: str, value: Any) -> float:
    """A fraction in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise SpecError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    """A number > 0 (infinity included: no limit)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SpecError(f"{name} must be > 0, got {value!r}")
    return value


def size_bytes(value: int | str | None, what: str = "memory limit") -> int | None:
    """A memory size in bytes, from bytes or text like ``"24GiB"`` (None stays None).

    Raises:
        SpecError: not a size, not positive, or 2**63 bytes or more.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ValueError as exc:
            raise SpecError(f"{what}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{what} must be bytes or text like '4GiB', got {value!r}")
    if not 1 <= value < MAX_BYTES:  # also NaN and infinity
        raise SpecError(f"{what} must be a positive number of bytes, got {value}")
    return int(value)


def _memory_limit(name: str, value: Any) -> int | None:
    return size_bytes(value)


#: the time limit's "no limit"
NO_TIME_LIMIT = ("none", "off", "0")


def _time_limit(name: str, value: Any) -> float | None:
    """Seconds > 0 from a number or text (``"90s"``, ``"5m"``); ``"none"``: no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in NO_TIME_LIMIT):
        return None
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise SpecError(f"{name}: {exc}, or none for no limit") from None
    if value == math.inf:
        return None
    return float(_positive(name, value))


def _about(help: str, check: Check | None = None, **extra: Any) -> dict[str, Any]:
    """A field's metadata: its help (the CLI's too) and its check (None: checked where the
    value is used, e.g. by :class:`~bsfinder.workload.step.WorkloadSpec`). ``choices``: the
    values a CLI flag offers. A field whose default is None accepts None unchecked."""
    return {"help": help, "check": check, **extra}


def _checked(f: Any, value: Any, name: str) -> Any:
    """Field ``f``'s check run on ``value`` (named ``name`` in its message): the value to
    keep. A field without a check keeps what it is given; None passes where it is the default."""
    check = f.metadata.get("check")
    if check is None or (value is None and f.default is None):
        return value
    return check(name, value)


class _Group:
    """A frozen option group: each field checked, in order, when the group is made."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name), f.name))
        self._check_together()

    def _check_together(self) -> None:
        """Checks that read several fields."""


@dataclass(frozen=True)
class WorkloadOptions(_Group):
    """The training step to measure (checked by ``WorkloadSpec`` where it is built)."""

    inputs: Sequence[Any] | None = field(  # spec strings or InputSpecs
        default=None,
        metadata=_about(
            "One sample's input, e.g. 3x224x224, 128:int64:50257, labels=:int64:10. "
            "Repeat for several inputs; NAME= passes it as a keyword."
        ),
    )
    model_kwargs: dict[str, Any] | None = field(
        default=None, metadata=_about("Keyword arguments for the model class or factory.")
    )
    optimizer: Any = field(
        default="adamw",
        metadata=_about(
            "adamw, adam, sgd (momentum 0.9) or none; an optimizer object: its family.",
            choices=OPTIMIZERS,
        ),
    )
    precision: str = field(
        default="32",
        metadata=_about(
            "32; bf16-mixed or fp16-mixed: autocast, float32 weights (fp16 with a "
            "GradScaler); bf16-true: weights, gradients, optimizer state and float inputs in "
            "bfloat16, no autocast.",
            choices=PRECISIONS,
        ),
    )
    loss: str = field(
        default="auto",
        metadata=_about(
            "auto: the model's own loss if it returns one, else the mean of its outputs.",
            choices=LOSSES,
        ),
    )
    mode: str = field(
        default="train",
        metadata=_about(
            "train: forward, loss, backward, optimizer step; eval: model.eval() and no_grad, "
            "forward and loss; infer: model.eval() and inference_mode, forward only. Each "
            "has its own largest batch and throughput.",
            _one_of(MODES),
            choices=MODES,
        ),
    )
    batches: Any = field(
        default=None,
        metadata=_about(
            "Real samples as the batch source: a Dataset, a DataLoader (its dataset and "
            "collate_fn) or a function returning one (pkg.mod:obj); each trial batch is the "
            "largest samples, collated."
        ),
    )
    forward_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata=_about(
            'Keyword arguments passed to every forward call, e.g. {"return_loss": true}.'
        ),
    )
    checkpointing: str = field(
        default="none",
        metadata=_about(
            "blocks: activation checkpointing of the model's repeated blocks (its "
            "nn.ModuleList's elements; a Hugging Face model's own switch), recomputed in the "
            "backward instead of kept: less memory per sample, a slower step. Not with a "
            "train_step.",
            _one_of(CHECKPOINTING),
            choices=CHECKPOINTING,
        ),
    )
    keep_outputs: bool = field(
        default=False,
        metadata=_about(
            "Keep the model's outputs (logits) alive through backward and the optimizer "
            "step, as a loop that holds them does (default: released once the loss is taken, "
            "as HF Trainer, Lightning and `loss = model(x).loss` loops do)."
        ),
    )


@dataclass(frozen=True)
class SearchOptions(_Group):
    """Where the search starts and stops, and how exact its answer is."""

    start_batch: int = field(
        default=1, metadata=_about("First batch tried (then grown 4x).", _at_least(1))
    )
    max_batch: int | None = field(
        default=None, metadata=_about("Never try a larger batch.", _at_least(1))
    )
    granularity: Granularity = field(
        default=8, metadata=_about("Answer to a multiple of this; 1 for exact; pow2.", _granularity)
    )
    memory_model: bool = field(
        default=True,
        metadata=_about("Jump near the answer along a fitted peak = a + k*batch line."),
    )
    time_limit: float | str | None = field(
        default=DEFAULT_TIME_LIMIT_S,
        metadata=_about(
            f"Stop starting trials that would end after this (default "
            f"{DEFAULT_TIME_LIMIT_S:.0f}s; e.g. 10m; none: no limit): the answer is then what "
            "the trials so far established, marked partial, with where the memory line puts "
            "the edge and what one more trial would cost.",
            _time_limit,
        ),
    )

    @property
    def time_limit_s(self) -> float | None:
        """The limit in seconds (None: none)."""
        assert self.time_limit is None or isinstance(self.time_limit, float)
        return self.time_limit


@dataclass(frozen=True)
class BudgetOptions(_Group):
    """The user's memory budget: what a probe or profile may use on this device.

    ``memory_limit`` is given as bytes or text (``"24GiB"``) and kept as bytes once checked
    (:attr:`memory_limit_bytes`). CPU: the trial processes' limit, between
    ``MIN_CPU_BUDGET`` and what this machine or container holds (``devices/cpu.py`` checks
    that range, and decides the default once the device is known); CUDA: a cap on the
    allocator, to plan for a smaller card.
    """

    memory_limit: int | str | None = field(
        default=None,
        metadata=_about(
            "CPU: the memory budget (default 90% of the available RAM, or of the container's "
            "memory limit minus its use if less). GPU: cap the allocator, e.g. 24GiB.",
            _memory_limit,
        ),
    )

    @property
    def memory_limit_bytes(self) -> int | None:
        """The budget in bytes (None: the device's default)."""
        assert self.memory_limit is None or isinstance(self.memory_limit, int)
        return self.memory_limit


@dataclass(frozen=True)
class RecommendOptions(_Group):
    """What is recommended from the trials: the safe batch, the learning rate, the plan."""

    headroom: float = field(
        default=0.05, metadata=_about("Fraction of capacity the safe batch leaves free.", _fraction)
    )
    base_lr: float | None = field(
        default=None, metadata=_about("A learning rate known to work at --base-batch.", _positive)
    )
    base_batch: int | None = field(
        default=None,
        metadata=_about("The batch the base learning rate was tuned at.", _at_least(1)),
    )
    lr_rule: str = field(
        default="auto",
        metadata=_about(
            "auto: SGD linear (noise-capped with --data), Adam-family sqrt.",
            _one_of(LR_RULES),
            choices=LR_RULES,
        ),
    )
    dataset_size: int | None = field(
        default=None, metadata=_about("Samples per epoch (warm-up in steps).", _at_least(1))
    )
    global_batch: int | None = field(
        default=None,
        metadata=_about(
            "Plan micro-batch x accumulation x GPUs for this global batch.", _at_least(1)
        ),
    )
    gpus: int = field(default=1, metadata=_about("Ranks to plan for.", _at_least(1)))

    def _check_together(self) -> None:
        if self.base_lr is not None and self.base_batch is None:
            raise SpecError(
                "base_lr needs base_batch (the batch size that learning rate was tuned at)"
            )
        if self.global_batch is not None and self.global_batch % self.gpus:
            raise SpecError(
                f"global batch {self.global_batch} does not split evenly over {self.gpus} GPUs"
            )


@dataclass(frozen=True)
class ExecutionOptions(_Group):
    """Where and how the trials run."""

    device: str = field(default="auto", metadata=_about("auto, cpu, cuda or cuda:N."))
    isolation: str = field(
        default="auto",
        metadata=_about(
            "process: a worker restarted after every failure; inline: this process; auto: "
            "process when the workload can travel there.",
            _one_of(ISOLATIONS),
            choices=ISOLATIONS,
        ),
    )
    warmup_steps: int = field(
        default=1,
        metadata=_about(
            "Untimed steps per trial (the first creates the optimizer state).", _at_least(0)
        ),
    )
    steps: int = field(
        default=3,
        metadata=_about(
            "Timed steps per trial.", _at_least(1, " (a trial must time at least one step)")
        ),
    )
    trial_timeout_s: float | None = field(
        default=None,
        metadata=_about(
            f"Longest silence before any step is timed (start-up, first trial; default "
            f"{DEFAULT_TRIAL_TIMEOUT_S:.0f}); after that a trial may go 10x its predicted step "
            "time without progress, at least 30 s or this when given, before it is stopped and "
            "judged a hang.",
            _positive,
        ),
    )
    strategy: str | None = field(
        default=None,
        metadata=_about(
            "Under torchrun, probe on every rank with the model in DDP (the default there) or "
            "FSDP2 (none: unwrapped); without torchrun, a world of one rank.",
            _one_of(STRATEGIES),
            choices=STRATEGIES,
        ),
    )


def _field(group: type[_Group], name: str) -> Any:
    for f in fields(group):
        if f.name == name:
            return f
    raise KeyError(f"{group.__name__} has no option {name!r}")


def help_of(group: type[_Group], name: str) -> str:
    """The option's help text (the CLI's flag shows it)."""
    return str(_field(group, name).metadata["help"])


def choices_of(group: type[_Group], name: str) -> tuple[str, ...]:
    """The values a CLI flag offers for the option."""
    return tuple(_field(group, name).metadata["choices"])


def check_option(group: type[_Group], name: str, value: Any, *, called: str = "") -> Any:
    """Run one option's check on ``value`` (what the group does when it is made) and return
    the value to keep; None passes where the default is None. ``called``: the name the
    caller knows the value by, for the message (``search``'s ``start`` is ``start_batch``).

    Raises:
        SpecError: the value is refused, in the group's words.
    """
    return _checked(_field(group, name), value, called or name)


def default_of(group: type[_Group], name: str) -> Any:
    """The option's default."""
    default = _field(group, name).default
    assert default is not MISSING
    return default
