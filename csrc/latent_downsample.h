// lwam._C: latent downsampling (mean over f x f spatial blocks of [B, C, T, H, W]).
//
// Shared by the CPU translation unit (latent_downsample.cpp) and the CUDA one
// (latent_downsample_cuda.cu): argument checks, output shapes and the CUDA entry points.
// Kept free of heavy headers so that nvcc compiles it quickly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <vector>

namespace lwam {

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* arg) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   op, ": expected ", arg, " of dtype float32, float16, bfloat16 or float64, got ", st);
}

// Forward: x [B, C, T, H, W] with H % f == 0 and W % f == 0 -> [B, C, T, H/f, W/f].
inline std::vector<int64_t> downsample_out_shape(const at::Tensor& x, int64_t factor) {
  constexpr const char* op = "lwam::latent_downsample";
  TORCH_CHECK_VALUE(x.dim() == 5, op, ": expected x of rank 5 [B, C, T, H, W], got shape ",
                    shape_str(x.sizes()), " (rank ", x.dim(), ") with factor ", factor);
  TORCH_CHECK_VALUE(factor > 0, op, ": factor must be a positive integer, got factor ", factor,
                    " for x of shape ", shape_str(x.sizes()));
  const int64_t H = x.size(3), W = x.size(4);
  TORCH_CHECK_VALUE(H % factor == 0 && W % factor == 0, op, ": H and W of x must be divisible by factor ",
                    factor, ", got x of shape ", shape_str(x.sizes()), " (H=", H, ", W=", W, ")");
  check_dtype(x, op, "x");
  return {x.size(0), x.size(1), x.size(2), H / factor, W / factor};
}

// Backward: grad [B, C, T, Ho, Wo] -> [B, C, T, Ho*f, Wo*f].
inline std::vector<int64_t> upsample_out_shape(const at::Tensor& grad, int64_t factor) {
  constexpr const char* op = "lwam::latent_downsample_backward";
  TORCH_CHECK_VALUE(grad.dim() == 5, op, ": expected grad of rank 5 [B, C, T, H/f, W/f], got shape ",
                    shape_str(grad.sizes()), " (rank ", grad.dim(), ") with factor ", factor);
  TORCH_CHECK_VALUE(factor > 0, op, ": factor must be a positive integer, got factor ", factor,
                    " for grad of shape ", shape_str(grad.sizes()));
  check_dtype(grad, op, "grad");
  return {grad.size(0), grad.size(1), grad.size(2), grad.size(3) * factor, grad.size(4) * factor};
}

#ifdef LWAM_WITH_CUDA
at::Tensor latent_downsample_cuda(const at::Tensor& x, int64_t factor);
at::Tensor latent_downsample_backward_cuda(const at::Tensor& grad, int64_t factor);
#endif

}  // namespace lwam
