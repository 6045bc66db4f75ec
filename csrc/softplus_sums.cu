// Primitive 1' (the sigmoid family, SigLIP): the row sums of softplus(S + bias) and of its derivative
// sigmoid(S + bias), S = scale * a @ b.T never stored.
//
// A block owns 64 rows and sweeps every column block, as the LSE kernel does: two threads per
// row, each over half the tile's columns, combined with a shuffle. Plain sums, no running max.
#include "tile.cuh"

namespace flashcl {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softplus_sums_kernel(Matrix<T> a, Matrix<T> b, int64_t dim, const float* scale_ptr, const float* bias_ptr,
                         float* softplus_sums, float* sigmoid_sums, bool exclude_diagonal) {
  __shared__ TileBuffers<T> tile;
  const float scale = *scale_ptr, bias = *bias_ptr;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockR;
  const int lane_row = threadIdx.x / 2, half = threadIdx.x % 2;  // row and which half of the columns
  const int64_t n_col_blocks = (b.rows + kBlockC - 1) / kBlockC;
  float softplus_sum = 0.0f, sigmoid_sum = 0.0f;

  for (int64_t col_block = 0; col_block < n_col_blocks; ++col_block) {
    const int64_t col0 = col_block * kBlockC;
    scaled_logit_tile(tile, a, b, row0, col0, dim, scale);
    float tile_softplus = 0.0f, tile_sigmoid = 0.0f;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int64_t j = col0 + c;
      if (j >= b.rows || (exclude_diagonal && row0 + lane_row == j)) continue;
      const float z = tile.s[lane_row][c] + bias;
      tile_softplus += stable_softplus(z);
      tile_sigmoid += stable_sigmoid(z);
    }
    softplus_sum += tile_softplus + __shfl_xor_sync(0xffffffff, tile_softplus, 1);
    sigmoid_sum += tile_sigmoid + __shfl_xor_sync(0xffffffff, tile_sigmoid, 1);
    __syncthreads();  // the next tile overwrites tile.s
  }
  const int64_t row = row0 + lane_row;
  if (half == 0 && row < a.rows) {
    softplus_sums[row] = softplus_sum;
    sigmoid_sums[row] = sigmoid_sum;
  }
}

template <typename T>
cudaError_t launch(const SoftplusSumsArgs& args, cudaStream_t stream) {
  const Matrix<T> a{static_cast<const T*>(args.a), args.n_rows, args.a_row_stride, args.a_col_stride};
  const Matrix<T> b{static_cast<const T*>(args.b), args.n_cols, args.b_row_stride, args.b_col_stride};
  const dim3 grid(static_cast<unsigned>((args.n_rows + kBlockR - 1) / kBlockR));
  softplus_sums_kernel<T><<<grid, kThreads, 0, stream>>>(a, b, args.dim, args.scale, args.bias, args.softplus_sums,
                                                          args.sigmoid_sums, args.exclude_diagonal);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_softplus_sums(const SoftplusSumsArgs& args, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto element) { return launch<decltype(element)>(args, stream); });
}

}  // namespace flashcl
