"""oneDNN's convolution scratch: measured at small batches, checked at a large one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bsfinder import estimate_memory
from bsfinder.devices.cpu import allocator_env
from bsfinder.memory.scratch import ConvCall, ScratchModel, conv_call, scratch_measurable

MiB = 2**20

pytestmark = pytest.mark.skipif(not scratch_measurable(), reason="needs /proc/self/clear_refs")

# One convolution's backward, measured in a brand-new process by its address-space peak
# (VmPeak, which the calibration does not use) at the batch the test predicts.
_INDEPENDENT = """
import sys, torch
from bsfinder.devices.cpu import read_proc_status
n = int(sys.argv[1])
x, w = torch.randn(n, 64, 16, 16), torch.randn(64, 64, 3, 3)
go = torch.randn(n, 64, 16, 16)
args = ([64], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])
torch.ops.aten.convolution_backward(go[:1], x[:1], w, *args)  # the batch-1 primitive
base = read_proc_status()["VmSize"]
out = torch.ops.aten.convolution_backward(go, x, w, *args)
extra = read_proc_status()["VmPeak"] - base - sum(t.untyped_storage().nbytes() for t in out)
print(extra)
"""


def _traced_call(batch: int) -> tuple[ConvCall, int]:
    found = []
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (call := conv_call(func, args, out)) is not None:
                found.append(call)
            return out

    with FakeTensorMode():
        conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        x = torch.randn(batch, 64, 16, 16, requires_grad=True)
        with Watch():
            conv(x).sum().backward()
    assert [c.op for c, _ in found] == ["forward", "backward"]
    return found[1]


def test_scratch_fitted_at_small_batches_predicts_an_independent_measurement() -> None:
    # GIVEN a convolution's backward, traced on fake tensors at batch 256
    call, batch = _traced_call(256)
    assert batch == 256 and call.input_shape == (64, 16, 16) and call.mask == (True,) * 3
    assert ConvCall.from_dict(json.loads(json.dumps(call.to_dict()))) == call
    # WHEN its scratch is fitted at small batches in a child process
    model = ScratchModel()
    model.measure([call])
    predicted = model.bytes(call, batch)
    # THEN a fresh process running it at batch 256 (16 MiB input, 16 MiB gradient) sees the
    # same scratch within 10% (measured here: about input plus gradient, 32 MiB)
    env = {**os.environ, **allocator_env()}
    done = subprocess.run([sys.executable, "-c", _INDEPENDENT, str(batch)], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    measured = int(done.stdout)
    assert measured > 8 * MiB, "no scratch to check against"
    assert abs(predicted - measured) < 0.1 * measured + MiB, (predicted, measured)


def test_estimate_adds_scratch_on_a_cpu_target_only_when_asked(cli) -> None:
    kwargs = {"inputs": ["3x32x32"], "batch_sizes": [128], "target": "cpu"}
    with_it = estimate_memory("bsfinder.examples:SmallCNN", **kwargs)
    without = estimate_memory("bsfinder.examples:SmallCNN", kernel_scratch=False, **kwargs)
    point, plain = with_it.point(128), without.point(128)
    assert plain.kernel_scratch_bytes == 0 and point.kernel_scratch_bytes > 4 * MiB
    assert point.peak_bytes == (
        point.tensor_peak_bytes + point.kernel_scratch_bytes + point.outside_tensors_bytes
    )
    assert point.peak_bytes > plain.peak_bytes and point.tensor_max_bytes == plain.tensor_peak_bytes
    assert any("not measured" in item for item in without.unseen)
    gpu = estimate_memory("bsfinder.examples:SmallCNN", inputs=["3x32x32"], batch_sizes=[128])
    assert gpu.point(128).kernel_scratch_bytes == 0  # cuDNN's workspaces are listed unseen
    proc = cli("estimate", "bsfinder.examples:SmallCNN", "--input", "3x32x32", "--target",
               "cpu", "--batch", "64", "--no-scratch")  # fmt: skip
    assert proc.returncode == 0 and "scratch" in proc.stdout and "not measured" in proc.stdout
