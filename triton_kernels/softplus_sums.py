"""Primitive 1' in Triton, the sigmoid family's forward (SigLIP): the row sums of softplus(S + bias)
and of its derivative sigmoid(S + bias), S = s * a @ b.T never stored.

One program owns BLOCK_R rows and sweeps all columns, as the LSE kernel does; the sums need no
running max. Its tiles are smaller than the LSE's (see _config.softplus_configs).
"""
import torch
import triton
import triton.language as tl

from ._config import check_row_counts, dot_precision, launch, size_bucket, softplus_configs, upcast
from ._tiles import exp_neg_abs_and_sigmoid, log1p_small, scaled_logit_tile


@triton.jit(do_not_specialize=["rows_bucket", "cols_bucket"])
def _softplus_sums_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, softplus_ptr, sigmoid_ptr,
                          n_rows, n_cols, dim, stride_ar, stride_ad, stride_bc, stride_bd,
                          rows_bucket, cols_bucket,  # autotuning keys only
                          EXCLUDE_DIAGONAL: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R) + pid * BLOCK_R  # 32-bit indices (check_row_counts), 64-bit offsets
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    softplus_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sigmoid_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for col_block in range(0, tl.cdiv(n_cols, BLOCK_C)):
        cols = tl.arange(0, BLOCK_C) + col_block * BLOCK_C
        s = scaled_logit_tile(a_ptr, b_ptr, rows, cols, n_rows, n_cols, dim, stride_ar, stride_ad,
                              stride_bc, stride_bd, scale, BLOCK_R, BLOCK_C, BLOCK_D, UPCAST, PRECISION)
        keep = row_ok[:, None] & (cols < n_cols)[None, :]
        if EXCLUDE_DIAGONAL:
            keep = keep & (rows[:, None] != cols[None, :])
        z = s + bias
        e, sigmoid = exp_neg_abs_and_sigmoid(z)
        softplus_sum += tl.sum(tl.where(keep, tl.maximum(z, 0.0) + log1p_small(e), 0.0), axis=1)
        sigmoid_sum += tl.sum(tl.where(keep, sigmoid, 0.0), axis=1)
    tl.store(softplus_ptr + rows, softplus_sum, mask=row_ok)
    tl.store(sigmoid_ptr + rows, sigmoid_sum, mask=row_ok)


_softplus_sums_tuned = triton.autotune(
    configs=softplus_configs(), key=["dim", "rows_bucket", "cols_bucket", "EXCLUDE_DIAGONAL", "PRECISION"],
)(_softplus_sums_kernel)


def softplus_sums(a, b, scale, bias, exclude_diagonal, fixed_config=False):
    """(row sums of softplus(S + bias), of sigmoid(S + bias)) of S = scale * a @ b.T in fp32 (see
    flashcl.backends.fused); bias a one-element fp32 tensor. fixed_config: as lse_forward's."""
    n_rows, n_cols, dim = a.shape[0], b.shape[0], a.shape[1]
    check_row_counts(n_rows, n_cols)
    softplus = torch.empty(n_rows, dtype=torch.float32, device=a.device)
    sigmoid = torch.empty(n_rows, dtype=torch.float32, device=a.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)
    launch(_softplus_sums_tuned, grid,
           (a, b, scale, bias, softplus, sigmoid, n_rows, n_cols, dim,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), size_bucket(n_rows), size_bucket(n_cols)),
           dict(EXCLUDE_DIAGONAL=exclude_diagonal, UPCAST=upcast(a.dtype), PRECISION=dot_precision(a.dtype)),
           fixed_config, a.device)
    return softplus, sigmoid
