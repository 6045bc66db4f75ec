// Primitive 2: rows [row_start, row_end) of G @ b, with S = scale * a @ b.T recomputed tile by tile and
//   G_rc = row_w_r f(S_rc - row_off_r) + col_w_c f(S_rc - col_off_c) + the positive pairs' coefficients,
// f = exp, or the logistic sigmoid for the sigmoid family (terms.sigmoid).
//
// A block owns 64 rows of the fp32 output and sweeps every column block: S tile, then the
// G tile in shared memory (in the input dtype, row-rescaled, for the tensor-core product),
// then G @ b[cols] added into its rows of the output 32 columns of D at a time. No two blocks write the same
// row: no atomics, bit-identical results run to run. dx is this kernel on (x, y); dy the
// same kernel on (y, x) with the row and column terms swapped.
#include <cfloat>

#include "tile.cuh"

namespace flashcl {
namespace {

// For the tensor-core product G is rounded to the input dtype, and nothing bounds it (a gamma
// weight u multiplies exp(S - LSE) by u): each row of the G tile is divided by its largest
// magnitude first and the row's product multiplied back in fp32, so G cannot overflow fp16
// and a row of small weights keeps its own precision. G lives in its own tile; for fp32 it
// overwrites S in place, which keeps the block within 48 KB of static shared memory.
template <typename T, bool = kTensorCores<T>>
struct BackwardBuffers {
  TileBuffers<T> tile;
  alignas(32) T g[kBlockR][kBlockC + kPadT];
  alignas(32) float out[kBlockR][kBlockD + kPadF];
  float row_peak[kBlockR], row_inverse[kBlockR];
  __device__ T (*g_rows())[kBlockC + kPadT] { return g; }
  __device__ float row_scale(int r) const { return row_peak[r]; }
};

template <typename T>
struct BackwardBuffers<T, false> {
  TileBuffers<T> tile;
  alignas(32) float out[kBlockR][kBlockD + kPadF];
  __device__ float (*g_rows())[kBlockC + kPadF] { return tile.s; }
  __device__ float row_scale(int) const { return 1.0f; }
};

__device__ __forceinline__ float weight(float z, bool sigmoid) { return sigmoid ? stable_sigmoid(z) : __expf(z); }

template <typename T>
__global__ void __launch_bounds__(kThreads) weighted_products_kernel(Matrix<T> a, Matrix<T> b, int64_t dim,
                                                                         ProductTerms terms, float* out,
                                                                         int64_t row_start, int64_t row_end) {
  __shared__ BackwardBuffers<T> buf;
  const float scale = *terms.scale;
  const int64_t row0 = row_start + static_cast<int64_t>(blockIdx.x) * kBlockR;
  Matrix<T> rows = a;
  rows.rows = row_end;  // rows past the chunk are padding
  const int64_t n_col_blocks = (b.rows + kBlockC - 1) / kBlockC;

  for (int64_t col_block = 0; col_block < n_col_blocks; ++col_block) {
    const int64_t col0 = col_block * kBlockC;
    scaled_logit_tile(buf.tile, rows, b, row0, col0, dim, scale);
    // G in fp32, in place of S.
    for (int e = threadIdx.x; e < kBlockR * kBlockC; e += kThreads) {
      const int r = e / kBlockC, c = e % kBlockC;
      const int64_t i = row0 + r, j = col0 + c;
      float g = 0.0f;
      if (i < row_end && j < b.rows) {
        const float s = buf.tile.s[r][c];
        // An excluded diagonal entry may overflow exp: skip it rather than multiply by zero.
        if (!(terms.exclude_diagonal && i == j)) {
          if (terms.row_w) g += terms.row_w[i] * weight(s - terms.row_off[i], terms.sigmoid);
          if (terms.col_w) g += terms.col_w[j] * weight(s - terms.col_off[j], terms.sigmoid);
        }
        if (terms.positives_by == kPositivesByRow && terms.pos_index[i] == j) g += terms.pos_coeff[i];
        if (terms.positives_by == kPositivesByColumn && terms.pos_index[j] == i) g += terms.pos_coeff[j];
      }
      buf.tile.s[r][c] = g;
    }
    __syncthreads();
    if constexpr (kTensorCores<T>) {
      const int r = threadIdx.x / 2, half = threadIdx.x % 2;  // two threads per row, as in the forward
      float peak = 0.0f;
      for (int c = half * 32; c < half * 32 + 32; ++c) peak = fmaxf(peak, fabsf(buf.tile.s[r][c]));
      peak = fmaxf(peak, __shfl_xor_sync(0xffffffff, peak, 1));
      // At least the smallest normal float, so the reciprocal is finite; an all-zero row stays 0.
      peak = fmaxf(peak, FLT_MIN);
      if (half == 0) {
        buf.row_peak[r] = peak;
        buf.row_inverse[r] = 1.0f / peak;
      }
      __syncthreads();
      for (int e = threadIdx.x; e < kBlockR * kBlockC; e += kThreads) {
        const int rr = e / kBlockC, c = e % kBlockC;
        buf.g[rr][c] = from_float<T>(buf.tile.s[rr][c] * buf.row_inverse[rr]);
      }
      __syncthreads();
    }
    auto g_tile = buf.g_rows();

    for (int64_t d0 = 0; d0 < dim; d0 += kBlockD) {
      stage<T, kBlockC>(buf.tile.b, b, col0, d0, dim);
      __syncthreads();
      if constexpr (kTensorCores<T>) {
        using namespace nvcuda;
        const int warp = threadIdx.x / 32, warp_r = (warp / 2) * 32, warp_d = (warp % 2) * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
        for (int i = 0; i < 2; ++i) wmma::fill_fragment(acc[i], 0.0f);
        for (int k = 0; k < kBlockC; k += 16) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, &buf.tile.b[k][warp_d], kStageStride<T>);
          for (int i = 0; i < 2; ++i) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fg;
            wmma::load_matrix_sync(fg, &g_tile[warp_r + 16 * i][k], kBlockC + kPadT);
            wmma::mma_sync(acc[i], fg, fb, acc[i]);
          }
        }
        for (int i = 0; i < 2; ++i)
          wmma::store_matrix_sync(&buf.out[warp_r + 16 * i][warp_d], acc[i], kBlockD + kPadF, wmma::mem_row_major);
      } else {
        const int r0 = (threadIdx.x / 16) * 8, c0 = (threadIdx.x % 16) * 2;
        float acc[8][2] = {};
        for (int k = 0; k < kBlockC; ++k)
          for (int i = 0; i < 8; ++i)
            for (int j = 0; j < 2; ++j) acc[i][j] = fmaf(g_tile[r0 + i][k], buf.tile.b[k][c0 + j], acc[i][j]);
        for (int i = 0; i < 8; ++i)
          for (int j = 0; j < 2; ++j) buf.out[r0 + i][c0 + j] = acc[i][j];
      }
      __syncthreads();
      for (int e = threadIdx.x; e < kBlockR * kBlockD; e += kThreads) {
        const int r = e / kBlockD, k = e % kBlockD;
        const int64_t i = row0 + r, d = d0 + k;
        if (i < row_end && d < dim) out[(i - row_start) * dim + d] += buf.row_scale(r) * buf.out[r][k];
      }
      __syncthreads();
    }
  }
}

template <typename T>
cudaError_t launch(const ProductArgs& args, cudaStream_t stream) {
  const Matrix<T> a{static_cast<const T*>(args.a), args.n_rows, args.a_row_stride, args.a_col_stride};
  const Matrix<T> b{static_cast<const T*>(args.b), args.n_cols, args.b_row_stride, args.b_col_stride};
  const dim3 grid(static_cast<unsigned>((args.row_end - args.row_start + kBlockR - 1) / kBlockR));
  weighted_products_kernel<T><<<grid, kThreads, 0, stream>>>(a, b, args.dim, args.terms, args.out,
                                                                  args.row_start, args.row_end);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_weighted_products(const ProductArgs& args, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto element) { return launch<decltype(element)>(args, stream); });
}

cudaError_t resident_product_blocks(DType dtype, int* blocks) {
  return dispatch_dtype(dtype, [&](auto element) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, weighted_products_kernel<decltype(element)>, kThreads,
                                                         0);
  });
}

}  // namespace flashcl
