// W4A16 decode GEMM for M <= 16 rows: memory-bound, so every design choice serves one goal, streaming
// the int4 weight from DRAM exactly once at full bandwidth, with tensor cores doing the arithmetic.
//
// Work split. A block is 4 warps; each warp owns 16 output columns (two m16n8k16 tiles) and the
// block's K range, which is one of `splits` slices of K (split-K: decode has too few columns to
// fill the GPU otherwise). Splits write fp32 partial sums that a second kernel adds in a fixed
// order (deterministic) before the epilogue; with one split the epilogue runs in the GEMM kernel.
//
// Weights. Each lane loads 16 bytes per 128-wide K chunk for each of its two columns: 32
// consecutive k of one row, straight from the stored [N, K/2] layout (no repacking), so every
// warp load reads 8 rows × 64 contiguous bytes. A sum over k does not care which k meets which
// in an mma, so the kernel feeds the mma's k slots in the order the bits come out of a word:
// `(word >> 4i) & 0x000F000F` puts nibbles i and i+4 in the two halves of a register, and OR-ing
// in the exponent of 1024 (fp16) or 128 (bf16) turns them into 1024 + q without a conversion
// instruction. Subtracting 1024 + z is exact; the scale multiply is the one rounding.
//
// Activations. The block's x slice [≤16 rows, K range] is staged once in shared memory with each
// 8-element group stored as (x0,x4,x1,x5,x2,x6,x3,x7), the k order the weight nibbles arrive in,
// so one 16-byte shared load gives a lane its A fragments for two mma steps. The 16-byte unit
// index is XOR-swizzled and rows are padded to an odd unit count, so the 8 lanes of each
// shared-memory phase hit 8 distinct bank groups. With M <= 8 only 8 rows are staged and the
// upper half of each A fragment is zero.
//
// Numerics: products in the mma are exact, accumulation is fp32. fp16 multiplies (q − z) by the
// scale rounded to fp16 (one extra rounding of at most 2^-11 relative); bf16, whose 8-bit
// mantissa would bias a whole group, multiplies in fp32 and rounds once, as the reference does.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"
#include "w4a16_decode.h"

namespace qla {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpN = 16;
constexpr int kBlockN = kWarps * kWarpN;
constexpr int kChunkK = 128;
constexpr int kUnitsPerChunk = kChunkK / 8;  // 16-byte units of 8 activations
constexpr int kReduceThreads = 256;

__device__ __forceinline__ uint32_t component(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Bank-conflict-free placement of a 16-byte unit within its staged row (see the header comment).
__device__ __forceinline__ int swizzle(int unit) { return unit ^ (((unit >> 3) & 1) << 1); }

template <typename Act>
struct Dequant;

template <>
struct Dequant<__half> {
  __half2 offset;  // 1024 + z
  __half2 scale;
  __device__ __forceinline__ Dequant(uint32_t zero, float s)
      : offset(__float2half2_rn(1024.0f + static_cast<float>(zero))), scale(__float2half2_rn(s)) {}
  // Nibbles i and i + 4 of `word`, dequantized, as an fp16x2 register (nibble i in the low half).
  __device__ __forceinline__ uint32_t pair(uint32_t word, int i) const {
    const uint32_t biased = ((word >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
    const __half2 value = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&biased), offset), scale);
    return *reinterpret_cast<const uint32_t*>(&value);
  }
};

template <>
struct Dequant<__nv_bfloat16> {
  __nv_bfloat162 offset;  // 128 + z
  float scale;
  __device__ __forceinline__ Dequant(uint32_t zero, float s)
      : offset(__float2bfloat162_rn(128.0f + static_cast<float>(zero))), scale(s) {}
  __device__ __forceinline__ uint32_t pair(uint32_t word, int i) const {
    const uint32_t biased = ((word >> (4 * i)) & 0x000F000Fu) | 0x43004300u;
    const float2 centered = __bfloat1622float2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased), offset));
    const __nv_bfloat162 value = __floats2bfloat162_rn(centered.x * scale, centered.y * scale);
    return *reinterpret_cast<const uint32_t*>(&value);
  }
};

