// The CUDA backend's operators, torch.ops.flashcl.lse_forward, softplus_sums and weighted_products: argument
// checks (a bad argument is a Python exception here, never a device-side assert), dtype
// dispatch and registration. Their fake (meta) implementations are defined in flashcl/backends/fused.py
// (shared with the Triton operators) and registered for these operators by flashcl/backends/cuda.py.
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "launchers.h"

namespace flashcl {
namespace {

DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "flashcl CUDA kernels take float16, bfloat16 or float32 features, got ", type);
  }
}

DType dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }

void check_pair(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "flashcl CUDA kernels need CUDA tensors, got ", a.device(), " and ",
              b.device());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "features must be 2-D (rows, dim), got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) > 0 && b.size(0) > 0 && a.size(1) > 0, "features must be non-empty, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "features must share their dim, got ", a.size(1), " and ", b.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "features must share a dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "features must be on one device, got ", a.device(), " and ", b.device());
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device() == a.device(),
              "scale must be a float32 scalar on ", a.device(), ", got ", scale.scalar_type(), " ", scale.sizes(),
              " on ", scale.device());
  dtype_of(a);
}

// A per-row vector: absent, or (length,) contiguous of the given dtype on the features' device.
const void* vector_or_null(const char* name, const std::optional<at::Tensor>& v, int64_t length,
                           at::ScalarType dtype, const at::Tensor& like) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == length, name, " must have shape (", length, ",), got ", v->sizes());
  TORCH_CHECK(v->scalar_type() == dtype, name, " must be ", dtype, ", got ", v->scalar_type());
  TORCH_CHECK(v->device() == like.device(), name, " must be on ", like.device(), ", got ", v->device());
  TORCH_CHECK(v->is_contiguous(), name, " must be contiguous");
  return v->data_ptr();
}

void check_launch(cudaError_t error, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, "flashcl ", kernel, " failed to launch: ", cudaGetErrorString(error));
}

// Row LSE of S = scale * a b^T; with merge_columns also the column LSE from the same pass.
// exclude_diagonal leaves out the entries (i, i), i < min(rows, columns): a distributed rank's
// anchors against every rank's candidates, its own first, is a rectangle with that diagonal.
std::tuple<at::Tensor, at::Tensor> lse_forward(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                               bool exclude_diagonal, bool merge_columns) {
  check_pair(a, b, scale);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor row_lse = at::empty({a.size(0)}, f32);
  at::Tensor col_max, col_sum, locks;
  if (merge_columns) {
    // -inf, "nothing yet": a zero would cap every column's running max at >= 0, and a column
    // whose logits all lie below about -104 would sum to 0 in fp32 (LSE -inf, NaN gradients).
    col_max = at::full({b.size(0)}, -std::numeric_limits<float>::infinity(), f32);
    col_sum = at::zeros({b.size(0)}, f32);
    locks = at::zeros({(b.size(0) + kColumnBlock - 1) / kColumnBlock}, a.options().dtype(at::kInt));
  }
  LseForwardArgs args{a.data_ptr(), b.data_ptr(), a.size(0), b.size(0), a.size(1), a.stride(0), a.stride(1),
                      b.stride(0), b.stride(1), scale.data_ptr<float>(), row_lse.data_ptr<float>(),
                      merge_columns ? col_max.data_ptr<float>() : nullptr,
                      merge_columns ? col_sum.data_ptr<float>() : nullptr,
                      merge_columns ? locks.data_ptr<int>() : nullptr, exclude_diagonal, merge_columns};
  check_launch(launch_lse_forward(args, dtype_of(a), c10::cuda::getCurrentCUDAStream()), "lse_forward");
  return {row_lse, merge_columns ? at::log(col_sum).add_(col_max) : at::empty({0}, f32)};
}

