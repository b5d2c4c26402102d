"""Benchmark plumbing on the tiny detector (timings are not asserted: benchmarks are never timed tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dede_rt.bench import markdown_table, prepare_bundle, run_benchmark, write_reports
from dede_rt.engines.registry import choose_runner
from dede_rt.export import export_detector
from bundle_helpers import deployment

FIELDS = {"backend", "precision", "batch", "throughput", "latency_mean_ms", "latency_median_ms", "latency_p90_ms",
          "latency_p95_ms", "latency_p99_ms", "host_walltime_s", "speedup_vs_baseline", "spearman_vs_torch"}


@pytest.fixture(scope="module")
def bundle(tiny_detector_dir: Path, tmp_path_factory: pytest.TempPathFactory, demo_images) -> Path:
    out = tmp_path_factory.mktemp("bench") / "det"
    shutil.copytree(tiny_detector_dir, out)
    export_detector(out, exporter="torchscript", graphs=("detector",), verify=False)
    return prepare_bundle(out, out.parent, demo_images.images[300:800], ("int8",), log=lambda _: None)


def test_rows_reports_and_recorded_speeds(bundle: Path, demo_images, tmp_path: Path) -> None:
    variants = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tensorrt", "fp16"))
    threads_before = torch.get_num_threads()
    result = run_benchmark(bundle, demo_images.images[:64], batches=(1, 16), variants=variants, seconds=0.02,
                           rounds=2, threads=1, log=lambda _: None)  # 1 thread: torch crawls on busy shared cores
    rows = result["rows"]
    assert torch.get_num_threads() == threads_before  # the benchmark restores the caller's pool size
    assert {(r["backend"], r["precision"]) for r in rows} == set(variants[:3])
    assert len(rows) == 6 and all(FIELDS <= set(r) for r in rows)
    assert all(r["throughput"] > 0 and r["latency_min_ms"] <= r["latency_median_ms"] <= r["latency_p99_ms"]
               for r in rows)
    assert "tensorrt:fp16" in result["skipped"]
    assert result["baseline"]["backend"] == "torch" and result["baseline"]["batch"] == 16  # largest torch batch
    ort = next(r for r in rows if r["backend"] == "onnxruntime" and r["precision"] == "fp32")
    assert ort["max_rel_diff_vs_torch"] < 1e-4
    int8 = next(r for r in rows if r["precision"] == "int8")
    assert int8["spearman_vs_torch"] > 0.99 and int8["quality_gate"]["passed"]
    best = deployment(bundle)["benchmarks"]
    assert set(best) == {"torch:fp32", "onnxruntime:fp32", "onnxruntime:int8"}
    # auto takes INT8 only after a labelled gate; this bundle's gate is clean-only
    assert int8["quality_gate"]["mode"] == "clean-rank"
    usable = [k for k in best if k != "onnxruntime:int8"]
    fastest = max(usable, key=lambda k: best[k]["throughput"])
    choice = choose_runner(bundle)
    assert f"{choice.backend}:{choice.precision}" == fastest and "measured" in choice.reason
    write_reports(result, tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["backend"]
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "| onnxruntime | int8 | 16 |" in markdown_table(result)


def test_build_engine_cli_without_tensorrt_exits_2(bundle: Path) -> None:
    from dede_rt.engines.tensorrt_runner import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present")
    proc = subprocess.run([sys.executable, "-m", "dede_rt.cli", "build-engine", str(bundle), "--precision", "int8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT" in lines[0] and "pip install" in lines[0]
