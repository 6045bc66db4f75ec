"""Primitive 1 in Triton: row (and column) log-sum-exp of S = s * a @ b.T, S never stored.

One program owns BLOCK_R rows of S and sweeps all columns, keeping an online (running
max, rescaled sum) row LSE in registers. With MERGE_COLUMNS it also folds each tile's
column (max, sum) into shared per-column buffers, so both directions cost one product:
a column block's buffers are guarded by a spin lock, and programs visit the column
blocks in a staggered order so they rarely wait on each other. The merge order varies
run to run; flashcl.backends.fused runs this kernel on (b, a) instead when the column LSE
must be deterministic (the rows of S.T are the columns of S).
With HAS_GUIDE the entries a guide's tile T = ga @ gb.T puts strictly above their anchor's
threshold are left out, as the diagonal is (docs/design.md, "Guide mask"); without it that
code is not compiled in. The launch on (b, a) takes (gb, ga) and its anchors are its columns
(THRESHOLD_BY_ROW=False).
"""
import torch
import triton
import triton.language as tl

from ._config import (MIN_BLOCK, check_row_counts, dot_precision, guided_lse_configs, launch, lse_configs, size_bucket,
                      upcast)
from ._tiles import guide_leaves_out, scaled_logit_tile


@triton.jit(do_not_specialize=["rows_bucket", "cols_bucket"])
def _lse_forward_kernel(a_ptr, b_ptr, scale_ptr, row_lse_ptr, col_max_ptr, col_sum_ptr, lock_ptr,
                        n_rows, n_cols, dim, stride_ar, stride_ad, stride_bc, stride_bd,
                        ga_ptr, gb_ptr, threshold_ptr, guide_dim,  # the guide (HAS_GUIDE only)
                        stride_gar, stride_gad, stride_gbc, stride_gbd,
                        rows_bucket, cols_bucket,  # autotuning keys only
                        EXCLUDE_DIAGONAL: tl.constexpr, MERGE_COLUMNS: tl.constexpr,
                        HAS_GUIDE: tl.constexpr, THRESHOLD_BY_ROW: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R) + pid * BLOCK_R  # 32-bit indices (check_row_counts), 64-bit offsets
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr)
    row_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_C)
    for step in range(0, n_col_blocks):
        col_block = step
        if MERGE_COLUMNS:
            col_block = (step + pid) % n_col_blocks
        cols = tl.arange(0, BLOCK_C) + col_block * BLOCK_C
        col_ok = cols < n_cols
        keep = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_DIAGONAL:
            keep = keep & (rows[:, None] != cols[None, :])
        if HAS_GUIDE:  # before S: then T's mask, not its fp32 accumulator, lives beside S's (fewer registers)
            keep = keep & ~guide_leaves_out(ga_ptr, gb_ptr, threshold_ptr, rows, cols, n_rows, n_cols, guide_dim,
                                            stride_gar, stride_gad, stride_gbc, stride_gbd,
                                            BLOCK_R, BLOCK_C, BLOCK_D, UPCAST, PRECISION, THRESHOLD_BY_ROW)
        s = scaled_logit_tile(a_ptr, b_ptr, rows, cols, n_rows, n_cols, dim, stride_ar, stride_ad,
                              stride_bc, stride_bd, scale, BLOCK_R, BLOCK_C, BLOCK_D, UPCAST, PRECISION)
        s = tl.where(keep, s, float("-inf"))
        # Online row LSE; a row whose entries so far are all excluded keeps max -inf, sum 0.
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(s - safe_max[:, None]), axis=1)
        row_max = new_max

        if MERGE_COLUMNS:
            tile_max = tl.max(s, axis=0)
            tile_safe = tl.where(tile_max == float("-inf"), 0.0, tile_max)
            tile_sum = tl.sum(tl.exp(s - tile_safe[None, :]), axis=0)
            lock = lock_ptr + col_block
            while tl.atomic_cas(lock, 0, 1) == 1:
                pass
            # Buffers start zeroed (autotune can reset them); a zero sum means "nothing yet".
            old_sum = tl.load(col_sum_ptr + cols, mask=col_ok, other=0.0)
            old_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
            old_max = tl.where(old_sum > 0, old_max, float("-inf"))
            merged_max = tl.maximum(old_max, tile_max)
            merged_safe = tl.where(merged_max == float("-inf"), 0.0, merged_max)
            merged_sum = old_sum * tl.exp(old_max - merged_safe) + tile_sum * tl.exp(tile_max - merged_safe)
            tl.store(col_max_ptr + cols, merged_max, mask=col_ok)
            tl.store(col_sum_ptr + cols, merged_sum, mask=col_ok)
            # The release is one thread's; every warp's stores must be ordered before it, or
            # the next holder may read a new max with a stale sum.
            tl.debug_barrier()
            tl.atomic_xchg(lock, 0)

    tl.store(row_lse_ptr + rows, row_max + tl.log(row_sum), mask=row_ok)


