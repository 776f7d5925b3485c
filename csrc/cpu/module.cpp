// qla_kernels._cpu: the x86-64 kernels' entry points for ops/cpu.py. It takes raw pointers that
// ops/cpu.py has checked (dtype, shape, contiguity) and allocated, picks the instruction-set path
// per call (a CPUID-checked name), and splits work over torch's intra-op threads by rows and
// columns, never by K: every output element is computed by the same instructions in the same order
// whatever the thread count.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

namespace qla_cpu {

void prepare_rows(const int8_t* a, int64_t a_stride, int64_t a_rows, const int64_t* gather, int64_t k,
                  int64_t quads, bool wide, int64_t m0, int64_t m1, uint8_t* out, int64_t out_row_bytes) {
  const int64_t padded = quads * kQuad;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t source = gather ? gather[m] : m;
    const int8_t* row = (source >= 0 && source < a_rows) ? a + source * a_stride : nullptr;
    uint8_t* dst = out + m * out_row_bytes;
    if (wide) {
      int16_t* wide_dst = reinterpret_cast<int16_t*>(dst);
      for (int64_t i = 0; i < k; ++i) wide_dst[i] = row ? row[i] : 0;
      for (int64_t i = k; i < padded; ++i) wide_dst[i] = 0;
    } else {
      // u8 = code + 128 (the sign bit flipped); a missing row is code 0, padding k meets zero weights.
      for (int64_t i = 0; i < k; ++i) dst[i] = row ? static_cast<uint8_t>(row[i]) ^ 0x80u : 0x80u;
      for (int64_t i = k; i < padded; ++i) dst[i] = 0x80u;
    }
  }
}

// The panel layout of kernels.h from an int8 [n, k] row-major matrix: one pass per panel, in
// parallel over panels (ops/cpu.py `pack_panels` is its specification).
void pack_panels(const int8_t* w, int64_t n, int64_t k, int8_t* out) {
  const int64_t quads = (k + kQuad - 1) / kQuad;
  const int64_t panels = (n + kPanelColumns - 1) / kPanelColumns;
  const int64_t panel_bytes = (quads + 2) * kQuadRowBytes;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int8_t* dst = out + p * panel_bytes;
      std::memset(dst, 0, static_cast<size_t>(panel_bytes));
      int32_t colsum[kPanelColumns] = {};
      int32_t max_abs = 0;
      const int columns = static_cast<int>(std::min<int64_t>(kPanelColumns, n - p * kPanelColumns));
      const int8_t* rows = w + p * kPanelColumns * k;
      // Quad rows in order (one 64-byte row written at a time from 16 read streams).
      for (int64_t q = 0; q < quads; ++q) {
        const int64_t k0 = q * kQuad, width = std::min<int64_t>(kQuad, k - k0);
        int8_t* quad_row = dst + q * kQuadRowBytes;
        for (int c = 0; c < columns; ++c) {
          const int8_t* source = rows + c * k + k0;
          for (int64_t j = 0; j < width; ++j) {
            const int32_t v = source[j];
            quad_row[c * kQuad + j] = source[j];
            colsum[c] += v;
            max_abs = std::max(max_abs, v < 0 ? -v : v);
          }
        }
      }
      std::memcpy(dst + quads * kQuadRowBytes, colsum, sizeof(colsum));
      std::memcpy(dst + (quads + 1) * kQuadRowBytes, &max_abs, sizeof(max_abs));
    }
  });
}

namespace {

struct IsaEntry {
  const char* name;
  bool (*supported)();
  const IsaKernels* (*kernels)();
};

bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx_vnni() { return has_avx2() && __builtin_cpu_supports("avxvnni"); }
bool has_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

#ifndef QLA_CPU_NO_AMX
// AMX needs the CPU's tile instructions and, on Linux, the process's permission for the tile data
// state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first tile
// instruction faults. Asked once; a kernel that refuses leaves the path out.
bool has_amx_int8() {
  static const bool permitted = [] {
    unsigned eax, ebx, ecx, edx;
    const bool tiles = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 24)) && (edx & (1u << 25));
    if (!has_avx512_vnni() || !tiles) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return permitted;
}
#endif

