// The x86-64 CPU kernels of qla_kernels._cpu: one table of entry points per instruction-set path,
// compiled in its own file with its own -m flags (isa_*.cpp) and chosen at run time by CPUID
// (module.cpp), so one build runs on any x86-64 machine.
//
// Weight panels (packed once at conversion, ops/cpu.py `pack_panels`): int8 [P, Q + 2, 16, 4] for
// P = ceil(N / 16) panels of 16 output columns and Q = ceil(K / 4) quads of 4 consecutive k:
// quad row q of panel p holds W[16p + c, 4q + j] at [c][j] (zero beyond N and K), so one 64-byte
// row is what `vpdpbusd` multiplies (16 columns x 4 k); row Q holds the 16 columns' int32 sums of
// W, row Q + 1 the panel's max |W| as an int32 at its start. Every path reads this one layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace qla_cpu {

constexpr int kPanelColumns = 16;
constexpr int kQuad = 4;
constexpr int kQuadRowBytes = kPanelColumns * kQuad;  // 64
// GEMM rows per task: a multiple of every MR, and of the AMX row tile (16), which walks it as 32 + 16.
constexpr int kBlockRows = 48;

// ops/reference.py ACTIVATIONS, in order.
enum Activation : int { kNone = 0, kGelu, kGeluTanh, kRelu, kQuickGelu, kSwiglu, kGeglu, kGegluTanh, kRelu6, kSilu };

inline bool is_gated(int activation) { return activation >= kSwiglu && activation <= kGegluTanh; }

// The Hadamard rotation y = (x ⊙ signs)·(H_m ⊗ H_P) of an fp32 row (quant/hadamard.py kernel_factors):
// the row [k = m·P] is m chunks of P (a power of two); every chunk gets an unnormalized fast
// Walsh-Hadamard transform (Sylvester order), then out chunk j = Σ_i dense[i, j] · chunk i (dense
// [m, m] the ±1 Paley matrix; m = 1 and dense = [[1]] when k is a power of two). The signs carry
// the normalization: ±1/√k.
struct Rotation {
  int64_t k = 0, m = 1, p = 0;
  const float* signs = nullptr;
  const float* dense = nullptr;
};

// One fused linear, every pointer already checked by ops/cpu.py. GEMM row m reads prepared A row m
// and writes output row `destination(m)`; T, X_c·W_cᵀ and the residual are read at that row.
struct Problem {
  int64_t rows = 0;       // GEMM rows M
  int64_t columns = 0;    // weight rows N (the output is N / 2 wide when gated)
  int64_t quads = 0;      // Q = ceil(K / 4)
  const int8_t* panels = nullptr;
  int64_t panel_bytes = 0;  // (Q + 2) * 64
  // Prepared A (u8 = code + 128, or int16), `a_row_bytes` apart; int32 offset per GEMM row that
  // multiplies colsum(W) out of the accumulator (128 for u8 rows, plus the activation zero point).
  const uint8_t* a = nullptr;
  int64_t a_row_bytes = 0;
  const int32_t* row_offset = nullptr;
  const float* a_scale = nullptr;  // per GEMM row
  const float* w_scale = nullptr;  // [N]
  const float* lowrank_t = nullptr;   // [out_rows, rank] fp32, row stride t_stride
  int64_t t_stride = 0;
  int64_t rank = 0;
  const float* lowrank_u_panels = nullptr;  // U by panel, [panels, rank, 16] fp32, zero beyond N
  const float* addend = nullptr;      // X_c·W_cᵀ [out_rows, N] fp32, row stride addend_stride
  int64_t addend_stride = 0;
  const float* bias = nullptr;        // [N] fp32
  int activation = kNone;
  const float* residual = nullptr;    // [out_rows, N_out] fp32
  int64_t residual_stride = 0;
  const int64_t* scatter = nullptr;   // destination row per GEMM row, or null (the identity)
  int64_t out_rows = 0;
  float* out = nullptr;               // [out_rows, N_out] fp32, or null when re-quantizing
  int64_t out_stride = 0;
  int8_t* out_q = nullptr;            // [out_rows, N_out] with out_scale [out_rows] (requant_bits)
  float* out_scale = nullptr;
  int requant_bits = 0;
  const Rotation* requant_rotation = nullptr;  // rotates each output row before its re-quantization
  // act(y + bias + residual) + T·Uᵀ + X_c·W_cᵀ instead of act(y + T·Uᵀ + X_c·W_cᵀ + bias) + residual
  // (never with a gated activation).
  bool residual_first = false;
  bool small_weights = false;  // every panel's max |W| <= 64: u8 x s8 pair sums fit int16 exactly

