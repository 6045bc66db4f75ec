"""The Triton backend: the kernels of flashcl.triton_kernels as torch.library custom ops.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's numpy
interpreter, for tests). Inputs fp16, bf16 or fp32; statistics and accumulation fp32.

No `from __future__ import annotations` here: torch.library.custom_op reads the operators'
signatures from their annotations, and torch 2.4 takes them only as types, not strings.
"""
import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .fused import (KERNEL_DTYPES, FusedKernels, lse_forward_fake, resolve_deterministic, softplus_sums_fake,
                    weighted_products_fake)

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
# guide_a, guide_b, threshold, threshold_by_row: the guide mask (all three tensors or none; see
# backends/fused.py), which changes no shape.
@torch.library.custom_op("flashcl::triton_lse_forward", mutates_args=())
def lse_forward(x: Tensor, y: Tensor, scale: Tensor, exclude_diagonal: bool, merge_columns: bool,
                fixed_config: bool = False, guide_a: Optional[Tensor] = None, guide_b: Optional[Tensor] = None,
                threshold: Optional[Tensor] = None, threshold_by_row: bool = True) -> Tuple[Tensor, Tensor]:
    from flashcl.triton_kernels.lse_forward import lse_forward as launch

    return launch(x, y, scale, exclude_diagonal, merge_columns, fixed_config, guide_a, guide_b, threshold,
                  threshold_by_row)


@lse_forward.register_fake
def _(x, y, scale, exclude_diagonal, merge_columns, fixed_config=False, guide_a=None, guide_b=None, threshold=None,
      threshold_by_row=True):
    return lse_forward_fake(x, y, scale, exclude_diagonal, merge_columns)


@torch.library.custom_op("flashcl::triton_softplus_sums", mutates_args=())
def softplus_sums(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, exclude_diagonal: bool,
                  fixed_config: bool = False) -> Tuple[Tensor, Tensor]:
    from flashcl.triton_kernels.softplus_sums import softplus_sums as launch

    return launch(x, y, scale, bias, exclude_diagonal, fixed_config)


@softplus_sums.register_fake
def _(x, y, scale, bias, exclude_diagonal, fixed_config=False):
    return softplus_sums_fake(x, y, scale, bias, exclude_diagonal)


@torch.library.custom_op("flashcl::triton_weighted_products", mutates_args=())
def weighted_products(
        a: Tensor, b: Tensor, scale: Tensor, row_w: Optional[Tensor], row_off: Optional[Tensor],
        col_w: Optional[Tensor], col_off: Optional[Tensor], pos_index: Optional[Tensor],
        pos_coeff: Optional[Tensor], positives_by: int, exclude_diagonal: bool, row_start: int,
        row_end: int, sigmoid: bool = False, fixed_config: bool = False, values: Optional[Tensor] = None,
        guide_a: Optional[Tensor] = None, guide_b: Optional[Tensor] = None, threshold: Optional[Tensor] = None,
        threshold_by_row: bool = True) -> Tensor:
    from flashcl.triton_kernels.weighted_products import weighted_products as launch

    return launch(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff,
                  positives_by, exclude_diagonal, row_start, row_end, sigmoid, fixed_config, values,
                  guide_a, guide_b, threshold, threshold_by_row)


@weighted_products.register_fake
def _(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff, positives_by, exclude_diagonal,
      row_start, row_end, sigmoid=False, fixed_config=False, values=None, guide_a=None, guide_b=None,
      threshold=None, threshold_by_row=True):
    return weighted_products_fake(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff,
                                  positives_by, exclude_diagonal, row_start, row_end, sigmoid, values)


def resident_rows(dtype: torch.dtype) -> int:
    """Rows one multiprocessor works on at once in the products: the tallest config's rows, one
    program per multiprocessor (their first configs need 190 to 250 registers a thread at 8 warps,
    which leaves room for one: tools/triton_resources.py), so whatever config the autotuner
    picks, a chunk fills the GPU."""
    from flashcl.triton_kernels._config import backward_configs

    return max(config.kwargs["BLOCK_R"] for config in backward_configs())


def make(deterministic: Optional[bool] = None) -> FusedKernels:
    deterministic = resolve_deterministic(deterministic)
    pinned = dict(fixed_config=deterministic)
    return FusedKernels("triton", functools.partial(lse_forward, **pinned),
                        functools.partial(weighted_products, **pinned),
                        functools.partial(softplus_sums, **pinned), deterministic, resident_rows, values=True,
                        guide=True)
