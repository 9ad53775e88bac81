"""Card presets for ``estimate``: their arithmetic, their sources, and the safe batch."""

from __future__ import annotations

import pytest

from bsfinder.api import estimate_memory
from bsfinder.devices.cards import CARDS, MIB, RESERVED_MIB, card
from bsfinder.errors import SpecError

MODEL = "tests.models:mlp"
OPTIONS = {"inputs": ["512"], "model_kwargs": {"width": 512, "hidden": 2048}}


def test_usable_memory_is_cudas_total_else_nvidia_smis_less_the_reserve() -> None:
    a100 = card("A100-40GB")  # case-insensitive
    assert a100.usable_bytes == 40339 * MIB  # deviceQuery's total, not nvidia-smi's 40960
    h100 = card("h100-80gb")
    assert h100.cuda_total_mib is None
    assert h100.usable_bytes == (81559 - RESERVED_MIB) * MIB
    assert h100.usable_bytes < 80 * 2**30  # an "80GB" card is not 80 GiB usable


@pytest.mark.parametrize("name", sorted(CARDS))
def test_every_preset_cites_a_public_source_and_is_below_its_smi_total(name: str) -> None:
    preset = CARDS[name]
    assert preset.name == name == name.lower()
    assert preset.sources and all(s.startswith("https://") for s in preset.sources)
    assert 0 < preset.usable_bytes < preset.smi_mib * MIB


def test_an_unknown_preset_is_a_spec_error_listing_them() -> None:
    with pytest.raises(SpecError, match=r"no card preset 'h900'.*h100-80gb.*--target-memory"):
        card("h900")


def test_a_preset_estimates_as_its_usable_memory_with_a_safe_batch() -> None:
    # GIVEN an L4 preset, WHEN estimated, THEN as --target-memory of its usable bytes
    preset = card("l4")
    by_name = estimate_memory(MODEL, target="l4", granularity=64, **OPTIONS)
    by_bytes = estimate_memory(
        MODEL, target="cuda", target_memory=preset.usable_bytes, granularity=64, **OPTIONS
    )
    assert by_name.max_batch == by_bytes.max_batch is not None
    assert by_name.target["card"] == "l4" and by_name.target["card_sources"]
    assert by_name.target["memory_bytes"] == preset.usable_bytes
    # AND the safe batch leaves the probe's 5% headroom, traced (not read off the line)
    safe = by_name.safe_batch
    assert safe is not None and safe < by_name.max_batch and by_name.headroom == 0.05
    assert by_name.point(safe).peak_bytes <= 0.95 * preset.usable_bytes


def test_a_preset_and_a_target_memory_together_are_refused() -> None:
    with pytest.raises(SpecError, match="not both"):
        estimate_memory(MODEL, target="l4", target_memory="24GiB", **OPTIONS)
    with pytest.raises(SpecError, match="headroom"):
        estimate_memory(MODEL, target="l4", headroom=1.5, **OPTIONS)


