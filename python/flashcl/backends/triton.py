"""The Triton backend: the kernels of flashcl.triton_kernels as torch.library custom ops.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's numpy
interpreter, for tests). Inputs fp16, bf16 or fp32; statistics and accumulation fp32.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .fused import KERNEL_DTYPES, FusedKernels, exp_weighted_products_fake, lse_forward_fake, resolve_deterministic

# Decided once, at import: torch.compile then reads a constant instead of tracing a lookup.
INSTALLED = importlib.util.find_spec("triton") is not None


def missing_reason() -> Optional[str]:
    """Why this backend is not installed here, or None."""
    return None if INSTALLED else "Triton is not installed (pip install triton)"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the kernels cannot take tensors of this device and dtype, or None."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return "Triton kernels need CUDA tensors (TRITON_INTERPRET=1 runs them on CPU tensors, slowly, for tests)"
    if dtype not in KERNEL_DTYPES:
        return "the Triton kernels take float16, bfloat16 or float32 inputs"
    return None


# The operators exist from import on (torch.compile must find them while tracing); the
# kernels they call are imported, and compiled, on first use.
# fixed_config: launch one config instead of the autotuner's choice, which can differ between
# processes and with it the summation order (deterministic runs pass it).
# bias: the sigmoid family's row sums of softplus(S + bias) and sigmoid(S + bias) instead of the LSEs.
@torch.library.custom_op("flashcl::triton_lse_forward", mutates_args=())
def lse_forward(x: Tensor, y: Tensor, scale: Tensor, exclude_diagonal: bool,
                merge_columns: bool, fixed_config: bool = False, bias: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor]:
    from flashcl.triton_kernels.lse_forward import lse_forward as launch

    return launch(x, y, scale, exclude_diagonal, merge_columns, fixed_config, bias)


@lse_forward.register_fake
def _(x, y, scale, exclude_diagonal, merge_columns, fixed_config=False, bias=None):
    return lse_forward_fake(x, y, scale, exclude_diagonal, merge_columns, bias)


@torch.library.custom_op("flashcl::triton_exp_weighted_products", mutates_args=())
def exp_weighted_products(
        a: Tensor, b: Tensor, scale: Tensor, row_w: Optional[Tensor], row_off: Optional[Tensor],
        col_w: Optional[Tensor], col_off: Optional[Tensor], pos_index: Optional[Tensor],
        pos_coeff: Optional[Tensor], positives_by: int, exclude_diagonal: bool, row_start: int,
        row_end: int, fixed_config: bool = False, sigmoid: bool = False) -> Tensor:
    from flashcl.triton_kernels.exp_weighted_backward import exp_weighted_products as launch

    return launch(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff,
                  positives_by, exclude_diagonal, row_start, row_end, fixed_config, sigmoid)


@exp_weighted_products.register_fake
def _(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff, positives_by, exclude_diagonal,
      row_start, row_end, fixed_config=False, sigmoid=False):
    return exp_weighted_products_fake(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff,
                                      positives_by, exclude_diagonal, row_start, row_end, sigmoid)


def make(deterministic: Optional[bool] = None) -> FusedKernels:
    deterministic = resolve_deterministic(deterministic)
    return FusedKernels("triton", functools.partial(lse_forward, fixed_config=deterministic),
                        functools.partial(exp_weighted_products, fixed_config=deterministic), deterministic,
                        sigmoid=True)