// The sigmoid family's forward: the row sums of softplus(S + bias) and of sigmoid(S + bias).
std::tuple<at::Tensor, at::Tensor> softplus_sums(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                                 const at::Tensor& bias, bool exclude_diagonal) {
  check_pair(a, b, scale);
  TORCH_CHECK(bias.numel() == 1 && bias.scalar_type() == at::kFloat && bias.device() == a.device() &&
                  bias.is_contiguous(),
              "bias must be a one-element float32 tensor on ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor softplus = at::empty({a.size(0)}, f32), sigmoid = at::empty({a.size(0)}, f32);
  SoftplusSumsArgs args{a.data_ptr(), b.data_ptr(), a.size(0), b.size(0), a.size(1), a.stride(0), a.stride(1),
                        b.stride(0), b.stride(1), scale.data_ptr<float>(), bias.data_ptr<float>(),
                        softplus.data_ptr<float>(), sigmoid.data_ptr<float>(), exclude_diagonal};
  check_launch(launch_softplus_sums(args, dtype_of(a), c10::cuda::getCurrentCUDAStream()), "softplus_sums");
  return {softplus, sigmoid};
}

at::Tensor weighted_products(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& row_w, const std::optional<at::Tensor>& row_off,
                                 const std::optional<at::Tensor>& col_w, const std::optional<at::Tensor>& col_off,
                                 const std::optional<at::Tensor>& pos_index,
                                 const std::optional<at::Tensor>& pos_coeff, int64_t positives_by,
                                 bool exclude_diagonal, int64_t row_start, int64_t row_end, bool sigmoid) {
  check_pair(a, b, scale);
  const int64_t n = a.size(0), m = b.size(0);
  TORCH_CHECK(0 <= row_start && row_start < row_end && row_end <= n, "rows [", row_start, ", ", row_end,
              ") must lie in [0, ", n, ")");
  TORCH_CHECK(row_w.has_value() == row_off.has_value() && col_w.has_value() == col_off.has_value(),
              "each exp term needs both its weights and its offsets");
  TORCH_CHECK(positives_by == kNoPositives || positives_by == kPositivesByRow || positives_by == kPositivesByColumn,
              "positives_by must be 0 (none), 1 (by row) or 2 (by column), got ", positives_by);
  TORCH_CHECK((positives_by != kNoPositives) == (pos_index.has_value() && pos_coeff.has_value()),
              "positives_by=", positives_by, " needs pos_index and pos_coeff exactly when it is not 0");
  const int64_t positives_length = positives_by == kPositivesByColumn ? m : n;
  ProductTerms terms{scale.data_ptr<float>(),
                     static_cast<const float*>(vector_or_null("row_w", row_w, n, at::kFloat, a)),
                     static_cast<const float*>(vector_or_null("row_off", row_off, n, at::kFloat, a)),
                     static_cast<const float*>(vector_or_null("col_w", col_w, m, at::kFloat, a)),
                     static_cast<const float*>(vector_or_null("col_off", col_off, m, at::kFloat, a)),
                     static_cast<const int64_t*>(vector_or_null("pos_index", pos_index, positives_length, at::kLong, a)),
                     static_cast<const float*>(vector_or_null("pos_coeff", pos_coeff, positives_length, at::kFloat, a)),
                     positives_by, exclude_diagonal, sigmoid};
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::zeros({row_end - row_start, a.size(1)}, a.options().dtype(at::kFloat));
  ProductArgs args{a.data_ptr(), b.data_ptr(), n, m, a.size(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                   terms, out.data_ptr<float>(), row_start, row_end};
  check_launch(launch_weighted_products(args, dtype_of(a), c10::cuda::getCurrentCUDAStream()), "weighted_products");
  return out;
}

// The rows one multiprocessor of the current device works on at once in the products kernel: its
// rows per block times the blocks its registers and shared memory let it hold (the occupancy API).
int64_t resident_rows(at::ScalarType dtype) {
  int blocks = 0;
  check_launch(resident_product_blocks(dtype_of(dtype), &blocks), "the occupancy query");
  return kProductBlockRows * blocks;
}

}  // namespace

TORCH_LIBRARY(flashcl, m) {
  m.def("lse_forward(Tensor a, Tensor b, Tensor scale, bool exclude_diagonal, bool merge_columns) -> (Tensor, Tensor)");
  m.def("softplus_sums(Tensor a, Tensor b, Tensor scale, Tensor bias, bool exclude_diagonal) -> (Tensor, Tensor)");
  m.def("resident_rows(ScalarType dtype) -> int", &resident_rows);
  m.def("weighted_products(Tensor a, Tensor b, Tensor scale, Tensor? row_w, Tensor? row_off, "
        "Tensor? col_w, Tensor? col_off, Tensor? pos_index, Tensor? pos_coeff, int positives_by, "
        "bool exclude_diagonal, int row_start, int row_end, bool sigmoid=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashcl, CUDA, m) {
  m.impl("lse_forward", &lse_forward);
  m.impl("softplus_sums", &softplus_sums);
  m.impl("weighted_products", &weighted_products);
}

}  // namespace flashcl

// `import flashcl._C` loads this library, whose static initializers register the operators.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "flashcl's CUDA kernels, as torch.ops.flashcl.*", -1,
                               nullptr};
  return PyModule_Create(&module);
}
