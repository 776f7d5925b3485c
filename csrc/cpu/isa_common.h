// What every instruction-set path shares: the epilogue, the row stage and the per-token quantizer,
// written as plain loops that each isa_*.cpp compiles (auto-vectorized) with its own -m flags, and
// the driver that walks a block of tiles with that file's micro-kernel. Included once per ISA file,
// after that file defines `Micro` (see isa_avx2.cpp); everything here has internal linkage, so the
// AVX-512 build of a function can never be linked into the AVX2 path.
//
// Numerics (ops/reference.py): the int32 accumulator is exact; y = float(acc - offset·colsum) ·
// s_x[m] · s_w[n] in that order, bit for bit the reference's; every later term in fp32. Files are
// compiled with -ffp-contract=off so that no multiply-add is fused behind the reference's back.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace qla_cpu {
namespace {

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline int64_t load_i64(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// One tile row's 16 int32 sums from two 8-lane halves (the 256-bit kernels).
inline void store_panel_sums(int32_t* out, __m256i low, __m256i high) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), low);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), high);
}

// A vector register's fp32 lanes as one value (a GCC / Clang vector), 16 in the AVX-512 files and 8
// in the others, whatever the compiler's unrolling of a short loop would have made of it. (A
// 16-lane value in AVX2 code passes through memory: 4x slower, measured; 8-lane halves written
// where AVX-512 code then reads whole 16-lane rows stall store forwarding: 2x slower.)
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

inline Lanes broadcast_lanes(float x) {
#ifdef __AVX512F__
  return _mm512_set1_ps(x);
#else
  return _mm256_set1_ps(x);
#endif
}

// a·b + c with one rounding, for the sums whose order is ours, not a reference's (attention, T·Uᵀ:
// compared within a bound, never bit for bit): faster and closer than a multiply and an add.
inline Lanes multiply_add(Lanes a, Lanes b, Lanes c) {
#ifdef __AVX512F__
  return _mm512_fmadd_ps(a, b, c);
#else
  return _mm256_fmadd_ps(a, b, c);
#endif
}

