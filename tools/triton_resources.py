"""Compile the Triton kernels for a GPU without one, and report what each config costs.

No GPU is needed: a compile-only driver hands Triton a target (sm_90 by default) and the
kernels go through the same launch wrappers as a real call, with every launch replaced by
a compile. ptxas then reports each config's registers, spills and shared memory, and the
PTX says which matrix instruction the products use (wgmma on Hopper, mma.sync before).

    python tools/triton_resources.py                 # every config, sm_90, table
    python tools/triton_resources.py --arch 80 --first-config --json out.json

Run it without TRITON_INTERPRET (it exits if set): the interpreter replaces the kernels.
Exits 1 if any kernel fails to compile.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_resources.py compiles for a GPU target; unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the kernels of this checkout
from triton_kernels import lse_forward, softplus_sums, weighted_products

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


class CompileOnlyDriver:
    """Just enough of a Triton driver to compile (never launch) for one target."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch  # Triton caches per device; one "device" per target keeps them apart

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def recorded_launch(module, call):
    """The (args, kwargs) of the one kernel launch `call` makes through module.launch, recorded, not run."""
    calls, original = [], module.launch
    module.launch = lambda tuned, grid, args, kwargs, fixed_config, device: calls.append((args, kwargs))
    try:
        call()
    finally:
        module.launch = original
    (launch,) = calls  # each wrapper launches its kernel once
    return launch


