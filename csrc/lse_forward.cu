// Primitive 1: row (and, merged under locks, column) log-sum-exp of S = scale * a @ b.T.
//
// A block owns 64 rows and sweeps every column block, keeping each row's online
// (max, rescaled sum) in registers: two threads per row, each over half the tile's
// columns, combined with a shuffle. With merge_columns it also reduces each tile's
// columns the same way and folds them into col_max / col_sum under the column block's
// spin lock, visiting column blocks in an order staggered by block index so blocks
// rarely wait on each other. The merge order varies run to run; the deterministic path
// launches this kernel on (b, a) instead, whose rows are the columns.
#include "tile.cuh"

namespace flashcl {
namespace {

__device__ __forceinline__ float safe(float m) { return m == -INFINITY ? 0.0f : m; }

// Online merge of (max, sum) pairs; a sum of 0 with max -inf is "nothing yet".
__device__ __forceinline__ void merge(float& max, float& sum, float other_max, float other_sum) {
  const float merged = fmaxf(max, other_max);
  sum = sum * __expf(max - safe(merged)) + other_sum * __expf(other_max - safe(merged));
  max = merged;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_forward_kernel(Matrix<T> a, Matrix<T> b, int64_t dim, const float* scale_ptr, float* row_lse,
                       float* col_max, float* col_sum, int* locks, bool exclude_diagonal, bool merge_columns) {
  __shared__ TileBuffers<T> tile;
  const float scale = *scale_ptr;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockR;
  const int lane_row = threadIdx.x / 2, half = threadIdx.x % 2;  // row (or column) and which half
  const int64_t row = row0 + lane_row;
  const int64_t n_col_blocks = (b.rows + kBlockC - 1) / kBlockC;
  float row_max = -INFINITY, row_sum = 0.0f;

  for (int64_t step = 0; step < n_col_blocks; ++step) {
    const int64_t col_block = merge_columns ? (step + blockIdx.x) % n_col_blocks : step;
    const int64_t col0 = col_block * kBlockC;
    scaled_logit_tile(tile, a, b, row0, col0, dim, scale);
    // Excluded entries become -inf in place, so both reductions below see the same tile.
    for (int e = threadIdx.x; e < kBlockR * kBlockC; e += kThreads) {
      const int r = e / kBlockC, c = e % kBlockC;
      const bool keep = row0 + r < a.rows && col0 + c < b.rows && !(exclude_diagonal && row0 + r == col0 + c);
      if (!keep) tile.s[r][c] = -INFINITY;
    }
    __syncthreads();

    float tile_max = -INFINITY, tile_sum = 0.0f;
    for (int c = half * 32; c < half * 32 + 32; ++c) tile_max = fmaxf(tile_max, tile.s[lane_row][c]);
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
    for (int c = half * 32; c < half * 32 + 32; ++c) tile_sum += __expf(tile.s[lane_row][c] - safe(tile_max));
    tile_sum += __shfl_xor_sync(0xffffffff, tile_sum, 1);
    merge(row_max, row_sum, tile_max, tile_sum);

    if (merge_columns) {
      const int c = lane_row;  // the same pairing, down the columns
      float cmax = -INFINITY, csum = 0.0f;
      for (int r = half * 32; r < half * 32 + 32; ++r) cmax = fmaxf(cmax, tile.s[r][c]);
      cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffff, cmax, 1));
      for (int r = half * 32; r < half * 32 + 32; ++r) csum += __expf(tile.s[r][c] - safe(cmax));
      csum += __shfl_xor_sync(0xffffffff, csum, 1);
      if (threadIdx.x == 0) {
        while (atomicCAS(&locks[col_block], 0, 1) != 0) {
        }
        __threadfence();  // acquire: see the previous holder's stores
      }
      __syncthreads();
      const int64_t col = col0 + c;
      if (half == 0 && col < b.rows) {
        float m = __ldcg(&col_max[col]), s = __ldcg(&col_sum[col]);  // L2: another SM wrote them
        merge(m, s, cmax, csum);
        __stcg(&col_max[col], m);
        __stcg(&col_sum[col], s);
      }
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) atomicExch(&locks[col_block], 0);
    }
    __syncthreads();  // the next tile overwrites tile.s
  }
  if (half == 0 && row < a.rows) row_lse[row] = row_max + logf(row_sum);
}

template <typename T>
cudaError_t launch(const LseForwardArgs& args, cudaStream_t stream) {
  const Matrix<T> a{static_cast<const T*>(args.a), args.n_rows, args.a_row_stride, args.a_col_stride};
  const Matrix<T> b{static_cast<const T*>(args.b), args.n_cols, args.b_row_stride, args.b_col_stride};
  const dim3 grid(static_cast<unsigned>((args.n_rows + kBlockR - 1) / kBlockR));
  lse_forward_kernel<T><<<grid, kThreads, 0, stream>>>(a, b, args.dim, args.scale, args.row_lse, args.col_max,
                                                        args.col_sum, args.locks, args.exclude_diagonal,
                                                        args.merge_columns);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lse_forward(const LseForwardArgs& args, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto element) { return launch<decltype(element)>(args, stream); });
}

}  // namespace flashcl