// Fastest first.
const IsaEntry kIsas[] = {
#ifndef QLA_CPU_NO_AMX
    {"amx_int8", has_amx_int8, amx_int8_kernels},
#endif
    {"avx512_vnni", has_avx512_vnni, avx512_vnni_kernels},
    {"avx_vnni", has_avx_vnni, avx_vnni_kernels},
    {"avx2", has_avx2, avx2_kernels},
};

const IsaKernels* kernels_for(const std::string& name) {
  for (const auto& isa : kIsas) {
    if (name == isa.name) {
      if (!isa.supported()) throw std::invalid_argument("this CPU does not support the " + name + " path");
      return isa.kernels();
    }
  }
  throw std::invalid_argument("unknown CPU instruction-set path " + name);
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const auto& isa : kIsas)
    if (isa.supported()) names.emplace_back(isa.name);
  return names;
}

// CPU features the kernels do not use, reported by qk.backends(): AMX-INT8 where this build has no
// AMX path (a compiler without -mamx-int8) or the kernel refused the tile state.
std::vector<std::string> unused_features() {
  std::vector<std::string> names;
  unsigned eax, ebx, ecx, edx;
  const bool present = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 25));
#ifndef QLA_CPU_NO_AMX
  if (present && !has_amx_int8()) names.emplace_back("amx_int8");
#else
  if (present) names.emplace_back("amx_int8");
#endif
  return names;
}

template <class T>
T* pointer(int64_t address) {
  return reinterpret_cast<T*>(address);
}

// A rotation as ops/cpu.py passes it: None, or (signs, dense, m, P) for rows of k = m·P.
using RotationArguments = std::optional<std::tuple<int64_t, int64_t, int64_t, int64_t>>;

std::optional<Rotation> rotation_of(const RotationArguments& arguments, int64_t k) {
  if (!arguments) return std::nullopt;
  Rotation r;
  r.k = k;
  r.signs = pointer<const float>(std::get<0>(*arguments));
  r.dense = pointer<const float>(std::get<1>(*arguments));
  r.m = std::get<2>(*arguments);
  r.p = std::get<3>(*arguments);
  return r;
}

const Rotation* address_of(const std::optional<Rotation>& rotation) { return rotation ? &*rotation : nullptr; }

