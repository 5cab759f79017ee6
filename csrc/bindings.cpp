// Python bindings of the dpkernels CUDA extension (module dpkernels._C, or dpkernels_C when
// JIT-compiled by dpkernels/_cuda.py). Tensor checks live here; the kernels and their launchers
// are in clip_sum_noise.cu (torch-free).
#include <torch/extension.h>

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "clip_sum_noise.h"

namespace {

constexpr int64_t kTwoPow32 = int64_t{1} << 32;

uint32_t check_u32(int64_t v, const char* op, const char* name) {
  TORCH_CHECK(v >= 0 && v < kTwoPow32, "dpkernels ", op, ": ", name,
              " must be in [0, 2**32), got ", v);
  return static_cast<uint32_t>(v);
}

dpk::PhiloxKey make_key(const char* op, int64_t seed_lo, int64_t seed_hi, int64_t step,
                        int64_t stream) {
  return dpk::PhiloxKey{check_u32(seed_lo, op, "seed_lo"), check_u32(seed_hi, op, "seed_hi"),
                        check_u32(step, op, "step"), check_u32(stream, op, "stream")};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "dpkernels ", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

c10::Device resolve_cuda_device(c10::Device device, const char* op) {
  TORCH_CHECK(device.is_cuda(), "dpkernels ", op, ": device must be a CUDA device, got ", device);
  if (!device.has_index()) return c10::Device(c10::kCUDA, c10::cuda::current_device());
  return device;
}

// out[j] = sum_i clip_factors[i] * per_example[i, j] + noise_std * z(seed, step, stream, j).
torch::Tensor clip_sum_noise(const torch::Tensor& per_example, const torch::Tensor& clip_factors,
                             double noise_std, int64_t seed_lo, int64_t seed_hi, int64_t step,
                             int64_t stream) {
  constexpr const char* op = "clip_sum_noise";
  TORCH_CHECK(per_example.is_cuda(), "dpkernels clip_sum_noise: per_example must be a CUDA tensor, got device ",
              per_example.device());
  TORCH_CHECK(clip_factors.is_cuda(), "dpkernels clip_sum_noise: clip_factors must be a CUDA tensor, got device ",
              clip_factors.device());
  TORCH_CHECK(per_example.device() == clip_factors.device(),
              "dpkernels clip_sum_noise: per_example and clip_factors must be on the same device, got ",
              per_example.device(), " and ", clip_factors.device());
  TORCH_CHECK(per_example.dim() == 2,
              "dpkernels clip_sum_noise: per_example must be 2-D (B, n), got shape ", per_example.sizes());
  TORCH_CHECK(clip_factors.dim() == 1 && clip_factors.size(0) == per_example.size(0),
              "dpkernels clip_sum_noise: clip_factors must have shape (B,) = (", per_example.size(0),
              ",), got shape ", clip_factors.sizes());
  const auto st = per_example.scalar_type();
  dpk::DType dtype;
  if (st == at::kFloat) {
    dtype = dpk::DType::kFloat32;
  } else if (st == at::kBFloat16) {
    dtype = dpk::DType::kBFloat16;
  } else if (st == at::kHalf) {
    dtype = dpk::DType::kFloat16;
  } else {
    TORCH_CHECK(false, "dpkernels clip_sum_noise: per_example must be float32, bfloat16 or float16, got ", st);
  }
  TORCH_CHECK(clip_factors.scalar_type() == at::kFloat,
              "dpkernels clip_sum_noise: clip_factors must be float32, got ", clip_factors.scalar_type());
  TORCH_CHECK(per_example.is_contiguous(),
              "dpkernels clip_sum_noise: per_example must be contiguous (call .contiguous()), got strides ",
              per_example.strides());
  TORCH_CHECK(clip_factors.is_contiguous(),
              "dpkernels clip_sum_noise: clip_factors must be contiguous, got strides ", clip_factors.strides());
  TORCH_CHECK(std::isfinite(noise_std) && noise_std >= 0.0 && noise_std <= static_cast<double>(FLT_MAX),
              "dpkernels clip_sum_noise: noise_std must be finite, >= 0 and fit in float32, got ", noise_std);
  const dpk::PhiloxKey key = make_key(op, seed_lo, seed_hi, step, stream);

  const int64_t B = per_example.size(0);
  const int64_t n = per_example.size(1);
  const c10::cuda::CUDAGuard guard(per_example.device());
  torch::Tensor out = torch::empty({n}, per_example.options());
  if (n == 0) return out;
  check_launch(dpk::launch_clip_sum_noise(per_example.data_ptr(), clip_factors.data_ptr<float>(),
                                          out.data_ptr(), B, n, dtype, static_cast<float>(noise_std),
                                          key, c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

// float32 standard normals z(seed, step, stream, offset + j), j < n (the generator alone).
// `offset` is the first element index; its int64 bits are read as uint64 (two's complement), so
// the whole 64-bit element space is reachable (element indices wrap mod 2^64, like the counter).
torch::Tensor philox_normal(int64_t n, int64_t seed_lo, int64_t seed_hi, int64_t step,
                            int64_t stream, c10::Device device, int64_t offset) {
  constexpr const char* op = "philox_normal";
  TORCH_CHECK(n >= 0, "dpkernels philox_normal: n must be >= 0, got ", n);
  const dpk::PhiloxKey key = make_key(op, seed_lo, seed_hi, step, stream);
  device = resolve_cuda_device(device, op);
  const c10::cuda::CUDAGuard guard(device);
  torch::Tensor out = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat).device(device));
  check_launch(dpk::launch_philox_normal(out.data_ptr<float>(), n, static_cast<uint64_t>(offset), key,
                                         c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

// The raw Philox4x32-10 words at raw counters offset + j, j < n, as an int32 (n, 4) tensor holding
// the uint32 bit patterns (mask with 0xFFFFFFFF after widening to int64 to read them unsigned).
torch::Tensor philox4x32(int64_t n, int64_t seed_lo, int64_t seed_hi, int64_t step, int64_t stream,
                         c10::Device device, int64_t offset) {
  constexpr const char* op = "philox4x32";
  TORCH_CHECK(n >= 0, "dpkernels philox4x32: n must be >= 0, got ", n);
  const dpk::PhiloxKey key = make_key(op, seed_lo, seed_hi, step, stream);
  device = resolve_cuda_device(device, op);
  const c10::cuda::CUDAGuard guard(device);
  torch::Tensor out = torch::empty({n, 4}, torch::TensorOptions().dtype(torch::kInt).device(device));
  check_launch(dpk::launch_philox4x32(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), n,
                                      static_cast<uint64_t>(offset), key,
                                      c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpkernels CUDA kernels: fused clip-sum-noise and the Philox-4x32-10 noise generator";
  m.attr("API_VERSION") = 1;
  m.def("clip_sum_noise", &clip_sum_noise,
        "out[j] = sum_i clip_factors[i] * per_example[i, j] + noise_std * z(key, j); per_example "
        "(B, n) contiguous float32/bfloat16/float16 CUDA, clip_factors (B,) float32; returns (n,) "
        "in per_example's dtype (float32 accumulation).",
        py::arg("per_example"), py::arg("clip_factors"), py::arg("noise_std"), py::arg("seed_lo"),
        py::arg("seed_hi"), py::arg("step"), py::arg("stream"));
  m.def("philox_normal", &philox_normal,
        "float32 (n,) standard normals for elements offset .. offset + n - 1 of the counter block "
        "(seed_lo, seed_hi, step, stream).",
        py::arg("n"), py::arg("seed_lo"), py::arg("seed_hi"), py::arg("step"), py::arg("stream"),
        py::arg("device"), py::arg("offset") = 0);
  m.def("philox4x32", &philox4x32,
        "int32 (n, 4): the Philox-4x32-10 output words (uint32 bits) at raw counters offset .. "
        "offset + n - 1 of the counter block (seed_lo, seed_hi, step, stream).",
        py::arg("n"), py::arg("seed_lo"), py::arg("seed_hi"), py::arg("step"), py::arg("stream"),
        py::arg("device"), py::arg("offset") = 0);
}
