"""Turn user text into objects: ``pkg.mod:Net`` / ``path/file.py:make`` and input specs.

Input specs describe one sample; the batch dimension is added in front::

    3x224x224              float32 image
    128:int64:50257        128 token ids in [0, 50257)
    128:int64:1:50257      128 ints in [1, 50257)
    labels=:int64:10       named (passed as keyword), scalar per sample, in [0, 10)
    x=16x8:bf16            named bfloat16 tensor
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsfinder.errors import SpecError, UserCodeError, is_oom

__all__ = [
    "InputSpec",
    "LabelledBatch",
    "RealBatches",
    "build_model",
    "load_object",
    "parse_input_spec",
    "real_batches",
    "sample_elements",
]

_DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "double": "float64", "fp64": "float64",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}  # fmt: skip
_INT_DTYPES = {"int64", "int32", "int16", "int8", "uint8", "bool"}
_ITEM_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip
#: torch's storage sizes are signed 64-bit byte counts ("Storage size calculation overflowed")
_MAX_TENSOR_BYTES = 2**63
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class InputSpec:
    """One model input, per sample. ``low``/``high`` bound integer values: [low, high)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    name: str | None = None
    low: int = 0
    high: int | None = None

    def __post_init__(self) -> None:
        size = self.sample_bytes
        if size >= _MAX_TENSOR_BYTES:
            amount = f"{size:.3g}" if size.bit_length() < 1000 else f"about 2**{size.bit_length()}"
            raise SpecError(
                f"input {self.describe()!r}: one sample would be {amount} bytes, "
                "more than any tensor can hold (torch counts bytes in 64 bits): check its sizes "
                "(one sample's, without the batch dimension)"
            )

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample of this input (the batch dimension excluded)."""
        return math.prod(self.shape) * _ITEM_BYTES.get(self.dtype, 8)

    @property
    def is_integer(self) -> bool:
        """Integer (or bool) inputs are drawn uniformly from [low, high)."""
        return self.dtype in _INT_DTYPES

    def describe(self) -> str:
        """Back to spec text: ``InputSpec((128,), 'int64', high=50257).describe()``."""
        text = "x".join(str(d) for d in self.shape)
        if self.dtype != "float32" or self.is_integer:
            text += f":{self.dtype}"
        if self.is_integer and self.dtype != "bool":
            text += f":{self.low}:{self.high}" if self.low else f":{self.high}"
        return f"{self.name}={text}" if self.name else text


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``[NAME=]SHAPE[:DTYPE[:HIGH | :LOW:HIGH]]`` (see the module docstring).

    Raises:
        SpecError: the text does not follow that form.

    Example:
        >>> parse_input_spec("128:int64:50257")
        InputSpec(shape=(128,), dtype='int64', name=None, low=0, high=50257)
    """
    original = text
    name = None
    if "=" in text:
        name, text = text.split("=", 1)
        if not _NAME_RE.match(name):
            raise SpecError(f"input {original!r}: {name!r} is not a valid argument name")
    parts = text.split(":")
    shape_text, rest = parts[0].strip(), parts[1:]
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x")) if shape_text else ()
    except ValueError:
        raise SpecError(
            f"input {original!r}: shape {shape_text!r} must be sizes joined by 'x', "
            "e.g. 3x224x224 (the batch dimension is added in front)"
        ) from None
    if any(d < 1 for d in shape):
        raise SpecError(f"input {original!r}: every size must be >= 1")
    dtype = "float32"
    if rest:
        key = rest[0].strip().lower()
        if key not in _DTYPES:
            raise SpecError(
                f"input {original!r}: unknown dtype {rest[0]!r}; use one of "
                + ", ".join(sorted(set(_DTYPES.values())))
            )
        dtype = _DTYPES[key]
    bounds = rest[1:]
    if bounds and dtype not in _INT_DTYPES - {"bool"}:
        raise SpecError(f"input {original!r}: a value range is only for integer dtypes")
    try:
        values = [int(v) for v in bounds]
    except ValueError:
        raise SpecError(f"input {original!r}: range bounds must be integers") from None
    low, high = 0, None
    if len(values) == 1:
        high = values[0]
    elif len(values) == 2:
        low, high = values
    elif len(values) > 2:
        raise SpecError(f"input {original!r}: too many ':' parts")
    if dtype == "bool":
        high = 2
    elif dtype in _INT_DTYPES and high is None:
        raise SpecError(
            f"input {original!r}: integer inputs need a value range, e.g. "
            f"{shape_text}:{dtype}:50257 for token ids in [0, 50257)"
        )
    if high is not None and high <= low:
        raise SpecError(f"input {original!r}: range [{low}, {high}) is empty")
    return InputSpec(shape=shape, dtype=dtype, name=name, low=low, high=high)


