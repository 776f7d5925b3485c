// qla_kernels._C: a torch-agnostic pybind11 module. It takes raw device pointers, shapes and the
// caller's CUDA stream, so it builds in seconds and does not depend on the torch C++ ABI; the
// Python side (qla_kernels/ops/cuda.py) validates tensors and wraps each entry in a custom op.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "quantize_per_token.h"

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qla_kernels CUDA kernels (pointer-level API; use qla_kernels.ops instead)";
  m.def("quantize_per_token", &quantize_per_token, py::arg("x"), py::arg("dtype_code"),
        py::arg("q"), py::arg("scale"), py::arg("M"), py::arg("K"), py::arg("bits"),
        py::arg("stream"),
        "Symmetric per-token quantization of a row-major [M, K] matrix to int8 with fp32 scales.");
  m.attr("CUDA_ARCHS") = QLA_CUDA_ARCHS;
}