inline float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The activations and softmax's exp, on whole vectors of lanes (explicit intrinsics: GCC vectorized
// the scalar forms, but their divisions became `vdivps`, which issues once per 8-16 cycles: GELU was
// then 1.18 ms of MiniLM fc1's 2.2; a reciprocal estimate and one Newton step cost three
// instructions). Every element of a row goes through these vector forms, its tail in a padded
// vector (`apply_lanes`), so a value's result does not depend on where a tile or thread split falls.
typedef int32_t IntLanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Lanes int_bits_as_lanes(IntLanes bits) {
  Lanes v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline IntLanes lanes_as_int_bits(Lanes v) {
  IntLanes bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

inline Lanes floor_lanes(Lanes x) {
#ifdef __AVX512F__
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  return _mm256_floor_ps(x);
#endif
}

// rint in the current rounding mode (std::nearbyint's).
inline Lanes nearbyint_lanes(Lanes x) {
#ifdef __AVX512F__
  return _mm512_roundscale_ps(x, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
#else
  return _mm256_round_ps(x, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
#endif
}

inline Lanes abs_lanes(Lanes x) { return int_bits_as_lanes(lanes_as_int_bits(x) & 0x7fffffff); }

// 1 / d to about 2 ulps (NaN for d = ±0 or ±inf, which no caller passes a finite input to).
inline Lanes reciprocal_lanes(Lanes d) {
#ifdef __AVX512F__
  const Lanes r = _mm512_rcp14_ps(d);
#else
  const Lanes r = _mm256_rcp_ps(d);
#endif
  const Lanes one = broadcast_lanes(1.0f);
  return multiply_add(r, multiply_add(-d, r, one), r);
}

inline Lanes max_lanes(Lanes a, Lanes b) {  // b where either is NaN (`vmaxps`)
#ifdef __AVX512F__
  return _mm512_max_ps(a, b);
#else
  return _mm256_max_ps(a, b);
#endif
}

inline Lanes min_lanes(Lanes a, Lanes b) {  // b where either is NaN
#ifdef __AVX512F__
  return _mm512_min_ps(a, b);
#else
  return _mm256_min_ps(a, b);
#endif
}

// exp(x) for x in [-80, 80] or NaN (Cephes' expf polynomial after reduction by ln 2, about 1 ulp).
// Callers clamp: every one adds the result to 1 (or scales it to nothing) beyond that range, and
// no result becomes subnormal or overflows to inf, each of which costs a microcode assist
// (measured: 5x the time of quick_gelu when a third of its inputs overflowed).
inline Lanes exp_in_range(Lanes x) {
  const Lanes n = floor_lanes(multiply_add(x, broadcast_lanes(1.44269504088896341f), broadcast_lanes(0.5f)));
  Lanes r = multiply_add(n, broadcast_lanes(-0.693359375f), x);
  r = multiply_add(n, broadcast_lanes(2.12194440e-4f), r);
  Lanes p = broadcast_lanes(1.9875691500e-4f);
  p = multiply_add(p, r, broadcast_lanes(1.3981999507e-3f));
  p = multiply_add(p, r, broadcast_lanes(8.3334519073e-3f));
  p = multiply_add(p, r, broadcast_lanes(4.1665795894e-2f));
  p = multiply_add(p, r, broadcast_lanes(1.6666665459e-1f));
  p = multiply_add(p, r, broadcast_lanes(5.0000001201e-1f));
  const Lanes y = multiply_add(p, r * r, r) + broadcast_lanes(1.0f);
#ifdef __AVX512F__
  return _mm512_scalef_ps(y, n);
#else
  return y * int_bits_as_lanes((__builtin_convertvector(n, IntLanes) + 127) << 23);
#endif
}

// exp(x) clamped to [-80, 80]; NaN stays NaN.
inline Lanes exp_lanes(Lanes x) {
  return exp_in_range(min_lanes(broadcast_lanes(80.0f), max_lanes(broadcast_lanes(-80.0f), x)));
}

// GELU(x) = 0.5·x·(1 + erf(x/√2)) = max(x, 0) − |x|·erfc(|x|/√2)/2 (erfc's form, so that 1 + erf(x)
// does not cancel in the negative tail), erfc(z) = 1 / (1 + a1·z + … + a6·z⁶)¹⁶ by Abramowitz &
// Stegun 7.1.28 (absolute error below 3e-7): a polynomial, four squarings and a reciprocal estimate
// with a Newton step, 18 vector operations where 7.1.26 (ATen's vectorized erf: t·P(t)·exp(−z²))
// took 31. GELU's absolute error: 7.1e-7 at most against erf in double, 3.3e-7 with 7.1.26
// (measured over [-12, 12] in 2^20 steps); GELU 33% faster (AVX-512) and 38% (AVX2): it was 40% of
// MiniLM fc1's time with its epilogue, and most of QLA's DW-separable path. z is clamped to 9 (erfc(9) ≈ 4e-37), so
// the power stays finite and normal: no infinity into the Newton step, no subnormal assists;
// below x ≈ −12.7 GELU is then a normal number of size |x|·1e-28 instead of zero. NaN stays NaN
// (the min keeps it), ±inf give non-finite results as torch's do.
inline Lanes gelu_lanes(Lanes x) {
  const Lanes magnitude = abs_lanes(x);
  const Lanes z = min_lanes(broadcast_lanes(9.0f), magnitude * broadcast_lanes(0.707106781186547524f));
  Lanes p = broadcast_lanes(0.0000430638f);
  p = multiply_add(p, z, broadcast_lanes(0.0002765672f));
  p = multiply_add(p, z, broadcast_lanes(0.0001520143f));
  p = multiply_add(p, z, broadcast_lanes(0.0092705272f));
  p = multiply_add(p, z, broadcast_lanes(0.0422820123f));
  p = multiply_add(p, z, broadcast_lanes(0.0705230784f));
  p = multiply_add(p, z, broadcast_lanes(1.0f));
  p = p * p;
  p = p * p;
  p = p * p;
  p = p * p;
  const Lanes half_erfc = reciprocal_lanes(p + p);
  return multiply_add(-magnitude, half_erfc, max_lanes(broadcast_lanes(0.0f), x));
}

// x·σ(k·x) = x / (1 + exp(−k·x)): SiLU (k = 1), QuickGELU (k = 1.702).
inline Lanes sigmoid_gate_lanes(Lanes x, Lanes k) {
  return x * reciprocal_lanes(broadcast_lanes(1.0f) + exp_lanes(-(k * x)));
}

// 0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)·(x + 0.044715·x³)
inline Lanes gelu_tanh_lanes(Lanes x) {
  const Lanes u = broadcast_lanes(0.797884560802865355f) * (x + broadcast_lanes(0.044715f) * x * x * x);
  return x * reciprocal_lanes(broadcast_lanes(1.0f) + exp_lanes(broadcast_lanes(-2.0f) * u));
}

// f over n values, whole vectors and then the tail in a padded one.
template <class F>
inline void apply_lanes(const float* in, float* out, int64_t n, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_lanes(out + i, f(load_lanes(in + i), i));
  if (i < n) {
    alignas(64) float tail[kLanes] = {};
    std::memcpy(tail, in + i, sizeof(float) * (n - i));
    store_lanes(tail, f(load_lanes(tail), i));
    std::memcpy(out + i, tail, sizeof(float) * (n - i));
  }
}

// act over n values in place (not gated).
inline void activate(float* y, int64_t n, int activation) {
  const Lanes zero = broadcast_lanes(0.0f), six = broadcast_lanes(6.0f);
  switch (activation) {
    case kGelu: apply_lanes(y, y, n, [](Lanes x, int64_t) { return gelu_lanes(x); }); break;
    case kGeluTanh: apply_lanes(y, y, n, [](Lanes x, int64_t) { return gelu_tanh_lanes(x); }); break;
    case kQuickGelu:
      apply_lanes(y, y, n, [](Lanes x, int64_t) { return sigmoid_gate_lanes(x, broadcast_lanes(1.702f)); });
      break;
    case kSilu:
      apply_lanes(y, y, n, [](Lanes x, int64_t) { return sigmoid_gate_lanes(x, broadcast_lanes(1.0f)); });
      break;
    // NaN propagates through ReLU and ReLU6, as through torch's (x > 0 and x < 0 are false for NaN).
    case kRelu: apply_lanes(y, y, n, [&](Lanes x, int64_t) { return x < zero ? zero : x; }); break;
    case kRelu6:
      apply_lanes(y, y, n, [&](Lanes x, int64_t) {
        x = x < zero ? zero : x;
        return x > six ? six : x;
      });
      break;
    default: break;
  }
}

// act(gate)·up for n outputs.
inline void activate_gated(const float* gate, const float* up, float* out, int64_t n, int activation) {
  apply_lanes(gate, out, n, [&](Lanes x, int64_t i) {
    Lanes u;
    if (i + kLanes <= n) {
      u = load_lanes(up + i);
    } else {
      alignas(64) float tail[kLanes] = {};
      std::memcpy(tail, up + i, sizeof(float) * (n - i));
      u = load_lanes(tail);
    }
    switch (activation) {
      case kSwiglu: return sigmoid_gate_lanes(x, broadcast_lanes(1.0f)) * u;
      case kGeglu: return gelu_lanes(x) * u;
      default: return gelu_tanh_lanes(x) * u;
    }
  });
}

// ---- The Hadamard rotation (Rotation; IsaKernels::rotate_rows, and before a per-token quantization) ----
//
// Every step is exact or one rounding of the same value on every path: x·(±1/√K) rounds once; a
// butterfly rounds a + b and a − b (in registers v[j ^ h] ± v[j], the same sums); the Paley stage
// sums ±v over the chunks in chunk order from zero, each term exact, by FMA or by the scalar
// add. So every instruction-set path (and lane width, and thread count) gives the same bits.


// The butterflies of the strides below kLanes on one register of values: lane j becomes
// v[j ^ h] ± v[j] (+ for the pair's first lane).
inline Lanes walsh_hadamard_lanes(Lanes v) {
#ifdef __AVX512F__
  const IntLanes swap1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  const IntLanes swap2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const IntLanes swap4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  const IntLanes swap8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const Lanes sign1 = {1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1};
  const Lanes sign2 = {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1};
  const Lanes sign4 = {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1};
  const Lanes sign8 = {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1};
  v = multiply_add(v, sign1, __builtin_shuffle(v, swap1));
  v = multiply_add(v, sign2, __builtin_shuffle(v, swap2));
  v = multiply_add(v, sign4, __builtin_shuffle(v, swap4));
  return multiply_add(v, sign8, __builtin_shuffle(v, swap8));
#else
  const IntLanes swap1 = {1, 0, 3, 2, 5, 4, 7, 6};
  const IntLanes swap2 = {2, 3, 0, 1, 6, 7, 4, 5};
  const IntLanes swap4 = {4, 5, 6, 7, 0, 1, 2, 3};
  const Lanes sign1 = {1, -1, 1, -1, 1, -1, 1, -1};
  const Lanes sign2 = {1, 1, -1, -1, 1, 1, -1, -1};
  const Lanes sign4 = {1, 1, 1, 1, -1, -1, -1, -1};
  v = multiply_add(v, sign1, __builtin_shuffle(v, swap1));
  v = multiply_add(v, sign2, __builtin_shuffle(v, swap2));
  return multiply_add(v, sign4, __builtin_shuffle(v, swap4));
#endif
}

// One row: out = x·R (Rotation), through `scratch` [k]; out may be x.
void rotate_row(const Rotation& p, const float* x, float* out, float* scratch) {
  const int64_t chunk = p.p;
  float* v = p.m == 1 ? out : scratch;
  if (chunk % kLanes != 0) {  // short chunks: the same sums one value at a time
    for (int64_t i = 0; i < p.k; ++i) v[i] = x[i] * p.signs[i];
    for (int64_t h = 1; h < chunk; h *= 2)
      for (int64_t i = 0; i < p.k; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
    if (p.m == 1) return;
    for (int64_t j = 0; j < p.m; ++j)
      for (int64_t t = 0; t < chunk; ++t) {
        float sum = 0.0f;
        for (int64_t i = 0; i < p.m; ++i) sum += p.dense[i * p.m + j] * v[i * chunk + t];
        out[j * chunk + t] = sum;
      }
    return;
  }
  for (int64_t i = 0; i < p.k; i += kLanes)
    store_lanes(v + i, walsh_hadamard_lanes(load_lanes(x + i) * load_lanes(p.signs + i)));
  for (int64_t h = kLanes; h < chunk; h *= 2)
    for (int64_t i = 0; i < p.k; i += 2 * h)
      for (int64_t j = i; j < i + h; j += kLanes) {
        const Lanes a = load_lanes(v + j), b = load_lanes(v + j + h);
        store_lanes(v + j, a + b);
        store_lanes(v + j + h, a - b);
      }
  if (p.m == 1) return;
  // out chunk j = Σ_i dense[i, j]·chunk i: four output chunks at a time per register of lanes.
  for (int64_t t = 0; t < chunk; t += kLanes) {
    const float* column = v + t;
    int64_t j = 0;
    for (; j + 4 <= p.m; j += 4) {
      Lanes s0 = {}, s1 = {}, s2 = {}, s3 = {};
      const float* w = p.dense + j;
      for (int64_t i = 0; i < p.m; ++i, w += p.m) {
        const Lanes value = load_lanes(column + i * chunk);
        s0 = multiply_add(value, broadcast_lanes(w[0]), s0);
        s1 = multiply_add(value, broadcast_lanes(w[1]), s1);
        s2 = multiply_add(value, broadcast_lanes(w[2]), s2);
        s3 = multiply_add(value, broadcast_lanes(w[3]), s3);
      }
      store_lanes(out + j * chunk + t, s0);
      store_lanes(out + (j + 1) * chunk + t, s1);
      store_lanes(out + (j + 2) * chunk + t, s2);
      store_lanes(out + (j + 3) * chunk + t, s3);
    }
    for (; j < p.m; ++j) {
      Lanes sum = {};
      for (int64_t i = 0; i < p.m; ++i)
        sum = multiply_add(load_lanes(column + i * chunk), broadcast_lanes(p.dense[i * p.m + j]), sum);
      store_lanes(out + j * chunk + t, sum);
    }
  }
}

void rotate_rows_impl(const RotateProblem& p, int64_t row0, int64_t row1) {
  std::vector<float> scratch(static_cast<size_t>(p.rotation.k));
  for (int64_t r = row0; r < row1; ++r)
    rotate_row(p.rotation, p.x + r * p.x_stride, p.out + r * p.rotation.k, scratch.data());
}

// Whether any lane of `distance` is at least its `threshold`, or of t NaN.
inline bool any_at_least_or_nan(Lanes distance, Lanes threshold, Lanes t) {
#ifdef __AVX512F__
  return (_mm512_cmp_ps_mask(distance, threshold, _CMP_GE_OQ) | _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q)) != 0;
#else
  return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(distance, threshold, _CMP_GE_OQ),
                                         _mm256_cmp_ps(t, t, _CMP_UNORD_Q))) != 0;
#endif
}

// Integer-valued lanes in [-128, 127] as int8 at q (packing instructions: GCC's generic
// conversion extracted each lane through a general register, 2.5x slower than the division).
inline void store_codes(int8_t* q, Lanes c) {
#ifdef __AVX512F__
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c)));
#else
  const __m256i ints = _mm256_cvttps_epi32(c);
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(ints), _mm256_extracti128_si256(ints, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(words, words));
#endif
}

