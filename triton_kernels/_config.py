"""Launch settings shared by the kernels: interpreter detection, tile configs, dot precision, launching."""
import contextlib
import os

import torch
import triton

# TRITON_INTERPRET=1 runs kernels on the CPU in numpy. Its tl.dot multiplies raw bf16 bit
# patterns (numpy has no bf16; fp16 and fp32 are exact), so kernels upcast bf16 tiles there,
# and its autotuner cannot time more than one config, so it gets exactly one.
# FLASHCL_TRITON_AUTOTUNE=0 pins the first GPU config, for test runs that would otherwise
# compile every config for every flag combination.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("FLASHCL_TRITON_AUTOTUNE", "1") != "0"
MIN_BLOCK = 16  # tl.dot's smallest side; also sizes the column-lock array


def _configs(gpu_grid, interpreter_config):
    if INTERPRET:
        return [triton.Config(interpreter_config, num_warps=4, num_stages=1)]
    configs = [triton.Config(dict(BLOCK_R=r, BLOCK_C=c, BLOCK_D=d), num_warps=w, num_stages=st)
               for r, c, d, w, st in gpu_grid]
    return configs if AUTOTUNE else configs[:1]


LSE_GRID = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 2)]


def lse_configs():
    return _configs(LSE_GRID, dict(BLOCK_R=32, BLOCK_C=32, BLOCK_D=32))


def guided_lse_configs():
    """With a guide mask the forward also holds the mask of the guide's tile while S accumulates: the
    merged-column pass then spills on sm_80 at BLOCK_D 64 (8 bytes in half precision; at BLOCK_D 32,
    with operand tiles half the size, none: tools/triton_resources.py), so the pinned config is that one."""
    return _configs([LSE_GRID[3], *LSE_GRID[:3], *LSE_GRID[4:]], dict(BLOCK_R=32, BLOCK_C=32, BLOCK_D=32))


def softplus_configs():
    """The forward's sigmoid family keeps more tile-sized temporaries alive than its LSE (softplus,
    sigmoid, e^-|z|): at 64 tile elements per thread it spills on sm_80 (548 bytes at 128 x 128,
    8 warps; tools/triton_resources.py), so its tiles hold 32 per thread."""
    return _configs(
        [(64, 64, 64, 4, 2), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 32, 4, 3)],
        dict(BLOCK_R=32, BLOCK_C=32, BLOCK_D=32),
    )


def backward_configs():
    return _configs(
        [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 4)],
        dict(BLOCK_R=32, BLOCK_C=32, BLOCK_D=32),
    )


def size_bucket(count: int) -> int:
    """The autotuner's view of a row or column count: the power of two at or above it, so a
    ragged last batch reuses its neighbours' choice while 4096 and 65536 rows tune apart."""
    return triton.next_power_of_2(count)


MAX_TILE_SIDE = 128  # the largest BLOCK_R or BLOCK_C of any config (a test keeps it so)
MAX_ROWS = 2**31 - MAX_TILE_SIDE


def check_row_counts(*counts: int) -> None:
    """The kernels index rows and columns with 32-bit integers (fewer registers than 64-bit; memory
    offsets stay 64-bit), and a tile's indices run up to a tile side past the last row: no operand
    may have more than 2**31 - MAX_TILE_SIDE rows."""
    if max(counts) > MAX_ROWS:
        raise ValueError(f"flashcl's Triton kernels take at most 2**31 - {MAX_TILE_SIDE} rows per operand "
                         f"(32-bit indices, tiles of up to {MAX_TILE_SIDE}), got {max(counts)}")


def upcast(dtype: torch.dtype) -> bool:
    """Whether the kernels must multiply tiles of this dtype in fp32: only bf16 in the interpreter."""
    return INTERPRET and dtype == torch.bfloat16


def float32_matmul_precision() -> str:
    """'ieee' or 'tf32': what torch.matmul does with fp32 CUDA inputs under the current settings.

    torch >= 2.9 sets this per backend (torch.backends.cuda.matmul.fp32_precision, "none"
    deferring to torch.backends.fp32_precision) and makes the legacy getter raise once the new
    API was used; the new attribute also reflects the legacy setter, so read it where it exists.
    """
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:  # torch < 2.9: only the legacy API
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if matmul == "none":
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if matmul == "tf32" else "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's fp32 matmul precision, as torch.matmul does; half inputs are exact products."""
    return float32_matmul_precision() if dtype == torch.float32 else "ieee"


def launch(tuned, grid, args, kwargs, fixed_config: bool, device: torch.device) -> None:
    """Launches an autotuned kernel on `device` (Triton launches on the current device and its
    current stream, not on the tensors'). fixed_config launches the first config instead of
    the autotuner's choice, which may differ between processes and with it the summation
    order: deterministic runs then agree across processes too."""
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        if fixed_config:
            tuned.fn[grid](*args, **kwargs, **tuned.configs[0].all_kwargs())
        else:
            tuned[grid](*args, **kwargs)
