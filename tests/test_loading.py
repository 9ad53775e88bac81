"""Specs from the command line: models and inputs, with one-line errors."""

from __future__ import annotations

import pytest

from bsfinder.errors import SpecError
from bsfinder.workload.loading import InputSpec, build_model, load_object, parse_input_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3x224x224", InputSpec((3, 224, 224))),
        ("128", InputSpec((128,))),
        ("128:int64:50257", InputSpec((128,), "int64", high=50257)),
        ("128:long:1:50257", InputSpec((128,), "int64", low=1, high=50257)),
        ("labels=:int64:10", InputSpec((), "int64", name="labels", high=10)),
        ("x=16x8:bf16", InputSpec((16, 8), "bfloat16", name="x")),
        ("mask=128:bool", InputSpec((128,), "bool", name="mask", high=2)),
    ],
)
def test_input_specs(text: str, expected: InputSpec) -> None:
    assert parse_input_spec(text) == expected
    assert parse_input_spec(expected.describe()) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("3xAx2", "must be sizes joined by 'x'"),
        ("3x0", ">= 1"),
        ("128:int99", "unknown dtype"),
        ("128:int64", "need a value range"),
        ("128:float32:10", "only for integer dtypes"),
        ("128:int64:10:5", "is empty"),
        ("1bad=3", "not a valid argument name"),
    ],
)
def test_bad_input_specs_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(")) as info:
        parse_input_spec(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nosuchmod:Net", "no module named 'nosuchmod'"),
        ("Net", "must be MODULE:NAME"),
        ("bsfinder.examples:NoSuchThing", "has no attribute 'NoSuchThing'"),
        ("does/not/exist.py:Net", "no such file"),
    ],
)
def test_bad_model_specs(spec: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        load_object(spec)


def test_model_from_file_path(tmp_path) -> None:
    path = tmp_path / "mymodel.py"
    path.write_text(
        "import torch\n"
        "class Net(torch.nn.Linear):\n"
        "    def __init__(self, n=3):\n"
        "        super().__init__(n, 2)\n"
    )
    model = build_model(load_object(f"{path}:Net"), {"n": 5})
    assert model.in_features == 5


def test_not_a_module_and_bad_kwargs() -> None:
    with pytest.raises(SpecError, match=r"not a torch\.nn\.Module"):
        build_model(dict)
    with pytest.raises(SpecError, match="does not accept --model-kwargs"):
        build_model(load_object("bsfinder.examples:MLP"), {"nope": 1})
    with pytest.raises(SpecError, match="returned a int"):
        build_model(lambda: 3)


def test_objects_defined_in_a_script_travel_by_value(monkeypatch) -> None:
    import functools
    import io
    import sys

    import torch

    from bsfinder.execution.placement import _by_value

    def net() -> int:
        return 7

    net.__module__ = "__main__"
    net.__qualname__ = "net"
    monkeypatch.setattr(sys.modules["__main__"], "net", net, raising=False)
    blob, why = _by_value(functools.partial(net))
    assert blob is not None and why == ""
    loaded = torch.load(io.BytesIO(blob), weights_only=False)
    assert loaded() == 7
    assert loaded.func is not net  # by value: rebuilt from its code, not looked up in __main__
    blob, why = _by_value({"depth": 18})
    assert blob is not None and why == ""