// Codes clamp(rint(v / scale) + z, lo, hi), NaN → 0 (primitives.quantize_with_scale), bit for bit.
// A division issues once per 5-16 cycles (`vdivps`), so the lanes round t = v·(1/s) instead: t is
// within 3·2^-24·|v/s| of the rounded quotient fl(v/s) (two roundings here, one there, each at
// most 2^-24 relative), so where t is farther than 2^-20·|t| from every k + 1/2, rint(t) =
// rint(fl(v/s)). A vector with a lane nearer (about 2^-19·|t| of lanes: 1 in 10⁴ at |t| ≈ 50), or
// a NaN, divides; a scale or reciprocal that is not normal (static scales can be anything)
// divides throughout. Infinities clamp alike either way.
inline void quantize_values(const float* v, int64_t n, float scale, float zero, float lo, float hi, bool subtract,
                            int8_t* q) {
  auto code = [&](float c) {
    c = std::min(std::max(c + zero, lo), hi);
    c = c != c ? 0.0f : c;
    return static_cast<int8_t>(static_cast<int32_t>(subtract ? c - zero : c));
  };
  const float reciprocal = 1.0f / scale;
  int64_t i = 0;
  if (std::isnormal(scale) && std::isnormal(reciprocal)) {
    const Lanes r = broadcast_lanes(reciprocal), z = broadcast_lanes(zero);
    const Lanes low = broadcast_lanes(lo), high = broadcast_lanes(hi), half = broadcast_lanes(0.5f);
    const Lanes margin = broadcast_lanes(-0x1p-20f);
    for (; i + kLanes <= n; i += kLanes) {
      const Lanes t = load_lanes(v + i) * r;
      const Lanes rounded = nearbyint_lanes(t);
      if (any_at_least_or_nan(abs_lanes(t - rounded), multiply_add(abs_lanes(t), margin, half), t)) {
        for (int j = 0; j < kLanes; ++j) q[i + j] = code(std::nearbyint(v[i + j] / scale));
        continue;
      }
      Lanes c = max_lanes(rounded + z, low);  // no NaN here
      c = min_lanes(c, high);
      store_codes(q + i, subtract ? c - z : c);
    }
  }
  for (; i < n; ++i) q[i] = code(std::nearbyint(v[i] / scale));
}

// max |v| with NaN propagated (torch.amax): as integers, the bits of |v| order as the values do,
// and every NaN's above infinity's, so an integer max (which vectorizes) is the answer.
inline float absmax(const float* v, int64_t n) {
  int32_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t bits;
    std::memcpy(&bits, v + i, sizeof(bits));
    bits &= 0x7fffffff;
    best = bits > best ? bits : best;
  }
  return bits_to_float(best);
}

inline float absmax_scale(float amax, int bits) {
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  return (amax != amax ? amax : std::max(amax, 1e-8f)) / qmax;
}

// Rows rotated before their quantization: `rotated(row)` is row·R in a [2k] buffer when a
// rotation is given, else row itself.
struct RotationBuffer {
  const Rotation* rotation;
  std::vector<float> values;
  RotationBuffer(const Rotation* rotation_, int64_t k)
      : rotation(rotation_), values(rotation_ ? static_cast<size_t>(2 * k) : 0) {}
  const float* rotated(const float* row) {
    if (!rotation) return row;
    rotate_row(*rotation, row, values.data(), values.data() + rotation->k);
    return values.data();
  }
};

void quantize_rows_impl(const float* x, int64_t x_stride, int64_t m0, int64_t m1, int64_t k, int bits,
                        const float* static_scale, int zero_point, bool has_zero, bool subtract_zero,
                        const Rotation* rotation, int8_t* q, float* scale) {
  const float lo = static_cast<float>(-(1 << (bits - 1))), hi = static_cast<float>((1 << (bits - 1)) - 1);
  RotationBuffer buffer(rotation, k);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = buffer.rotated(x + m * x_stride);
    const float s = static_scale ? *static_scale : absmax_scale(absmax(row, k), bits);
    scale[m] = s;
    quantize_values(row, k, s, has_zero ? static_cast<float>(zero_point) : 0.0f, lo, hi, subtract_zero, q + m * k);
  }
}

// *p as the type of `like`: a vector of lanes from p, or one float.
inline Lanes load_or_value(const float* p, Lanes) { return load_lanes(p); }
inline float load_or_value(const float* p, float) { return *p; }

// Σ v (squared with `square`, after subtracting `shift`) in 16 independent fp32 lanes (one 512-bit
// register or two 256-bit ones: the same sums on every path), then the lanes pairwise.
template <bool Square>
inline float lanes_sum(const float* v, int64_t n, float shift) {
  constexpr int kSumLanes = 16, kParts = kSumLanes / kLanes;
  const Lanes shifted = broadcast_lanes(shift);
  Lanes parts[kParts] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int h = 0; h < kParts; ++h) {
      const Lanes d = load_lanes(v + i + h * kLanes) - shifted;
      parts[h] += Square ? d * d : d;
    }
  float lanes[kSumLanes];
  for (int h = 0; h < kParts; ++h) store_lanes(lanes + h * kLanes, parts[h]);
  for (int j = 0; i < n; ++i, ++j) {
    const float d = v[i] - shift;
    lanes[j] += Square ? d * d : d;
  }
  for (int width = kSumLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

void normalize_rows_impl(const float* x, int64_t m0, int64_t m1, int64_t k, int kind, const float* weight,
                         const float* bias, float eps, float* normed, int bits, const float* static_scale,
                         int zero_point, bool has_zero, bool subtract_zero, const Rotation* rotation, int8_t* q,
                         float* scale) {
  const float count = static_cast<float>(k);
  // ((x − mean)·rstd)·weight + bias in three roundings, in lanes and in the tail alike.
  auto normalized = [&](auto value, auto mean, auto rstd, int64_t i) {
    auto t = (value - mean) * rstd;
    if (weight) t = t * load_or_value(weight + i, t);
    if (bias) t = t + load_or_value(bias + i, t);
    return t;
  };
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * k;
    float* out = normed + m * k;
    const float mean = kind == 1 ? lanes_sum<false>(row, k, 0.0f) / count : 0.0f;
    const float rstd = 1.0f / std::sqrt(lanes_sum<true>(row, k, mean) / count + eps);
    const Lanes mean_lanes = broadcast_lanes(mean), rstd_lanes = broadcast_lanes(rstd);
    int64_t i = 0;
    for (; i + kLanes <= k; i += kLanes) store_lanes(out + i, normalized(load_lanes(row + i), mean_lanes, rstd_lanes, i));
    for (; i < k; ++i) out[i] = normalized(row[i], mean, rstd, i);
  }
  if (bits)
    quantize_rows_impl(normed, k, m0, m1, k, bits, static_scale, zero_point, has_zero, subtract_zero, rotation, q,
                       scale);
}

// The tile stage on one micro-kernel result acc [rows][width] (int32, row stride acc_stride).
constexpr int kMaxTileColumns = 64;

// Asks for the next panel group's part of a row read in the epilogue (the residual, X_c·W_cᵀ):
// tiles read each row a group's width at a time, 32 rows apart, which the hardware prefetchers
// do not follow (measured: reading a 2048 x 3072 fp32 residual cost more than the AMX GEMM).
// A prefetch past the end of the matrix does not fault.
inline void prefetch_next_group(const float* row_part, int64_t width) {
  for (int64_t c = 0; c < width; c += kPanelColumns)
    _mm_prefetch(reinterpret_cast<const char*>(row_part + width + c), _MM_HINT_T0);
}

