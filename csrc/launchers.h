// The kernels' launchers, in plain C++ types: the .cu files need no torch headers, which
// keeps them quick to compile; ops.cpp turns tensors into these structs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flashcl {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// weighted_products' positives_by: the values of flashcl/backends/fused.py (tests/test_cuda_backend.py compares).
constexpr int64_t kNoPositives = 0, kPositivesByRow = 1, kPositivesByColumn = 2;
constexpr int64_t kColumnBlock = 64;  // the kernels' column tile (tile.cuh's kBlockC); one lock per column block

struct LseForwardArgs {
  const void *a, *b;  // (n_rows, dim) and (n_cols, dim), any strides, the same dtype
  int64_t n_rows, n_cols, dim;
  int64_t a_row_stride, a_col_stride, b_row_stride, b_col_stride;
  const float* scale;  // device scalar
  float* row_lse;      // (n_rows,)
  float *col_max, *col_sum;  // (n_cols,), -inf and 0; used when merge_columns
  int* locks;                // (ceil(n_cols / kColumnBlock),), zeroed; used when merge_columns
  bool exclude_diagonal, merge_columns;
};

// The sigmoid family's forward: the row sums of softplus(S + bias) and of sigmoid(S + bias).
struct SoftplusSumsArgs {
  const void *a, *b;  // as in LseForwardArgs
  int64_t n_rows, n_cols, dim;
  int64_t a_row_stride, a_col_stride, b_row_stride, b_col_stride;
  const float *scale, *bias;          // device scalars
  float *softplus_sums, *sigmoid_sums;  // (n_rows,) each
  bool exclude_diagonal;
};

// G_rc = row_w_r f(S_rc - row_off_r) + col_w_c f(S_rc - col_off_c) + positives, f = exp or (sigmoid)
// the logistic sigmoid; null pointers switch a term off. Positives by row: row r's positive is column pos_index[r], coefficient
// pos_coeff[r]; by column: column c's positive is row pos_index[c], coefficient pos_coeff[c].
struct ProductTerms {
  const float* scale;
  const float *row_w, *row_off, *col_w, *col_off;
  const int64_t* pos_index;
  const float* pos_coeff;
  int64_t positives_by;
  bool exclude_diagonal, sigmoid;
};

struct ProductArgs {
  const void *a, *b;
  int64_t n_rows, n_cols, dim;
  int64_t a_row_stride, a_col_stride, b_row_stride, b_col_stride;
  ProductTerms terms;
  float* out;  // (row_end - row_start, dim), contiguous, zeroed
  int64_t row_start, row_end;
};

cudaError_t launch_lse_forward(const LseForwardArgs& args, DType dtype, cudaStream_t stream);
cudaError_t launch_softplus_sums(const SoftplusSumsArgs& args, DType dtype, cudaStream_t stream);
cudaError_t launch_weighted_products(const ProductArgs& args, DType dtype, cudaStream_t stream);
// How many blocks of the products kernel one multiprocessor of the current device holds at once.
cudaError_t resident_product_blocks(DType dtype, int* blocks);
constexpr int64_t kProductBlockRows = 64;  // the rows one block of the products kernel owns (tile.cuh's kBlockR)

}  // namespace flashcl
