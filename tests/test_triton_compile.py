"""The Triton kernels compile for the GPUs they are for, with no GPU here.

The interpreter runs the kernels' upcast path; the tensor-core path (bf16/fp16 tiles into
tl.dot, the GPU configs) only exists when compiling for a real target. This compiles it
for sm_90 (H100/H200) and sm_80 (A100) through tools/triton_resources.py, in a
subprocess because this process has the interpreter switched on.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.scripts

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "triton_resources.py"
ARCHS = (90, 80)
DTYPES = ("bfloat16", "float16", "float32", "tf32")  # tf32: float32 inputs, tf32 products


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A row per (arch, dtype, kernel, flag set), compiled with the config FLASHCL_TRITON_AUTOTUNE=0 pins."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile, do not reuse
    # One process per architecture, at once: the compiler is single-threaded, and this is the suite's longest wait.
    runs = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp("report") / f"sm{arch}.json"
        runs[arch] = path, subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch), "--first-config",
                                             "--dtype", *DTYPES, "--json", str(path)], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = []
    for arch, (path, run) in runs.items():
        stdout, stderr = run.communicate()
        assert path.exists(), f"sm_{arch} report not written:\n{stdout}\n{stderr}"
        rows += json.loads(path.read_text())["rows"]
    return rows


def test_every_kernel_compiles(rows):
    failures = [f"sm_{r['arch']} {r['dtype']} {r['kernel']} [{r['flags']}]: {r['error']}" for r in rows if "error" in r]
    assert not failures, "\n".join(failures)
    kernels_per_dtype = len({(r["kernel"], r["flags"]) for r in rows})
    assert kernels_per_dtype >= 5 and len(rows) == kernels_per_dtype * len(ARCHS) * len(DTYPES)


@pytest.mark.parametrize("arch,mma", [(90, "wgmma"), (80, "mma.sync")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "tf32"])
def test_half_and_tf32_products_use_tensor_cores(rows, arch, dtype, mma):
    chosen = [r for r in rows if r["arch"] == arch and r["dtype"] == dtype]
    assert chosen and {r["mma"] for r in chosen} == {mma}


def test_exact_float32_products_stay_off_tensor_cores(rows):
    """torch's "highest" fp32 precision (the default) is a true fp32 product: FMAs, never tf32."""
    chosen = [r for r in rows if r["dtype"] == "float32"]
    assert chosen and {r["mma"] for r in chosen} == {"fma"}


def test_column_lock_is_released_after_every_warps_stores(rows):
    """The merged-column forward releases its lock from one thread; a CTA barrier must order the
    other warps' stores of the column statistics before that atomic (else the next holder may
    read a new max with a stale sum)."""
    merged = [r for r in rows if r["kernel"] == "lse_forward" and r["flags"].startswith("merged")]
    assert merged and all(r["lock_release_fenced"] is True for r in merged), merged


def test_backward_orders_its_accumulator_between_column_blocks(rows):
    """Each column block reads back the fp32 rows the previous one stored, possibly from other
    threads: the kernel's explicit barrier must survive compilation."""
    backward = [r for r in rows if r["kernel"] == "weighted_products"]
    assert backward and all(r["source_barriers"] >= 1 for r in backward)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_kernels_fit_the_register_file(rows, dtype):
    """A spill to local memory costs more than the tile it saves; the configs must not need one."""
    spilled = [f"sm_{r['arch']} {r['kernel']} [{r['flags']}] {r['config']}: {r['spill_stores']} bytes"
               for r in rows if r["dtype"] == dtype and r.get("spill_stores")]
    assert not spilled, "\n".join(spilled)