// The rows of one micro-kernel tile: at most AMX's two 16-row tiles.
constexpr int kMaxTileRows = 32;

// lowrank[r][0, Chunks·16) = T[dest(m0 + r)]·Uᵀ for Rows tile rows from r0 and the tile's Chunks
// panels from n0: each panel's U ([rank][16], contiguous) in vector values of the register width,
// Rows × Chunks independent chains over the rank (one row's 2 chains at AMX's 32-column tiles left
// T·Uᵀ waiting on multiply-add latency: rank 8 cost a third of MiniLM's proj GEMM). As a plain loop
// GCC unrolled it into scalar FMAs; with U transposed across all N, one sum at a time, rank 64
// cost 6x the GEMM under it: measured.
template <int Chunks, int Rows>
void lowrank_rows(const Problem& p, int64_t m0, int r0, int64_t n0, float* lowrank) {
  constexpr int kParts = kPanelColumns / kLanes;
  const float* u = p.lowrank_u_panels + (n0 / kPanelColumns) * p.rank * kPanelColumns;
  const int64_t panel_floats = p.rank * kPanelColumns;
  const float* t[Rows];
  for (int r = 0; r < Rows; ++r) {
    const int64_t dest = p.destination(m0 + r0 + r);
    // A dropped row reads T's first row: its sums are never read, and every row's broadcast stays
    // a load (a select before it made it a shuffle, on the ports the multiply-adds use).
    t[r] = p.lowrank_t + (dest >= 0 ? dest : 0) * p.t_stride;
  }
  Lanes sums[Rows][Chunks][kParts] = {};
  for (int64_t j = 0; j < p.rank; ++j) {
    Lanes tj[Rows];
    for (int r = 0; r < Rows; ++r) tj[r] = broadcast_lanes(t[r][j]);
#pragma GCC unroll 4
    for (int c = 0; c < Chunks; ++c)
#pragma GCC unroll 2
      for (int h = 0; h < kParts; ++h) {
        const Lanes uj = load_lanes(u + c * panel_floats + j * kPanelColumns + h * kLanes);
        for (int r = 0; r < Rows; ++r) sums[r][c][h] = multiply_add(tj[r], uj, sums[r][c][h]);
      }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Chunks; ++c)
      for (int h = 0; h < kParts; ++h)
        store_lanes(lowrank + (r0 + r) * kMaxTileColumns + c * kPanelColumns + h * kLanes, sums[r][c][h]);
}

// About 8 chains in flight with AVX2's 16 vector registers, 16 with AVX-512's 32.
template <int Chunks>
void lowrank_tile_of(const Problem& p, int64_t m0, int rows, int64_t n0, float* lowrank) {
  constexpr int kChains = kLanes == 16 ? 16 : 8;
  constexpr int kGroup = std::max(1, kChains / (Chunks * (kPanelColumns / kLanes)));
  int r = 0;
  for (; r + kGroup <= rows; r += kGroup) lowrank_rows<Chunks, kGroup>(p, m0, r, n0, lowrank);
  for (; r < rows; ++r) lowrank_rows<Chunks, 1>(p, m0, r, n0, lowrank);
}

// T·Uᵀ of a whole tile (rows × width from n0) into lowrank [rows][kMaxTileColumns].
inline void lowrank_tile(const Problem& p, int64_t m0, int rows, int64_t n0, int64_t width, float* lowrank) {
  static_assert(kMaxTileColumns == 4 * kPanelColumns, "a tile spans at most 4 panels");
  switch ((width + kPanelColumns - 1) / kPanelColumns) {
    case 4: lowrank_tile_of<4>(p, m0, rows, n0, lowrank); break;
    case 3: lowrank_tile_of<3>(p, m0, rows, n0, lowrank); break;
    case 2: lowrank_tile_of<2>(p, m0, rows, n0, lowrank); break;
    default: lowrank_tile_of<1>(p, m0, rows, n0, lowrank); break;
  }
}

inline void finish_tile(const Problem& p, int64_t m0, int rows, int64_t n0, int64_t width, const int32_t* acc,
                        int acc_stride, float* y, int64_t y_row0, int64_t y_stride) {
  alignas(64) int32_t colsum[kMaxTileColumns];
  for (int64_t c = 0; c < width; c += kPanelColumns) {
    const int64_t panel = (n0 + c) / kPanelColumns;
    std::memcpy(colsum + c, panel_column_sums(p, panel), kQuadRowBytes);
  }
  const bool gated = is_gated(p.activation);
  alignas(64) float lowrank[kMaxTileRows * kMaxTileColumns];
  if (p.rank) lowrank_tile(p, m0, rows, n0, width, lowrank);
  alignas(64) float v[kMaxTileColumns];
  for (int r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const int64_t dest = p.destination(m);
    if (dest < 0) continue;
    const int32_t offset = p.row_offset[m];
    const float sx = p.a_scale[m];
    const int32_t* a_row = acc + r * acc_stride;
    // The exact sum fits int32 (|Σ (a − z)·w| <= 255·128·K < 2^31 for K <= 65535): wrapping
    // unsigned arithmetic gives it even where the u8 sum and the offset term are each near 2^31.
    for (int64_t c = 0; c < width; ++c) {
      const uint32_t wrapped = static_cast<uint32_t>(a_row[c]) -
                               static_cast<uint32_t>(offset) * static_cast<uint32_t>(colsum[c]);
      v[c] = static_cast<float>(static_cast<int32_t>(wrapped)) * sx * p.w_scale[n0 + c];
    }
    // The corrections join before the activation, or with the residual first after it (beside a
    // residual block: act(y + bias + residual) + T·Uᵀ + X_c·W_cᵀ).
    alignas(64) float after[kMaxTileColumns];
    float* corrections = v;
    if (p.residual_first) {
      std::fill(after, after + width, 0.0f);
      corrections = after;
    }
    if (p.rank) {
      const float* row_lowrank = lowrank + r * kMaxTileColumns;
      for (int64_t c = 0; c < width; ++c) corrections[c] += row_lowrank[c];
    }
    if (p.addend) {
      const float* add = p.addend + dest * p.addend_stride + n0;
      prefetch_next_group(add, width);
      for (int64_t c = 0; c < width; ++c) corrections[c] += add[c];
    }
    if (p.bias) {
      for (int64_t c = 0; c < width; ++c) v[c] += p.bias[n0 + c];
    }
    float* target = y ? y + (m - y_row0) * y_stride + n0 : p.out + dest * p.out_stride + n0;
    if (p.residual && !gated) prefetch_next_group(p.residual + dest * p.residual_stride + n0, width);
    if (!gated) {
      if (p.residual && p.residual_first) {
        const float* res = p.residual + dest * p.residual_stride + n0;
        for (int64_t c = 0; c < width; ++c) v[c] += res[c];
      }
      activate(v, width, p.activation);
      if (p.residual && !p.residual_first) {
        const float* res = p.residual + dest * p.residual_stride + n0;
        for (int64_t c = 0; c < width; ++c) v[c] += res[c];
      }
      if (p.residual_first) {
        for (int64_t c = 0; c < width; ++c) v[c] += after[c];
      }
    }
    std::memcpy(target, v, sizeof(float) * width);
  }
}

void finish_rows_impl(const Problem& p, int64_t m0, int64_t m1, const float* y, int64_t y_row0, int64_t y_stride) {
  const int64_t n_out = p.output_columns();
  const bool gated = is_gated(p.activation);
  float* buffer = nullptr;
  alignas(64) float local[4096];
  float* heap = nullptr;
  if (p.out_q || gated) {
    buffer = n_out <= 4096 ? local : (heap = new float[n_out]);
  }
  RotationBuffer rotation(p.requant_rotation, n_out);
  const float lo = p.requant_bits ? static_cast<float>(-(1 << (p.requant_bits - 1))) : 0.0f;
  const float hi = p.requant_bits ? static_cast<float>((1 << (p.requant_bits - 1)) - 1) : 0.0f;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t dest = p.destination(m);
    if (dest < 0) continue;
    const float* row = y + (m - y_row0) * y_stride;
    float* values = p.out_q ? buffer : p.out + dest * p.out_stride;
    if (gated) {
      activate_gated(row, row + n_out, values, n_out, p.activation);
    } else if (values != row) {
      std::memcpy(values, row, sizeof(float) * n_out);
    }
    if (gated && p.residual) {
      const float* res = p.residual + dest * p.residual_stride;
      for (int64_t c = 0; c < n_out; ++c) values[c] += res[c];
    }
    if (p.out_q) {
      const float* quantized = rotation.rotated(values);
      const float s = absmax_scale(absmax(quantized, n_out), p.requant_bits);
      p.out_scale[dest] = s;
      quantize_values(quantized, n_out, s, 0.0f, lo, hi, false, p.out_q + dest * n_out);
    }
  }
  delete[] heap;
}

