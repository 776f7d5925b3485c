// AVX-512 VNNI (Ice Lake and later Xeons, Zen 4): `vpdpbusd` multiplies u8 activations (code + 128)
// by s8 weights and adds groups of 4 products into int32 lanes without intermediate saturation, so
// every weight format is exact; 8 rows × 3 panels (48 columns) of accumulators per micro-kernel.
#include <immintrin.h>

#include "isa_common.h"
#include "vnni512_tile.h"

namespace qla_cpu {
namespace {

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
