"""bsfinder: which batch size, and which learning rate, measured on real training steps.

>>> from bsfinder import find_batch_size
>>> result = find_batch_size("bsfinder.examples:SmallCNN", input_shape=(3, 64, 64),
...                          device="cpu", memory_limit="1GiB")  # doctest: +SKIP
"""

import warnings
from typing import Any

from bsfinder._version import __version__
from bsfinder.api import estimate_memory, find_batch_size, profile_memory
from bsfinder.core.recommend import scale_learning_rate, time_optimal_batch
from bsfinder.core.results import LearningRateAdvice, ProbeResult, Recommendations, Trial
from bsfinder.core.scaleout import RankEstimate, scale_out
from bsfinder.core.search import SearchResult, search
from bsfinder.errors import (
    BsfinderError,
    BsfinderWarning,
    ModelCrashError,
    SpecError,
    UserCodeError,
    WorkerError,
    is_oom,
)
from bsfinder.execution.fake import FakeRunner
from bsfinder.memory.estimate import EstimatePoint, MemoryEstimate, TargetDevice
from bsfinder.memory.profile import MemoryProfile
from bsfinder.probe import ProbeEvent, ProbeSettings, run_probe
from bsfinder.workload.loading import InputSpec, parse_input_spec

__all__ = [
    "BsfinderError",
    "BsfinderWarning",
    "EstimatePoint",
    "FakeRunner",
    "InputSpec",
    "LearningRateAdvice",
    "MemoryEstimate",
    "MemoryProfile",
    "ModelCrashError",
    "ProbeEvent",
    "ProbeResult",
    "ProbeSettings",
    "RankEstimate",
    "Recommendations",
    "SearchResult",
    "SpecError",
    "TargetDevice",
    "Trial",
    "UserCodeError",
    "WorkerError",
    "__version__",
    "estimate_memory",
    "find_batch_size",
    "is_oom",
    "parse_input_spec",
    "profile_memory",
    "run_probe",
    "scale_learning_rate",
    "scale_out",
    "search",
    "time_optimal_batch",
]


def __getattr__(name: str) -> Any:
    """``FakeDevice``: the old name of :class:`FakeRunner` (deprecated, still works)."""
    if name == "FakeDevice":
        from bsfinder.execution.fake import RENAMED

        warnings.warn(RENAMED, DeprecationWarning, stacklevel=2)
        return FakeRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