template <typename Act>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Streamed once: keep it out of L1 so the staged activations and scales stay there.
__device__ __forceinline__ uint4 load_streaming(const uint4* address) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

// One lane's weights for one 128-wide K chunk: 32 codes and their group's scale and zero, for
// each of its two columns.
struct ChunkWeights {
  uint4 codes[2];
  float scale[2];
  uint32_t zero[2];
};

__device__ __forceinline__ ChunkWeights load_chunk(const W4A16DecodeArgs& args, const int64_t (&column)[2], int64_t k) {
  ChunkWeights chunk;
  const int64_t groups = args.K / args.group_size;
  const int64_t group = k / args.group_size;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (column[j] < args.N) {
      chunk.codes[j] = load_streaming(reinterpret_cast<const uint4*>(args.weight + column[j] * (args.K / 2) + k / 2));
      chunk.scale[j] = __ldg(args.scale + column[j] * groups + group);
      chunk.zero[j] = __ldg(args.zero + column[j] * groups + group);
    } else {
      chunk.codes[j] = make_uint4(0, 0, 0, 0);
      chunk.scale[j] = 0.0f;
      chunk.zero[j] = 0;
    }
  }
  return chunk;
}

// y (the fp32 GEMM result for row m, column n) + T·Uᵀ + bias + residual, stored in Act (or in fp32
// for a gated activation applied after the kernel); the order of the additions is the reference
// epilogue's.
template <typename Act>
__device__ __forceinline__ void finish(const W4A16DecodeArgs& args, int64_t m, int64_t n, float y) {
  if (args.lowrank_t != nullptr) {
    const Act* t = static_cast<const Act*>(args.lowrank_t) + m * args.rank;
    const Act* u = static_cast<const Act*>(args.lowrank_u) + n * args.rank;
    float lowrank = 0.0f;
    for (int64_t r = 0; r < args.rank; ++r) lowrank = fmaf(to_float(t[r]), to_float(u[r]), lowrank);
    y += lowrank;
  }
  if (args.bias != nullptr) y += to_float(static_cast<const Act*>(args.bias)[n]);
  if (args.residual != nullptr) y += to_float(static_cast<const Act*>(args.residual)[m * args.N + n]);
  if (args.out_fp32) {
    static_cast<float*>(args.out)[m * args.N + n] = y;
  } else {
    static_cast<Act*>(args.out)[m * args.N + n] = from_float<Act>(y);
  }
}

