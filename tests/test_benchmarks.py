"""benchmarks/sampler_vs_diffusers.py at the tiniest size: every row runs, the JSON has its structure, and mmsynth
matches diffusers' pipelines to the pixel (same weights). Timings are not checked: they are the benchmark's job."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mmsynth.models.zoo import TINY, random_bundle
from script_module import script_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler_vs_diffusers.py"
TINIEST = ["--steps", "2", "--batch", "1", "--repeats", "1"]
PIXEL_TOLERANCE = 1  # uint8 rounding of float32 outputs that agree to ~1e-6


@pytest.fixture(scope="module")
def bench():
    with script_module(BENCH) as module:
        yield module


def _check_row(row: dict, method: str | None) -> None:
    assert set(row) == {"row", "first", "second", "seconds", "ratio", "cpu_seconds", "cpu_ratio",
                        "max_pixel_difference", "peak_memory_mib"}  # fmt: skip
    assert row["first"].startswith("mmsynth")
    assert set(row["seconds"]) == set(row["cpu_seconds"]) == set(row["peak_memory_mib"]) == {"first", "second"}
    assert all(s > 0 for s in [*row["seconds"].values(), *row["cpu_seconds"].values()])
    assert row["ratio"] == pytest.approx(row["seconds"]["first"] / row["seconds"]["second"])
    assert row["cpu_ratio"] == pytest.approx(row["cpu_seconds"]["first"] / row["cpu_seconds"]["second"])
    for mib in row["peak_memory_mib"].values():
        assert (mib is None) == (method is None)
        assert mib is None or mib >= 0


def test_the_controlnet_rows_match_diffusers_and_the_adapter_rows_say_why_they_skip(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert bench.main(["--model", "tiny", *TINIEST, "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["steps"] == 2 and result["batch"] == 1
    assert [r["row"] for r in result["rows"]] == ["plain", "controlnet", "controlnet2"]
    for row in result["rows"]:
        _check_row(row, result["peak_memory_method"])
        assert row["second"].startswith("diffusers")
        assert row["max_pixel_difference"] <= PIXEL_TOLERANCE, row
    # the tiny UNet's first down block has no cross-attention, where an adapter's first features go
    assert [r["row"] for r in result["skipped"]] == ["adapter", "adapter-cost"]
    assert all("cross-attention in every down block" in r["reason"] for r in result["skipped"])
    printed = capsys.readouterr().out
    assert "controlnet2" in printed and "skipped adapter:" in printed


def test_the_adapter_rows_on_a_unet_that_takes_adapter_features(bench):
    b = random_bundle(dataclasses.replace(TINY, unet_cross_attention_levels=(True, True, True)), seed=0)
    result = bench.run_rows(b, ["adapter", "adapter-cost"], bench.Settings(steps=2, batch=1, repeats=1))
    assert result["skipped"] == []
    adapter, cost = result["rows"]
    for row in (adapter, cost):
        _check_row(row, result["peak_memory_method"])
    assert adapter["second"].startswith("diffusers") and adapter["max_pixel_difference"] <= PIXEL_TOLERANCE
    assert cost["second"] == "mmsynth" and cost["max_pixel_difference"] is None  # the two sides differ by design
    assert cost["peak_memory_mib"]["first"] == adapter["peak_memory_mib"]["first"]  # the same run, measured once


def test_an_unknown_row_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--rows", "plain,lora"])
    assert "unknown row" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown row"):
        bench.run_rows(None, ["lora"], bench.Settings())
