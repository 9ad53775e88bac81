"""One training step of the user's workload: model + inputs + loss + optimizer + precision.

A :class:`WorkloadSpec` is plain, picklable data that travels to the worker process; a
:class:`Workload` is the live thing built from it (in the worker, or in-process with the
user's own objects).
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bsfinder.errors import SpecError
from bsfinder.options import CHECKPOINTING, LOSSES, MODES, OPTIMIZERS, PRECISIONS
from bsfinder.workload.loading import (
    InputSpec,
    LabelledBatch,
    build_model,
    library_roots,
    load_object,
)

__all__ = [
    "LOSSES",
    "MODES",
    "OPTIMIZERS",
    "PRECISIONS",
    "STEPS_TO_PEAK",
    "Workload",
    "WorkloadSpec",
    "check_input_names",
    "steps_to_peak",
    "trial_recipe",
]

#: Full training steps after which a trial has met its steady-state peak, for bsfinder's own
#: step (every optimizer and precision). Measured (address space above the trial's baseline,
#: peak after 1, 2, 3 and 5 steps; SmallCNN 3x32x32 at 64, a 2-layer GPT-2 at 16): step 2
#: is 6-25 MiB above step 1 (the optimizer state, and gradients that a step without an
#: optimizer keeps, exist only from step 2 on) and steps 3 and 5 are within 0.2 MiB of
#: step 2 for AdamW, SGD with momentum and none, in fp32 and bf16-mixed. Pinned by
#: tests/test_trial_plan.py.
STEPS_TO_PEAK = 2
#: The ``eval`` and ``infer`` modes too, though they have no optimizer state and no
#: gradients: measured (SmallCNN 3x32x32 at 64, fresh processes, peak after 1, 2, 3 and 5
#: steps) 27.3, 31.4, 31.4, 30.9 MiB in eval and 27.3, 30.9, 31.4, 31.0 MiB in infer: the
#: second step's outputs are allocated while the first's batch-sized buffers are still held.
#: Pinned by tests/test_modes.py.


def steps_to_peak(recipe: int, *, user_step: bool) -> int:
    """Steps an untimed trial runs to decide whether a batch fits: :data:`STEPS_TO_PEAK`
    for bsfinder's step, the whole ``recipe`` (warm-up + timed) for a user's ``train_step``
    (``user_step``), whose lazily created state bsfinder cannot know."""
    return recipe if user_step else min(recipe, STEPS_TO_PEAK)


def trial_recipe(warmup_steps: int, steps: int, *, timed: bool, user_step: bool) -> tuple[int, int]:
    """``(untimed steps, timed steps)`` of a trial: the recipe as given when ``timed``; else
    only the steps to the peak (:func:`steps_to_peak`), the last of them timed when there
    are two or more: one reading of the throughput at a size near the edge, at no extra
    cost (the first step, which creates the optimizer state, never is)."""
    if timed:
        return warmup_steps, steps
    total = steps_to_peak(warmup_steps + steps, user_step=user_step)
    return (total - 1, 1) if total >= 2 else (total, 0)


@dataclass(frozen=True)
class WorkloadSpec:
    """Picklable description of what one training step does.

    Exactly one of ``model`` (a ``module:Attr`` spec), ``model_file`` (a module object saved
    with ``torch.save``) or ``train_step`` (the user's own step) drives the step.
    ``model_factory``, ``make_batch`` and ``train_step`` are serialised by
    :mod:`bsfinder.execution.placement` (``torch.save`` with cloudpickle: code from a script
    by value, tensors as records).
    ``keep_outputs``: keep the model's outputs alive through backward and the optimizer step
    (a loop that holds them); by default they are released once the loss is taken.
    """

    model: str | None = None
    model_factory: bytes | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    model_file: str | None = None
    model_label: str = ""
    inputs: tuple[InputSpec, ...] = ()
    make_batch: bytes | None = None
    train_step: bytes | None = None
    optimizer: str = "adamw"
    precision: str = "32"
    loss: str = "auto"
    keep_outputs: bool = False
    mode: str = "train"
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)
    batches_label: str = ""
    checkpointing: str = "none"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"--optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise SpecError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.loss not in LOSSES:
            raise SpecError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if not isinstance(self.keep_outputs, bool):
            raise SpecError(f"keep_outputs must be True or False, got {self.keep_outputs!r}")
        if self.mode not in MODES:
            raise SpecError(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.checkpointing not in CHECKPOINTING:
            raise SpecError(
                f"--checkpointing {self.checkpointing!r}: use one of {', '.join(CHECKPOINTING)}"
            )
        if self.mode != "train" and self.train_step is not None:
            raise SpecError(
                f"mode {self.mode!r} is bsfinder's own step (model.eval(), no gradients); a "
                "train_step runs what it runs: measure your eval step as a train_step instead"
            )

    def describe(self) -> dict[str, Any]:
        """What the result records about the workload."""
        return {
            "model": self.model_label or self.model,
            "model_kwargs": dict(self.model_kwargs),
            "inputs": [s.describe() for s in self.inputs],
            "custom_make_batch": self.make_batch is not None,
            "custom_train_step": self.train_step is not None,
            "optimizer": (
                "user" if self.train_step is not None
                else self.optimizer if self.mode == "train" else "none"
            ),
            "precision": self.precision,
            "loss": (
                "user" if self.train_step is not None
                else "none" if self.mode == "infer" else self.loss
            ),
            "keep_outputs": self.keep_outputs,
            "checkpointing": self.checkpointing,
            "mode": self.mode,
            "forward_kwargs": {k: repr(v) for k, v in self.forward_kwargs.items()},
            "batches": self.batches_label or None,
        }  # fmt: skip


def batches_per_call(train_step: Any) -> int:
    """Batches one call of ``train_step`` trains: 1, or its ``batches_per_call`` attribute
    (a step that trains several per call, as the Keras integration's ``model.fit`` of 2
    batches). Trials divide step times by it, so that ``samples_per_s`` is per batch."""
    value = getattr(train_step, "batches_per_call", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(
            f"train_step.batches_per_call is {value!r}: give the whole number of batches "
            "(>= 1) that one call trains"
        )
    return value


class Workload:
    """The live training step. Trials call ``make_batch``, ``begin_trial``, ``step``...

    Live objects (``model``, ``make_batch``, ``train_step``) override the spec: that is how
    the in-process runner uses the user's own objects.

    The order is :meth:`load` (before any budget), then :meth:`rehearse`, :meth:`warm_up`,
    :meth:`prebuild` (as needed, before the budget), :meth:`build` (under it), then per trial
    :meth:`begin_trial`, :meth:`step`..., :meth:`end_trial`. A call out of that order is
    bsfinder's bug and raises ``RuntimeError`` saying which call came too early.
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        device: str,
        *,
        model: Any = None,
        factory: Callable[..., Any] | None = None,
        make_batch: Callable[[int], Any] | None = None,
        train_step: Callable[[int], Any] | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.model: Any = model
        self._factory: Any = factory
        self._make_batch = make_batch
        self._train_step = train_step
        self._optimizer: Any = None
        self._scaler: Any = None
        self._targets: Any = None
        # puts a freshly built CPU model on the device, wrapped (see place_with)
        self._wrap: Callable[[Any], Any] | None = None
        self._prebuilt: Any = None
        self._kept: list[Any] = []
        self._loaded = False
        self._undo: list[Callable[[], None]] = []  # see restore_model
        self.checkpointed_blocks = 0

    def place_with(self, wrap: Callable[[Any], Any] | None) -> None:
        """Have :meth:`build` put the model it creates (on the CPU, in train mode) on the
        device through ``wrap`` (DDP, FSDP; the identity: leave it on the CPU); None:
        ``.to(device)``."""
        self._wrap = wrap

    @property
    def batches_per_step(self) -> int:
        """Batches one :meth:`step` runs (see :func:`batches_per_call`)."""
        return batches_per_call(self._train_step)

    @property
    def has_train_step(self) -> bool:
        """The user's ``train_step`` runs the step (given live or in the spec)."""
        return self._train_step is not None or self.spec.train_step is not None

    def _require(self, method: str, before: str) -> None:
        ready = self._loaded if before == "load" else self.model is not None
        if not ready:
            raise RuntimeError(f"bsfinder's bug: Workload.{method}() was called before {before}()")

    # -- building ---------------------------------------------------------------------------
    def load(self) -> None:
        """Import the user's model code (before any budget: imports are not training memory).

        A ``train_step`` is left to :meth:`build` (its model and optimizer are training
        memory); only the installed libraries it refers to are imported here.
        """
        if self._make_batch is None and self.spec.make_batch is not None:
            self._make_batch = _unpickle(self.spec.make_batch, "make_batch")
        if self._train_step is None and self.spec.train_step is not None:
            _import_libraries(self.spec.train_step)
        if self.model is None and self._factory is None:
            if self.spec.model_factory is not None:
                self._factory = _unpickle(self.spec.model_factory, "the model factory")
            elif self.spec.model:
                self._factory = load_object(self.spec.model)
        self._loaded = True

    def warm_up(self) -> None:
        """One step of a toy model with this optimizer and precision, before the budget.

        The first optimizer, autocast and backward lazily import modules and initialise
        kernels (measured: the first ``AdamW`` adds ~70 MiB of Python modules); that is not
        training memory and must not count against the budget.
        """
        self._require("warm_up", before="load")
        import torch

        toy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        toy.to(self.device, weights_dtype(self.spec.precision))
        saved = self.model, self._train_step, self._make_batch, self.spec
        self.model, self._train_step, self._make_batch = toy, None, None
        self.spec = WorkloadSpec(
            inputs=(InputSpec((8,)),),
            optimizer=self.spec.optimizer if self.spec.train_step is None else "adamw",
            precision=self.spec.precision,
            loss="mean",
            mode=self.spec.mode,
        )
        try:
            self.begin_trial()
            self.step(self.make_batch(2))
        finally:
            self.end_trial()
            self.model, self._train_step, self._make_batch, self.spec = saved

    def build(self) -> None:
        """Create the model on the device, in train mode (under the budget).

        A user's ``train_step`` is unpickled here, under the budget, because importing its
        module may create the model and optimizer the step trains: that is training memory.
        """
        self._require("build", before="load")
        if self._train_step is None and self.spec.train_step is not None:
            self._train_step = _unpickle(self.spec.train_step, "train_step")
        if self._train_step is not None:
            return
        if self.model is None:
            model, self._prebuilt = self._prebuilt, None
            if model is None:
                model = self.create_model("cpu")
            self.check_input_names(model)
            self._adapt(model)
            self.model = self._wrap(model) if self._wrap is not None else model.to(self.device)
        else:
            self._adapt(self.model)
            on = {str(p.device) for p in self.model.parameters()}
            if on and on != {self.device} and on != {self.device.split(":")[0]}:
                raise SpecError(
                    f"the model's parameters are on {', '.join(sorted(on))} but the probe runs "
                    f"on {self.device}; move the model or choose that device"
                )
            self.check_input_names(self.model)
        if self.spec.mode != "train":
            self.model.eval()  # dropout off, batch-norm running statistics: as evaluation
            if self._make_batch is None and not self.spec.inputs:
                raise SpecError("give the model's inputs (--input 3x224x224) or a batch source")
            return
        self.model.train()
        if not any(p.requires_grad for p in self.model.parameters()):
            raise SpecError(
                f"{self.spec.model_label or self.spec.model} has no trainable parameters; "
                "there is nothing to train"
            )
        if self._make_batch is None and not self.spec.inputs:
            raise SpecError("give the model's inputs (--input 3x224x224) or a make_batch function")

    def _adapt(self, model: Any) -> None:
        """The spec's activation checkpointing and weight type (bf16-true), applied to a
        model before it is placed or wrapped (FSDP then shards the checkpointed blocks and
        bf16 weights, as a training job does). A user's own module (inline) is put back by
        :meth:`restore_model`."""
        import torch

        dtype = weights_dtype(self.spec.precision)
        if dtype is not None:
            # cast by hand, not with .to(): each Parameter object kept (tied weights stay
            # tied; fake tensors, which .to() would swap, cannot swap a tied one)
            params = [(p, p.dtype) for p in model.parameters() if p.is_floating_point()]
            buffers = [
                (m, name, b.dtype)
                for m in model.modules()
                for name, b in m._buffers.items()
                if b is not None and b.is_floating_point()
            ]

            def cast(to: Any = None) -> None:
                with torch.no_grad():
                    for p, was in params:
                        p.data = p.data.to(to or was)
                    for m, name, was in buffers:
                        m._buffers[name] = m._buffers[name].to(to or was)

            cast(dtype)
            self._undo.append(cast)
        if self.spec.checkpointing == "none":
            return
        from bsfinder.workload.blocks import checkpoint_blocks

        blocks, undo = checkpoint_blocks(model)
        self._undo.append(undo)
        self.checkpointed_blocks = blocks
        if not blocks:
            raise SpecError(
                f"--checkpointing {self.spec.checkpointing}: "
                f"{self.spec.model_label or self.spec.model} has no blocks to checkpoint "
                "(no nn.ModuleList and no child module with parameters)"
            )

    def restore_model(self) -> None:
        """Undo what :meth:`build` changed in the model (checkpointing, the bf16-true cast),
        last change first: a user's module run inline is left as it was given."""
        while self._undo:
            self._undo.pop()()

    def prebuild(self) -> None:
        """Build the model on the CPU now, before the budget; :meth:`build` then only places
        it (``.to(device)``, or the wrapper of :meth:`place_with`).

        Two uses. The fork server builds the model once for all its trial processes, which
        inherit the weights copy-on-write instead of initialising them again (measured: a
        billion-parameter model took seconds per trial); there the weights are still the
        trial's memory (:meth:`prebuilt_bytes`, counted by the budget). FSDP keeps a shard
        of each weight per rank, and a training job materialises only its shard: there the
        full CPU model is not the trial's memory, and the shards ``fully_shard`` copies out
        of it are. Either way the CPU model's tensors are kept alive (their memory stays in
        the baseline, never freed into the budget's reach).
        """
        self._require("prebuild", before="load")
        self._prebuilt = self.create_model("cpu")
        self._kept = [t.detach() for t in self._prebuilt.state_dict().values()]

    def drop_prebuilt(self) -> None:
        """Forget the model :meth:`prebuild` made: :meth:`build` creates its own."""
        self._prebuilt = None
        self._kept = []

    def prebuilt_storages(self) -> list[tuple[int, int]]:
        """Where the prebuilt model's parameters and buffers live: (address, bytes) of each
        storage once (empty when there is none)."""
        if self._prebuilt is None:
            return []
        storages: dict[int, int] = {}
        tensors = [*self._prebuilt.parameters(), *self._prebuilt.buffers(), *self._kept]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() and storage.device.type == "cpu":
                storages[storage.data_ptr()] = storage.nbytes()
        return sorted(storages.items())

    def prebuilt_bytes(self) -> int:
        """Bytes of the prebuilt model's parameters and buffers, each storage once (0 when
        there is none)."""
        return sum(nbytes for _, nbytes in self.prebuilt_storages())

    def create_model(self, location: str) -> Any:
        """A new model from the spec (a saved module, or the factory) on ``location``, as
        the user's code builds it: not in train mode, not on the device, not wrapped."""
        import torch

        if self.spec.model_file:
            with _loading("the model"):
                model = torch.load(self.spec.model_file, map_location=location, weights_only=False)
            return build_model(model, spec=self.spec.model_label)
        if self._factory is not None:
            return build_model(
                self._factory,
                dict(self.spec.model_kwargs),
                spec=self.spec.model or self.spec.model_label,
            )
        raise SpecError("no model, model spec or train_step was given")

    def rehearse(self) -> bool:
        """Build the model and run forward, loss and backward on the meta device.

        No memory is allocated, but every module the model's construction and forward pass
        import lazily gets imported, and one-time initialisation happens, before the budget
        (measured: a ``transformers`` GPT-2 adds 287 MiB of address space that way, against
        11 MiB for its weights and a step at batch 1). Best effort: returns False when the
        model does not run on the meta device; the real build reports real errors.
        """
        self._require("rehearse", before="load")
        if self.model is not None or self._train_step is not None or self.spec.train_step:
            return False
        import torch

        saved = self.model, self.device, self.spec
        try:
            with torch.device("meta"):
                self.model = self.create_model("meta")
            self.device = "meta"
            self.spec = replace(self.spec, precision="32")
            self.model.train()
            self.step(self.make_batch(2))
        except Exception:
            return False
        finally:
            self.model, self.device, self.spec = saved
            self._targets = None
        return True

    # -- one trial ----------------------------------------------------------------------------
    def make_batch(self, batch_size: int) -> Any:
        """The batch a trial trains on, created once and reused by every step."""
        if self._train_step is not None:
            return batch_size
        if self._make_batch is not None:
            return self._make_batch(batch_size)
        import torch

        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for spec in self.spec.inputs:
            shape = (batch_size, *spec.shape)
            dtype = getattr(torch, spec.dtype)
            if spec.is_integer:
                assert spec.high is not None
                tensor = torch.randint(spec.low, spec.high, shape, device=self.device)
                tensor = tensor.to(dtype)
            else:
                if dtype == torch.float32 and weights_dtype(self.spec.precision) is not None:
                    dtype = weights_dtype(self.spec.precision)  # made in it, not cast per step
                tensor = torch.randn(shape, device=self.device, dtype=dtype)
            if spec.name:
                kwargs[spec.name] = tensor
            else:
                args.append(tensor)
        return tuple(args), kwargs

    def begin_trial(self) -> None:
        """A fresh optimizer (its state appears at the first step, as in real training)."""
        if self._train_step is not None or self.spec.optimizer == "none":
            return
        if self.spec.mode != "train":  # no backward, no optimizer
            return
        self._require("begin_trial", before="build")
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        # lr=0 keeps the weights unchanged across trials (no drift, no NaN from random data)
        # while every optimizer kernel and every state tensor is exactly as in training.
        if self.spec.optimizer == "adamw":
            self._optimizer = torch.optim.AdamW(params, lr=0.0)
        elif self.spec.optimizer == "adam":
            self._optimizer = torch.optim.Adam(params, lr=0.0)
        else:
            self._optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)
        if self.spec.precision == "fp16-mixed":
            self._scaler = torch.amp.GradScaler(torch.device(self.device).type)

    @property
    def optimizer(self) -> Any:
        """The optimizer of the current trial (None outside a trial or without one)."""
        return self._optimizer

    def step(self, batch: Any) -> None:
        """Forward, loss, backward, optimizer step, zero_grad (set_to_none).

        The model's outputs are dropped once the loss is taken, before backward, as HF
        Trainer, Lightning and ``loss = model(**b).loss`` loops do (``spec.keep_outputs``
        keeps them to the end of the step). Trials, profiles and estimates all run this step.
        """
        if self._train_step is not None:
            self._train_step(batch)
            return
        self._require("step", before="build")
        import torch

        if isinstance(batch, LabelledBatch):  # real (inputs..., target): score the target
            batch, target = tuple(batch[:-1]), batch[-1]
            if isinstance(target, torch.Tensor):
                self._targets = target.to(self.device)
        args, kwargs = _as_call(batch, self.device, weights_dtype(self.spec.precision))
        if self.spec.forward_kwargs:
            kwargs = {**self.spec.forward_kwargs, **kwargs}
        autocast = autocast_for(self.spec.precision, self.device) or contextlib.nullcontext()
        if self.spec.mode != "train":
            self._evaluate(args, kwargs, autocast)
            return
        with autocast:
            output = self.model(*args, **kwargs)
            loss = self._loss(output)
        if not self.spec.keep_outputs:
            # Only the loss's graph survives: the logits and any other output no backward
            # saves are freed here. Measured: a tiny Llama (128 tokens, 32000 vocab: logits
            # 15.6 MiB a sample) costs 48.6 instead of 64.3 MiB a sample; 56 instead of 40
            # fit in 3 GiB. ``_targets`` and the batch are inputs, kept as a loop keeps them.
            del output
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            if self._optimizer is not None:
                self._scaler.step(self._optimizer)
            self._scaler.update()
        else:
            loss.backward()
            if self._optimizer is not None:
                self._optimizer.step()
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    def _evaluate(self, args: Sequence[Any], kwargs: dict[str, Any], autocast: Any) -> None:
        """The ``eval`` step (``torch.no_grad()``: forward and loss) or the ``infer`` step
        (``torch.inference_mode()``: forward only); the model is in eval mode (:meth:`build`).
        The outputs live until the step ends, as an evaluation loop reads them."""
        import torch

        if self.spec.mode == "infer":
            with torch.inference_mode(), autocast:
                output = self.model(*args, **kwargs)
            del output
            return
        with torch.no_grad(), autocast:
            output = self.model(*args, **kwargs)
            loss = self._loss(output, grad=False)
        del output, loss

    def check_input_names(self, model: Any) -> None:
        """Every keyword the step passes (named ``--input`` specs, ``forward_kwargs``, the keys
        of a real batch) is a parameter of ``model.forward``; see :func:`check_input_names`."""
        names = [s.name for s in self.spec.inputs if s.name]
        names += list(self.spec.forward_kwargs)
        names += list(getattr(self._make_batch, "input_names", ()))
        check_input_names(model, names)

    def end_trial(self) -> None:
        """Drop the optimizer, gradients and cached targets."""
        self._optimizer = None
        self._scaler = None
        self._targets = None
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)

    def parameter_stats(self) -> dict[str, int]:
        """Bytes of the built model's parameters, trainable parameters, buffers, of the
        largest block FSDP shards on its own and of the weights no block holds, and how
        many blocks are checkpointed (empty for a user's ``train_step``)."""
        if self.model is None:
            return {}
        from bsfinder.workload.blocks import unit_bytes

        params = list(self.model.parameters())
        largest_unit, root_unit = unit_bytes(self.model)
        return {
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable_parameter_bytes": sum(
                p.numel() * p.element_size() for p in params if p.requires_grad
            ),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in self.model.buffers()),
            "largest_unit_bytes": largest_unit,
            "root_unit_bytes": root_unit,
            **({"checkpointed_blocks": n} if (n := self.checkpointed_blocks) else {}),
        }

    def state_bytes(self) -> int | None:
        """Live bytes of weights, gradients and optimizer state (None for a user step)."""
        if self.model is None:
            return None
        seen: set[int] = set()
        total = 0

        def add(t: Any) -> None:
            nonlocal total
            import torch

            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                if hasattr(t, "to_local"):  # an FSDP DTensor: this rank holds its shard
                    t = t.to_local()
                total += t.numel() * t.element_size()

        for p in self.model.parameters():
            add(p)
            add(p.grad)
        for b in self.model.buffers():
            add(b)
        if self._optimizer is not None:
            for state in self._optimizer.state.values():
                for value in state.values():
                    add(value)
        return total

    # -- loss -------------------------------------------------------------------------------
    def _loss(self, output: Any, *, grad: bool = True) -> Any:
        """The step's loss; ``grad=False`` (eval, under ``no_grad``): of tensors that do not
        require grad."""
        import torch

        if self.spec.loss == "auto":
            loss = _model_loss(output, grad=grad)
            if loss is not None:
                return loss
        if self.spec.loss == "cross-entropy":
            logits = _logits(output, grad=grad)
            if self._targets is None or self._targets.shape != logits.shape[:-1]:
                self._targets = torch.randint(
                    0, logits.shape[-1], logits.shape[:-1], device=logits.device
                )
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), self._targets.reshape(-1)
            )
        tensors = [
            t for t in _tensors(output) if t.is_floating_point() and (t.requires_grad or not grad)
        ]
        if not tensors:
            raise ValueError(
                "the model's output holds no floating tensor that requires grad, so there is "
                "nothing to backpropagate; return the logits or a loss"
            )
        # mean in fp32 without materialising an fp32 copy of the (possibly huge) output
        return sum(
            (t.mean(dtype=torch.float32) for t in tensors),
            torch.zeros((), device=tensors[0].device),
        )


