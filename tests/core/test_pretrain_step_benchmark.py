"""The step benchmark's code path (the one the CUDA script runs), exercised on the CPU at tiny scale.

No timing is checked here (speed lives in benchmarks/): only that every measurement runs end to end with the
loop's precision and optimiser, and reports what the tables need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pretrain_step_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spec_for(method: str, **changes) -> dict:
    spec = {
        "device": "cpu",
        "preset": "tiny",
        "roi": 32,
        "batch": 1,
        "warmup": 1,
        "repeats": 1,
        "threads": None,
        "method": method,
        "precision": "bf16",
        "compile": False,
        "fused": True,
        "count_flops": True,
    }
    return {**spec, **changes}


@pytest.mark.parametrize("method", ["dagman", "swinunetr-ssl"])
def test_a_measurement_runs_end_to_end(bench, method):
    got = bench.worker(spec_for(method))
    assert got["seconds"] > 0 and got["flops"] > 1e8 and got["peak_memory_mb"] > 100
    assert len(got["times"]) == 1 and got["first_step_extra_seconds"] >= 0


def test_ratios_and_the_real_run_memory(bench):
    rows = [
        {"method": m, "precision": "bf16", "compiled": False, "seconds": s, "seconds_fp32_eager": 2 * s,
         "flops": 1e9, "speedup_vs_fp32_eager": 2.0, "compile_seconds": 0.0, "peak_rss_mb": 1.0}
        for m, s in (("dagman", 1.0), ("swinunetr-ssl", 0.5))
    ]  # fmt: skip
    bench.add_ratios(rows, peak=1e10, peak_bf16=4e10)
    assert rows[0]["ratio_to_swinunetr_ssl"] == 2.0 and rows[0]["efficiency_vs_swinunetr_ssl"] == 0.5
    assert rows[0]["fraction_of_peak_fp32"] == pytest.approx(0.1) and rows[0]["fraction_of_peak_bf16"] == 0.025
    got = bench.memory_worker({"device": "cpu", "preset": "tiny", "roi": 32, "batch": 1, "steps": 1, "precision": "fp32"})
    assert got["precision"] == "fp32" and got["compiled"] is False and got["peak_memory_mb"] > 100
