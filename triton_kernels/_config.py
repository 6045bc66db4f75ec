"""Launch settings shared by the kernels: interpreter detection, tile configs, dot precision."""
import os

import torch
import triton

# TRITON_INTERPRET=1 runs kernels on the CPU in numpy. Its tl.dot multiplies raw bf16 bit
# patterns, so kernels upcast loaded tiles there, and its autotuner cannot time more than
# one config, so it gets exactly one. FLASHCL_TRITON_AUTOTUNE=0 pins the first GPU config,
# for test runs that would otherwise compile every config for every flag combination.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("FLASHCL_TRITON_AUTOTUNE", "1") != "0"
MIN_BLOCK = 16  # tl.dot's smallest side; also sizes the column-lock array


def _configs(gpu_grid, interpreter_config):
    if INTERPRET:
        return [triton.Config(interpreter_config, num_warps=4, num_stages=1)]
    configs = [triton.Config(dict(BLOCK_R=r, BLOCK_C=c, BLOCK_D=d), num_warps=w, num_stages=st)
               for r, c, d, w, st in gpu_grid]
    return configs if AUTOTUNE else configs[:1]


def lse_configs():
    return _configs(
        [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 2)],
        dict(BLOCK_R=32, BLOCK_C=32, BLOCK_D=32),
    )


def backward_configs():
    return _configs(
        [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 4)],
        dict(BLOCK_R=32, BLOCK_C=32, BLOCK_D=32),
    )


def check_row_counts(*counts: int) -> None:
    """The kernels index rows and columns with 32-bit integers (fewer registers than 64-bit;
    memory offsets stay 64-bit), so no operand may have 2**31 rows or more."""
    if max(counts) >= 2**31:
        raise ValueError(f"flashcl's Triton kernels take fewer than 2**31 rows per operand, got {max(counts)}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch.get_float32_matmul_precision(), as torch.matmul does."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"
