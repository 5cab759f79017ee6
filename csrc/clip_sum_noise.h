// Host-side launchers of the kernels in clip_sum_noise.cu.
//
// This header is torch-free on purpose: clip_sum_noise.cu includes only it, philox.cuh and the
// CUDA headers, so the kernels compile with a bare nvcc (csrc/check_compile.sh); bindings.cpp
// does the tensor checks and calls these launchers on torch's current stream.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "philox.cuh"

namespace dpk {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out[j] = sum_{i<B} clip_factors[i] * g[i*n + j]  +  noise_std * z(key, element j),  0 <= j < n.
//
// g: (B, n) row-major, dense, element type `dtype`; clip_factors: B float32; out: n elements of
// `dtype`, not aliasing g. Accumulation in float32. noise_std == 0 skips the noise draw entirely.
// B may be 0 (out = noise only); n == 0 launches nothing. Returns the launch error, if any.
cudaError_t launch_clip_sum_noise(const void* g, const float* clip_factors, void* out, int64_t B,
                                  int64_t n, DType dtype, float noise_std, PhiloxKey key,
                                  cudaStream_t stream);

// out[j] = z(key, element offset + j) as float32, 0 <= j < n.
cudaError_t launch_philox_normal(float* out, int64_t n, uint64_t offset, PhiloxKey key,
                                 cudaStream_t stream);

// out[4*j + w] = word w of Philox4x32-10 for element offset + j (the uint32 bits), 0 <= j < n.
cudaError_t launch_philox4x32(uint32_t* out, int64_t n, uint64_t offset, PhiloxKey key,
                              cudaStream_t stream);

}  // namespace dpk