def library_roots() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The standard library's directories and the installed packages' (site-packages), each
    real and ending in a separator: what ``sys.path`` holds that is not the user's code."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    stdlib = [paths[k] for k in ("stdlib", "platstdlib") if k in paths]
    installed = [paths[k] for k in ("purelib", "platlib") if k in paths]
    with contextlib.suppress(AttributeError):  # a virtualenv's site module may lack them
        installed += [*site.getsitepackages(), site.getusersitepackages()]

    def roots(dirs: list[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(os.path.join(os.path.realpath(d), "") for d in dirs if d))

    return roots(stdlib), roots(installed)


def load_object(spec: str) -> Any:
    """Import ``MODULE:ATTR`` or ``path/to/file.py:ATTR`` and return the attribute.

    Raises:
        SpecError: malformed spec, module not found, or attribute missing.
    """
    module_text, sep, attr = spec.rpartition(":")
    if not sep or not module_text or not attr:
        raise SpecError(
            f"model spec {spec!r} must be MODULE:NAME or path/to/file.py:NAME, e.g. mymodel:Net"
        )
    module = _import(module_text, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
            raise SpecError(
                f"{module_text!r} has no attribute {attr!r}"
                + (f" (it defines: {', '.join(public)})" if public else "")
            )
        obj = getattr(obj, part)
    return obj


def _import(module_text: str, spec: str) -> Any:
    is_path = module_text.endswith(".py") or "/" in module_text or "\\" in module_text
    try:
        if not is_path:
            return importlib.import_module(module_text)
        path = Path(module_text).expanduser().resolve()
        if not path.is_file():
            raise SpecError(f"model spec {spec!r}: no such file {module_text!r}")
        # A stable module name per file, so pickles of its objects resolve in the worker too.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"_bsfinder_user_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        # after the standard library and the installed packages: a psutil.py beside the
        # model must not shadow what bsfinder and torch import (the worker's sys.path order)
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise SpecError(f"model spec {spec!r}: cannot load {module_text!r} as Python")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    except SpecError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_text.startswith(exc.name):
            raise SpecError(
                f"cannot import {module_text!r}: no module named {exc.name!r} "
                "(is it on PYTHONPATH, or did you mean a path like path/to/file.py?)"
            ) from None
        raise SpecError(f"importing {module_text!r} failed: {exc}") from None
    except Exception as exc:
        raise SpecError(f"importing {module_text!r} failed: {type(exc).__name__}: {exc}") from None


def build_model(obj: Any, kwargs: dict[str, Any] | None = None, *, spec: str = "") -> Any:
    """Instantiate an ``nn.Module`` from a class or factory; return a module object as is.

    Raises:
        SpecError: the object is not a module, a module class or a factory of one, or the
            keyword arguments do not match its signature.
        UserCodeError: the constructor or factory raised.
    """
    from torch import nn

    label = spec or getattr(obj, "__qualname__", repr(obj))
    kwargs = dict(kwargs or {})
    if isinstance(obj, nn.Module):
        if kwargs:
            raise SpecError(f"{label} is a module instance; --model-kwargs cannot apply to it")
        return obj
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise SpecError(
            f"{label} is a class but not a torch.nn.Module; give an nn.Module subclass or a "
            "function that returns a model"
        )
    if not callable(obj):
        raise SpecError(f"{label} is a {type(obj).__name__}, not an nn.Module or a factory")
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as exc:
        raise SpecError(f"{label} does not accept --model-kwargs {kwargs}: {exc}") from None
    except ValueError:
        pass  # builtins without a signature: let the call decide
    try:
        model = obj(**kwargs)
    except Exception as exc:
        if is_oom(exc):
            raise  # the weights do not fit: an allocation failure, not a bug

        raise UserCodeError.from_exception(exc, batch_size=None) from exc
    if not isinstance(model, nn.Module):
        raise SpecError(f"{label}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


#: samples read from a data set to find its largest (evenly spaced when it has more)
SCAN_LIMIT = 4096
#: bytes of samples kept (the largest first) for the trial batches; a larger batch repeats
#: the kept samples, largest first (a batch no smaller than the data set's largest)
KEEP_BYTES = 256 * 2**20


class LabelledBatch(tuple):
    """A collated ``(inputs..., target)`` batch: with ``loss="cross-entropy"`` the step passes
    the inputs to the model and scores its logits against the target."""


class RealBatches:
    """Trial batches of real samples: batch ``b`` is the ``b`` largest samples (by their
    elements: the longest sequences, the largest images), collated as a loader collates
    them. Variable-length data peaks on its longest batch; that is the memory edge.

    Picklable (it travels to the trial processes with its samples and collator).
    ``input_names``: the keywords a batch passes to the model (checked against its forward).
    """

    def __init__(
        self,
        samples: list[Any],
        collate: Any,
        *,
        label: str,
        scanned: int,
        total: int | None,
        target_last: bool = False,
    ) -> None:
        self.samples = samples
        self.collate = collate
        self.label = label
        self.scanned = scanned
        self.total = total
        self.target_last = target_last
        self.input_names: tuple[str, ...] = ()

    def __call__(self, batch_size: int) -> Any:
        n = len(self.samples)
        chosen = self.samples[:batch_size] if batch_size <= n else [
            self.samples[i % n] for i in range(batch_size)
        ]  # fmt: skip
        batch = self.collate(chosen)
        if self.target_last and isinstance(batch, list | tuple) and len(batch) >= 2:
            return LabelledBatch(batch)
        return batch

    def describe(self) -> str:
        """One line for the result: where the samples came from, how many were read."""
        of = f" of {self.total}" if self.total is not None else ""
        return (
            f"{self.label}: the largest of {self.scanned}{of} samples read, "
            f"{len(self.samples)} kept"
        )


def sample_elements(sample: Any) -> int:
    """The size of one sample: elements of its tensors and arrays, lengths of its sequences
    and strings (nested in tuples, lists and dicts); a number counts 1."""
    if hasattr(sample, "numel") and callable(sample.numel):
        return int(sample.numel())
    if hasattr(sample, "size") and hasattr(sample, "shape"):  # a NumPy array
        return int(sample.size)
    if isinstance(sample, str | bytes):
        return len(sample)
    if isinstance(sample, dict):
        return sum(sample_elements(v) for v in sample.values())
    if isinstance(sample, list | tuple):
        if sample and all(isinstance(v, int | float | bool) for v in sample):
            return len(sample)
        return sum(sample_elements(v) for v in sample)
    return 1


def _text_fields(sample: Any) -> tuple[str, ...]:
    """The keys of a dict sample whose values are strings (or lists of them)."""
    if not isinstance(sample, Mapping):
        return ()
    return tuple(
        str(key)
        for key, value in sample.items()
        if isinstance(value, str)
        or (isinstance(value, list | tuple) and value and isinstance(value[0], str))
    )


def _sample_bytes(sample: Any) -> int:
    if hasattr(sample, "element_size") and hasattr(sample, "numel"):
        return int(sample.numel() * sample.element_size())
    if isinstance(sample, dict):
        return sum(_sample_bytes(v) for v in sample.values())
    if isinstance(sample, list | tuple):
        return sum(_sample_bytes(v) for v in sample) if sample else 0
    return 8


def real_batches(source: Any, *, collate_fn: Any = None, target_last: bool = False) -> RealBatches:
    """The trial batches of a batch source: a map-style or iterable ``Dataset`` (a Hugging
    Face dataset too), a ``DataLoader`` (its dataset and ``collate_fn``), a spec
    ``pkg.mod:obj`` of one, or a function of no arguments returning one. ``collate_fn``
    overrides the loader's (default: ``torch.utils.data.default_collate``).

    Raises:
        SpecError: not a batch source, empty, or its samples do not collate.
        UserCodeError: reading a sample raised.
    """
    import torch.utils.data as tud

    label = source if isinstance(source, str) else type(source).__name__
    obj = load_object(source) if isinstance(source, str) else source
    if callable(obj) and not isinstance(obj, tud.DataLoader) and not hasattr(obj, "__getitem__"):
        try:
            obj = obj()
        except TypeError as exc:
            raise SpecError(
                f"batches {label!r}: a function given as the batch source is called with no "
                f"arguments and returns a Dataset or DataLoader ({exc})"
            ) from None
        except Exception as exc:
            raise UserCodeError.from_exception(exc, batch_size=None) from exc
    collate = collate_fn
    if isinstance(obj, tud.DataLoader):
        if obj.batch_size is None and collate is None:
            raise SpecError(
                f"batches {label!r}: this DataLoader has batch_size=None (it yields ready "
                "batches, which bsfinder cannot regroup by size); give its dataset and "
                "collate_fn instead"
            )
        collate = collate or obj.collate_fn
        obj = obj.dataset
    collate = collate or tud.default_collate
    if not callable(collate):
        raise SpecError(f"collate_fn must be callable, got {type(collate).__name__}")
    samples, total = _read_samples(obj, label)
    if not samples:
        raise SpecError(f"batches {label!r}: the data set is empty")
    order = sorted(range(len(samples)), key=lambda i: -sample_elements(samples[i]))
    kept: list[Any] = []
    held = 0
    for i in order:
        if kept and held + _sample_bytes(samples[i]) > KEEP_BYTES:
            break
        kept.append(samples[i])
        held += _sample_bytes(samples[i])
    batches = RealBatches(
        kept, collate, label=label, scanned=len(samples), total=total, target_last=target_last
    )
    try:  # the largest sample with the smallest: samples that do not pad fail here
        first = collate([kept[0], kept[-1]])
    except Exception as exc:
        text = _text_fields(kept[0])
        fix = (
            f"its samples hold text in {', '.join(map(repr, text))}, which no collator makes "
            "a tensor: drop those fields (a Hugging Face dataset: .remove_columns("
            f"{list(text)!r}), as Trainer drops the columns its model does not take)"
            if text
            else "give the collator that pads them (collate_fn=, or a DataLoader with one)"
        )
        raise SpecError(
            f"batches {label!r}: collating its samples failed ({type(exc).__name__}: {exc}); " + fix
        ) from None
    if isinstance(first, Mapping):  # a dict, an HF BatchEncoding
        batches.input_names = tuple(str(k) for k in first)
    elif isinstance(first, tuple) and len(first) == 2 and isinstance(first[1], dict):
        batches.input_names = tuple(str(k) for k in first[1])
    return batches


def _read_samples(dataset: Any, label: str) -> tuple[list[Any], int | None]:
    """Up to :data:`SCAN_LIMIT` samples (evenly spaced over a larger sized data set), and the
    data set's size when it has one."""
    try:
        total = len(dataset)
    except TypeError:
        total = None
    try:
        if total is not None and hasattr(dataset, "__getitem__"):
            step = max(1, -(-total // SCAN_LIMIT))
            return [dataset[i] for i in range(0, total, step)][:SCAN_LIMIT], total
        if not hasattr(dataset, "__iter__"):
            raise SpecError(
                f"batches {label!r}: a {type(dataset).__name__} is not a Dataset, a "
                "DataLoader or a function returning one"
            )
        samples = []
        for sample in dataset:
            samples.append(sample)
            if len(samples) >= SCAN_LIMIT:
                break
        return samples, total
    except SpecError:
        raise
    except Exception as exc:
        if is_oom(exc):
            raise
        raise UserCodeError.from_exception(exc, batch_size=None) from exc
