// qla_kernels._C: a torch-agnostic pybind11 module. It takes raw device pointers, shapes and the
// caller's CUDA stream, so it builds in seconds and does not depend on the torch C++ ABI; the
// Python side (qla_kernels/ops/cuda.py) validates tensors and wraps each entry in a custom op.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "quantize_per_token.h"
#include "w4a16_decode.h"

namespace py = pybind11;

namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

void quantize_per_token(std::uintptr_t x, int dtype_code, std::uintptr_t q, std::uintptr_t scale,
                        int64_t M, int64_t K, int bits, std::uintptr_t stream) {
  if (x == 0 || q == 0 || scale == 0) throw std::invalid_argument("null device pointer");
  if (M <= 0 || K <= 0) throw std::invalid_argument("M and K must be positive");
  if (M > INT32_MAX) throw std::invalid_argument("M exceeds the grid limit");
  if (bits < 2 || bits > 8) throw std::invalid_argument("bits must be in [2, 8]");
  if (dtype_code < 0 || dtype_code > 2) throw std::invalid_argument("unknown dtype code");
  check_cuda(qla::launch_quantize_per_token(reinterpret_cast<const void*>(x),
                                            static_cast<qla::DType>(dtype_code),
                                            reinterpret_cast<int8_t*>(q),
                                            reinterpret_cast<float*>(scale), M, K, bits,
                                            reinterpret_cast<cudaStream_t>(stream)),
             "quantize_per_token launch");
}

void require(bool condition, const char* message) {
  if (!condition) throw std::invalid_argument(message);
}

void w4a16_decode(std::uintptr_t x, int dtype_code, std::uintptr_t weight, std::uintptr_t scale,
                  std::uintptr_t zero, std::uintptr_t lowrank_t, std::uintptr_t lowrank_u,
                  std::uintptr_t bias, std::uintptr_t residual, std::uintptr_t out,
                  std::uintptr_t workspace, int64_t M, int64_t N, int64_t K, int64_t group_size,
                  int64_t rank, int splits, int chunks_per_split, bool out_fp32, std::uintptr_t stream) {
  require(x != 0 && weight != 0 && scale != 0 && zero != 0 && out != 0, "null device pointer");
  require(x % 16 == 0 && weight % 16 == 0, "x and weight must be 16-byte aligned");
  require(dtype_code == 1 || dtype_code == 2, "dtype must be fp16 or bf16");
  require(M >= 1 && M <= 16, "M must be in [1, 16]");
  require(N >= 1 && N <= int64_t{1} << 36, "N out of range");
  require(K >= 128 && K % 128 == 0, "K must be a positive multiple of 128");
  require(group_size >= 32 && group_size % 32 == 0 && K % group_size == 0,
          "group_size must be a multiple of 32 that divides K");
  require((lowrank_t == 0) == (lowrank_u == 0) && rank >= 0 && (lowrank_t != 0 || rank == 0),
          "lowrank_t and lowrank_u come together, with rank >= 0");
  const int64_t chunks = K / 128;
  require(chunks_per_split >= 1 && splits >= 1 && static_cast<int64_t>(splits - 1) * chunks_per_split < chunks &&
              static_cast<int64_t>(splits) * chunks_per_split >= chunks,
          "splits x chunks_per_split must cover K's 128-wide chunks with no empty split");
  require(static_cast<int64_t>(chunks_per_split) * 128 * (M <= 8 ? 8 : 16) <= qla::kDecodeMaxStagedValues,
          "a split's K range is too long to stage in shared memory");
  require(splits == 1 || workspace != 0, "split-K needs a workspace");
  qla::W4A16DecodeArgs args{};
  args.x = reinterpret_cast<const void*>(x);
  args.weight = reinterpret_cast<const uint8_t*>(weight);
  args.scale = reinterpret_cast<const float*>(scale);
  args.zero = reinterpret_cast<const uint8_t*>(zero);
  args.lowrank_t = reinterpret_cast<const void*>(lowrank_t);
  args.lowrank_u = reinterpret_cast<const void*>(lowrank_u);
  args.bias = reinterpret_cast<const void*>(bias);
  args.residual = reinterpret_cast<const void*>(residual);
  args.out = reinterpret_cast<void*>(out);
  args.workspace = reinterpret_cast<float*>(workspace);
  args.M = M;
  args.N = N;
  args.K = K;
  args.group_size = group_size;
  args.rank = rank;
  args.splits = splits;
  args.chunks_per_split = chunks_per_split;
  args.dtype = static_cast<qla::DType>(dtype_code);
  args.out_fp32 = out_fp32;
  check_cuda(qla::launch_w4a16_decode(args, reinterpret_cast<cudaStream_t>(stream)), "w4a16_decode launch");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qla_kernels CUDA kernels (pointer-level API; use qla_kernels.ops instead)";
  m.def("quantize_per_token", &quantize_per_token, py::arg("x"), py::arg("dtype_code"),
        py::arg("q"), py::arg("scale"), py::arg("M"), py::arg("K"), py::arg("bits"),
        py::arg("stream"),
        "Symmetric per-token quantization of a row-major [M, K] matrix to int8 with fp32 scales.");
  m.def("w4a16_decode", &w4a16_decode, py::arg("x"), py::arg("dtype_code"), py::arg("weight"),
        py::arg("scale"), py::arg("zero"), py::arg("lowrank_t"), py::arg("lowrank_u"), py::arg("bias"),
        py::arg("residual"), py::arg("out"), py::arg("workspace"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("group_size"), py::arg("rank"), py::arg("splits"),
        py::arg("chunks_per_split"), py::arg("out_fp32"), py::arg("stream"),
        "W4A16 decode GEMM (M <= 16): out = x * dequant(W)^T + T*U^T + bias + residual (in the activation "
        "dtype, or fp32 with out_fp32); pointers may be 0 for absent operands.");
  m.attr("DECODE_MAX_STAGED_VALUES") = qla::kDecodeMaxStagedValues;
  m.attr("CUDA_ARCHS") = QLA_CUDA_ARCHS;
  m.attr("CUDA_PTX") = QLA_CUDA_PTX;
}
