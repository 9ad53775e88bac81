"""A compiled Keras 3 model (torch backend) probed with Keras's own training step: the batch
found is what ``model.fit`` then trains with in a fresh process under the same budget, and
the next size at the granularity is not (issue 15, item 3).

Before: a ``train_step`` running ``model.fit`` gave 128 in-process and 248 in fresh
processes, and nothing said which one ``fit`` could use.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras loads
pytest.importorskip("keras")

import keras
import numpy as np

from bsfinder.errors import SpecError
from bsfinder.integrations.keras import check_fit, find_fit_batch_size

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="Keras on torch")

BUDGET = "256MiB"
GRANULARITY = 64
SAMPLES = 8192


def _model(compiled: bool = True) -> keras.Model:
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(4096, activation="relu"), keras.layers.Dense(10)]
    )
    if compiled:
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    return model


def _data(samples: int = SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((samples, 64), dtype=np.float32), rng.integers(0, 10, samples)


@pytest.fixture(scope="module")
def probed():
    model = _model()
    x, y = _data()
    weights = [w.copy() for w in model.get_weights()]
    result = find_fit_batch_size(
        model, x, y, memory_limit=BUDGET, device="cpu", granularity=GRANULARITY,
        warmup_steps=1, steps=1, time_limit=None,
    )  # fmt: skip
    return model, x, y, weights, result


# In the fast tier since the fork server keeps Keras's import (pyarrow's jemalloc thread is
# no fork hazard): the trials and the fresh check are then children of servers that imported
# the same modules. Measured, 5 probes: 5056 every time, the trial's peak 255.76-255.95 MiB,
# the fresh check's 254.38-254.52 (the trial's warm-up call peaks 1.3 MiB higher); 5120 does
# not fit fresh (+3.1 MiB per 64 samples). Before, each trial imported Keras afresh and the
# two sides lay a fraction of a MiB apart, either way (0.14 MiB under once in CI).
def test_the_batch_found_is_what_fit_trains_with_and_the_next_is_not(probed) -> None:
    model, x, y, _, result = probed
    found = result.max_batch
    assert found is not None and found % GRANULARITY == 0
    assert GRANULARITY < found < SAMPLES  # the budget, not the data set, set the edge
    assert result.runner["isolation"] == "process"
    assert result.workload["custom_train_step"]
    # model.fit itself, in a brand-new process under the same budget
    at_found = check_fit(model, x, y, batch_size=found, memory_limit=BUDGET)
    assert at_found.fits, at_found.error
    assert not check_fit(model, x, y, batch_size=found + GRANULARITY, memory_limit=BUDGET).fits


def test_the_users_model_is_not_trained_by_the_probe(probed) -> None:
    model, _, _, weights, _ = probed
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights, strict=True))
    assert not model.optimizer.built  # its state was created in the trials' copies only


def test_no_batch_larger_than_the_data_set_is_tried() -> None:
    x, y = _data(3)
    result = find_fit_batch_size(
        _model(), x, y, memory_limit=BUDGET, device="cpu", warmup_steps=0, steps=1
    )
    assert result.max_batch == 3
    assert max(t.batch_size for t in result.trials) == 3


def test_an_uncompiled_model_is_refused_saying_to_compile_it() -> None:
    x, y = _data(16)
    with pytest.raises(SpecError, match=r"not compiled: call model.compile"):
        find_fit_batch_size(_model(compiled=False), x, y, memory_limit=BUDGET, device="cpu")


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (iter([1, 2]), None, "must be an array or tensor"),
        (np.zeros((8, 64), np.float32), np.zeros(7), "x has 8 samples but y has 7"),
        ({"a": np.zeros((8, 2)), "b": np.zeros((4, 2))}, None, "different numbers of samples"),
    ],
)
def test_inputs_that_fit_could_not_batch_are_refused(x, y, match) -> None:
    with pytest.raises(SpecError, match=match):
        find_fit_batch_size(_model(), x, y, memory_limit=BUDGET, device="cpu")


def test_a_backend_other_than_torch_is_refused_before_keras_loads() -> None:
    code = (
        "from bsfinder.errors import SpecError\n"
        "from bsfinder.integrations.keras import find_fit_batch_size\n"
        "try:\n    find_fit_batch_size(None, None)\n"
        "except SpecError as exc:\n    print(exc)\n"
        "import sys; print('keras' in sys.modules)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "'jax' backend" in out.stdout and "KERAS_BACKEND=torch" in out.stdout
    assert out.stdout.strip().endswith("False")


def test_a_keras_loaded_on_another_backend_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    x, y = _data(16)
    with pytest.raises(SpecError, match="'tensorflow' backend"):
        find_fit_batch_size(_model(), x, y, memory_limit=BUDGET, device="cpu")