# -- scale-out from an estimate (issue 17: it used to refuse one) -------------------------------
def test_scale_out_plans_ranks_from_an_estimate_result(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from bsfinder.cli import main

    path = tmp_path / "estimate.json"
    estimate = estimate_memory(MODEL, target="l4", granularity=64, **OPTIONS)
    path.write_text(json.dumps(estimate.to_dict()))
    out = tmp_path / "plan.json"
    run = CliRunner().invoke(main, ["scale-out", str(path), "--ranks", "4", "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert "per-rank memory from an estimate of tests.models:mlp on l4" in run.output
    assert "estimated on one device" in run.output
    plans = {p["strategy"]: p for p in json.loads(out.read_text())}
    # DDP keeps a full copy per rank: about the single device's largest batch (the
    # gradient buckets cost a little); FSDP shards the state and fits more
    assert plans["ddp"]["max_batch"] <= estimate.max_batch + 64
    assert plans["fsdp"]["max_batch"] >= plans["ddp"]["max_batch"]
    assert plans["fsdp"]["capacity_bytes"] == card("l4").usable_bytes


def test_scale_out_of_an_estimate_without_a_target_memory_says_what_to_give(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from bsfinder.cli import main
    from bsfinder.core.scaleout import probe_from_estimate

    path = tmp_path / "estimate.json"
    estimate = estimate_memory(MODEL, target="cuda", batch_sizes=[8, 16], **OPTIONS)
    path.write_text(json.dumps(estimate.to_dict()))
    run = CliRunner().invoke(main, ["scale-out", str(path)])
    assert run.exit_code == 2 and "--target-memory or a card preset" in run.output
    run = CliRunner().invoke(main, ["scale-out", str(path), "--memory", "24GiB", "--ranks", "2"])
    assert run.exit_code == 0, run.output
    with pytest.raises(SpecError, match="incomplete"):
        probe_from_estimate({"kind": "estimate", "points": [{"batch_size": 1}]})


def test_the_estimate_cli_takes_a_preset_and_prints_the_safe_batch() -> None:
    from click.testing import CliRunner

    from bsfinder.cli import main

    args = ["estimate", MODEL, "--input", "512", "--model-kwargs", '{"hidden": 2048}']
    run = CliRunner().invoke(main, [*args, "--target", "L4", "--granularity", "64"])
    assert run.exit_code == 0, run.output
    assert "estimate for NVIDIA L4 (l4: 22.0 GiB usable)" in run.output
    assert "safe (5% headroom)  :" in run.output and "largest batch that fits:" in run.output
    both = CliRunner().invoke(main, [*args, "--target", "l4", "--target-memory", "24GiB"])
    assert both.exit_code == 2 and "not both" in both.output
    unknown = CliRunner().invoke(main, [*args, "--target", "h900"])
    assert unknown.exit_code == 2 and "h100-80gb" in unknown.output


# -- the sequence-length frontier (issue 17, item 3) ---------------------------------------------
GPT2 = "examples/hf_models.py:gpt2"
TOKENS = ["input_ids=64:int64:1000", "labels=64:int64:1000"]
GPT2_KWARGS = {"n_layer": 1, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 256}


def test_the_frontier_gives_the_largest_batch_per_sequence_length() -> None:
    from bsfinder.api import estimate_frontier

    pytest.importorskip("transformers")
    points = estimate_frontier(
        GPT2, sequence_lengths=[256, 64, 128], inputs=TOKENS, model_kwargs=GPT2_KWARGS,
        target="cuda", target_memory="1GiB", granularity=8,
    )  # fmt: skip
    assert [p.sequence_length for p in points] == [64, 128, 256]  # sorted
    batches = [p.max_batch for p in points]
    assert all(b is not None for b in batches) and batches == sorted(batches, reverse=True)
    for p in points:
        assert p.tokens_per_step == p.max_batch * p.sequence_length
        assert p.peak_bytes is not None and p.peak_bytes <= 2**30
        assert p.safe_batch is not None and p.safe_batch <= p.max_batch
    # each point is the estimate at that length
    direct = estimate_memory(
        GPT2, inputs=["input_ids=128:int64:1000", "labels=128:int64:1000"],
        model_kwargs=GPT2_KWARGS, target="cuda", target_memory="1GiB", granularity=8,
    )  # fmt: skip
    assert points[1].max_batch == direct.max_batch


def test_the_frontier_needs_token_inputs_and_no_batch_sizes() -> None:
    from bsfinder.api import estimate_frontier

    with pytest.raises(SpecError, match="token inputs"):
        estimate_frontier(MODEL, sequence_lengths=[64], inputs=["512"], target="l4")
    with pytest.raises(SpecError, match="no batch sizes"):
        estimate_frontier(GPT2, sequence_lengths=[64], inputs=TOKENS, batch_sizes=[4])
    with pytest.raises(SpecError, match="positive integers"):
        estimate_frontier(GPT2, sequence_lengths=[0], inputs=TOKENS)


def test_the_estimate_cli_prints_the_frontier_and_writes_it(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from bsfinder.cli import main

    pytest.importorskip("transformers")
    out = tmp_path / "frontier.json"
    args = ["estimate", GPT2, *(a for t in TOKENS for a in ("--input", t)), "--model-kwargs",
            json.dumps(GPT2_KWARGS), "--target", "t4", "--seq-len", "64", "--seq-len", "256",
            "--json", str(out)]  # fmt: skip
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert "largest batch per sequence length (t4)" in run.output
    data = json.loads(out.read_text())
    assert data["kind"] == "estimate-frontier"
    assert [p["sequence_length"] for p in data["points"]] == [64, 256]