// A micro-kernel's per-block state (AMX: the tile configuration), held while tile_block_impl runs;
// nothing for the paths that have none.
template <class Micro, class = void>
struct SessionOf {
  struct type {};
};
template <class Micro>
struct SessionOf<Micro, std::void_t<typename Micro::Session>> {
  using type = typename Micro::Session;
};

// Walks rows [m0, m1) × panels [p0, p1) in micro-kernel tiles: panel groups outside, row tiles
// inside, so that a group's weights stay in cache while the block's rows pass over them.
template <class Micro>
void tile_block_impl(const Problem& p, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y, int64_t y_row0,
                     int64_t y_stride) {
  const typename SessionOf<Micro>::type session;
  static_assert(Micro::kMaxRows <= kMaxTileRows, "finish_tile holds T·Uᵀ for at most kMaxTileRows rows");
  alignas(64) int32_t acc[Micro::kMaxRows * kMaxTileColumns];
  for (int64_t g = p0; g < p1; g += Micro::kMaxPanels) {
    const int panels = static_cast<int>(std::min<int64_t>(Micro::kMaxPanels, p1 - g));
    const int64_t n0 = g * kPanelColumns;
    const int64_t width = std::min<int64_t>(panels * kPanelColumns, p.columns - n0);
    const int tile_rows = Micro::tile_rows(p);
    for (int64_t m = m0; m < m1; m += tile_rows) {
      const int rows = static_cast<int>(std::min<int64_t>(tile_rows, m1 - m));
      Micro::run(p, m, rows, g, panels, acc);
      finish_tile(p, m, rows, n0, width, acc, kMaxTileColumns, y, y_row0, y_stride);
    }
  }
}

// The dequantized weight rounded to the activation dtype, as the reference's W4A16 computes
// it: fp16 through F16C, bf16 to nearest even on the bits (finite values only: weights).
enum WeightRounding : int { kFp32 = 0, kFp16 = 1, kBf16 = 2 };

template <int Rounding>
inline __m256 round_weight(__m256 w) {
  if constexpr (Rounding == kFp16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (Rounding == kBf16) {
    const __m256i bits = _mm256_castps_si256(w);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
  } else {
    return w;
  }
}

// W4A16 (see IsaKernels::w4a16_rows), 256-bit code every path runs: per 16 k, one 8-byte load
// zero-extended to 8 lanes gives the low nibbles (even k) and high nibbles (odd k) as floats, less
// the group's zero point (q − z exact); for fp32 activations the group scale is one multiply-add
// per group and row, for fp16 / bf16 ones each weight is (q − z)·s rounded to that dtype first, the
// reference's numbers. Decode (one row of fp32 activations) sums q·x instead and takes z·Σx per
// group from the lanes' sums of x (`lane_sums`, 8 per group and row): 7 vector operations per 16
// weights instead of 9, the loop's bound (12.5 against 11.8 GB/s of weights from DRAM, AVX2); with
// more rows the subtraction is shared by the rows, and the fold measured 2-3% slower. Even and odd
// k, and two chunks of 16, accumulate apart: four independent chains per row, so that one row
// (decode) is not bound by the latency of its adds; with more rows two per row (four each took
// more than AVX2's 16 registers: 17% slower at M >= 4).
template <int Rows, int Rounding>
void w4a16_column(const float* x, const float* lane_sums, int64_t k, const uint8_t* w, const float* scale,
                  const uint8_t* zero, int64_t group, float* out_column, int64_t out_stride) {
  constexpr int kChains = Rows > 1 ? 2 : 4;
  constexpr bool kFoldZero = Rounding == kFp32 && Rows == 1;
  const __m256i low_mask = _mm256_set1_epi32(0xF);
  __m256 total[Rows];
  for (int r = 0; r < Rows; ++r) total[r] = _mm256_setzero_ps();
  const int64_t groups = k / group;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 part[Rows][kChains];
    for (int r = 0; r < Rows; ++r)
      for (int j = 0; j < kChains; ++j) part[r][j] = _mm256_setzero_ps();
    const int64_t end = (g + 1) * group;
    const __m256 z = _mm256_set1_ps(static_cast<float>(zero[g]));
    const __m256 s = _mm256_set1_ps(scale[g]);
    auto chunk = [&](int64_t c, int pair) {
      const int chain = kChains == 4 ? pair : 0;
      const uint8_t* source = w + (static_cast<uint64_t>(c) >> 1);
      // Decode streams each weight byte once from DRAM: ask for the line 1 KB ahead (the hardware
      // prefetcher alone left the loop waiting on memory: 4.7 GB/s of weights, measured), once a
      // 64-byte line (128 k).
      if ((c & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(source) + 1024, _MM_HINT_T0);
      int64_t bytes;
      std::memcpy(&bytes, source, sizeof(bytes));
      const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
      __m256 even = _mm256_cvtepi32_ps(_mm256_and_si256(v, low_mask));
      __m256 odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
      if constexpr (!kFoldZero) {
        even = _mm256_sub_ps(even, z);
        odd = _mm256_sub_ps(odd, z);
      }
      if constexpr (Rounding != kFp32) {
        even = round_weight<Rounding>(_mm256_mul_ps(even, s));
        odd = round_weight<Rounding>(_mm256_mul_ps(odd, s));
      }
      for (int r = 0; r < Rows; ++r) {
        part[r][chain] = _mm256_fmadd_ps(even, _mm256_loadu_ps(x + r * k + c), part[r][chain]);
        part[r][chain + 1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + r * k + c + 8), part[r][chain + 1]);
      }
    };
    int64_t c = g * group;
    for (; c + 32 <= end; c += 32) {
      chunk(c, 0);
      chunk(c + 16, 2);
    }
    if (c < end) chunk(c, 0);
    for (int r = 0; r < Rows; ++r) {
      __m256 sum = _mm256_add_ps(part[r][0], part[r][1]);
      if constexpr (kChains == 4) sum = _mm256_add_ps(sum, _mm256_add_ps(part[r][2], part[r][3]));
      if constexpr (kFoldZero) sum = _mm256_fnmadd_ps(z, _mm256_loadu_ps(lane_sums + (r * groups + g) * 8), sum);
      total[r] = Rounding == kFp32 ? _mm256_fmadd_ps(sum, s, total[r]) : _mm256_add_ps(sum, total[r]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total[r]);
    out_column[r * out_stride] =
        ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
}

#ifdef __AVX512F__
// w4a16_column in 512-bit registers, for groups of a multiple of 32 k: per 32 k one 16-byte load
// zero-extended to 16 lanes, each nibble looked up in the group's 16 dequantized values (one
// `vpermps` reads an index's low 4 bits: the low nibble as it is, the high one after a shift), then
// the multiply-adds: a third of the instructions per weight of the 256-bit form, which bound decode
// at a third of the memory bandwidth. The table holds the dequantized weights (q − z)·s (for fp16
// / bf16 activations rounded to that dtype, the values the 256-bit form computes per weight; for
// fp32 ones the reference's fp32 weights), so the chains run over all of K: no sums per group
// (their zeroing, adds and scale: 3-6% of the time at groups of 128, M = 1 and 16, old and new
// interleaved). x deinterleaved per 32 k (16 even k, 16 odd). Columns > 1 share each
// load of x: at M = 16 one column at a time streamed the 16 rows of x from L2 once per weight
// column and per row block, bound by L2 (4.8 ms for 4096 -> 4096 at M = 16, 2 threads).
// Four chains per (column, row) sum hide the multiply-add latency of decode's one or two rows;
// more rows take two each, which keeps 4 rows × 2 columns in the 32 registers. The chains depend
// on Rows only: a column sums alike alone or paired, whichever thread's range it ends. Not
// inlined: inlined into w4a16_rows_rounded the decode loop ran 25-30% slower (GCC 12).
template <int Rows, int Columns, int Rounding>
__attribute__((noinline)) void w4a16_column16(const float* x, int64_t k, const uint8_t* w, const float* scale,
                                              const uint8_t* zero, int64_t group, float* out_column,
                                              int64_t out_stride) {
  constexpr int kChains = Rows > 2 ? 2 : 4;
  const __m256 low_codes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 high_codes = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t groups = k / group, row_bytes = k / 2;
  __m512 part[Columns][Rows][kChains];
  for (int n = 0; n < Columns; ++n)
    for (int r = 0; r < Rows; ++r)
      for (int j = 0; j < kChains; ++j) part[n][r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 table[Columns];
    for (int n = 0; n < Columns; ++n) {
      // The 16 values (q − z)·s in two halves (rounded as the 256-bit form rounds a weight).
      const __m256 z = _mm256_set1_ps(static_cast<float>(zero[n * groups + g]));
      const __m256 group_scale = _mm256_set1_ps(scale[n * groups + g]);
      const __m256 low = round_weight<Rounding>(_mm256_mul_ps(_mm256_sub_ps(low_codes, z), group_scale));
      const __m256 high = round_weight<Rounding>(_mm256_mul_ps(_mm256_sub_ps(high_codes, z), group_scale));
      table[n] = _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
    }
    auto chunk = [&](int64_t c, int pair) {
      const int chain = kChains == 4 ? pair : 0;
      for (int n = 0; n < Columns; ++n) {
        const uint8_t* source = w + n * row_bytes + (c >> 1);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source)));
        const __m512 even = _mm512_permutexvar_ps(v, table[n]);
        const __m512 odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[n]);
        for (int r = 0; r < Rows; ++r) {
          part[n][r][chain] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + r * k + c), part[n][r][chain]);
          part[n][r][chain + 1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + r * k + c + 16), part[n][r][chain + 1]);
        }
      }
    };
    const int64_t end = (g + 1) * group;
    int64_t c = g * group;
    for (; c + 64 <= end; c += 64) {
      // One prefetch per 64-byte line of weights (128 k), 4 KB ahead (1, 2, 4 and 8 KB measured alike).
      if ((c & 127) == 0)
        for (int n = 0; n < Columns; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(w + n * row_bytes + (c >> 1)) + 4096, _MM_HINT_T0);
      chunk(c, 0);
      chunk(c + 32, 2);
    }
    if (c < end) chunk(c, 0);
  }
  for (int n = 0; n < Columns; ++n)
    for (int r = 0; r < Rows; ++r) {
      __m512 sum = _mm512_add_ps(part[n][r][0], part[n][r][1]);
      if constexpr (kChains == 4) sum = _mm512_add_ps(sum, _mm512_add_ps(part[n][r][2], part[n][r][3]));
      out_column[r * out_stride + n] = _mm512_reduce_add_ps(sum);
    }
}
#endif

