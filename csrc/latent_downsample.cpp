// lwam::latent_downsample: operator schemas and the CPU kernels.
//
// Layout: kernels work on the contiguous view of x as N = B*C*T planes of H x W; inputs with any
// strides are accepted and made contiguous first (a copy only when they are not). Outputs are
// contiguous. Arithmetic is in at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64).
#include "latent_downsample.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace lwam {
namespace {

// Rows of work handed to one at::parallel_for task: about 32K input elements.
inline int64_t grain_rows(int64_t elems_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, elems_per_row));
}

// One output row: acc[w] = sum over the f input rows (a contiguous, vectorisable loop), then the
// horizontal sum of each group of f neighbours. F > 0 is the factor fixed at compile time; F == 0
// means "use the runtime factor f".
template <typename scalar_t, int F>
void downsample_rows(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t row_begin,
                     int64_t row_end, int64_t W, int64_t f_runtime) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t f = F > 0 ? F : f_runtime;
  const int64_t Wo = W / f;
  const acc_t denom = static_cast<acc_t>(f * f);
  std::vector<acc_t> acc_buf(static_cast<size_t>(W));
  acc_t* __restrict__ acc = acc_buf.data();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* __restrict__ src = in + r * f * W;
    for (int64_t w = 0; w < W; ++w) acc[w] = static_cast<acc_t>(src[w]);
    for (int64_t k = 1; k < f; ++k) {
      const scalar_t* __restrict__ s = src + k * W;
      for (int64_t w = 0; w < W; ++w) acc[w] += static_cast<acc_t>(s[w]);
    }
    scalar_t* __restrict__ dst = out + r * Wo;
    for (int64_t wo = 0; wo < Wo; ++wo) {
      acc_t sum = acc[wo * f];
      for (int64_t j = 1; j < f; ++j) sum += acc[wo * f + j];
      dst[wo] = static_cast<scalar_t>(sum / denom);
    }
  }
}

// One input-gradient row: each grad value / f^2 repeated f times along W.
template <typename scalar_t, int F>
void upsample_rows(const scalar_t* __restrict__ grad, scalar_t* __restrict__ out, int64_t row_begin,
                   int64_t row_end, int64_t Wo, int64_t f_runtime) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t f = F > 0 ? F : f_runtime;
  const int64_t W = Wo * f;
  const acc_t denom = static_cast<acc_t>(f * f);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* __restrict__ g = grad + (r / f) * Wo;
    scalar_t* __restrict__ dst = out + r * W;
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const scalar_t v = static_cast<scalar_t>(static_cast<acc_t>(g[wo]) / denom);
      for (int64_t j = 0; j < f; ++j) dst[wo * f + j] = v;
    }
  }
}

at::Tensor latent_downsample_cpu(const at::Tensor& x_in, int64_t factor) {
  const auto out_shape = downsample_out_shape(x_in, factor);
  TORCH_CHECK(x_in.device().is_cpu(), "lwam::latent_downsample (CPU kernel): x is on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  const int64_t W = x.size(4);
  const int64_t rows_out = out.numel() / out.size(4);  // B*C*T*Ho
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "latent_downsample_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows_out, grain_rows(factor * W), [&](int64_t b, int64_t e) {
      switch (factor) {
        case 1: downsample_rows<scalar_t, 1>(in, o, b, e, W, factor); break;
        case 2: downsample_rows<scalar_t, 2>(in, o, b, e, W, factor); break;
        case 4: downsample_rows<scalar_t, 4>(in, o, b, e, W, factor); break;
        default: downsample_rows<scalar_t, 0>(in, o, b, e, W, factor); break;
      }
    });
  });
  return out;
}

at::Tensor latent_downsample_backward_cpu(const at::Tensor& grad_in, int64_t factor) {
  const auto out_shape = upsample_out_shape(grad_in, factor);
  TORCH_CHECK(grad_in.device().is_cpu(), "lwam::latent_downsample_backward (CPU kernel): grad is on ",
              grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty(out_shape, grad.options());
  if (out.numel() == 0) return out;
  const int64_t Wo = grad.size(4);
  const int64_t rows_in = out.numel() / out.size(4);  // B*C*T*H
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "latent_downsample_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows_in, grain_rows(Wo * factor), [&](int64_t b, int64_t e) {
      switch (factor) {
        case 1: upsample_rows<scalar_t, 1>(g, o, b, e, Wo, factor); break;
        case 2: upsample_rows<scalar_t, 2>(g, o, b, e, Wo, factor); break;
        case 4: upsample_rows<scalar_t, 4>(g, o, b, e, Wo, factor); break;
        default: upsample_rows<scalar_t, 0>(g, o, b, e, Wo, factor); break;
      }
    });
  });
  return out;
}

}  // namespace

// The namespace "lwam" is shared with ops defined from Python (torch.library.custom_op, which adds
// fragments), so the schemas are added as a fragment too: no registration here can collide with theirs.
TORCH_LIBRARY_FRAGMENT(lwam, m) {
  // Fake (meta) kernels and autograd formulas live in Python; when a fake tensor reaches these ops
  // before that module was imported, PyTorch imports it from here.
  m.set_python_module("lwam.ops.latent_downsample");
  m.def("latent_downsample(Tensor x, int factor) -> Tensor");
  m.def("latent_downsample_backward(Tensor grad, int factor) -> Tensor");
}

TORCH_LIBRARY_IMPL(lwam, CPU, m) {
  m.impl("latent_downsample", &latent_downsample_cpu);
  m.impl("latent_downsample_backward", &latent_downsample_backward_cpu);
}

}  // namespace lwam