void run_fused_linear(const IsaKernels& isa, Problem p, const int8_t* a, int64_t a_stride, int64_t a_rows,
                      const int64_t* gather, int64_t k, const int32_t* zero_point, bool zero_per_row) {
  const int64_t panels = p.panels_count();
  int64_t max_abs = 0;
  for (int64_t i = 0; i < panels; ++i) max_abs = std::max<int64_t>(max_abs, panel_max_abs(p, i));
  p.small_weights = max_abs <= 64;
  const bool wide = isa.wide_rows(p);
  const int64_t rows = p.rows;
  if (rows == 0) return;
  p.a_row_bytes = (p.quads * kQuad * (wide ? 2 : 1) + 63) / 64 * 64;
  // In whole 16-row tiles, zero past the GEMM's rows: AMX tile loads read whole tiles.
  const int64_t tile_rows = (rows + 15) / 16 * 16;
  std::vector<uint8_t> prepared(static_cast<size_t>(tile_rows * p.a_row_bytes + 64));
  std::vector<int32_t> offsets(static_cast<size_t>(rows));
  const int32_t base = wide ? 0 : 128;
  for (int64_t m = 0; m < rows; ++m) offsets[m] = base + (zero_point ? zero_point[zero_per_row ? m : 0] : 0);
  p.a = prepared.data();
  p.row_offset = offsets.data();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, rows, 64, [&](int64_t m0, int64_t m1) {
    prepare_rows(a, a_stride, a_rows, gather, k, p.quads, wide, m0, m1, prepared.data(), p.a_row_bytes);
  });

  const int64_t row_blocks = (rows + kBlockRows - 1) / kBlockRows;
  const bool whole_rows = p.out_q != nullptr || is_gated(p.activation);
  if (whole_rows && row_blocks >= 2 * threads) {
    // Each task owns whole rows: the row stage follows its tiles while they are in cache.
    at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(static_cast<size_t>(kBlockRows * p.columns));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kBlockRows, m1 = std::min(rows, m0 + kBlockRows);
        isa.tile_block(p, m0, m1, 0, panels, scratch.data(), m0, p.columns);
        isa.finish_rows(p, m0, m1, scratch.data(), m0, p.columns);
      }
    });
    return;
  }
  // Tasks of (row block, column chunk): few rows are split by columns so that every thread works.
  int64_t chunk = (panels * row_blocks + 4 * threads - 1) / (4 * threads);
  chunk = std::min<int64_t>(12, std::max<int64_t>(3, (chunk + 2) / 3 * 3));
  const int64_t chunks = (panels + chunk - 1) / chunk;
  std::vector<float> scratch(whole_rows ? static_cast<size_t>(rows * p.columns) : 0);
  float* y = whole_rows ? scratch.data() : nullptr;
  at::parallel_for(0, row_blocks * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, c = t % chunks;
      const int64_t m0 = b * kBlockRows, m1 = std::min(rows, m0 + kBlockRows);
      isa.tile_block(p, m0, m1, c * chunk, std::min(panels, (c + 1) * chunk), y, 0, p.columns);
    }
  });
  if (whole_rows) {
    at::parallel_for(0, rows, 1, [&](int64_t m0, int64_t m1) { isa.finish_rows(p, m0, m1, y, 0, p.columns); });
  }
}

}  // namespace
}  // namespace qla_cpu

