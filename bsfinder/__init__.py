"""bsfinder: which batch size, and which learning rate, measured on real training steps.

>>> from bsfinder import find_batch_size
>>> result = find_batch_size("bsfinder.examples:SmallCNN", input_shape=(3, 64, 64),
...                          device="cpu", memory_limit="1GiB")  # doctest: +SKIP
"""

from bsfinder.api import estimate_memory, find_batch_size, profile_memory
from bsfinder.devices import FakeDevice
from bsfinder.errors import (
    BsfinderError,
    BsfinderWarning,
    ModelCrashError,
    SpecError,
    UserCodeError,
    WorkerError,
    is_oom,
)
from bsfinder.estimate import EstimatePoint, MemoryEstimate, TargetDevice
from bsfinder.loading import InputSpec, parse_input_spec
from bsfinder.probe import ProbeEvent, ProbeSettings, run_probe
from bsfinder.profiling import MemoryProfile
from bsfinder.recommend import scale_learning_rate, time_optimal_batch
from bsfinder.results import LearningRateAdvice, ProbeResult, Recommendations, Trial
from bsfinder.scaleout import RankEstimate, scale_out
from bsfinder.search import SearchResult, search

__version__ = "0.1.0"

__all__ = [
    "BsfinderError",
    "BsfinderWarning",
    "EstimatePoint",
    "FakeDevice",
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