  int64_t output_columns() const { return is_gated(activation) ? columns / 2 : columns; }
  int64_t panels_count() const { return (columns + kPanelColumns - 1) / kPanelColumns; }
  int64_t destination(int64_t m) const {
    if (!scatter) return m;
    const int64_t d = scatter[m];
    return (d >= 0 && d < out_rows) ? d : -1;
  }
};

// Panel `panel`'s header rows (see the top of this file): its 16 column sums, and its max |W|.
inline const int8_t* panel_column_sums(const Problem& p, int64_t panel) {
  return p.panels + panel * p.panel_bytes + p.quads * kQuadRowBytes;
}

inline int32_t panel_max_abs(const Problem& p, int64_t panel) {
  int32_t value;
  std::memcpy(&value, panel_column_sums(p, panel) + kQuadRowBytes, sizeof(value));
  return value;
}

// Self-attention on rows as the q/k/v GEMMs wrote them (ops/cpu.py attention_rows): sequence s's
// token i, head h reads q + (s·tokens + i)·q_stride + h·head_dim (key and value alike, fp32, each
// head's values contiguous) and writes its context to out at (s·tokens + i)·out_stride + h·head_dim.
// `mask` (or null) is additive fp32, row i of (s, h) at mask + s·mask_sequence_stride +
// h·mask_head_stride + i·mask_row_stride, contiguous over the keys.
struct AttentionProblem {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t q_stride = 0, k_stride = 0, v_stride = 0;
  int64_t tokens = 0, heads = 0, head_dim = 0;
  float scale = 1.0f;
  const float* mask = nullptr;
  int64_t mask_sequence_stride = 0, mask_head_stride = 0, mask_row_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
};

// QLA's DW-separable down path (ops/cpu.py dwsep_down): per row of h (sequence s = row / tokens, token i):
// the first `prefix` tokens of a sequence bypass the conv; the others are pixels of a height × width
// grid, convolved depthwise with 3 × 3 taps (dw_weight [dim, 9]) or, on a 1 × width grid, with the
// middle row's 3 (dw_weight [dim, 3]), zero padded, plus dw_bias; then GELU (erf) and
// T = ·down_weightᵀ [dim → rank] + down_bias, written to out [rows, rank]. h is fp32, rows h_stride
// apart, each row's dim values contiguous; biases may be null. `token_mask` (or null), fp32
// [sequences, height·width], multiplies each grid token's values as the conv reads them.
struct DwsepProblem {
  const float* h = nullptr;
  int64_t h_stride = 0;
  int64_t tokens = 0, prefix = 0, height = 0, width = 0, dim = 0;
  const float* dw_weight = nullptr;
  int taps = 9;  // 9 (3 × 3) or 3 (the middle row, a 1-D conv)
  const float* dw_bias = nullptr;
  const float* down_weight = nullptr;  // [rank, dim]
  const float* down_bias = nullptr;
  const float* token_mask = nullptr;
  int64_t rank = 0;
  float* out = nullptr;
};

// Rows of a rotation (ops/cpu.py hadamard_rotate): x rows x_stride apart, out [rows, k] contiguous.
struct RotateProblem {
  Rotation rotation;
  const float* x = nullptr;
  int64_t x_stride = 0;
  float* out = nullptr;
};