template <typename Act, bool kSixteenRows>
__global__ void __launch_bounds__(kThreads) w4a16_decode_kernel(const W4A16DecodeArgs args) {
  constexpr int kStagedRows = kSixteenRows ? 16 : 8;
  extern __shared__ uint4 staged[];  // [kStagedRows][row_stride] units

  const int split = blockIdx.y;
  const int64_t first_chunk = static_cast<int64_t>(split) * args.chunks_per_split;
  const int chunks = static_cast<int>(min(static_cast<int64_t>(args.chunks_per_split), args.K / kChunkK - first_chunk));
  const int64_t k_begin = first_chunk * kChunkK;
  const int units = chunks * kUnitsPerChunk;
  const int row_stride = args.chunks_per_split * kUnitsPerChunk + 1;

  const Act* x = static_cast<const Act*>(args.x);
  for (int index = threadIdx.x; index < kStagedRows * units; index += kThreads) {
    const int m = index / units;
    const int unit = index - m * units;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (m < args.M) v = *reinterpret_cast<const uint4*>(x + m * args.K + k_begin + unit * 8);
    uint4 permuted;  // (x0,x1 | x2,x3 | x4,x5 | x6,x7) -> (x0,x4 | x1,x5 | x2,x6 | x3,x7)
    permuted.x = __byte_perm(v.x, v.z, 0x5410);
    permuted.y = __byte_perm(v.x, v.z, 0x7632);
    permuted.z = __byte_perm(v.y, v.w, 0x5410);
    permuted.w = __byte_perm(v.y, v.w, 0x7632);
    staged[m * row_stride + swizzle(unit)] = permuted;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group_id = lane / 4;        // the mma's row of A / column of B
  const int thread_in_group = lane % 4;  // selects the lane's 32 consecutive k of each chunk
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kBlockN + warp * kWarpN;
  const int64_t column[2] = {n_base + group_id, n_base + 8 + group_id};
  const uint4* a_low = staged + group_id * row_stride;
  const uint4* a_high = staged + (group_id + 8) * row_stride;

  float acc[2][4] = {};
  ChunkWeights current = load_chunk(args, column, k_begin + 32 * thread_in_group);
  for (int c = 0; c < chunks; ++c) {
    ChunkWeights next = current;
    if (c + 1 < chunks) next = load_chunk(args, column, k_begin + (c + 1) * kChunkK + 32 * thread_in_group);
    const Dequant<Act> dequant[2] = {Dequant<Act>(current.zero[0], current.scale[0]),
                                     Dequant<Act>(current.zero[1], current.scale[1])};
#pragma unroll
    for (int w = 0; w < 4; ++w) {  // word w holds k = 8w .. 8w + 7 of the lane's 32
      const int unit = swizzle(c * kUnitsPerChunk + 4 * thread_in_group + w);
      const uint4 low = a_low[unit];
      const uint4 high = kSixteenRows ? a_high[unit] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // mma step h consumes nibbles {2h, 2h+4} and {2h+1, 2h+5}
        const uint32_t a[4] = {h ? low.z : low.x, h ? high.z : high.x, h ? low.w : low.y, h ? high.w : high.y};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const uint32_t word = component(current.codes[j], w);
          mma_m16n8k16<Act>(acc[j], a, dequant[j].pair(word, 2 * h), dequant[j].pair(word, 2 * h + 1));
        }
      }
    }
    current = next;
  }

#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = group_id + (e >= 2 ? 8 : 0);
      const int64_t n = n_base + 8 * j + 2 * thread_in_group + (e & 1);
      if (m >= args.M || n >= args.N) continue;
      if (args.splits == 1) {
        finish<Act>(args, m, n, acc[j][e]);
      } else {
        args.workspace[(static_cast<int64_t>(split) * args.M + m) * args.N + n] = acc[j][e];
      }
    }
  }
}

template <typename Act>
__global__ void __launch_bounds__(kReduceThreads) w4a16_reduce_kernel(const W4A16DecodeArgs args) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  const int64_t elements = args.M * args.N;
  if (index >= elements) return;
  float y = 0.0f;
  for (int s = 0; s < args.splits; ++s) y += args.workspace[s * elements + index];
  finish<Act>(args, index / args.N, index % args.N, y);
}

template <typename Act>
cudaError_t launch(const W4A16DecodeArgs& args, cudaStream_t stream) {
  const bool sixteen_rows = args.M > 8;
  const size_t staged_bytes =
      (sixteen_rows ? 16 : 8) * (static_cast<size_t>(args.chunks_per_split) * kUnitsPerChunk + 1) * sizeof(uint4);
  const dim3 grid(static_cast<unsigned>((args.N + kBlockN - 1) / kBlockN), static_cast<unsigned>(args.splits));
  if (sixteen_rows) {
    w4a16_decode_kernel<Act, true><<<grid, kThreads, staged_bytes, stream>>>(args);
  } else {
    w4a16_decode_kernel<Act, false><<<grid, kThreads, staged_bytes, stream>>>(args);
  }
  if (args.splits > 1) {
    const int64_t elements = args.M * args.N;
    const unsigned blocks = static_cast<unsigned>((elements + kReduceThreads - 1) / kReduceThreads);
    w4a16_reduce_kernel<Act><<<blocks, kReduceThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_w4a16_decode(const W4A16DecodeArgs& args, cudaStream_t stream) {
  return args.dtype == DType::kFloat16 ? launch<__half>(args, stream) : launch<__nv_bfloat16>(args, stream);
}

}  // namespace qla
