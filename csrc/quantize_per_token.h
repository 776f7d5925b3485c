#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qla {

// Codes shared with qla_kernels/ops/cuda.py (_DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x: [M, K] row-major, q: [M, K] int8, scale: [M] fp32; all device pointers on `stream`'s device.
cudaError_t launch_quantize_per_token(const void* x, DType dtype, int8_t* q, float* scale,
                                      int64_t M, int64_t K, int bits, cudaStream_t stream);

}  // namespace qla
