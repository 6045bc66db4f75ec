"""The Triton backend: both primitives from the kernels in flashcl.triton_kernels.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's numpy
interpreter, for tests). Inputs fp16, bf16 or fp32; statistics and accumulation fp32.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

SCRATCH_BYTES = 32 * 2**20  # the fp32 row-chunk output of one backward launch
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return "Triton kernels need CUDA tensors (TRITON_INTERPRET=1 runs them on CPU tensors, slowly, for tests)"
    if dtype not in DTYPES:
        return "the Triton kernels take float16, bfloat16 or float32 inputs"
    return None


class TritonTiles:
    """Primitives 1 and 2 of DESIGN.md with Triton kernels.

    deterministic (default: torch.are_deterministic_algorithms_enabled()) computes the column
    LSE with its own pass instead of the lock-merged single pass, so forward is bit-identical
    run to run; backward always is.
    """

    name = "triton"

    def __init__(self, deterministic: Optional[bool] = None):
        from flashcl.triton_kernels import exp_weighted_backward, lse_forward  # compiles on first use

        self._lse_forward = lse_forward.lse_forward
        self._backward = exp_weighted_backward
        self.deterministic = (torch.are_deterministic_algorithms_enabled()
                              if deterministic is None else deterministic)

    def lse(self, x: Tensor, y: Tensor, scale: Tensor, *, rows: bool = True, cols: bool = False,
            exclude_diagonal: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        return self._lse_forward(x, y, scale, rows, cols, exclude_diagonal, self.deterministic)

    def exp_weighted_grad(
        self, x: Tensor, y: Tensor, scale: Tensor, *,
        a: Optional[Tensor] = None, o: Optional[Tensor] = None,
        b: Optional[Tensor] = None, p: Optional[Tensor] = None,
        positives: Optional[Tuple[Tensor, Tensor]] = None,
        exclude_diagonal: bool = False,
        need_dx: bool = True, need_dy: bool = True, need_ds: bool = False,
    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        # Weights travel divided by their largest magnitude, so G fits fp16 in the tensor-core
        # product whatever the reduction (a mean over 10^5 rows is below fp16's normal range).
        magnitudes = [t.abs().max() for t in (a, b, positives[1] if positives else None) if t is not None]
        norm = torch.stack(magnitudes).max().clamp_min(torch.finfo(torch.float32).tiny)

        def normalized(weights, offsets):
            return None if weights is None else (weights / norm, offsets)

        terms = dict(positives=None if positives is None else (positives[0], positives[1] / norm),
                     exclude_diagonal=exclude_diagonal, scratch_bytes=SCRATCH_BYTES)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_dy else None
        ds = torch.zeros((), dtype=torch.float32, device=x.device) if need_ds else None
        if need_dx or need_ds:
            for rows, gy in self._backward.exp_weighted_products(
                    x, y, scale, normalized(a, o), normalized(b, p),
                    positives_by=self._backward.POSITIVES_BY_ROW, **terms):
                if need_ds:
                    ds += torch.sum(gy * x[rows].float())
                if need_dx:
                    dx[rows] = gy.mul_(scale * norm)
        if need_dy:
            for cols, gtx in self._backward.exp_weighted_products(
                    y, x, scale, normalized(b, p), normalized(a, o),
                    positives_by=self._backward.POSITIVES_BY_COLUMN, **terms):
                dy[cols] = gtx.mul_(scale * norm)
        return dx, dy, (ds * norm if need_ds else None)
