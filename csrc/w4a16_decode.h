#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "quantize_per_token.h"

namespace qla {

// The decode regime of the W4A16 fused linear (M <= 16 rows):
//   out = x · dequant(W)ᵀ + T·Uᵀ + bias + residual,   dequant(W)[n, k] = (q[n, k] − z[n, g]) · s[n, g]
// with every floating-point operand in the activation dtype (fp16 or bf16) and fp32 accumulation.
// The weight is formats/weights.py's "uint4_asym_groups" layout as stored (no repacking):
// q uint8 [N, K/2] (k = 2j in the low nibble of byte j), s fp32 [N, K/G], z uint8 [N, K/G].
struct W4A16DecodeArgs {
  const void* x;          // [M, K], 16-byte aligned
  const uint8_t* weight;  // [N, K/2], 16-byte aligned
  const float* scale;     // [N, K/G]
  const uint8_t* zero;    // [N, K/G]
  const void* lowrank_t;  // [M, rank] or null
  const void* lowrank_u;  // [N, rank] or null
  const void* bias;       // [N] or null
  const void* residual;   // [M, N] or null
  void* out;              // [M, N], in the activation dtype or (out_fp32) in fp32
  float* workspace;       // [splits, M, N] fp32 partial sums; unused when splits == 1
  int64_t M, N, K, group_size, rank;
  int splits;             // K is cut into `splits` ranges of `chunks_per_split` 128-wide chunks
  int chunks_per_split;
  DType dtype;            // kFloat16 or kBFloat16
  bool out_fp32;          // store y unrounded: a gated activation after the kernel runs in fp32
};

// Requirements (checked by the binding): 1 <= M <= 16, K % 128 == 0, group_size % 32 == 0 and
// divides K, every split non-empty, chunks_per_split * 128 * (M <= 8 ? 8 : 16) <= kDecodeMaxStagedValues.
constexpr int64_t kDecodeMaxStagedValues = 16384;

cudaError_t launch_w4a16_decode(const W4A16DecodeArgs& args, cudaStream_t stream);

}  // namespace qla
