"""Primitive 2 in Triton: G @ b for the weighted G of docs/design.md, S recomputed tile by tile.

    G_rc = w_r f(S_rc - off_r) + v_c f(S_rc - q_c) + k  where the positive (r, c) pair has coefficient k

with f = exp, or sigmoid for the sigmoid family (SIGMOID), S = s * a @ b.T.
One program owns BLOCK_R rows; it sweeps all column blocks, recomputes the S tile over D,
forms the G tile and adds G_tile @ b[cols] into its own rows of an fp32 output, one BLOCK_D slice at a time (D may be any size, so the row
accumulator lives in the output, not in registers). No two programs write the same
row, so there are no atomics and the result is bit-identical run to run.

dx = s * (G @ y) is this kernel on (x, y); dy = s * (G.T @ x) is the same kernel on (y, x)
with the row and column terms swapped, so each gradient costs one recompute of S.
With HAS_VALUES the product is G @ v for a separate values operand v (b's rows, its own width
value_dim; docs/design.md, "Values"); without it that code is not compiled in. Likewise
HAS_GUIDE: the entries a guide's tile T = ga @ gb.T puts strictly above their anchor's threshold
drop out of both exponential terms (not the positive term), as the diagonal does; on (y, x) the
guide is (gy, gx) and the anchors are the columns (THRESHOLD_BY_ROW=False).
flashcl.backends.fused launches it a chunk of rows at a time, so the fp32 output stays small.
"""
import torch
import triton
import triton.language as tl

from flashcl.backends.fused import POSITIVES_BY_COLUMN as _BY_COLUMN, POSITIVES_BY_ROW as _BY_ROW

from ._config import backward_configs, check_row_counts, dot_precision, launch, size_bucket, upcast
from ._tiles import guide_leaves_out, scaled_logit_tile, weight_function

# The positives' layouts, as the operator's positives_by gives them (defined once, in fused.py).
POSITIVES_BY_ROW: tl.constexpr = tl.constexpr(_BY_ROW)
POSITIVES_BY_COLUMN: tl.constexpr = tl.constexpr(_BY_COLUMN)