struct IsaKernels {
  const char* name;
  // Whether prepared A rows are int16 (else u8) for this problem.
  bool (*wide_rows)(const Problem&);
  // Rows [m0, m1) of the GEMM, panels [p0, p1): the dequantized sum plus T·Uᵀ, X_c·W_cᵀ and bias;
  // then, unless the activation is gated, the activation and residual. Written to `y` (row m at
  // y + (m - y_row0) * y_stride, column n at n) when given, else to the fp32 output.
  void (*tile_block)(const Problem&, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y, int64_t y_row0,
                     int64_t y_stride);
  // For whole rows the tile stage left in y: the gated activation and residual, then the fp32 store
  // or the per-token re-quantization.
  void (*finish_rows)(const Problem&, int64_t m0, int64_t m1, const float* y, int64_t y_row0, int64_t y_stride);
  // Per-token quantization of fp32 rows, rotated first by `rotation` when it is given (in a row
  // buffer: no rotated copy of x is written): scale = max(absmax, 1e-8) / qmax (or the static
  // scale), q = clamp(rint(x / scale) + z) with NaN codes 0; with `subtract_zero`, q - z is stored.
  void (*quantize_rows)(const float* x, int64_t x_stride, int64_t m0, int64_t m1, int64_t k, int bits,
                        const float* static_scale, int zero_point, bool has_zero, bool subtract_zero,
                        const Rotation* rotation, int8_t* q, float* scale);
  // LayerNorm (kind 1) or RMSNorm (kind 2) of fp32 rows [m0, m1) over k in fp32 (mean, then the
  // mean square of the centered values), times weight, plus bias (either may be null), into
  // `normed`; with bits > 0 also quantize_rows of the normalized rows (rotated by `rotation` when
  // given; `normed` stays unrotated) into q and scale.
  void (*normalize_rows)(const float* x, int64_t m0, int64_t m1, int64_t k, int kind, const float* weight,
                         const float* bias, float eps, float* normed, int bits, const float* static_scale,
                         int zero_point, bool has_zero, bool subtract_zero, const Rotation* rotation, int8_t* q,
                         float* scale);
  // W4A16 at few rows, columns [n0, n1) of out [rows, out_stride]: out[m, n] = Σ_g s[n, g]·Σ_{k in g}
  // x[m, k]·(q[n, k] − z[n, g]), reading each weight byte once for all rows (x [rows, k] fp32,
  // contiguous; each call deinterleaves its copy for the nibble lanes). `rounding` 1 / 2:
  // the activations were fp16 / bf16, and each weight is rounded to that dtype (the reference's W4A16).
  void (*w4a16_rows)(const float* x, int64_t rows, int64_t k, const uint8_t* weight,
                     const float* scale, const uint8_t* zero, int64_t group, int rounding, int64_t n0, int64_t n1,
                     float* out,
                     int64_t out_stride);
  // Heads [task0, task1) of the sequences × heads of `p` (task t: sequence t / heads, head t % heads):
  // softmax(q·kᵀ·scale + mask)·v with fp32 sums; a query row whose every key is masked (−inf)
  // gets zeros, as torch's scaled_dot_product_attention gives it.
  void (*attention_heads)(const AttentionProblem& p, int64_t task0, int64_t task1);
  // Rows [row0, row1) of a DW-separable down path (DwsepProblem).
  void (*dwsep_rows)(const DwsepProblem& p, int64_t row0, int64_t row1);
  // t[m, j] = Σ_k x[m, k]·a_t[j, k] for rows [m0, m1) (t [rows, rank]): a pre-op's down-projection
  // T = x·A (a_t = Aᵀ) on rows it has just normalized or read, while they are in cache.
  void (*project_rows)(const float* x, int64_t x_stride, int64_t m0, int64_t m1, int64_t k, const float* a_t,
                       int64_t rank, float* t);
  // Rows [row0, row1) of a Hadamard rotation (RotateProblem).
  void (*rotate_rows)(const RotateProblem& p, int64_t row0, int64_t row1);
};

// Gathers and converts int8 activation rows [m0, m1) into the prepared layout (shared by every path).
void prepare_rows(const int8_t* a, int64_t a_stride, int64_t a_rows, const int64_t* gather, int64_t k,
                  int64_t quads, bool wide, int64_t m0, int64_t m1, uint8_t* out, int64_t out_row_bytes);

const IsaKernels* avx2_kernels();
const IsaKernels* avx_vnni_kernels();
const IsaKernels* avx512_vnni_kernels();
#ifndef QLA_CPU_NO_AMX
const IsaKernels* amx_int8_kernels();
#endif

}  // namespace qla_cpu
