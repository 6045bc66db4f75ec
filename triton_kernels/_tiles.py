"""What every kernel computes per tile: the scaled logits, and the elementwise functions of both families."""
import triton
import triton.language as tl


@triton.jit
def scaled_logit_tile(a_ptr, b_ptr, rows, cols, n_rows, n_cols, dim, stride_ar, stride_ad,
                      stride_bc, stride_bd, scale,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """s * a[rows] @ b[cols].T as a (BLOCK_R, BLOCK_C) fp32 tile, accumulated over D in BLOCK_D steps."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = tl.arange(0, BLOCK_D).to(tl.int64) + d0
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_ar + ds[None, :] * stride_ad,
                    mask=(rows[:, None] < n_rows) & (ds[None, :] < dim), other=0.0)
        b = tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_bc + ds[None, :] * stride_bd,
                    mask=(cols[:, None] < n_cols) & (ds[None, :] < dim), other=0.0)
        if UPCAST:  # bf16 in the interpreter, whose tl.dot multiplies raw bit patterns
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc * scale


@triton.jit
def exp_neg_abs_and_sigmoid(z):
    """(e^-|z|, sigmoid(z)), never overflowing: sigmoid(z) = 1 / (1 + e^-z) for z >= 0, e^z / (1 + e^z) below."""
    e = tl.exp(-tl.abs(z))
    return e, tl.where(z >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def log1p_small(u):
    """log(1 + u) for u in [0, 1] to full precision: log(1 + u) * u / ((1 + u) - 1) cancels the
    rounding of 1 + u (Goldberg's trick), so softplus of a very negative z stays e^z, not 0."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def weight_function(z, SIGMOID: tl.constexpr):
    """The f of G = a f(S - o) + b f(S - p): exp (the softmax family) or sigmoid (SigLIP)."""
    if SIGMOID:
        return exp_neg_abs_and_sigmoid(z)[1]
    else:
        return tl.exp(z)


@triton.jit
def guide_leaves_out(ga_ptr, gb_ptr, threshold_ptr, rows, cols, n_rows, n_cols, guide_dim,
                     stride_gar, stride_gad, stride_gbc, stride_gbd,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, THRESHOLD_BY_ROW: tl.constexpr):
    """The entries the guide leaves out of a (BLOCK_R, BLOCK_C) tile: T = ga[rows] @ gb[cols].T (fp32,
    unscaled, the same products as S) strictly above the threshold of the tile's anchor. A launch on
    (y, x) swaps the guide operands too, and its anchors are then its columns (THRESHOLD_BY_ROW=False).
    Callers mask with this through tl.where: a left-out entry's weight may be inf."""
    t = scaled_logit_tile(ga_ptr, gb_ptr, rows, cols, n_rows, n_cols, guide_dim, stride_gar, stride_gad,
                          stride_gbc, stride_gbd, 1.0, BLOCK_R, BLOCK_C, BLOCK_D, UPCAST, PRECISION)
    # Past the last row or column the threshold is +inf: nothing is left out there (the callers mask it anyway).
    if THRESHOLD_BY_ROW:
        threshold = tl.load(threshold_ptr + rows, mask=rows < n_rows, other=float("inf"))
        return t > threshold[:, None]
    else:
        threshold = tl.load(threshold_ptr + cols, mask=cols < n_cols, other=float("inf"))
        return t > threshold[None, :]