@triton.jit(do_not_specialize=["rows_bucket", "cols_bucket"])
def _weighted_products_kernel(
    a_ptr, b_ptr, out_ptr, scale_ptr,
    row_w_ptr, row_off_ptr, col_w_ptr, col_off_ptr, pos_index_ptr, pos_coeff_ptr,
    v_ptr, value_dim, stride_vc, stride_vd,  # the values operand (HAS_VALUES only)
    ga_ptr, gb_ptr, threshold_ptr, guide_dim,  # the guide (HAS_GUIDE only)
    stride_gar, stride_gad, stride_gbc, stride_gbd,
    row_start, row_end, n_cols, dim,
    stride_ar, stride_ad, stride_bc, stride_bd, stride_or,
    rows_bucket, cols_bucket,  # autotuning keys only
    HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, POSITIVES: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr, SIGMOID: tl.constexpr, HAS_VALUES: tl.constexpr,
    HAS_GUIDE: tl.constexpr, THRESHOLD_BY_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, HALF_PRODUCT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R) + row_start + pid * BLOCK_R  # 32-bit indices (check_row_counts), 64-bit offsets
    row_ok = rows < row_end
    scale = tl.load(scale_ptr)
    if HAS_ROW_TERM:
        row_w = tl.load(row_w_ptr + rows, mask=row_ok, other=0.0)
        row_off = tl.load(row_off_ptr + rows, mask=row_ok, other=0.0)
    if POSITIVES == POSITIVES_BY_ROW:  # row r's positive is column pos_index[r]
        row_target = tl.load(pos_index_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
        row_coeff = tl.load(pos_coeff_ptr + rows, mask=row_ok, other=0.0)

    for col_block in range(0, tl.cdiv(n_cols, BLOCK_C)):
        cols = tl.arange(0, BLOCK_C) + col_block * BLOCK_C
        col_ok = cols < n_cols
        s = scaled_logit_tile(a_ptr, b_ptr, rows, cols, row_end, n_cols, dim, stride_ar, stride_ad,
                              stride_bc, stride_bd, scale, BLOCK_R, BLOCK_C, BLOCK_D, UPCAST, PRECISION)
        g = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        if HAS_ROW_TERM:
            g += row_w[:, None] * weight_function(s - row_off[:, None], SIGMOID)
        if HAS_COL_TERM:
            col_w = tl.load(col_w_ptr + cols, mask=col_ok, other=0.0)
            col_off = tl.load(col_off_ptr + cols, mask=col_ok, other=0.0)
            g += col_w[None, :] * weight_function(s - col_off[None, :], SIGMOID)
        keep = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_DIAGONAL:
            keep = keep & (rows[:, None] != cols[None, :])
        if HAS_GUIDE:
            keep = keep & ~guide_leaves_out(ga_ptr, gb_ptr, threshold_ptr, rows, cols, row_end, n_cols, guide_dim,
                                            stride_gar, stride_gad, stride_gbc, stride_gbd,
                                            BLOCK_R, BLOCK_C, BLOCK_D, UPCAST, PRECISION, THRESHOLD_BY_ROW)
        g = tl.where(keep, g, 0.0)  # where, not a product: an excluded f may be inf
        if POSITIVES == POSITIVES_BY_ROW:
            g += tl.where(row_target[:, None] == cols[None, :], row_coeff[:, None], 0.0)
        if POSITIVES == POSITIVES_BY_COLUMN:  # column c's positive is row pos_index[c]
            col_target = tl.load(pos_index_ptr + cols, mask=col_ok, other=-1).to(tl.int32)
            col_coeff = tl.load(pos_coeff_ptr + cols, mask=col_ok, other=0.0)
            g += tl.where(col_target[None, :] == rows[:, None], col_coeff[None, :], 0.0)

        if HALF_PRODUCT:
            # The tensor-core product takes G in the input dtype. Nothing bounds G (a gamma
            # weight u multiplies exp(S - LSE) by u), so each row of the tile is divided by
            # its largest magnitude first and the row's product multiplied back in fp32:
            # no overflow, and a row of small weights keeps its own precision.
            # (At least the smallest normal fp32, so the reciprocal is finite; an all-zero row stays 0.)
            row_peak = tl.maximum(tl.max(tl.abs(g), axis=1), 1.1754943508222875e-38)
            if HAS_VALUES:
                g = (g * (1.0 / row_peak)[:, None]).to(v_ptr.dtype.element_ty)
            else:
                g = (g * (1.0 / row_peak)[:, None]).to(b_ptr.dtype.element_ty)
        if HAS_VALUES:
            out_dim = value_dim
        else:
            out_dim = dim
        for d0 in range(0, out_dim, BLOCK_D):
            ds = tl.arange(0, BLOCK_D).to(tl.int64) + d0
            d_ok = ds < out_dim
            if HAS_VALUES:  # G @ v: the values' tile, from its own pointer and strides
                b = tl.load(v_ptr + cols[:, None].to(tl.int64) * stride_vc + ds[None, :] * stride_vd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                b = tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_bc + ds[None, :] * stride_bd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            out_ptrs = out_ptr + (rows - row_start)[:, None].to(tl.int64) * stride_or + ds[None, :]
            out_ok = row_ok[:, None] & d_ok[None, :]
            running = tl.load(out_ptrs, mask=out_ok, other=0.0)
            if HALF_PRODUCT:
                total = running + row_peak[:, None] * tl.dot(g, b)
            else:  # the running sum is the product's accumulator: no separate add
                total = tl.dot(g, b, running, input_precision=PRECISION)
            tl.store(out_ptrs, total, mask=out_ok)
        # The next column block reads back what this one stored, maybe from other threads
        # (the load and the store need not share a layout): order them explicitly.
        tl.debug_barrier()


_weighted_products_tuned = triton.autotune(
    configs=backward_configs(),
    key=["dim", "value_dim", "guide_dim", "rows_bucket", "cols_bucket", "HAS_ROW_TERM", "HAS_COL_TERM", "POSITIVES",
         "EXCLUDE_DIAGONAL", "SIGMOID", "HAS_VALUES", "HAS_GUIDE", "THRESHOLD_BY_ROW", "PRECISION"],
    reset_to_zero=["out_ptr"],
)(_weighted_products_kernel)


def weighted_products(a, b, scale, row_w, row_off, col_w, col_off, pos_index, pos_coeff,
                      positives_by, exclude_diagonal, row_start, row_end, sigmoid=False, fixed_config=False,
                      values=None, guide_a=None, guide_b=None, threshold=None, threshold_by_row=True):
    """Rows [row_start, row_end) of G @ b in fp32 (G @ values with values, a tensor of b's rows;
    see flashcl.backends.fused for the contract); fixed_config launches one config whatever the
    autotuner would choose (deterministic runs). guide_a, guide_b, threshold (all or none): as
    lse_forward's, the left-out entries dropping out of G's row and column terms."""
    check_row_counts(a.shape[0], b.shape[0])
    v = b if values is None else values  # without values, its arguments repeat b's and go unused
    out = torch.zeros(row_end - row_start, v.shape[1], dtype=torch.float32, device=a.device)
    absent = scale  # stands in for the pointers of a term the constexpr flags switch off
    has_guide = guide_a is not None
    if not has_guide:  # its arguments repeat a's and b's and go unused
        guide_a, guide_b, threshold, threshold_by_row = a, b, absent, True
    grid = lambda meta: (triton.cdiv(row_end - row_start, meta["BLOCK_R"]),)
    launch(_weighted_products_tuned, grid,
           (a, b, out, scale,
            absent if row_w is None else row_w, absent if row_off is None else row_off,
            absent if col_w is None else col_w, absent if col_off is None else col_off,
            absent if pos_index is None else pos_index, absent if pos_coeff is None else pos_coeff,
            v, v.shape[1], v.stride(0), v.stride(1),
            guide_a, guide_b, threshold, guide_a.shape[1],
            guide_a.stride(0), guide_a.stride(1), guide_b.stride(0), guide_b.stride(1),
            row_start, row_end, b.shape[0], a.shape[1],
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
            size_bucket(row_end - row_start), size_bucket(b.shape[0])),
           dict(HAS_ROW_TERM=row_w is not None, HAS_COL_TERM=col_w is not None, POSITIVES=positives_by,
                EXCLUDE_DIAGONAL=exclude_diagonal, SIGMOID=sigmoid, HAS_VALUES=values is not None,
                HAS_GUIDE=has_guide, THRESHOLD_BY_ROW=threshold_by_row,
                UPCAST=upcast(a.dtype),
                HALF_PRODUCT=a.dtype != torch.float32 and not upcast(a.dtype), PRECISION=dot_precision(a.dtype)),
           fixed_config, a.device)
    return out
