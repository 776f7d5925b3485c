// Per-token symmetric activation quantization: one CUDA block per row.
//
// Numerics are DESIGN.md's, bit for bit with qla_kernels/ops/reference.py:
//   s = max(absmax(row), 1e-8) / qmax          (fp32, IEEE division: build without fast-math)
//   q = clamp(rint(x / s), -qmax - 1, qmax)    (round half to even)
// A non-finite value in a row makes its scale NaN/Inf (propagated, never hidden) and its q values 0
// where x / s is NaN, matching the reference's nan_to_num before the integer cast.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"
#include "quantize_per_token.h"

namespace qla {
namespace {

constexpr int kThreads = 256;
constexpr float kScaleEps = 1e-8f;

// fmaxf drops NaN; torch.amax keeps it. This keeps it.
__device__ __forceinline__ float nan_propagating_max(float a, float b) {
  return (isnan(a) || a > b) ? a : b;
}

__device__ float block_absmax(float local) {
  __shared__ float warp_max[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    local = nan_propagating_max(local, __shfl_xor_sync(0xffffffffu, local, offset));
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_max[warp] = local;
  __syncthreads();
  float result = warp_max[0];
  for (int w = 1; w < kThreads / 32; ++w) result = nan_propagating_max(result, warp_max[w]);
  return result;
}

template <typename T>
__global__ void quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                          float* __restrict__ scale, int64_t K, int qmax) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * K;
  int8_t* q_row = q + row * K;

  float local = 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    local = nan_propagating_max(local, fabsf(to_float(x_row[k])));
  }
  const float absmax = block_absmax(local);
  // clamp_min semantics of torch: NaN stays NaN.
  const float clamped = (isnan(absmax) || absmax > kScaleEps) ? absmax : kScaleEps;
  const float s = clamped / static_cast<float>(qmax);
  if (threadIdx.x == 0) scale[row] = s;

  const float lo = static_cast<float>(-qmax - 1);
  const float hi = static_cast<float>(qmax);
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const float v = to_float(x_row[k]) / s;
    const float r = isnan(v) ? 0.0f : fminf(fmaxf(rintf(v), lo), hi);
    q_row[k] = static_cast<int8_t>(r);
  }
}

}  // namespace

cudaError_t launch_quantize_per_token(const void* x, DType dtype, int8_t* q, float* scale,
                                      int64_t M, int64_t K, int bits, cudaStream_t stream) {
  const int qmax = (1 << (bits - 1)) - 1;
  const dim3 grid(static_cast<unsigned>(M));
  switch (dtype) {
    case DType::kFloat32:
      quantize_per_token_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(x), q, scale, K, qmax);
      break;
    case DType::kFloat16:
      quantize_per_token_kernel<__half><<<grid, kThreads, 0, stream>>>(
          static_cast<const __half*>(x), q, scale, K, qmax);
      break;
    case DType::kBFloat16:
      quantize_per_token_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), q, scale, K, qmax);
      break;
  }
  return cudaGetLastError();
}

}  // namespace qla