_TUNING = dict(key=["dim", "guide_dim", "rows_bucket", "cols_bucket", "EXCLUDE_DIAGONAL", "MERGE_COLUMNS",
                    "HAS_GUIDE", "THRESHOLD_BY_ROW", "PRECISION"],
               reset_to_zero=["col_max_ptr", "col_sum_ptr", "lock_ptr"])
_lse_forward_tuned = triton.autotune(configs=lse_configs(), **_TUNING)(_lse_forward_kernel)
# The same kernel with a guide mask: its configs start with one that needs no spill (_config.guided_lse_configs).
_lse_forward_guided_tuned = triton.autotune(configs=guided_lse_configs(), **_TUNING)(_lse_forward_kernel)


def lse_forward(a, b, scale, exclude_diagonal, merge_columns, fixed_config=False, guide_a=None, guide_b=None,
                threshold=None, threshold_by_row=True):
    """(row LSE, column LSE or empty) of S = scale * a @ b.T in fp32 (see flashcl.backends.fused).
    fixed_config launches one config whatever the autotuner would choose (deterministic runs).
    guide_a, guide_b, threshold (all or none): entry (r, c) is left out where guide_a[r] . guide_b[c]
    > threshold[r] (threshold[c] if not threshold_by_row); threshold fp32, unit stride."""
    n_rows, n_cols, dim = a.shape[0], b.shape[0], a.shape[1]
    check_row_counts(n_rows, n_cols)
    row_lse = torch.empty(n_rows, dtype=torch.float32, device=a.device)
    if merge_columns:
        col_max = torch.zeros(n_cols, dtype=torch.float32, device=a.device)
        col_sum = torch.zeros(n_cols, dtype=torch.float32, device=a.device)
        locks = torch.zeros(triton.cdiv(n_cols, MIN_BLOCK), dtype=torch.int32, device=a.device)
    else:
        col_max = col_sum = locks = row_lse  # stand-ins for pointers MERGE_COLUMNS switches off
    has_guide = guide_a is not None
    if not has_guide:  # stand-ins for the arguments HAS_GUIDE switches off: a's and b's, the scale's pointer
        guide_a, guide_b, threshold, threshold_by_row = a, b, scale, True
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)
    launch(_lse_forward_guided_tuned if has_guide else _lse_forward_tuned, grid,
           (a, b, scale, row_lse, col_max, col_sum, locks, n_rows, n_cols, dim,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            guide_a, guide_b, threshold, guide_a.shape[1],
            guide_a.stride(0), guide_a.stride(1), guide_b.stride(0), guide_b.stride(1),
            size_bucket(n_rows), size_bucket(n_cols)),
           dict(EXCLUDE_DIAGONAL=exclude_diagonal, MERGE_COLUMNS=merge_columns, HAS_GUIDE=has_guide,
                THRESHOLD_BY_ROW=threshold_by_row, UPCAST=upcast(a.dtype), PRECISION=dot_precision(a.dtype)),
           fixed_config, a.device)
    col_lse = col_max + torch.log(col_sum) if merge_columns else row_lse.new_empty(0)
    return row_lse, col_lse
