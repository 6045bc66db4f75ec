// Tiles of S = scale * a @ b.T in shared memory: what both kernels compute first.
//
// A block of 128 threads owns a 64 x 64 tile of S. It walks D in steps of 32, staging
// a[rows, d:d+32] and b[cols, d:d+32] in shared memory (any strides, zero outside the
// matrices), and multiplies them: bf16/fp16 through WMMA tensor-core fragments with fp32
// accumulation (4 warps, each a 32 x 32 quarter), fp32 with exact fp32 FMAs. The scaled
// tile lands in shared memory as fp32 for the element-wise epilogues.
//
// Staged rows are padded: to 40 elements for WMMA (leading dimensions a multiple of 8),
// to 33 floats for fp32, an odd stride, so the 16 rows a half-warp reads at one k fall in
// 16 different banks (at 40 floats they fell in one: a 16-way conflict).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "launchers.h"

namespace flashcl {

constexpr int kThreads = 128;
constexpr int kBlockR = 64;
constexpr int kBlockC = 64;
constexpr int kBlockD = 32;
constexpr int kPadT = 8;   // keeps WMMA leading dimensions multiples of 8 elements
constexpr int kPadF = 4;   // and of 4 for fp32
static_assert(kBlockC == kColumnBlock, "the forward's column locks (launchers.h) cover one column tile each");
static_assert(kBlockR == kProductBlockRows, "launchers.h tells the Python side a product block's rows");

template <typename T>
constexpr bool kTensorCores = !std::is_same<T, float>::value;

// The row stride of staged a and b tiles (see the top of this file).
template <typename T>
constexpr int kStageStride = kBlockD + (kTensorCores<T> ? kPadT : 1);
static_assert(kStageStride<float> % 2 == 1, "fp32 staged rows need an odd stride to spread over the banks");
static_assert(kStageStride<__half> % 8 == 0, "WMMA needs a leading dimension that is a multiple of 8");

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half(v); }

// A strided matrix: element (i, d) at data[i * row_stride + d * col_stride], rows [0, rows).
template <typename T>
struct Matrix {
  const T* data;
  int64_t rows, row_stride, col_stride;
};

// launch(T{}) with T the element type of dtype: one switch for every kernel's launcher.
template <typename Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(float{});
    case DType::kFloat16: return launch(__half{});
    case DType::kBFloat16: return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct TileBuffers {
  alignas(32) T a[kBlockR][kStageStride<T>];
  alignas(32) T b[kBlockC][kStageStride<T>];
  alignas(32) float s[kBlockR][kBlockC + kPadF];
};

// Copies rows [first, first + R) and columns [d0, d0 + kBlockD) of m into dst, zero-padded.
template <typename T, int R>
__device__ __forceinline__ void stage(T (*dst)[kStageStride<T>], const Matrix<T>& m, int64_t first, int64_t d0,
                                     int64_t dim) {
  for (int e = threadIdx.x; e < R * kBlockD; e += kThreads) {
    const int r = e / kBlockD, k = e % kBlockD;
    const int64_t i = first + r, d = d0 + k;
    dst[r][k] = (i < m.rows && d < dim) ? m.data[i * m.row_stride + d * m.col_stride] : from_float<T>(0.0f);
  }
}

// tile.s = scale * a[row0 : row0 + 64] @ b[col0 : col0 + 64].T
template <typename T>
__device__ void scaled_logit_tile(TileBuffers<T>& tile, const Matrix<T>& a, const Matrix<T>& b, int64_t row0,
                                  int64_t col0, int64_t dim, float scale) {
  if constexpr (kTensorCores<T>) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, warp_r = (warp / 2) * 32, warp_c = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t d0 = 0; d0 < dim; d0 += kBlockD) {
      stage<T, kBlockR>(tile.a, a, row0, d0, dim);
      stage<T, kBlockC>(tile.b, b, col0, d0, dim);
      __syncthreads();
      for (int k = 0; k < kBlockD; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];  // b's rows are S's columns
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &tile.a[warp_r + 16 * i][k], kStageStride<T>);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &tile.b[warp_c + 16 * j][k], kStageStride<T>);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        for (int e = 0; e < acc[i][j].num_elements; ++e) acc[i][j].x[e] *= scale;
        wmma::store_matrix_sync(&tile.s[warp_r + 16 * i][warp_c + 16 * j], acc[i][j], kBlockC + kPadF,
                                wmma::mem_row_major);
      }
  } else {
    // fp32: each thread 8 rows x 4 columns of the tile, exact FMAs (never tf32). A half-warp's
    // 16 threads take 16 adjacent columns (c0 + 16 j), so at each k they read 16 adjacent
    // staged rows of b: different banks at the odd stride.
    const int r0 = (threadIdx.x / 16) * 8, c0 = threadIdx.x % 16;
    float acc[8][4] = {};
    for (int64_t d0 = 0; d0 < dim; d0 += kBlockD) {
      stage<T, kBlockR>(tile.a, a, row0, d0, dim);
      stage<T, kBlockC>(tile.b, b, col0, d0, dim);
      __syncthreads();
      for (int k = 0; k < kBlockD; ++k)
        for (int i = 0; i < 8; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(tile.a[r0 + i][k], tile.b[c0 + 16 * j][k], acc[i][j]);
      __syncthreads();
    }
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) tile.s[r0 + i][c0 + 16 * j] = acc[i][j] * scale;
  }
  __syncthreads();
}

// The sigmoid family's elementwise functions, never overflowing: with e = exp(-|z|),
// sigmoid(z) = 1 / (1 + e) for z >= 0 and e / (1 + e) below, softplus(z) = max(z, 0) + log1p(e).
__device__ __forceinline__ float stable_sigmoid(float z) {
  const float e = __expf(-fabsf(z));
  return (z >= 0.0f ? 1.0f : e) / (1.0f + e);
}

__device__ __forceinline__ float stable_softplus(float z) { return fmaxf(z, 0.0f) + log1pf(__expf(-fabsf(z))); }

}  // namespace flashcl
