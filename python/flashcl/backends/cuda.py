"""The CUDA C++ backend: the operators of the compiled extension flashcl._C (csrc/).

Built by `FLASHCL_BUILD_CUDA=1 pip install --no-build-isolation .`; inputs fp16, bf16 or
fp32 on CUDA; composed into the primitives exactly as the Triton kernels are.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .fused import KERNEL_DTYPES, FusedKernels, lse_forward_fake, softplus_sums_fake, weighted_products_fake

BUILD_HINT = "build it with FLASHCL_BUILD_CUDA=1 pip install --no-build-isolation ."


def load_extension() -> Optional[str]:
    """Imports flashcl._C, which registers its operators, and their fakes; returns why it failed, or None."""
    try:
        import flashcl._C  # noqa: F401
    except ImportError as error:  # never built, or built against another torch (undefined symbols)
        return f"the CUDA extension flashcl._C is not importable ({error}); {BUILD_HINT}"
    torch.library.register_fake("flashcl::lse_forward")(lse_forward_fake)
    torch.library.register_fake("flashcl::softplus_sums")(softplus_sums_fake)
    torch.library.register_fake("flashcl::weighted_products")(weighted_products_fake)
    return None


# Loaded once, at import, silently: only a user who asks for backend="cuda" hears of a failure.
# torch.compile then reads a constant instead of tracing an import.
EXTENSION_ERROR = load_extension()


def extension_error() -> Optional[str]:
    """Why flashcl._C cannot be used here, or None."""
    return EXTENSION_ERROR


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the kernels cannot take tensors of this device and dtype, or None."""
    if device.type != "cuda":
        return "the CUDA kernels need CUDA tensors"
    if dtype not in KERNEL_DTYPES:
        return "the CUDA kernels take float16, bfloat16 or float32 inputs"
    return None


@functools.lru_cache(maxsize=None)
def resident_rows(dtype: torch.dtype) -> int:
    """Rows one multiprocessor works on at once in the products kernel (64 per block, times the blocks
    the CUDA occupancy API says its resources allow), asked once per dtype."""
    return torch.ops.flashcl.resident_rows(dtype)


def make(deterministic: Optional[bool] = None) -> FusedKernels:
    error = extension_error()
    if error is not None:
        raise RuntimeError(error)
    ops = torch.ops.flashcl
    return FusedKernels("cuda", ops.lse_forward, ops.weighted_products, ops.softplus_sums, deterministic,
                        resident_rows)