// The activations deinterleaved as `lanes` wide columns read them: per 2·lanes k, the lanes even k,
// then the lanes odd (the low and high nibbles of `lanes` bytes).
inline std::vector<float> deinterleaved_rows(const float* x, int64_t rows, int64_t k, int lanes) {
  std::vector<float> out(rows * k);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < k; c += 2 * lanes)
      for (int i = 0; i < lanes; ++i) {
        out[m * k + c + i] = x[m * k + c + 2 * i];
        out[m * k + c + lanes + i] = x[m * k + c + 2 * i + 1];
      }
  return out;
}

// Per row and group, each of w4a16_column's 8 lanes' sum of x over the group (lane i multiplies
// k = 2i and 2i + 1 of every 16): what the column takes z times.
inline std::vector<float> lane_sums(const float* x, int64_t rows, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  std::vector<float> out(rows * groups * 8, 0.0f);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float* lanes = out.data() + (m * groups + g) * 8;
      for (int64_t c = g * group; c < (g + 1) * group; c += 16)
        for (int i = 0; i < 8; ++i) lanes[i] += x[m * k + c + i] + x[m * k + c + 8 + i];
    }
  return out;
}

template <int Rounding>
void w4a16_rows_rounded(const float* x_natural, int64_t rows, int64_t k, const uint8_t* weight, const float* scale,
                        const uint8_t* zero, int64_t group, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  const int64_t groups = k / group;
  constexpr int kRowBlock = 4;  // rows sharing one unpacking of a weight chunk
#ifdef __AVX512F__
  const bool wide = group % 32 == 0;
#else
  const bool wide = false;
#endif
  const std::vector<float> x_rows = deinterleaved_rows(x_natural, rows, k, wide ? 16 : 8);
  const float* x = x_rows.data();
  const bool single_row_block = rows % kRowBlock == 1;  // w4a16_column<1> folds the zero point into Σx
  const std::vector<float> sums =
      Rounding == kFp32 && !wide && single_row_block ? lane_sums(x, rows, k, group) : std::vector<float>();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = weight + n * (k / 2);
    const float* s = scale + n * groups;
    const uint8_t* z = zero + n * groups;
#ifdef __AVX512F__
    // Two weight rows at a time: in decode two streams and twice the sums in flight (4096 -> 14336
    // at M = 1 from DRAM: 14.2 -> 16.2 GB/s; four weight rows at a time fell to 12.5), at more rows
    // each load of x serving both.
    if (wide && n + 1 < n1) {
      for (int64_t m = 0; m < rows; m += kRowBlock) {
        const float* xm = x + m * k;
        float* column = out + m * out_stride + n;
        switch (std::min<int64_t>(kRowBlock, rows - m)) {
          case 4: w4a16_column16<4, 2, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
          case 3: w4a16_column16<3, 2, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
          case 2: w4a16_column16<2, 2, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
          default: w4a16_column16<1, 2, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
        }
      }
      ++n;
      continue;
    }
#endif
    for (int64_t m = 0; m < rows; m += kRowBlock) {
      const float* xm = x + m * k;
      const float* sums_m = sums.empty() ? nullptr : sums.data() + m * groups * 8;
      float* column = out + m * out_stride + n;
#ifdef __AVX512F__
      if (wide) {
        switch (std::min<int64_t>(kRowBlock, rows - m)) {
          case 4: w4a16_column16<4, 1, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
          case 3: w4a16_column16<3, 1, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
          case 2: w4a16_column16<2, 1, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
          default: w4a16_column16<1, 1, Rounding>(xm, k, w, s, z, group, column, out_stride); break;
        }
        continue;
      }
#endif
      switch (std::min<int64_t>(kRowBlock, rows - m)) {
        case 4: w4a16_column<4, Rounding>(xm, sums_m, k, w, s, z, group, column, out_stride); break;
        case 3: w4a16_column<3, Rounding>(xm, sums_m, k, w, s, z, group, column, out_stride); break;
        case 2: w4a16_column<2, Rounding>(xm, sums_m, k, w, s, z, group, column, out_stride); break;
        default: w4a16_column<1, Rounding>(xm, sums_m, k, w, s, z, group, column, out_stride); break;
      }
    }
  }
}

void w4a16_rows_impl(const float* x, int64_t rows, int64_t k, const uint8_t* weight, const float* scale,
                     const uint8_t* zero, int64_t group, int rounding, int64_t n0, int64_t n1, float* out,
                     int64_t out_stride) {
  if (rounding == kFp16) w4a16_rows_rounded<kFp16>(x, rows, k, weight, scale, zero, group, n0, n1, out, out_stride);
  else if (rounding == kBf16) w4a16_rows_rounded<kBf16>(x, rows, k, weight, scale, zero, group, n0, n1, out, out_stride);
  else w4a16_rows_rounded<kFp32>(x, rows, k, weight, scale, zero, group, n0, n1, out, out_stride);
}

// ---- Self-attention on GEMM rows (IsaKernels::attention_heads) ----

