// AVX-VNNI (Alder Lake, Sapphire Rapids, Zen 5): the 256-bit VEX `vpdpbusd`, exact for every weight
// format as on AVX-512 VNNI; 6 rows × 1 panel (two 8-column halves) per micro-kernel.
#include <immintrin.h>

#include "isa_common.h"

namespace qla_cpu {
namespace {

template <int Rows, int Panels>
struct AvxVnniTile {
  static void run(const Problem& p, const uint8_t* a, const int8_t* w, int32_t* out) {
    __m256i acc[Rows][2];
    for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t q = 0; q < p.quads; ++q) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * kQuadRowBytes));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * kQuadRowBytes + 32));
      for (int r = 0; r < Rows; ++r) {
        const __m256i av = _mm256_set1_epi32(load_i32(a + r * p.a_row_bytes + q * kQuad));
        acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], av, w0);
        acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], av, w1);
      }
    }
    for (int r = 0; r < Rows; ++r) store_panel_sums(out + r * kMaxTileColumns, acc[r][0], acc[r][1]);
  }
};

struct Micro {
  static constexpr int kMaxRows = 6;
  static constexpr int kMaxPanels = 1;
  static int tile_rows(const Problem&) { return kMaxRows; }
  static void run(const Problem& p, int64_t m, int rows, int64_t panel, int, int32_t* acc) {
    RowDispatch<kMaxRows, AvxVnniTile, 1>::run(rows, p, p.a + m * p.a_row_bytes, p.panels + panel * p.panel_bytes,
                                               acc);
  }
};

bool wide_rows(const Problem&) { return false; }

}  // namespace

const IsaKernels* avx_vnni_kernels() {
  static const IsaKernels kernels = kernels_with<Micro>("avx_vnni", wide_rows);
  return &kernels;
}

}  // namespace qla_cpu
