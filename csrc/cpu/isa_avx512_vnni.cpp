// AVX-512 VNNI (Ice Lake and later Xeons, Zen 4): `vpdpbusd` multiplies u8 activations (code + 128)
// by s8 weights and adds groups of 4 products into int32 lanes without intermediate saturation, so
// every weight format is exact; 8 rows × 3 panels (48 columns) of accumulators per micro-kernel.
#include <immintrin.h>

#include "isa_common.h"

namespace qla_cpu {
namespace {

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

struct Micro {
  static constexpr int kMaxRows = 8;
  static constexpr int kMaxPanels = 3;
  static int tile_rows(const Problem&) { return kMaxRows; }
  static void run(const Problem& p, int64_t m, int rows, int64_t panel, int panels, int32_t* acc) {
    const uint8_t* a = p.a + m * p.a_row_bytes;
    const int8_t* w = p.panels + panel * p.panel_bytes;
    if (panels == 3) RowDispatch<kMaxRows, Vnni512Tile, 3>::run(rows, p, a, w, acc);
    else if (panels == 2) RowDispatch<kMaxRows, Vnni512Tile, 2>::run(rows, p, a, w, acc);
    else RowDispatch<kMaxRows, Vnni512Tile, 1>::run(rows, p, a, w, acc);
  }
};

bool wide_rows(const Problem&) { return false; }

}  // namespace

const IsaKernels* avx512_vnni_kernels() {
  static const IsaKernels kernels = kernels_with<Micro>("avx512_vnni", wide_rows);
  return &kernels;
}

}  // namespace qla_cpu
