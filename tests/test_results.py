"""Results are frozen, versioned JSON that round-trips and is written atomically."""

from __future__ import annotations

import json

import pytest

from bsfinder import FakeRunner, ProbeResult, ProbeSettings, run_probe
from bsfinder.core.results import SCHEMA_VERSION


def _result() -> ProbeResult:
    dev = FakeRunner(capacity_bytes=6000, fixed_bytes=1000, per_sample_bytes=10)
    return run_probe(dev, ProbeSettings(base_lr=3e-4, base_batch=64))


def test_json_round_trip(tmp_path) -> None:
    result = _result()
    path = tmp_path / "out" / "result.json"
    result.save(path)
    loaded = ProbeResult.load(path)
    assert loaded == result
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert next(iter(data)) == "schema_version"
    assert data["trials"][0]["samples_per_s"] == pytest.approx(result.trials[0].samples_per_s)
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temp file left


def test_future_schema_is_rejected_with_a_clear_message() -> None:
    data = _result().to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="upgrade bsfinder"):
        ProbeResult.from_dict(data)
    with pytest.raises(ValueError, match="not a bsfinder result"):
        ProbeResult.from_dict({"trials": []})


def test_results_are_frozen() -> None:
    result = _result()
    with pytest.raises(AttributeError):
        result.trials = ()  # type: ignore[misc]


def test_a_version_1_result_still_loads() -> None:
    # GIVEN a result as bsfinder wrote it before the noise scale and plans existed
    data = _result().to_dict()
    data["schema_version"] = 1
    rec = data["recommendations"]
    for key in ("time_optimal_basis", "time_optimal_range", "noise_scale", "global_batch",
                "ranks", "plans"):  # fmt: skip
        del rec[key]
    del rec["learning_rate"]["advice"]
    loaded = ProbeResult.from_dict(json.loads(json.dumps(data)))
    assert loaded.schema_version == 1 and loaded.recommendations.noise_scale is None
    assert loaded.recommendations.time_optimal_basis == "throughput"
    assert loaded.recommendations.learning_rate.advice == ()