// c[r][0, chunks·kLanes) = Σ_j a[r·a_stride + j] · b[j·b_stride + ...] for Rows rows: the small
// GEMMs of one head (q·kᵀ against kᵀ, P·v against v, both rows of contiguous lanes), two column
// chunks at a time so that 2·Rows independent sums hide the multiply-add latency.
template <int Rows>
void rows_times_lanes(const float* a, int64_t a_stride, int64_t depth, const float* b, int64_t b_stride,
                      int64_t chunks, float* c, int64_t c_stride) {
  int64_t chunk = 0;
  for (; chunk + 2 <= chunks; chunk += 2) {
    Lanes acc[Rows][2] = {};
    for (int64_t j = 0; j < depth; ++j) {
      const Lanes b0 = load_lanes(b + j * b_stride + chunk * kLanes);
      const Lanes b1 = load_lanes(b + j * b_stride + (chunk + 1) * kLanes);
      for (int r = 0; r < Rows; ++r) {
        const Lanes x = broadcast_lanes(a[r * a_stride + j]);
        acc[r][0] = multiply_add(x, b0, acc[r][0]);
        acc[r][1] = multiply_add(x, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      store_lanes(c + r * c_stride + chunk * kLanes, acc[r][0]);
      store_lanes(c + r * c_stride + (chunk + 1) * kLanes, acc[r][1]);
    }
  }
  if (chunk < chunks) {
    Lanes acc[Rows] = {};
    for (int64_t j = 0; j < depth; ++j) {
      const Lanes b0 = load_lanes(b + j * b_stride + chunk * kLanes);
      for (int r = 0; r < Rows; ++r) acc[r] = multiply_add(broadcast_lanes(a[r * a_stride + j]), b0, acc[r]);
    }
    for (int r = 0; r < Rows; ++r) store_lanes(c + r * c_stride + chunk * kLanes, acc[r]);
  }
}

constexpr int kAttentionRows = 4;  // query rows per block: 8 sums in flight, within AVX2's 16 registers

void rows_times_lanes_any(int rows, const float* a, int64_t a_stride, int64_t depth, const float* b,
                          int64_t b_stride, int64_t chunks, float* c, int64_t c_stride) {
  switch (rows) {
    case 4: rows_times_lanes<4>(a, a_stride, depth, b, b_stride, chunks, c, c_stride); break;
    case 3: rows_times_lanes<3>(a, a_stride, depth, b, b_stride, chunks, c, c_stride); break;
    case 2: rows_times_lanes<2>(a, a_stride, depth, b, b_stride, chunks, c, c_stride); break;
    default: rows_times_lanes<1>(a, a_stride, depth, b, b_stride, chunks, c, c_stride); break;
  }
}

// Horizontal max and sum of one vector in registers (through memory, each row's reduction waited
// on store forwarding: measured, a third of the attention kernel's time).
inline float lanes_max(Lanes v) {
#ifdef __AVX512F__
  return _mm512_reduce_max_ps(v);
#else
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
#endif
}

inline float lanes_total(Lanes v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(v);
#else
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
#endif
}

// The additive mask of a row's last, partial lanes (`valid` < kLanes keys): the mask's values (0
// without one), −inf past the keys; masked loads, so nothing past the row is read.
inline Lanes partial_mask_lanes(const float* mask, int valid) {
#ifdef __AVX512F__
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 minus_infinity = _mm512_set1_ps(-INFINITY);
  return mask ? _mm512_mask_loadu_ps(minus_infinity, keep, mask)
              : _mm512_mask_blend_ps(keep, minus_infinity, _mm512_setzero_ps());
#else
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 values = mask ? _mm256_maskload_ps(mask, keep) : _mm256_setzero_ps();
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), values, _mm256_castsi256_ps(keep));
#endif
}

// One row's scores s (whole lanes) → unnormalized probabilities exp(s·scale + mask − max) in place
// over the `keys` (0 past them, and where the mask is −inf); returns 1 / their sum, or 0 when every
// key is masked (the row's output is then zeros). NaN propagates. `mask` (or null) is read in place
// for whole lanes; its last partial lanes are padded with −inf.
inline float softmax_numerators(float* s, int64_t keys, int64_t chunks, float scale, const float* mask) {
  const Lanes scale_lanes = broadcast_lanes(scale), minus_infinity = broadcast_lanes(-INFINITY);
  const int64_t whole = keys / kLanes;
  Lanes top = minus_infinity;
  for (int64_t c = 0; c < chunks; ++c) {
    Lanes v = load_lanes(s + c * kLanes) * scale_lanes;
    if (c < whole) {
      if (mask) v += load_lanes(mask + c * kLanes);
    } else {
      v += partial_mask_lanes(mask ? mask + c * kLanes : nullptr, static_cast<int>(keys - c * kLanes));
    }
    store_lanes(s + c * kLanes, v);
    top = v > top ? v : top;
  }
  const float row_top = lanes_max(top);
  if (row_top == -INFINITY) {
    std::fill(s, s + chunks * kLanes, 0.0f);
    return 0.0f;
  }
  Lanes total = {};
  const Lanes top_lanes = broadcast_lanes(row_top), zero = broadcast_lanes(0.0f);
  for (int64_t c = 0; c < chunks; ++c) {
    const Lanes v = load_lanes(s + c * kLanes);
    const Lanes e = v == minus_infinity ? zero : exp_lanes(v - top_lanes);
    store_lanes(s + c * kLanes, e);
    total += e;
  }
  return 1.0f / lanes_total(total);
}

// dst[c][j] = src[j][c] for an 8 × 8 block (rows `*_stride` floats apart), in AVX registers.
inline void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// kᵀ [d, keys_padded] of one head's key rows [tokens, d] (`stride` apart); the padding is not touched.
void transpose_keys(const float* k, int64_t stride, int64_t tokens, int64_t d, float* key_t, int64_t keys_padded) {
  const int64_t whole_tokens = tokens / 8 * 8, whole_dims = d / 8 * 8;
  for (int64_t j = 0; j < whole_tokens; j += 8)
    for (int64_t c = 0; c < whole_dims; c += 8) transpose_8x8(k + j * stride + c, stride, key_t + c * keys_padded + j, keys_padded);
  for (int64_t j = 0; j < tokens; ++j)
    for (int64_t c = j < whole_tokens ? whole_dims : 0; c < d; ++c) key_t[c * keys_padded + j] = k[j * stride + c];
}

void attention_heads_impl(const AttentionProblem& p, int64_t task0, int64_t task1) {
  const int64_t tokens = p.tokens, d = p.head_dim;
  const int64_t key_chunks = (tokens + kLanes - 1) / kLanes, dim_chunks = (d + kLanes - 1) / kLanes;
  const int64_t keys_padded = key_chunks * kLanes, dim_padded = dim_chunks * kLanes;
  // P·v reads v in place when each head's values are whole lanes; otherwise from a zero-padded copy
  // (whole lanes of a row's last head would read past the tensor).
  const bool copy_values = d % kLanes != 0;
  // kᵀ [d, keys_padded], zero past the keys; the scores of a block of query rows; its unnormalized
  // context.
  std::vector<float> key_t(d * keys_padded, 0.0f), values(copy_values ? tokens * dim_padded : 0, 0.0f);
  std::vector<float> scores(kAttentionRows * keys_padded), context(kAttentionRows * dim_padded);
  for (int64_t task = task0; task < task1; ++task) {
    const int64_t s = task / p.heads, h = task % p.heads;
    const int64_t first = s * tokens;
    const float* q = p.q + first * p.q_stride + h * d;
    const float* v = p.v + first * p.v_stride + h * d;
    transpose_keys(p.k + first * p.k_stride + h * d, p.k_stride, tokens, d, key_t.data(), keys_padded);
    int64_t v_stride = p.v_stride;
    if (copy_values) {
      for (int64_t j = 0; j < tokens; ++j) std::memcpy(values.data() + j * dim_padded, v + j * p.v_stride, sizeof(float) * d);
      v = values.data();
      v_stride = dim_padded;
    }
    const float* mask = p.mask ? p.mask + s * p.mask_sequence_stride + h * p.mask_head_stride : nullptr;
    for (int64_t i0 = 0; i0 < tokens; i0 += kAttentionRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kAttentionRows, tokens - i0));
      rows_times_lanes_any(rows, q + i0 * p.q_stride, p.q_stride, d, key_t.data(), keys_padded, key_chunks,
                           scores.data(), keys_padded);
      float normalizer[kAttentionRows];
      for (int r = 0; r < rows; ++r)
        normalizer[r] = softmax_numerators(scores.data() + r * keys_padded, tokens, key_chunks, p.scale,
                                           mask ? mask + (i0 + r) * p.mask_row_stride : nullptr);
      rows_times_lanes_any(rows, scores.data(), keys_padded, tokens, v, v_stride, dim_chunks, context.data(),
                           dim_padded);
      for (int r = 0; r < rows; ++r) {
        float* out = p.out + (first + i0 + r) * p.out_stride + h * d;
        const float* row = context.data() + r * dim_padded;
        for (int64_t c = 0; c < d; ++c) out[c] = row[c] * normalizer[r];
      }
    }
  }
}