def _unpickle(blob: bytes | None, what: str = "the workload") -> Any:
    """What the API serialised: a ``torch.save`` archive (see ``WorkloadSpec``) or a pickle."""
    if blob is None:
        return None
    with _loading(what):
        if blob[:4] == b"PK\x03\x04":  # a zip archive: torch.save's format
            import io

            import torch

            return torch.load(io.BytesIO(blob), weights_only=False)
        return pickle.loads(blob)


def _import_libraries(blob: bytes) -> None:
    """Import the installed libraries (stdlib, site-packages) that ``blob`` refers to.

    Measured: ``import keras`` (torch backend) adds 170 MiB of address space, which a
    ``train_step`` calling ``model.fit`` would otherwise import under a trial's budget. The
    user's own modules are not imported here: importing one may build the model the step
    trains (training memory, for :meth:`Workload.build`).
    """
    import importlib
    import sys

    libraries = _library_dirs()
    names = dict.fromkeys(_modules_named(blob))
    pending = list(names)
    while pending:  # the user's modules: the libraries they import, read from their source
        source = _source_of(pending.pop())
        if source is not None and not source.startswith(libraries):
            found = [n for n in _imports_in(source) if n not in names]
            names.update(dict.fromkeys(found))
            pending += found
    for name in names:
        if name in sys.modules:
            continue
        origin = _source_of(name.partition(".")[0])
        if origin is not None and origin.startswith(libraries):
            with contextlib.suppress(Exception):  # build() reports what really fails
                importlib.import_module(name)


