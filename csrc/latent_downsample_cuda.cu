// lwam::latent_downsample: CUDA kernels (forward and backward) and their dispatcher registration.
//
// Memory-bound: every input byte is read once and every output byte written once. The fast path
// moves 16-byte vectors: thread i owns 16 consecutive bytes of one row in each of the f input rows
// of an output row (forward), or 16 bytes of one input-gradient row (backward), so a warp touches
// 512 contiguous bytes per row (fully coalesced). It applies when the 16-byte vector holds a whole
// number of f-blocks (VEC % f == 0), W % VEC == 0 and both pointers are 16-byte aligned; every other
// case (odd factors, odd widths, offset views) takes a scalar kernel with one thread per output.
// Arithmetic in at::opmath_type (fp32 for half types).
#include "latent_downsample.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace lwam {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Blocks for a grid-stride loop over `items`: enough to fill the GPU several times over, no more.
int blocks_for(int64_t items) {
  static int sm_count[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int& sms = sm_count[dev & 63];
  if (sms == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t needed = (items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
}

// ---- forward ---------------------------------------------------------------------------------

// Item i = (output row r, 16-byte column chunk c): reads F rows x VEC inputs, writes VEC/F outputs.
template <typename scalar_t, int VEC, int F, typename index_t>
__global__ void __launch_bounds__(kThreads)
downsample_vec_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, index_t chunks_per_row,
                      index_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int OUT = VEC / F;
  const index_t W = chunks_per_row * VEC;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / chunks_per_row;
    const index_t c = i - r * chunks_per_row;
    const scalar_t* src = in + r * F * W + c * VEC;
    Pack<scalar_t, VEC> rows[F];
#pragma unroll
    for (int k = 0; k < F; ++k) rows[k] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(src + k * W);
    Pack<scalar_t, OUT> res;
#pragma unroll
    for (int o = 0; o < OUT; ++o) {
      acc_t sum = acc_t(0);
#pragma unroll
      for (int k = 0; k < F; ++k)
#pragma unroll
        for (int j = 0; j < F; ++j) sum += static_cast<acc_t>(rows[k].v[o * F + j]);
      res.v[o] = static_cast<scalar_t>(sum / static_cast<acc_t>(F * F));
    }
    *reinterpret_cast<Pack<scalar_t, OUT>*>(out + r * (chunks_per_row * OUT) + c * OUT) = res;
  }
}

// One thread per output element, any factor and alignment.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
downsample_scalar_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, index_t Wo, index_t f,
                         index_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t W = Wo * f;
  const acc_t denom = static_cast<acc_t>(f * f);
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / Wo;
    const index_t wo = i - r * Wo;
    const scalar_t* src = in + r * f * W + wo * f;
    acc_t sum = acc_t(0);
    for (index_t k = 0; k < f; ++k)
      for (index_t j = 0; j < f; ++j) sum += static_cast<acc_t>(src[k * W + j]);
    out[i] = static_cast<scalar_t>(sum / denom);
  }
}

// ---- backward --------------------------------------------------------------------------------

// Item i = (input-gradient row r, 16-byte chunk c): reads VEC/F grads of row r/F, writes VEC values.
template <typename scalar_t, int VEC, int F, typename index_t>
__global__ void __launch_bounds__(kThreads)
upsample_vec_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ out, index_t chunks_per_row,
                    index_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int IN = VEC / F;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / chunks_per_row;
    const index_t c = i - r * chunks_per_row;
    const Pack<scalar_t, IN> g =
        *reinterpret_cast<const Pack<scalar_t, IN>*>(grad + (r / F) * (chunks_per_row * IN) + c * IN);
    Pack<scalar_t, VEC> res;
#pragma unroll
    for (int o = 0; o < IN; ++o) {
      const scalar_t v = static_cast<scalar_t>(static_cast<acc_t>(g.v[o]) / static_cast<acc_t>(F * F));
#pragma unroll
      for (int j = 0; j < F; ++j) res.v[o * F + j] = v;
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(out + i * VEC) = res;
  }
}