// ---- QLA's DW-separable down path (IsaKernels::dwsep_rows) ----

// Σ_d x_i[d]·w[j·dim + d] for Rows rows x_i and Ranks rows j of w: Rows × Ranks independent sums
// in whole lanes, then each sum's tail. Each sum sees the same operations in the same order whatever
// Rows is (the same bits); the rows share each load of w (one row at a time, two loads per
// multiply-add, left the down-projections bound by their loads).
template <int Rows, int Ranks>
inline void dot_ranks(const float* const* x, const float* w, int64_t dim, float* const* out) {
  const int64_t whole = dim / kLanes * kLanes;
  Lanes acc[Rows][Ranks] = {};
  for (int64_t d = 0; d < whole; d += kLanes) {
    Lanes wj[Ranks];
    for (int j = 0; j < Ranks; ++j) wj[j] = load_lanes(w + j * dim + d);
    for (int i = 0; i < Rows; ++i) {
      const Lanes v = load_lanes(x[i] + d);
      for (int j = 0; j < Ranks; ++j) acc[i][j] = multiply_add(v, wj[j], acc[i][j]);
    }
  }
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < Ranks; ++j) {
      float total = lanes_total(acc[i][j]);
      for (int64_t d = whole; d < dim; ++d) total = std::fma(x[i][d], w[j * dim + d], total);
      out[i][j] = total;
    }
}

// Rows (at most kProjectRows) of rank values out_i = x_i·wᵀ for w [rank][dim], 4 ranks at a time:
// Rows × 4 sums within the vector registers (16 of AVX2, 32 of AVX-512).
constexpr int kProjectRows = kLanes == 16 ? 4 : 2;

template <int Rows>
inline void project_ranks(const float* const* x, const float* w, int64_t dim, int64_t rank, float* const* out) {
  float* at[Rows];
  int64_t j = 0;
  for (; j + 4 <= rank; j += 4) {
    for (int i = 0; i < Rows; ++i) at[i] = out[i] + j;
    dot_ranks<Rows, 4>(x, w + j * dim, dim, at);
  }
  for (; j < rank; ++j) {
    for (int i = 0; i < Rows; ++i) at[i] = out[i] + j;
    dot_ranks<Rows, 1>(x, w + j * dim, dim, at);
  }
}

// `rows` (1 to kProjectRows) rows at a time.
inline void project_group(const float* const* x, int rows, const float* w, int64_t dim, int64_t rank,
                          float* const* out) {
  if constexpr (kProjectRows == 4) {
    if (rows == 4) return project_ranks<4>(x, w, dim, rank, out);
    if (rows == 3) return project_ranks<3>(x, w, dim, rank, out);
  }
  if (rows == 2) return project_ranks<2>(x, w, dim, rank, out);
  project_ranks<1>(x, w, dim, rank, out);
}

void dwsep_rows_impl(const DwsepProblem& p, int64_t row0, int64_t row1) {
  const int64_t dim = p.dim, whole = dim / kLanes * kLanes;
  // The taps by position, [9][dim] (zero where a 1-D conv has none), so each is read in lanes.
  std::vector<float> taps(9 * dim, 0.0f), mixed(kProjectRows * dim);
  for (int64_t d = 0; d < dim; ++d)
    for (int t = 0; t < p.taps; ++t) taps[(p.taps == 9 ? t : 3 + t) * dim + d] = p.dw_weight[d * p.taps + t];
  // kProjectRows rows at a time: each one's conv and GELU, then their down-projections together.
  for (int64_t group0 = row0; group0 < row1; group0 += kProjectRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kProjectRows, row1 - group0));
    const float* mixed_rows[kProjectRows];
    float* out_rows[kProjectRows];
    for (int g = 0; g < rows; ++g) {
      const int64_t row = group0 + g;
      float* m = mixed.data() + g * dim;
      mixed_rows[g] = m;
      out_rows[g] = p.out + row * p.rank;
      const int64_t s = row / p.tokens, i = row % p.tokens;
      const float* h = p.h + row * p.h_stride;
      if (i < p.prefix) {
        std::memcpy(m, h, sizeof(float) * dim);
      } else {
        // The neighbours inside the grid, in tap order: their rows, taps and mask factors.
        const int64_t pixel = i - p.prefix, y = pixel / p.width, x = pixel % p.width;
        const float* near[9];
        const float* tap[9];
        float keep[9];
        int count = 0;
        for (int ky = 0; ky < 3; ++ky) {
          const int64_t yy = y + ky - 1;
          if (yy < 0 || yy >= p.height) continue;
          for (int kx = 0; kx < 3; ++kx) {
            const int64_t xx = x + kx - 1;
            if (xx < 0 || xx >= p.width) continue;
            const int64_t near_pixel = yy * p.width + xx;
            near[count] = p.h + (s * p.tokens + p.prefix + near_pixel) * p.h_stride;
            tap[count] = taps.data() + (ky * 3 + kx) * dim;
            keep[count] = p.token_mask ? p.token_mask[s * p.height * p.width + near_pixel] : 1.0f;
            ++count;
          }
        }
        // Each chunk's sum in a register over the neighbours (bias first, then the taps in order);
        // with a mask the masked value, then the tap: the reference's two roundings.
        for (int64_t d = 0; d < whole; d += kLanes) {
          Lanes sum = p.dw_bias ? load_lanes(p.dw_bias + d) : broadcast_lanes(0.0f);
          for (int n = 0; n < count; ++n) {
            const Lanes value = p.token_mask ? load_lanes(near[n] + d) * broadcast_lanes(keep[n])
                                             : load_lanes(near[n] + d);
            sum = multiply_add(load_lanes(tap[n] + d), value, sum);
          }
          store_lanes(m + d, sum);
        }
        for (int64_t d = whole; d < dim; ++d) {
          float sum = p.dw_bias ? p.dw_bias[d] : 0.0f;
          for (int n = 0; n < count; ++n)
            sum = std::fma(tap[n][d], p.token_mask ? near[n][d] * keep[n] : near[n][d], sum);
          m[d] = sum;
        }
      }
      activate(m, dim, kGelu);
    }
    project_group(mixed_rows, rows, p.down_weight, dim, p.rank, out_rows);
    if (p.down_bias)
      for (int g = 0; g < rows; ++g)
        for (int64_t r = 0; r < p.rank; ++r) out_rows[g][r] += p.down_bias[r];
  }
}

void project_rows_impl(const float* x, int64_t x_stride, int64_t m0, int64_t m1, int64_t k, const float* a_t,
                       int64_t rank, float* t) {
  for (int64_t group0 = m0; group0 < m1; group0 += kProjectRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kProjectRows, m1 - group0));
    const float* x_rows[kProjectRows];
    float* t_rows[kProjectRows];
    for (int g = 0; g < rows; ++g) {
      x_rows[g] = x + (group0 + g) * x_stride;
      t_rows[g] = t + (group0 + g) * rank;
    }
    project_group(x_rows, rows, a_t, k, rank, t_rows);
  }
}

// A path's table: its micro-kernel and A layout, with everything this file shares.
template <class Micro>
IsaKernels kernels_with(const char* name, bool (*wide_rows)(const Problem&)) {
  return IsaKernels{name, wide_rows, tile_block_impl<Micro>, finish_rows_impl, quantize_rows_impl, normalize_rows_impl,
                    w4a16_rows_impl, attention_heads_impl, dwsep_rows_impl, project_rows_impl,
                    rotate_rows_impl};
}

// Compile-time row and panel counts for the micro-kernel templates, from run-time ones.
template <int Rows, template <int, int> class Kernel, int Panels>
struct RowDispatch {
  static void run(int rows, const Problem& p, const uint8_t* a, const int8_t* w, int32_t* acc) {
    if (rows == Rows) {
      Kernel<Rows, Panels>::run(p, a, w, acc);
    } else if constexpr (Rows > 1) {
      RowDispatch<Rows - 1, Kernel, Panels>::run(rows, p, a, w, acc);
    }
  }
};

}  // namespace
}  // namespace qla_cpu
