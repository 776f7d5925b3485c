// The AVX-512 VNNI micro-kernel, shared by the AVX-512 VNNI path and the AMX path (which runs
// tiles of at most 8 rows on it); included after isa_common.h by files built with AVX-512 VNNI.
#pragma once

#include <immintrin.h>

#include "isa_common.h"

namespace qla_cpu {
namespace {

// Rows × Panels int32 sums: per quad, one broadcast of 4 u8 codes per row, `vpdpbusd` by each
// panel's 64-byte quad row.
template <int Rows, int Panels>
struct Vnni512Tile {
  static void run(const Problem& p, const uint8_t* a, const int8_t* w, int32_t* out) {
    __m512i acc[Rows][Panels];
    for (int r = 0; r < Rows; ++r)
      for (int j = 0; j < Panels; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t q = 0; q < p.quads; ++q) {
      __m512i wv[Panels];
      for (int j = 0; j < Panels; ++j) wv[j] = _mm512_loadu_si512(w + j * p.panel_bytes + q * kQuadRowBytes);
      for (int r = 0; r < Rows; ++r) {
        const __m512i av = _mm512_set1_epi32(load_i32(a + r * p.a_row_bytes + q * kQuad));
        for (int j = 0; j < Panels; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, wv[j]);
      }
    }
    for (int r = 0; r < Rows; ++r)
      for (int j = 0; j < Panels; ++j) _mm512_store_si512(out + r * kMaxTileColumns + j * kPanelColumns, acc[r][j]);
  }
};

}  // namespace
}  // namespace qla_cpu