def _source_of(name: str) -> str | None:
    """The file module ``name`` would load from, found without importing anything (a
    package's ``__init__`` included: ``importlib.util.find_spec`` of a submodule would
    import its package)."""
    import importlib.util
    import os

    first, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(first)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    origin, locations = spec.origin, list(spec.submodule_search_locations or ())
    for part in rest:
        found = None
        for location in locations:
            for candidate in (os.path.join(location, part, "__init__.py"),
                              os.path.join(location, f"{part}.py")):  # fmt: skip
                if os.path.isfile(candidate):
                    found = candidate
                    break
            if found:
                break
        if found is None:
            return None
        origin = found
        locations = [os.path.dirname(found)] if found.endswith("__init__.py") else []
    return os.path.realpath(origin)


def _imports_in(path: str) -> list[str]:
    """The absolute imports anywhere in a Python file (its source read, not run)."""
    import ast

    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (OSError, SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def _library_dirs() -> tuple[str, ...]:
    stdlib, installed = library_roots()
    return (*stdlib, *installed)


def _modules_named(blob: bytes) -> list[str]:
    """The modules a ``torch.save`` archive's pickle imports, read without building anything
    (every global a stub, no tensor loaded)."""
    import io
    import zipfile

    names: list[str] = []

    class Stub:
        def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
            return object.__new__(cls)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __call__(self, *args: Any, **kwargs: Any) -> Stub:
            return Stub()

        def __setstate__(self, state: Any) -> None:
            pass

        def __setitem__(self, key: Any, value: Any) -> None:
            pass

        def append(self, value: Any) -> None:
            pass

        def extend(self, values: Any) -> None:
            pass

    def subimport(name: Any, *args: Any) -> Stub:  # cloudpickle's import of a module global
        if isinstance(name, str):
            names.append(name)
        return Stub()

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module.startswith("cloudpickle") and name in ("subimport", "dynamic_subimport"):
                return subimport
            names.append(module)
            return Stub

        def persistent_load(self, pid: Any) -> Stub:
            return Stub()

    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            data = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            Reader(io.BytesIO(archive.read(data))).load()
    except Exception:
        pass  # best effort: whatever was read so far
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _loading(what: str) -> Any:
    """Name the code this process cannot import when ``what`` refers to it (not the model's
    bug: where it was defined); anything else the user's code raises passes through."""
    try:
        yield
    except (ImportError, AttributeError) as exc:
        if not isinstance(exc, ImportError) and "Can't get attribute" not in str(exc):
            raise
        raise SpecError(
            f"{what} cannot be loaded in the trial process ({type(exc).__name__}: {exc}): it "
            "refers to code this process cannot import. Put that code in an importable module "
            "(on PYTHONPATH), or use isolation='inline'"
        ) from exc


def _as_call(batch: Any, device: str, dtype: Any = None) -> tuple[Sequence[Any], dict[str, Any]]:
    """A batch from ``make_batch`` as (args, kwargs): tensor, tuple/list or dict, on
    ``device``; with ``dtype`` (bf16-true), its floating-point tensors in that type."""
    import torch

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            return x.to(device=device, dtype=dtype)
        return x.to(device) if str(x.device) != device else x

    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict):
        args, kwargs = batch
        return [move(a) for a in args], {k: move(v) for k, v in kwargs.items()}
    if isinstance(batch, Mapping):
        return [], {k: move(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return [move(a) for a in batch], {}
    return [move(batch)], {}


def autocast_for(precision: str, device: str) -> Any:
    """The autocast context ``precision`` runs under on ``device`` (None: ``32`` and
    ``bf16-true``, whose weights are already in their type, run without one)."""
    import torch

    dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision)
    return None if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def weights_dtype(precision: str) -> Any:
    """The type ``precision`` keeps the weights in when it is not float32 (``bf16-true``:
    bfloat16, and so its gradients, optimizer state and float inputs), else None."""
    import torch

    return torch.bfloat16 if precision == "bf16-true" else None


def _tensors(output: Any) -> list[Any]:
    """Every tensor in a tensor, tuple/list, dict or HF ``ModelOutput`` (depth-first)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, list | tuple):
        return [t for v in output for t in _tensors(v)]
    return []


def _model_loss(output: Any, *, grad: bool = True) -> Any:
    """The loss a model computed itself (HF models given ``labels``), if any."""
    import torch

    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and (loss.requires_grad or not grad) and loss.numel() == 1:
        return loss
    return None


def _logits(output: Any, *, grad: bool = True) -> Any:
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    for t in _tensors(output):
        if t.is_floating_point() and (t.requires_grad or not grad):
            return t
    raise ValueError("--loss cross-entropy: the model's output holds no floating tensor")


def check_input_names(model: Any, names: Sequence[str]) -> None:
    """Refuse a keyword input ``model.forward`` does not take, rather than let a
    ``**kwargs`` swallow a typo: each name must be a named parameter of ``forward`` (of the
    module a DDP-style wrapper holds), a key of the ``TypedDict`` its ``**kwargs`` is
    annotated with, or, for a Hugging Face model, an attribute of its ``config``
    (``output_attentions``, ``return_dict``...). A ``forward(*args, **kwargs)`` names
    nothing, and is not checked.

    Raises:
        SpecError: naming the unknown input and what ``forward`` accepts.
    """
    import inspect

    if not names:
        return
    inner = getattr(model, "module", model)
    forward = getattr(inner, "forward", None)
    try:
        signature = inspect.signature(forward) if forward is not None else None
    except (TypeError, ValueError):
        return  # no signature to check against
    if signature is None:
        return
    named: list[str] = []
    extra: set[str] = set()
    takes_any = False
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            named.append(p.name)
        elif p.kind == p.VAR_KEYWORD:
            takes_any = True
            extra.update(_typed_dict_keys(p.annotation))
    if takes_any and not named:
        return  # forward(*args, **kwargs): a wrapper whose inner call decides
    config = getattr(inner, "config", None)
    for name in dict.fromkeys(names):
        if name in named or name in extra:
            continue
        if takes_any and config is not None and hasattr(config, name):
            continue
        cls = type(inner).__name__
        also = " (its **kwargs takes no other name bsfinder can check)" if takes_any else ""
        raise SpecError(
            f"input {name!r}: {cls}.forward has no parameter {name!r}{also}; it accepts "
            f"{', '.join(named) or 'positional inputs only'}. Rename the input (--input "
            "NAME=..., forward_kwargs, or the batch's key) to one of those"
        )


def _typed_dict_keys(annotation: Any) -> set[str]:
    """The keys of ``Unpack[SomeTypedDict]`` (a ``**kwargs`` annotation), else none."""
    import typing

    args = typing.get_args(annotation)
    target = args[0] if args else annotation
    keys = getattr(target, "__annotations__", None)
    if isinstance(target, type) and issubclass(target, dict) and isinstance(keys, dict):
        return set(keys)
    return set()