# What --dtype names: the input dtype, and the fp32 product precision where it matters.
PRODUCTS = {"bfloat16": (torch.bfloat16, "ieee"), "float16": (torch.float16, "ieee"),
            "float32": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32")}


def cases(dtype_name):
    """(kernel name, flags, jit function, configs, launch) for the flag sets the losses use."""
    dtype, precision = PRODUCTS[dtype_name]
    n, m, d = 300, 200, 768
    x, y = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    scale = torch.tensor(10.0)
    rows_w, rows_off = torch.rand(n), torch.rand(n)
    cols_w, cols_off = torch.rand(m), torch.rand(m)
    targets, coeff = torch.arange(n) % m, -torch.ones(n)
    guide_x, guide_y = torch.randn(n, 384, dtype=dtype), torch.randn(m, 384, dtype=dtype)  # a guide of its own width
    threshold, threshold_y = torch.rand(n), torch.rand(m)
    forward = lse_forward._lse_forward_kernel, lse_forward.lse_configs()
    guided_forward = lse_forward._lse_forward_kernel, lse_forward.guided_lse_configs()
    sigmoid_forward = softplus_sums._softplus_sums_kernel, softplus_sums.softplus_configs()
    backward = weighted_products._weighted_products_kernel, weighted_products.backward_configs()

    def with_precision(launch):
        args, kwargs = launch
        return args, {**kwargs, "PRECISION": precision}

    def lse(diagonal, merge_columns, guided=False):
        guide = dict(guide_a=guide_x, guide_b=guide_y, threshold=threshold) if guided else {}
        return with_precision(recorded_launch(lse_forward, lambda: lse_forward.lse_forward(
            x, y, scale, diagonal, merge_columns, **guide)))

    def sums(diagonal):
        return with_precision(recorded_launch(softplus_sums, lambda: softplus_sums.softplus_sums(
            x, y, scale, torch.tensor([-10.0]), diagonal)))

    def products(row_term, col_term, positives_by, diagonal, sigmoid=False, guided=False, by_row=True):
        guide = dict(guide_a=guide_x, guide_b=guide_y, threshold=threshold if by_row else threshold_y,
                     threshold_by_row=by_row) if guided else {}
        return with_precision(recorded_launch(weighted_products, lambda: weighted_products.weighted_products(
            x, y, scale, *((rows_w, rows_off) if row_term else (None, None)),
            *((cols_w, cols_off) if col_term else (None, None)),
            *((targets, coeff) if positives_by else (None, None)),
            positives_by, diagonal, 0, n, sigmoid=sigmoid, **guide)))

    yield "lse_forward", "merged columns (symmetric CLIP)", *forward, lse(False, True)
    yield "lse_forward", "rows only, diagonal excluded (NT-Xent)", *forward, lse(True, False)
    yield "weighted_products", "both terms, positives by row (CLIP dx)", *backward, products(True, True, 1, False)
    yield "weighted_products", "row term only, positives by column", *backward, products(True, False, 2, False)
    yield "weighted_products", "both terms, diagonal excluded (NT-Xent)", *backward, products(True, True, 0, True)
    yield "softplus_sums", "softplus and sigmoid sums (SigLIP)", *sigmoid_forward, sums(False)
    yield ("weighted_products", "sigmoid row term, positives by row (SigLIP dx)", *backward,
           products(True, False, 1, False, True))
    # The guide mask (GISTEmbedLoss): a second product per tile, the guide's, beside S's; both layouts
    # of the threshold (by row; by column, as the transposed launches take it).
    yield "lse_forward", "merged columns, guide mask by row", *guided_forward, lse(False, True, guided=True)
    yield ("weighted_products", "row term, positives by column, guide mask by column (dy)", *backward,
           products(True, False, 2, False, guided=True, by_row=False))


def ptxas_report(ptx: str, arch: int) -> dict:
    """The registers and spill bytes ptxas reports for one kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([str(PTXAS), "-v", f"--gpu-name={gpu}", str(path), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return dict(registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"))


def lock_release_is_fenced(ptx: str):
    """Whether every lock release (an atomic exchange) follows a CTA barrier placed after the last
    global store before it, so every warp's stores are ordered before the one releasing thread's
    atomic; None for a kernel that releases no lock."""
    lines = ptx.splitlines()
    releases = [i for i, line in enumerate(lines) if "atom." in line and ".exch." in line]
    for i in releases:
        for line in reversed(lines[:i]):
            if "bar.sync" in line or "barrier.sync" in line:
                break
            if "st.global" in line:
                return False
    return bool(releases) or None


def compile_case(fn, config, launch, arch: int) -> dict:
    args, kwargs = launch
    kwargs = {**kwargs, **config.all_kwargs()}
    kernel = fn.warmup(*args, grid=(1,), **kwargs)
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    config_name = "R{BLOCK_R} C{BLOCK_C} D{BLOCK_D} w{num_warps} s{num_stages}".format(**kwargs)
    return dict(config=config_name, mma=mma, shared_bytes=kernel.metadata.shared,
                lock_release_fenced=lock_release_is_fenced(ptx),
                source_barriers=kernel.asm["ttgir"].count("ttg.barrier"),  # tl.debug_barrier()s that survived
                **ptxas_report(ptx, arch))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--dtype", nargs="+", default=list(PRODUCTS), choices=list(PRODUCTS),
                        help="input dtypes; tf32 is float32 inputs multiplied in tf32")
    parser.add_argument("--first-config", action="store_true", help="only the config FLASHCL_TRITON_AUTOTUNE=0 runs")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    triton.runtime.driver.set_active(CompileOnlyDriver(args.arch))
    rows, failed = [], 0
    for dtype_name in args.dtype:
        for kernel_name, flags, fn, configs, launch in cases(dtype_name):
            for config in configs[:1] if args.first_config else configs:
                row = dict(arch=args.arch, dtype=dtype_name, kernel=kernel_name, flags=flags)
                try:
                    row.update(compile_case(fn, config, launch, args.arch))
                except Exception as error:  # report every failure, not just the first
                    failed += 1
                    row.update(config=str(config), error=f"{type(error).__name__}: {error}"[:500])
                rows.append(row)
                if "error" in row:
                    print(f"FAILED {dtype_name} {kernel_name} [{flags}] {row['config']}: {row['error']}")
                else:
                    print(f"{dtype_name:9} {kernel_name:17} {row['config']:22} {row['mma']:8} "
                          f"regs {row['registers']:3}  spill {row['spill_stores']:4}/{row['spill_loads']:<4} "
                          f"smem {row['shared_bytes'] // 1024:3} KiB  [{flags}]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
