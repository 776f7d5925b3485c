// AMX-INT8 (Sapphire Rapids and later Xeons): `tdpbusd` multiplies a tile of 16 rows × 64 u8
// activations (code + 128, as on AVX-512 VNNI) by a tile of 16 quad rows of one panel, which is
// already the layout AMX wants for its second operand (16 columns × 4 k per 64-byte row), and adds
// into 16 × 16 int32 sums without intermediate saturation: exact for every weight format.
// 2 row tiles × 2 panels (32 rows × 32 columns) fill the 8 tile registers (4 sums, 2 A, 2 B).
// Every sum is exact, so tiles and the AVX-512 VNNI kernel can share the work in any split.
//
// K runs on tiles in whole chunks of 16 quads (64 k); the last K mod 64 is added to the stored sums
// with the AVX-512 VNNI instruction, because a tile load of a partial last chunk would read past the
// end of the last panel. Tile loads read whole 16-row tiles of prepared A: module.cpp allocates it
// in whole tiles (zero rows past the GEMM's), and rows past the tile's are never read back.
//
// The tile configuration is per thread and may be changed by other code between our calls (oneDNN's
// AMX kernels run on the same threads), so each tile block loads it and releases the tiles after.
#include <immintrin.h>

#include "isa_common.h"
#include "vnni512_tile.h"

namespace qla_cpu {
namespace {

constexpr int kTileRows = 16;
constexpr int kChunkQuads = 16;  // quad rows per B tile: 64 k
constexpr int kTileBytes = 64;   // bytes per tile row

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Sum tiles 0-3 (row tile r, panel j at 2r + j), A tiles 4-5, B tiles 6-7.
template <int RowTiles, int Panels>
void amx_tiles(const Problem& p, const uint8_t* a, const int8_t* w, int32_t* acc) {
  _tile_zero(0);
  if constexpr (Panels > 1) _tile_zero(1);
  if constexpr (RowTiles > 1) _tile_zero(2);
  if constexpr (RowTiles > 1 && Panels > 1) _tile_zero(3);
  const int64_t chunks = p.quads / kChunkQuads;
  const int64_t a_tile_stride = kTileRows * p.a_row_bytes;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* a_chunk = a + c * kTileBytes;
    const int8_t* w_chunk = w + c * kChunkQuads * kQuadRowBytes;
    _tile_loadd(4, a_chunk, p.a_row_bytes);
    _tile_loadd(6, w_chunk, kQuadRowBytes);
    _tile_dpbusd(0, 4, 6);
    if constexpr (Panels > 1) {
      _tile_loadd(7, w_chunk + p.panel_bytes, kQuadRowBytes);
      _tile_dpbusd(1, 4, 7);
    }
    if constexpr (RowTiles > 1) {
      _tile_loadd(5, a_chunk + a_tile_stride, p.a_row_bytes);
      _tile_dpbusd(2, 5, 6);
      if constexpr (Panels > 1) _tile_dpbusd(3, 5, 7);
    }
  }
  constexpr int kAccStride = kMaxTileColumns * sizeof(int32_t);
  _tile_stored(0, acc, kAccStride);
  if constexpr (Panels > 1) _tile_stored(1, acc + kPanelColumns, kAccStride);
  if constexpr (RowTiles > 1) _tile_stored(2, acc + kTileRows * kMaxTileColumns, kAccStride);
  if constexpr (RowTiles > 1 && Panels > 1) _tile_stored(3, acc + kTileRows * kMaxTileColumns + kPanelColumns, kAccStride);
}

// The quads after the last whole chunk, for the tile's real rows, into the stored sums.
void add_quad_tail(const Problem& p, int rows, int panels, const uint8_t* a, const int8_t* w, int32_t* acc) {
  const int64_t q0 = p.quads / kChunkQuads * kChunkQuads;
  if (q0 == p.quads) return;
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < panels; ++j) {
      int32_t* out = acc + r * kMaxTileColumns + j * kPanelColumns;
      __m512i sum = _mm512_load_si512(out);
      for (int64_t q = q0; q < p.quads; ++q) {
        const __m512i av = _mm512_set1_epi32(load_i32(a + r * p.a_row_bytes + q * kQuad));
        sum = _mm512_dpbusd_epi32(sum, av, _mm512_loadu_si512(w + j * p.panel_bytes + q * kQuadRowBytes));
      }
      _mm512_store_si512(out, sum);
    }
  }
}

// At most 8 rows (decode, a block's last rows) a tile would multiply mostly padding: there the
// AVX-512 VNNI kernel is faster (M = 1-8 at 4096 -> 4096, 2 threads: 0.46-0.51 ms against AMX's
// 0.51-0.59; at M = 16 AMX takes 0.52 ms against 0.75).
constexpr int kVnniRows = 8;

struct Micro {
  static constexpr int kMaxRows = 2 * kTileRows;
  static constexpr int kMaxPanels = 2;
  static int tile_rows(const Problem&) { return kMaxRows; }
  static void run(const Problem& p, int64_t m, int rows, int64_t panel, int panels, int32_t* acc) {
    const uint8_t* a = p.a + m * p.a_row_bytes;
    const int8_t* w = p.panels + panel * p.panel_bytes;
    if (rows <= kVnniRows) {
      if (panels == 2) RowDispatch<kVnniRows, Vnni512Tile, 2>::run(rows, p, a, w, acc);
      else RowDispatch<kVnniRows, Vnni512Tile, 1>::run(rows, p, a, w, acc);
      return;
    }
    const bool two_row_tiles = rows > kTileRows;
    if (two_row_tiles && panels == 2) amx_tiles<2, 2>(p, a, w, acc);
    else if (two_row_tiles) amx_tiles<2, 1>(p, a, w, acc);
    else if (panels == 2) amx_tiles<1, 2>(p, a, w, acc);
    else amx_tiles<1, 1>(p, a, w, acc);
    add_quad_tail(p, rows, panels, a, w, acc);
  }
  // Every tile 16 rows of 64 bytes, for one tile block.
  struct Session {
    Session() {
      TileConfig config;
      for (int t = 0; t < 8; ++t) {
        config.bytes_per_row[t] = kTileBytes;
        config.rows[t] = kTileRows;
      }
      _tile_loadconfig(&config);
    }
    ~Session() { _tile_release(); }
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;
  };
};

bool wide_rows(const Problem&) { return false; }

}  // namespace

const IsaKernels* amx_int8_kernels() {
  static const IsaKernels kernels = kernels_with<Micro>("amx_int8", wide_rows);
  return &kernels;
}

}  // namespace qla_cpu
