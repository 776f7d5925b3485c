// AVX2 + FMA (Haswell and later, every Zen), two exact micro-kernels:
// - any weights: int16 activations × sign-extended weights through `vpmaddwd` (int32 pair sums,
//   exact; `vpmaddubsw` would saturate at int16 for 8-bit weights), 3 rows × 16 columns;
// - weights with max |W| <= 64 (W4A8, W4A4, ≤ 7-bit weights): u8 activations (code + 128) through
//   `vpmaddubsw`, whose int16 pair sums are then exact (255 · 2 · 64 < 2^15), accumulated in int16 for
//   as many k-quads as 32767 / (510 · max |W| of the panel) allows before `vpmaddwd` by ones widens
//   them: twice the multiply-adds per instruction of the first kernel at int4 weights.
#include <immintrin.h>

#include "isa_common.h"

namespace qla_cpu {
namespace {

// Rows of int16 A: a 64-bit broadcast of 4 k; a 16-byte load of the panel row sign-extended is 4
// columns × 4 k, whose `vpmaddwd` lanes are (column, k pair): the two pairs are summed at the end.
template <int Rows, int Panels>
struct WideTile {
  static void run(const Problem& p, const uint8_t* a, const int8_t* w, int32_t* out) {
    __m256i acc[Rows][4];
    for (int r = 0; r < Rows; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t q = 0; q < p.quads; ++q) {
      __m256i av[Rows];
      for (int r = 0; r < Rows; ++r) av[r] = _mm256_set1_epi64x(load_i64(a + r * p.a_row_bytes + q * 8));
      for (int j = 0; j < 4; ++j) {
        const __m256i wj = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + q * kQuadRowBytes + 16 * j)));
        for (int r = 0; r < Rows; ++r) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(av[r], wj));
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int j = 0; j < 4; ++j) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r][j]);
        for (int c = 0; c < 4; ++c) out[r * kMaxTileColumns + 4 * j + c] = lanes[2 * c] + lanes[2 * c + 1];
      }
    }
  }
};

// Rows of u8 A: a 32-bit broadcast of 4 k against 8 columns × 4 k; int16 partial sums for `steps`
// quads, then widened (lanes come out one per column).
template <int Rows, int Panels>
struct SmallTile {
  static void run(const Problem& p, const uint8_t* a, const int8_t* w, int32_t* out) {
    const int64_t max_abs = panel_max_abs(p, (w - p.panels) / p.panel_bytes);
    const int64_t steps = max_abs == 0 ? p.quads : std::max<int64_t>(1, 32767 / (510 * max_abs));
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[Rows][2];
    for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t q0 = 0; q0 < p.quads; q0 += steps) {
      const int64_t q1 = std::min(p.quads, q0 + steps);
      __m256i part[Rows][2];
      for (int r = 0; r < Rows; ++r) part[r][0] = part[r][1] = _mm256_setzero_si256();
      for (int64_t q = q0; q < q1; ++q) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * kQuadRowBytes));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * kQuadRowBytes + 32));
        for (int r = 0; r < Rows; ++r) {
          const __m256i av = _mm256_set1_epi32(load_i32(a + r * p.a_row_bytes + q * kQuad));
          part[r][0] = _mm256_add_epi16(part[r][0], _mm256_maddubs_epi16(av, w0));
          part[r][1] = _mm256_add_epi16(part[r][1], _mm256_maddubs_epi16(av, w1));
        }
      }
      for (int r = 0; r < Rows; ++r) {
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(part[r][0], ones));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(part[r][1], ones));
      }
    }
    for (int r = 0; r < Rows; ++r) store_panel_sums(out + r * kMaxTileColumns, acc[r][0], acc[r][1]);
  }
};

// Rows per tile, measured on Sapphire Rapids (2048 x 768 -> 3072, one thread): the int16 kernel is
// fastest at 2 rows (3 spill), the u8 one at 4.
struct Micro {
  static constexpr int kMaxRows = 4;
  static constexpr int kMaxPanels = 1;
  static int tile_rows(const Problem& p) { return p.small_weights ? 4 : 2; }
  static void run(const Problem& p, int64_t m, int rows, int64_t panel, int, int32_t* acc) {
    const uint8_t* a = p.a + m * p.a_row_bytes;
    const int8_t* w = p.panels + panel * p.panel_bytes;
    if (p.small_weights) RowDispatch<4, SmallTile, 1>::run(rows, p, a, w, acc);
    else RowDispatch<2, WideTile, 1>::run(rows, p, a, w, acc);
  }
};

bool wide_rows(const Problem& p) { return !p.small_weights; }

}  // namespace

const IsaKernels* avx2_kernels() {
  static const IsaKernels kernels = kernels_with<Micro>("avx2", wide_rows);
  return &kernels;
}

}  // namespace qla_cpu
