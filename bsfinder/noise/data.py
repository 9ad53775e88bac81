"""The noise scale of the user's model on the user's data: loading, loss and device glue
around :func:`bsfinder.noise.scale.measure_noise_scale`."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

from bsfinder.errors import SpecError, UserCodeError
from bsfinder.noise.scale import NoiseScale, measure_noise_scale
from bsfinder.workload.loading import build_model, load_object

__all__ = ["LoaderError", "data_loss_fn", "loader_batches", "noise_on_data"]

#: micro-batches per group and groups; a group costs 4 forward/backward passes
MICRO_BATCHES = 4
GROUPS = 8
TIME_BUDGET_S = 10.0


def noise_on_data(
    model: Any,
    data: Callable[[int], Any] | str,
    *,
    micro_batch: int,
    device: str = "cpu",
    checkpoint: str | os.PathLike[str] | None = None,
    loss: str = "auto",
    precision: str = "32",
    model_kwargs: dict[str, Any] | None = None,
) -> NoiseScale:
    """Measure ``B_simple`` of ``model`` (module, class, factory or spec) on batches of
    ``micro_batch`` from ``data(micro_batch)``. A module object is used in place (weights,
    buffers, gradients and mode restored) unless a ``checkpoint`` is loaded into a copy.

    Raises:
        SpecError: the data, checkpoint or loss cannot be used, or the loader raised (the
            data given cannot make these batches: bad input, exit 2). UserCodeError: the
            model raised on a data batch.
    """
    import torch

    from bsfinder.workload.step import autocast_for

    make_loader = load_object(data) if isinstance(data, str) else data
    if isinstance(model, torch.nn.Module):
        net = copy.deepcopy(model) if checkpoint is not None else model
    else:
        factory = load_object(model) if isinstance(model, str) else model
        net = build_model(factory, model_kwargs, spec=model if isinstance(model, str) else "")
    net.to(device)
    if checkpoint is not None:
        _load_checkpoint(net, checkpoint, device)
    buffers = {name: b.detach().clone() for name, b in net.named_buffers()}

    # bf16-true measured under bf16 autocast: a statistic of the gradients, on the user's
    # own module here (not cast in place)
    autocast = autocast_for("bf16-mixed" if precision == "bf16-true" else precision, device)
    note = (
        "measured on the checkpoint's weights; the noise scale keeps growing as the loss "
        "falls, so re-measure later in training"
        if checkpoint is not None
        else None
    )
    try:
        return measure_noise_scale(
            net, loader_batches(make_loader, micro_batch), data_loss_fn(loss, device),
            micro_batch=micro_batch,
            micro_batches=MICRO_BATCHES, groups=GROUPS, time_budget_s=TIME_BUDGET_S,
            autocast=autocast, note=note,
        )  # fmt: skip
    except SpecError:
        raise
    except LoaderError as exc:
        raise exc.spec_error(f"make_loader({micro_batch})") from None
    except Exception as exc:
        raise UserCodeError.from_exception(exc, batch_size=micro_batch) from exc
    finally:
        with torch.no_grad():
            for name, b in net.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])  # BatchNorm's running statistics, as they were


class LoaderError(Exception):
    """The user's data loader raised (not the model); the cause is its exception."""

    def spec_error(self, call: str) -> SpecError:
        """The error to raise: the data given cannot make these batches (bad input)."""
        cause = self.__cause__
        first = str(cause).splitlines()[0][:200] if str(cause) else ""
        return SpecError(f"the data loader {call} raised {type(cause).__name__}: {first}")


def loader_batches(
    make_loader: Callable[[int], Any], batch_size: int, *, repeat: bool = False
) -> Iterator[Any]:
    """The batches of ``make_loader(batch_size)``, the loader's own errors raised as
    :class:`LoaderError`; ``repeat``: called again when an epoch ends (a loader that yields
    nothing at all ends it)."""
    while True:
        try:
            it = iter(make_loader(batch_size))
        except Exception as exc:
            raise LoaderError(exc) from exc
        yielded = False
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            except Exception as exc:
                raise LoaderError(exc) from exc
            yielded = True
            yield batch
        if not repeat or not yielded:
            return


def data_loss_fn(loss: str, device: str, dtype: Any = None) -> Callable[[Any, Any], Any]:
    """The loss of a data batch on ``device`` (its floating-point tensors in ``dtype`` when
    given: bf16-true), called as the probe calls the model."""
    import torch

    from bsfinder.workload.step import _as_call, _logits, _model_loss

    def auto(model: Any, batch: Any) -> Any:
        args, kwargs = _as_call(batch, device, dtype)
        out = model(*args, **kwargs)
        found = out if isinstance(out, torch.Tensor) and out.numel() == 1 else _model_loss(out)
        if found is None:
            raise SpecError(
                "the noise scale and the LR range test need a real loss: the model returned "
                "no scalar loss for a data batch; return one (e.g. forward(x, y) -> loss, or "
                "an output with .loss), or pass --loss cross-entropy to use each batch's last "
                "element as the target"
            )
        return found

    def cross_entropy(model: Any, batch: Any) -> Any:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise SpecError(
                "--loss cross-entropy with --data: batches must be tuples (inputs..., target)"
            )
        *inputs, target = _as_call(tuple(batch), device, dtype)[0]
        logits = _logits(model(*inputs))
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
        )

    if loss == "cross-entropy":
        return cross_entropy
    if loss == "mean":
        raise SpecError(
            "--loss mean is a stand-in for memory and speed, not a training loss: the noise "
            "scale and the LR range test need the model's own loss (auto) or cross-entropy"
        )
    return auto


def _load_checkpoint(net: Any, path: str | os.PathLike[str], device: str) -> None:
    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise SpecError(f"checkpoint {os.fspath(path)!r} cannot be read: {exc}") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise SpecError(f"checkpoint {os.fspath(path)!r} holds no state_dict")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise SpecError(
            f"checkpoint {os.fspath(path)!r} does not match the model: {first}"
        ) from None
