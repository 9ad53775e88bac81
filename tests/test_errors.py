"""One OOM classifier, table-tested: type first, then messages; anything else is a bug."""

from __future__ import annotations

import pytest
import torch

from bsfinder.errors import SpecError, UserCodeError, is_oom, oom_kind

OOM_MESSAGES = [
    ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)", "cuda"),
    ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", "cuda"),
    ("HIP out of memory. Tried to allocate 20.00 MiB", "hip"),
    ("MPS backend out of memory (MPS allocated: 1.2 GB, other allocations: 0 bytes)", "mps"),
    ("XPU out of memory. Tried to allocate 1.00 GiB", "xpu"),
    (
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 67108864 bytes. Error code 12 (Cannot allocate memory)",
        "cpu",
    ),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "cudnn"),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "cublas"),
]


@pytest.mark.parametrize(("message", "kind"), OOM_MESSAGES)
def test_allocator_messages_are_oom(message: str, kind: str) -> None:
    assert oom_kind(RuntimeError(message)) == kind


def test_the_type_decides_first() -> None:
    assert is_oom(torch.OutOfMemoryError("anything at all"))
    assert oom_kind(MemoryError()) == "python"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
        ValueError("out of memory"),  # not a RuntimeError: a user's own ValueError
        KeyError("CUDA out of memory"),
        RuntimeError("could not create a primitive"),  # oneDNN: only under a limit
        TypeError("forward() missing 1 required positional argument"),
    ],
)
def test_other_errors_are_not_oom(exc: BaseException) -> None:
    assert not is_oom(exc)


@pytest.mark.parametrize(
    "message",
    [
        "could not create a primitive descriptor for a convolution forward propagation primitive",
        "can't start new thread",
        "pthread_create failed: Resource temporarily unavailable",
        "std::bad_alloc",
    ],
)
def test_ambiguous_failures_count_only_under_a_memory_limit(message: str) -> None:
    assert not is_oom(RuntimeError(message))
    assert is_oom(RuntimeError(message), under_memory_limit=True)


def test_error_exit_codes() -> None:
    assert SpecError("x").exit_code == 2
    err = UserCodeError(batch_size=8, exc_type="ValueError", detail="bad shape\nmore")
    assert err.exit_code == 1
    assert "ValueError at batch 8: bad shape" in str(err)
    assert "not an out-of-memory error" in str(err)


def test_describe_oom_is_one_line_with_the_allocator_named() -> None:
    from bsfinder.errors import describe_oom

    long = "DefaultCPUAllocator: can't allocate memory:\n  you tried " + "x" * 600
    text = describe_oom(RuntimeError(long))
    assert text is not None and text.startswith("cpu: DefaultCPUAllocator: can't allocate memory: ")
    assert "\n" not in text and len(text) == len("cpu: ") + 400 and text.endswith("...")
    assert describe_oom(ValueError("bad shape")) is None