// One thread per input-gradient element.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
upsample_scalar_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ out, index_t Wo, index_t f,
                       index_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t W = Wo * f;
  const acc_t denom = static_cast<acc_t>(f * f);
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / W;
    const index_t w = i - r * W;
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[(r / f) * Wo + w / f]) / denom);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Launch the vector kernel for factor F if it applies; returns false otherwise.
template <typename scalar_t, int F, typename index_t>
bool try_downsample_vec(const scalar_t* in, scalar_t* out, int64_t rows_out, int64_t W, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if constexpr (VEC % F != 0) {
    return false;
  } else {
    if (W % VEC != 0 || !aligned16(in) || !aligned16(out)) return false;
    const int64_t chunks = W / VEC;
    const int64_t items = rows_out * chunks;
    downsample_vec_kernel<scalar_t, VEC, F, index_t><<<blocks_for(items), kThreads, 0, stream>>>(
        in, out, static_cast<index_t>(chunks), static_cast<index_t>(items));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

template <typename scalar_t, int F, typename index_t>
bool try_upsample_vec(const scalar_t* grad, scalar_t* out, int64_t rows_in, int64_t W, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if constexpr (VEC % F != 0) {
    return false;
  } else {
    if (W % VEC != 0 || !aligned16(grad) || !aligned16(out)) return false;
    const int64_t chunks = W / VEC;
    const int64_t items = rows_in * chunks;
    upsample_vec_kernel<scalar_t, VEC, F, index_t><<<blocks_for(items), kThreads, 0, stream>>>(
        grad, out, static_cast<index_t>(chunks), static_cast<index_t>(items));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

template <typename scalar_t, typename index_t>
void downsample_launch(const scalar_t* in, scalar_t* out, int64_t rows_out, int64_t W, int64_t f,
                       cudaStream_t stream) {
  bool done = false;
  switch (f) {
    case 1: done = try_downsample_vec<scalar_t, 1, index_t>(in, out, rows_out, W, stream); break;
    case 2: done = try_downsample_vec<scalar_t, 2, index_t>(in, out, rows_out, W, stream); break;
    case 4: done = try_downsample_vec<scalar_t, 4, index_t>(in, out, rows_out, W, stream); break;
    case 8: done = try_downsample_vec<scalar_t, 8, index_t>(in, out, rows_out, W, stream); break;
    default: break;
  }
  if (done) return;
  const int64_t Wo = W / f;
  const int64_t items = rows_out * Wo;
  downsample_scalar_kernel<scalar_t, index_t><<<blocks_for(items), kThreads, 0, stream>>>(
      in, out, static_cast<index_t>(Wo), static_cast<index_t>(f), static_cast<index_t>(items));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void upsample_launch(const scalar_t* grad, scalar_t* out, int64_t rows_in, int64_t W, int64_t f,
                     cudaStream_t stream) {
  bool done = false;
  switch (f) {
    case 1: done = try_upsample_vec<scalar_t, 1, index_t>(grad, out, rows_in, W, stream); break;
    case 2: done = try_upsample_vec<scalar_t, 2, index_t>(grad, out, rows_in, W, stream); break;
    case 4: done = try_upsample_vec<scalar_t, 4, index_t>(grad, out, rows_in, W, stream); break;
    case 8: done = try_upsample_vec<scalar_t, 8, index_t>(grad, out, rows_in, W, stream); break;
    default: break;
  }
  if (done) return;
  const int64_t items = rows_in * W;
  upsample_scalar_kernel<scalar_t, index_t><<<blocks_for(items), kThreads, 0, stream>>>(
      grad, out, static_cast<index_t>(W / f), static_cast<index_t>(f), static_cast<index_t>(items));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 32-bit indices when every offset (plus one grid stride of headroom) fits.
bool fits_int32(int64_t n) { return n < std::numeric_limits<int32_t>::max() / 2; }

}  // namespace

at::Tensor latent_downsample_cuda(const at::Tensor& x_in, int64_t factor) {
  const auto out_shape = downsample_out_shape(x_in, factor);
  TORCH_CHECK(x_in.is_cuda(), "lwam::latent_downsample (CUDA kernel): x is on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  const int64_t W = x.size(4);
  const int64_t rows_out = out.numel() / out.size(4);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "latent_downsample_cuda", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (fits_int32(x.numel()))
      downsample_launch<scalar_t, int32_t>(in, o, rows_out, W, factor, stream);
    else
      downsample_launch<scalar_t, int64_t>(in, o, rows_out, W, factor, stream);
  });
  return out;
}

at::Tensor latent_downsample_backward_cuda(const at::Tensor& grad_in, int64_t factor) {
  const auto out_shape = upsample_out_shape(grad_in, factor);
  TORCH_CHECK(grad_in.is_cuda(), "lwam::latent_downsample_backward (CUDA kernel): grad is on ", grad_in.device());
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty(out_shape, grad.options());
  if (out.numel() == 0) return out;
  const int64_t W = out.size(4);
  const int64_t rows_in = out.numel() / W;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "latent_downsample_backward_cuda", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (fits_int32(out.numel()))
      upsample_launch<scalar_t, int32_t>(g, o, rows_in, W, factor, stream);
    else
      upsample_launch<scalar_t, int64_t>(g, o, rows_in, W, factor, stream);
  });
  return out;
}

TORCH_LIBRARY_IMPL(lwam, CUDA, m) {
  m.impl("latent_downsample", &latent_downsample_cuda);
  m.impl("latent_downsample_backward", &latent_downsample_backward_cuda);
}

}  // namespace lwam