PYBIND11_MODULE(_cpu, m) {
  using namespace qla_cpu;
  m.doc() = "qla_kernels x86-64 CPU kernels (raw pointers checked by qla_kernels.ops.cpu)";
  m.def("supported_isas", &supported_isas, "The instruction-set paths this CPU runs, fastest first.");
  m.def("unused_features", &unused_features, "CPU features present that no path uses yet.");
  m.attr("PANEL_COLUMNS") = kPanelColumns;
  m.def(
      "pack_panels",
      [](int64_t weight, int64_t n, int64_t k, int64_t out) {
        py::gil_scoped_release release;
        pack_panels(pointer<const int8_t>(weight), n, k, pointer<int8_t>(out));
      },
      "Packs a contiguous int8 [n, k] weight into the kernels' panels (ops/cpu.py pack_panels).");
  m.def(
      "fused_linear",
      [](const std::string& isa_name, int64_t a, int64_t a_stride, int64_t a_rows, int64_t gather, int64_t rows,
         int64_t k, int64_t panels, int64_t columns, int64_t zero_point, bool zero_per_row, int64_t a_scale,
         int64_t w_scale, int64_t lowrank_t, int64_t t_stride, int64_t rank, int64_t lowrank_u_panels, int64_t addend,
         int64_t addend_stride, int64_t bias, int activation, int64_t residual, int64_t residual_stride,
         int64_t scatter, int64_t out_rows, int64_t out, int64_t out_stride, int64_t out_q, int64_t out_scale,
         int requant_bits, const RotationArguments& requant_rotation, bool residual_first) {
        const IsaKernels& isa = *kernels_for(isa_name);
        const std::optional<Rotation> rotation =
            rotation_of(requant_rotation, is_gated(activation) ? columns / 2 : columns);
        Problem p;
        p.rows = rows;
        p.columns = columns;
        p.quads = (k + kQuad - 1) / kQuad;
        p.panels = pointer<const int8_t>(panels);
        p.panel_bytes = (p.quads + 2) * kQuadRowBytes;
        p.a_scale = pointer<const float>(a_scale);
        p.w_scale = pointer<const float>(w_scale);
        p.lowrank_t = pointer<const float>(lowrank_t);
        p.t_stride = t_stride;
        p.rank = rank;
        p.lowrank_u_panels = pointer<const float>(lowrank_u_panels);
        p.addend = pointer<const float>(addend);
        p.addend_stride = addend_stride;
        p.bias = pointer<const float>(bias);
        p.activation = activation;
        p.residual = pointer<const float>(residual);
        p.residual_stride = residual_stride;
        p.scatter = pointer<const int64_t>(scatter);
        p.out_rows = out_rows;
        p.out = pointer<float>(out);
        p.out_stride = out_stride;
        p.out_q = pointer<int8_t>(out_q);
        p.out_scale = pointer<float>(out_scale);
        p.requant_bits = requant_bits;
        p.requant_rotation = address_of(rotation);
        p.residual_first = residual_first;
        py::gil_scoped_release release;
        run_fused_linear(isa, p, pointer<const int8_t>(a), a_stride, a_rows, pointer<const int64_t>(gather), k,
                         pointer<const int32_t>(zero_point), zero_per_row);
      },
      "The fused linear (ops/cpu.py fused_linear).");
  m.def(
      "normalize_rows",
      [](const std::string& isa_name, int64_t x, int64_t rows, int64_t k, int kind, int64_t weight, int64_t bias,
         double eps, int64_t normed, int bits, int64_t static_scale, int zero_point, bool has_zero, bool subtract_zero,
         const RotationArguments& rotation_arguments, int64_t q, int64_t scale, int64_t down_t, int64_t rank, int64_t t,
         bool down_from_input) {
        const IsaKernels& isa = *kernels_for(isa_name);
        const std::optional<Rotation> rotation = rotation_of(rotation_arguments, k);
        py::gil_scoped_release release;
        at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
          isa.normalize_rows(pointer<const float>(x), m0, m1, k, kind, pointer<const float>(weight),
                             pointer<const float>(bias), static_cast<float>(eps), pointer<float>(normed), bits,
                             pointer<const float>(static_scale), zero_point, has_zero, subtract_zero,
                             address_of(rotation), pointer<int8_t>(q), pointer<float>(scale));
          if (rank)
            isa.project_rows(down_from_input ? pointer<const float>(x) : pointer<const float>(normed), k, m0, m1, k,
                             pointer<const float>(down_t), rank, pointer<float>(t));
        });
      },
      "LayerNorm / RMSNorm of fp32 rows, optionally rotated and quantized per token, optionally T = rows·A "
      "(ops/cpu.py).");
  m.def(
      "w4a16_rows",
      [](const std::string& isa_name, int64_t x, int64_t rows, int64_t k, int64_t weight, int64_t scale,
         int64_t zero, int64_t group, int rounding, int64_t columns, int64_t out) {
        const IsaKernels& isa = *kernels_for(isa_name);
        py::gil_scoped_release release;
        at::parallel_for(0, columns, 16, [&](int64_t n0, int64_t n1) {
          isa.w4a16_rows(pointer<const float>(x), rows, k, pointer<const uint8_t>(weight),
                         pointer<const float>(scale), pointer<const uint8_t>(zero), group, rounding, n0, n1,
                         pointer<float>(out),
                         columns);
        });
      },
      "W4A16 x·Wᵀ at few rows (ops/cpu.py), the weight read once.");
  m.def(
      "attention_rows",
      [](const std::string& isa_name, int64_t q, int64_t q_stride, int64_t k, int64_t k_stride, int64_t v,
         int64_t v_stride, int64_t sequences, int64_t tokens, int64_t heads, int64_t head_dim, double scale,
         int64_t mask, int64_t mask_sequence_stride, int64_t mask_head_stride, int64_t mask_row_stride, int64_t out,
         int64_t out_stride) {
        const IsaKernels& isa = *kernels_for(isa_name);
        AttentionProblem p;
        p.q = pointer<const float>(q);
        p.k = pointer<const float>(k);
        p.v = pointer<const float>(v);
        p.q_stride = q_stride;
        p.k_stride = k_stride;
        p.v_stride = v_stride;
        p.tokens = tokens;
        p.heads = heads;
        p.head_dim = head_dim;
        p.scale = static_cast<float>(scale);
        p.mask = pointer<const float>(mask);
        p.mask_sequence_stride = mask_sequence_stride;
        p.mask_head_stride = mask_head_stride;
        p.mask_row_stride = mask_row_stride;
        p.out = pointer<float>(out);
        p.out_stride = out_stride;
        py::gil_scoped_release release;
        // Whole heads per task: each one's kᵀ and v are copied once, and its rows are computed in
        // one order whatever the thread count.
        at::parallel_for(0, sequences * heads, 1, [&](int64_t t0, int64_t t1) { isa.attention_heads(p, t0, t1); });
      },
      "Self-attention of fp32 q/k/v rows as the GEMMs wrote them (ops/cpu.py attention_rows).");
  m.def(
      "dwsep_rows",
      [](const std::string& isa_name, int64_t h, int64_t h_stride, int64_t rows, int64_t tokens, int64_t prefix,
         int64_t height, int64_t width, int64_t dim, int64_t dw_weight, int taps, int64_t dw_bias, int64_t down_weight,
         int64_t down_bias, int64_t token_mask, int64_t rank, int64_t out) {
        const IsaKernels& isa = *kernels_for(isa_name);
        DwsepProblem p;
        p.h = pointer<const float>(h);
        p.h_stride = h_stride;
        p.tokens = tokens;
        p.prefix = prefix;
        p.height = height;
        p.width = width;
        p.dim = dim;
        p.dw_weight = pointer<const float>(dw_weight);
        p.taps = taps;
        p.dw_bias = pointer<const float>(dw_bias);
        p.down_weight = pointer<const float>(down_weight);
        p.down_bias = pointer<const float>(down_bias);
        p.token_mask = pointer<const float>(token_mask);
        p.rank = rank;
        p.out = pointer<float>(out);
        py::gil_scoped_release release;
        at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { isa.dwsep_rows(p, r0, r1); });
      },
      "QLA's DW-separable down path on fp32 rows (ops/cpu.py dwsep_down).");
  m.def(
      "rotate_rows",
      [](const std::string& isa_name, int64_t x, int64_t x_stride, int64_t rows, int64_t k,
         const RotationArguments& rotation, int64_t out) {
        const IsaKernels& isa = *kernels_for(isa_name);
        RotateProblem p;
        p.rotation = *rotation_of(rotation, k);
        p.x = pointer<const float>(x);
        p.x_stride = x_stride;
        p.out = pointer<float>(out);
        py::gil_scoped_release release;
        at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { isa.rotate_rows(p, r0, r1); });
      },
      "The Hadamard rotation of fp32 rows (ops/cpu.py hadamard_rotate).");
  m.def(
      "quantize_rows",
      [](const std::string& isa_name, int64_t x, int64_t x_stride, int64_t rows, int64_t k, int bits,
         int64_t static_scale, int zero_point, bool has_zero, bool subtract_zero,
         const RotationArguments& rotation_arguments, int64_t q, int64_t scale, int64_t down_t, int64_t rank,
         int64_t t) {
        const IsaKernels& isa = *kernels_for(isa_name);
        const std::optional<Rotation> rotation = rotation_of(rotation_arguments, k);
        py::gil_scoped_release release;
        at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
          isa.quantize_rows(pointer<const float>(x), x_stride, m0, m1, k, bits, pointer<const float>(static_scale),
                            zero_point, has_zero, subtract_zero, address_of(rotation), pointer<int8_t>(q),
                            pointer<float>(scale));
          if (rank) isa.project_rows(pointer<const float>(x), x_stride, m0, m1, k, pointer<const float>(down_t), rank,
                                     pointer<float>(t));
        });
      },
      "Per-token (or static per-tensor) quantization of fp32 rows, optionally rotated first, into int8 codes and "
      "fp32 scales, optionally T = rows·A (of the unrotated rows).");
}
