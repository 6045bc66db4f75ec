"""The GPU check's CPU dry run (benchmarks/gpu_check.sh --dry-run: tiny sizes, Triton interpreted, no
CUDA extension) runs every phase and writes its report, so the one prepared GPU call cannot rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.scripts,
              pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu", reason="the GPU run is the real one")]
ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes_every_phase(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | dict(PYTHON=sys.executable,
                                                                                  OUT=str(tmp_path))
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["ok"] and set(report["provenance"]) >= {"commit", "dirty", "date", "machine", "versions", "backends"}
    phases = report["phases"]
    assert set(phases) == {"contact bf16", "contact fp16", "contact fp32", "contact tf32", "stress", "headline clip",
                           "headline siglip", "autocast"}
    checked = [r for r in phases["contact bf16"]["records"] if "rel_err" in r]
    assert len(checked) >= 60 and all(r["ok"] for r in checked)  # Triton's checks ran; CUDA's is a skip here
    assert any("skipped" in r for r in phases["contact bf16"]["records"])
    assert {r["impl"] for r in phases["headline clip"]["records"]} >= {"triton", "textbook"}
