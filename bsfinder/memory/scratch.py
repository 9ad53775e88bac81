"""Memory a CPU convolution allocates and frees inside one call, measured on this CPU.

oneDNN computes convolutions in blocked layouts (``nChw16c`` and the like): for the plain
NCHW tensors PyTorch hands it, it reorders inputs, gradients and outputs into buffers that live
only during the call. Measured here (AVX-512, torch 2.13, batch 512, 128 channels, 8x8):
16 MiB of output came with 17 MiB of scratch in forward, and backward-weight took input plus
output-gradient again (33 MiB). No tensor holds that memory, so a trace on fake tensors cannot
see it, yet it decides whether a conv net's step fits.

So the estimator measures it: every distinct convolution call of the traced step (shapes
without the batch dimension, dtype, arguments) runs for real at two small batch sizes in one
child process with the trial's allocator settings, and the scratch (peak resident memory of
the call minus its inputs and outputs) is fitted as ``a + b * batch``. A few MiB of real
memory and about a second, whatever the batch estimated.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bsfinder.core.fit import line_through
from bsfinder.errors import BsfinderError

__all__ = ["ConvCall", "ScratchModel", "conv_call", "scratch_measurable"]

#: the calibration batches are chosen so that one call's tensors are about this big: large
#: enough that page rounding and heap noise are small against the scratch, small enough to
#: take a fraction of a second
_CALIBRATION_BYTES = 16 * 2**20
_TIMEOUT_S = 300


@dataclass(frozen=True)
class ConvCall:
    """One convolution call, without its batch size (the key scratch is measured under).

    ``op`` is ``"forward"`` (``aten.convolution``) or ``"backward"``
    (``aten.convolution_backward``); shapes exclude the batch dimension except the weight's.
    """

    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: str
    channels_last: bool
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    mask: tuple[bool, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvCall:
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**fields)


def conv_call(func: Any, args: Any, out: Any) -> tuple[ConvCall, int] | None:
    """The convolution call an aten op is, and its batch size; None for any other op."""
    import torch

    aten = torch.ops.aten
    if func is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
        grad_out, mask = out, []
    elif func is aten.convolution_backward.default:
        grad_out, x, w, bias_sizes, stride, padding, dilation, transposed = args[:8]
        output_padding, groups, mask = args[8:]  # mask: list[bool]
        b = bias_sizes
    else:
        return None
    if x.dim() < 3:  # unbatched convolution: nothing to scale with a batch
        return None
    call = ConvCall(
        op="forward" if func is aten.convolution.default else "backward",
        input_shape=tuple(x.shape[1:]),
        weight_shape=tuple(w.shape),
        output_shape=tuple(grad_out.shape[1:]),
        dtype=str(x.dtype).removeprefix("torch."),
        channels_last=x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last),
        bias=b is not None,
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        transposed=bool(transposed),
        output_padding=tuple(output_padding),
        groups=int(groups),
        mask=tuple(bool(m) for m in mask),
    )
    return call, int(x.shape[0])


def scratch_measurable() -> bool:
    """Whether this system lets a process reset its peak resident memory (Linux)."""
    return os.access("/proc/self/clear_refs", os.W_OK)


class ScratchModel:
    """Scratch bytes of convolution calls on this CPU, ``a + b * batch`` per call.

    Calls not yet measured are measured together in one child process by :meth:`measure`.
    """

    def __init__(self) -> None:
        self.fits: dict[ConvCall, tuple[float, float]] = {}
        self.seconds = 0.0

    def measure(self, calls: Iterable[ConvCall]) -> None:
        """Measure the calls not measured yet (one child process for all of them)."""
        import time

        from bsfinder.devices.cpu import allocator_env

        todo = sorted({c for c in calls if c not in self.fits}, key=repr)
        if not todo:
            return
        started = time.perf_counter()
        env = {**os.environ, **allocator_env()}
        payload = json.dumps([c.to_dict() for c in todo])
        try:
            done = subprocess.run(
                [sys.executable, "-m", "bsfinder.memory.scratch"],
                input=payload,
                capture_output=True,
                text=True,
                env=env,
                timeout=_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BsfinderError(
                f"measuring convolution scratch took over {_TIMEOUT_S} s; "
                "pass --no-scratch to estimate without it"
            ) from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BsfinderError(
                f"measuring convolution scratch failed ({tail[0][:200]}); "
                "pass --no-scratch to estimate without it"
            )
        for call, fit in zip(todo, json.loads(done.stdout), strict=True):
            self.fits[call] = (float(fit[0]), float(fit[1]))
        self.seconds += time.perf_counter() - started

    def bytes(self, call: ConvCall, batch_size: int) -> int:
        """Scratch of ``call`` at ``batch_size`` (measured by :meth:`measure` first)."""
        a, b = self.fits[call]
        return max(0, round(a + b * batch_size))


# -- the child process -----------------------------------------------------------------------
def _calibration_batches(call: ConvCall) -> tuple[int, int]:
    import torch

    size = torch.empty((), dtype=getattr(torch, call.dtype)).element_size()
    per_sample = (math.prod(call.input_shape) + math.prod(call.output_shape)) * size
    high = max(4, min(1024, math.ceil(_CALIBRATION_BYTES / max(per_sample, 1))))
    return high // 4, high


def _run(call: ConvCall, n: int) -> int:
    """Peak resident bytes of one call at batch ``n`` beyond its inputs and outputs."""
    import gc

    import torch

    from bsfinder.devices.cpu import read_proc_status

    dtype = getattr(torch, call.dtype)
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format
    x = torch.randn(n, *call.input_shape, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(call.weight_shape, dtype=dtype)
    out_channels = call.output_shape[0]
    args = (call.stride, call.padding, call.dilation, call.transposed, call.output_padding)
    if call.op == "forward":
        bias = torch.randn(out_channels, dtype=dtype) if call.bias else None

        def op() -> Any:
            return torch.ops.aten.convolution(x, w, bias, *args, call.groups)

    else:
        grad = torch.randn(n, *call.output_shape, dtype=dtype).contiguous(memory_format=fmt)
        bias_sizes = [out_channels] if call.bias else None

        def op() -> Any:
            return torch.ops.aten.convolution_backward(
                grad, x, w, bias_sizes, *args, call.groups, list(call.mask)
            )

    op()  # creates the oneDNN primitive; the estimate counts those apart
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # resets VmHWM
    before = read_proc_status()["VmRSS"]
    out = op()
    peak = read_proc_status()["VmHWM"]
    outputs = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    return peak - before - sum(t.untyped_storage().nbytes() for t in outputs)


def _fit(call: ConvCall) -> tuple[float, float]:
    low, high = _calibration_batches(call)
    return line_through((low, _run(call, low)), (high, _run(call, high)))


def main() -> None:
    import torch

    calls = [ConvCall.from_dict(d) for d in json.loads(sys.stdin.read())]
    with torch.no_grad():
        fits = [_fit(c) for c in calls]
    sys.stdout.write(json.dumps(fits))


if __name__ == "__main__":
    main()
