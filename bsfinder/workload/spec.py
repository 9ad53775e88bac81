"""The workload's description from what a user passes: input specs, the optimizer's family,
the model's label; shared by every entry point (probe, profile, estimate)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from bsfinder.errors import SpecError
from bsfinder.workload.loading import InputSpec, parse_input_spec
from bsfinder.workload.step import OPTIMIZERS

__all__ = [
    "batch_source",
    "batch_specs",
    "factory_of",
    "is_module",
    "optimizer_name",
    "spec_fields",
]


def spec_fields(
    model: Any,
    specs: tuple[InputSpec, ...],
    optimizer: str,
    precision: str,
    loss: str,
    model_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """The WorkloadSpec fields every entry point shares."""
    fields: dict[str, Any] = {
        "inputs": specs,
        "optimizer": optimizer,
        "precision": precision,
        "loss": loss,
        "model_kwargs": dict(model_kwargs or {}),
    }
    if isinstance(model, str):
        fields.update(model=model, model_label=model)
    elif model is not None:
        fields["model_label"] = _label(model)
    return fields


def _input_specs(
    input_shape: Sequence[int] | None, inputs: Sequence[str | InputSpec] | None
) -> tuple[InputSpec, ...]:
    specs: list[InputSpec] = []
    if input_shape is not None:
        shape = tuple(input_shape)
        if not all(isinstance(d, int) and d >= 1 for d in shape):
            raise SpecError(f"input_shape {shape!r} must hold positive integers")
        specs.append(InputSpec(shape=shape))
    for item in inputs or ():
        specs.append(item if isinstance(item, InputSpec) else parse_input_spec(item))
    return tuple(specs)


def batch_specs(
    input_shape: Sequence[int] | None,
    inputs: Sequence[str | InputSpec] | None,
    make_batch: Callable[[int], Any] | None,
    train_step: Callable[[int], Any] | None = None,
) -> tuple[InputSpec, ...]:
    """The input specs, once it is clear that a batch can be made (or a train_step makes it)."""
    specs = _input_specs(input_shape, inputs)
    if train_step is None and make_batch is None and not specs:
        raise SpecError("give input_shape=, inputs= or make_batch= so bsfinder can make a batch")
    return specs


def factory_of(model: Any) -> Callable[..., Any] | None:
    """``model`` when it is a class or factory object (not a module, not a spec string)."""
    if callable(model) and not is_module(model) and not isinstance(model, str):
        return model
    return None


def is_module(obj: Any) -> bool:
    """``obj`` is a ``torch.nn.Module`` (without importing torch: none exists before it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _label(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    name = getattr(obj, "__qualname__", None) or cls.__qualname__
    return f"{getattr(obj, '__module__', cls.__module__)}:{name}"


def optimizer_name(optimizer: Any) -> str:
    """An optimizer name, or the family of an optimizer object (for memory and the LR rule)."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise SpecError(f"optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        return optimizer
    import torch

    for cls, name in (
        (torch.optim.AdamW, "adamw"),
        (torch.optim.Adam, "adam"),
        (torch.optim.SGD, "sgd"),
    ):
        if isinstance(optimizer, cls):
            return name
    raise SpecError(
        f"optimizer {type(optimizer).__name__}: bsfinder models AdamW, Adam and SGD; pass one of "
        f"{', '.join(OPTIMIZERS)} by name, or measure your own optimizer with train_step="
    )


def batch_source(
    batches: Any,
    *,
    collate_fn: Any,
    input_shape: Sequence[int] | None,
    inputs: Sequence[Any] | None,
    make_batch: Callable[[int], Any] | None,
    train_step: Callable[[int], Any] | None,
    loss: str,
) -> Callable[[int], Any] | None:
    """``make_batch`` for the step: the given one, or the real batches of ``batches``
    (:func:`~bsfinder.workload.loading.real_batches`; with ``loss="cross-entropy"`` a tuple
    sample's last element is the target).

    Raises:
        SpecError: ``batches`` given with another batch source, or not a batch source.
    """
    if collate_fn is not None and batches is None:
        raise SpecError("collate_fn collates the samples of batches=: give batches too")
    if batches is None:
        return make_batch
    others = [
        name
        for name, given in (
            ("input_shape", input_shape is not None),
            ("inputs", bool(inputs)),
            ("make_batch", make_batch is not None),
            ("train_step", train_step is not None),
        )
        if given
    ]
    if others:
        raise SpecError(
            f"batches= is the batch source; it cannot be given with {', '.join(others)} "
            "(the real samples decide the inputs' shapes)"
        )
    from bsfinder.workload.loading import real_batches

    return real_batches(batches, collate_fn=collate_fn, target_last=loss == "cross-entropy")
