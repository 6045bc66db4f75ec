"""benchmarks/bench_gpu.py runs end to end (on CPU, tiny, Triton interpreted), so a GPU
session's time is not lost to a crash in the benchmark's own plumbing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.scripts

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu", reason="the GPU run is the real one")
def test_bench_gpu_smoke(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("matplotlib")
    stem = tmp_path / "smoke"
    run = subprocess.run([sys.executable, "bench_gpu.py", "--dims", "32", "--batch-sizes", "48", "--extra",
                          "--contenders", "triton", "cuda", "textbook", "--out", str(stem)],
                         cwd=BENCHMARKS, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    points = {row["impl"]: row for row in result["rows"]}
    assert points["triton"]["median_s"] > 0 and points["triton"]["forward_median_s"] > 0
    assert points["textbook"]["median_s"] > 0 and points["textbook"]["forward_median_s"] is None
    # Both compute the same loss on the same data.
    assert abs(points["triton"]["loss"] - points["textbook"]["loss"]) < 1e-4 * abs(points["textbook"]["loss"])
    assert points["cuda"] == {**points["cuda"], "error": "not available"}  # no extension on this machine
    assert set(result["triton_configs"]) == {"lse_forward", "softplus_sums", "weighted_products"}
    assert "| 48 | 32 | triton |" in run.stdout
    assert stem.with_suffix(".png").stat().st_size > 0


@pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu", reason="the GPU run is the real one")
def test_bench_gpu_siglip_smoke(tmp_path):
    pytest.importorskip("triton")
    stem = tmp_path / "siglip"
    run = subprocess.run([sys.executable, "bench_gpu.py", "--loss", "siglip", "--dims", "32", "--batch-sizes", "48",
                          "--extra", "--contenders", "triton", "textbook", "open_clip", "--out", str(stem)],
                         cwd=BENCHMARKS, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    points = {row["impl"]: row for row in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    for name in ("textbook", "open_clip"):  # the same loss on the same data
        assert abs(points["triton"]["loss"] - points[name]["loss"]) < 1e-4 * abs(points[name]["loss"])
    assert "SigLIP's sigmoid loss" in run.stdout
